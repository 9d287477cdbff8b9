"""Objects read a chunk at a time: chunked blobs through the repository, streamed delta bases.

``BaseStream`` decodes a delta base (a chain: full object, then XOR deltas) a range at a time and
checks every level against its content hash as the encoder reads through it; the repository tests
shrink the codec's chunk size so that small tensors take the chunked (format 2) paths.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from conftest import assert_same  # noqa: E402

from coral_torch import Repository
from coral_torch.errors import CorruptObjectError, HashMismatchError
from coral_torch.format import codec
from coral_torch.format.weight_tensor import content_hash
from coral_torch.repository import streams

CHUNK = 64 << 10


def _chain(n: int = 300_000, depth: int = 2, seed: int = 3):
    """``(states, blobs)``: a float32 tensor's bytes after each step of a chain (a full object, then
    ``depth`` small updates) and each step's chunked blob (the first whole, the others XOR deltas)."""
    rng = np.random.default_rng(seed)
    state = (rng.standard_normal(n // 4) * 0.02).astype(np.float32)
    states = [state.view(np.uint8).copy()]
    blobs = [bytes(codec.encode(states[0], 4, chunk_bytes=CHUNK))]
    for _ in range(depth):
        nxt = states[-1].copy()
        nxt[::4] = rng.integers(0, 256, nxt[::4].size, dtype=np.uint8)  # low mantissa bytes: a raw plane
        blobs.append(bytes(codec.encode(nxt, 4, base=states[-1], chunk_bytes=CHUNK)))
        states.append(nxt)
    return states, blobs


def _stream(states, blobs, damage: dict | None = None) -> streams.BaseStream:
    levels = []
    for k, (state, blob) in enumerate(zip(states, blobs)):
        if damage and k in damage:
            bad = bytearray(blob)
            bad[damage[k]] ^= 0x10
            blob = bytes(bad)
        reader = codec.BlobReader(lambda off, n, b=blob: b[off : off + n], len(blob), hash_key=f"h{k}")
        levels.append((reader, content_hash(state, "float32", (state.size // 4,))))
    return streams.BaseStream(levels, "float32", (states[0].size // 4,), states[0].size)


def test_a_chain_read_in_order_gives_the_base_and_is_verified():
    states, blobs = _chain()
    s = _stream(states, blobs)
    want = states[-1]
    got = bytearray()
    for a in range(0, s.size, 50_000):  # not aligned with the frames: cut frames are decoded once
        got += s[a : a + 50_000].tobytes()
    assert bytes(got) == want.tobytes() and s.verified


def test_probe_slices_out_of_order_are_not_hashed_and_the_in_order_read_still_verifies():
    states, blobs = _chain()
    s = _stream(states, blobs)
    n = s.size
    for a in (0, n // 2, n - 4096):
        assert s[a : a + 4096].tobytes() == states[-1][a : a + 4096].tobytes()
    assert not s.verified
    for a in range(0, n, CHUNK):
        assert s[a : a + CHUNK].tobytes() == states[-1][a : a + CHUNK].tobytes()
    assert s.verified


def _raw_plane_byte(blob: bytes, frame: int) -> int:
    """The offset of a byte inside a raw (not zstd) plane of frame ``frame`` of a chunked blob:
    flipping it decodes fine and only the content hash can tell."""
    import struct

    pos = 24
    for k in range(frame + 1):
        _, _, nplanes, _, _ = struct.unpack_from("<4sBBHQ", blob, pos)
        table = [struct.unpack_from("<B7xQ", blob, pos + 16 + 16 * i) for i in range(nplanes)]
        p = pos + 16 + 16 * nplanes
        if k == frame:
            for mode, length in table:
                if mode == codec.MODE_RAW:
                    return p + length // 2
                p += length
            raise AssertionError("no raw plane")
        pos = p + sum(length for _, length in table)
    raise AssertionError("unreachable")


@pytest.mark.parametrize("level", [0, 1, 2])
def test_a_damaged_level_fails_the_read_that_completes_the_stream(level):
    states, blobs = _chain()
    s = _stream(states, blobs, damage={level: _raw_plane_byte(blobs[level], 1)})
    n = s.size
    last = (n - 1) // CHUNK * CHUNK
    for a in range(0, last, CHUNK):  # every read before the last one returns its bytes
        s[a : a + CHUNK]
    with pytest.raises(HashMismatchError, match=f"object {_stream(states, blobs).levels[level][1]}"):
        s[last:n]
    assert not s.verified


def test_a_damaged_frame_header_is_corrupt_when_read():
    states, blobs = _chain()
    s = _stream(states, blobs, damage={1: 24 + 5})  # nplanes of the first frame of the first delta
    with pytest.raises(CorruptObjectError):
        s[0:CHUNK]


def test_levels_of_another_size_are_refused():
    states, blobs = _chain()
    other = bytes(codec.encode(states[0][:-4], 4, chunk_bytes=CHUNK))
    reader = codec.BlobReader(lambda off, n: other[off : off + n], len(other))
    with pytest.raises(HashMismatchError):
        streams.BaseStream([(reader, "x")], "float32", (states[0].size // 4,), states[0].size)


class _Row:
    def __init__(self, h, kind, offset, length, nbytes, pack="p", lossless=True):
        self.hash, self.kind, self.offset, self.length, self.nbytes = h, kind, offset, length, nbytes
        self.pack, self.lossless, self.dtype = pack, lossless, "float32"
        self.shape = (nbytes // 4,)


def test_stream_base_reads_rows_from_a_pack_file_and_refuses_bad_extents(tmp_path):
    states, blobs = _chain(depth=1)
    path = tmp_path / "pack"
    path.write_bytes(b"\0" * 100 + blobs[0] + blobs[1])
    fd = os.open(path, os.O_RDONLY)
    try:
        n = states[0].size
        rows = [_Row(content_hash(states[0], "float32", (n // 4,)), "full", 100, len(blobs[0]), n),
                _Row(content_hash(states[1], "float32", (n // 4,)), "delta", 100 + len(blobs[0]), len(blobs[1]), n)]
        s = streams.stream_base(rows, lambda name: fd)
        assert s[0:n].tobytes() == states[1].tobytes() and s.verified
        assert streams.stream_base(rows[1:], lambda name: fd) is None  # does not start with a full object
        assert streams.stream_base([_Row(rows[0].hash, "full", None, None, n)] + rows[1:], lambda name: fd) is None
        lossy = [rows[0], _Row(rows[1].hash, "delta", rows[1].offset, rows[1].length, n, lossless=False)]
        assert streams.stream_base(lossy, lambda name: fd) is None
        with pytest.raises(CorruptObjectError, match="claims bytes"):
            streams.stream_base([_Row(rows[0].hash, "full", 100, 10 * len(blobs[0]), n)], lambda name: fd)
        with pytest.raises(CorruptObjectError, match="decodes to"):
            streams.stream_base([_Row(rows[0].hash, "full", 100, len(blobs[0]), n - 4)], lambda name: fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ through the repository
@pytest.fixture
def small_chunks(monkeypatch):
    """Tensors above 64 KiB are chunked blobs (format 2), without building large test tensors."""
    monkeypatch.setattr(codec, "CHUNK_BYTES", CHUNK)


def _row(repo: Repository, cid: str, name: str):
    h = next(e.hash for e in repo.manifest(cid).tensors if e.name == name)
    return repo.catalog.get_object(h)


def _magic(repo: Repository, row) -> bytes:
    with open(repo.path / "packs" / row.pack, "rb") as fh:
        fh.seek(row.offset)
        return fh.read(4)


def test_chunked_objects_round_trip_through_commits_and_delta_chains(tmp_path, small_chunks):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200_000, generator=g) * 0.02
    repo = Repository(tmp_path / "repo")
    states, ids = [], []
    for step in range(4):
        if step:
            w = w.clone()
            w.view(torch.int32)[::7] += 1  # low mantissa bits change: a delta pays
        states.append({"w": w, "b": torch.randn(10, generator=g)})
        ids.append(repo.commit(states[-1], run="r").commit_id)
    kinds = [_row(repo, cid, "w").kind for cid in ids]
    assert kinds[0] == "full" and "delta" in kinds[1:]
    assert all(_magic(repo, _row(repo, cid, "w")) == b"CZP2" for cid in ids)
    fresh = Repository(tmp_path / "repo")  # a new process reads them back
    for cid, state in zip(ids, states):
        assert_same(state, fresh.load(cid))


def test_a_damaged_delta_base_is_not_used_and_the_tensor_is_stored_whole(tmp_path, small_chunks, caplog):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(200_000, generator=g) * 0.02
    repo = Repository(tmp_path / "repo")
    first = repo.commit({"w": w}, run="r").commit_id
    row = _row(repo, first, "w")
    path = repo.path / "packs" / row.pack
    os.chmod(path, 0o644)
    with open(path, "r+b") as fh:  # flip a byte in the middle of the base's stored bytes
        fh.seek(row.offset + row.length // 2)
        b = fh.read(1)
        fh.seek(row.offset + row.length // 2)
        fh.write(bytes([b[0] ^ 0x04]))
    w2 = w.clone()
    w2.view(torch.int32)[::9] += 1
    with caplog.at_level(logging.WARNING):
        second = Repository(tmp_path / "repo").commit({"w": w2}, run="r").commit_id
    assert _row(repo, second, "w").kind == "full"
    assert "unreadable" in caplog.text
    assert_same({"w": w2}, Repository(tmp_path / "repo").load(second))
