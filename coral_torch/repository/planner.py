"""`DeltaPlanner`: what a commit stores for each tensor, decided from the repository alone.

For every tensor the plan is one of: a duplicate (the catalog holds its content hash: nothing is
written), a delta against a base (the tensor of the same name, dtype and shape in the parent
commit, when its chain is short enough and its delta paid lately), or a full object. The decision
between duplicate / delta candidate / unique is the chapter's :class:`~coral_torch.dedup.Deduplicator`;
the planner adds what only a repository knows: chain depths, and the per-tensor countdown that skips
delta attempts for a few commits after one lost (stored in ``commit_objects.how`` as ``full/skipN``).
Nothing here depends on what a process holds in memory, so a fresh process continuing a run plans
the same deltas as a long-lived one.

The probe (:meth:`DeltaPlanner.delta_may_pay`) runs at encode time, when the base has been read back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from ..dedup import Deduplicator
from ..errors import CatalogDamagedError
from ..format import codec, dtypes
from ..format.delta import DeltaConfig
from ..format.weight_tensor import WeightTensor
from .catalog import Catalog, ObjectRow

if TYPE_CHECKING:
    from .streams import BaseStream

log = logging.getLogger(__name__)

DELTA_RETRY_AFTER = 3  #: after a delta loses to the full encoding, commits before trying again
PROBE_MIN_BYTES = 4 << 20  #: tensors from this size get a sampled delta-vs-full probe first
PROBE_SLICE = 64 << 10  #: bytes per probe slice (three slices: start, middle, end)


class NamedTensor(NamedTuple):
    """A tensor to store and the name it has in its checkpoint (delta bases are found by name)."""

    name: str
    weight: WeightTensor


@dataclass
class PlannedObject:
    """A new object to write: the tensor, the delta base to try (None: store it whole) and the
    countdown of commits before a delta is tried again."""

    tensor: NamedTensor
    base: ObjectRow | None
    skip_left: int
    replaces: bool = False  #: the catalog has this hash, but its stored object is damaged or gone


class DeltaPlanner:
    """Plans a commit's new objects against the catalog and the parent commit.

    ``tensor_index(commit_id)`` gives ``name -> (hash, dtype, shape)`` of a commit's tensors (the
    repository's verified manifest)."""

    def __init__(
        self,
        catalog: Catalog,
        config: DeltaConfig,
        tensor_index: Callable[[str], dict[str, tuple[str, str, tuple]]],
        intact: Callable[[set[str]], set[str]] = lambda hashes: hashes,
    ):
        self.catalog = catalog
        self.config = config
        self.tensor_index = tensor_index
        self.intact = intact  #: which of the catalog's objects a commit may rely on (see Repository.intact_objects)
        self.dedup = Deduplicator(
            similarity_threshold=None, delta_config=config, enable_delta_encoding=config.max_chain_length > 0
        )

    def plan(
        self, tensors: Sequence[tuple[str, WeightTensor]], parent: str | None, no_delta_prefixes: Sequence[str] = ()
    ) -> dict[str, PlannedObject]:
        """hash -> :class:`PlannedObject` for every tensor the repository lacks (each hash once)."""
        parent_index: dict[str, tuple[str, str, tuple]] = {}
        parent_hows: dict[str, str] = {}
        if parent is not None:
            try:
                parent_index = self.tensor_index(parent)
                parent_hows = {n: how for n, _, how in self.catalog.commit_objects(parent)}
            except CatalogDamagedError as exc:  # save all the same, just without deltas against it
                log.warning("not delta-encoding against parent %s: %s", parent[:10], exc)
        listed = self.catalog.known_hashes(w.compute_hash() for _, w in tensors)
        # a save never relies on damage: an object whose pack is gone, resized or whose bytes no
        # longer hash right is stored again (which repairs every commit that shares it)
        known = self.intact(listed)
        damaged = listed - known
        todo: dict[str, PlannedObject] = {}
        prefixes = tuple(no_delta_prefixes)
        for name, w in tensors:
            h = w.compute_hash()
            if h in todo:
                continue
            decision, base_hash = self.dedup.decide(
                name, w, parent_index if not (prefixes and name.startswith(prefixes)) else {}, known=h in known
            )
            if decision == "duplicate":
                continue
            # how the parent stored it: "full/skipN" says its delta lost N commits ago
            skip = skip_left(parent_hows.get(name))
            base = None
            if base_hash is not None and skip == 0 and base_hash != h and base_hash not in damaged:
                row = self.catalog.get_object(base_hash)
                # a lossy object is never a base: its bytes are not what its hash says
                if row is not None and row.lossless and row.depth + 1 <= self.config.max_chain_length:
                    base = row
            todo[h] = PlannedObject(NamedTensor(name, w), base, max(0, skip - 1), replaces=h in damaged)
        return todo

    def delta_may_pay(self, w: WeightTensor, base_raw: np.ndarray | BaseStream) -> bool:
        """Encode three small slices both ways before paying for a whole delta and, when it
        loses, a second whole encode. AdamW's moments change completely every step: their XOR is
        no smaller than their own encoding. Small tensors are just tried."""
        if w.nbytes < PROBE_MIN_BYTES:
            return True
        isz = dtypes.itemsize(w.dtype)
        n = PROBE_SLICE // isz * isz
        raw = w.raw
        own = xor = 0
        level = self.config.codec_level
        for start in (0, (w.nbytes // 2) // isz * isz, (w.nbytes - n) // isz * isz):
            own += codec.encode(raw[start : start + n], isz, level).size
            xor += codec.encode(raw[start : start + n], isz, level, base=base_raw[start : start + n]).size
        return xor <= self.config.min_saving * own

    @staticmethod
    def how_stored_whole(lost: bool, skip: int) -> str:
        """``commit_objects.how`` of a tensor stored whole: a lost delta is not tried again for a few
        commits (AdamW's first moment, for one, changes completely every epoch; trying costs a base
        read and a second encode each time)."""
        left = DELTA_RETRY_AFTER if lost else skip
        return f"full/skip{left}" if left else "full"


def skip_left(how: str | None) -> int:
    """Commits still to store a tensor whole after its delta lost: ``"full/skipN"`` -> N."""
    if how and how.startswith("full/skip"):
        try:
            return max(0, int(how[9:]))
        except ValueError:
            return 0
    return 0
