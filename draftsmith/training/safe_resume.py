"""Resume from a DeepSpeed checkpoint without unpickling arbitrary objects.

DeepSpeed's `TorchCheckpointEngine.load` calls `torch.load(..., weights_only=False)`: whoever can write a file
into the run's checkpoint folder could make the trainer run code when it resumes. Its checkpoints hold tensors,
plain containers and three DeepSpeed types (the loss scaler, the ZeRO stage enum, the addresses of parameter
fragments), so `deepspeed_weights_only()` makes the engine load with `weights_only=True` and those three allowed.
A checkpoint holding anything else fails to load, naming the type (see `UnsafeCheckpoint`).

The override replaces one method for the duration of a `with` block, and checks first that the method is the one
it was written against (DeepSpeed's own, calling `torch.load`), so a DeepSpeed upgrade that changes it fails at
start instead of loading some other way.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch


class UnsafeCheckpoint(RuntimeError):
    """A checkpoint file holds objects outside the allowlist; it was not written by this code."""


def _allowed_types() -> list[type]:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def deepspeed_weights_only() -> Iterator[None]:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    original = TorchCheckpointEngine.load
    source = inspect.getsource(original)
    if "torch.load(path, map_location=map_location" not in source:
        raise RuntimeError("deepspeed's TorchCheckpointEngine.load is not the method draftsmith's safe resume "
                           "replaces (draftsmith/training/safe_resume.py); pin the deepspeed version in "
                           "pyproject.toml or update the override")
    allowed = _allowed_types()

    def load(self, path: str, map_location=None):  # noqa: ANN001 - DeepSpeed's signature
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError subclasses and RuntimeErrors for this
            if "Unsupported global" in str(exc) or "weights_only" in str(exc).lower():
                found = str(exc).split("GLOBAL ", 1)[-1].split(" ", 1)[0] if "GLOBAL " in str(exc) else "?"
                raise UnsafeCheckpoint(f"{path} holds {found}, which a draftsmith checkpoint never does; it was "
                                       "not written by this run's trainer: delete the checkpoint folder (training "
                                       "then restarts from the last good one or step 0)") from None
            raise

    TorchCheckpointEngine.load = load
    try:
        yield
    finally:
        TorchCheckpointEngine.load = original
