"""Checkpoint repository: commits over immutable packs and an atomic catalog.

The names load on first use (PEP 562), so tools that only read the catalog import no more than
they need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:
    # `X as X`: re-exported names (for type checkers; at run time they load lazily below)
    from .catalog import CommitRow as CommitRow, ObjectRow as ObjectRow
    from .commit import CommitStats as CommitStats
    from .options import CommitOptions as CommitOptions
    from .packs import PackWriter as PackWriter, WrittenPack as WrittenPack
    from .repository import Repository as Repository, WrittenObjects as WrittenObjects
    from .verify import VerifyReport as VerifyReport

#: public name -> submodule that defines it
_LAZY = {
    "Repository": ".repository",
    "CommitStats": ".commit",
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
