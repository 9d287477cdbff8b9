"""coral-torch: deduplicating, delta-encoding, bit-exact checkpoints for PyTorch and Lightning.

Three ways in: the Lightning callback (:mod:`coral_torch.callbacks`), :func:`save`/:func:`load` as
drop-ins for ``torch.save``/``torch.load``, and resume by hash (``ckpt_path="coral://<hash>"``).
"""

from ._version import __version__
from .api import load, open_repository, save
from .dedup import DeduplicationResult, Deduplicator
from .delta import Delta, DeltaConfig, DeltaEncoder, DeltaType
from .errors import CoralError
from .repository import CommitStats, Repository, VerifyReport
from .storage import HDF5Store, S3Config, S3Store, WeightStore
from .weight_tensor import WeightMetadata, WeightTensor

__all__ = [
    "__version__",
    "save",
    "load",
    "open_repository",
    "Repository",
    "CommitStats",
    "VerifyReport",
    "CoralError",
    "WeightTensor",
    "WeightMetadata",
    "WeightStore",
    "HDF5Store",
    "S3Store",
    "S3Config",
    "Deduplicator",
    "DeduplicationResult",
    "Delta",
    "DeltaConfig",
    "DeltaEncoder",
    "DeltaType",
]
