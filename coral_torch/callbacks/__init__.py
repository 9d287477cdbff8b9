"""Lightning integration: the `CoralCheckpoint` callback, the `CoralCheckpointIO` plugin and
`load_module_from_checkpoint` (``load_from_checkpoint`` for coral-torch refs), and
`CoralModelParallelStrategy` (sharded FSDP2 runs checkpointed into the repository)."""

from typing import Any

from ..errors import CoralCheckpointError
from .checkpoint_io import CoralCheckpointIO
from .coral_checkpoint import CoralCheckpoint
from .loading import load_module_from_checkpoint


def __getattr__(name: str) -> Any:
    # the sharded strategy imports torch.distributed.checkpoint: only on first use
    if name == "CoralModelParallelStrategy":
        from .strategies import CoralModelParallelStrategy

        return CoralModelParallelStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CoralCheckpoint",
    "CoralCheckpointIO",
    "CoralCheckpointError",
    "CoralModelParallelStrategy",
    "load_module_from_checkpoint",
]
