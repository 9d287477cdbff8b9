"""Delta encoding: lossless XOR by default (bit-exact for every dtype), lossy only on request."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tensor, raw_bytes, tensor_cases
from hypothesis import given, settings
from hypothesis import strategies as st

from coral_torch import codec
from coral_torch.delta import Delta, DeltaConfig, DeltaEncoder, DeltaType
from coral_torch.errors import CoralError, DeltaError, IntegrityError
from coral_torch.weight_tensor import WeightMetadata, WeightTensor


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
