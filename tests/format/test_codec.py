"""The byte-plane + zstd codec: lossless for any bytes, documented layout, damage -> CorruptObjectError."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import xxhash
from conftest import DTYPE_NAMES, make_tensor, raw_bytes
from hypothesis import HealthCheck, given, settings, strategies as st

from coral_torch.errors import CorruptObjectError, IntegrityError
from coral_torch.format import codec, dtypes, planes

ITEMSIZES = [1, 2, 4, 8, 16]


def _enc(raw: np.ndarray, itemsize: int, level: int = codec.DEFAULT_LEVEL) -> bytes:
    """codec.encode's blob as bytes (encode may hand back bytes or a uint8 array)."""
    blob = codec.encode(raw, itemsize, level)
    if isinstance(blob, np.ndarray):
        assert blob.dtype == np.uint8 and blob.ndim == 1
    return bytes(memoryview(blob).cast("B"))


def _round_trip(raw: np.ndarray, itemsize: int, level: int = codec.DEFAULT_LEVEL) -> bytes:
    raw_before = raw.tobytes()
    blob = _enc(raw, itemsize, level)
    assert raw.tobytes() == raw_before  # the input is never modified
    out = codec.decode(blob)
    assert codec.decode(codec.encode(raw, itemsize, level)).tobytes() == raw.tobytes()
    assert out.dtype == np.uint8 and out.ndim == 1 and out.flags.c_contiguous and out.flags.writeable
    assert out.tobytes() == raw.tobytes()
    segmented = codec.encode_blob(raw, itemsize, level)  # the writers' form: same bytes
    assert segmented.nbytes == len(blob) and segmented.to_array().tobytes() == blob
    assert segmented.xxh3_64() == xxhash.xxh3_64(blob).hexdigest()
    return blob


@st.composite
def _buffers(draw):
    itemsize = draw(st.sampled_from(ITEMSIZES))
    n = draw(st.integers(0, 700))
    kind = draw(st.sampled_from(["random", "tiled", "sparse", "ragged"]))
    if kind == "random":
        data = draw(st.binary(min_size=n * itemsize, max_size=n * itemsize))
    elif kind == "tiled":  # low entropy: zstd planes
        unit = draw(st.binary(min_size=1, max_size=max(1, itemsize * 3)))
        data = (unit * (n * itemsize // len(unit) + 1))[: n * itemsize]
    elif kind == "sparse":  # mostly zero, like an XOR delta
        buf = bytearray(n * itemsize)
        for pos, val in draw(st.lists(st.tuples(st.integers(0, max(0, n * itemsize - 1)), st.integers(1, 255)),
                                      max_size=20)):
            if buf:
                buf[pos] = val
        data = bytes(buf)
    else:  # length not a multiple of itemsize: must fall back to one plane, still exact
        data = draw(st.binary(min_size=0, max_size=2000))
    return np.frombuffer(data, dtype=np.uint8).copy(), itemsize


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_buffers())
def test_round_trip_random_buffers(case):
    raw, itemsize = case
    _round_trip(raw, itemsize)


@settings(max_examples=40, deadline=None)
@given(case=_buffers(), level=st.sampled_from([-5, 1, 3, 9, 19]))
def test_round_trip_other_levels(case, level):
    raw, itemsize = case
    _round_trip(raw, itemsize, level)


def test_round_trip_every_dtype(dtype_name):
    for shape in [(), (0,), (1,), (63,), (64, 80)]:
        t = make_tensor(dtype_name, shape, seed=11)
        raw = np.frombuffer(raw_bytes(t), dtype=np.uint8)
        _round_trip(raw, dtypes.itemsize(dtype_name))


def test_edge_lengths_around_split_threshold():
    rng = np.random.default_rng(0)
    for itemsize in ITEMSIZES:
        for n in range(0, 3 * codec._MIN_SPLIT_BYTES // itemsize + 2, 7):
            raw = rng.integers(0, 4, size=n * itemsize, dtype=np.uint8)
            _round_trip(raw, itemsize)


def test_layout_is_as_documented():
    rng = np.random.default_rng(1)
    vals = rng.standard_normal(4096).astype(np.float32)
    raw = vals.view(np.uint8)
    blob = _enc(raw, 4)
    magic, itemsize, nplanes, reserved, nbytes = struct.unpack_from("<4sBBHQ", blob, 0)
    assert (magic, itemsize, nplanes, reserved, nbytes) == (b"CZP1", 4, 4, 0, raw.size)
    offset = 16
    total = 0
    modes = []
    for _ in range(nplanes):
        mode, length = struct.unpack_from("<B7xQ", blob, offset)
        assert blob[offset + 1 : offset + 8] == b"\0" * 7
        modes.append(mode)
        total += length
        offset += 16
    assert offset + total == len(blob)
    # low mantissa byte of a float is noise (raw); the sign/exponent byte compresses (zstd)
    assert modes[0] == codec.MODE_RAW and modes[3] == codec.MODE_ZSTD
    # the plane split is what makes it pay: smaller than the raw bytes
    assert len(blob) < 0.95 * raw.size
    # plane k holds byte k of every element
    assert np.array_equal(codec.split_planes(raw, 4)[3], raw.reshape(-1, 4)[:, 3])


def test_small_or_one_byte_data_is_not_split():
    for raw, itemsize in [(np.arange(100, dtype=np.uint8), 4), (np.arange(1000, dtype=np.uint16).view(np.uint8), 1),
                          (np.arange(1001, dtype=np.uint8), 4)]:
        blob = _round_trip(raw, itemsize)
        assert blob[5] == 1  # nplanes


def test_incompressible_data_is_stored_raw_with_small_overhead():
    raw = np.random.default_rng(2).integers(0, 256, size=1 << 16, dtype=np.uint8)
    blob = _round_trip(raw, 4)
    assert len(blob) == 16 + 4 * 16 + raw.size


def test_zeros_collapse():
    raw = np.zeros(1 << 20, dtype=np.uint8)
    blob = _round_trip(raw, 4)
    assert len(blob) < 2000


def test_deterministic_and_independent_of_input_memory():
    raw = np.random.default_rng(3).standard_normal(3000).astype(np.float32).view(np.uint8)
    assert _enc(raw, 4) == _enc(raw.copy(), 4)
    blob = _enc(raw, 4)
    out = codec.decode(bytearray(blob))
    out[:] = 0  # decoded array owns its memory
    assert codec.decode(blob).tobytes() == raw.tobytes()
    # decode accepts any buffer: bytes, bytearray, memoryview, uint8 array
    assert codec.decode(np.frombuffer(blob, dtype=np.uint8)).tobytes() == raw.tobytes()
    assert codec.decode(memoryview(blob)).tobytes() == raw.tobytes()


# --------------------------------------------------------------------------------------- damage
def _sample_blob() -> bytes:
    rng = np.random.default_rng(4)
    vals = (rng.standard_normal(2048) * 0.02).astype(np.float32)
    return _enc(vals.view(np.uint8), 4)


def test_truncation_is_detected_at_every_length():
    blob = _sample_blob()
    for cut in range(len(blob)):
        with pytest.raises(CorruptObjectError):
            codec.decode(blob[:cut], hash_key="abc123")


def test_trailing_bytes_bad_magic_and_bad_mode_are_detected():
    blob = _sample_blob()
    for bad in (blob + b"\0", b"XZP1" + blob[4:], blob[:16] + b"\x07" + blob[17:]):
        with pytest.raises(CorruptObjectError, match="deadbeef") as exc:
            codec.decode(bad, hash_key="deadbeef")
        assert exc.value.hash_key == "deadbeef"
        assert isinstance(exc.value, IntegrityError)
    with pytest.raises(CorruptObjectError):
        codec.decode(b"")


def test_every_header_byte_flip_raises_corrupt_or_decodes_the_same_length():
    """A flipped header byte must never crash with anything but CorruptObjectError (the content hash
    catches flips the codec cannot see); in particular a damaged length must not try to allocate it."""
    blob = _sample_blob()
    nplanes = blob[5]
    header_len = 16 + 16 * nplanes
    for pos in range(header_len):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(blob)
            bad[pos] ^= mask
            try:
                out = codec.decode(bytes(bad), hash_key="h")
            except CorruptObjectError:
                continue
            assert out.size == 2048 * 4, (pos, mask)


@settings(max_examples=150, deadline=None)
@given(pos=st.integers(min_value=0), mask=st.integers(1, 255))
def test_random_byte_damage_never_escapes_as_another_error(pos, mask):
    blob = bytearray(_sample_blob())
    blob[pos % len(blob)] ^= mask
    try:
        codec.decode(bytes(blob))
    except CorruptObjectError:
        pass


@pytest.mark.parametrize("nbytes", [1 << 40, (1 << 63) + 8, (1 << 64) - 4])
def test_absurd_declared_length_is_corrupt_not_memory_error(nbytes):
    blob = bytearray(_sample_blob())
    struct.pack_into("<Q", blob, 8, nbytes)
    with pytest.raises(CorruptObjectError):
        codec.decode(bytes(blob))


def test_dtype_names_cover_codec_widths():
    assert {dtypes.itemsize(n) for n in DTYPE_NAMES} == set(ITEMSIZES)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_buffers(), seed=st.integers(0, 2**32 - 1))
def test_xor_base_encode_and_in_place_xor_decode(case, seed):
    """encode(raw, base=b) is the blob of raw ^ b; decode(xor=True) applies it onto b in place."""
    raw, itemsize = case
    base = np.random.default_rng(seed).integers(0, 256, raw.size, dtype=np.uint8)
    blob = codec.encode(raw, itemsize, base=base)
    assert blob.tobytes() == codec.encode(raw ^ base, itemsize).tobytes()
    assert codec.encode_blob(raw, itemsize, base=base).to_array().tobytes() == blob.tobytes()
    out = base.copy()
    assert codec.decode(blob, out=out, xor=True) is out
    assert out.tobytes() == raw.tobytes()


def test_decode_into_wrong_size_is_corrupt_and_xor_needs_out():
    raw = np.arange(4096, dtype=np.uint8)
    blob = codec.encode(raw, 4)
    with pytest.raises(CorruptObjectError):
        codec.decode(blob, out=np.empty(4092, dtype=np.uint8))
    with pytest.raises(ValueError):
        codec.decode(blob, xor=True)
    assert codec.decoded_size(blob) == 4096 and codec.decoded_size(b"junk") is None


@pytest.mark.skipif(not planes.HAVE_C, reason="the C module coral_torch._planes was not built")
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(itemsize=st.integers(1, 16), n=st.integers(0, 3000), seed=st.integers(0, 2**32 - 1), xor=st.booleans())
def test_c_planes_match_numpy(monkeypatch_c, itemsize, n, seed, xor):
    """The C split/join (GIL released) and the numpy fallback write the same bytes."""
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 256, n * itemsize, dtype=np.uint8)
    base = rng.integers(0, 256, n * itemsize, dtype=np.uint8) if xor else None
    start = rng.integers(0, 256, n * itemsize, dtype=np.uint8)
    results = []
    for use_c in (True, False):
        monkeypatch_c(use_c)
        split = np.empty_like(src)
        planes.split(src, split, itemsize, base)
        joined = start.copy()
        planes.join([split[k * n:(k + 1) * n] for k in range(itemsize)], joined, xor)
        results.append((split.tobytes(), joined.tobytes()))
    assert results[0] == results[1]
    expect = src ^ base if xor else src
    assert results[0][0] == np.ascontiguousarray(expect.reshape(n, itemsize).T).tobytes()
    assert results[0][1] == ((start ^ expect) if xor else expect).tobytes()


@pytest.fixture
def monkeypatch_c():
    """Switch between the C module and the numpy fallback (restored after the test; stateless)."""
    saved = planes._c

    def use(c: bool) -> None:
        planes._c = saved if c else None

    yield use
    planes._c = saved


@pytest.mark.skipif(not planes.HAVE_C, reason="the C module coral_torch._planes was not built")
def test_c_planes_reject_bad_sizes():
    a = np.zeros(12, dtype=np.uint8)
    with pytest.raises(ValueError):
        planes.split(a, np.zeros(8, dtype=np.uint8), 4)
    with pytest.raises(ValueError):
        planes.split(a, np.zeros(12, dtype=np.uint8), 5)
    with pytest.raises(ValueError):
        planes.split(a, np.zeros(12, dtype=np.uint8), 4, np.zeros(4, dtype=np.uint8))
    with pytest.raises(ValueError):
        planes.join([a[:3], a[3:6], a[6:9], a[9:11]], np.zeros(12, dtype=np.uint8))
    with pytest.raises(TypeError):
        planes.join([a[:6], a[6:]], bytes(12))  # destination must be writable


def test_c_module_is_built_where_required():
    """CI sets CORAL_TORCH_REQUIRE_C=1: a silently failed build of the optional C module would
    otherwise only show up as slower benchmarks."""
    if os.environ.get("CORAL_TORCH_REQUIRE_C") and not os.environ.get("CORAL_TORCH_NO_C"):
        assert planes.HAVE_C, "coral_torch._planes was not built (is a C compiler installed?)"


def test_numpy_fallback_round_trips_through_a_repository(tmp_path):
    """With CORAL_TORCH_NO_C=1 (as without a compiler) save/load work and give the same bytes."""
    code = textwrap.dedent(f"""
        import torch, coral_torch
        from coral_torch.format import planes
        assert not planes.HAVE_C
        g = torch.Generator().manual_seed(0)
        sd = {{"w": torch.randn(300, 7, generator=g), "h": torch.randn(40, generator=g).half()}}
        for e in range(3):
            sd = {{k: v + 1e-3 for k, v in sd.items()}}
            coral_torch.save(sd, r"{tmp_path}/e%d.pt" % e)
        back = coral_torch.load(r"{tmp_path}/e2.pt")
        assert all(torch.equal(back[k], sd[k]) and back[k].dtype == sd[k].dtype for k in sd)
        print("ok")
    """)
    env = dict(os.environ, CORAL_TORCH_NO_C="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ------------------------------------------------------------------ chunked blobs (format 2)
def _chunked_sample(chunk: int = 1000, n: int = 10_000, seed: int = 7) -> tuple[np.ndarray, bytes]:
    vals = (np.random.default_rng(seed).standard_normal(n // 4) * 0.02).astype(np.float32)
    raw = vals.view(np.uint8)
    return raw, bytes(codec.encode(raw, 4, chunk_bytes=chunk))


def test_chunked_layout_is_as_documented():
    raw, blob = _chunked_sample()
    magic, itemsize, r1, r2, nbytes, chunk = struct.unpack_from("<4sBBHQQ", blob, 0)
    assert (magic, itemsize, r1, r2, nbytes, chunk) == (b"CZP2", 4, 0, 0, raw.size, 1000)
    pos, start = 24, 0
    while start < raw.size:  # frames back to back, each a CZP1 blob of its slice
        _, _, nplanes, _, n = struct.unpack_from("<4sBBHQ", blob, pos)
        length = 16 + 16 * nplanes + sum(struct.unpack_from("<B7xQ", blob, pos + 16 + 16 * k)[1] for k in range(nplanes))
        assert n == min(1000, raw.size - start)
        assert codec.decode(blob[pos : pos + length]).tobytes() == raw[start : start + n].tobytes()
        pos, start = pos + length, start + n
    assert pos == len(blob)
    assert codec.decoded_size(blob) == raw.size


def test_data_up_to_the_chunk_size_is_one_frame_above_it_chunked(monkeypatch):
    monkeypatch.setattr(codec, "CHUNK_BYTES", 4096)
    raw = np.arange(4096 + 4, dtype=np.uint8)
    assert _enc(raw[:4096], 4)[:4] == b"CZP1"
    assert _enc(raw, 4)[:4] == b"CZP2"
    _round_trip(raw, 4)


def test_large_single_frame_blobs_of_earlier_versions_still_decode():
    """Before chunked blobs every tensor was one frame, however large: those stay readable."""
    raw, _ = _chunked_sample(n=3 * codec.CHUNK_BYTES // 2 // 4 * 4)
    old = codec.encode(raw, 4, chunk_bytes=raw.size)  # one frame over the whole tensor, as before
    assert bytes(old[:4]) == b"CZP1"
    assert codec.decode(old).tobytes() == raw.tobytes()
    r = codec.BlobReader(lambda off, n: old[off : off + n], old.size)
    out = np.empty(100, dtype=np.uint8)
    assert r.decode_range(raw.size // 2, raw.size // 2 + 100, out).tobytes() == raw[raw.size // 2 :][:100].tobytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_buffers(), chunk=st.integers(1, 600), seed=st.integers(0, 2**32 - 1), spill_after=st.integers(0, 3000))
def test_chunked_round_trips_and_segmented_form_is_the_same_bytes(tmp_path_factory, case, chunk, seed, spill_after):
    raw, itemsize = case
    base = np.random.default_rng(seed).integers(0, 256, raw.size, dtype=np.uint8)
    spill_dir = tmp_path_factory.getbasetemp()
    for b in (None, base):
        blob = codec.encode(raw, itemsize, base=b, chunk_bytes=chunk)
        seg = codec.encode_blob(raw, itemsize, base=b, chunk_bytes=chunk, spill_dir=spill_dir, spill_after=spill_after)
        assert seg.nbytes == blob.size and seg.to_array().tobytes() == blob.tobytes()
        assert seg.xxh3_64() == xxhash.xxh3_64(blob.tobytes()).hexdigest()
        seg.close()
        if b is None:
            assert codec.decode(blob).tobytes() == raw.tobytes()
        else:
            out = b.copy()
            assert codec.decode(blob, out=out, xor=True).tobytes() == raw.tobytes()
        mv = blob.tobytes()
        r = codec.BlobReader(lambda off, n: mv[off : off + n], len(mv))
        assert r.nbytes == raw.size
        ref = raw ^ b if b is not None else raw
        assert r.decode_into(np.empty(raw.size, dtype=np.uint8)).tobytes() == ref.tobytes()
        for a, z in ((0, raw.size), (raw.size // 3, raw.size // 2), (raw.size // 2, raw.size)):
            got = r.decode_range(a, z, np.zeros(z - a, dtype=np.uint8), xor=True)
            assert got.tobytes() == ref[a:z].tobytes()


def test_large_blobs_spill_past_their_memory_budget_and_write_the_same_bytes(tmp_path):
    raw, blob = _chunked_sample(chunk=4096, n=100_000)
    seg = codec.encode_blob(raw, 4, chunk_bytes=4096, spill_dir=tmp_path, spill_after=20_000)
    assert 0 < seg.spilled_bytes < seg.nbytes
    assert any(isinstance(s, codec.FileSegment) for s in seg.segments)
    assert not list(tmp_path.iterdir()) or all(p.name.startswith(".coral-spill-") for p in tmp_path.iterdir())
    assert seg.to_array().tobytes() == blob and seg.xxh3_64() == xxhash.xxh3_64(blob).hexdigest()
    nospill = codec.encode_blob(raw, 4, chunk_bytes=4096)
    assert nospill.spilled_bytes == 0 and nospill.to_array().tobytes() == blob
    seg.close()


def test_chunked_truncation_and_damage_are_corrupt():
    _, blob = _chunked_sample(chunk=512, n=2048)
    for cut in range(len(blob)):
        with pytest.raises(CorruptObjectError):
            codec.decode(blob[:cut], hash_key="abc")
    with pytest.raises(CorruptObjectError):
        codec.decode(blob + b"\0")
    for pos in range(24):  # the chunked header: every flip is refused or decodes the same length
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(blob)
            bad[pos] ^= mask
            try:
                out = codec.decode(bytes(bad))
            except CorruptObjectError:
                continue
            assert out.size == 2048, (pos, mask)
    with pytest.raises(CorruptObjectError, match="newer"):
        codec.decode(b"CZP3" + blob[4:])


@settings(max_examples=150, deadline=None)
@given(pos=st.integers(min_value=0), mask=st.integers(1, 255), lo=st.integers(0, 2048), hi=st.integers(0, 2048))
def test_chunked_random_damage_never_escapes_as_another_error(pos, mask, lo, hi):
    _, blob = _chunked_sample(chunk=512, n=2048)
    bad = bytearray(blob)
    bad[pos % len(bad)] ^= mask
    try:
        codec.decode(bytes(bad))
    except CorruptObjectError:
        pass
    lo, hi = min(lo, hi), max(lo, hi)
    try:  # the streaming reader too, from any range
        codec.BlobReader(lambda off, n: bytes(bad[off : off + n]), len(bad)).decode_range(
            lo, hi, np.empty(hi - lo, dtype=np.uint8))
    except CorruptObjectError:
        pass


def test_blob_reader_reads_one_frame_at_a_time_and_refuses_short_sources():
    raw, blob = _chunked_sample(chunk=1000, n=10_000)
    reads: list[int] = []

    def read(off: int, n: int) -> bytes:
        reads.append(n)
        return blob[off : off + n]

    r = codec.BlobReader(read, len(blob))
    assert r.decode_into(np.empty(raw.size, dtype=np.uint8)).tobytes() == raw.tobytes()
    assert max(reads) <= 1000 + 16 + 4 * 16  # never more than one frame
    short = codec.BlobReader(lambda off, n: blob[off : off + n][: max(0, n - 1)] if off > 100 else blob[off : off + n],
                             len(blob), hash_key="h1")
    with pytest.raises(CorruptObjectError, match="h1"):
        short.decode_into(np.empty(raw.size, dtype=np.uint8))
    with pytest.raises(CorruptObjectError):  # the blob is longer than its frames
        codec.BlobReader(lambda off, n: (blob + b"\0\0")[off : off + n], len(blob) + 2).decode_into(
            np.empty(raw.size, dtype=np.uint8))
