"""Pointer files: the small JSON file ``coral_torch.save(obj, "ckpts/epoch3.pt")`` leaves at the path.

A pointer names one commit and the repository holding it (like a Git LFS pointer)::

    {"commit": "<32 hex digits>", "coral_torch_pointer": 1, "repo": "../.coral"}

``repo`` is relative to the pointer's directory when written to a path (so moving the directory
together with its repository keeps it valid), absolute when written to a file object, and the URL
(``s3://bucket/prefix``) for a repository on S3. Every field
is checked when read: a damaged, truncated or edited pointer raises
:class:`~coral_torch.errors.MalformedPointerError` and never names a wrong commit.

Standard library only, so catalog-only tools can read pointers without importing torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import MalformedPointerError, UnsupportedLocationError
from ..format.refnames import FILES
from ..location import S3_SCHEME, S3Location, parse_location

POINTER_KEY = "coral_torch_pointer"
POINTER_VERSION = 1
MAX_POINTER_BYTES = 4096
_HEX = frozenset("0123456789abcdef")
_COMMIT_ID_LENGTH = 32


@dataclass(frozen=True)
class Pointer:
    """A parsed pointer: the commit id and the repository: its directory (absolute, not checked to
    exist) or its S3 location."""

    commit: str
    repo: Path | S3Location


def pointer_bytes(commit_id: str, repo_path: str | os.PathLike) -> bytes:
    """The pointer file's content for ``commit_id`` in the repository at ``repo_path``."""
    doc = {POINTER_KEY: POINTER_VERSION, "commit": commit_id, "repo": os.fspath(repo_path)}
    return (json.dumps(doc, indent=1) + "\n").encode()


def looks_like_pointer(head: bytes | bytearray) -> bool:
    """True if a file starting with ``head`` should be read as a pointer (a JSON object). A
    ``torch.save`` file starts with a zip or pickle header, never with ``{``."""
    return head.lstrip(b" \t\r\n\xef\xbb\xbf")[:1] == b"{"


def parse_pointer(data: bytes, *, origin: str, base_dir: Path | None = None) -> Pointer:
    """Parse and check a pointer. ``origin`` names the file in error messages; ``base_dir`` is the
    directory a relative ``repo`` is relative to (``None``: the current directory)."""
    if len(data) > MAX_POINTER_BYTES:
        raise MalformedPointerError(
            f"{origin} starts like a coral-torch pointer but is {len(data)} bytes (a pointer is under "
            f"{MAX_POINTER_BYTES}): it is not a pointer file, and not a torch.save file either"
        )
    try:
        doc = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError):
        raise MalformedPointerError(
            f"{origin} is a damaged coral-torch pointer (not valid JSON; truncated?): save the "
            "checkpoint again, or load the commit by hash with coral_torch.load('<hash>', repo=...)"
        ) from None
    if not isinstance(doc, dict) or POINTER_KEY not in doc:
        raise MalformedPointerError(f"{origin} is a JSON file, not a coral-torch pointer or a torch.save file")
    version = doc[POINTER_KEY]
    if type(version) is not int or version < 1:
        raise MalformedPointerError(f"{origin} is a damaged coral-torch pointer (version {version!r})")
    if version > POINTER_VERSION:
        raise MalformedPointerError(
            f"{origin} was written by a newer coral-torch (pointer version {version}, this one reads "
            f"{POINTER_VERSION}): upgrade coral-torch to load it"
        )
    commit, repo = doc.get("commit"), doc.get("repo")
    if not (isinstance(commit, str) and len(commit) == _COMMIT_ID_LENGTH and set(commit) <= _HEX):
        raise MalformedPointerError(
            f"{origin} is a damaged coral-torch pointer: 'commit' must be a {_COMMIT_ID_LENGTH}-digit "
            f"hex commit id, not {commit!r}"
        )
    if not isinstance(repo, str) or not repo or "\0" in repo:
        raise MalformedPointerError(
            f"{origin} is a damaged coral-torch pointer: 'repo' must name the repository directory, "
            f"not {repo!r}; pass repo=... to say where the repository is"
        )
    if repo.startswith(S3_SCHEME):
        try:
            where = parse_location(repo)
        except UnsupportedLocationError as exc:
            raise MalformedPointerError(f"{origin} is a damaged coral-torch pointer: {exc}") from None
        return Pointer(commit, where)
    path = Path(repo)
    if not path.is_absolute():
        path = (base_dir if base_dir is not None else Path.cwd()) / path
    return Pointer(commit, Path(os.path.abspath(path)))


def read_pointer_file(path: str | os.PathLike) -> Pointer | None:
    """The pointer at ``path``, or ``None`` if the file is not pointer-shaped (e.g. a torch.save
    file). Raises :class:`~coral_torch.errors.MalformedPointerError` for a damaged pointer and
    ``OSError`` if the file cannot be read."""
    p = Path(path)
    with open(p, "rb") as fh:
        data = fh.read(MAX_POINTER_BYTES + 1)
    if not looks_like_pointer(data[:64]):
        return None
    return parse_pointer(data, origin=str(p), base_dir=p.absolute().parent)


def write_pointer(path: str | os.PathLike, commit_id: str, repo: str | os.PathLike | S3Location) -> None:
    """Write a pointer file atomically (temp file, fsync, rename, fsync of the directory), with
    ``repo`` relative to the pointer's directory (an S3 repository: its URL)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(repo, S3Location):
        rel = repo.url
    else:
        rel = os.path.relpath(os.path.abspath(repo), path.absolute().parent)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(pointer_bytes(commit_id, rel))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.absolute().parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def pointer_ref_name(pointer: str | os.PathLike, repo_path: str | os.PathLike) -> str:
    """The ref that keeps a pointer file's commit alive: ``files/<path relative to the repository's
    parent directory>``, or ``files/abs/<absolute path>`` for a pointer outside that directory (a
    ref name never has a ``..`` segment)."""
    target = os.path.abspath(pointer)
    try:
        rel = os.path.relpath(target, os.path.dirname(os.path.abspath(repo_path)))
    except ValueError:
        rel = os.pardir
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return FILES + "abs" + target.replace(os.sep, "/")
    return FILES + rel.replace(os.sep, "/")


def pointer_path_of_ref(ref: str, repo_path: str | os.PathLike) -> Path | None:
    """The pointer file a ``files/...`` ref stands for (the inverse of :func:`pointer_ref_name`), or
    ``None`` for another kind of ref."""
    if not ref.startswith(FILES):
        return None
    rest = ref[len(FILES) :]
    if rest.startswith("abs/"):
        return Path("/" + rest[len("abs/") :])
    return Path(os.path.dirname(os.path.abspath(repo_path))) / rest


def pointer_names(path: str | os.PathLike, commit_id: str, repo: str | os.PathLike | S3Location) -> bool:
    """True if ``path`` is a readable pointer file naming ``commit_id`` in the repository ``repo``
    (a directory or an S3 location): the file a ``files/`` ref stands for still holds that commit.
    A damaged, missing or replaced file (another commit, another repository, not a pointer) does not."""
    try:
        p = read_pointer_file(path)
    except (OSError, MalformedPointerError):
        return False
    if p is None or p.commit != commit_id:
        return False
    return same_repository(p.repo, repo)


def same_repository(a: str | os.PathLike | S3Location, b: str | os.PathLike | S3Location) -> bool:
    """Whether two repository locations are the same repository (directories: the same file)."""
    if isinstance(a, S3Location) or isinstance(b, S3Location):
        return a == b
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
