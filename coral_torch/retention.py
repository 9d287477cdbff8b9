"""Retention policies: which commits of a run stay, decided from what the repository holds.

A policy looks only at facts every process can read from the catalog (a commit's time, epoch, step
and metrics), never at what one process remembers, so a long-lived trainer, a resumed one, another
rank and ``coral-torch prune`` all keep the same commits. Policies compose: ``LatestN(2) |
BestN(2, "val_loss")`` is ``AnyOf(LatestN(2), BestN(2, "val_loss"))``.

Every policy here is *stable*: a commit it dropped never becomes one it would keep, and evaluating
it over the commits that survived earlier evaluations keeps exactly what evaluating it over the
whole history would. That is what makes deciding from repository state (where dropped commits are
gone) equal to deciding from a full log. (An "all of" combination would not be stable, which is
why there is none.)

The anchor is Orbax's preservation policies (``LatestN``, ``BestN``, ``EveryNSteps``,
``EveryNSeconds``, ``CustomSteps``, ``AnyPreservationPolicy``); beyond them: ``EveryNEpochs``,
``Epochs``, ``KeepAll``/``KeepNone``, and Lightning-style step windows (``EveryNSteps(1000)`` keeps
the first commit at or after every multiple of 1000, so it works when saves do not land on exact
multiples, e.g. at epoch ends).

Standard library only: the CLI's ``prune`` decides without importing torch.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import CoralError


class RetentionPolicyError(CoralError, ValueError):
    """A retention policy was given bad arguments."""


@dataclass(frozen=True)
class CommitFacts:
    """What a policy may look at: a commit's id and the facts the catalog records for it."""

    id: str
    time: float
    seq: int
    epoch: int | None = None
    step: int | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)


def chronological(commits: Iterable[CommitFacts]) -> list[CommitFacts]:
    """Oldest first: by save time (a rewritten commit keeps its original's), then insertion."""
    return sorted(commits, key=lambda c: (c.time, c.seq))


class Policy(ABC):
    """A retention policy: :meth:`select` returns the ids of the commits to keep."""

    @abstractmethod
    def select(self, commits: Sequence[CommitFacts]) -> set[str]:
        """Ids of those of ``commits`` (any order) this policy keeps."""

    def __or__(self, other: Policy) -> AnyOf:
        return AnyOf(self, other)

    def __repr__(self) -> str:
        args = ", ".join(f"{v!r}" for v in self._args())
        return f"{type(self).__name__}({args})"

    def _args(self) -> tuple[Any, ...]:
        return ()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._args() == self._args()

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._args()))


def _count(n: object, what: str, minimum: int = 0) -> int:
    if type(n) is not int or n < minimum:
        raise RetentionPolicyError(f"{what} must be an int >= {minimum}, not {n!r}")
    return n


class KeepAll(Policy):
    """Keep every commit."""

    def select(self, commits: Sequence[CommitFacts]) -> set[str]:
        return {c.id for c in commits}


class KeepNone(Policy):
    """Keep no commit (refs other than retention's, such as ``latest``, tags or pointer files, still do)."""

    def select(self, commits: Sequence[CommitFacts]) -> set[str]:
        return set()


class LatestN(Policy):
    """The ``n`` newest commits."""

    def __init__(self, n: int):
        self.n = _count(n, "LatestN's n")

    def _args(self) -> tuple[Any, ...]:
        return (self.n,)

    def select(self, commits: Sequence[CommitFacts]) -> set[str]:
        if self.n == 0:
            return set()
        return {c.id for c in chronological(commits)[-self.n :]}


class BestN(Policy):
    """The ``n`` commits with the best value of ``metrics[monitor]`` (``mode="min"``: lowest).
    Commits without a finite value of the metric are not ranked; on ties the older commit wins (as
    Lightning's ``ModelCheckpoint`` keeps the checkpoint it already has)."""

    def __init__(self, n: int, monitor: str, mode: str = "min"):
        self.n = _count(n, "BestN's n")
        if not isinstance(monitor, str) or not monitor:
            raise RetentionPolicyError(f"BestN needs the name of a logged metric, not {monitor!r}")
        if mode not in ("min", "max"):
            raise RetentionPolicyError(f"mode must be 'min' or 'max', not {mode!r}")
        self.monitor, self.mode = monitor, mode

    def _args(self) -> tuple[Any, ...]:
        return (self.n, self.monitor, self.mode)

    def score(self, commit: CommitFacts) -> float | None:
        v = commit.metrics.get(self.monitor)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return None
        return float(v)

    def select(self, commits: Sequence[CommitFacts]) -> set[str]:
        sign = 1.0 if self.mode == "min" else -1.0
        ranked = [(sign * s, c.time, c.seq, c.id) for c in commits if (s := self.score(c)) is not None]
        ranked.sort()
        return {r[3] for r in ranked[: self.n]}


class _FirstPerWindow(Policy):
    """The oldest commit in every window ``[k * n, (k + 1) * n)`` of a counter (step or epoch)."""

    attribute = ""

    def __init__(self, n: int):
        self.n = _count(n, f"{type(self).__name__}'s n", minimum=1)

    def _args(self) -> tuple[Any, ...]:
        return (self.n,)

    def select(self, commits: Sequence[CommitFacts]) -> set[str]:
        first: dict[int, CommitFacts] = {}
        for c in chronological(commits):
            value = getattr(c, self.attribute)
            if value is None:
                continue
            first.setdefault(int(value) // self.n, c)
        return {c.id for c in first.values()}


class EveryNSteps(_FirstPerWindow):
    """One commit per ``n`` training steps: the first saved at or after each multiple of ``n``
    (exactly the multiples when saves land on them)."""

    attribute = "step"


class EveryNEpochs(_FirstPerWindow):
    """One commit per ``n`` epochs: the first saved in each window of ``n`` epochs."""

    attribute = "epoch"


class EveryNSeconds(Policy):
    """One commit per interval, for long runs: the run's first commit, then each commit saved at
    least ``seconds`` after the last one kept."""

    def __init__(self, seconds: float):
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
            raise RetentionPolicyError(f"EveryNSeconds needs a positive number of seconds, not {seconds!r}")
        self.seconds = float(seconds)

    def _args(self) -> tuple[Any, ...]:
        return (self.seconds,)

    def select(self, commits: Sequence[CommitFacts]) -> set[str]:
        kept: set[str] = set()
        last: float | None = None
        for c in chronological(commits):
            if last is None or c.time >= last + self.seconds:
                kept.add(c.id)
                last = c.time
        return kept


class _Listed(Policy):
    attribute = ""

    def __init__(self, values: Iterable[int]):
        vals = list(values)
        for v in vals:
            _count(v, f"every value of {type(self).__name__}")
        self.values = frozenset(vals)

    def _args(self) -> tuple[Any, ...]:
        return (sorted(self.values),)

    def select(self, commits: Sequence[CommitFacts]) -> set[str]:
        return {c.id for c in commits if getattr(c, self.attribute) in self.values}


class Steps(_Listed):
    """The commits saved at these global steps (Orbax's ``CustomSteps``)."""

    attribute = "step"


class Epochs(_Listed):
    """The commits saved at these epochs."""

    attribute = "epoch"


class AnyOf(Policy):
    """Keep what any of the policies keeps."""

    policies: tuple[Policy, ...]

    def __init__(self, *policies: Policy):
        flat: list[Policy] = []
        for p in policies:
            if not isinstance(p, Policy):
                raise RetentionPolicyError(f"AnyOf takes retention policies, not {type(p).__name__}")
            flat.extend(p.policies if isinstance(p, AnyOf) else (p,))
        self.policies = tuple(flat)

    def _args(self) -> tuple[Any, ...]:
        return self.policies

    def select(self, commits: Sequence[CommitFacts]) -> set[str]:
        out: set[str] = set()
        for p in self.policies:
            out |= p.select(commits)
        return out


PolicyLike = Policy | str | None


def top_k_policy(save_top_k: int, monitor: str | None = None, mode: str = "min") -> Policy:
    """The policy of ``ModelCheckpoint``-style ``save_top_k``: ``-1`` all, ``0`` none, ``k`` the
    best ``k`` by ``monitor`` (the newest ``k`` without one)."""
    if type(save_top_k) is not int or save_top_k < -1:
        raise RetentionPolicyError(f"save_top_k must be an int >= -1, not {save_top_k!r}")
    if save_top_k == -1:
        return KeepAll()
    if save_top_k == 0:
        return KeepNone()
    return BestN(save_top_k, monitor, mode) if monitor else LatestN(save_top_k)


def optimizer_policy(keep_optimizer: PolicyLike, monitor: str | None = None, mode: str = "min") -> Policy:
    """Which commits keep per-parameter optimizer state: a policy, or ``"all"``, ``"none"`` or
    ``"last"`` (the newest commit, plus the best by ``monitor`` when there is one)."""
    if isinstance(keep_optimizer, Policy):
        return keep_optimizer
    if keep_optimizer in (None, "all"):
        return KeepAll()
    if keep_optimizer == "none":
        return KeepNone()
    if keep_optimizer == "last":
        return LatestN(1) | BestN(1, monitor, mode) if monitor else LatestN(1)
    raise RetentionPolicyError(
        f"keep_optimizer must be 'all', 'last', 'none' or a retention policy (e.g. LatestN(1)), not {keep_optimizer!r}"
    )


__all__ = [
    "AnyOf",
    "BestN",
    "CommitFacts",
    "Epochs",
    "EveryNEpochs",
    "EveryNSeconds",
    "EveryNSteps",
    "KeepAll",
    "KeepNone",
    "LatestN",
    "Policy",
    "RetentionPolicyError",
    "Steps",
    "chronological",
    "optimizer_policy",
    "top_k_policy",
]
