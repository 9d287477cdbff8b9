"""How much does a background thread slow CPU training? (Why async saves cost wall time on CPU.)

Trains the MiniLM classifier for a fixed number of steps on all of torch's intra-op threads, alone
and with a background thread that keeps doing one kind of work at a given priority:

  zstd     C work that releases the GIL (zstd level 1 on 50 MB)
  python   a GIL-bound Python loop
  commit   coral_torch Repository.commit of the model + AdamW state, one encoder thread

Priorities: nice +10 (CoralCheckpoint's default) and SCHED_IDLE. The table shows the training's
slowdown next to the CPU time the background thread got.

    .venv/bin/python bench/interference_bench.py            # 12 steps per row, ~2-3 min on 2 cores
    .venv/bin/python bench/interference_bench.py --steps 6 --kinds zstd,commit
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minilm  # noqa: E402
from epochs_bench import Batches  # noqa: E402

from coral_torch import Repository  # noqa: E402
from coral_torch.callbacks.snapshot import _lower_thread_priority  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--kinds", default="zstd,python,commit")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = minilm.MiniLMClassifier(minilm.load_minilm(), num_labels=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batches = [Batches(batch=16, seq_len=64, seed=0).next() for _ in range(args.steps)]

    def train() -> float:
        t0 = time.perf_counter()
        for ids, mask, y in batches:
            torch.nn.functional.cross_entropy(model(ids, mask), y).backward()
            opt.step()
            opt.zero_grad()
        return time.perf_counter() - t0

    tmp = Path(tempfile.mkdtemp(prefix="interference-"))

    def background(kind: str, nice, stop: threading.Event, done: list) -> None:
        _lower_thread_priority(nice)
        data = np.random.default_rng(0).integers(0, 255, 50_000_000, dtype=np.uint8)
        comp = zstandard.ZstdCompressor(level=1)
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        ck = {"state_dict": sd, "optimizer": copy.deepcopy(opt.state_dict())}  # own copy: training goes on
        repo = Repository(tmp / f"repo-{kind}-{nice}")
        cpu0 = time.thread_time()
        while not stop.is_set():
            if kind == "zstd":
                comp.compress(data.data)
            elif kind == "python":
                sum(range(200_000))
            elif kind == "commit":
                for v in sd.values():
                    if v.dtype == torch.float32:
                        v.view(torch.int32).add_(1)  # new bytes each time: a real delta commit
                repo.commit(ck, run="r", workers=1)
        done.append(time.thread_time() - cpu0)
        repo.close()

    train()  # warm-up
    rows = [("none", "-", train(), 0.0)]
    for kind in args.kinds.split(","):
        for nice in (10, "idle"):
            stop, done = threading.Event(), []
            th = threading.Thread(target=background, args=(kind, nice, stop, done))
            th.start()
            time.sleep(0.5)
            t = train()
            stop.set()
            th.join()
            rows.append((kind, str(nice), t, done[0] if done else 0.0))
    shutil.rmtree(tmp, ignore_errors=True)

    base = rows[0][2]
    print(f"interference_bench: MiniLM, {args.steps} AdamW steps on {torch.get_num_threads()} intra-op threads, "
          f"{os.cpu_count()} CPUs")
    print(f"{'background':<10} {'priority':>8} {'train s':>8} {'slowdown':>9} {'bg CPU s':>9}")
    for kind, nice, t, cpu in rows:
        print(f"{kind:<10} {nice:>8} {t:>8.2f} {(t / base - 1) * 100:>+8.0f}% {cpu:>9.2f}")
    print("(bg CPU s: CPU time the background thread used during the whole row, including its 0.5 s head start)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
