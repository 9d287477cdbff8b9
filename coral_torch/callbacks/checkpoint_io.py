"""`CoralCheckpointIO`: Lightning's `CheckpointIO` backed by a coral-torch repository.

``Trainer(plugins=[CoralCheckpointIO(repo)])`` makes ``ModelCheckpoint`` and
``trainer.save_checkpoint`` commit into the repository; the path Lightning asked for receives a
small pointer file, so everything ``ModelCheckpoint`` does with files (last, top-k deletion,
version counters) keeps working. ``trainer.fit(ckpt_path="coral://<hash-prefix|tag|run|best|latest>")``
resumes from the repository on every rank; plain files still load through ``torch.load``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import CheckpointIO

from .. import api
from ..checkpoint.checkpoint_files import commit_with_pointer, forget_pointer
from ..checkpoint.pointers import read_pointer_file
from ..defaults import REPOSITORY_DIR
from ..errors import CoralError
from ..repository import Repository
from ..repository.handles import open_repository
from ..repository.options import CommitOptions

log = logging.getLogger(__name__)

CORAL_SCHEME = "coral://"
_RUN_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def run_name_from_path(path: str | os.PathLike) -> str:
    """A run name from a checkpoint path: the ``version_N`` directory if there is one, else the
    checkpoint directory's name."""
    parts = Path(path).absolute().parts
    for part in reversed(parts[:-1]):
        if part.startswith("version_"):
            return _RUN_SAFE.sub("_", part)
    parent = Path(path).absolute().parent.name or "default"
    return _RUN_SAFE.sub("_", parent) or "default"


class CoralCheckpointIO(CheckpointIO):
    """Checkpoint I/O through a coral-torch repository.

    Args:
        repo: repository path or :class:`Repository`. ``None``: ``<checkpoint dir>/.coral`` for
            saves, ``$CORAL_REPO`` or ``./.coral`` for ``coral://`` loads.
        run: run name for commits; default derived from the checkpoint path (``version_N``).
    """

    def __init__(self, repo: str | os.PathLike | Repository | None = None, run: str | None = None):
        super().__init__()
        self._repo_arg = repo
        self.run = run

    # -- repository ------------------------------------------------------------------------
    def repository(self, near: str | os.PathLike | None = None, *, create: bool = True) -> Repository:
        if self._repo_arg is not None:
            return open_repository(self._repo_arg, create=create)
        if near is not None:
            return open_repository(Path(near).parent / REPOSITORY_DIR, create=create)
        return open_repository(None, create=create)

    # -- CheckpointIO ----------------------------------------------------------------------
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                "CoralCheckpointIO.save_checkpoint takes no storage_options; configure the repository instead"
            )
        path = Path(path)
        repo = self.repository(path)
        options = CommitOptions(run=self.run or run_name_from_path(path), keep=False, message=f"checkpoint {path.name}")
        stats = commit_with_pointer(
            path, repo.path, options, lambda o: repo.commit(checkpoint, options=o), location=repo.location
        )
        log.info(
            "saved %s as coral commit %s (%.1f MB written of %.1f MB)",
            path,
            stats.commit_id[:10],
            stats.written_bytes / 1e6,
            stats.logical_bytes / 1e6,
        )

    def load_checkpoint(
        self,
        path: str | os.PathLike,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        wo = True if weights_only is None else bool(weights_only)
        text = str(path)
        if text.startswith(CORAL_SCHEME):
            repo = self.repository(create=False)
            return repo.load(text, map_location=map_location, weights_only=wo)
        if not Path(text).exists():
            raise FileNotFoundError(
                f"checkpoint {text} not found; to resume from the repository use ckpt_path='coral://<ref>'"
            )
        return api.load(text, map_location=map_location, weights_only=wo, repo=self._repo_arg)

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        """Remove the pointer file and its ref; the commit becomes garbage-collectable."""
        path = Path(path)
        try:
            pointer = read_pointer_file(path) if path.is_file() else None
        except CoralError as exc:  # a damaged pointer: remove the file all the same
            log.warning("%s", exc)
            pointer = None
        if pointer is not None:
            try:
                forget_pointer(
                    path, open_repository(self._repo_arg if self._repo_arg is not None else pointer.repo, create=False)
                )
            except CoralError as exc:
                log.warning("could not drop the ref of %s: %s", path, exc)
        path.unlink(missing_ok=True)

    def teardown(self) -> None:
        pass
