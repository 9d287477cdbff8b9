"""`coral_torch.save` / `coral_torch.load`: drop-in replacements for `torch.save` / `torch.load`.

``save(obj, "ckpts/epoch3.pt")`` stores ``obj`` in the repository ``ckpts/.coral/`` and writes a
small JSON pointer file at ``ckpts/epoch3.pt`` naming the commit (see :mod:`coral_torch.pointers`).
Saving to the same path again replaces the file's commit, and what only the old commit used is
reclaimed at once, as an overwritten file's space would be. ``load("ckpts/epoch3.pt")`` follows
the pointer; ``load("<hash-prefix|tag|latest|best>", repo=...)`` loads by ref; a plain
``torch.save`` file or stream given to ``load`` is read with ``torch.load``.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .checkpoint.checkpoint_files import commit_with_pointer
from .checkpoint.pointers import (
    MAX_POINTER_BYTES,
    Pointer,
    looks_like_pointer,
    parse_pointer,
    pointer_bytes,
    read_pointer_file,
)
from .defaults import REPOSITORY_DIR
from .errors import (
    CheckpointNotFoundError,
    CoralError,
    NotACheckpointError,
    NotARepositoryError,
    RefNotFoundError,
    UnsafeCheckpointError,
)
from .location import S3Location
from .repository.handles import RepoLike, close_repositories, open_repository
from .repository.options import CommitOptions
from .retention import Policy, optimizer_policy

__all__ = ["close_repositories", "load", "open_repository", "read_pointer", "save"]

_FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".tar", ".pkl", ".safetensors")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def save(
    obj: Any,
    f: str | os.PathLike | io.IOBase | None = None,
    pickle_module: Any = None,
    pickle_protocol: int | None = None,
    _use_new_zipfile_serialization: bool = True,
    _disable_byteorder_record: bool = False,
    *,
    repo: RepoLike = None,
    tag: str | None = None,
    tags: Sequence[str] = (),
    message: str = "",
    run: str = "default",
    metrics: dict[str, Any] | None = None,
    monitor: str | None = None,
    mode: str = "min",
    epoch: int | None = None,
    step: int | None = None,
    keep: Policy | None = None,
    keep_optimizer: Policy | str | None = None,
) -> str:
    """Store ``obj`` (anything ``torch.save`` takes in practice) and return the commit id.

    ``f`` is a path, a writable binary file object or ``None``. With a path, the repository
    defaults to ``<dir of f>/.coral`` and a pointer file is written at ``f`` (atomically); saving
    to the same path again replaces it, and the previous commit is removed at once unless another
    ref (a tag, a run's ``best``, another file) still keeps it. With a file object, the pointer is
    written into it and the commit is kept by a ``keep/<id>`` ref; ``load`` of the same bytes
    returns ``obj``. Without ``f``, the commit is kept by a ``keep/<id>`` ref.

    ``pickle_module``, ``pickle_protocol``, ``_use_new_zipfile_serialization`` and
    ``_disable_byteorder_record`` are accepted so that calls written for ``torch.save`` work
    unchanged; they do not affect what is stored (tensors are stored in coral's own format, other
    values as JSON or as ``torch.save`` blobs with torch's defaults). The repository options
    (``repo``, ``tag``/``tags``, ``message``, ``run``, ``metrics``, ...) are keyword-only.

    ``metrics`` are stored with the commit; with ``monitor`` (a key of ``metrics``) the run's
    ``best`` ref follows its best value (``mode="min"`` or ``"max"``), so ``load("best")`` works.
    ``epoch`` and ``step`` (default: ``obj["epoch"]`` / ``obj["global_step"]`` when present) are
    what step- and epoch-based policies look at.

    ``keep``: a retention policy over the run's commits (:mod:`coral_torch.retention`, e.g.
    ``LatestN(2) | BestN(1, "val_loss")``): after this save, commits of ``run`` it does not select
    are released, and so are their pointer files (deleted, like ``ModelCheckpoint``'s top-k files),
    unless a tag or another ref keeps them. ``keep_optimizer`` (a policy, or ``"last"``) then
    strips the per-parameter optimizer state (``optimizer_states/*/state`` of a Lightning
    checkpoint) from the kept commits it does not select.
    """
    if pickle_protocol is not None and (type(pickle_protocol) is not int or pickle_protocol < 0):
        raise CoralError(f"pickle_protocol must be a non-negative int, not {pickle_protocol!r}")
    tags = list(tags) + ([tag] if tag else [])
    if keep is not None and not isinstance(keep, Policy):
        raise CoralError(f"keep must be a retention policy such as coral_torch.retention.LatestN(3), not {keep!r}")
    opt_policy = optimizer_policy(keep_optimizer, monitor, mode) if keep_optimizer is not None else None
    if opt_policy is not None and keep is None:
        raise CoralError("keep_optimizer needs keep=... (a retention policy for the run): give both")
    is_path = isinstance(f, (str, os.PathLike))
    if not (f is None or is_path or hasattr(f, "write")):
        raise CoralError(f"f must be a path, a writable binary file object or None, not {type(f).__name__}")
    # a pointer file's ref keeps the commit; without one, a keep/<id> ref does
    options = CommitOptions(
        run=run,
        tags=tuple(tags),
        message=message,
        metrics=metrics or {},
        monitor=monitor,
        mode=mode,
        epoch=epoch,
        step=step,
        keep=keep if keep is not None else not is_path,
        keep_optimizer=opt_policy,
        release_files=True,
    )
    # optimizer state that may be stripped later is stored whole, so it can be freed on its own
    no_delta = ("optimizer_states/",) if opt_policy is not None else ()
    if f is None:
        return open_repository(repo).commit(obj, options=options, no_delta_prefixes=no_delta).commit_id
    if isinstance(f, (str, os.PathLike)):  # is_path, spelled out for the type checker
        pointer = Path(os.fsdecode(f))
        if pointer.is_dir():
            raise CoralError(
                f"cannot save to {pointer}: it is a directory; give a file path such as {pointer / 'last.pt'}"
            )
        r = open_repository(repo if repo is not None else pointer.parent / REPOSITORY_DIR)
        stats = commit_with_pointer(
            pointer,
            r.path,
            options,
            lambda o: r.commit(obj, options=o, no_delta_prefixes=no_delta),
            location=r.location,
        )
        return stats.commit_id
    r = open_repository(repo)
    cid = r.commit(obj, options=options, no_delta_prefixes=no_delta).commit_id
    f.write(pointer_bytes(cid, str(r.location)))
    return cid


def read_pointer(path: str | os.PathLike) -> tuple[str, Path | S3Location] | None:
    """``(commit id, repository directory or S3 location)`` if ``path`` is a coral-torch pointer file, ``None`` if it is
    another kind of file. A damaged pointer raises :class:`~coral_torch.errors.MalformedPointerError`."""
    p = read_pointer_file(path)
    return (p.commit, p.repo) if p is not None else None


def load(
    f: str | os.PathLike | io.IOBase,
    map_location: Any = None,
    pickle_module: Any = None,
    *,
    weights_only: bool | None = None,
    mmap: bool | None = None,
    repo: RepoLike = None,
    **pickle_load_args: Any,
) -> Any:
    """Load what :func:`save` (or ``torch.save``) stored. Takes what ``torch.load`` takes.

    ``f`` is a path or ``PathLike`` of a pointer file or a plain ``torch.save`` file; a readable
    binary file object (``io.BytesIO``, ``open(p, "rb")``) holding either; or a ref: a
    ``coral://`` URL, hash prefix (4+ characters), tag, run name, ``latest`` or ``best``, looked up
    in ``repo`` (default ``$CORAL_REPO`` or ``./.coral``). A path that exists is always read as a
    file.

    ``map_location`` and ``weights_only`` behave like ``torch.load``'s (``None`` means torch's
    default: ``True`` unless ``pickle_module`` is given); with ``weights_only=True`` nothing stored
    can execute code on load.
    ``pickle_module``, ``mmap`` and ``pickle_load_args`` are passed to ``torch.load`` for plain
    torch files. They do not apply to coral commits: tensors are rebuilt in memory, and the few
    values stored as ``torch.save`` blobs are read with torch's own unpickler under the same
    ``weights_only``.
    """
    # torch's default: weights_only unless a pickle_module is given
    wo = (pickle_module is None) if weights_only is None else bool(weights_only)
    torch_args: dict[str, Any] = dict(pickle_load_args)
    if pickle_module is not None:
        torch_args["pickle_module"] = pickle_module
    if isinstance(f, (str, os.PathLike)):
        text = os.fsdecode(f)
        if text.startswith("coral://"):
            return _load_ref(text, repo, map_location, wo)
        p = Path(text)
        if p.is_file():
            return _load_path(p, repo, map_location, wo, mmap, torch_args)
        if p.is_dir():
            hint = f"; it holds a repository: pass a ref and repo={text!r}" if (p / "catalog.sqlite").exists() else ""
            raise NotACheckpointError(f"{p} is a directory, not a checkpoint file{hint}")
        if not isinstance(f, str) or p.suffix.lower() in _FILE_SUFFIXES:
            raise CheckpointNotFoundError(f"no such checkpoint file: {p}")
        return _load_ref(text, repo, map_location, wo)
    if hasattr(f, "read"):
        return _load_stream(f, repo, map_location, wo, torch_args)
    raise CoralError(f"load takes a path, a binary file object or a ref string, not {type(f).__name__}")


def _load_ref(ref: str, repo: RepoLike, map_location: Any, weights_only: bool) -> Any:
    try:
        r = open_repository(repo, create=False)
    except NotARepositoryError as exc:
        if ref.startswith("coral://"):
            raise
        raise CheckpointNotFoundError(
            f"{ref!r} is neither a file nor a ref: there is no file of that name, and {exc}"
        ) from None
    try:
        return r.load(ref, map_location=map_location, weights_only=weights_only)
    except RefNotFoundError as exc:
        if ref.startswith("coral://"):
            raise
        raise CheckpointNotFoundError(f"{ref!r} is neither a file nor a ref: no such file, and {exc}") from None


def _load_pointer(pointer: Pointer, origin: str, repo: RepoLike, map_location: Any, weights_only: bool) -> Any:
    try:
        r = open_repository(repo if repo is not None else pointer.repo, create=False)
    except NotARepositoryError:
        if repo is not None:
            raise
        raise NotARepositoryError(
            f"{origin} points to the repository {pointer.repo}, which does not exist (moved or deleted?); "
            "pass repo=... to say where it is now"
        ) from None
    return r.load(pointer.commit, map_location=map_location, weights_only=weights_only)


def _load_path(
    p: Path, repo: RepoLike, map_location: Any, weights_only: bool, mmap: bool | None, torch_args: dict[str, Any]
) -> Any:
    with open(p, "rb") as fh:
        head = fh.read(MAX_POINTER_BYTES + 1)
    if not head:
        raise NotACheckpointError(f"{p} is empty (0 bytes): not a checkpoint; was its save interrupted?")
    if looks_like_pointer(head[:64]):
        pointer = parse_pointer(head, origin=str(p), base_dir=p.absolute().parent)
        return _load_pointer(pointer, str(p), repo, map_location, weights_only)
    if mmap:
        torch_args = dict(torch_args, mmap=True)
    return _torch_load(str(p), str(p), map_location, weights_only, torch_args)


def _load_stream(fh: Any, repo: RepoLike, map_location: Any, weights_only: bool, torch_args: dict[str, Any]) -> Any:
    origin = getattr(fh, "name", None) or type(fh).__name__
    origin = str(origin)
    seekable = bool(getattr(fh, "seekable", lambda: False)())
    if seekable:
        start = fh.tell()
        head = fh.read(64)
        fh.seek(start)
        stream = fh
    else:
        data = fh.read()
        head = data[:64]
        stream = io.BytesIO(data)
    if not isinstance(head, (bytes, bytearray)):
        raise NotACheckpointError(f"{origin} is opened in text mode: open it with 'rb'")
    if not head:
        raise NotACheckpointError(f"{origin} is empty: not a checkpoint")
    if looks_like_pointer(head):
        data = stream.read(MAX_POINTER_BYTES + 1)
        # a file opened from a path: its relative 'repo' is relative to that file's directory
        name = getattr(fh, "name", None)
        base_dir = (
            Path(os.fsdecode(name)).absolute().parent
            if isinstance(name, (str, bytes, os.PathLike)) and os.path.isfile(os.fsdecode(name))
            else None
        )
        pointer = parse_pointer(data, origin=origin, base_dir=base_dir)
        return _load_pointer(pointer, origin, repo, map_location, weights_only)
    return _torch_load(stream, origin, map_location, weights_only, torch_args)


def _torch_load(f: Any, origin: str, map_location: Any, weights_only: bool, torch_args: dict[str, Any]) -> Any:
    import pickle

    import torch

    try:
        return torch.load(f, map_location=map_location, weights_only=weights_only, **torch_args)
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        IndexError,
        ValueError,
        KeyError,
        AttributeError,
        UnicodeDecodeError,
        OverflowError,
    ) as exc:
        text = _ANSI.sub("", str(exc))
        # torch's weights-only unpickler says "Weights only load failed" for any refusal: a class
        # it will not import ("Unsupported global") is a real pickle; other refusals are garbage
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if weights_only and found:
            raise UnsafeCheckpointError(
                f"{origin} holds pickled objects ({found.group(1)}) that would run code on load; pass "
                "weights_only=False only if you trust the file"
            ) from exc
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        detail = next((x for x in lines if x.startswith("Unsupported")), lines[0] if lines else type(exc).__name__)
        raise NotACheckpointError(
            f"{origin} is neither a coral-torch pointer nor a torch.save file torch.load can read "
            f"({type(exc).__name__}: {detail[:160]})"
        ) from exc
