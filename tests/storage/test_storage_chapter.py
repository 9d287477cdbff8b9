"""Every ```python block of the storage chapter (``shared/SPEC-storage.md``) runs as written.

The chapter is read at test time from ``<checkout>/../shared/SPEC-storage.md``; without it every
test here is skipped, saying so.

Execution model
    The blocks are fragments of one narrative. Each block runs on its own: in a fresh namespace,
    in a fresh temporary working directory (relative paths such as ``"weights.h5"`` or
    ``".coral/objects/weights.h5"`` land there). The names a block uses but does not define (its
    *free names*, computed with :mod:`symtable`) are seeded from a small fixture context, and only
    those: ``PLAN`` lists them for every block and each test checks that list against the block,
    so no block is rescued by a name it does not use, and an edit to the chapter shows up here.
    ``PLAN`` also says which files the working directory starts with (a store file an example
    reads but never writes), and what is checked after the block ran.

    Kinds of block:
      * ``run``: executed, then its outcome is checked.
      * ``definitions``: class/method excerpts (the abstract interface, an implementation
        excerpt, a class sketch). They are compiled and executed, the test checks that they define
        what they claim, and calls what they define where that means something.
      * ``syntax``: one excerpt does not compile as written (an elided parameter list,
        ``def __init__(self, storage: HDF5Store, ...)``). The test checks that this is the only
        problem (the exact line) and runs what the excerpt describes with coral-torch's own
        ``Deduplicator(storage=...)``.
    No block is skipped. Two large ones (the 100 MB benchmark, a 10000x10000 array) are marked
    ``slow``; they still run by default.

Substitutions: the only changes made to the chapter's code before it runs
    (a) Placeholder paths: ``/path/to/...`` becomes ``<tmp>/path/to/...``.
    (b) Module names: the chapter's upstream modules ``coral.core.weight_tensor``,
        ``coral.storage``, ``coral.storage.s3_store``, ``coral.delta.delta_encoder`` and
        ``coral.core.deduplicator`` are aliases of the coral_torch modules holding those names
        (``coral_torch.format.weight_tensor``, ``coral_torch.storage``, ``coral_torch.storage.s3_store``,
        ``coral_torch.format.delta``, ``coral_torch.dedup``), put into ``sys.modules`` by this test only
        and removed afterwards. coral-torch ships no ``coral`` package.
    (c) S3: the S3 examples run against a local moto S3 server on 127.0.0.1 (``tests/s3_server.py``),
        never the network: ``AWS_ENDPOINT_URL`` points at it, the environment holds test
        credentials, and the buckets the chapter names are created first. An explicit
        ``endpoint_url="..."`` in a block that opens a store (the MinIO example's
        ``http://localhost:9000``) is replaced by the moto server's URL.
"""

from __future__ import annotations

import abc
import builtins
import dataclasses
import gc
import inspect
import re
import symtable
import sys
import types
import typing
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Optional

import h5py
import numpy as np
import pytest
import xxhash

import coral_torch.dedup
import coral_torch.format.delta
import coral_torch.format.weight_tensor
import coral_torch.storage
import coral_torch.storage.s3_store
from coral_torch.dedup import Deduplicator
from coral_torch.errors import DeltaError, UnsupportedTensorError
from coral_torch.format.delta import Delta, DeltaConfig, DeltaEncoder, DeltaType
from coral_torch.format.weight_tensor import WeightMetadata, WeightTensor
from coral_torch.storage import HDF5Store, S3Config, S3Store
from coral_torch.storage.weight_store import WeightStore

SPEC = Path(__file__).resolve().parents[2].parent / "shared" / "SPEC-storage.md"
SKIP_REASON = f"the storage chapter is not at {SPEC} (it lives in the shared folder beside the checkout)"

# (b) the chapter's module names -> the coral_torch modules that hold those names
ALIASES = {
    "coral.core.weight_tensor": coral_torch.format.weight_tensor,
    "coral.storage": coral_torch.storage,
    "coral.storage.s3_store": coral_torch.storage.s3_store,
    "coral.delta.delta_encoder": coral_torch.format.delta,
    "coral.core.deduplicator": coral_torch.dedup,
}


# ------------------------------------------------------------------------------ the chapter
@dataclass(frozen=True)
class Block:
    index: int
    lineno: int  # line of the block's first code line in the chapter
    source: str

    @property
    def head(self) -> str:
        return next(line for line in self.source.splitlines() if line.strip())


def chapter_blocks() -> list[Block]:
    if not SPEC.exists():
        pytest.skip(SKIP_REASON)
    text = SPEC.read_text(encoding="utf-8")
    blocks = []
    for m in re.finditer(r"^```python[ \t]*\n(.*?)^```", text, re.S | re.M):
        lineno = text.count("\n", 0, m.start(1)) + 1
        blocks.append(Block(len(blocks), lineno, m.group(1)))
    return blocks


def free_names(source: str) -> set[str]:
    """Names ``source`` reads but neither assigns, imports nor defines (builtins excluded)."""
    top = symtable.symtable(source, "<block>", "exec")
    defined = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported() or s.is_namespace()}
    used: set[str] = set()

    def walk(table: symtable.SymbolTable) -> None:
        for s in table.get_symbols():
            if not s.is_referenced():
                continue
            if table is top or s.is_global() or (table.get_type() == "class" and not s.is_local()):
                used.add(s.get_name())
        for child in table.get_children():
            walk(child)

    walk(top)
    return used - defined - set(dir(builtins))


def substitute(block: Block, tmp: Path, endpoint: Optional[str]) -> str:
    """Substitutions (a) and (c) (see the module docstring); nothing else is changed."""
    src = block.source.replace("/path/to/", f"{tmp.as_posix()}/path/to/")
    if endpoint is not None:
        src = re.sub(r'endpoint_url="[^"]*"', f'endpoint_url="{endpoint}"', src)
    return src


def compile_block(block: Block, source: str):
    """Compiled so that tracebacks name the chapter and its line numbers."""
    return compile("\n" * (block.lineno - 1) + source, str(SPEC), "exec")


# ------------------------------------------------------------------------- fixture context
def _tensor(seed: int, shape=(64, 32), name: str = "") -> WeightTensor:
    data = (np.random.default_rng(seed).standard_normal(shape) * 0.02).astype(np.float32)
    return WeightTensor(data, WeightMetadata(name=name, shape=shape, dtype=np.float32, layer_type="Linear"))


def _near_copy(w: WeightTensor, seed: int, name: str) -> WeightTensor:
    """``w`` with 1% of its values moved by one ulp: "99% similar"."""
    data = w.data.copy()
    flat = data.reshape(-1)
    idx = np.random.default_rng(seed).choice(flat.size, max(1, flat.size // 100), replace=False)
    flat[idx] = np.nextafter(flat[idx], np.float32(1))
    return WeightTensor(data, WeightMetadata(name=name, shape=w.shape, dtype=w.dtype))


class _RepositoryStandIn:
    """What the chapter's GC example asks of ``repo``: the hashes that commits reference.
    coral_torch's Repository keeps packs and a catalog and has its own ``gc()``; it has no
    ``get_all_referenced_weights``/``get_all_referenced_deltas``."""

    def __init__(self, weights: list[str], deltas: list[str]):
        self._weights, self._deltas = weights, deltas

    def get_all_referenced_weights(self) -> list[str]:
        return list(self._weights)

    def get_all_referenced_deltas(self) -> list[str]:
        return list(self._deltas)


class Context:
    """The narrative's state a block may rely on without creating it. Every seed is built on first
    use only; ``seed(name)`` is what a block's free name gets."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.opened: list[Any] = []

    #: names of the narrative: imports an earlier block made (the same objects the aliases give)
    NAMES: dict[str, Any] = {
        "np": np, "Optional": typing.Optional, "List": typing.List, "Dict": typing.Dict, "Any": typing.Any,
        "abstractmethod": abc.abstractmethod, "Path": Path, "HDF5Store": HDF5Store, "S3Store": S3Store,
        "S3Config": S3Config, "WeightTensor": WeightTensor, "WeightMetadata": WeightMetadata,
        "Deduplicator": Deduplicator,
        # the config block is JSON labelled python: JSON's `true` is Python's True
        "true": True,
    }

    @cached_property
    def weight(self) -> WeightTensor:
        return _tensor(0, name="encoder.layer1.weight")

    @cached_property
    def hash_key(self) -> str:
        return self.weight.compute_hash()

    @cached_property
    def weight_b(self) -> WeightTensor:
        return _near_copy(self.weight, 1, "encoder.layer1.weight@2")

    @cached_property
    def delta_key(self) -> str:
        return self.weight_b.compute_hash()

    @cached_property
    def store(self) -> HDF5Store:
        """A store holding ``weight`` and one delta (``weight_b`` against ``weight``)."""
        store = HDF5Store(self.workdir / "store.h5")
        self.opened.append(store)
        store.store(self.weight)
        store.store_delta(DeltaEncoder().encode(self.weight_b, self.weight), self.delta_key)
        return store

    @cached_property
    def weight1(self) -> WeightTensor:
        return _tensor(11, (32, 16), "layer1")

    @cached_property
    def weight2(self) -> WeightTensor:
        return _tensor(12, (16,), "layer2")

    @cached_property
    def weight3(self) -> WeightTensor:
        return _tensor(13, (8, 8), "layer3")

    @cached_property
    def small_weight(self) -> WeightTensor:
        return _tensor(14, (4, 4), "small")

    @cached_property
    def model_weights(self) -> dict[str, WeightTensor]:
        return {"layer1": self.weight1, "layer2": self.weight2, "layer3": self.weight3}

    @cached_property
    def delta_reference(self) -> WeightTensor:
        return _tensor(20, (512, 512), "reference")

    @cached_property
    def delta_array(self) -> np.ndarray:
        """A float32 (512, 512) difference, as the chapter's Delta(FLOAT32_RAW, data=delta_array)."""
        return (np.random.default_rng(21).standard_normal((512, 512)) * 1e-4).astype(np.float32)

    def _orphans(self) -> tuple[str, str]:
        """One weight and one delta in ``store`` that nothing references (for the GC examples)."""
        if not hasattr(self, "_orphan_keys"):
            orphan = _tensor(30, (8,), "orphan")
            orphan_b = _near_copy(orphan, 31, "orphan@2")
            self.store.store(orphan)
            self.store.store_delta(DeltaEncoder().encode(orphan_b, orphan), orphan_b.compute_hash())
            self._orphan_keys = (orphan.compute_hash(), orphan_b.compute_hash())
        return self._orphan_keys

    @cached_property
    def unreferenced_weights(self) -> list[str]:
        # computed by the GC the example sketches; here: the store's one orphan weight
        return [self._orphans()[0]]

    @cached_property
    def unreferenced_deltas(self) -> list[str]:
        return [self._orphans()[1]]

    @cached_property
    def repo(self) -> _RepositoryStandIn:
        # the chapter calls repo.get_all_referenced_weights()/..._deltas() on a repository the
        # example never created (and coral_torch's Repository has no such methods): a stand-in
        # that references the store's weight and delta, while the store also holds orphans
        self._orphans()
        return _RepositoryStandIn([self.hash_key], [self.delta_key])

    @cached_property
    def data_a(self) -> np.ndarray:
        return _tensor(40, (128, 64)).data

    @cached_property
    def metadata_a(self) -> WeightMetadata:
        return WeightMetadata(name="a", shape=self.data_a.shape, dtype=self.data_a.dtype)

    @cached_property
    def data_b(self) -> np.ndarray:
        return _near_copy(WeightTensor(self.data_a), 41, "b").data  # "99% similar to weight_a"

    @cached_property
    def metadata_b(self) -> WeightMetadata:
        return WeightMetadata(name="b", shape=self.data_b.shape, dtype=self.data_b.dtype)

    @cached_property
    def delta_encoder(self) -> DeltaEncoder:
        # the delta workflow's load_with_delta() uses `delta_encoder`, which the example never
        # creates: the encoder for the DeltaConfig() it passes to the Deduplicator
        return DeltaEncoder(DeltaConfig())

    def seed(self, name: str) -> Any:
        if name in self.NAMES:
            return self.NAMES[name]
        return getattr(self, name)

    def write_file(self, rel: str) -> None:
        """A store file the block reads but does not write, holding ``weight``."""
        with HDF5Store(self.workdir / rel) as s:
            s.store(self.weight)

    def close(self, ns: dict[str, Any]) -> None:
        for obj in list(ns.values()) + self.opened:
            if isinstance(obj, (HDF5Store, S3Store)):
                obj.close()
        ns.clear()
        gc.collect()


# ------------------------------------------------------------------------------ the checks
# Each takes (namespace after the block ran, context, run) and checks what the block claims.


@dataclass
class Run:
    block: Block
    source: str
    workdir: Path
    tmp: Path
    endpoint: Optional[str] = None  # the moto server's URL, for S3 blocks


def _abstract_in_ours(fn: Callable, name: str) -> None:
    """``fn`` (an abstract method excerpt) is an abstract method of coral_torch's WeightStore with
    the same parameters."""
    assert getattr(fn, "__isabstractmethod__", False), name
    assert name in WeightStore.__abstractmethods__, name
    ours = list(inspect.signature(getattr(WeightStore, name)).parameters)
    assert list(inspect.signature(fn).parameters) == ours, (name, ours)


def check_compute_hash(ns, ctx, run):
    data = ctx.weight.data
    assert ns["compute_hash"](data) == xxhash.xxh64(data.tobytes()).hexdigest()
    assert ns["compute_hash"](data.copy()) == ns["compute_hash"](data)  # deterministic
    # the chapter's function is illustrative: WeightTensor's content address is xxh3-128 over
    # dtype, shape and the bytes (32 hex digits), also an xxHash
    assert len(ctx.weight.compute_hash()) == 32


def check_create_weight(ns, ctx, run):
    weight, meta = ns["weight"], ns["metadata"]
    assert ns["hash_key"] == weight.compute_hash() and re.fullmatch(r"[0-9a-f]{32}", ns["hash_key"])
    assert meta.dtype == np.float32 and meta.dtype == ns["data"].dtype and meta.dtype == "float32"
    assert meta.shape == (512, 512) and meta.layer_type == "Linear" and meta.name == "layer1.weight"
    assert weight.data.tobytes() == ns["data"].tobytes()


def check_abstract_class(ns, ctx, run):
    cls = ns["WeightStore"]
    assert inspect.isabstract(cls) and cls.__abstractmethods__ == {"store", "load", "exists", "delete"}
    for name in cls.__abstractmethods__:
        _abstract_in_ours(getattr(cls, name), name)


def check_abstract_methods(*names: str):
    def check(ns, ctx, run):
        for name in names:
            _abstract_in_ours(ns[name], name)

    return check


def check_hdf5_init(ns, ctx, run):
    store = ns["store"]
    path = run.tmp / "path/to/repo/.coral/objects/weights.h5"
    assert store.filepath == path and path.is_file()  # parent directories created
    assert (store.compression, store.compression_opts) == ("gzip", 4)
    h = store.store(ctx.weight)
    assert store.load(h) == ctx.weight


def check_compression_stores(ns, ctx, run):
    got = {k: (ns[k].compression, ns[k].compression_opts) for k in ("archive_store", "dev_store", "speed_store")}
    assert got == {"archive_store": ("gzip", 9), "dev_store": ("lzf", None), "speed_store": (None, None)}
    for k in got:
        h = ns[k].store(ctx.weight1)
        assert ns[k].load(h) == ctx.weight1


def check_store_excerpt(ns, ctx, run):
    """The excerpt is upstream's HDF5Store.store; it runs on coral_torch's WeightTensor and
    WeightMetadata as they are (``np.dtype(metadata.dtype).name`` included) against a plain HDF5 file."""
    store_fn = ns["store"]
    assert list(inspect.signature(store_fn).parameters) == ["self", "weight", "hash_key"]
    with h5py.File(run.workdir / "excerpt.h5", "w") as f:
        f.create_group("weights")
        this = types.SimpleNamespace(file=f, compression="gzip", compression_opts=4)
        key = store_fn(this, ctx.weight)
        assert key == ctx.hash_key
        ds = f["weights"][key]
        assert ds[()].tobytes() == ctx.weight.data.tobytes() and ds.compression == "gzip"
        attrs = {k: ds.attrs[k] for k in ds.attrs}
        assert attrs["dtype"] == "float32" and tuple(attrs["shape"]) == ctx.weight.shape
        assert attrs["name"] == ctx.weight.metadata.name and attrs["layer_type"] == "Linear"
        assert attrs["model_name"] == "" and attrs["hash"] == key
        assert store_fn(this, ctx.weight1, hash_key="custom") == "custom"


def check_metadata_query(ns, ctx, run):
    assert ns["metadata"] == ctx.store.get_metadata(ctx.hash_key)
    assert ns["metadata"].name == "encoder.layer1.weight" and ns["metadata"].shape == ctx.weight.shape
    assert ns["weight"] == ctx.weight


def check_batch_placeholders(ns, ctx, run):
    hashes = {k: w.compute_hash() for k, w in (("layer1", ctx.weight1), ("layer2", ctx.weight2), ("layer3", ctx.weight3))}
    assert ns["hash_map"] == hashes
    # the example loads placeholder hashes ("a3f2..."): none is in the store, and load_batch
    # leaves unknown keys out of its result
    assert ns["hashes"] == ["a3f2...", "b5e7...", "c9d4..."] and ns["loaded"] == {}
    loaded = ns["store"].load_batch(list(hashes.values()))
    assert loaded == {h: w for h, w in zip(hashes.values(), (ctx.weight1, ctx.weight2, ctx.weight3))}


def check_hand_built_delta(ns, ctx, run):
    store, delta, loaded = ns["store"], ns["delta"], ns["loaded_delta"]
    assert ns["delta_hash"] == "d1a5e9c3..." and store.delta_exists("d1a5e9c3...")
    assert delta.delta_type is DeltaType.FLOAT32_RAW and delta.lossless
    assert isinstance(loaded.data, np.ndarray) and loaded.data.dtype == np.float32 and loaded.data.shape == (512, 512)
    assert loaded.data.tobytes() == ctx.delta_array.tobytes() and loaded == delta
    assert loaded.original_dtype == np.float32 and loaded.original_shape == (512, 512)
    assert loaded.reference_hash == "a3f2c1d9..." and loaded.compression_ratio == 0.95
    # the delta names a placeholder reference: it is not applied to any other tensor...
    ref = ctx.delta_reference
    with pytest.raises(DeltaError, match="a3f2c1d9"):
        DeltaEncoder().reconstruct(loaded, ref.data)
    # ...and with the real reference's hash it rebuilds reference + delta_array, bit for bit
    real = dataclasses.replace(loaded, reference_hash=ref.compute_hash())
    out = DeltaEncoder().reconstruct(real, ref.data)
    assert out.tobytes() == np.add(ref.data, ctx.delta_array, dtype=np.float32).tobytes()


def check_gc_lists(ns, ctx, run):
    store = ns["store"]
    assert set(ns["all_weights"]) == {ctx.hash_key, *ctx.unreferenced_weights}
    assert set(ns["all_deltas"]) == {ctx.delta_key, *ctx.unreferenced_deltas}
    assert store.list_weights() == [ctx.hash_key] and store.list_deltas() == [ctx.delta_key]


def check_benchmark(ns, ctx, run):
    assert ns["loaded"] == ns["weight"] and ns["loaded"].compute_hash() == ns["hash_key"]
    assert ns["store"].compression == "gzip" and ns["write_time"] > 0 and ns["read_time"] > 0


def check_s3_stores(ns, ctx, run):
    aws, minio = ns["aws_store"], ns["minio_store"]
    assert (aws.config.bucket, aws.config.region, aws.config.prefix) == ("my-ml-models", "us-west-2", "coral/experiments/")
    assert aws.endpoint == run.endpoint  # AWS_ENDPOINT_URL: the local server, not AWS
    assert (minio.config.bucket, minio.config.prefix, minio.config.access_key) == ("models", "coral/", "minioadmin")
    assert minio.endpoint == run.endpoint
    for store in (aws, minio):
        h = store.store(ctx.weight1)
        assert store.load(h) == ctx.weight1


def check_s3_configs(ns, ctx, run):
    c1, c2, c3 = ns["config1"], ns["config2"], ns["config3"]
    assert (c1.bucket, c1.access_key, c1.secret_key, c1.endpoint_url) == ("my-bucket", None, None, None)
    assert (c2.access_key, c2.secret_key) == ("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert c2.secret_key not in repr(c2)  # secrets stay out of reprs and logs
    assert (c3.endpoint_url, c3.access_key, c3.secret_key) == ("https://minio.example.com", "my-access-key", "my-secret-key")


def check_remote_workflow(ns, ctx, run):
    s3 = ns["s3_store"]
    assert ns["hash_key"] == ctx.hash_key and s3.exists(ctx.hash_key)
    assert s3.config.prefix == "coral/project-x/" and s3.list_weights() == [ctx.hash_key]
    stats = ns["stats"]  # of the second sync, to the new machine
    assert stats["downloaded"] == 1 and stats["failed"] == 0
    assert ns["new_local_store"].load(ctx.hash_key) == ctx.weight


def check_hybrid(ns, ctx, run):
    assert ns["remote"].exists(ctx.hash_key) and ns["remote"].load(ctx.hash_key) == ctx.weight
    assert (run.workdir / ".coral/objects/weights.h5").is_file()


def check_reassigned_stores(ns, ctx, run):
    store = ns["store"]
    assert (store.filepath.name, store.compression) == ("dev.h5", "lzf")
    for name in ("fast.h5", "balanced.h5", "archived.h5"):  # each replaced store made its file
        with HDF5Store(run.workdir / name, mode="r") as s:
            assert s.list_weights() == []
    h = store.store(ctx.weight1)
    assert store.load(h) == ctx.weight1


def check_batch_many(ns, ctx, run):
    h = ctx.small_weight.compute_hash()
    assert ns["store"].exists(h) and len(ns["weights"]) == 100
    assert ns["large_weight"].shape == (10000, 10000)


def check_context_manager(ns, ctx, run):
    assert ns["weight"] == ctx.weight
    assert ns["store"].file is None  # closed in the finally clause


def check_cached_store(ns, ctx, run):
    assert ns["w1"] is ns["w2"] and ns["w1"] == ctx.weight
    assert ns["cached"]._cache == {}


def check_storing(ns, ctx, run):
    store, weight = ns["store"], ns["weight"]
    assert ns["hash_key"] == "my_custom_hash" and store.load("my_custom_hash") == weight
    assert store.exists(weight.compute_hash())
    meta = store.get_metadata(weight.compute_hash())
    assert (meta.name, meta.layer_type, meta.model_name) == ("encoder.layer1.weight", "Linear", "TransformerEncoder")
    assert meta.dtype == np.float32


def check_loading(ns, ctx, run):
    assert ns["weight"] == ctx.weight and ns["metadata"].shape == ctx.weight.shape


def check_batch_ten(ns, ctx, run):
    hash_map, loaded = ns["hash_map"], ns["loaded_weights"]
    assert list(hash_map) == [f"layer{i}" for i in range(10)]
    assert set(loaded) == set(hash_map.values())
    for name, h in hash_map.items():
        assert loaded[h] == ns["weights"][name]


def check_gc_repo(ns, ctx, run):
    store = ns["store"]
    assert ns["unreferenced"] == set(ctx.unreferenced_weights)
    assert ns["unreferenced_deltas"] == set(ctx.unreferenced_deltas)
    assert store.list_weights() == [ctx.hash_key] and store.list_deltas() == [ctx.delta_key]


def check_storage_info(ns, ctx, run):
    info, delta_info, store = ns["info"], ns["delta_info"], ns["store"]
    assert info["filepath"] == str(store.filepath) and info["file_size"] == store.filepath.stat().st_size
    assert info["total_weights"] == 1 and info["total_bytes"] == ctx.weight.nbytes
    # compression_ratio is stored/original (what the chapter prints as a percentage)
    assert info["compression_ratio"] == pytest.approx(info["compressed_bytes"] / info["total_bytes"])
    assert 0 < info["compression_ratio"] <= 1.0
    assert delta_info["total_deltas"] == 1 and 0 < delta_info["total_delta_bytes"] < ctx.weight.nbytes


def check_repository_sketch(ns, ctx, run):
    """The class sketch defines Repository(path) and stage_weights(weights). Its __init__ builds
    ``Deduplicator(...)``, an elision (it would pass Ellipsis), so it is not called; stage_weights
    runs with coral_torch's Deduplicator: the deduplicated result goes straight into store_batch."""
    cls = ns["Repository"]
    assert list(inspect.signature(cls.__init__).parameters) == ["self", "path"]
    assert list(inspect.signature(cls.stage_weights).parameters) == ["self", "weights"]
    this = types.SimpleNamespace(deduplicator=Deduplicator(),
                                 weights_store_path=run.workdir / "repo" / ".coral" / "objects" / "weights.h5")
    hash_map = cls.stage_weights(this, {"w": ctx.weight, "tied": ctx.weight, "other": ctx.weight1})
    assert hash_map == {"w": ctx.hash_key, "other": ctx.weight1.compute_hash()}
    with HDF5Store(this.weights_store_path, mode="r") as s:
        assert sorted(s.list_weights()) == sorted(hash_map.values())


def check_delta_workflow(ns, ctx, run):
    store, result = ns["store"], ns["result"]
    wa, wb = ns["weight_a"], ns["weight_b"]
    ha, hb = wa.compute_hash(), wb.compute_hash()
    assert dict(result) == {"a": wa} and list(result.deltas) == [hb]
    delta = result.deltas[hb]
    assert delta.lossless and delta.reference_hash == ha and delta.nbytes < 0.2 * wb.nbytes
    assert ns["hash_a"] == ha and store.exists(ha) and store.delta_exists(hb) and not store.exists(hb)
    load_with_delta = ns["load_with_delta"]
    assert load_with_delta(ha) == wa  # the normal branch, as written
    # the delta branch: everything runs as written up to its last line, which elides the
    # metadata (`WeightTensor(data=reconstructed, metadata=...)` passes Ellipsis) and is refused
    with pytest.raises(UnsupportedTensorError, match="metadata must be a WeightMetadata") as exc:
        load_with_delta(hb)
    frame = [e for e in exc.traceback if str(e.path) == str(SPEC)][-1]
    assert SPEC.read_text().splitlines()[frame.lineno].strip() == "return WeightTensor(data=reconstructed, metadata=...)"
    # what that branch computed before it: the exact target, from the reference's .data array
    reconstructed = ns["delta_encoder"].reconstruct(store.load_delta(hb), store.load(ha).data)
    assert isinstance(reconstructed, np.ndarray) and reconstructed.tobytes() == ctx.data_b.tobytes()
    assert WeightTensor(data=reconstructed, metadata=wb.metadata) == wb


def check_single_store(name: str, compression: Optional[str], opts: Any):
    def check(ns, ctx, run):
        store = ns[name]
        assert (store.filepath.name, store.compression, store.compression_opts) == (
            {"dev_store": "dev.h5", "prod_store": "prod.h5", "archive_store": "archive.h5"}[name], compression, opts)

    return check


def check_batch_vs_loop(ns, ctx, run):
    assert sorted(ns["store"].list_weights()) == sorted({ctx.hash_key} | {w.compute_hash() for w in ctx.model_weights.values()})


def check_repo_config(ns, ctx, run):
    # the block is one expression; its value is the config (the namespace keeps nothing)
    config = eval(run.source, {"true": True})  # noqa: S307 - the chapter's own literal
    core = config["core"]
    assert core == {"delta_encoding": True, "similarity_threshold": 0.98}
    d = Deduplicator(similarity_threshold=core["similarity_threshold"], enable_delta_encoding=core["delta_encoding"])
    assert d.similarity_threshold == 0.98 and d.enable_delta_encoding


def check_sync_up(store_name: str, bucket: str):
    def check(ns, ctx, run):
        remote = ns[store_name]
        assert remote.config.bucket == bucket and remote.exists(ctx.hash_key)
        assert remote.load(ctx.hash_key) == ctx.weight

    return check


def check_large_models(ns, ctx, run):
    check_sync_up("s3_store", "large-models")(ns, ctx, run)
    assert ns["local_store"].list_weights() == [ctx.hash_key]


def check_migrate_up(ns, ctx, run):
    dest = ns["dest"]
    assert (dest.config.bucket, dest.config.region) == ("coral-production", "us-west-2")
    stats = ns["stats"]
    assert stats["uploaded"] + stats["skipped"] == 1 and stats["failed"] == 0  # skipped: already there
    assert dest.load(ctx.hash_key) == ctx.weight


def check_migrate_down(ns, ctx, run):
    source, dest, stats = ns["source"], ns["dest"], ns["stats"]
    remote = source.list_weights()
    assert ctx.hash_key in remote and stats["downloaded"] == len(remote) and stats["failed"] == 0
    assert sorted(dest.list_weights()) == sorted(remote) and dest.load(ctx.hash_key) == ctx.weight


# ------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class Plan:
    id: str
    head: str  # the block's first line, as in the chapter
    kind: str  # "run", "definitions" or "syntax"
    free: frozenset[str] = frozenset()  # names seeded from the context
    check: Optional[Callable[[dict, Context, Run], None]] = None
    files: tuple[str, ...] = ()  # store files (holding `weight`) the working directory starts with
    s3: bool = False  # runs against the moto server (substitution (c))
    s3_seed: tuple[str, ...] = ()  # buckets that hold `weight` before the block runs
    slow: bool = False


def P(id, head, kind="run", free=(), **kw) -> Plan:  # noqa: N802 - a table row
    return Plan(id, head, kind, frozenset(free), **kw)


PLAN: list[Plan] = [
    P("00-compute-hash", "import xxhash", "definitions", check=check_compute_hash),
    P("01-weight-tensor", "from coral.core.weight_tensor import WeightTensor, WeightMetadata", check=check_create_weight),
    P("02-weightstore-abc", "from abc import ABC, abstractmethod", "definitions", check=check_abstract_class),
    P("03-list-weights", "@abstractmethod", "definitions", ["List", "abstractmethod"],
      check=check_abstract_methods("list_weights")),
    P("04-get-metadata", "@abstractmethod", "definitions", ["Optional", "WeightMetadata", "abstractmethod"],
      check=check_abstract_methods("get_metadata")),
    P("05-batch-abc", "@abstractmethod", "definitions", ["Dict", "List", "WeightTensor", "abstractmethod"],
      check=check_abstract_methods("store_batch", "load_batch")),
    P("06-storage-info-abc", "@abstractmethod", "definitions", ["Any", "Dict", "abstractmethod"],
      check=check_abstract_methods("get_storage_info")),
    P("07-hdf5-init", "from coral.storage import HDF5Store", check=check_hdf5_init),
    P("08-compression-options", "# High compression for archival", free=["HDF5Store"], check=check_compression_stores),
    P("09-store-excerpt", "def store(self, weight: WeightTensor, hash_key: Optional[str] = None) -> str:",
      "definitions", ["Optional", "WeightTensor", "np"], check=check_store_excerpt),
    P("10-metadata-query", "# Fast metadata query - no array loading", free=["hash_key", "store"],
      check=check_metadata_query),
    P("11-batch", "# Store multiple weights efficiently", free=["store", "weight1", "weight2", "weight3"],
      check=check_batch_placeholders),
    P("12-delta-store", "from coral.delta.delta_encoder import Delta, DeltaType", free=["delta_array", "np", "store"],
      check=check_hand_built_delta),
    P("13-gc", "# List all weights in storage", free=["store", "unreferenced_deltas", "unreferenced_weights"],
      check=check_gc_lists),
    P("14-benchmark", "import time", check=check_benchmark, slow=True),
    P("15-s3-stores", "from coral.storage.s3_store import S3Store, S3Config", check=check_s3_stores, s3=True),
    P("16-s3-credentials", "# Default AWS credentials chain", free=["S3Config"], check=check_s3_configs),
    P("17-remote-workflow", "from coral.storage import HDF5Store", free=["weight"], check=check_remote_workflow, s3=True),
    P("18-hybrid", "# Local fast storage", free=["HDF5Store", "S3Config", "S3Store", "weight"], check=check_hybrid,
      s3=True),
    P("19-compression-levels", "# Maximum speed, no compression", free=["HDF5Store"], check=check_reassigned_stores),
    P("20-chunking", "# HDF5 automatically determines chunk size, but you can influence it",
      free=["np", "small_weight", "store"], check=check_batch_many, slow=True),
    P("21-context-manager", "# Context manager ensures file is closed", free=["HDF5Store", "hash_key"],
      check=check_context_manager, files=("weights.h5",)),
    P("22-caching", "from functools import lru_cache", free=["HDF5Store", "hash_key"], check=check_cached_store,
      files=("weights.h5",)),
    P("23-storing", "from coral.storage import HDF5Store", check=check_storing),
    P("24-loading", "# Load full weight", free=["hash_key", "store"], check=check_loading),
    P("25-batch-ten", "# Store multiple weights", free=["WeightMetadata", "WeightTensor", "np", "store"],
      check=check_batch_ten),
    P("26-gc-repo", "# Get all stored weights", free=["repo", "store"], check=check_gc_repo),
    P("27-storage-info", "# Get storage information", free=["store"], check=check_storage_info),
    P("28-repository-sketch", "class Repository:", "definitions",
      ["Deduplicator", "Dict", "HDF5Store", "Path", "WeightTensor"], check=check_repository_sketch),
    P("29-delta-workflow", "from coral.core.deduplicator import Deduplicator",
      free=["HDF5Store", "WeightTensor", "data_a", "data_b", "delta_encoder", "metadata_a", "metadata_b"],
      check=check_delta_workflow),
    P("30-deduplicator-sketch", "class Deduplicator:", "syntax"),
    P("31-dev-store", 'dev_store = HDF5Store("dev.h5", compression="lzf")', free=["HDF5Store"],
      check=check_single_store("dev_store", "lzf", None)),
    P("32-prod-store", 'prod_store = HDF5Store("prod.h5", compression="gzip", compression_opts=4)',
      free=["HDF5Store"], check=check_single_store("prod_store", "gzip", 4)),
    P("33-archive-store", 'archive_store = HDF5Store("archive.h5", compression="gzip", compression_opts=9)',
      free=["HDF5Store"], check=check_single_store("archive_store", "gzip", 9)),
    P("34-batch-not-loop", "# Don't do this", free=["model_weights", "store"], check=check_batch_vs_loop),
    P("35-repo-config", "# In repository config", free=["true"], check=check_repo_config),
    P("36-large-models", "# Local development", free=["HDF5Store", "S3Config", "S3Store"], check=check_large_models,
      files=("local.h5",), s3=True),
    P("37-backup", "# Keep working copy local", free=["HDF5Store", "S3Config", "S3Store"],
      check=check_sync_up("s3", "coral-backup"), files=(".coral/objects/weights.h5",), s3=True),
    P("38-migrate-to-s3", "from coral.storage import HDF5Store", check=check_migrate_up,
      files=(".coral/objects/weights.h5",), s3=True),
    P("39-migrate-from-s3", "# Source: S3", free=["HDF5Store", "S3Config", "S3Store"], check=check_migrate_down,
      s3=True, s3_seed=("coral-production",)),
]


# -------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def coral_aliases():
    """Substitution (b): the chapter's module names, for this module's tests only."""
    parents = {"coral": None, "coral.core": None, "coral.delta": None}
    with pytest.MonkeyPatch.context() as mp:
        for name in parents:
            mod = types.ModuleType(name, "test alias of coral_torch modules (tests/storage/test_storage_chapter.py)")
            mod.__path__ = []  # a package
            parents[name] = mod
            mp.setitem(sys.modules, name, mod)
        for name, mod in ALIASES.items():
            mp.setitem(sys.modules, name, mod)
            parent, _, child = name.rpartition(".")
            if parent in parents:  # never set attributes on the real coral_torch modules
                setattr(parents[parent], child, mod)
        parents["coral"].core = parents["coral.core"]
        parents["coral"].delta = parents["coral.delta"]
        parents["coral"].storage = ALIASES["coral.storage"]
        yield


@pytest.fixture(scope="module")
def chapter_s3(server):
    """Substitution (c): the buckets the chapter names, created on the local moto server."""
    names = set()
    for block in chapter_blocks():
        names |= set(re.findall(r'bucket="([^"]+)"', block.source))
    client = server.client()
    for name in sorted(names):
        client.create_bucket(Bucket=name)
    return server


# ----------------------------------------------------------------------------------- tests
def test_plan_covers_every_block():
    """Every python block of the chapter has a row in PLAN, in order, with its exact free names:
    none is skipped, and an edited chapter is noticed."""
    blocks = chapter_blocks()
    assert len(blocks) == len(PLAN), f"the chapter has {len(blocks)} python blocks, PLAN {len(PLAN)} rows"
    for block, plan in zip(blocks, PLAN):
        assert block.head == plan.head, (plan.id, block.lineno)
        if plan.kind != "syntax":
            assert free_names(block.source) == set(plan.free), plan.id
    assert {p.kind for p in PLAN} == {"run", "definitions", "syntax"}
    assert all(p.check is not None for p in PLAN if p.kind != "syntax")


def test_aliases_name_the_coral_torch_modules(coral_aliases):
    import coral.core.deduplicator
    import coral.core.weight_tensor
    import coral.delta.delta_encoder
    import coral.storage.s3_store
    from coral.storage import HDF5Store as aliased

    assert aliased is HDF5Store and coral.storage.s3_store.S3Store is S3Store
    assert coral.core.weight_tensor.WeightMetadata is WeightMetadata
    assert coral.delta.delta_encoder.DeltaType is DeltaType and coral.delta.delta_encoder.Delta is Delta
    assert coral.core.deduplicator.Deduplicator is Deduplicator


def _params():
    out = []
    for i, plan in enumerate(PLAN):
        marks = [pytest.mark.slow] if plan.slow else []
        out.append(pytest.param(i, id=plan.id, marks=marks))
    return out


@pytest.mark.parametrize("index", _params())
def test_chapter_block(index, request, tmp_path, monkeypatch, coral_aliases):
    blocks = chapter_blocks()
    plan = PLAN[index]
    assert len(blocks) == len(PLAN), "the chapter changed: update PLAN (see test_plan_covers_every_block)"
    block = blocks[index]
    assert block.head == plan.head, f"block {index} of the chapter changed: {block.head!r}"

    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    endpoint = None
    if plan.s3:
        endpoint = request.getfixturevalue("chapter_s3").endpoint
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # the default credential chain's endpoint
    run = Run(block, substitute(block, tmp_path, endpoint), workdir, tmp_path, endpoint)
    ctx = Context(workdir)

    if plan.kind == "syntax":
        check_syntax_error_sketch(run, ctx)
        return

    assert free_names(run.source) == set(plan.free), plan.id
    for rel in plan.files:
        ctx.write_file(rel)
    for bucket in plan.s3_seed:
        with S3Store(S3Config(bucket=bucket)) as s:
            s.store(ctx.weight)
    ns: dict[str, Any] = {"__name__": f"chapter_block_{index}"}
    ns.update({name: ctx.seed(name) for name in sorted(plan.free)})
    try:
        exec(compile_block(block, run.source), ns)  # noqa: S102 - the chapter's own example
        plan.check(ns, ctx, run)
    finally:
        ctx.close(ns)


def check_syntax_error_sketch(run: Run, ctx: Context) -> None:
    """The Deduplicator sketch cannot compile: its parameter list elides the rest with ``...``.
    Nothing else is wrong with it (the error is on that line). What it describes, a deduplicator
    that asks the storage which hashes it already holds and returns the weights still to store,
    is coral_torch's ``Deduplicator(storage=store)``."""
    with pytest.raises(SyntaxError) as exc:
        compile_block(run.block, run.source)
    line = SPEC.read_text().splitlines()[exc.value.lineno - 1]
    assert line.strip() == "def __init__(self, storage: HDF5Store, ...):"
    assert exc.value.lineno == run.block.lineno + 1
    store = ctx.store  # holds ctx.weight
    try:
        new = ctx.weight1
        dedup = Deduplicator(storage=store)
        deduplicated = dedup.deduplicate({"existing": ctx.weight, "new": new})
        assert dict(deduplicated) == {"new": new}  # "New weight, will be stored"
        assert deduplicated.duplicates == {"existing": ctx.hash_key}  # "Reuse existing weight"
        assert deduplicated.name_to_hash == {"existing": ctx.hash_key, "new": new.compute_hash()}
    finally:
        ctx.close({})
