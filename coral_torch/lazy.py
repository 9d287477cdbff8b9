"""Public names that load their module on first use (PEP 562), so that ``import coral_torch``
stays light: no torch, h5py or boto3 until something that needs them is touched."""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, names: dict[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: each of ``names`` (public name -> module
    relative to the package) is imported when first looked up and then cached in ``namespace``
    (the package's ``globals()``), so later lookups cost nothing."""

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__


class LazyModule(types.ModuleType):
    """Stand-in that imports the named module on first attribute use (thread-safe: the import
    system locks it), for modules that import heavy libraries only some callers need."""

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self.__name__), attr)
