"""Property tests of a sharded commit's layout: any chunking of any tensors consolidates back exactly,
and a layout that does not cover its tensors is refused."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from coral_torch.checkpoint.sharded import LAYOUT_KIND, check_layout, chunk_name, consolidate
from coral_torch.errors import CatalogDamagedError
from coral_torch.format import dtypes
from coral_torch.format.manifest import Manifest, TensorEntry

DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.float16, torch.uint8]


@st.composite
def sharded_tensors(draw):
    """A few tensors, each cut along dim 0 into contiguous row blocks (as FSDP2 shards)."""
    out = {}
    for i in range(draw(st.integers(1, 4))):
        ndim = draw(st.integers(0, 3))
        shape = tuple(draw(st.integers(0 if ndim else 1, 5)) for _ in range(ndim))
        dtype = draw(st.sampled_from(DTYPES))
        t = (torch.randn(shape) * 100).to(dtype) if dtype.is_floating_point else torch.randint(0, 200, shape, dtype=dtype)
        cuts = sorted(draw(st.lists(st.integers(0, shape[0]), max_size=3))) if ndim else []
        out[f"m.l{i}"] = (t, cuts)
    return out


def build(tensors):
    entries, items = [], {}
    for fqn, (t, cuts) in tensors.items():
        if t.dim() == 0:
            bounds = [(0, None)]
        else:
            edges = [0] + cuts + [t.shape[0]]
            bounds = [(a, b) for a, b in zip(edges, edges[1:]) if b > a] or [(0, t.shape[0])]
        chunks = []
        for a, b in bounds:
            piece = t if t.dim() == 0 else t[a:b]
            offsets = [] if t.dim() == 0 else [a] + [0] * (t.dim() - 1)
            entries.append((chunk_name(fqn, offsets), piece.contiguous()))
            chunks.append({"offsets": offsets, "sizes": list(piece.shape), "entry": len(entries) - 1})
        items[fqn] = {"type": "tensor", "dtype": dtypes.canonical_dtype(t.dtype), "size": list(t.shape),
                      "requires_grad": False, "chunks": chunks}
    manifest = Manifest(None, [TensorEntry(n, "0" * 32, dtypes.canonical_dtype(p.dtype), tuple(p.shape))
                               for n, p in entries],
                        {"kind": LAYOUT_KIND, "version": None, "items": items,
                         "paths": {fqn: fqn.split(".") for fqn in tensors}})
    return manifest, [p for _, p in entries]


@settings(max_examples=60, deadline=None)
@given(sharded_tensors())
def test_any_row_sharding_consolidates_bit_exact(tensors):
    manifest, pieces = build(tensors)
    check_layout(manifest)
    assert Manifest.parse(manifest.to_json(), manifest.commit_id()) == manifest
    full = consolidate(manifest, pieces)
    for fqn, (t, _) in tensors.items():
        got = full["m"][fqn.split(".")[1]]
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))


@settings(max_examples=30, deadline=None)
@given(sharded_tensors(), st.data())
def test_a_layout_missing_or_misplacing_a_chunk_is_refused(tensors, data):
    manifest, _ = build(tensors)
    fqn = data.draw(st.sampled_from(sorted(manifest.layout["items"])))
    item = manifest.layout["items"][fqn]
    if item["size"] and item["size"][0] > 0:
        item["chunks"][0]["offsets"][0] = item["size"][0]  # now outside the tensor
    else:
        item["size"] = item["size"] + [2] if item["size"] else [2]  # chunks no longer cover it
    with pytest.raises(CatalogDamagedError):
        check_layout(manifest)
