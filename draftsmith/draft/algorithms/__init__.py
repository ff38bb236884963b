"""The draft algorithms draftsmith trains, by name: one module each, one line each in `ALGORITHMS`.

Adding an algorithm is a new module implementing `DraftAlgorithm` (base.py) and a line here; the recipe, the
stages and the runtimes' configs ask the algorithm object, never its name.
"""

from __future__ import annotations

from typing import Any

import torch

from draftsmith.draft.algorithms.base import (Capabilities, DraftAlgorithm, DraftConfigError,
                                              ExportedDraft, text_config)
from draftsmith.draft.algorithms.dflash import DFlash
from draftsmith.draft.algorithms.eagle1 import Eagle1
from draftsmith.draft.algorithms.eagle3 import Eagle3
from draftsmith.draft.algorithms.medusa import Medusa

ALGORITHMS: dict[str, DraftAlgorithm] = {a.name: a for a in (Eagle3(), Eagle1(), Medusa(), DFlash())}

__all__ = ["ALGORITHMS", "Capabilities", "DraftAlgorithm", "DraftConfigError", "ExportedDraft",
           "UnknownAlgorithm", "draft_forward", "get_algorithm", "text_config"]


class UnknownAlgorithm(ValueError):
    """A name that is not a registered algorithm (a recipe key, a checkpoint or export from elsewhere)."""


def get_algorithm(name: str) -> DraftAlgorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise UnknownAlgorithm(f"unknown draft algorithm {name!r}; the registered ones are "
                               f"{', '.join(ALGORITHMS)}") from None


def draft_forward(model: Any, batch: dict[str, torch.Tensor], algorithm: str) -> tuple[torch.Tensor, list[float]]:
    """(loss, accuracy per TTT step or per head) for one micro batch; `model` may be a DeepSpeed engine."""
    return get_algorithm(algorithm).forward(model, batch)


def draft_prefixes() -> tuple[str, ...]:
    """Where any algorithm's tensors live in a converted model (to tell the draft's modules from the base's)."""
    return tuple(sorted({a.prefix for a in ALGORITHMS.values()}))
