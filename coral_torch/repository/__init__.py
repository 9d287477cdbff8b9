"""Checkpoint repository: commits over immutable packs and an atomic catalog.

The names load on first use (PEP 562), so tools that only read the catalog import no more than
they need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:
    from .catalog import CommitRow, ObjectRow
    from .packs import PackWriter, WrittenPack
    from .verify import VerifyReport
    from .options import CommitOptions
    from .repository import CommitStats, Repository, WrittenObjects

#: public name -> submodule that defines it
_LAZY = {
    "Repository": ".repository",
    "CommitStats": ".repository",
    "CommitOptions": ".options",
    "VerifyReport": ".verify",
    "WrittenObjects": ".repository",
    "PackWriter": ".packs",
    "WrittenPack": ".packs",
    "CommitRow": ".catalog",
    "ObjectRow": ".catalog",
}

__all__ = list(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
