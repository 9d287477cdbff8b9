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
from conftest import assert_same  # noqa: E402
from hypothesis import HealthCheck, event, given, settings, strategies as st

import coral_torch
from coral_torch import Repository
from coral_torch.checkpoint import adapters
from coral_torch.errors import CatalogDamagedError, CoralError, UnsupportedTensorError


# ------------------------------------------------------------------------------------ helpers
def tensor_bytes(t: torch.Tensor) -> bytes:
    # clone, not contiguous(): a 0/1-element view is "contiguous" with any stride, and will not view as bytes
    return t.detach().cpu().clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8).numpy().tobytes()


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
    wt = torch.randn(4, 6, device="cuda")[:, ::2].t()
    cid = repo.commit({"w": w, "c": torch.ones(2), "wt": wt}).commit_id
    back = repo.load(cid)
    assert back["w"].device.type == "cuda" and torch.equal(back["w"], w)
    assert back["wt"].device.type == "cuda" and torch.equal(back["wt"], wt) and back["wt"].stride() == wt.stride()
    back = repo.load(cid, map_location="cpu")
    assert back["w"].device.type == "cpu" and torch.equal(back["w"], w.cpu())


# -------------------------------------------------------------------------- strides (torch.save keeps them)
def test_non_contiguous_tensors_keep_their_strides(tmp_path):
    """torch.load gives back a transposed weight transposed-strided; so must coral_torch.load
    (values stored on their own, never the rest of a view's storage)."""
    gen = torch.Generator().manual_seed(11)
    base = random_tensor(torch.float32, (6, 8), gen)  # NaN payloads and all
    obj = {
        "t": base.t(),
        "every_other": base[:, ::2],
        "column": base[:, 1:2],
        "channels_last": random_tensor(torch.bfloat16, (2, 3, 4, 5), gen).to(memory_format=torch.channels_last),
        "permuted": random_tensor(torch.float8_e4m3fn, (3, 4, 5), gen).permute(2, 0, 1),
        "complex_t": random_tensor(torch.complex64, (3, 5), gen).t(),
        "bool_t": random_tensor(torch.bool, (4, 3), gen).t(),
        "param_t": torch.nn.Parameter(random_tensor(torch.float64, (5, 2), gen).t(), requires_grad=False),
        "contiguous": base.clone(),
    }
    cid = coral_torch.save(obj, tmp_path / "ck.pt")
    back = coral_torch.load(tmp_path / "ck.pt")
    assert_same(obj, back)
    for k, v in obj.items():
        assert back[k].stride() == v.stride(), k
    assert back["every_other"].untyped_storage().nbytes() < base.untyped_storage().nbytes()  # not base's storage
    skel = coral_torch.open_repository(tmp_path / ".coral").manifest(cid).skeleton
    nodes = dict(zip(skel["k"], skel["v"]))
    assert nodes["t"]["stride"] == [1, 8] and "stride" not in nodes["contiguous"]
    # it is a layout of the loaded tensor's own: writing it changes no other tensor
    back["t"].zero_()
    assert tensor_bytes(back["every_other"]) == tensor_bytes(obj["every_other"])


def test_overlapping_and_size_one_strides_come_back_contiguous(repo):
    """An expanded tensor's strides overlap: it comes back as a contiguous copy of its values (its
    manifest unchanged). So does a contiguous tensor whose size-1 dims had unusual strides."""
    obj = {"expanded": torch.randn(3, 1).expand(3, 4), "zero_stride": torch.tensor(2.0).expand(5),
           "odd_size1": torch.arange(3.0).reshape(3, 1).t(), "empty_t": torch.empty(0, 3).t()}
    assert obj["odd_size1"].is_contiguous() and obj["odd_size1"].stride() == (1, 1)
    cid = repo.commit(obj).commit_id
    assert '"stride"' not in repo.manifest(cid).to_json()
    back = repo.load(cid)
    assert_same(obj, back)
    assert all(t.is_contiguous() for t in back.values())
    assert back["expanded"].stride() == (4, 1)


def test_contiguous_checkpoints_keep_their_commit_ids(repo):
    """The commit id is the manifest's hash: a checkpoint without non-contiguous (non-overlapping)
    tensors must hash exactly as before strides were recorded (id taken from coral-torch before)."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    obj = {"w": base, "b": torch.arange(3, dtype=torch.bfloat16), "e": torch.ones(3, 1).expand(3, 4),
           "odd": torch.arange(3.0).reshape(3, 1).t(), "row": base[1], "scalar": torch.tensor(2.5),
           "empty": torch.empty(0, 3).t(), "p": torch.nn.Parameter(torch.ones(2, 2)), "n": 7}
    assert repo.commit(obj).commit_id == "144231ae9f7eccb921fc3dc497841c8f"


def test_tied_non_contiguous_tensors_stay_tied(repo):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(7, 5).t())
    obj = {"state_dict": {"a.weight": w, "b.weight": w}, "again": w, "plain": w.detach(), "view": w.detach()[:, 1:]}
    stats = repo.commit(obj)
    assert stats.tensors == 2  # the parameter and its detached twin share a slot; the sliced view is its own
    back = roundtrip(repo, obj)
    a = back["state_dict"]["a.weight"]
    assert a is back["state_dict"]["b.weight"] and a is back["again"]
    assert isinstance(a, torch.nn.Parameter) and a.stride() == (1, 5)
    assert back["plain"].data_ptr() == a.data_ptr() and back["plain"].stride() == (1, 5)
    assert back["view"].stride() == w[:, 1:].stride() and torch.equal(back["view"], w.detach()[:, 1:])


def test_pruned_skeleton_keeps_strides_of_later_ties(repo):
    """prune() may drop the first node of a tied slot: every node carries the strides."""
    w = torch.randn(4, 3).t()
    flat = adapters.flatten({"optimizer_states": [{"state": {0: {"exp_avg": w}}}], "state_dict": {"w": w}})
    pruned, order = adapters.prune(flat.skeleton, [("optimizer_states", "*", "state")])
    back = adapters.unflatten(pruned, [flat.slots[i].weight.to_torch() for i in order])
    assert back["state_dict"]["w"].stride() == w.stride() and torch.equal(back["state_dict"]["w"], w)


def test_malformed_strides_are_refused():
    flat = adapters.flatten({"w": torch.randn(4, 3).t()})
    tensors = [s.weight.to_torch() for s in flat.slots]
    adapters.check_skeleton(flat.skeleton, 1)
    for bad in ([1], [1, -3], ["1", 4], [0, 0], [1, 2], 5):
        node = dict(flat.skeleton["v"][0], stride=bad)
        skel = dict(flat.skeleton, v=[node])
        with pytest.raises(CatalogDamagedError, match="strides"):
            adapters.unflatten(skel, tensors)
        if not isinstance(bad, list) or any(type(s) is not int or s < 0 for s in bad):
            with pytest.raises(CoralError, match="strides"):
                adapters.check_skeleton(skel, 1)


_STRIDE_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8, torch.int64,
                  torch.bool, torch.complex64, torch.float8_e5m2]


@st.composite
def _strided_views(draw):
    """A random tensor of random dtype, then a random permutation of its dims and a random slice
    (start, stop, step) of each: transposes, gapped views, contiguous ones and empty ones."""
    dtype = draw(st.sampled_from(_STRIDE_DTYPES))
    # sampled_from in this order, not integers(): hypothesis starts from (and shrinks to) the first
    # choices, and with integers() most views came out contiguous
    shape = draw(st.lists(st.sampled_from([3, 4, 2, 5, 1, 6, 7, 0]), min_size=0, max_size=4))
    seed = draw(st.integers(0, 2**31 - 1))
    t = random_tensor(dtype, tuple(shape), torch.Generator().manual_seed(seed))
    if t.dim():
        t = t.permute(*draw(st.permutations(range(t.dim()))))
        index = []
        for n in t.shape:
            start = draw(st.sampled_from(range(max(1, n))))
            stop = draw(st.sampled_from(range(min(start + 1, n), n + 1)))
            index.append(slice(start, stop, draw(st.sampled_from([2, 1, 3]))))
        t = t[tuple(index)]
    return t


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(views=st.lists(_strided_views(), min_size=1, max_size=3))
def test_property_strides_and_values_survive_save_load(tmp_path, views):
    obj = {f"v{i}": v for i, v in enumerate(views)}
    coral_torch.save(obj, tmp_path / "ck.pt")
    back = coral_torch.load(tmp_path / "ck.pt")
    assert list(back) == list(obj)
    for k, v in obj.items():
        assert (back[k].dtype, back[k].shape) == (v.dtype, v.shape), k
        assert tensor_bytes(back[k]) == tensor_bytes(v), k  # bit-exact, NaN payloads included
        if v.is_contiguous():
            assert back[k].is_contiguous(), k
        else:
            event("non-contiguous")
            assert back[k].stride() == v.stride(), k


# ------------------------------------------------------------------------------------- refusals
def _nested(layout):
    return torch.nested.nested_tensor([torch.ones(2, 3), torch.zeros(4, 3)], layout=layout)


@pytest.mark.filterwarnings("ignore::UserWarning")  # nested tensors are a prototype feature in torch
@pytest.mark.parametrize("layout", [torch.strided, torch.jagged], ids=["strided", "jagged"])
@pytest.mark.parametrize("where", ["top", "dict", "list", "optimizer"])
def test_nested_tensors_refused_before_anything_is_written(tmp_path, layout, where):
    nt = _nested(layout)
    obj = {
        "top": lambda: nt,
        "dict": lambda: {"w": torch.ones(3), "inner": {"nt": nt}},
        "list": lambda: {"w": torch.ones(3), "xs": [torch.ones(2), nt]},
        "optimizer": lambda: {"state_dict": {"w": torch.ones(3)},
                              "optimizer_states": [{"state": {0: {"exp_avg": nt}}, "param_groups": []}]},
    }[where]()
    with pytest.raises(UnsupportedTensorError, match="nested tensors are not supported"):
        coral_torch.save(obj, tmp_path / "ck.pt")
    assert not (tmp_path / "ck.pt").exists()
    r = Repository(tmp_path / "repo")
    try:
        with pytest.raises(UnsupportedTensorError, match="nested tensors are not supported"):
            r.commit(obj)
        assert r.log() == [] and r.refs() == {}
        assert not any((r.path / "packs").iterdir())
    finally:
        r.close()
    api_repo = coral_torch.open_repository(tmp_path / ".coral")
    assert api_repo.log() == [] and not any((api_repo.path / "packs").iterdir())
