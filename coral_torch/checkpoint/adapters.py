"""Turn any object `torch.save` takes in practice into tensors + a JSON skeleton, and back.

``flatten(obj)`` walks dicts (OrderedDict and Lightning's AttributeDict kept as such, with
``state_dict()._metadata``), lists, tuples, sets and scalars, replacing every tensor with a slot in
a tensor table. Tied tensors (the same tensor, or the same view of one storage) get one slot, so
they are stored once and come back shared. Values the skeleton cannot express natively are kept as
a ``torch.save`` blob and read back with ``torch.load(weights_only=True)``: the load path never
runs arbitrary code unless the caller asks for ``weights_only=False``.

A tensor's values are stored on their own (a view is stored as its values, never with the rest of
its storage). A non-contiguous tensor whose strides do not overlap (a transpose, ``x[:, ::2]``, a
channels-last weight) keeps them: its skeleton node gets ``"stride"`` and it comes back from
:func:`unflatten` with the same shape, values and ``stride()``, as from ``torch.load`` (in storage
of its own that spans what those strides reach; gaps zeroed). A tensor with overlapping strides
(``expand``) comes back contiguous, as do contiguous tensors whose size-1 dimensions had unusual
strides; their nodes, like every contiguous tensor's, are unchanged. Sparse, quantized, meta and
nested tensors are refused (:class:`~coral_torch.errors.UnsupportedTensorError`) before anything
is written.

Tensor names are paths of keys joined by "/", e.g. ``state_dict/encoder.weight`` or
``optimizer_states/0/state/3/exp_avg``; delta encoding pairs tensors across checkpoints by name.
"""

from __future__ import annotations

import base64
import collections
import io
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import CatalogDamagedError, CoralError, UnsafeCheckpointError, UnsupportedTensorError
from ..format.weight_tensor import WeightMetadata, WeightTensor


@dataclass
class TensorSlot:
    name: str
    weight: WeightTensor
    device: str
    kind: str = "tensor"  # "tensor" | "parameter" | "numpy"
    requires_grad: bool = False


@dataclass
class Flattened:
    skeleton: Any
    slots: list[TensorSlot] = field(default_factory=list)


def _dict_class_name(d: dict) -> str | None:
    cls = type(d)
    if cls is dict:
        return "dict"
    if cls is collections.OrderedDict:
        return "odict"
    if cls.__name__ == "AttributeDict" and cls.__module__.split(".")[0] in (
        "lightning",
        "pytorch_lightning",
        "lightning_fabric",
    ):
        return "attrdict"
    return None


def _attrdict_class():
    try:
        from lightning.fabric.utilities.data import AttributeDict
    except ImportError:  # pragma: no cover
        from collections import OrderedDict as AttributeDict  # type: ignore
    return AttributeDict


def flatten(obj: Any) -> Flattened:
    """Split ``obj`` into a JSON-safe skeleton and a list of tensor slots."""
    slots: list[TensorSlot] = []
    seen: dict[tuple, int] = {}

    def tensor_node(t: torch.Tensor, path: str, kind: str) -> dict:
        if getattr(t, "is_nested", False):  # before anything asks its sizes: torch raises internals then
            raise UnsupportedTensorError(
                f"nested tensors are not supported ({path or 'the checkpoint itself'} is one, layout {t.layout}); "
                "store t.unbind() (a list of tensors) instead"
            )
        key = None
        if t.layout == torch.strided and t.device.type != "meta":
            try:
                key = (
                    t.untyped_storage().data_ptr(),
                    t.device.type,
                    t.device.index,
                    t.storage_offset(),
                    tuple(t.shape),
                    tuple(t.stride()),
                    t.dtype,
                )
            except (RuntimeError, NotImplementedError):
                key = None
        if key is not None and key in seen and key[0] != 0:
            idx = seen[key]
        else:
            weight = WeightTensor(t, WeightMetadata(name=path, shape=tuple(t.shape), dtype=t.dtype))
            slots.append(TensorSlot(path, weight, str(t.device), kind, bool(t.requires_grad)))
            idx = len(slots) - 1
            if key is not None and key[0] != 0:
                seen[key] = idx
        node: dict[str, Any] = {"t": "tensor", "i": idx}
        if kind == "parameter":
            node.update(param=True, rg=bool(t.requires_grad))
        stride = kept_stride(t) if kind != "numpy" else None
        if stride is not None:  # on every node of the slot: prune() may drop the first one
            node["stride"] = stride
        return node

    def walk(x: Any, path: str) -> Any:
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, int) and type(x) is int:
            return x
        if type(x) is float:
            return x if math.isfinite(x) else {"t": "float", "v": repr(x)}
        if isinstance(x, torch.nn.Parameter):
            return tensor_node(x, path, "parameter")
        if isinstance(x, torch.Tensor):
            return tensor_node(x, path, "tensor")
        if isinstance(x, np.ndarray):
            if x.dtype.hasobject or x.dtype.kind not in "biufc":
                return _blob(x)
            # not np.ascontiguousarray: it turns a 0-d array into a 1-d one
            arr = x if x.flags.c_contiguous else np.array(x, order="C")
            return {"t": "ndarray", "i": tensor_node(torch.from_numpy(arr), path, "numpy")["i"]}
        if isinstance(x, np.generic):
            arr = np.asarray(x)
            if arr.dtype.hasobject:
                return _blob(x)
            return {"t": "npscalar", "dtype": arr.dtype.str, "v": base64.b64encode(arr.tobytes()).decode()}
        if isinstance(x, dict):
            cls = _dict_class_name(x)
            if cls is None:
                return _blob(x)
            keys = list(x.keys())
            node = {
                "t": cls,
                "k": [walk_key(k) for k in keys],
                "v": [walk(x[k], _join(path, k)) for k in keys],
            }
            meta = getattr(x, "_metadata", None)
            if meta is not None:
                node["meta"] = walk(meta, _join(path, "_metadata"))
            return node
        if type(x) is list:
            return {"t": "list", "v": [walk(v, _join(path, i)) for i, v in enumerate(x)]}
        if type(x) is tuple:
            return {"t": "tuple", "v": [walk(v, _join(path, i)) for i, v in enumerate(x)]}
        if isinstance(x, torch.Size):
            return {"t": "size", "v": list(x)}
        if isinstance(x, torch.dtype):
            return {"t": "dtype", "v": str(x).removeprefix("torch.")}
        if isinstance(x, torch.device):
            return {"t": "device", "v": str(x)}
        if type(x) in (set, frozenset):
            try:
                items = sorted(x)
            except TypeError:
                items = list(x)
            return {"t": type(x).__name__, "v": [walk(v, path) for v in items]}
        if type(x) is complex:
            return {"t": "complex", "v": [repr(x.real), repr(x.imag)]}
        if type(x) is bytes:
            return {"t": "bytes", "v": base64.b64encode(x).decode()}
        if isinstance(x, slice):
            return {"t": "slice", "v": [walk(x.start, path), walk(x.stop, path), walk(x.step, path)]}
        return _blob(x)

    def walk_key(k: Any) -> Any:
        if isinstance(k, str):
            return k
        return walk(k, "")

    skeleton = walk(obj, "")
    return Flattened(skeleton, slots)


def kept_stride(t: torch.Tensor) -> list[int] | None:
    """The strides to record for ``t``: ``None`` (nothing recorded, the node as it always was) when
    it is contiguous, or when its strides overlap (``expand``) and so cannot lay out values of
    their own."""
    if t.layout != torch.strided or t.device.type == "meta" or t.is_contiguous():
        return None
    stride = [int(s) for s in t.stride()]
    return stride if _non_overlapping(tuple(t.shape), stride) else None


def _non_overlapping(shape: tuple[int, ...], stride: list[int]) -> bool:
    """Whether no two elements of ``shape`` laid out with ``stride`` share a place (gaps allowed):
    ordered by stride, each dimension's stride must exceed the last offset the smaller ones reach."""
    reach = 0
    for st, n in sorted((st, n) for n, st in zip(shape, stride) if n > 1):
        if st <= reach:
            return False
        reach += (n - 1) * st
    return True


def _restride(t: torch.Tensor, stride: Any, i: int) -> torch.Tensor:
    """``t``'s values in a new tensor laid out with the stored ``stride`` (checked first)."""
    if not (
        isinstance(stride, list)
        and len(stride) == t.dim()
        and all(type(s) is int and 0 <= s < 2**48 for s in stride)
        and _non_overlapping(tuple(t.shape), stride)
    ):
        raise CatalogDamagedError(f"tensor {i} has malformed strides {str(stride)[:60]} for shape {list(t.shape)}")
    if t.numel() == 0 or list(t.stride()) == stride:
        return t
    out = torch.empty_strided(tuple(t.shape), stride, dtype=t.dtype, device=t.device)
    if out.device.type != "meta":
        if out.untyped_storage().nbytes() > t.numel() * t.element_size():
            # the gaps between the values: no stale memory in them (torch's stubs lack UntypedStorage.fill_)
            out.untyped_storage().fill_(0)  # type: ignore[attr-defined]
        out.copy_(t)
    return out


def _join(path: str, key: Any) -> str:
    k = str(key)
    return k if not path else f"{path}/{k}"


def _blob(x: Any) -> dict:
    """Fallback for values the skeleton has no form for: a torch.save blob, restored weights_only."""
    buf = io.BytesIO()
    try:
        torch.save(x, buf)
    except Exception as exc:
        raise CoralError(f"cannot store a value of type {type(x).__name__}: torch.save refuses it ({exc})") from exc
    return {
        "t": "blob",
        "type": f"{type(x).__module__}.{type(x).__qualname__}",
        "v": base64.b64encode(buf.getvalue()).decode(),
    }


def unflatten(
    skeleton: Any,
    tensors: list[torch.Tensor],
    *,
    weights_only: bool = True,
) -> Any:
    """Rebuild the object from its skeleton and the list of tensors (slot order)."""
    made: dict[int, torch.Tensor] = {}  # slot i: its tensor laid out as saved; -1 - i: its Parameter

    def laid_out(node: dict) -> torch.Tensor:
        i = node["i"]
        if i not in made:
            made[i] = tensors[i] if node.get("stride") is None else _restride(tensors[i], node["stride"], i)
        return made[i]

    def tensor(node: dict) -> torch.Tensor:
        i = node["i"]
        if node.get("param"):
            key = -1 - i
            if key not in made:
                made[key] = torch.nn.Parameter(laid_out(node), requires_grad=bool(node.get("rg", True)))
            return made[key]
        return laid_out(node)

    def build(n: Any) -> Any:
        if n is None or isinstance(n, (bool, str, int, float)):
            return n
        if isinstance(n, list):  # never produced, tolerate
            return [build(v) for v in n]
        t = n["t"]
        if t == "tensor":
            return tensor(n)
        if t == "ndarray":
            return tensors[n["i"]].cpu().numpy()
        if t in ("dict", "odict", "attrdict"):
            # only an AttributeDict needs lightning imported (seconds): never for a plain dict
            cls = {"dict": dict, "odict": collections.OrderedDict}[t] if t != "attrdict" else _attrdict_class()
            out: Any = cls()
            for k, v in zip(n["k"], n["v"]):
                out[build(k)] = build(v)
            if "meta" in n:
                out._metadata = build(n["meta"])
            return out
        if t == "list":
            return [build(v) for v in n["v"]]
        if t == "tuple":
            return tuple(build(v) for v in n["v"])
        if t == "float":
            return float(n["v"])
        if t == "npscalar":
            return np.frombuffer(base64.b64decode(n["v"]), dtype=np.dtype(n["dtype"]))[0].copy()
        if t == "size":
            return torch.Size(n["v"])
        if t == "dtype":
            dt = getattr(torch, str(n["v"]), None)
            if not isinstance(dt, torch.dtype):
                raise CoralError(f"stored dtype {n['v']!r} is not a torch dtype: the checkpoint is damaged")
            return dt
        if t == "device":
            return torch.device(n["v"])
        if t == "set":
            return {build(v) for v in n["v"]}
        if t == "frozenset":
            return frozenset(build(v) for v in n["v"])
        if t == "complex":
            return complex(float(n["v"][0]), float(n["v"][1]))
        if t == "bytes":
            return base64.b64decode(n["v"])
        if t == "slice":
            return slice(*(build(v) for v in n["v"]))
        if t == "blob":
            return _load_blob(n, weights_only)
        raise CoralError(f"unknown skeleton node type {t!r}: the checkpoint was written by a newer coral-torch?")

    return build(skeleton)


def _load_blob(node: dict, weights_only: bool) -> Any:
    data = base64.b64decode(node["v"])
    try:
        return torch.load(io.BytesIO(data), weights_only=weights_only, map_location="cpu")
    except Exception as exc:
        first = _first_line(exc)
        if weights_only and "weights only" in first.lower() + str(exc).lower():
            raise UnsafeCheckpointError(
                f"a stored value of type {node.get('type')} can only be rebuilt by running pickled code: "
                "load with weights_only=False if you trust this checkpoint"
            ) from exc
        raise CoralError(
            f"a stored value of type {node.get('type')} cannot be rebuilt ({type(exc).__name__}: {first[:160]})"
        ) from exc


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, without terminal colour codes."""
    text = _ANSI.sub("", str(exc))
    return next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)


_LEAVES = frozenset({"float", "npscalar", "size", "dtype", "device", "complex", "bytes", "blob"})
_CONTAINERS = frozenset({"list", "tuple", "set", "frozenset", "slice"})


def check_skeleton(skeleton: Any, n_tensors: int) -> None:
    """Check a stored skeleton's structure without building anything (no tensors, no blobs
    loaded): known node types, well-formed containers, tensor indices within ``n_tensors``.
    Raises :class:`~coral_torch.errors.CoralError` naming the first problem."""
    stack = [skeleton]
    while stack:
        n = stack.pop()
        if n is None or isinstance(n, (bool, str, int, float)):
            continue
        if isinstance(n, list):
            stack.extend(n)
            continue
        if not isinstance(n, dict) or not isinstance(n.get("t"), str):
            raise CoralError(f"malformed skeleton node {str(n)[:60]!r}")
        t = n["t"]
        if t in ("tensor", "ndarray"):
            i = n.get("i")
            if type(i) is not int or not 0 <= i < n_tensors:
                raise CoralError(f"skeleton names tensor {i!r} of {n_tensors}")
            st = n.get("stride")
            if st is not None and not (isinstance(st, list) and all(type(s) is int and s >= 0 for s in st)):
                raise CoralError(f"skeleton gives tensor {i} malformed strides {str(st)[:60]}")
        elif t in ("dict", "odict", "attrdict"):
            if not isinstance(n.get("k"), list) or not isinstance(n.get("v"), list) or len(n["k"]) != len(n["v"]):
                raise CoralError("malformed dict node in skeleton")
            stack.extend(n["k"])
            stack.extend(n["v"])
            if "meta" in n:
                stack.append(n["meta"])
        elif t in _CONTAINERS:
            if not isinstance(n.get("v"), list):
                raise CoralError(f"malformed {t} node in skeleton")
            stack.extend(n["v"])
        elif t not in _LEAVES:
            raise CoralError(f"unknown skeleton node type {t!r}")


def apply_map_location(t: torch.Tensor, saved_device: str, map_location: Any) -> torch.Tensor:
    """Move a freshly loaded CPU tensor where ``torch.load(map_location=...)`` would put it."""
    if map_location is None:
        target = saved_device
    elif isinstance(map_location, (str, torch.device)):
        target = str(map_location)
    elif isinstance(map_location, dict):
        target = map_location.get(saved_device, saved_device)
        target = str(target)
    elif callable(map_location):
        result = map_location(t.untyped_storage(), saved_device)
        if result is None:
            target = saved_device
        else:
            target = str(getattr(result, "device", "cpu"))
    else:
        raise CoralError(
            f"map_location must be None, a str, a torch.device, a dict or a callable, not {type(map_location).__name__}"
        )
    if torch.device(target).type == "cpu":
        return t
    if torch.device(target).type == "cuda" and not torch.cuda.is_available():
        raise CoralError(
            f"the checkpoint holds tensors saved on {saved_device} but CUDA is not available; pass map_location='cpu'"
        )
    return t.to(target)


def prune(skeleton: Any, paths: Any) -> tuple[Any, list[int] | None]:
    """Empty the containers at ``paths`` in a skeleton and renumber its tensor slots.

    Each path is a tuple of keys from the top (``"*"`` matches any key or list index), e.g.
    ``("optimizer_states", "*", "state")``: the per-parameter optimizer state of every optimizer,
    leaving its ``param_groups``. A matched dict/list/tuple keeps its type and becomes empty.
    Returns ``(new skeleton, old slot index for each new slot)``, or ``(skeleton, None)`` when
    nothing matched a non-empty container.
    """
    patterns = [tuple(str(k) for k in p) for p in paths]
    changed = False

    def key_of(k: Any) -> str | None:
        return k if isinstance(k, str) else None

    def empty(n: Any) -> Any:
        nonlocal changed
        t = n.get("t") if isinstance(n, dict) else None
        if t in ("dict", "odict", "attrdict") and n["k"]:
            changed = True
            return dict(n, k=[], v=[])
        if t in ("list", "tuple") and n["v"]:
            changed = True
            return dict(n, v=[])
        return n

    def walk(n: Any, depth_patterns: list[tuple[str, ...]]) -> Any:
        if any(len(p) == 0 for p in depth_patterns):
            return empty(n)
        t = n.get("t") if isinstance(n, dict) else None
        if t in ("dict", "odict", "attrdict"):
            vals = []
            for k, v in zip(n["k"], n["v"]):
                name = key_of(k)
                sub = [p[1:] for p in depth_patterns if p[0] == "*" or (name is not None and p[0] == name)]
                vals.append(walk(v, sub) if sub else v)
            return dict(n, v=vals)
        if t in ("list", "tuple"):
            vals = []
            for i, v in enumerate(n["v"]):
                sub = [p[1:] for p in depth_patterns if p[0] in ("*", str(i))]
                vals.append(walk(v, sub) if sub else v)
            return dict(n, v=vals)
        return n

    pruned = walk(skeleton, patterns) if patterns else skeleton
    if not changed:
        return skeleton, None
    order: list[int] = []
    remap: dict[int, int] = {}

    def renumber(n: Any) -> Any:
        if isinstance(n, dict):
            out = {k: renumber(v) for k, v in n.items()}
            if n.get("t") in ("tensor", "ndarray") and "i" in n:
                old = n["i"]
                if old not in remap:
                    remap[old] = len(order)
                    order.append(old)
                out["i"] = remap[old]
            return out
        if isinstance(n, list):
            return [renumber(v) for v in n]
        return n

    return renumber(pruned), order
