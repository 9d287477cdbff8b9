"""Child process for tests/repository/test_crash_safety.py: saves checkpoints into one repository until killed.

    python tests/_crash_worker.py REPO SEED            save forever, continuing from the repository's
                                                       latest epoch
    python tests/_crash_worker.py REPO SEED --zygote   import once, then fork one such saver for each
                                                       "spawn" line read on stdin (a restart costs
                                                       milliseconds instead of a Python + torch start-up)

Every line goes to stdout in a single write. A saver prints ``READY <pid>``, ``BEGIN <epoch>`` before
each commit, ``DONE <commit_id> <epoch>`` once :meth:`Repository.commit` has returned, and ``GC``/
``GCDONE`` around a garbage collection (every fifth epoch, after a throw-away commit). The zygote
prints ``ZYGOTE <pid>``, ``PID <pid>`` for each saver it starts and ``EXIT <pid> <status>`` once that
saver has died.

The checkpoint of an epoch is a pure function of (seed, epoch) -- :func:`checkpoint` -- so the parent
can rebuild what every reported commit must contain.
"""

from __future__ import annotations

import collections
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coral_torch import DeltaConfig, Repository  # noqa: E402

MAX_CHAIN = 3
GC_EVERY = 5


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def checkpoint(seed: int, epoch: int) -> dict:
    """Epoch ``epoch`` of a deterministic "training run": weights drift a little every epoch (so XOR
    deltas pay), one layer is frozen (deduplicated), a bf16 embedding, optimizer-like state."""
    base = seed * 1_000_003
    noise = base + 7919 * (epoch + 1)
    sd = collections.OrderedDict()
    for i in range(4):
        sd[f"layers.{i}.weight"] = _randn(base + i, 192, 256) + 1e-3 * _randn(noise + i, 192, 256)
        sd[f"layers.{i}.bias"] = _randn(noise + 100 + i, 192)
    sd["frozen.weight"] = _randn(base + 50, 256, 256)
    sd["emb.weight"] = (_randn(base + 60, 64, 256) + 1e-2 * _randn(noise + 60, 64, 256)).to(torch.bfloat16)
    sd["counter"] = torch.tensor(epoch, dtype=torch.int64)
    sd._metadata = collections.OrderedDict([("", {"version": 1}), ("layers", {"version": 2})])
    return {
        "epoch": epoch,
        "global_step": 100 * epoch,
        "state_dict": sd,
        "optimizer_states": [{
            "state": {0: {"step": torch.tensor(float(epoch)), "exp_avg": 1e-2 * _randn(noise + 200, 192, 256)}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}],
        }],
        "seed": seed,
    }


def scratch(seed: int, epoch: int) -> dict:
    """A throw-away checkpoint (no ref keeps it): material for the next gc."""
    return {"epoch": epoch, "scratch": _randn(seed * 31 + epoch, 128, 128)}


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())


def save_loop(repo_path: str, seed: int) -> None:
    torch.set_num_threads(1)
    repo = Repository(repo_path, delta_config=DeltaConfig(max_chain_length=MAX_CHAIN))
    say(f"READY {os.getpid()}")
    epoch = -1
    latest = repo.refs("runs/main/").get("runs/main/latest")
    if latest is not None:
        epoch = repo.load(latest)["epoch"]  # resume: also primes the delta bases
    while True:
        epoch += 1
        obj = checkpoint(seed, epoch)
        say(f"BEGIN {epoch}")
        stats = repo.commit(obj, run="main", metrics={"loss": 1.0 / (epoch + 1)}, monitor="loss")
        say(f"DONE {stats.commit_id} {epoch}")
        if epoch % GC_EVERY == GC_EVERY - 1:
            repo.commit(scratch(seed, epoch), run="scratch", keep=False, head=False)
            say(f"GC {epoch}")
            repo.gc()
            say(f"GCDONE {epoch}")


def zygote(repo_path: str, seed: int) -> None:
    say(f"ZYGOTE {os.getpid()}")
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            return
        if cmd != "spawn":
            continue
        pid = os.fork()
        if pid == 0:  # the saver
            try:
                save_loop(repo_path, seed)
            except BaseException as exc:  # pragma: no cover - reported to the parent
                say(f"ERROR {type(exc).__name__}: {exc}")
            finally:
                os._exit(1)
        say(f"PID {pid}")
        _, status = os.waitpid(pid, 0)
        say(f"EXIT {pid} {status}")


if __name__ == "__main__":
    path, seed = sys.argv[1], int(sys.argv[2])
    if "--zygote" in sys.argv[3:]:
        zygote(path, seed)
    else:
        save_loop(path, seed)
