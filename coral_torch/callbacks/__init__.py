"""Lightning integration: the `CoralCheckpoint` callback and the `CoralCheckpointIO` plugin."""

from .checkpoint_io import CoralCheckpointIO
from .coral_checkpoint import CoralCheckpoint, CoralCheckpointError

__all__ = ["CoralCheckpoint", "CoralCheckpointIO", "CoralCheckpointError"]
