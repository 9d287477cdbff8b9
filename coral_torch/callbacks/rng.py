"""What Lightning does not save but an exact resume needs: the Python, NumPy, torch (and CUDA) RNG
states, and the train loaders' own ``torch.Generator``s (``DataLoader(shuffle=True, generator=...)``,
their samplers'), so that 2 + 2 epochs draw the same numbers as 4 straight."""

from __future__ import annotations

import random
from typing import Any, cast

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    # the legacy global RandomState (MT19937) always gives the tuple; numpy's stubs say it may be a dict
    state_tuple = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
    name, keys, pos, has_gauss, gauss = state_tuple
    state: dict[str, Any] = {
        "python": random.getstate(),
        # plain values and tensors only: files exported from a commit must load with weights_only=True
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    if "python" in state:
        v = state["python"]
        random.setstate((v[0], tuple(v[1]), v[2]) if isinstance(v, (list, tuple)) else v)
    if "numpy" in state:
        n = state["numpy"]
        if isinstance(n, dict):
            np.random.set_state(
                (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
            )
        else:
            np.random.set_state(tuple(n))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def flatten_loaders(loaders: Any) -> list[Any]:
    """The loaders of Lightning's ``trainer.train_dataloader`` (one, or a list/dict of them), in order."""
    if loaders is None:
        return []
    if isinstance(loaders, dict):
        return [x for k in loaders for x in flatten_loaders(loaders[k])]
    if isinstance(loaders, (list, tuple)):
        return [x for v in loaders for x in flatten_loaders(v)]
    return [loaders]


def loader_generators(loaders: list[Any]) -> list[torch.Generator]:
    """Every distinct ``torch.Generator`` a loader draws from: its own (worker seeds), its
    sampler's and its batch sampler's (shuffling), in a fixed discovery order."""
    found: list[torch.Generator] = []
    for loader in loaders:
        sampler = getattr(loader, "sampler", None)
        batch_sampler = getattr(loader, "batch_sampler", None)
        for g in (
            getattr(loader, "generator", None),
            getattr(sampler, "generator", None),
            getattr(batch_sampler, "generator", None),
            getattr(getattr(batch_sampler, "sampler", None), "generator", None),
        ):
            if isinstance(g, torch.Generator) and all(g is not x for x in found):
                found.append(g)
    return found
