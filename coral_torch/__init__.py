"""coral-torch: deduplicating, delta-encoding, bit-exact checkpoints for PyTorch and Lightning.

Three ways in: the Lightning callback (:mod:`coral_torch.callbacks`), :func:`save`/:func:`load` as
drop-ins for ``torch.save``/``torch.load``, and resume by hash (``ckpt_path="coral://<hash>"``).

The names below load on first use (PEP 562), so ``import coral_torch`` is cheap: torch loads with
the first save or load, boto3 with the first :class:`S3Store`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._version import __version__
from .lazy import lazy_exports

if TYPE_CHECKING:
    # `X as X`: re-exported names (for type checkers; at run time they load lazily below)
    from .api import load as load, save as save
    from .dedup import DeduplicationResult as DeduplicationResult, Deduplicator as Deduplicator
    from .errors import CoralError as CoralError
    from .format.delta import (
        Delta as Delta,
        DeltaConfig as DeltaConfig,
        DeltaEncoder as DeltaEncoder,
        DeltaType as DeltaType,
    )
    from .format.weight_tensor import WeightMetadata as WeightMetadata, WeightTensor as WeightTensor
    from .repository import (
        CommitOptions as CommitOptions,
        CommitStats as CommitStats,
        Repository as Repository,
        VerifyReport as VerifyReport,
    )
    from .repository.handles import open_repository as open_repository
    from .storage import HDF5Store as HDF5Store, S3Config as S3Config, S3Store as S3Store, WeightStore as WeightStore

#: public name -> module (relative to this package) that defines it
_LAZY = {
    "save": ".api",
    "load": ".api",
    "open_repository": ".repository.handles",
    "Repository": ".repository",
    "CommitStats": ".repository",
    "CommitOptions": ".repository",
    "VerifyReport": ".repository",
    "CoralError": ".errors",
    "WeightTensor": ".format.weight_tensor",
    "WeightMetadata": ".format.weight_tensor",
    "WeightStore": ".storage",
    "HDF5Store": ".storage",
    "S3Store": ".storage",
    "S3Config": ".storage",
    "Deduplicator": ".dedup",
    "DeduplicationResult": ".dedup",
    "Delta": ".format.delta",
    "DeltaConfig": ".format.delta",
    "DeltaEncoder": ".format.delta",
    "DeltaType": ".format.delta",
}

__all__ = ["__version__", *_LAZY]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
