"""Every ref and run name, checked in one place.

Refs name commits: ``runs/<run>/latest``, ``runs/<run>/best``, ``runs/<run>/keep/<id>``,
``runs/<run>/top/<id>``, ``tags/<tag>``, ``files/<pointer path>``, ``keep/<id>``. Ref names also
become S3 keys and file-like paths, so a name must not be able to escape its prefix (``..``, a
leading ``/``) or break a line-based listing (control characters). Run and tag names are single
path components; a few words are reserved because :meth:`Repository.resolve` gives them a meaning
of its own (``latest``, ``best``, ``HEAD``): a tag of that name would be accepted and then never
found.

This module has no dependencies beyond the standard library, so catalog-only tools can use it.
"""

from __future__ import annotations

from .errors import InvalidRefNameError

#: names that :meth:`Repository.resolve` interprets itself; refused as tag and run names
RESERVED = frozenset({"latest", "best", "HEAD"})
_MAX_LENGTH = 1024


def _problem(name: object, *, component: bool) -> str | None:
    if not isinstance(name, str):
        return f"it is a {type(name).__name__}, not a string"
    if not name:
        return "it is empty"
    if len(name) > _MAX_LENGTH:
        return f"it is longer than {_MAX_LENGTH} characters"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return "it contains a control character (newline, tab, NUL, ...)"
    if name != name.strip():
        return "it starts or ends with white space"
    if component and "/" in name:
        return "it contains '/'"
    if name.startswith("/") or name.endswith("/") or "//" in name:
        return "it has an empty path segment"
    if any(seg in (".", "..") for seg in name.split("/")):
        return "it has a '.' or '..' path segment"
    if "\\" in name:
        return "it contains a backslash"
    return None


def validate_ref_name(name: object) -> str:
    """Return ``name`` if it is a valid full ref name (``tags/x``, ``runs/r/latest``, ...), else
    raise :class:`~coral_torch.errors.InvalidRefNameError`."""
    why = _problem(name, component=False)
    if why is not None:
        raise InvalidRefNameError(f"invalid ref name {name!r}: {why}; use letters, digits, '-', '_', '.', '/'")
    return name  # type: ignore[return-value]


def validate_component(name: object, what: str = "ref") -> str:
    """Return ``name`` if it is a valid single-component name (a ``what``: run, tag), else raise
    :class:`~coral_torch.errors.InvalidRefNameError`."""
    why = _problem(name, component=True)
    if why is None and name in RESERVED:
        why = f"{name!r} is reserved (it already means something to refs)"
    if why is not None:
        raise InvalidRefNameError(f"invalid {what} name {name!r}: {why}; use letters, digits, '-', '_', '.'")
    return name  # type: ignore[return-value]
