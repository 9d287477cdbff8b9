"""What stays resident in a long-lived process between ``coral_torch.save`` calls, and why.

Issue 21 asked whether the memory a process keeps after saving is live objects, handle caches or
allocator arenas. This saves the epoch checkpoints of ``bench/peers_bench.py`` (its ``--inputs-dir``)
one after another in one process and prints, after each save (garbage collected, ``malloc_trim``):
the RSS above the baseline (modules already imported), the Python-visible allocations still live
(``tracemalloc``: Python objects and numpy buffers), and glibc's per-arena statistics at the end.
Run it under different ``MALLOC_*`` settings to see the arenas' share::

    .venv/bin/python bench/peers_bench.py --inputs-dir /tmp/peers-inputs --methods torch.save --repeat 1
    .venv/bin/python bench/resident_bench.py --inputs-dir /tmp/peers-inputs --workload random
    MALLOC_ARENA_MAX=1 .venv/bin/python bench/resident_bench.py --inputs-dir /tmp/peers-inputs --workload random
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import tempfile
import tracemalloc
from pathlib import Path

import h5py  # noqa: F401  # imported before the baseline: modules are not what this measures
import torch
import zstandard  # noqa: F401

import coral_torch
from coral_torch.repository.handles import close_repositories

MB = 2**20
_libc = ctypes.CDLL("libc.so.6")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


def settle() -> None:
    gc.collect()
    _libc.malloc_trim(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs-dir", required=True, help="peers_bench's --inputs-dir (epoch checkpoints)")
    ap.add_argument("--workload", default="random", choices=["text", "random"])
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    meta = json.loads((Path(args.inputs_dir) / args.workload / "meta.json").read_text())
    ckpts = [torch.load(f, weights_only=False) for f in meta["files"]]
    size = Path(meta["files"][0]).stat().st_size / MB
    work = Path(tempfile.mkdtemp(prefix="resident-bench-"))
    print(f"{len(ckpts)} checkpoints of {size:.0f} MB ({args.workload}); MALLOC settings: "
          + (" ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_")) or "glibc defaults"))
    settle()
    base = rss_mb()
    tracemalloc.start()
    for i, ck in enumerate(ckpts):
        coral_torch.save(ck, work / f"epoch{i}.pt")
        settle()
        traced = tracemalloc.get_traced_memory()[0] / MB
        print(f"after save {i}: RSS +{rss_mb() - base:.0f} MB, of which live Python objects and numpy buffers {traced:.1f} MB")
    close_repositories()
    settle()
    print(f"after closing the repository handles: RSS +{rss_mb() - base:.0f} MB")
    print("glibc arenas (system bytes = held from the OS, in use = allocated):", flush=True)
    _libc.malloc_stats()  # to stderr


if __name__ == "__main__":
    main()
