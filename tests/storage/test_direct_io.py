"""PayloadWriter: O_DIRECT payload writes (whole pages around the page cache, the rest buffered).

Every test checks the file's bytes exactly, including the bytes around the payload, on the real
file system of ``tmp_path`` (ext4 here: direct I/O is taken) and with direct I/O off or refused.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from coral_torch.format.weight_tensor import WeightTensor
from coral_torch.storage import HDF5Store, direct_io
from coral_torch.storage.direct_io import MIN_DIRECT_BYTES, PAGE, STAGE_BYTES, PayloadWriter


def _file_with_sentinel(path: Path, size: int) -> np.ndarray:
    data = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    return data


def _segments(payload: np.ndarray, cuts: list[int]) -> list[memoryview]:
    bounds = [0] + sorted(c % (payload.size + 1) for c in cuts) + [payload.size]
    return [memoryview(payload[a:b]) for a, b in zip(bounds, bounds[1:])]


def _write_and_check(path: Path, payload: np.ndarray, cuts: list[int], offset: int, direct: bool) -> PayloadWriter:
    expect = _file_with_sentinel(path, offset + payload.size + 3 * PAGE)
    expect[offset : offset + payload.size] = payload
    w = PayloadWriter(path, direct=direct)
    try:
        w.write(_segments(payload, cuts), offset)
    finally:
        w.close()
    got = np.fromfile(path, dtype=np.uint8)
    assert got.size == expect.size
    np.testing.assert_array_equal(got, expect)
    assert w.direct_bytes + w.buffered_bytes == payload.size
    return w


SIZES = [0, 1, PAGE - 1, PAGE, MIN_DIRECT_BYTES - 1, MIN_DIRECT_BYTES, MIN_DIRECT_BYTES + 1,
         MIN_DIRECT_BYTES + PAGE + 17, STAGE_BYTES, STAGE_BYTES + PAGE + 5, 2 * STAGE_BYTES + 123]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("direct", [True, False])
def test_exact_bytes_at_page_aligned_offset(tmp_path: Path, size: int, direct: bool) -> None:
    payload = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    w = _write_and_check(tmp_path / "f", payload, [size // 3, size // 3 + 1, 7], 3 * PAGE, direct)
    if not direct:
        assert w.direct_bytes == 0
    elif w.direct_bytes or size < MIN_DIRECT_BYTES:
        # whole pages only, and only for payloads of at least MIN_DIRECT_BYTES
        assert w.direct_bytes == (size // PAGE * PAGE if size >= MIN_DIRECT_BYTES else 0)


def test_direct_io_is_taken_on_a_disk_file_system(tmp_path: Path) -> None:
    """Where the file system accepts O_DIRECT (ext4, xfs, ...), large payloads go around the cache."""
    (tmp_path / "probe.bin").touch()
    w = PayloadWriter(tmp_path / "probe.bin")
    supported = w.direct
    w.close()
    if not supported:
        pytest.skip(f"{tmp_path} refuses O_DIRECT")
    payload = np.arange(MIN_DIRECT_BYTES * 3 + 11, dtype=np.uint32).view(np.uint8)
    w = _write_and_check(tmp_path / "f", payload, [5, 999], PAGE, True)
    assert w.direct_bytes == payload.size // PAGE * PAGE
    assert w.buffered_bytes == payload.size % PAGE


def test_unaligned_offset_goes_buffered(tmp_path: Path) -> None:
    payload = np.random.default_rng(0).integers(0, 256, MIN_DIRECT_BYTES * 2, dtype=np.uint8)
    w = _write_and_check(tmp_path / "f", payload, [100], PAGE + 1, True)
    assert w.direct_bytes == 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    size=st.integers(0, 3 * MIN_DIRECT_BYTES),
    cuts=st.lists(st.integers(0, 3 * MIN_DIRECT_BYTES), max_size=8),
    pages=st.integers(0, 4),
    unaligned=st.booleans(),
)
def test_any_segmentation_round_trips(tmp_path: Path, size: int, cuts: list[int], pages: int, unaligned: bool) -> None:
    payload = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    _write_and_check(tmp_path / "f", payload, cuts, pages * PAGE + (13 if unaligned else 0), True)


def test_refused_direct_write_falls_back_for_good(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system that opens with O_DIRECT but refuses the write (EINVAL) still gets every byte."""
    path = tmp_path / "f"
    path.touch()
    probe = PayloadWriter(path)
    if not probe.direct:
        probe.close()
        pytest.skip(f"{tmp_path} refuses O_DIRECT at open")
    direct_fd = probe._direct_fd
    real_pwritev = os.pwritev
    calls = {"n": 0}

    def pwritev(fd, buffers, offset):
        if fd == direct_fd:
            calls["n"] += 1
            if calls["n"] == 2:  # the second staging buffer: part of the payload already went out
                raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(direct_io.os, "pwritev", pwritev)
    payload = np.random.default_rng(3).integers(0, 256, 2 * STAGE_BYTES + 77, dtype=np.uint8)
    expect = _file_with_sentinel(path, 2 * PAGE + payload.size + PAGE)
    expect[2 * PAGE : 2 * PAGE + payload.size] = payload
    probe.write(_segments(payload, [1000]), 2 * PAGE)
    assert not probe.direct and probe.buffered_bytes == payload.size and probe.direct_bytes == 0
    probe.write(_segments(payload[: MIN_DIRECT_BYTES * 2], []), 2 * PAGE)  # later writes: buffered
    assert calls["n"] == 2 and probe.direct_bytes == 0
    probe.close()
    np.testing.assert_array_equal(np.fromfile(path, dtype=np.uint8), expect)


def test_other_write_errors_propagate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f"
    path.touch()
    w = PayloadWriter(path)

    def full_disk(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct_io.os, "pwritev", full_disk)
    with pytest.raises(OSError) as info:
        w.write([memoryview(np.zeros(MIN_DIRECT_BYTES, np.uint8))], 0)
    assert info.value.errno == errno.ENOSPC
    w.close()


def test_tmpfs_without_direct_io_still_writes(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm")
    path = shm / f"coral-direct-io-test-{os.getpid()}"
    try:
        payload = np.random.default_rng(9).integers(0, 256, MIN_DIRECT_BYTES * 2 + 3, dtype=np.uint8)
        _write_and_check(path, payload, [17], PAGE, True)
    finally:
        path.unlink(missing_ok=True)


def test_hdf5_store_aligns_large_payloads_and_reads_back(tmp_path: Path) -> None:
    """Large datasets start on a page boundary, their pages go direct, and h5py and the store read
    back exactly what was written (direct writes and HDF5's buffered metadata share the file)."""
    rng = np.random.default_rng(5)
    weights = {f"w{i}": WeightTensor(rng.standard_normal(n).astype(np.float32), name=f"w{i}")
               for i, n in enumerate([10, 70_000, 300_000, 1_100_000, 33])}
    path = tmp_path / "s.h5"
    with HDF5Store(path, mode="x", direct_io=True) as store:
        keys = {k: store.store(w) for k, w in weights.items()}
        writer = store._writer
        assert writer is not None
        direct_bytes = writer.direct_bytes
        assert direct_bytes == 0 or direct_bytes >= 3 * MIN_DIRECT_BYTES
    with h5py.File(path, "r") as f:
        for k, key in keys.items():
            ds = f["weights"][key]
            if ds.id.get_storage_size() >= MIN_DIRECT_BYTES:
                assert ds.id.get_offset() % PAGE == 0, k
    with HDF5Store(path, mode="r") as store:
        for k, w in weights.items():
            back = store.load(keys[k])
            assert back.raw.tobytes() == w.raw.tobytes()


def test_hdf5_store_writes_buffered_by_default(tmp_path: Path) -> None:
    """Callers that wait for the store (store_batch, synchronous commits) get page-cache speed."""
    w = WeightTensor(np.random.default_rng(0).standard_normal(400_000).astype(np.float32), name="w")
    with HDF5Store(tmp_path / "s.h5", mode="x") as store:
        key = store.store(w)
        assert store._writer is not None and store._writer.direct_bytes == 0
        assert store.load(key).raw.tobytes() == w.raw.tobytes()


def _spilled_segments(payload: np.ndarray, cuts: list[int], spill: Path, every: int = 2) -> list:
    """The payload cut into segments, every ``every``-th one a FileSegment of a spill file (as a
    large encoded blob past its memory budget holds them)."""
    from coral_torch.format.codec import FileSegment

    fd = os.open(spill, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    segs: list = []
    pos = 7  # the spilled bytes do not start at the spill file's beginning
    os.pwrite(fd, b"x" * pos, 0)
    for i, seg in enumerate(_segments(payload, cuts)):
        if i % every == 0 and len(seg):
            os.pwrite(fd, seg, pos)
            segs.append(FileSegment(fd, pos, len(seg)))
            pos += len(seg)
        else:
            segs.append(seg)
    return segs


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("size", [5, MIN_DIRECT_BYTES + PAGE + 17, 2 * STAGE_BYTES + 123])
@pytest.mark.parametrize("copy_file_range", [True, False])
def test_spilled_segments_are_copied_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool,
                                              size: int, copy_file_range: bool) -> None:
    """Parts of a payload that live in a spill file land exactly where they belong, through
    copy_file_range (buffered) or the staging buffer (O_DIRECT, or copy_file_range refused)."""
    if not copy_file_range:
        def refuse(*args, **kwargs):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        monkeypatch.setattr(direct_io.os, "copy_file_range", refuse, raising=False)
    payload = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    path = tmp_path / "f"
    offset = 3 * PAGE
    expect = _file_with_sentinel(path, offset + size + 3 * PAGE)
    expect[offset : offset + size] = payload
    segs = _spilled_segments(payload, [size // 3, size // 2, size - 1, 100], tmp_path / "spill")
    w = PayloadWriter(path, direct=direct)
    try:
        w.write(segs, offset)
    finally:
        w.close()
    np.testing.assert_array_equal(np.fromfile(path, dtype=np.uint8), expect)
    assert w.direct_bytes + w.buffered_bytes == size


def test_hdf5_store_writes_a_spilled_blob_and_reads_it_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from coral_torch.format import codec

    monkeypatch.setattr(codec, "CHUNK_BYTES", 64 << 10)
    monkeypatch.setattr(codec, "SPILL_AFTER", 100 << 10)
    vals = (np.random.default_rng(5).standard_normal(300_000) * 0.02).astype(np.float32)
    w = WeightTensor(vals, name="big")
    for direct in (False, True):
        store = HDF5Store(tmp_path / f"s{direct}.h5", direct_io=direct)
        prep = store.prepare(w, segmented=True)
        assert isinstance(prep.payload, codec.Blob) and prep.payload.spilled_bytes > 0
        store.write_prepared(prep)
        store.close()
        with HDF5Store(tmp_path / f"s{direct}.h5", mode="r") as ro:
            np.testing.assert_array_equal(ro.load(w.compute_hash()).data, vals)


# ------------------------------------------------------------------ background syncs of a pack
def _eio(fd: int) -> None:
    raise OSError(errno.EIO, "Input/output error")


def test_background_sync_flushes_while_writing_and_keeps_bytes_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(direct_io.os, "fdatasync", lambda fd: (synced.append(fd), real(fd))[1])
    path = tmp_path / "f.bin"
    path.write_bytes(b"\0" * (8 * MIN_DIRECT_BYTES))
    payload = np.random.default_rng(3).integers(0, 256, 8 * MIN_DIRECT_BYTES, dtype=np.uint8)
    w = PayloadWriter(path, direct=False, sync_every=MIN_DIRECT_BYTES)
    for k in range(8):
        part = payload[k * MIN_DIRECT_BYTES : (k + 1) * MIN_DIRECT_BYTES]
        w.write([memoryview(part)], k * MIN_DIRECT_BYTES)
    w.close()  # joins the sync thread
    assert synced, "no background fdatasync ran although 8x sync_every bytes were written"
    assert np.array_equal(np.frombuffer(path.read_bytes(), dtype=np.uint8), payload)


def test_background_sync_error_is_raised_by_close(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An EIO met by a background fdatasync is reported once, to that descriptor: close() must
    raise it, or the pack would be published on the word of a later fsync that never saw it."""

    monkeypatch.setattr(direct_io.os, "fdatasync", _eio)
    path = tmp_path / "f.bin"
    path.write_bytes(b"\0" * (2 * PAGE))
    w = PayloadWriter(path, direct=False, sync_every=PAGE)
    w.write([memoryview(np.ones(2 * PAGE, dtype=np.uint8))], 0)
    with pytest.raises(OSError) as info:
        w.close()
    assert info.value.errno == errno.EIO


def test_a_failed_background_sync_aborts_the_pack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the repository: a commit whose pack met a sync error publishes nothing and leaves
    no pack behind; the previous commit still loads."""
    import torch

    from coral_torch.errors import RepositoryIOError
    from coral_torch.repository import Repository, packs as packs_mod

    repo = Repository(tmp_path / "repo")
    first = {"w": torch.arange(1 << 16, dtype=torch.float32)}
    cid = repo.commit(first).commit_id
    before = sorted(p.name for p in (repo.path / packs_mod.PACKS_DIR).iterdir())
    monkeypatch.setattr(packs_mod, "SYNC_EVERY", PAGE)
    monkeypatch.setattr(direct_io.os, "fdatasync", _eio)
    with pytest.raises(RepositoryIOError) as info:
        repo.commit({"w": torch.randn(1 << 16)})
    assert info.value.errno == errno.EIO and "published nothing" in str(info.value)
    assert sorted(p.name for p in (repo.path / packs_mod.PACKS_DIR).iterdir()) == before
    assert [c.id for c in repo.log()] == [cid]
    assert torch.equal(repo.load(cid)["w"], first["w"])
