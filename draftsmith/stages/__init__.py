"""The pipeline's stages, in the order they run."""

from draftsmith.stages.base_model import BaseModelStage
from draftsmith.stages.convert import ConvertStage
from draftsmith.stages.dataset import DatasetStage
from draftsmith.stages.evaluate import EvaluateStage
from draftsmith.stages.export import ExportStage
from draftsmith.stages.features import FeaturesStage
from draftsmith.stages.prompts import PromptsStage
from draftsmith.stages.qat import QATStage
from draftsmith.stages.quantize import QuantizeStage
from draftsmith.stages.register import RegisterStage
from draftsmith.stages.synthesize import SynthesizeStage
from draftsmith.stages.train import TrainStage

STAGES = (BaseModelStage, PromptsStage, SynthesizeStage, DatasetStage, ConvertStage, FeaturesStage, TrainStage,
          QuantizeStage, QATStage, ExportStage, EvaluateStage, RegisterStage)


def pipeline_stages(until: str | None = None) -> list:
    """The stages in order, up to and including `until` (all of them when None)."""
    names = [stage.name for stage in STAGES]
    if until is not None and until not in names:
        raise ValueError(f"unknown stage {until!r}; stages are {names}")
    end = names.index(until) + 1 if until else len(STAGES)
    return [stage() for stage in STAGES[:end]]
