"""Lightning integration: the `CoralCheckpoint` callback, the `CoralCheckpointIO` plugin and
`load_module_from_checkpoint` (``load_from_checkpoint`` for coral-torch refs)."""

from .checkpoint_io import CoralCheckpointIO
from .coral_checkpoint import CoralCheckpoint, CoralCheckpointError
from .loading import load_module_from_checkpoint

__all__ = ["CoralCheckpoint", "CoralCheckpointIO", "CoralCheckpointError", "load_module_from_checkpoint"]
