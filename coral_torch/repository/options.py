"""`CommitOptions`: what a commit records and which refs it moves, given once and checked once.

``Repository.commit``, ``Repository.publish``, ``CoralStorageWriter``, ``coral_torch.dcp.save``,
``CoralModelParallelStrategy.commit_sharded``, ``coral_torch.save`` and ``CoralCheckpoint`` all take
(or build) one of these instead of repeating the keyword arguments.

No torch, Lightning or boto3 at import: catalog-only tools may build options.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from typing import Any

from ..errors import RepositoryError
from ..format import refnames
from ..retention import Policy

#: the modes a monitored metric is ranked by
MODES = ("min", "max")


@dataclass(frozen=True)
class CommitOptions:
    """How to record one commit. Every field is checked when the options are made.

    Args:
        run: the run the commit continues (its parent defaults to ``runs/<run>/latest``).
        parent: a ref naming the parent commit (default: the run's latest).
        message, metrics, epoch, step, info: stored with the commit (``metrics`` as JSON values:
            scalar tensors and numpy numbers become numbers, non-finite values ``None``).
        tags: tags to point at the commit (``tags/<tag>``); ``refs``: more full ref names.
        keep: ``True`` adds ``keep/<id>`` so gc never removes the commit; ``False`` nothing; a
            retention policy (:mod:`coral_torch.retention`) keeps what it selects among the run's
            commits, this one included.
        keep_optimizer: with a policy ``keep``, which kept commits keep per-parameter optimizer state.
        release_files: retention also deletes the pointer files of the commits it releases.
        monitor, mode: ``runs/<run>/best`` follows the best (``"min"``/``"max"``) ``metrics[monitor]``.
        head: move ``runs/<run>/latest`` to the commit.
    """

    run: str = "default"
    parent: str | None = None
    message: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    epoch: int | None = None
    step: int | None = None
    tags: tuple[str, ...] = ()
    refs: tuple[str, ...] = ()
    keep: bool | Policy = True
    keep_optimizer: Policy | None = None
    release_files: bool = False
    monitor: str | None = None
    mode: str = "min"
    info: dict[str, Any] = field(default_factory=dict)
    head: bool = True

    def __post_init__(self) -> None:
        refnames.validate_component(self.run, "run")
        if self.mode not in MODES:
            raise RepositoryError(f"mode must be 'min' or 'max', not {self.mode!r}")
        check_keep(self.keep, self.keep_optimizer)
        object.__setattr__(self, "tags", tuple(self.tags or ()))
        object.__setattr__(self, "refs", tuple(self.refs or ()))
        for t in self.tags:
            refnames.validate_component(t, "tag")
        for r in self.refs:
            refnames.validate_ref_name(r)
        object.__setattr__(self, "metrics", {k: jsonable_metric(v) for k, v in (self.metrics or {}).items()})
        object.__setattr__(self, "info", dict(self.info or {}))

    @classmethod
    def build(cls, options: CommitOptions | None = None, /, **changes: Any) -> CommitOptions:
        """``options`` with ``changes`` applied (checked again), or new options from ``changes``."""
        if options is None:
            return cls(**changes)
        if not isinstance(options, CommitOptions):
            raise RepositoryError(f"options must be CommitOptions, not {type(options).__name__}")
        return dataclasses.replace(options, **changes) if changes else options

    def replace(self, **changes: Any) -> CommitOptions:
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)

    def with_refs(self, *refs: str) -> CommitOptions:
        """A copy that also points ``refs`` (full ref names) at the commit."""
        return dataclasses.replace(self, refs=self.refs + tuple(refs))

    def ref_names(self) -> list[str]:
        """The refs the commit moves: the run's latest (``head``), the tags, then ``refs``."""
        names = [refnames.latest_ref(self.run)] if self.head else []
        return names + [refnames.tag_ref(t) for t in self.tags] + list(self.refs)

    def best(self) -> tuple[str, str, Any, str] | None:
        """``(ref, metric, value, mode)`` for the run's best ref, when a monitored value is present."""
        if self.monitor is None or self.metrics.get(self.monitor) is None:
            return None
        return refnames.best_ref(self.run), self.monitor, self.metrics[self.monitor], self.mode


#: the field names, for entry points that take them as keyword arguments
FIELDS = frozenset(f.name for f in dataclasses.fields(CommitOptions))


def check_keep(keep: Any, keep_optimizer: Any) -> None:
    """Raise :class:`RepositoryError` unless ``keep`` / ``keep_optimizer`` are of the kinds a commit takes."""
    if not isinstance(keep, (bool, Policy)):
        raise RepositoryError(f"keep must be True, False or a retention policy (e.g. LatestN(3)), not {keep!r}")
    if keep_optimizer is not None and not isinstance(keep_optimizer, Policy):
        raise RepositoryError(f"keep_optimizer must be a retention policy, not {keep_optimizer!r}")
    if keep_optimizer is not None and not isinstance(keep, Policy):
        raise RepositoryError("keep_optimizer applies with keep=<retention policy>: give both")


def jsonable_metric(v: Any) -> Any:
    """A metric value as JSON stores it: tensors and numpy numbers as Python numbers (or lists),
    non-finite floats as ``None``."""
    torch = sys.modules.get("torch")  # a tensor means torch is loaded; never import it here
    if torch is not None and isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        v = v.item() if v.numel() == 1 else v.tolist()
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(v, numpy.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


__all__ = ["CommitOptions", "FIELDS", "MODES", "check_keep", "jsonable_metric"]
