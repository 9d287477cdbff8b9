"""Storage backends: the `WeightStore` contract, the local `HDF5Store` and the `S3Store` remote.

The names load on first use (PEP 562): h5py with :class:`HDF5Store`, boto3 with :class:`S3Store` or
:class:`S3Config`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:
    # `X as X`: re-exported names (for type checkers; at run time they load lazily below)
    from .hdf5_store import HDF5Store as HDF5Store
    from .s3.config import S3Config as S3Config
    from .s3.store import S3Store as S3Store
    from .weight_store import WeightStore as WeightStore

#: public name -> submodule that defines it
_LAZY = {
    "WeightStore": ".weight_store",
    "HDF5Store": ".hdf5_store",
    "S3Store": ".s3.store",
    "S3Config": ".s3.config",
}

__all__ = list(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
