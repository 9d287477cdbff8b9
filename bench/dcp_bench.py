"""Sharded saves: coral_torch.dcp vs torch.distributed.checkpoint's FileSystemWriter, in one run.

Two ranks (gloo, CPU) train an FSDP2 MLP (``--params``, default 52M parameters) with AdamW and save
its full state (model + optimizer) ``--saves`` times (default 5) with training steps in between,
then load every save back into a fresh sharded model. Methods, each in its own pair of processes:

  fs        ``dcp.save(storage_writer=FileSystemWriter(dir))``, one directory per save
  fs-zstd   the same with DCP's (experimental) ZStandard stream extension
  fs-async  ``dcp.async_save`` with FileSystemWriter (blocking = until it returns)
  coral     ``dcp.save(storage_writer=CoralStorageWriter(repo))``: one repository, dedup + deltas
  coral-async  ``dcp.async_save`` with CoralStorageWriter

Printed per method (rank 0's wall times; bytes on disk summed over the saves): bytes, blocking save
time, total save time, load time, each also as a ratio to ``fs``.

    .venv/bin/python bench/dcp_bench.py                  # ~5 min on 2 cores
    .venv/bin/python bench/dcp_bench.py --params 4e6 --saves 3   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

METHODS = ("fs", "fs-zstd", "fs-async", "coral", "coral-async")


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(method: str, root: Path, params: float, saves: int, out: Path) -> None:
    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from coral_torch.dcp import CoralStorageReader, CoralStorageWriter

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    width = 1024
    layers = max(1, int(params / (width * width + width)))

    def build():
        torch.manual_seed(0)
        m = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
        for layer in m:
            fully_shard(layer)
        fully_shard(m)
        return m

    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        x = torch.randn(8, width)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    # a DTensor's numel() is the global tensor's: this is the whole model
    res = {"blocking": [], "total": [], "load": [], "bytes": 0, "params": sum(p.numel() for p in model.parameters())}
    targets = []
    for i in range(saves):
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dist.barrier()
        t0 = time.perf_counter()
        if method == "coral":
            w = CoralStorageWriter(root / ".coral", run="bench")
            dcp.save(state, storage_writer=w)
            targets.append(w.commit_id)
            t1 = t2 = time.perf_counter()
        elif method in ("fs-async", "coral-async"):
            d = root / f"s{i}"
            w = CoralStorageWriter(root / ".coral", run="bench") if method == "coral-async" else FileSystemWriter(d)
            fut = dcp.async_save(state, storage_writer=w)
            t1 = time.perf_counter()
            fut.result()
            t2 = time.perf_counter()
            targets.append(w.commit_id if method == "coral-async" else d)
        else:
            from torch.distributed.checkpoint._extension import ZStandard

            d = root / f"s{i}"
            ext = [ZStandard()] if method == "fs-zstd" else None
            dcp.save(state, storage_writer=FileSystemWriter(d, _extensions=ext) if ext else FileSystemWriter(d))
            t1 = t2 = time.perf_counter()
            targets.append(d)
        dist.barrier()
        res["blocking"].append(t1 - t0)
        res["total"].append(t2 - t0)
        for _ in range(2):
            step()
    fresh = build()
    fopt = torch.optim.AdamW(fresh.parameters(), lr=1e-4)
    for t in targets:
        msd, osd = get_state_dict(fresh, fopt)
        state = {"model": msd, "optim": osd}
        dist.barrier()
        t0 = time.perf_counter()
        reader = CoralStorageReader(root / ".coral", t) if method.startswith("coral") else FileSystemReader(t)
        dcp.load(state, storage_reader=reader)
        dist.barrier()
        res["load"].append(time.perf_counter() - t0)
    if rank == 0:
        res["bytes"] = dir_bytes(root)
        out.write_text(json.dumps(res))
    dist.destroy_process_group()


def run_method(method: str, params: float, saves: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix=f"dcpb-{method}-"))
    out = root.parent / f"{root.name}.json"
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, __file__, "--rank-main", method, str(root), str(params),
                                       str(saves), str(out)], env=env))
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"{method}: a rank failed ({p.returncode})")
    res = json.loads(out.read_text())
    shutil.rmtree(root, ignore_errors=True)
    out.unlink()
    return res


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-main":
        _, _, method, root, params, saves, out = sys.argv
        rank_main(method, Path(root), float(params), int(saves), Path(out))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=52e6)
    ap.add_argument("--saves", type=int, default=5)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--json")
    a = ap.parse_args()
    results = {m: run_method(m, a.params, a.saves) for m in a.methods.split(",")}
    base = results.get("fs")
    n = next(iter(results.values()))["params"]
    print(f"\n2 ranks (gloo, CPU), FSDP2 MLP of {n / 1e6:.1f}M parameters + AdamW, {a.saves} saves, 2 steps between")
    print(f"{'method':10} {'bytes MB':>10} {'x fs':>6} {'block s':>8} {'x fs':>6} {'total s':>8} {'x fs':>6} "
          f"{'load s':>7} {'x fs':>6}")
    for m, r in results.items():
        b, bl, tot, ld = r["bytes"], sum(r["blocking"]), sum(r["total"]), sum(r["load"])

        def x(v, key):
            if base is None:
                return "   -  "
            ref = {"bytes": base["bytes"], "blocking": sum(base["blocking"]), "total": sum(base["total"]),
                   "load": sum(base["load"])}[key]
            return f"{v / ref:6.2f}"

        print(f"{m:10} {b / 1e6:10.1f} {x(b, 'bytes')} {bl:8.2f} {x(bl, 'blocking')} {tot:8.2f} {x(tot, 'total')} "
              f"{ld:7.2f} {x(ld, 'load')}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
