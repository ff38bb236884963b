"""The pipeline's stages, in the order they run; later issues append synthesis, training, export..."""

from draftsmith.stages.base_model import BaseModelStage
from draftsmith.stages.prompts import PromptsStage
from draftsmith.stages.synthesize import SynthesizeStage

STAGES = (BaseModelStage, PromptsStage, SynthesizeStage)


def pipeline_stages(until: str | None = None) -> list:
    """The stages in order, up to and including `until` (all of them when None)."""
    names = [stage.name for stage in STAGES]
    if until is not None and until not in names:
        raise ValueError(f"unknown stage {until!r}; stages are {names}")
    end = names.index(until) + 1 if until else len(STAGES)
    return [stage() for stage in STAGES[:end]]
