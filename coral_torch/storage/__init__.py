"""Storage backends: the `WeightStore` contract, the local `HDF5Store` and the `S3Store` remote."""

from .hdf5_store import HDF5Store
from .weight_store import WeightStore

__all__ = ["WeightStore", "HDF5Store"]
