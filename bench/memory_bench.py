"""Memory benchmark: peak RSS that checkpointing adds, as a multiple of the checkpoint size.

Issue 12, requirement 3 (bounded memory). Every case runs in a fresh child process (this script
started again with ``--case NAME``), so no case inherits another's heap, caches or peak. Peak RSS
is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the child; the checkpoint size is the size
of a full ``torch.save`` file of the checkpoint (weights + AdamW moments).

The model is a wide MLP (8 ``nn.Linear`` layers of ``width x width``, ``width`` a multiple of 64
chosen so that there are at least ``--params`` parameters) trained on CPU with AdamW, 2 threads.

Lightning cases (2 epochs of a few tiny-batch steps; each run's whole-process peak):
  lightning-none          no checkpointing: the baseline
  lightning-modelckpt     ``ModelCheckpoint(save_top_k=-1)``, a save every epoch
  lightning-coral-async   ``CoralCheckpoint()`` (asynchronous, the default)
  lightning-coral-sync    ``CoralCheckpoint(async_save=False)``
  extra = peak RSS of the run - peak RSS of ``lightning-none``; the checkpoint size is that of
  the last ``ModelCheckpoint`` file.

API cases (the same model, one AdamW step taken, gradients kept, the Lightning-style checkpoint
dict built from references to the live tensors; then, right before the measured action, garbage
is collected, glibc is asked to return free memory (``malloc_trim``), the peak is reset to the
current RSS (``echo 5 > /proc/self/clear_refs``, which also resets ``ru_maxrss``) and the baseline
is read from ``/proc/self/status`` ``VmRSS``):
  torch-save     ``torch.save`` of the checkpoint to 3 files; between saves every weight and
                 moment moves a little, in place (an AdamW-like update that allocates nothing)
  coral-save     ``coral_torch.save`` of the same 3 evolving checkpoints to 3 files of one
                 repository (saves 2 and 3 delta against their predecessors)
  extra = peak RSS - baseline.
Load cases (a fresh process with torch and coral_torch imported, nothing else):
  torch-load     ``torch.load`` of the 3rd ``torch-save`` file
  coral-load     ``coral_torch.load`` of the 3rd ``coral-save`` pointer
  extra = peak RSS - baseline - checkpoint size, i.e. what loading needs beyond the object it
  returns (0.0 is ideal).

Caveats: the Lightning figures are differences of whole-run peaks, so a checkpoint's extra memory
shows only where it rises above the training step's own short-lived memory (about 0.1x here:
AdamW on CPU updates one tensor at a time and the batches are tiny). RSS counts the resident pages
of memory-mapped files but not the page cache of files read or written.

Usage (one run at a time: parallel runs compete for memory and cores)::

    .venv/bin/python bench/memory_bench.py               # >= 100M parameters (~1.2 GB checkpoint)
    .venv/bin/python bench/memory_bench.py --quick       # >= 20M parameters, a smoke run
    .venv/bin/python bench/memory_bench.py --params 50e6 --steps 2
    .venv/bin/python bench/memory_bench.py --cases lightning-coral-async,coral-save --workdir /tmp/mb

``--cases`` runs only the named cases, plus the references their rows need (``lightning-none`` and
``lightning-modelckpt`` for Lightning rows, ``torch-save`` for the others, ``coral-save`` for
``coral-load``) unless ``--workdir`` already holds their results (``<case>.json``, from an earlier
run with the same ``--params``): repeat one case without paying for the whole table.

The table (markdown) goes to stdout, progress lines to stderr.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import logging
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

LAYERS = 8
BATCH = 4
THREADS = 2
LIGHTNING_CASES = ("lightning-none", "lightning-modelckpt", "lightning-coral-async", "lightning-coral-sync")
API_CASES = ("torch-save", "coral-save", "torch-load", "coral-load")
ALL_CASES = LIGHTNING_CASES + API_CASES
SAVES = 3
MB = 1e6

LABELS = {
    "lightning-none": "Lightning, no checkpointing (baseline)",
    "lightning-modelckpt": "Lightning, ModelCheckpoint (every epoch)",
    "lightning-coral-async": "Lightning, CoralCheckpoint (async, default)",
    "lightning-coral-sync": "Lightning, CoralCheckpoint(async_save=False)",
    "torch-save": f"torch.save, {SAVES} saves",
    "coral-save": f"coral_torch.save, {SAVES} saves of an evolving checkpoint",
    "torch-load": "torch.load, beyond the returned object",
    "coral-load": "coral_torch.load, beyond the returned object",
}


def progress(msg: str) -> None:
    print(f"[memory_bench] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- memory probes
def vm_rss_bytes() -> int:
    """Current resident set size (``VmRSS`` of ``/proc/self/status``)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_free_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def reset_peak() -> bool:
    """Reset the peak RSS (``VmHWM``, and with it ``ru_maxrss``) to the current RSS. Works on Linux
    as long as no thread of this process exited at a higher peak (the kernel keeps that one)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return peak_rss_bytes() <= vm_rss_bytes() + 16 * 2**20


def settle() -> tuple[int, bool]:
    """Prepare the measured action: free what can be freed, reset the peak; ``(baseline RSS,
    whether the peak could be reset to it)``."""
    release_free_memory()
    ok = reset_peak()
    return vm_rss_bytes(), ok


# ----------------------------------------------------------------------------- model and data
def mlp_width(params: int) -> int:
    """The smallest multiple of 64 whose ``LAYERS`` square layers (with biases) hold >= ``params``."""
    w = 64 * max(1, math.ceil(math.sqrt(params / LAYERS) / 64))
    while LAYERS * w * (w + 1) < params:
        w += 64
    return w


def setup_torch() -> None:
    import torch

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    quiet_logs()


def quiet_logs() -> None:
    """Only errors from Lightning and coral_torch (Lightning sets its level when imported)."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "coral_torch"):
        logging.getLogger(name).setLevel(logging.ERROR)


def build_mlp(width: int) -> Any:
    from torch import nn

    layers: list[nn.Module] = []
    for i in range(LAYERS):
        layers.append(nn.Linear(width, width))
        if i < LAYERS - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_batches(width: int, n: int) -> list[tuple[Any, Any]]:
    import torch

    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, width, generator=g), torch.randn(BATCH, width, generator=g)) for _ in range(n)]


# ----------------------------------------------------------------------------- Lightning cases
def lightning_case(case: str, width: int, epochs: int, steps: int, work: Path) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.nn import functional as F
    from torch.utils.data import DataLoader

    from coral_torch.callbacks import CoralCheckpoint

    quiet_logs()
    class LitMLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = build_mlp(width)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    out = work / case
    shutil.rmtree(out, ignore_errors=True)
    callbacks: list[Any] = []
    ckpt_dir = out / "ckpts"
    if case == "lightning-modelckpt":
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1))
    elif case == "lightning-coral-async":
        callbacks.append(CoralCheckpoint(repo=out / ".coral", run="membench"))
    elif case == "lightning-coral-sync":
        callbacks.append(CoralCheckpoint(repo=out / ".coral", run="membench", async_save=False))
    model = LitMLP()
    loader = DataLoader(make_batches(width, steps), batch_size=None, shuffle=False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, callbacks=callbacks, logger=False,
        enable_checkpointing=case != "lightning-none", enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=out,
    )
    release_free_memory()
    before_fit = vm_rss_bytes()
    t0 = time.perf_counter()
    trainer.fit(model, loader)
    res: dict[str, Any] = {"peak": peak_rss_bytes(), "before_fit": before_fit, "wall_s": time.perf_counter() - t0}
    if case == "lightning-modelckpt":
        files = sorted(ckpt_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        res["ckpt_bytes"] = files[-1].stat().st_size
    shutil.rmtree(out, ignore_errors=True)
    return res


# ----------------------------------------------------------------------------- API cases
def trained_checkpoint(width: int) -> tuple[dict[str, Any], Callable[[], None]]:
    """A Lightning-style checkpoint dict of an MLP after one AdamW step (gradients kept), and a
    function that moves every weight and moment a little, in place, allocating nothing."""
    import torch
    from torch.nn import functional as F

    model = build_mlp(width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    (x, y), = make_batches(width, 1)
    F.mse_loss(model(x), y).backward()
    opt.step()
    ckpt: dict[str, Any] = {
        "epoch": 0, "global_step": 1,
        "state_dict": model.state_dict(),
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [],
    }

    @torch.no_grad()
    def evolve() -> None:
        for p in model.parameters():
            st = opt.state[p]
            st["exp_avg"].lerp_(p.grad, 0.1)
            st["exp_avg_sq"].mul_(0.999).addcmul_(p.grad, p.grad, value=0.001)
            p.add_(st["exp_avg"], alpha=-1e-4)
            st["step"].add_(1)
        ckpt["epoch"] += 1
        ckpt["global_step"] += 1

    return ckpt, evolve


def save_case(case: str, width: int, work: Path) -> dict[str, Any]:
    import torch

    import coral_torch

    out = work / case
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ckpt, evolve = trained_checkpoint(width)
    save: Callable[[Any, Path], Any] = torch.save if case == "torch-save" else coral_torch.save
    baseline, reset_ok = settle()
    peaks: list[int] = []
    for i in range(1, SAVES + 1):
        if i > 1:
            evolve()
        t0 = time.perf_counter()
        save(ckpt, out / f"epoch{i}.pt")
        peaks.append(peak_rss_bytes())
        progress(f"  {case} save {i}: {time.perf_counter() - t0:.1f}s, peak so far "
                 f"{(peaks[-1] - baseline) / MB:+.0f} MB over baseline, RSS after it "
                 f"{(vm_rss_bytes() - baseline) / MB:+.0f} MB")
    res: dict[str, Any] = {"peak": peaks[-1], "baseline": baseline, "reset_ok": reset_ok,
                           "peaks": peaks}
    if case == "torch-save":
        res["ckpt_bytes"] = (out / f"epoch{SAVES}.pt").stat().st_size
    return res


def load_case(case: str, work: Path) -> dict[str, Any]:
    import torch

    import coral_torch

    load: Callable[[Path], Any] = torch.load if case == "torch-load" else coral_torch.load
    path = work / ("torch-save" if case == "torch-load" else "coral-save") / f"epoch{SAVES}.pt"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run the save cases first")
    baseline, reset_ok = settle()
    t0 = time.perf_counter()
    obj = load(path)
    wall = time.perf_counter() - t0
    res = {"peak": peak_rss_bytes(), "baseline": baseline, "reset_ok": reset_ok, "wall_s": wall}
    del obj
    return res


def run_child(args: argparse.Namespace) -> int:
    setup_torch()
    work = Path(args.workdir)
    width = mlp_width(int(args.params))
    if args.case in LIGHTNING_CASES:
        res = lightning_case(args.case, width, args.epochs, args.steps, work)
    elif args.case in ("torch-save", "coral-save"):
        res = save_case(args.case, width, work)
    else:
        res = load_case(args.case, work)
    res["params"] = int(args.params)
    Path(args.result).write_text(json.dumps(res))
    return 0


# ----------------------------------------------------------------------------- parent
def spawn(case: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    result = work / f"{case}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", case, "--params", str(int(args.params)),
           "--epochs", str(args.epochs), "--steps", str(args.steps), "--workdir", str(work),
           "--result", str(result)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, timeout=args.timeout)
    res: dict[str, Any] = json.loads(result.read_text())
    res["process_s"] = time.perf_counter() - t0
    return res


def mem_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def table(rows: Sequence[tuple[str, float, float]]) -> str:
    lines = ["| case | checkpoint MB | peak extra MB | extra / checkpoint |", "|---|---:|---:|---:|"]
    for label, ckpt, extra in rows:
        lines.append(f"| {label} | {ckpt / MB:.0f} | {extra / MB:.0f} | {extra / ckpt:.2f} |")
    return "\n".join(lines)


def run_parent(args: argparse.Namespace) -> int:
    width = mlp_width(int(args.params))
    n_params = LAYERS * width * (width + 1)
    approx = n_params * 4 * 3
    avail = mem_available()
    progress(f"MLP {LAYERS} x {width}x{width}: {n_params / 1e6:.1f}M parameters, checkpoint ~{approx / MB:.0f} MB; "
             f"{args.epochs} epochs x {args.steps} steps of batch {BATCH}; {THREADS} threads")
    spec = importlib.util.find_spec("coral_torch")
    progress(f"python {sys.executable}; coral_torch from {spec.origin if spec else None}")
    if avail is not None and avail < 6 * approx:
        progress(f"WARNING: only {avail / MB:.0f} MB available; the runs may need ~{6 * approx / MB:.0f} MB")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="memory_bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    wanted = ALL_CASES if not args.cases else tuple(c for c in ALL_CASES if c in set(args.cases.split(",")))
    unknown = set(args.cases.split(",")) - set(ALL_CASES) if args.cases else set()
    if unknown:
        raise SystemExit(f"unknown case(s) {sorted(unknown)}; choose from {', '.join(ALL_CASES)}")
    needed = set(wanted)
    if any(c in LIGHTNING_CASES for c in wanted):
        needed |= {"lightning-none", "lightning-modelckpt"}
    if any(c in API_CASES for c in wanted):
        needed.add("torch-save")
    if "coral-load" in wanted:
        needed.add("coral-save")
    if "torch-load" in wanted:
        needed.add("torch-save")
    reused: set[str] = set()
    for case in sorted(needed - set(wanted)):
        old = work / f"{case}.json"
        if old.exists():
            r = json.loads(old.read_text())
            if r.get("params") == int(args.params):
                results[case] = r
                reused.add(case)
                progress(f"{case}: reusing {old} (peak RSS {r['peak'] / MB:.0f} MB)")
    t_all = time.perf_counter()
    try:
        for case in (c for c in ALL_CASES if c in needed and c not in reused):
            os.sync()  # start with no dirty pages from the previous case's files
            progress(f"{case} ...")
            r = results[case] = spawn(case, args, work)
            base = f", baseline {r['baseline'] / MB:.0f} MB" if "baseline" in r else ""
            fit = f", RSS before fit {r['before_fit'] / MB:.0f} MB" if "before_fit" in r else ""
            progress(f"{case}: peak RSS {r['peak'] / MB:.0f} MB{base}{fit}, process {r['process_s']:.1f}s")
            if r.get("reset_ok") is False:
                progress(f"WARNING: {case}: the peak could not be reset before the measured action; "
                         "its figure is an upper bound")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    progress(f"all cases done in {time.perf_counter() - t_all:.0f}s")

    rows: list[tuple[str, float, float]] = []
    shown = [c for c in ALL_CASES if c in results and (c in wanted or not args.cases)]
    for case in (c for c in LIGHTNING_CASES if c in shown):
        pl_ckpt = results["lightning-modelckpt"]["ckpt_bytes"]
        pl_base = results["lightning-none"]["peak"]
        label = LABELS[case]
        if case == "lightning-none":
            label += f": peak RSS {pl_base / MB:.0f} MB"
        rows.append((label, pl_ckpt, results[case]["peak"] - pl_base))
    for case in (c for c in ("torch-save", "coral-save") if c in shown):
        r = results[case]
        rows.append((LABELS[case], results["torch-save"]["ckpt_bytes"], r["peak"] - r["baseline"]))
    for case in (c for c in ("torch-load", "coral-load") if c in shown):
        r = results[case]
        api_ckpt = results["torch-save"]["ckpt_bytes"]
        rows.append((LABELS[case], api_ckpt, r["peak"] - r["baseline"] - api_ckpt))
    print(table(rows))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=100e6, help="minimum parameter count (default 100e6)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 20M parameters, 2 steps per epoch")
    ap.add_argument("--epochs", type=int, default=2, help="Lightning epochs (default 2)")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per Lightning epoch (default 3)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds one case may take (default 600)")
    ap.add_argument("--workdir", help="keep the cases' files and results here (default: a temporary directory, removed)")
    ap.add_argument("--cases", help=f"comma-separated cases to run (default: all): {', '.join(ALL_CASES)}")
    ap.add_argument("--case", choices=ALL_CASES, help=argparse.SUPPRESS)  # child process: one case
    ap.add_argument("--result", help=argparse.SUPPRESS)  # child process: where to write its figures
    args = ap.parse_args(argv)
    if args.quick:
        args.params, args.steps = 20e6, 2
    if args.case:
        if not (args.workdir and args.result):
            ap.error("--case needs --workdir and --result")
        return run_child(args)
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
