"""Checkpoint repository: commits over immutable packs and an atomic catalog.

The names load on first use (PEP 562), so tools that only read the catalog import no more than
they need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .catalog import CommitRow, ObjectRow
    from .repository import CommitStats, Repository, VerifyReport

#: public name -> submodule that defines it
_LAZY = {
    "Repository": ".repository",
    "CommitStats": ".repository",
    "VerifyReport": ".repository",
    "CommitRow": ".catalog",
    "ObjectRow": ".catalog",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
