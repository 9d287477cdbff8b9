"""WeightTensor / WeightMetadata / dtypes: bytes kept exactly, content hash, clear refusals."""

from __future__ import annotations

import dataclasses
import json
import pickle

import numpy as np
import pytest
import torch
from conftest import DTYPE_NAMES, make_tensor, raw_bytes, tensor_cases
from hypothesis import given, settings, strategies as st

from coral_torch.errors import CoralError, UnsupportedTensorError
from coral_torch.format import dtypes
from coral_torch.format.weight_tensor import HASH_HEX_LENGTH, WeightMetadata, WeightTensor


# ------------------------------------------------------------------------------------ dtypes
def test_every_required_dtype_is_supported():
    for name in DTYPE_NAMES:
        assert dtypes.canonical_dtype(name) == name
        assert dtypes.canonical_dtype(getattr(torch, name)) == name
        assert dtypes.itemsize(name) == torch.empty((), dtype=getattr(torch, name)).element_size()
        assert dtypes.storage_numpy_dtype(name).itemsize == dtypes.itemsize(name)
        assert dtypes.torch_dtype(name) is getattr(torch, name)


@pytest.mark.parametrize(
    "np_dtype, name",
    [
        (np.float32, "float32"), (np.float64, "float64"), (np.float16, "float16"),
        (np.int8, "int8"), (np.int16, "int16"), (np.int32, "int32"), (np.int64, "int64"),
        (np.uint8, "uint8"), (np.uint16, "uint16"), (np.bool_, "bool"),
        (np.complex64, "complex64"), (np.complex128, "complex128"),
    ],
)
def test_numpy_dtypes_map_to_canonical_names(np_dtype, name):
    assert dtypes.canonical_dtype(np.dtype(np_dtype)) == name
    assert dtypes.canonical_dtype(np_dtype) == name


@pytest.mark.parametrize("bad", [np.dtype(">f4"), np.dtype(object), np.dtype("U3"), "bf17", torch.complex32])
def test_unsupported_dtypes_are_refused(bad):
    with pytest.raises(UnsupportedTensorError):
        dtypes.canonical_dtype(bad)


# --------------------------------------------------------------------------- bytes in, bytes out
def test_torch_round_trip_bit_exact_every_dtype_and_layout(dtype_name):
    for label, t in tensor_cases(dtype_name):
        w = WeightTensor(t, name=label)
        assert w.dtype == dtypes.canonical_dtype(t.dtype), label
        assert w.shape == tuple(t.shape), label
        assert w.raw.dtype == np.uint8 and w.raw.ndim == 1 and w.raw.flags.c_contiguous
        assert w.raw.tobytes() == raw_bytes(t), label
        back = w.to_torch()
        assert back.dtype == t.dtype and tuple(back.shape) == tuple(t.shape), label
        assert raw_bytes(back) == raw_bytes(t), label


def test_nan_payloads_and_negative_zero_survive():
    bits = np.array([0x7FC00001, 0xFFA5A5A5, 0x7F800001, 0x80000000], dtype=np.uint32)
    t = torch.from_numpy(bits.copy()).view(torch.float32)
    w = WeightTensor(t)
    assert w.raw.view(np.uint32).tolist() == bits.tolist()
    assert w.to_torch().view(torch.int32).numpy().view(np.uint32).tolist() == bits.tolist()
    assert np.signbit(w.data[3]) and w.data[3] == 0.0


def test_conj_and_neg_bits_are_resolved():
    g = torch.Generator().manual_seed(7)
    c = torch.complex(torch.randn(8, 9, generator=g), torch.randn(8, 9, generator=g))
    conj = c.conj()
    assert conj.is_conj()
    w = WeightTensor(conj)
    assert torch.equal(w.to_torch(), c.conj_physical())
    neg = c.conj().imag
    assert neg.is_neg()
    assert torch.equal(WeightTensor(neg).to_torch(), -c.imag)


def test_numpy_input_bit_exact_and_non_contiguous(rng):
    a = rng.standard_normal((12, 17)).astype(np.float32)
    a.view(np.uint32)[0, :3] = [0x7FC00001, 0xFF800001, 0x80000000]
    for arr in (a, a.T, a[::3, 1::2], np.asarray(a[2, 3])):
        w = WeightTensor(arr)
        assert w.dtype == "float32" and w.shape == arr.shape
        assert w.raw.tobytes() == np.ascontiguousarray(arr).tobytes()
        assert w.data.tobytes() == np.ascontiguousarray(arr).tobytes()
        assert raw_bytes(w.to_torch()) == np.ascontiguousarray(arr).tobytes()


@pytest.mark.parametrize("np_dtype", [np.float16, np.float64, np.int8, np.int16, np.int32, np.int64,
                                      np.uint8, np.bool_, np.complex64, np.complex128])
def test_numpy_input_every_numpy_dtype(np_dtype, rng):
    raw = rng.integers(0, 256, size=7 * 5 * np.dtype(np_dtype).itemsize, dtype=np.uint8)
    arr = raw.view(np_dtype).reshape(7, 5) if np_dtype is not np.bool_ else (raw % 2).astype(bool).reshape(7, 5)
    w = WeightTensor(arr)
    assert w.raw.tobytes() == arr.tobytes()
    assert raw_bytes(w.to_torch()) == arr.tobytes()
    assert w.compute_hash() == WeightTensor(torch.from_numpy(arr.copy())).compute_hash()


@pytest.mark.parametrize("name", ["bfloat16", "float8_e4m3fn", "float8_e5m2"])
def test_raw_unsigned_numpy_with_metadata_dtype(name, rng):
    t = make_tensor(name, (6, 10), seed=3)
    bits = t.view(torch.uint16 if name == "bfloat16" else torch.uint8).numpy().copy()
    w = WeightTensor(data=bits, metadata=WeightMetadata(name="w", shape=(6, 10), dtype=name))
    assert w.dtype == name
    assert w.raw.tobytes() == raw_bytes(t)
    back = w.to_torch()
    assert back.dtype == getattr(torch, name)
    assert raw_bytes(back) == raw_bytes(t)
    # same content, same address, whichever way it came in
    assert w.compute_hash() == WeightTensor(t).compute_hash()


def test_metadata_normalises_and_describes():
    m = WeightMetadata(name="fc.weight", shape=[3, 4], dtype=np.float32, layer_type="Linear", model_name="m")
    assert m.shape == (3, 4) and m.dtype == "float32"
    assert m.numel == 12 and m.nbytes == 48
    assert WeightMetadata(name="s", shape=(), dtype=torch.bfloat16).nbytes == 2
    assert WeightMetadata(name="e", shape=(0, 5), dtype="float64").nbytes == 0
    w = WeightTensor(np.zeros((3, 4), np.float32), m)
    assert w.metadata is m and w.size == 12 and w.nbytes == 48
    assert "fc.weight" in repr(w)


@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_metadata_dtype_equals_numpy_torch_and_name(name):
    """WeightMetadata(dtype=np.float32).dtype == np.float32, == torch.float32, == "float32"."""
    tdt = getattr(torch, name)
    for given in [name, tdt] + ([np.dtype(dtypes.storage_numpy_dtype(name))] if dtypes.has_numpy_dtype(name) else []):
        d = WeightMetadata(name="x", shape=(2,), dtype=given).dtype
        assert isinstance(d, str) and str(d) == name and type(str(d)) is str
        assert d == name and name == d and not (d != name)
        assert d == tdt and tdt == d and not (d != tdt)
        assert hash(d) == hash(name) and {name: 1}[d] == 1 and d in {name} and name in {d}
        if dtypes.has_numpy_dtype(name):
            npdt = dtypes.storage_numpy_dtype(name)
            assert d == npdt and npdt == d and d == npdt.type and npdt.type == d
            assert np.dtype(d) == npdt
        else:  # bfloat16/float8: no numpy dtype; the raw unsigned storage dtype is not them
            assert d != dtypes.storage_numpy_dtype(name) and dtypes.storage_numpy_dtype(name) != d
        assert repr(d) == repr(name)
        assert json.loads(json.dumps({"dtype": d})) == {"dtype": name}
        assert type(json.loads(json.dumps(d))) is str
        back = pickle.loads(pickle.dumps(d))
        assert back == d and back == tdt and type(back) is type(d)


def test_metadata_dtype_inequalities():
    d = WeightMetadata(name="x", shape=(2,), dtype=np.float32).dtype
    assert d != np.float64 and d != torch.float16 and d != "float64" and d != np.dtype("int32")
    # strings compare exactly (equal strings hash alike); other objects are never a dtype
    assert d != "f4" and d != "<f4" and d != "Float32"
    assert d != None and d != float and d != 4 and d != object()  # noqa: E711
    assert not (d == None)  # noqa: E711 - np.dtype(None) would be float64
    m = WeightMetadata(name="x", shape=(2,), dtype=np.float32)
    assert m == WeightMetadata(name="x", shape=(2,), dtype="float32") == WeightMetadata(name="x", shape=(2,), dtype=torch.float32)
    assert dataclasses.asdict(m)["dtype"] == "float32"
    assert json.loads(json.dumps(dataclasses.asdict(m)))["dtype"] == "float32"
    w = WeightTensor(np.zeros(2, np.float32), m)
    assert w.dtype == np.float32 and w.dtype == torch.float32 and w.dtype == "float32"


def test_metadata_of_the_wrong_type_is_refused():
    for bad in (..., {"name": "x"}, "float32"):
        with pytest.raises(UnsupportedTensorError, match="WeightMetadata"):
            WeightTensor(np.zeros(2, np.float32), bad)
    w = WeightTensor(np.zeros(2, np.float32))
    with pytest.raises(UnsupportedTensorError, match="already a WeightTensor"):
        WeightTensor(w)


# ------------------------------------------------------------------------------------ refusals
@pytest.mark.filterwarnings("ignore::UserWarning")  # quantized / complex32 creation warn in torch
def test_refusals_are_clear():
    with pytest.raises(UnsupportedTensorError, match="to_dense"):
        WeightTensor(torch.eye(3).to_sparse())
    with pytest.raises(UnsupportedTensorError, match="meta"):
        WeightTensor(torch.empty(3, device="meta"))
    with pytest.raises(UnsupportedTensorError, match="quantized"):
        WeightTensor(torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8))
    with pytest.raises(UnsupportedTensorError):
        WeightTensor(torch.ones(3, dtype=torch.complex32))
    with pytest.raises(UnsupportedTensorError, match="metadata says dtype"):
        WeightTensor(torch.ones(3), WeightMetadata(name="x", shape=(3,), dtype="float64"))
    with pytest.raises(UnsupportedTensorError, match="shape"):
        WeightTensor(torch.ones(3), WeightMetadata(name="x", shape=(4,), dtype="float32"))
    with pytest.raises(UnsupportedTensorError, match="raw bits"):
        WeightTensor(np.ones(3, np.float32), WeightMetadata(name="x", shape=(3,), dtype="bfloat16"))
    with pytest.raises(UnsupportedTensorError, match="big-endian"):
        WeightTensor(np.ones(3, ">f4"))
    with pytest.raises(UnsupportedTensorError):
        WeightTensor(np.array(["a", "b"], dtype=object))
    with pytest.raises(UnsupportedTensorError):
        WeightTensor.from_raw(np.zeros(7, np.uint8), WeightMetadata(name="x", shape=(2,), dtype="float32"))
    assert issubclass(UnsupportedTensorError, CoralError)


def test_empty_and_one_element_views_with_any_strides():
    """A view of 0 or 1 element is 'contiguous' whatever its strides (x[3:3:2], x[1:2:2] have
    stride 2), which torch will not view as bytes: still stored, and hashed as a fresh tensor."""
    x = torch.randn(2, 3, 4)
    for t in (x.reshape(-1)[3:3:2], x.reshape(-1)[1:2:2], x[0, :, 2:2:3], x.permute(2, 0, 1)[:, :, 1:1], x[:1, 1:2, 3:4]):
        w = WeightTensor(t)
        assert w.shape == tuple(t.shape) and w.nbytes == t.numel() * 4
        assert w.compute_hash() == WeightTensor(t.clone(memory_format=torch.contiguous_format)).compute_hash()
        assert torch.equal(w.to_torch(), t)


@pytest.mark.filterwarnings("ignore::UserWarning")  # nested tensors are a prototype feature in torch
@pytest.mark.parametrize("layout", [torch.strided, torch.jagged], ids=["strided", "jagged"])
def test_nested_tensors_refused_clearly(layout):
    """A nested tensor says layout torch.strided (default) but has no sizes: refused by name,
    not with torch's 'NestedTensorImpl doesn't support sizes' / NestedIntNode internals."""
    nt = torch.nested.nested_tensor([torch.ones(2, 3), torch.ones(4, 3)], layout=layout)
    with pytest.raises(UnsupportedTensorError, match="nested tensors .* not supported.*unbind"):
        WeightTensor(nt)


# ----------------------------------------------------------------------------------- hashing
def _h(t, **kw) -> str:
    return WeightTensor(t, **kw).compute_hash()


def test_hash_format_and_cache():
    w = WeightTensor(torch.arange(10, dtype=torch.float32))
    h = w.compute_hash()
    assert len(h) == HASH_HEX_LENGTH and int(h, 16) >= 0
    assert w.compute_hash() == h and w.metadata.hash == h


def test_equal_content_equal_hash_regardless_of_name_or_origin(dtype_name):
    a = make_tensor(dtype_name, (9, 11), seed=5)
    b = a.clone()
    assert a.data_ptr() != b.data_ptr()
    ha = WeightTensor(a, name="first").compute_hash()
    assert WeightTensor(b, metadata=WeightMetadata(name="second", shape=(9, 11), dtype=dtype_name,
                                                   layer_type="Linear")).compute_hash() == ha
    assert WeightTensor(a, name="x") == WeightTensor(b, name="y")


def test_hash_differs_with_dtype_for_same_bytes():
    ints = torch.arange(-50, 50, dtype=torch.int32)
    floats = ints.view(torch.float32)
    assert raw_bytes(ints) == raw_bytes(floats)
    assert _h(ints) != _h(floats)
    # all 1-byte types over the same bytes are different objects
    u8 = torch.arange(0, 64, dtype=torch.uint8)
    one_byte = [u8, u8.view(torch.int8), u8.view(torch.float8_e4m3fn), u8.view(torch.float8_e5m2)]
    assert len({_h(t) for t in one_byte}) == len(one_byte)
    # bfloat16 / float16 / int16 over the same bytes
    i16 = torch.arange(1, 65, dtype=torch.int16)
    assert len({_h(i16), _h(i16.view(torch.float16)), _h(i16.view(torch.bfloat16))}) == 3
    # numpy: same bytes as uint16 vs labelled bfloat16
    bits = np.arange(8, dtype=np.uint16)
    assert WeightTensor(bits).compute_hash() != WeightTensor(
        bits, WeightMetadata(name="", shape=(8,), dtype="bfloat16")).compute_hash()


def test_hash_differs_with_shape_for_same_bytes():
    t = torch.arange(24, dtype=torch.float32)
    shapes = [(24,), (2, 12), (12, 2), (2, 3, 4), (1, 24), (24, 1)]
    assert len({_h(t.reshape(s)) for s in shapes}) == len(shapes)
    assert _h(torch.tensor(1.5)) != _h(torch.tensor([1.5]))
    assert len({_h(torch.empty(s)) for s in [(0,), (0, 3), (3, 0), (0, 0)]}) == 4
    assert _h(torch.empty(0, dtype=torch.float32)) != _h(torch.empty(0, dtype=torch.int32))


def test_every_single_bit_flip_changes_the_hash():
    base = make_tensor(torch.float32, (2, 3), seed=9)  # 24 bytes = 192 bits
    raw = base.view(torch.uint8).reshape(-1).numpy().copy()
    hashes = {_h(base)}
    for byte in range(raw.size):
        for bit in range(8):
            flipped = raw.copy()
            flipped[byte] ^= 1 << bit
            hashes.add(_h(torch.from_numpy(flipped).view(torch.float32).reshape(2, 3)))
    assert len(hashes) == 1 + raw.size * 8


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=1, max_size=4096), pos=st.integers(min_value=0), bit=st.integers(0, 7))
def test_bit_flip_anywhere_in_large_buffer_changes_hash(data, pos, bit):
    arr = np.frombuffer(data, dtype=np.uint8).copy()
    pos %= arr.size
    h0 = WeightTensor(arr).compute_hash()
    arr[pos] ^= 1 << bit
    assert WeightTensor(arr).compute_hash() != h0


def test_non_contiguous_hash_equals_contiguous_copy(dtype_name):
    for label, t in tensor_cases(dtype_name):
        copy = t.resolve_conj().resolve_neg().contiguous().clone()
        assert not copy.is_conj() and not copy.is_neg()
        assert _h(t) == _h(copy), label
        assert _h(t) == WeightTensor(copy.numpy() if copy.dtype in _NUMPY_OK else copy).compute_hash(), label


_NUMPY_OK = {torch.float32, torch.float64, torch.float16, torch.int8, torch.int16, torch.int32,
             torch.int64, torch.uint8, torch.bool, torch.complex64, torch.complex128}


def test_hash_does_not_copy_contiguous_input():
    t = torch.arange(1000, dtype=torch.float32)
    w = WeightTensor(t)
    assert w.raw.ctypes.data == t.data_ptr()
    a = np.arange(1000, dtype=np.float64)
    assert WeightTensor(a).raw.ctypes.data == a.ctypes.data


def test_to_torch_of_read_only_buffer_is_a_writable_copy():
    raw = np.arange(16, dtype=np.uint8)
    raw.flags.writeable = False
    w = WeightTensor.from_raw(raw, WeightMetadata(name="r", shape=(4,), dtype="float32"))
    t = w.to_torch()
    t.add_(0)  # would fail on a read-only buffer
    assert raw_bytes(t) == raw.tobytes()


def test_dtype_names_need_no_torch():
    """Comparing and canonicalising numpy dtypes never imports torch (catalog readers stay light)."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from coral_torch.format.dtypes import canonical_dtype\n"
        "from coral_torch.format.weight_tensor import WeightMetadata\n"
        "m = WeightMetadata(name='x', shape=(2,), dtype=np.float32)\n"
        "assert m.dtype == np.float32 and m.dtype != 5 and m.dtype != None and m.dtype == 'float32'\n"
        "assert canonical_dtype(np.dtype('<i8')) == 'int64' and WeightMetadata('y', (1,), 'bfloat16').nbytes == 2\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
