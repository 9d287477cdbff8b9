"""Round trips through the adapters (flatten -> repository -> unflatten), on real repositories.

Everything a checkpoint holds in practice must come back exactly: container types and key order,
scalars of every kind, numpy values, tensors of every dtype (bit for bit), tied tensors shared,
parameters with their ``requires_grad``, and ``map_location`` handled like ``torch.load``.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import torch

import coral_torch
from coral_torch import Repository, adapters
from coral_torch.errors import CoralError
from conftest import assert_same  # noqa: E402


# ------------------------------------------------------------------------------------ helpers
def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture
def repo(tmp_path):
    r = Repository(tmp_path / "repo")
    yield r
    r.close()


def roundtrip(repo: Repository, obj, **load_kwargs):
    cid = repo.commit(obj).commit_id
    fresh = Repository(repo.path, create=False)
    try:
        return fresh.load(cid, **load_kwargs)
    finally:
        fresh.close()


def random_tensor(dtype: torch.dtype, shape, gen: torch.Generator) -> torch.Tensor:
    """Random bit patterns of ``dtype`` (NaNs and all), except bool which must be 0/1."""
    n = int(np.prod(shape)) if shape else 1
    if dtype == torch.bool:
        return torch.randint(0, 2, (n,), generator=gen, dtype=torch.uint8).bool().reshape(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * itemsize,), generator=gen, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


ALL_DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
    torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint64, torch.uint32, torch.uint16, torch.uint8,
    torch.bool, torch.complex64, torch.complex128,
]
if hasattr(torch, "float8_e8m0fnu"):
    ALL_DTYPES.append(torch.float8_e8m0fnu)


# ---------------------------------------------------------------------------------- containers
def test_nested_containers_and_scalars_roundtrip(repo):
    gen = torch.Generator().manual_seed(1)
    obj = {
        "plain": {"b": 1, "a": 2, "c": {"z": [1, 2, (3, 4, [5])], "y": ()}},
        "odict": collections.OrderedDict([("x", 1), ("a", torch.ones(3)), ("m", [])]),
        "int_keys": {3: "three", 1: "one", -7: torch.arange(4), 10**20: "big"},
        "mixed_keys": {None: 0, True: 1, 2.5: 2, (1, "a"): 3, "s": 4, float("nan"): 5},
        "size": torch.Size([2, 3, 0]),
        "dtypes": [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.int64, torch.bool, torch.complex64],
        "devices": [torch.device("cpu"), torch.device("cuda", 1), torch.device("meta")],
        "none": None, "true": True, "false": False, "str": "héllo\n\x00 wörld", "empty_str": "",
        "int": -12345678901234567890, "zero": 0,
        "floats": [0.1, -0.0, 0.0, 1e-310, 1.7976931348623157e308, float("nan"), float("inf"), float("-inf")],
        "complex": [1 + 2j, complex(float("nan"), -0.0), complex(float("inf"), 1e-300)],
        "bytes": [b"", b"\x00\xffabc"],
        "sets": [{3, 1, 2}, frozenset({"b", "a"}), set(), {1, "mixed"}],
        "slice": slice(1, None, 2),
        "tuple_of_tensors": (torch.zeros(2), torch.randn(3, generator=gen)),
        "np_scalars": [np.float32(1.5), np.float64(-0.0), np.int64(-3), np.uint8(255), np.bool_(True),
                       np.complex64(1 - 1j), np.float16(np.nan), np.int8(-128)],
        "np_arrays": [
            np.arange(12, dtype=np.float32).reshape(3, 4),
            np.arange(12, dtype=np.int64).reshape(3, 4)[:, ::2],  # non-contiguous
            np.array(3.25),  # 0-d
            np.zeros((0, 5), dtype=np.float16),  # empty
            np.array([True, False]),
            np.array([1 + 2j], dtype=np.complex128),
            np.array([1, 2, 65535], dtype=np.uint16),
        ],
        "empty": {"d": {}, "l": [], "t": ()},
    }
    back = roundtrip(repo, obj)
    assert_same(obj, back)
    assert isinstance(back["odict"], collections.OrderedDict)
    assert list(back["int_keys"]) == [3, 1, -7, 10**20]
    assert back["devices"][1] == torch.device("cuda:1")


def test_skeleton_is_json_and_holds_no_pickle_for_common_values():
    flat = adapters.flatten({"a": [1, 2.5, float("nan")], "b": torch.ones(2), "c": torch.float16,
                             "d": np.float32(2), "e": {1, 2}, "f": b"xy", "g": 1j})
    text = json.dumps(flat.skeleton, allow_nan=False)
    assert '"blob"' not in text
    assert len(flat.slots) == 1


def test_attribute_dict_roundtrip(repo):
    from lightning.fabric.utilities.data import AttributeDict

    hp = AttributeDict(lr=0.1, layers=[64, 32], name="m", nested={"a": 1})
    back = roundtrip(repo, {"hyper_parameters": hp})
    assert type(back["hyper_parameters"]) is AttributeDict
    assert back["hyper_parameters"].lr == 0.1
    assert_same(hp, back["hyper_parameters"])


def test_state_dict_keeps_ordereddict_and_metadata(repo):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    sd = model.state_dict()
    back = roundtrip(repo, sd)
    assert type(back) is collections.OrderedDict
    assert back._metadata == sd._metadata
    assert_same(sd, back)
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    model2.load_state_dict(back)  # strict: keys and _metadata usable by torch


# ------------------------------------------------------------------------------------- tensors
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_every_dtype_bit_exact(repo, dtype):
    gen = torch.Generator().manual_seed(7)
    obj = {
        "matrix": random_tensor(dtype, (17, 33), gen),
        "scalar": random_tensor(dtype, (), gen),
        "empty": torch.empty((0, 4), dtype=dtype),
        "empty3d": torch.empty((2, 0, 3), dtype=dtype),
        "vector": random_tensor(dtype, (1000,), gen),
    }
    base = random_tensor(dtype, (8, 6), gen)
    obj["transposed"] = base.t()  # non-contiguous
    obj["strided"] = random_tensor(dtype, (40,), gen)[::3]
    obj["offset_view"] = base[2:5, 1:4]
    back = roundtrip(repo, obj)
    assert_same(obj, back)
    assert back["scalar"].dim() == 0


def test_negative_and_conjugate_views_resolved(repo):
    x = torch.randn(4, dtype=torch.complex64)
    obj = {"conj": x.conj(), "neg": torch.randn(5)._neg_view() if hasattr(torch.Tensor, "_neg_view") else -torch.randn(5)}
    back = roundtrip(repo, obj)
    assert torch.equal(back["conj"], x.conj().resolve_conj())
    assert tensor_bytes(back["neg"]) == tensor_bytes(obj["neg"].resolve_neg())


def test_tied_tensors_stored_once_and_shared(repo):
    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(100, 32)
            self.body = torch.nn.Linear(32, 32)
            self.lm_head = torch.nn.Linear(32, 100, bias=False)
            self.lm_head.weight = self.embed.weight  # tied

    torch.manual_seed(0)
    m = LM()
    sd = m.state_dict()
    assert sd["embed.weight"].data_ptr() == sd["lm_head.weight"].data_ptr()
    stats = repo.commit({"state_dict": sd, "again": m.embed.weight.detach()})
    assert stats.tensors == 3  # embed/lm_head/again share one slot; body weight + bias
    n_objects = repo.catalog.conn.execute("SELECT COUNT(*) FROM objects").fetchone()[0]
    assert n_objects == 3
    fresh = Repository(repo.path, create=False)
    back = fresh.load(stats.commit_id)
    fresh.close()
    a, b = back["state_dict"]["embed.weight"], back["state_dict"]["lm_head.weight"]
    assert a is b or a.data_ptr() == b.data_ptr()
    assert back["again"] is a or back["again"].data_ptr() == a.data_ptr()
    assert torch.equal(a, sd["embed.weight"])
    m2 = LM()
    m2.load_state_dict(back["state_dict"])
    assert m2.lm_head.weight is m2.embed.weight


def test_same_values_different_tensors_are_not_shared(repo):
    a = torch.zeros(10)
    b = torch.zeros(10)
    stats = repo.commit({"a": a, "b": b})
    assert stats.tensors == 2 and stats.new_full == 1 and stats.deduplicated == 1  # stored once by content
    back = repo.load(stats.commit_id)
    back["a"].add_(1)
    assert torch.equal(back["b"], torch.zeros(10))  # not aliased: torch.save would not alias them either


def test_equal_optimizer_counters_come_back_independent(repo):
    """Every AdamW param's ``step`` holds the same value; aliased on load, one optimizer step would
    advance them all N times. Also when the shared content is rebuilt from a delta."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    opt = torch.optim.AdamW(model.parameters())
    ids = []
    for _ in range(3):
        model(torch.randn(4, 64)).sum().backward()
        opt.step()
        twin = torch.randn(4096) if not ids else twin + 1e-4
        ids.append(repo.commit({"opt": opt.state_dict(), "a": twin.clone(), "b": twin.clone()}).commit_id)
    assert repo.catalog.conn.execute("SELECT COUNT(*) FROM objects WHERE kind='delta'").fetchone()[0] > 0
    for cid in ids:
        back = Repository(repo.path).load(cid)
        steps = [s["step"] for s in back["opt"]["state"].values()]
        assert len({t.data_ptr() for t in steps}) == len(steps)
        assert back["a"].data_ptr() != back["b"].data_ptr()
        back["a"].add_(1)
        assert not torch.equal(back["a"], back["b"])
        model2 = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
        opt2 = torch.optim.AdamW(model2.parameters())
        opt2.load_state_dict(back["opt"])
        model2(torch.randn(4, 64)).sum().backward()
        opt2.step()
        assert all(s["step"].item() == steps[0].item() for s in opt2.state.values())


def test_parameters_keep_requires_grad(repo):
    p1 = torch.nn.Parameter(torch.randn(3, 3))
    p2 = torch.nn.Parameter(torch.randn(2), requires_grad=False)
    obj = {"p1": p1, "p2": p2, "list": [p1], "plain": torch.randn(2)}
    back = roundtrip(repo, obj)
    assert isinstance(back["p1"], torch.nn.Parameter) and back["p1"].requires_grad
    assert isinstance(back["p2"], torch.nn.Parameter) and not back["p2"].requires_grad
    assert back["list"][0] is back["p1"]
    assert type(back["plain"]) is torch.Tensor and not back["plain"].requires_grad
    assert tensor_bytes(back["p1"]) == tensor_bytes(p1)


def test_whole_module_params_roundtrip(repo):
    torch.manual_seed(3)
    m = torch.nn.Linear(5, 4)
    m.bias.requires_grad_(False)
    params = dict(m.named_parameters())
    back = roundtrip(repo, params)
    assert_same(params, back)


def test_loaded_tensors_are_writable_and_independent(repo):
    t = torch.arange(10.0)
    back = roundtrip(repo, {"t": t})
    back["t"].mul_(2)  # must not raise (read-only buffer) and must not touch the repository
    again = repo.load("latest")
    assert torch.equal(again["t"], t)


# -------------------------------------------------------------------------------- map_location
def _set_saved_device(repo: Repository, cid: str, device: str) -> str:
    """The id of a copy of commit ``cid`` whose tensors claim to have been saved on ``device`` (as
    a checkpoint written on a GPU machine would). A new id: the id is the manifest's hash."""
    import xxhash

    c = repo.catalog.conn
    manifest = json.loads(c.execute("SELECT manifest FROM commits WHERE id=?", (cid,)).fetchone()[0])
    for e in manifest["tensors"]:
        e[4] = device
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    new = xxhash.xxh3_128(text.encode()).hexdigest()
    c.execute("INSERT INTO commits(id, parent, run, epoch, step, time, message, metrics, manifest, lossy,"
              " logical_bytes, new_bytes, info) SELECT ?, parent, run, epoch, step, time, message, metrics, ?,"
              " lossy, logical_bytes, new_bytes, info FROM commits WHERE id=?", (new, text, cid))
    c.execute("INSERT INTO commit_objects SELECT ?, name, hash, how FROM commit_objects WHERE commit_id=?", (new, cid))
    c.execute("INSERT INTO refs(name, commit_id, updated) VALUES (?, ?, 0)", (f"keep/{new}", new))
    return new


@pytest.mark.parametrize(
    "map_location",
    ["cpu", torch.device("cpu"), {"cuda:0": "cpu"}, {"cuda:0": torch.device("cpu")},
     lambda storage, loc: storage],
    ids=["str", "device", "dict", "dict-device", "callable"],
)
def test_map_location_like_torch_load(repo, map_location):
    obj = {"w": torch.randn(4, 4), "n": 3}
    cid = _set_saved_device(repo, repo.commit(obj).commit_id, "cuda:0")
    back = repo.load(cid, map_location=map_location)
    assert back["w"].device.type == "cpu"
    assert torch.equal(back["w"], obj["w"])
    assert back["n"] == 3


def test_map_location_none_on_cpu_checkpoint_and_api(tmp_path):
    obj = {"w": torch.randn(3)}
    coral_torch.save(obj, tmp_path / "ck.pt")
    for ml in (None, "cpu", torch.device("cpu"), {"cpu": "cpu"}, lambda s, loc: s):
        back = coral_torch.load(tmp_path / "ck.pt", map_location=ml)
        assert torch.equal(back["w"], obj["w"]) and back["w"].device.type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when CUDA is missing")
def test_cuda_checkpoint_without_cuda_says_what_to_do(repo):
    cid = _set_saved_device(repo, repo.commit({"w": torch.randn(2)}).commit_id, "cuda:0")
    with pytest.raises(CoralError, match="map_location='cpu'"):
        repo.load(cid)
    with pytest.raises(CoralError, match="map_location"):
        repo.load(cid, map_location=42)


def test_map_location_meta(repo):
    cid = repo.commit({"w": torch.randn(2, 2)}).commit_id
    back = repo.load(cid, map_location="meta")
    assert back["w"].device.type == "meta" and back["w"].shape == (2, 2)


def test_map_location_cuda_when_available(repo):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    w = torch.randn(5, device="cuda")
    cid = repo.commit({"w": w, "c": torch.ones(2)}).commit_id
    back = repo.load(cid)
    assert back["w"].device.type == "cuda" and torch.equal(back["w"], w)
    back = repo.load(cid, map_location="cpu")
    assert back["w"].device.type == "cpu" and torch.equal(back["w"], w.cpu())
