"""coral-torch: deduplicating, delta-encoding, bit-exact checkpoints for PyTorch and Lightning."""

from ._version import __version__
from .delta import Delta, DeltaConfig, DeltaEncoder, DeltaType
from .errors import CoralError
from .storage import HDF5Store, WeightStore
from .weight_tensor import WeightMetadata, WeightTensor

__all__ = [
    "__version__",
    "CoralError",
    "WeightTensor",
    "WeightMetadata",
    "WeightStore",
    "HDF5Store",
    "Delta",
    "DeltaConfig",
    "DeltaEncoder",
    "DeltaType",
]
