"""Every ref and run name, checked in one place.

Refs name commits: ``runs/<run>/latest``, ``runs/<run>/best``, ``runs/<run>/keep/<id>`` (what
the run's retention policy keeps; ``runs/<run>/top/<id>`` in older repositories), ``tags/<tag>``,
``files/<pointer path>``, ``keep/<id>`` (kept until deleted by hand) and ``leases/<holder>`` (a
running process's hold on the commit it resumed from). Ref names also become S3 keys and file-like
paths, so a name must not be able to escape its prefix (``..``, a leading ``/``) or break a
line-based listing (control characters). Run and tag names are single path components of letters,
digits, ``-``, ``_`` and ``.``; a few words are reserved because :meth:`Repository.resolve` gives
them a meaning of its own (``latest``, ``best``, ``HEAD``): a tag of that name would be accepted and
then never found.

This module has no dependencies beyond the standard library, so catalog-only tools can use it.
"""

from __future__ import annotations

import re

from ..errors import InvalidRefNameError

#: names that :meth:`Repository.resolve` interprets itself; refused as tag and run names
RESERVED = frozenset({"latest", "best", "HEAD"})
_MAX_LENGTH = 1024
_COMPONENT = re.compile(r"[A-Za-z0-9_.-]+")

RUNS = "runs/"
TAGS = "tags/"
FILES = "files/"
LEASES = "leases/"
KEEP = "keep/"
#: refs of DCP saves made by coral-torch before 0.x kept every sharded commit for a day; gc drops them
LEGACY_SAVES = "saves/"


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
    if why is None and isinstance(name, str) and not _COMPONENT.fullmatch(name):  # why is None: a str
        bad = sorted({ch for ch in name if not _COMPONENT.fullmatch(ch)})
        why = f"it contains {', '.join(repr(ch) for ch in bad)}"
    if why is None and name in RESERVED:
        why = f"{name!r} is reserved (it already means something to refs)"
    if why is not None:
        raise InvalidRefNameError(f"invalid {what} name {name!r}: {why}; use letters, digits, '-', '_', '.'")
    return name  # type: ignore[return-value]


# -- builders: every ref name is made here -------------------------------------------------------
def run_prefix(run: str) -> str:
    return f"{RUNS}{run}/"


def run_ref(name: str) -> str:
    """``runs/<name>``: what :meth:`Repository.resolve` tries for a name such as ``<run>/best``."""
    return RUNS + name


def latest_ref(run: str) -> str:
    return f"runs/{run}/latest"


def best_ref(run: str) -> str:
    return f"runs/{run}/best"


def run_keep_prefix(run: str) -> str:
    """Refs the run's retention policy owns: one per kept commit."""
    return f"runs/{run}/keep/"


def run_keep_ref(run: str, commit_id: str) -> str:
    return f"runs/{run}/keep/{commit_id}"


def legacy_top_prefix(run: str) -> str:
    """``save_top_k`` refs of older versions; retention takes them over."""
    return f"runs/{run}/top/"


def tag_ref(tag: str, *, check: bool = True) -> str:
    """``tags/<tag>``; ``check=False`` for a lookup of a name that may not be a valid tag."""
    return TAGS + (validate_component(tag, "tag") if check else tag)


def keep_ref(commit_id: str) -> str:
    return KEEP + commit_id


def lease_ref(holder: str) -> str:
    return LEASES + holder


def display_name(name: str) -> str:
    """A ref as ``coral-torch log`` shows it: ``tag:v1``, ``<run>/latest``, ``kept``, the pointer path, ..."""
    if name.startswith(KEEP) or "/keep/" in name:
        return "kept"
    if "/top/" in name:
        return "top-k"
    if name.startswith(TAGS):
        return "tag:" + name[len(TAGS) :]
    if name.startswith(RUNS) and (name.endswith("/latest") or name.endswith("/best")):
        return name[len(RUNS) :]
    if name.startswith(LEGACY_SAVES):
        return "dcp-save"
    if name.startswith(LEASES):
        return "resumed-by:" + name[len(LEASES) :].rsplit("/", 1)[0]
    if name.startswith(FILES):
        return name[len(FILES) :]
    return name
