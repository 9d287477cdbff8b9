"""Delta encoding: lossless XOR by default (bit-exact for every dtype), lossy only on request."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DTYPE_NAMES, make_tensor, raw_bytes, tensor_cases
from hypothesis import event, given, settings, strategies as st

from coral_torch.errors import CoralError, DeltaError, IntegrityError
from coral_torch.format import codec
from coral_torch.format.delta import Delta, DeltaConfig, DeltaEncoder, DeltaType
from coral_torch.format.weight_tensor import WeightMetadata, WeightTensor


def _bits_perturbed(t: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """A copy of ``t`` with the lowest bit of about ``fraction`` of its elements flipped (any dtype)."""
    out = t.clone()
    width = t.element_size()
    raw = out.reshape(-1).view(torch.uint8).numpy().reshape(-1, width)
    rng = np.random.default_rng(seed)
    idx = rng.choice(raw.shape[0], size=max(1, int(raw.shape[0] * fraction)), replace=False)
    raw[idx, 0] ^= 1
    return out


def _roundtrip(target: torch.Tensor, reference: torch.Tensor, enc: DeltaEncoder | None = None) -> Delta:
    enc = enc or DeltaEncoder()
    tw, rw = WeightTensor(target), WeightTensor(reference)
    delta = enc.encode(tw, rw)
    rebuilt = enc.reconstruct(delta, WeightTensor(reference), name="x")
    assert rebuilt.dtype == tw.dtype and rebuilt.shape == tw.shape
    assert rebuilt.raw.tobytes() == raw_bytes(target)
    assert raw_bytes(rebuilt.to_torch()) == raw_bytes(target)
    assert rebuilt.compute_hash() == tw.compute_hash()
    assert rebuilt.metadata.name == "x"
    return delta


# ---------------------------------------------------------------------------------- lossless
def test_default_config_is_lossless_xor():
    config = DeltaConfig()
    assert config.delta_type is DeltaType.XOR and config.delta_type.lossless and not config.allow_lossy
    assert DeltaEncoder().config.delta_type is DeltaType.XOR


def test_xor_bit_exact_every_dtype_and_layout(dtype_name):
    for label, t in tensor_cases(dtype_name):
        if t.numel() == 0:
            continue
        # unrelated reference (random bits everywhere) and a near copy
        other = make_tensor(t.dtype, tuple(t.shape), seed=99)
        d = _roundtrip(t, other)
        assert d.lossless and d.delta_type is DeltaType.XOR
        _roundtrip(t, _bits_perturbed(t.resolve_conj().resolve_neg().contiguous(), 0.05))
        _roundtrip(t, t)  # identical


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                   torch.float8_e4m3fn, torch.float8_e5m2])
def test_xor_bit_exact_for_float_widths_with_specials(dtype):
    """NaN payloads, -0.0 and infinities on either side; value-level perturbation like an SGD step."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(48, 50, generator=g, dtype=torch.float64) * 0.05
    ref = base.to(dtype)
    tgt = (base - 1e-3 * torch.randn(48, 50, generator=g, dtype=torch.float64)).to(dtype)
    specials = make_tensor(dtype, (7,), seed=0).reshape(-1)  # NaN payloads / -0 / inf first
    ref.reshape(-1)[:7] = specials
    tgt.reshape(-1)[10:17] = specials
    _roundtrip(tgt, ref)
    _roundtrip(ref, tgt)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool])
def test_xor_bit_exact_for_ints(dtype):
    a = make_tensor(dtype, (33, 31), seed=1)
    b = make_tensor(dtype, (33, 31), seed=2)
    _roundtrip(a, b)
    if dtype is not torch.bool:
        _roundtrip(a + 1 if dtype is not torch.uint8 else a ^ 1, a)


_WORD_DTYPES = {1: "uint8", 2: "int16", 4: "float32", 8: "float64", 16: "complex128"}


@settings(max_examples=150, deadline=None)
@given(data=st.data(), itemsize=st.sampled_from(sorted(_WORD_DTYPES)), n=st.integers(1, 400))
def test_xor_round_trip_random_bytes(data, itemsize, n):
    ref = np.frombuffer(data.draw(st.binary(min_size=n * itemsize, max_size=n * itemsize)), np.uint8).copy()
    if data.draw(st.booleans()):
        tgt = np.frombuffer(data.draw(st.binary(min_size=n * itemsize, max_size=n * itemsize)), np.uint8).copy()
    else:  # a few flipped bytes
        tgt = ref.copy()
        for pos, mask in data.draw(st.lists(st.tuples(st.integers(0, n * itemsize - 1), st.integers(1, 255)),
                                            max_size=8)):
            tgt[pos] ^= mask
    meta = WeightMetadata(name="", shape=(n,), dtype=_WORD_DTYPES[itemsize])
    rw, tw = WeightTensor.from_raw(ref, meta), WeightTensor.from_raw(tgt, meta)
    enc = DeltaEncoder()
    delta = enc.encode(tw, rw)
    assert enc.reconstruct(delta, rw).raw.tobytes() == tgt.tobytes()
    assert rw.raw.tobytes() == ref.tobytes() and tw.raw.tobytes() == tgt.tobytes()  # inputs untouched


def test_zero_dim_tensors():
    for dtype in (torch.float32, torch.bfloat16, torch.complex128, torch.bool):
        _roundtrip(make_tensor(dtype, (), seed=1), make_tensor(dtype, (), seed=2))


# ------------------------------------------------------------------------------------ size
def test_sparse_change_gives_tiny_delta():
    g = torch.Generator().manual_seed(2)
    ref = torch.randn(256, 256, generator=g) * 0.02
    tgt = ref.clone()
    tgt.reshape(-1)[::100] += 1e-3  # 1% of the elements change
    d = _roundtrip(tgt, ref)
    raw = tgt.numel() * 4
    assert d.nbytes < 0.05 * raw
    assert d.compression_ratio == pytest.approx(d.nbytes / raw)
    assert _roundtrip(ref, ref).nbytes < 0.01 * raw


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 0.6), (torch.float16, 0.3), (torch.bfloat16, 0.15),
                                          (torch.float64, 0.8)])
def test_slightly_perturbed_copy_gives_much_smaller_delta(dtype, bound):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(256, 256, generator=g, dtype=torch.float64) * 0.02
    ref = base.to(dtype)
    tgt = (base * (1 + 1e-3 * torch.randn(256, 256, generator=g, dtype=torch.float64))).to(dtype)
    assert not torch.equal(ref, tgt)
    d = _roundtrip(tgt, ref)
    raw = tgt.numel() * tgt.element_size()
    assert d.nbytes < bound * raw
    # and smaller than storing the target whole with the codec
    own = len(codec.encode(WeightTensor(tgt).raw, tgt.element_size()))
    assert d.nbytes < own


# --------------------------------------------------------------------------------- refusals
def test_mismatched_dtype_or_shape_is_refused():
    enc = DeltaEncoder()
    a = WeightTensor(torch.zeros(4, 5))
    for other in (torch.zeros(5, 4), torch.zeros(20), torch.zeros(4, 5, dtype=torch.int32),
                  torch.zeros(4, 5, dtype=torch.float64)):
        ow = WeightTensor(other)
        assert not enc.can_encode(a, ow)
        with pytest.raises(DeltaError):
            enc.encode(a, ow)
    empty = WeightTensor(torch.zeros(0, 5))
    assert not enc.can_encode(empty, empty)
    with pytest.raises(DeltaError):
        enc.encode(empty, empty)
    d = enc.encode(a, a)
    for other in (torch.zeros(5, 4), torch.zeros(4, 5, dtype=torch.int32)):
        with pytest.raises(DeltaError):
            enc.reconstruct(d, WeightTensor(other))


def test_wrong_reference_with_same_shape_is_refused():
    """The delta names its reference by hash; applying it to another tensor must not silently
    produce garbage (lossy deltas are never hash-verified afterwards)."""
    g = torch.Generator().manual_seed(4)
    ref, tgt, other = (torch.randn(16, 16, generator=g) for _ in range(3))
    for config in (DeltaConfig(), DeltaConfig(delta_type="int8_quantized", allow_lossy=True),
                   DeltaConfig(delta_type="sparse", allow_lossy=True)):
        enc = DeltaEncoder(config)
        d = enc.encode(WeightTensor(tgt), WeightTensor(ref))
        with pytest.raises(DeltaError, match="reference"):
            enc.reconstruct(d, WeightTensor(other))


def test_damaged_delta_payload_is_not_silently_applied():
    g = torch.Generator().manual_seed(5)
    ref = torch.randn(64, 64, generator=g)
    tgt = ref + 1e-3 * torch.randn(64, 64, generator=g)
    enc = DeltaEncoder()
    d = enc.encode(WeightTensor(tgt), WeightTensor(ref))
    data = bytes(memoryview(d.data).cast("B"))
    truncated = Delta(d.delta_type, data[:-1], d.original_shape, d.original_dtype, d.reference_hash)
    with pytest.raises(IntegrityError):
        enc.reconstruct(truncated, WeightTensor(ref))
    target_hash = WeightTensor(tgt).compute_hash()
    for pos in (len(data) // 2, len(data) - 1):
        bad = bytearray(data)
        bad[pos] ^= 0x01
        damaged = Delta(d.delta_type, bytes(bad), d.original_shape, d.original_dtype, d.reference_hash)
        try:
            rebuilt = enc.reconstruct(damaged, WeightTensor(ref))
        except IntegrityError:
            continue
        assert rebuilt.compute_hash() != target_hash  # the caller's hash check catches it


# ------------------------------------------------------------------------------------ lossy
@pytest.mark.parametrize("kind", ["int8_quantized", "sparse", DeltaType.INT8_QUANTIZED])
def test_lossy_types_need_explicit_opt_in(kind):
    with pytest.raises(DeltaError, match="allow_lossy"):
        DeltaConfig(delta_type=kind)
    assert issubclass(DeltaError, CoralError)


def test_config_validation():
    with pytest.raises(ValueError):
        DeltaConfig(delta_type="bogus")
    with pytest.raises(DeltaError):
        DeltaConfig(max_chain_length=-1)
    assert DeltaConfig(max_chain_length=0).max_chain_length == 0


def test_int8_quantized_with_opt_in_is_marked_lossy_and_close():
    g = torch.Generator().manual_seed(6)
    ref = torch.randn(64, 64, generator=g)
    tgt = ref + 0.01 * torch.randn(64, 64, generator=g)
    enc = DeltaEncoder(DeltaConfig(delta_type="int8_quantized", allow_lossy=True))
    d = enc.encode(WeightTensor(tgt), WeightTensor(ref))
    assert d.delta_type is DeltaType.INT8_QUANTIZED and d.lossless is False
    assert not DeltaType.INT8_QUANTIZED.lossless and not DeltaType.SPARSE.lossless
    assert d.reference_hash == WeightTensor(ref).compute_hash()
    rebuilt = enc.reconstruct(d, WeightTensor(ref)).to_torch()
    assert rebuilt.dtype == torch.float32 and rebuilt.shape == tgt.shape
    scale = d.extra["scale"]
    assert (rebuilt - tgt).abs().max() <= scale / 2 + 1e-6
    assert d.nbytes < tgt.numel()  # at most one byte per element


def test_sparse_with_opt_in_keeps_large_changes():
    g = torch.Generator().manual_seed(7)
    ref = torch.randn(40, 40, generator=g, dtype=torch.float64)
    tgt = ref.clone()
    tgt[3, 4] += 0.5
    tgt[10, 11] += 1e-9  # below the threshold: dropped
    enc = DeltaEncoder(DeltaConfig(delta_type="sparse", allow_lossy=True, sparse_threshold=1e-6))
    d = enc.encode(WeightTensor(tgt), WeightTensor(ref))
    assert d.lossless is False and d.extra["count"] == 1
    rebuilt = enc.reconstruct(d, WeightTensor(ref)).to_torch()
    assert torch.allclose(rebuilt, tgt, atol=1e-6)
    assert rebuilt[10, 11] == ref[10, 11]


def test_lossy_types_refuse_non_float_dtypes():
    enc = DeltaEncoder(DeltaConfig(delta_type="int8_quantized", allow_lossy=True))
    for dtype in (torch.int32, torch.float8_e4m3fn, torch.complex64, torch.bool):
        a = WeightTensor(make_tensor(dtype, (8, 8), seed=1))
        b = WeightTensor(make_tensor(dtype, (8, 8), seed=2))
        assert not enc.can_encode(a, b)
        with pytest.raises(DeltaError):
            enc.encode(a, b)


def test_delta_normalises_fields():
    d = Delta("xor", b"", [2, 3], np.float32, "abc")
    assert d.delta_type is DeltaType.XOR and d.original_shape == (2, 3) and d.original_dtype == "float32"
    assert d.lossless and d.nbytes == 0


# ------------------------------------------------------------------------------- FLOAT32_RAW
_F32_RAW = DeltaConfig(delta_type=DeltaType.FLOAT32_RAW)


def _f32(bits: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(bits, dtype=np.uint32).view(np.float32)


def _check_float32_raw_round_trip(tgt: np.ndarray, ref: np.ndarray) -> Delta:
    """Encode with FLOAT32_RAW and check reconstruction is bit-exact through every reference form."""
    enc = DeltaEncoder(_F32_RAW)
    tw, rw = WeightTensor(tgt), WeightTensor(ref)
    d = enc.encode(tw, rw)
    assert d.lossless and d.delta_type in (DeltaType.FLOAT32_RAW, DeltaType.XOR)
    assert enc.reconstruct(d, rw).raw.tobytes() == tgt.tobytes()
    assert enc.reconstruct(d, ref).tobytes() == tgt.tobytes()
    assert raw_bytes(enc.reconstruct(d, torch.from_numpy(ref.copy()))) == tgt.tobytes()
    if d.delta_type is DeltaType.FLOAT32_RAW:
        diff = d.data
        assert isinstance(diff, np.ndarray) and diff.dtype == np.float32 and diff.shape == tgt.shape
        assert d.extra == {"target_hash": tw.compute_hash()} and d.compression_ratio == pytest.approx(1.0)
        with np.errstate(all="ignore"):
            assert np.add(ref, diff, dtype=np.float32).tobytes() == tgt.tobytes()
        for a in (ref, diff, tgt):  # only finite, normal (or zero) values ever take this path
            assert np.all(np.isfinite(a)) and not np.any((a != 0) & (np.abs(a) < np.finfo(np.float32).tiny))
    return d


def test_float32_raw_is_lossless_and_needs_no_opt_in():
    assert DeltaType.FLOAT32_RAW.lossless and DeltaType("float32_raw") is DeltaType.FLOAT32_RAW
    assert DeltaConfig(delta_type="float32_raw").delta_type is DeltaType.FLOAT32_RAW


def test_float32_raw_used_where_exact():
    """Same-sign values within a factor 2 subtract exactly (Sterbenz), so the sum gives them back."""
    g = np.random.default_rng(0)
    ref = (g.standard_normal((64, 48)) * 0.02).astype(np.float32)
    tgt = (ref * (1 + 1e-3 * g.standard_normal((64, 48)))).astype(np.float32)
    ref[0, :4] = tgt[0, :4] = [0.0, -0.0, 1.0, -2.5]  # zeros of both signs, unchanged values
    d = _check_float32_raw_round_trip(tgt, ref)
    assert d.delta_type is DeltaType.FLOAT32_RAW
    assert d.original_dtype == np.float32 and d.nbytes == tgt.nbytes


@pytest.mark.parametrize("case", ["rounding", "nan", "inf", "subnormal-target", "subnormal-diff", "nan-payload"])
def test_float32_raw_falls_back_to_xor_when_not_exact(case):
    g = np.random.default_rng(1)
    ref = (g.standard_normal(300) * 0.02).astype(np.float32)
    tgt = (ref * (1 + 1e-3 * g.standard_normal(300))).astype(np.float32)
    if case == "rounding":  # 1.0 + (1e-8 - 1.0) rounds to 0.0 in float32
        ref[7], tgt[7] = 1.0, 1e-8
    elif case == "nan":
        tgt[3] = np.nan
    elif case == "inf":
        ref[5] = np.inf
    elif case == "subnormal-target":
        tgt[9] = _f32(np.array([1], np.uint32))[0]
    elif case == "subnormal-diff":  # two neighbours of the smallest normal differ by a subnormal
        ref[2] = np.finfo(np.float32).tiny
        tgt[2] = np.nextafter(ref[2], np.float32(1))
    else:
        tgt.view(np.uint32)[4] = 0x7FC00123
    d = _check_float32_raw_round_trip(tgt, ref)
    assert d.delta_type is DeltaType.XOR


@pytest.mark.parametrize("dtype_name", [n for n in DTYPE_NAMES if n != "float32"])
def test_float32_raw_falls_back_to_xor_for_other_dtypes(dtype_name):
    enc = DeltaEncoder(_F32_RAW)
    ref = make_tensor(dtype_name, (9, 7), seed=1)
    tgt = make_tensor(dtype_name, (9, 7), seed=2)
    d = enc.encode(WeightTensor(tgt), WeightTensor(ref))
    assert d.delta_type is DeltaType.XOR and isinstance(d.data, bytes)
    assert raw_bytes(enc.reconstruct(d, WeightTensor(ref)).to_torch()) == raw_bytes(tgt)


_F32_SPECIAL_BITS = [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001,
                     0x00000001, 0x807FFFFF, 0x00800000, 0x7F7FFFFF, 0x3F800000]


@settings(max_examples=200, deadline=None)
@given(data=st.data(), n=st.integers(1, 64))
def test_float32_raw_reconstruct_is_always_bit_exact(data, n):
    """Random float32 bit patterns (NaN payloads, +-inf, -0.0, subnormals) and near copies:
    whatever the encoder chooses, reconstruction gives the target's exact bits."""
    word = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from(_F32_SPECIAL_BITS))
    if data.draw(st.booleans()):  # any bits
        ref = _f32(np.array(data.draw(st.lists(word, min_size=n, max_size=n)), np.uint32))
    else:  # normal values only, so that the exact float32 path is taken often
        mag = st.floats(2.0**-100, 2.0**100, width=32)
        normal = st.one_of(mag, mag.map(lambda x: -x), st.sampled_from([0.0, -0.0]))
        ref = np.array(data.draw(st.lists(normal, min_size=n, max_size=n)), np.float32)
    mode = data.draw(st.sampled_from(["random", "scaled", "few-changed"]))
    if mode == "random":
        tgt = _f32(np.array(data.draw(st.lists(word, min_size=n, max_size=n)), np.uint32))
    elif mode == "scaled":
        factor = data.draw(st.floats(0.5, 2.0, width=32))
        with np.errstate(all="ignore"):
            tgt = (ref * np.float32(factor)).astype(np.float32)
    else:
        tgt = ref.copy()
        for pos, bits in data.draw(st.lists(st.tuples(st.integers(0, n - 1), word), max_size=4)):
            tgt.view(np.uint32)[pos] = bits
    d = _check_float32_raw_round_trip(tgt, ref)
    event(f"delta {d.delta_type.value}")


def test_float32_raw_hand_built_delta_reconstructs_reference_plus_data():
    g = np.random.default_rng(2)
    ref = g.standard_normal((8, 8)).astype(np.float32)
    diff = (g.standard_normal((8, 8)) * 1e-3).astype(np.float32)
    expected = np.add(ref, diff, dtype=np.float32)
    rh = WeightTensor(ref).compute_hash()
    enc = DeltaEncoder()
    for data in (diff, diff.reshape(-1), diff.astype(">f4"), diff.tobytes(), bytearray(diff.tobytes())):
        d = Delta(delta_type=DeltaType.FLOAT32_RAW, data=data, original_shape=(8, 8), original_dtype=np.float32,
                  reference_hash=rh, compression_ratio=0.95)
        out = enc.reconstruct(d, ref)
        assert out.dtype == np.float32 and out.shape == (8, 8) and out.tobytes() == expected.tobytes()
        assert enc.reconstruct(d, WeightTensor(ref), name="w").metadata.name == "w"


def test_float32_raw_bad_payloads_are_refused():
    ref = np.ones((4, 4), np.float32)
    rh = WeightTensor(ref).compute_hash()
    enc = DeltaEncoder()
    for data, match in ((np.ones(15, np.float32), "elements"), (np.ones(16, np.float64), "float32 array"),
                        (b"\0" * 63, "bytes")):
        with pytest.raises(DeltaError, match=match):
            enc.reconstruct(Delta("float32_raw", data, (4, 4), "float32", rh), ref)
    href = WeightTensor(ref.astype(np.float64)).compute_hash()
    with pytest.raises(DeltaError, match="float32 tensors"):
        enc.reconstruct(Delta("float32_raw", np.ones(16, np.float32), (4, 4), "float64", href),
                        ref.astype(np.float64))


def test_float32_raw_target_hash_is_checked():
    g = np.random.default_rng(3)
    ref = (g.standard_normal(100) * 0.02).astype(np.float32)
    tgt = (ref * 1.001).astype(np.float32)
    enc = DeltaEncoder(_F32_RAW)
    d = enc.encode(WeightTensor(tgt), WeightTensor(ref))
    assert d.delta_type is DeltaType.FLOAT32_RAW
    bad = d.data.copy()
    bad[50] += np.float32(0.5)  # changes the sum (a change below the result's ulp would not)
    with pytest.raises(IntegrityError, match="not its target"):
        enc.reconstruct(Delta(d.delta_type, bad, d.original_shape, d.original_dtype, d.reference_hash,
                              extra=dict(d.extra)), ref)


# ---------------------------------------------------------------------- reference forms
def test_reconstruct_accepts_array_and_tensor_references(dtype_name):
    """``reconstruct(delta, reference.data)``: the array form of WeightTensor.data (raw unsigned bits
    for bfloat16/float8) works like the WeightTensor, and the result comes back in the same form."""
    enc = DeltaEncoder()
    ref_t = make_tensor(dtype_name, (6, 5), seed=3)
    tgt_t = make_tensor(dtype_name, (6, 5), seed=4)
    ref, tgt = WeightTensor(ref_t), WeightTensor(tgt_t)
    d = enc.encode(tgt, ref)
    out = enc.reconstruct(d, ref.data)
    assert isinstance(out, np.ndarray)
    assert out.dtype == tgt.data.dtype and out.shape == tgt.shape and out.tobytes() == tgt.raw.tobytes()
    assert WeightTensor(out, WeightMetadata(name="t", shape=out.shape, dtype=d.original_dtype)) == tgt
    back = enc.reconstruct(d, ref_t)
    assert isinstance(back, torch.Tensor) and back.dtype == tgt_t.dtype and raw_bytes(back) == raw_bytes(tgt_t)
    assert ref.raw.tobytes() == raw_bytes(ref_t)  # the reference is left alone


def test_reconstruct_refuses_unusable_references():
    enc = DeltaEncoder()
    ref = WeightTensor(np.arange(12, dtype=np.float32).reshape(3, 4))
    d = enc.encode(WeightTensor(np.ones((3, 4), np.float32)), ref)
    with pytest.raises(DeltaError, match="dtype float32"):
        enc.reconstruct(d, ref.data.view(np.int32))  # same size, wrong type: not silently reinterpreted
    with pytest.raises(DeltaError, match="reference"):
        enc.reconstruct(d, ref.data.reshape(-1))
    with pytest.raises(DeltaError, match="WeightTensor, a numpy array or a torch tensor"):
        enc.reconstruct(d, ref.data.tolist())
    with pytest.raises(DeltaError, match="made against"):
        enc.reconstruct(d, ref.data + 1)
    bf = WeightTensor(torch.ones(4, dtype=torch.bfloat16))
    dbf = enc.encode(bf, bf)
    with pytest.raises(DeltaError, match="raw bits"):
        enc.reconstruct(dbf, np.ones(4, np.float16))


def test_delta_data_forms_and_equality():
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    d = Delta("float32_raw", arr, (2, 3), torch.float32, "h")
    assert d.nbytes == 24 and d.original_nbytes == 24 and d.original_dtype == np.float32
    assert d == Delta("float32_raw", arr.copy(), (2, 3), "float32", "h")
    assert d != Delta("float32_raw", arr.tobytes(), (2, 3), "float32", "h")  # array vs bytes
    assert d != Delta("float32_raw", arr + 1, (2, 3), "float32", "h")
    assert Delta("xor", memoryview(b"abc"), (1,), "int8", "h").nbytes == 3
    with pytest.raises(DeltaError, match="numpy"):
        Delta("float32_raw", torch.ones(6), (6,), "float32", "h")
    with pytest.raises(DeltaError, match="bytes or a numpy array"):
        Delta("xor", [1, 2], (2,), "int8", "h")


# -------------------------------------------------------------------------- Deduplicator
def _similar_pair(seed: int = 0, shape=(128, 64)):
    g = np.random.default_rng(seed)
    a = (g.standard_normal(shape) * 0.02).astype(np.float32)
    b = a.copy()
    idx = g.choice(a.size, a.size // 100, replace=False)  # 1% of the values move by one ulp
    b.reshape(-1)[idx] = np.nextafter(b.reshape(-1)[idx], np.float32(1))
    return WeightTensor(a, name="a"), WeightTensor(b, name="b")


def test_deduplicator_result_is_a_mapping_of_what_to_store_whole(tmp_path):
    from coral_torch.dedup import Deduplicator
    from coral_torch.storage.hdf5_store import HDF5Store

    wa, wb = _similar_pair()
    other = WeightTensor(np.arange(10, dtype=np.int64))
    dedup = Deduplicator(similarity_threshold=0.98, delta_config=DeltaConfig(), enable_delta_encoding=True)
    result = dedup.deduplicate({"a": wa, "b": wb, "c": other, "a2": wa})
    assert dict(result) == {"a": wa, "c": other} == result.unique and len(result) == 2 and "b" not in result
    assert list(result.deltas) == [wb.compute_hash()] and result.duplicates == {"a2": wa.compute_hash()}
    delta = result.deltas[wb.compute_hash()]
    assert delta.lossless and delta.reference_hash == wa.compute_hash()
    with HDF5Store(tmp_path / "s.h5") as store:
        assert store.store_batch(result) == {"a": wa.compute_hash(), "c": other.compute_hash()}
        for h, d in result.deltas.items():
            store.store_delta(d, h)
        loaded = store.load_delta(wb.compute_hash())
        ref = store.load(loaded.reference_hash)
        assert DeltaEncoder().reconstruct(loaded, ref.data).tobytes() == wb.raw.tobytes()
        # storage=: what the store holds counts as known
        again = Deduplicator(storage=store).deduplicate({"a": wa, "c": other, "n": WeightTensor(np.zeros(3))})
        assert dict(again) == {"n": again["n"]} and set(again.duplicates) == {"a", "c"}


def test_deduplicator_with_float32_raw_config_is_lossless():
    from coral_torch.dedup import Deduplicator

    g = np.random.default_rng(5)
    a = (g.standard_normal((64, 64)) * 0.02).astype(np.float32)
    b = (a * np.float32(1.0001)).astype(np.float32)
    wa, wb = WeightTensor(a), WeightTensor(b)
    result = Deduplicator(delta_config=_F32_RAW).deduplicate({"b": wb}, parent={"b": wa})
    for h, d in result.deltas.items():  # a delta only where it pays and is lossless
        assert d.lossless and DeltaEncoder().reconstruct(d, wa) == wb
    assert set(result.unique) | {n for n, h in result.name_to_hash.items() if h in result.deltas} == {"b"}


@pytest.mark.parametrize("bad", [..., "0.98", 1.5, -2, True])
def test_deduplicator_refuses_a_bad_threshold(bad):
    from coral_torch.dedup import Deduplicator

    with pytest.raises(DeltaError, match="similarity_threshold"):
        Deduplicator(similarity_threshold=bad)
    with pytest.raises(DeltaError, match="not both"):
        Deduplicator(exists=lambda h: False, storage=object())
