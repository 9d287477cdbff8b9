"""Training-thread stall of a checkpoint of a >= 1B-parameter model on CUDA: ModelCheckpoint's
``torch.save`` vs the ``CoralCheckpoint`` callback's asynchronous path vs a bare pinned copy.

Issue 15, item 6. A stack of 8 square ``nn.Linear`` layers (``memory_bench.build_mlp``, width a
multiple of 64 so that there are >= ``--params`` parameters; 1.2e9 by default: 8 x 12288^2) is
built on the device in each of ``--dtypes`` (bf16: weights and AdamW moments in bf16; fp32), takes
one AdamW step, and then ``--ckpts`` checkpoints of each kind, with one more training step before
every checkpoint (so each one differs from the last). The checkpoint is the Lightning dict
``{"epoch", "global_step", "state_dict", "optimizer_states": [AdamW state], ...}``; its tensors
(weights, both moments) live on the device. Per checkpoint:

  pinned copy      the floor: every tensor copied into page-locked host memory,
                   ``torch.empty(..., pin_memory=True).copy_(t, non_blocking=True)`` then one
                   ``torch.cuda.synchronize()``; "first" allocates the buffers, the others reuse
                   them (what a steady-state snapshot can at best do)
  torch.save       what ``ModelCheckpoint`` blocks the training thread for: ``torch.save`` of the
                   dict to a file (tensors copied to the host inside, no fsync)
  coral async      ``CoralCheckpoint``'s asynchronous save through its Lightning hooks
                   (``peers_bench.CallbackDriver``): stall = ``on_train_epoch_end`` on the
                   training thread (snapshot into reusable pinned host buffers, one synchronize,
                   hand-off); the background commit (hash, delta, encode, write, fsync) is waited
                   for before the next training step and reported as "background s"

Reported: stall of the first checkpoint and the median of the others, bytes written per
checkpoint, background commit time, load time of the last checkpoint with
``map_location=<device>`` (``torch.load`` of the last torch.save file, ``coral_torch.load`` of the
last commit), and the CUDA round trip: the last commit, saved from device tensors, loaded with
``map_location="cuda"`` and compared bit for bit (raw bytes, on the device) with the live tensors,
plus dtype, shape and device of each. Goal printed: steady-state coral stall <= 2x the pinned copy.

Needs free disk for about 3 checkpoints (fp32 at 1.2e9: 14.4 GB each; ``--workdir`` picks the
place) and host memory for about three copies. On one H200 at the default size an estimated 3-6
minutes (not yet measured there: the script was only run on CPU so far).

    .venv/bin/python bench/gpu_bench.py --json gpu.json                  # CUDA, 1.2e9 params, bf16 + fp32
    .venv/bin/python bench/gpu_bench.py --device cpu --quick --params 2e6   # smoke run without a GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from epochs_bench import dir_bytes, iter_tensors  # noqa: E402
from memory_bench import LAYERS, build_mlp, mlp_width, quiet_logs  # noqa: E402
from peers_bench import CallbackDriver  # noqa: E402

import coral_torch  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GOAL_STALL_VS_COPY = 2.0
MB = 1e6


def progress(msg: str) -> None:
    print(f"[gpu_bench] {msg}", file=sys.stderr, flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def device_tensors(ckpt: dict) -> list[torch.Tensor]:
    """The distinct tensors of the checkpoint (tied ones once)."""
    seen: dict[int, torch.Tensor] = {}
    for _, t in iter_tensors(ckpt):
        seen.setdefault(id(t), t)
    return list(seen.values())


def pinned_copy(tensors: list[torch.Tensor], bufs: Optional[list[torch.Tensor]], dev: torch.device):
    """Copy every tensor into page-locked host buffers (allocated when ``bufs`` is None)."""
    pin = dev.type == "cuda"
    if bufs is None:
        bufs = [torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin and t.is_cuda) for t in tensors]
    for b, t in zip(bufs, tensors):
        b.copy_(t, non_blocking=pin)
    sync(dev)
    return bufs


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def round_trip_diffs(loaded: Any, saved: dict, device: torch.device) -> list[str]:
    """Differences between a checkpoint loaded with ``map_location=device`` and the live one: every
    tensor's raw bytes (compared on the live tensor's device), dtype, shape, and that it came back
    on ``device`` (as ``torch.load`` puts it, AdamW's CPU ``step`` included); the same tensor
    names; equal non-tensor top-level values."""
    got = dict(iter_tensors(loaded))
    want = dict(iter_tensors(saved))
    out = [f"missing {n}" for n in want if n not in got] + [f"extra {n}" for n in got if n not in want]
    for name, t in want.items():
        g = got.get(name)
        if g is None:
            continue
        if g.dtype != t.dtype or g.shape != t.shape or g.device.type != device.type:
            out.append(f"{name}: {g.dtype}{list(g.shape)}@{g.device} != {t.dtype}{list(t.shape)}@{device}")
        elif not torch.equal(bits(g.to(t.device)), bits(t)):
            out.append(f"{name}: bytes differ")
    for k, v in saved.items():
        if not isinstance(v, (dict, list, torch.Tensor)) and loaded.get(k) != v:
            out.append(f"{k}: {loaded.get(k)!r} != {v!r}")
    return out


def run_dtype(name: str, args, dev: torch.device, work: Path) -> dict:
    dt = DTYPES[name]
    torch.manual_seed(0)
    width = mlp_width(int(args.params))
    with torch.device(dev):
        model = build_mlp(width).to(dt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch, width, device=dev, dtype=dt)
    y = torch.randn(args.batch, width, device=dev, dtype=dt)
    n_step = 0

    def step() -> None:
        nonlocal n_step
        loss = F.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n_step += 1
        sync(dev)

    def checkpoint() -> dict:
        return {"epoch": n_step, "global_step": n_step, "pytorch-lightning_version": "2.6.6",
                "state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()], "lr_schedulers": [],
                "hparams_name": "kwargs", "hyper_parameters": {"width": width, "dtype": name}}

    step()
    n_params = sum(p.numel() for p in model.parameters())
    ck = checkpoint()
    tensors = device_tensors(ck)
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors)
    progress(f"{name}: {LAYERS} x Linear({width}, {width}) = {n_params / 1e9:.3f}B params on {dev}; "
             f"checkpoint tensors {tensor_bytes / MB:.0f} MB")
    res: dict[str, Any] = {"dtype": name, "params": n_params, "width": width, "tensor_bytes": tensor_bytes}

    # (c) the floor: a bare pinned device-to-host copy of weights + optimizer state
    gc.collect()
    t0 = time.perf_counter()
    bufs = pinned_copy(tensors, None, dev)
    copy_s = [time.perf_counter() - t0]
    for _ in range(args.ckpts - 1):
        t0 = time.perf_counter()
        pinned_copy(tensors, bufs, dev)
        copy_s.append(time.perf_counter() - t0)
    del bufs, tensors, ck
    gc.collect()
    res["pinned_copy"] = {"stall_s": copy_s}
    progress(f"{name}: pinned copy {' '.join(f'{s:.3f}' for s in copy_s)} s")

    # (a) ModelCheckpoint: torch.save on the training thread
    save_s, sizes = [], []
    last_file = None
    for i in range(args.ckpts):
        step()
        ck = checkpoint()
        path = work / f"{name}-modelckpt-{i}.ckpt"
        gc.collect()
        t0 = time.perf_counter()
        torch.save(ck, path)
        save_s.append(time.perf_counter() - t0)
        sizes.append(path.stat().st_size)
        if last_file is not None:
            last_file.unlink()
        last_file = path
        del ck
    t0 = time.perf_counter()
    obj = torch.load(last_file, map_location=dev, weights_only=True)
    sync(dev)
    torch_load_s = time.perf_counter() - t0
    del obj
    last_file.unlink()
    gc.collect()
    res["torch.save"] = {"stall_s": save_s, "bytes": sizes, "load_s": torch_load_s}
    progress(f"{name}: torch.save {' '.join(f'{s:.2f}' for s in save_s)} s, load {torch_load_s:.2f} s")

    # (b) the CoralCheckpoint callback's asynchronous path
    repo = work / f"{name}-coral" / ".coral"
    driver = CallbackDriver(repo, device=dev.type, workers=args.workers)
    stalls, totals, written = [], [], []
    before = 0
    try:
        for i in range(args.ckpts):
            step()
            ck = checkpoint()
            gc.collect()
            stall, total = driver.save(ck)
            stalls.append(stall)
            totals.append(total)
            size = dir_bytes(repo)
            written.append(size - before)
            before = size
            if i < args.ckpts - 1:
                del ck
        driver.close()
        # the CUDA round trip: the last commit (saved from device tensors), loaded onto the device
        t0 = time.perf_counter()
        loaded = coral_torch.load(f"coral://{driver.commits[-1]}", repo=repo, map_location=str(dev))
        sync(dev)
        coral_load_s = time.perf_counter() - t0
        diffs = round_trip_diffs(loaded, ck, dev)
        del loaded, ck
    finally:
        shutil.rmtree(repo.parent, ignore_errors=True)
    res["coral"] = {"stall_s": stalls, "total_s": totals, "background_s": [t - s for s, t in zip(stalls, totals)],
                    "bytes": written, "load_s": coral_load_s, "round_trip_exact": not diffs, "diffs": diffs[:10]}
    progress(f"{name}: coral stall {' '.join(f'{s:.3f}' for s in stalls)} s, background "
             f"{' '.join(f'{t - s:.2f}' for s, t in zip(stalls, totals))} s, round trip "
             f"{'bit-exact' if not diffs else diffs[:3]}")
    return res


def steady(xs: list[float]) -> float:
    """Median of all but the first (which allocates), or the only value."""
    return statistics.median(xs[1:]) if len(xs) > 1 else xs[0]


def report(results: list[dict], dev_name: str) -> bool:
    print(f"\n### checkpoint stall on the training thread, {dev_name}")
    print("| dtype | method | stall first s | stall steady s | x pinned copy | MB / ckpt | background s | load s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    ok_all = True
    for r in results:
        floor = steady(r["pinned_copy"]["stall_s"])
        rows = [("pinned copy", r["pinned_copy"], None, None, None),
                ("torch.save (ModelCheckpoint)", r["torch.save"], r["torch.save"]["bytes"], None,
                 r["torch.save"]["load_s"]),
                ("coral async (callback)", r["coral"], r["coral"]["bytes"], r["coral"]["background_s"],
                 r["coral"]["load_s"])]
        for label, d, sizes, bg, load in rows:
            s = d["stall_s"]
            print(f"| {r['dtype']} ({r['params'] / 1e9:.2f}B) | {label} | {s[0]:.3f} | {steady(s):.3f} "
                  f"| {steady(s) / floor:.2f}x | {'-' if sizes is None else f'{statistics.median(sizes) / MB:.0f}'} "
                  f"| {'-' if bg is None else f'{statistics.median(bg):.2f}'} | {'-' if load is None else f'{load:.2f}'} |")
        ratio = steady(r["coral"]["stall_s"]) / floor
        ok = ratio <= GOAL_STALL_VS_COPY and r["coral"]["round_trip_exact"]
        ok_all &= ok
        print(f"| {r['dtype']} | goal: coral stall <= {GOAL_STALL_VS_COPY:.0f}x pinned copy: {ratio:.2f}x, round trip "
              f"{'bit-exact' if r['coral']['round_trip_exact'] else 'NOT bit-exact'} | {'OK' if ok else 'MISSED'} "
              f"| | | | | |")
    return ok_all


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--params", type=float, default=None, help="minimum parameter count (default 1.2e9; --quick 20e6)")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--ckpts", type=int, default=3, help="checkpoints of each kind (the first allocates)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=None,
                    help="encoder threads of the background commit (default: the callback's choice)")
    ap.add_argument("--workdir", help="where the checkpoint files go (default: a temporary directory)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 20e6 params unless --params, 2 checkpoints")
    ap.add_argument("--json", dest="json_out", help="write the figures to this JSON file")
    args = ap.parse_args(argv)
    if args.params is None:
        args.params = 20e6 if args.quick else 1.2e9
    if args.quick:
        args.ckpts = min(args.ckpts, 2)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_bench: --device {args.device} asked for CUDA, but this torch ({torch.__version__}, CUDA "
              f"{torch.version.cuda or 'not built in'}) sees no CUDA device. Run it on a CUDA machine, or use "
              "--device cpu (everything but the CUDA parts).", file=sys.stderr)
        return 2
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if any(d not in DTYPES for d in dtypes):
        ap.error(f"--dtypes: choose from {', '.join(DTYPES)}")
    warnings.filterwarnings("ignore")
    quiet_logs()
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    base = Path(args.workdir) if args.workdir else None
    if base:
        base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-", dir=base))
    free = shutil.disk_usage(work).free
    approx = 12 * mlp_width(int(args.params)) ** 2 * LAYERS  # fp32 weights + 2 moments
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), coral_torch {coral_torch.__version__}, "
          f"{dev_name}, {os.cpu_count()} CPUs; params >= {args.params:.3g}, dtypes {','.join(dtypes)}, "
          f"{args.ckpts} checkpoints each; workdir {work} ({free / 1e9:.0f} GB free)", flush=True)
    if free < 2.5 * approx:
        progress(f"WARNING: {free / 1e9:.0f} GB free in {work}; an fp32 run needs about {2.5 * approx / 1e9:.0f} GB")
    t0 = time.perf_counter()
    results = []
    try:
        for d in dtypes:
            results.append(run_dtype(d, args, dev, work))
            gc.collect()  # the model and optimizer of that dtype are gone with its frame
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ok = report(results, dev_name)
    wall = time.perf_counter() - t0
    print(f"total {wall:.0f}s")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"device": dev_name, "torch": torch.__version__,
                                                   "cuda": torch.version.cuda, "args": vars(args),
                                                   "results": results, "wall_s": wall, "goal_met": ok}, indent=1))
        print(f"wrote {args.json_out}")
    return 0 if all(r["coral"]["round_trip_exact"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
