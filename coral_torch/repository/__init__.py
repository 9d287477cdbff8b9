"""Checkpoint repository: commits over immutable packs and an atomic catalog."""

from .catalog import CommitRow, ObjectRow
from .repository import CommitStats, Repository, VerifyReport

__all__ = ["Repository", "CommitStats", "VerifyReport", "CommitRow", "ObjectRow"]
