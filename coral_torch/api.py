"""`coral_torch.save` / `coral_torch.load`: drop-in replacements for `torch.save` / `torch.load`.

``save(obj, "ckpts/epoch3.pt")`` stores ``obj`` in the repository ``ckpts/.coral/`` and writes a
small JSON pointer file at ``ckpts/epoch3.pt`` naming the commit (like a Git LFS pointer).
``load("ckpts/epoch3.pt")`` follows the pointer; ``load("<hash-prefix|tag|latest|best>", repo=...)``
loads by ref; a plain ``torch.save`` file given to ``load`` is read with ``torch.load``.
"""

from __future__ import annotations

import io
import json
import os
import threading
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .delta import DeltaConfig, DeltaEncoder
from .errors import CoralError, NotARepositoryError
from .repository import Repository

POINTER_KEY = "coral_torch_pointer"
POINTER_VERSION = 1
_MAX_POINTER_BYTES = 4096

RepoLike = Union[str, os.PathLike, Repository, None]

_open: dict[Path, Repository] = {}
_open_lock = threading.Lock()


def open_repository(repo: RepoLike = None, *, create: bool = True, delta_config: Optional[DeltaConfig] = None) -> Repository:
    """The process-wide :class:`Repository` for a path (kept open so consecutive saves delta
    against each other; reopened if the directory was deleted or replaced). ``None`` means ``$CORAL_REPO`` or ``./.coral``. A ``delta_config`` given
    here applies to the shared instance from now on."""
    if isinstance(repo, Repository):
        return repo
    path = Path(repo if repo is not None else os.environ.get("CORAL_REPO", ".coral")).absolute()
    with _open_lock:
        r = _open.get(path)
        if r is not None and r.stale:  # the directory was removed or replaced meanwhile
            r.close()
            r = None
        if r is None:
            r = Repository(path, create=create, delta_config=delta_config)
            _open[path] = r
        elif delta_config is not None:
            r.delta_config = delta_config
            r.encoder = DeltaEncoder(delta_config)
        return r


def _pointer_ref_name(pointer: Path, repo: Repository) -> str:
    """``files/<path relative to the repository's parent>``, or ``files/abs/<absolute path>`` for a
    pointer outside that directory (a ref name never has a ``..`` segment)."""
    target = os.path.abspath(pointer)
    try:
        rel = os.path.relpath(target, repo.path.parent)
    except ValueError:
        rel = os.pardir
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return "files/abs" + target.replace(os.sep, "/")
    return "files/" + rel.replace(os.sep, "/")


def save(
    obj: Any,
    f: Union[str, os.PathLike, io.IOBase, None] = None,
    *,
    repo: RepoLike = None,
    tag: Optional[str] = None,
    tags: Sequence[str] = (),
    message: str = "",
    run: str = "default",
    metrics: Optional[dict[str, Any]] = None,
) -> str:
    """Store ``obj`` (anything ``torch.save`` takes in practice) and return the commit id.

    With a path ``f``, the repository defaults to ``<dir of f>/.coral`` and a pointer file is
    written at ``f`` (atomically). Without ``f``, the commit is kept by a ``keep/<id>`` ref.
    """
    tags = list(tags) + ([tag] if tag else [])
    if f is None:
        r = open_repository(repo)
        return r.commit(obj, run=run, tags=tags, message=message, metrics=metrics, keep=True).commit_id
    if isinstance(f, (str, os.PathLike)):
        pointer = Path(f)
        r = open_repository(repo if repo is not None else pointer.parent / ".coral")
        stats = r.commit(
            obj, run=run, tags=tags, message=message, metrics=metrics, keep=False,
            refs=[_pointer_ref_name(pointer, r)],
        )
        write_pointer(pointer, stats.commit_id, r.path)
        return stats.commit_id
    if hasattr(f, "write"):
        r = open_repository(repo)
        cid = r.commit(obj, run=run, tags=tags, message=message, metrics=metrics, keep=True).commit_id
        f.write(_pointer_bytes(cid, str(r.path)))
        return cid
    raise CoralError(f"f must be a path, a writable file object or None, not {type(f).__name__}")


def _pointer_bytes(commit_id: str, repo_path: str) -> bytes:
    return (json.dumps({POINTER_KEY: POINTER_VERSION, "commit": commit_id, "repo": repo_path}, indent=1) + "\n").encode()


def write_pointer(path: Path, commit_id: str, repo_path: Path) -> None:
    """Write the pointer file atomically (temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(repo_path, path.absolute().parent)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(_pointer_bytes(commit_id, rel))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_pointer(path: Union[str, os.PathLike]) -> Optional[tuple[str, Path]]:
    """``(commit id, repository path)`` if ``path`` is a coral-torch pointer file, else ``None``."""
    p = Path(path)
    try:
        if p.stat().st_size > _MAX_POINTER_BYTES:
            return None
        data = json.loads(p.read_bytes())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get(POINTER_KEY) != POINTER_VERSION:
        return None
    repo = Path(data["repo"])
    if not repo.is_absolute():
        repo = p.absolute().parent / repo
    return str(data["commit"]), repo


def load(
    ref: Union[str, os.PathLike],
    *,
    repo: RepoLike = None,
    map_location: Any = None,
    weights_only: bool = True,
) -> Any:
    """Load a checkpoint by pointer file, ``coral://`` ref, hash prefix, tag, ``latest`` or ``best``.

    ``map_location`` and ``weights_only`` behave like ``torch.load``'s; with the default
    ``weights_only=True`` nothing stored can execute code on load.
    """
    if isinstance(ref, (str, os.PathLike)) and not str(ref).startswith("coral://") and Path(ref).is_file():
        pointer = read_pointer(ref)
        if pointer is not None:
            cid, repo_path = pointer
            r = open_repository(repo if repo is not None else repo_path, create=False)
            return r.load(cid, map_location=map_location, weights_only=weights_only)
        import torch

        return torch.load(ref, map_location=map_location, weights_only=weights_only)
    if not isinstance(ref, str):
        raise NotARepositoryError(f"{ref} is not a file, and only strings name refs")
    r = open_repository(repo, create=False)
    return r.load(ref, map_location=map_location, weights_only=weights_only)
