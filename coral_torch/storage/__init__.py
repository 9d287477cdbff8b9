"""Storage backends: the `WeightStore` contract, the local `HDF5Store` and the `S3Store` remote."""

from .hdf5_store import HDF5Store
from .s3_store import S3Config, S3Store
from .weight_store import WeightStore

__all__ = ["WeightStore", "HDF5Store", "S3Store", "S3Config"]
