"""The pipeline's stages, in the order they run; later issues append synthesis, training, export..."""

from draftsmith.stages.base_model import BaseModelStage
from draftsmith.stages.prompts import PromptsStage

STAGES = (BaseModelStage, PromptsStage)


def pipeline_stages() -> list:
    return [stage() for stage in STAGES]
