"""The commit manifest: what a commit holds, in the exact JSON its id is the hash of.

A manifest is a skeleton (the checkpoint's non-tensor structure, see :mod:`coral_torch.adapters`)
and one :class:`TensorEntry` per tensor slot. A sharded commit (written through
:mod:`coral_torch.dcp`) adds a ``layout``: torch.distributed.checkpoint's global metadata as JSON
(which chunks make up each tensor), and has format 2.

On disk an entry is a 6-element JSON list ``[name, hash, dtype, shape, device, kind]``; the commit id
is ``xxh3_128`` of the canonical JSON (sorted keys, no spaces, no NaN). :meth:`Manifest.to_json`
must stay byte-identical for a given content, or every existing commit id would change.

Contracts: :meth:`Manifest.parse` refuses, with a specific :class:`~coral_torch.errors.CoralError`,
text that does not hash to the expected id (:class:`CatalogDamagedError`), a format newer than this
version reads (:class:`UnsupportedFormatError`) and anything malformed; it never returns a manifest
whose entries are not well-typed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import xxhash

from ..errors import CatalogDamagedError, UnsupportedFormatError
from . import dtypes

#: a plain checkpoint (``Repository.commit``)
FORMAT_PLAIN = 1
#: a sharded checkpoint (DCP): adds ``layout``
FORMAT_SHARDED = 2
#: the newest format this version reads and writes
MANIFEST_FORMAT = FORMAT_SHARDED


def manifest_id(text: str) -> str:
    """The commit id of a manifest's canonical JSON text."""
    return xxhash.xxh3_128(text.encode()).hexdigest()


@dataclass(frozen=True)
class TensorEntry:
    """One tensor slot of a commit: its name, object hash, dtype, shape, original device, kind."""

    name: str
    hash: str
    dtype: str
    shape: tuple[int, ...]
    device: str = "cpu"
    kind: str = "tensor"

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * dtypes.itemsize(self.dtype)

    def to_list(self) -> list:
        return [self.name, self.hash, self.dtype, list(self.shape), self.device, self.kind]

    @classmethod
    def from_list(cls, e: Any) -> TensorEntry:
        """An entry from its stored list; ValueError when it is not one."""
        if not (
            isinstance(e, list)
            and len(e) == 6
            and all(isinstance(x, str) for x in (e[0], e[1], e[2]))
            and isinstance(e[3], list)
            and all(type(d) is int and d >= 0 for d in e[3])
            and isinstance(e[4], str)
            and isinstance(e[5], str)
        ):
            raise ValueError(f"not a tensor entry: {str(e)[:80]}")
        return cls(e[0], e[1], e[2], tuple(e[3]), e[4], e[5])


@dataclass
class Manifest:
    """What a commit holds. ``layout`` is set for sharded (DCP) commits only."""

    skeleton: Any
    tensors: list[TensorEntry] = field(default_factory=list)
    layout: dict[str, Any] | None = None

    @property
    def format(self) -> int:
        return FORMAT_SHARDED if self.layout is not None else FORMAT_PLAIN

    @property
    def sharded(self) -> bool:
        return self.layout is not None

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.tensors)

    def to_json(self) -> str:
        """The canonical text (the commit id is its hash)."""
        doc: dict[str, Any] = {
            "format": self.format,
            "skeleton": self.skeleton,
            "tensors": [e.to_list() for e in self.tensors],
        }
        if self.layout is not None:
            doc["layout"] = self.layout
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)

    def commit_id(self) -> str:
        return manifest_id(self.to_json())

    def subset(self, skeleton: Any, keep: Sequence[int]) -> Manifest:
        """The manifest with only the entries at ``keep`` and a new skeleton (plain commits)."""
        return Manifest(skeleton, [self.tensors[i] for i in keep], self.layout)

    @classmethod
    def from_doc(cls, doc: Any, *, where: str = "commit") -> Manifest:
        """A manifest from its parsed JSON (no id check: see :meth:`parse`)."""
        if not isinstance(doc, dict):
            raise CatalogDamagedError(f"{where} has a malformed manifest (not an object)")
        fmt = doc.get("format")
        if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
            raise CatalogDamagedError(f"{where} has a malformed manifest (format {fmt!r})")
        if fmt > MANIFEST_FORMAT:
            raise UnsupportedFormatError(
                f"{where} was written by a newer coral-torch (manifest format {fmt}, this one reads up to "
                f"{MANIFEST_FORMAT}): upgrade coral-torch to load it"
            )
        if "skeleton" not in doc or not isinstance(doc.get("tensors"), list):
            raise CatalogDamagedError(f"{where} has a malformed manifest (no skeleton or tensor list)")
        layout = doc.get("layout")
        if (fmt == FORMAT_SHARDED) != isinstance(layout, dict):
            raise CatalogDamagedError(
                f"{where} has a malformed manifest (format {fmt} with layout {type(layout).__name__})"
            )
        try:
            tensors = [TensorEntry.from_list(e) for e in doc["tensors"]]
        except ValueError as exc:
            raise CatalogDamagedError(f"{where} has a malformed manifest ({exc})") from None
        return cls(doc["skeleton"], tensors, layout)

    @classmethod
    def parse(cls, text: str, expected_id: str | None = None, *, where: str = "commit") -> Manifest:
        """The manifest stored as ``text``, checked against ``expected_id`` (its commit id)."""
        if expected_id is not None:
            actual = manifest_id(text)
            if actual != expected_id:
                raise CatalogDamagedError(
                    f"{where} is damaged: its manifest hashes to {actual[:12]}, not its id {expected_id[:12]}; "
                    "restore the catalog from a backup or pull the commit again from a remote"
                )
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise CatalogDamagedError(f"{where} has a manifest that is not JSON ({exc})") from None
        return cls.from_doc(doc, where=where)
