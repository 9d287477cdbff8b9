"""Checkpoint peers side by side on a MiniLM fine-tune: bytes, save/load time, peak extra RSS.

Issue 15, item 5. The parent process fine-tunes all-MiniLM-L6-v2 (:mod:`minilm`, 22.7M parameters)
with AdamW + linear warmup/decay on two workloads and, after every epoch, builds the full
Lightning checkpoint dict (``epochs_bench.build_checkpoint``: weights, AdamW moments, scheduler,
loops, callback state) and ``torch.save``-s it once to a temporary input file:

  text     the labelled stdlib-docstring corpus (``minilm.labeled_corpus``), a few thousand
           embedding rows touched
  random   random token ids uniform over the whole vocabulary (full-length rows, random labels):
           most embedding rows (and their AdamW moments) change every epoch

Then every method runs in its own process (this script again with ``--method``), ``--repeat``
times, interleaved: the child ``torch.load``-s the epoch inputs (untimed), saves the epochs in
order into an empty directory, then loads each one back and checks it bit-exactly against its
input (raw bytes of every tensor, every value, container types and key order; ``values`` in the
table means every tensor and value is bit-exact but a container or key type differs, e.g. DCP
turns the int keys of ``optimizer_states/0/state`` into strings).

  torch.save       ``torch.save(ckpt, path)`` (what ModelCheckpoint does; no fsync)
  torch.save+zstd  ``torch.save`` into memory, zstandard level 3 (one thread), one file
  dcp              ``torch.distributed.checkpoint.save`` with ``FileSystemWriter`` (single
                   process, no process group; fsyncs), loaded with DCP's own template-free
                   loader (``_load_state_dict_from_keys``, what ``dcp_to_torch_save`` uses)
  dcp-zstd         the same with ``FileSystemWriter(_extensions=[ZStandard()])``
  dcp-async        ``dcp.async_save``: blocking = until it returns, total = until
                   ``future.result()``; the next epoch starts after the result
  zipnn            ``torch.save`` into memory, ``ZipNN(input_format="byte",
                   bytearray_dtype="float32", threads=1)`` on the bytes (zipnn 0.5.4: input
                   padded to a whole number of float32s, its buffer is rewritten in place)
  coral            ``coral_torch.save(ckpt, f"{dir}/epoch{N}.pt")`` (synchronous; fsyncs)
  coral-async      the ``CoralCheckpoint`` callback's asynchronous path, driven through its
                   Lightning hooks (``setup``, ``on_train_epoch_end``) by a minimal stand-in
                   trainer whose ``dump_checkpoint`` returns the input dict: blocking = the hook
                   (snapshot into host buffers + hand-off), total = until the background commit is
                   done (the next epoch waits for it, as if the epoch gap were long enough); the
                   callback's CPU-trainer setting (one encoder thread, nice 15) unless
                   ``--async-workers``

Per method (medians over the repeats): bytes on disk (everything in its directory, summed over
the epochs), blocking and total save time and load time (sums over the epochs), and peak extra RSS:
``VmHWM - VmRSS`` of ``/proc/self/status`` with the peak reset (``clear_refs``) to the baseline
taken after the inputs were loaded and free memory returned (``malloc_trim``); for loads, the peak
beyond the baseline and the returned object's tensor bytes (max over epochs). Loads read files
that are in the page cache (just written). coral repositories are closed between save and load.

    .venv/bin/python bench/peers_bench.py                  # 5 epochs x 30 steps, 2 workloads, 3 repeats
    .venv/bin/python bench/peers_bench.py --quick          # smoke run (2 epochs x 3 steps, 1 repeat)
    .venv/bin/python bench/peers_bench.py --workloads random --methods torch.save,coral --json out.json
    .venv/bin/python bench/peers_bench.py --inputs-dir /tmp/peers-inputs   # fine-tune once, reuse next time
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from epochs_bench import Batches, build_checkpoint, compare, dir_bytes, iter_tensors, raw_bytes, seed_all  # noqa: E402
from memory_bench import quiet_logs, release_free_memory, reset_peak, vm_rss_bytes  # noqa: E402
from minilm import MiniLMClassifier, linear_warmup_lambda, load_minilm, load_tokenizer, no_decay_param_groups  # noqa: E402

import coral_torch  # noqa: E402
from coral_torch.api import close_repositories  # noqa: E402

METHODS = ("torch.save", "torch.save+zstd", "dcp", "dcp-zstd", "dcp-async", "zipnn", "coral", "coral-async")
WORKLOADS = ("text", "random")
TRAINING = {"epochs": 5, "steps": 30, "batch": 16, "seq_len": 64, "lr": 2e-5, "weight_decay": 0.01, "seed": 0}
MB = 1e6


def progress(msg: str) -> None:
    print(f"[peers_bench] {msg}", file=sys.stderr, flush=True)


# =========================================================================== memory probes
def vm_hwm_bytes() -> int:
    """Peak resident set size of this process since the last reset (``VmHWM``, KiB in the file)."""
    return int(Path("/proc/self/status").read_text().split("VmHWM:", 1)[1].split()[0]) * 1024


def settle() -> tuple[int, bool]:
    """Free what can be freed, reset the peak to the current RSS: ``(baseline, reset worked)``."""
    for attempt in range(3):  # a thread still freeing memory can move RSS below the reset peak
        release_free_memory()
        reset_peak()
        rss = vm_rss_bytes()
        if vm_hwm_bytes() <= rss + 16 * 2**20:
            return rss, True
        time.sleep(0.05)
    return rss, False


# ================================================================================= training
class RandomBatches:
    """Full-length rows of token ids drawn uniformly over the whole vocabulary, random labels."""

    def __init__(self, batch: int, seq_len: int, seed: int, num_labels: int = 9):
        tok = load_tokenizer()
        self.batch, self.seq_len, self.vocab = batch, seq_len, len(tok)
        self.cls_id, self.sep_id, self.num_labels = tok.cls_id, tok.sep_id, num_labels
        self.label_names = tuple(str(i) for i in range(num_labels))
        self.g = torch.Generator().manual_seed(seed)
        self.used_ids: set[int] = set()

    def next(self):
        ids = torch.randint(1, self.vocab, (self.batch, self.seq_len), generator=self.g)  # 0 is [PAD]
        ids[:, 0], ids[:, -1] = self.cls_id, self.sep_id
        self.used_ids.update(int(x) for x in ids.unique())
        labels = torch.randint(0, self.num_labels, (self.batch,), generator=self.g)
        return ids, torch.ones_like(ids), labels


def train_and_dump(workload: str, args, out: Path) -> dict:
    """Fine-tune, ``torch.save`` the Lightning checkpoint dict after every epoch into ``out``."""
    seed_all(args.seed)
    data = Batches(args.batch, args.seq_len, args.seed) if workload == "text" else \
        RandomBatches(args.batch, args.seq_len, args.seed)
    model = MiniLMClassifier(load_minilm(), num_labels=len(data.label_names)).train()
    total = args.epochs * args.steps
    opt = torch.optim.AdamW(no_decay_param_groups(model, args.weight_decay), lr=args.lr,
                            weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_lambda(total, max(1, total // 10)))
    hparams = {"lr": args.lr, "weight_decay": args.weight_decay, "batch_size": args.batch,
               "seq_len": args.seq_len, "epochs": args.epochs, "steps_per_epoch": args.steps,
               "workload": workload, "seed": args.seed}
    out.mkdir(parents=True)
    best: dict = {"score": None, "path": "", "k": {}}
    step, t_train, files, losses = 0, 0.0, [], []
    for epoch in range(args.epochs):
        t0, ls = time.perf_counter(), []
        for _ in range(args.steps):
            loss = model.loss(*data.next())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step(), sched.step()
            ls.append(loss.item())
        step += args.steps
        t_train += time.perf_counter() - t0
        losses.append(float(np.mean(ls)))
        ckpt = build_checkpoint(model, opt, sched, epoch=epoch, global_step=step, loss=losses[-1],
                                dirpath=str(out / "ckpts"), best=best, hparams=hparams)
        files.append(out / f"epoch{epoch}.pt")
        torch.save(ckpt, files[-1])
        progress(f"{workload}: epoch {epoch} loss {losses[-1]:.3f}, checkpoint {files[-1].stat().st_size / MB:.1f} MB")
    rows = int(model.backbone.embeddings.word_embeddings.weight.shape[0])
    return {"files": [str(f) for f in files], "train_s": t_train, "losses": losses,
            "params": sum(p.numel() for p in model.parameters()),
            "input_bytes": [f.stat().st_size for f in files],
            "vocab_rows_used": len(data.used_ids), "vocab_rows": rows}


# ============================================================================ the methods
class Method:
    """One way of checkpointing: ``save`` returns ``(blocking_s, total_s)``; ``load`` the object."""

    needs_fsync = False  # does the method make its files durable itself?

    def __init__(self, root: Path, args):
        self.root, self.args = root, args

    def save(self, ckpt: dict, epoch: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        self.save_sync(ckpt, epoch)
        dt = time.perf_counter() - t0
        return dt, dt

    def save_sync(self, ckpt: dict, epoch: int) -> None:
        raise NotImplementedError

    def before_loads(self) -> None:
        pass

    def load(self, epoch: int) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TorchSave(Method):
    def save_sync(self, ckpt, epoch):
        torch.save(ckpt, self.root / f"epoch{epoch}.pt")

    def load(self, epoch):
        return torch.load(self.root / f"epoch{epoch}.pt", weights_only=True)


class TorchSaveZstd(Method):
    def __init__(self, root, args):
        import zstandard

        super().__init__(root, args)
        self.cctx, self.dctx = zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()

    def save_sync(self, ckpt, epoch):
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        (self.root / f"epoch{epoch}.pt.zst").write_bytes(self.cctx.compress(buf.getbuffer()))

    def load(self, epoch):
        raw = self.dctx.decompress((self.root / f"epoch{epoch}.pt.zst").read_bytes())
        return torch.load(io.BytesIO(raw), weights_only=True)


class ZipNNMethod(Method):
    def __init__(self, root, args):
        from zipnn import ZipNN

        super().__init__(root, args)
        self.zn = ZipNN(input_format="byte", bytearray_dtype="float32", threads=1)

    def save_sync(self, ckpt, epoch):
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        n = buf.tell()
        # zipnn 0.5.4 corrupts memory on inputs that are not a whole number of float32s, and
        # rewrites its input in place (a private padded copy, never used again)
        data = bytearray(buf.getbuffer()) + b"\0" * (-n % 4)
        del buf
        comp = self.zn.compress(data)
        with open(self.root / f"epoch{epoch}.pt.znn", "wb") as fh:
            fh.write(n.to_bytes(8, "little"))
            fh.write(comp)

    def load(self, epoch):
        blob = (self.root / f"epoch{epoch}.pt.znn").read_bytes()
        n = int.from_bytes(blob[:8], "little")
        raw = self.zn.decompress(blob[8:])
        return torch.load(io.BytesIO(memoryview(raw)[:n]), weights_only=True)


class DCP(Method):
    needs_fsync = True

    def writer(self, epoch: int):
        import torch.distributed.checkpoint as dcp

        ext = None
        if self.args.method == "dcp-zstd":
            from torch.distributed.checkpoint._extension import ZStandard

            ext = [ZStandard()]
        return dcp.FileSystemWriter(self.root / f"epoch{epoch}", _extensions=ext)

    def save_sync(self, ckpt, epoch):
        import torch.distributed.checkpoint as dcp

        dcp.save(ckpt, storage_writer=self.writer(epoch), no_dist=True)

    def load(self, epoch):
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        return _load_state_dict_from_keys(checkpoint_id=str(self.root / f"epoch{epoch}"))


class DCPAsync(DCP):
    def save(self, ckpt, epoch):
        import torch.distributed.checkpoint as dcp

        t0 = time.perf_counter()
        fut = dcp.async_save(ckpt, storage_writer=self.writer(epoch), no_dist=True)
        t1 = time.perf_counter()
        getattr(fut, "upload_completion", fut).result()  # a Future, or an AsyncSaveResponse with a stager
        return t1 - t0, time.perf_counter() - t0


class Coral(Method):
    needs_fsync = True

    def save_sync(self, ckpt, epoch):
        coral_torch.save(ckpt, str(self.root / f"epoch{epoch}.pt"))

    def before_loads(self):
        close_repositories()  # loads open it afresh, as a resuming process would

    def load(self, epoch):
        return coral_torch.load(str(self.root / f"epoch{epoch}.pt"))


class StandInTrainer:
    """Just what ``CoralCheckpoint.setup`` and ``on_train_epoch_end`` read from a Trainer (single
    device, rank 0, no logger); ``dump_checkpoint`` returns ``self.ckpt``."""

    sanity_checking = fast_dev_run = False
    is_global_zero, world_size, logger = True, 1, None

    def __init__(self, root: Path, device: str = "cpu"):
        self.default_root_dir = str(root)
        self.strategy = type("SingleDeviceStrategy", (), {"root_device": torch.device(device), "checkpoint_io": None})()
        self._checkpoint_connector = self  # dump_checkpoint below
        self.callback_metrics: dict = {}
        self.current_epoch = self.global_step = 0
        self.ckpt: dict = {}

    def dump_checkpoint(self, weights_only: bool = False) -> dict:
        return self.ckpt


class CallbackDriver:
    """``CoralCheckpoint``'s asynchronous save driven through its Lightning hooks (``setup``,
    ``on_train_epoch_end``, ``teardown``) with a :class:`StandInTrainer`."""

    def __init__(self, repo: Path, device: str = "cpu", workers: Optional[int] = None):
        from coral_torch.callbacks import CoralCheckpoint

        self.trainer = StandInTrainer(repo.parent, device)
        self.cb = CoralCheckpoint(repo=repo, run="bench", install_checkpoint_io=False, log_stats=False,
                                  background_workers=workers)
        self.cb.setup(self.trainer, None, "fit")
        self.commits: list[str] = []

    def save(self, ckpt: dict) -> tuple[float, float]:
        """``(stall, total)``: the hook's time on the calling thread, and until the background
        commit is done (waited for here without joining in, so the next save starts idle)."""
        tr = self.trainer
        tr.ckpt, tr.current_epoch, tr.global_step = ckpt, ckpt.get("epoch", 0), ckpt.get("global_step", 0)
        t0 = time.perf_counter()
        self.cb.on_train_epoch_end(tr, None)
        t1 = time.perf_counter()
        committer = self.cb._committer  # its BackgroundCommitter: the callback's own waits join the work
        while committer is not None and committer.busy:
            time.sleep(0.002)
        t2 = time.perf_counter()
        tr.ckpt = {}
        self.cb._surface_errors(tr)  # re-raise a failed background commit here
        self.commits.append(self.cb.last_commit)
        return t1 - t0, t2 - t0

    def close(self) -> None:
        self.cb.teardown(self.trainer, None, "fit")
        close_repositories()


class CoralAsync(Method):
    needs_fsync = True

    def __init__(self, root, args):
        super().__init__(root, args)
        self.driver = CallbackDriver(root / ".coral", workers=args.async_workers)

    def save(self, ckpt, epoch):
        return self.driver.save(ckpt)

    def before_loads(self):
        self.driver.close()

    def load(self, epoch):
        return coral_torch.load(f"coral://{self.driver.commits[epoch]}", repo=self.root / ".coral")


CLASSES: dict[str, Callable[[Path, Any], Method]] = {
    "torch.save": TorchSave, "torch.save+zstd": TorchSaveZstd, "dcp": DCP, "dcp-zstd": DCP,
    "dcp-async": DCPAsync, "zipnn": ZipNNMethod, "coral": Coral, "coral-async": CoralAsync,
}


def unavailable(method: str) -> Optional[str]:
    """Why a method cannot run with this torch / these packages, or None."""
    try:
        if method == "dcp-zstd":
            from torch.distributed.checkpoint._extension import ZStandard  # noqa: F401
        elif method == "dcp-async":
            import torch.distributed.checkpoint as dcp

            if not hasattr(dcp, "async_save"):
                return f"torch {torch.__version__} has no dcp.async_save"
        elif method == "zipnn":
            import zipnn  # noqa: F401
        elif method == "torch.save+zstd":
            import zstandard  # noqa: F401
    except ImportError as exc:
        return f"not available: {exc}"
    return None


def exactness(loaded: Any, saved: Any) -> str:
    """``exact``; ``values`` (every tensor and value bit-exact, a container/key type differs); ``NO``."""
    if not compare(loaded, saved):
        return "exact"
    got = dict(iter_tensors(loaded))
    for name, t in iter_tensors(saved):
        g = got.get(name)
        if g is None or g.dtype != t.dtype or g.shape != t.shape or not np.array_equal(raw_bytes(g), raw_bytes(t)):
            return "NO"
    return "values" if len(got) == sum(1 for _ in iter_tensors(saved)) else "NO"


def run_child(args) -> int:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    warnings.filterwarnings("ignore")
    quiet_logs()
    inputs = [torch.load(f, weights_only=True) for f in args.inputs.split(",")]
    root = Path(args.workdir)
    root.mkdir(parents=True)
    method = CLASSES[args.method](root, args)
    baseline, reset_ok = settle()
    blocking, total = [], []
    for e, ckpt in enumerate(inputs):
        gc.collect()
        b, t = method.save(ckpt, e)
        blocking.append(b)
        total.append(t)
    save_peak = vm_hwm_bytes() - baseline
    size = dir_bytes(root)
    method.before_loads()
    loads, load_extra, exact = [], [], []
    for e, ckpt in enumerate(inputs):
        base, ok = settle()
        reset_ok &= ok
        t0 = time.perf_counter()
        obj = method.load(e)
        loads.append(time.perf_counter() - t0)
        own = sum(t.numel() * t.element_size() for _, t in iter_tensors(obj))
        load_extra.append(vm_hwm_bytes() - base - own)
        exact.append(exactness(obj, ckpt))
        del obj
    method.close()
    res = {"blocking_s": blocking, "total_s": total, "load_s": loads, "bytes": size,
           "save_peak_extra": save_peak, "load_peak_extra": max(load_extra), "exact": exact,
           "reset_ok": reset_ok, "fsync": method.needs_fsync}
    Path(args.result).write_text(json.dumps(res))
    return 0


# ================================================================================== parent
def spawn(method: str, args, inputs: list[str], work: Path, tag: str) -> dict:
    result = work / f"{tag}.json"
    cmd = [sys.executable, os.path.abspath(__file__), "--method", method, "--inputs", ",".join(inputs),
           "--workdir", str(work / tag), "--result", str(result)]
    if args.async_workers is not None:
        cmd += ["--async-workers", str(args.async_workers)]
    os.sync()  # no dirty pages of the previous process's files
    t0 = time.perf_counter()
    try:
        subprocess.run(cmd, check=True, timeout=args.timeout)
        res = json.loads(result.read_text())
    except (subprocess.SubprocessError, OSError, ValueError) as exc:
        res = {"error": repr(exc)}
    finally:
        shutil.rmtree(work / tag, ignore_errors=True)
    res["process_s"] = time.perf_counter() - t0
    return res


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0].get("error", "no run")}
    med = lambda key: statistics.median(sum(r[key]) for r in ok)  # noqa: E731
    exact = [x for r in ok for x in r["exact"]]
    return {
        "bytes": statistics.median(r["bytes"] for r in ok), "blocking_s": med("blocking_s"),
        "total_s": med("total_s"), "load_s": med("load_s"),
        "save_peak_extra": statistics.median(r["save_peak_extra"] for r in ok),
        "load_peak_extra": statistics.median(r["load_peak_extra"] for r in ok),
        "exact": "exact" if all(x == "exact" for x in exact) else ("NO" if "NO" in exact else "values"),
        "fsync": ok[0]["fsync"], "runs": len(ok), "failed": len(runs) - len(ok),
        "reset_ok": all(r["reset_ok"] for r in ok),
    }


def table(workload: str, meta: dict, summ: dict[str, dict], skipped: dict[str, str]) -> str:
    base = summ.get("torch.save", {})
    ratio = lambda m, k: (f"{summ[m][k] / base[k]:.3f}x" if base.get(k) else "-")  # noqa: E731
    lines = [
        f"\n### {workload}: {meta['params'] / 1e6:.1f}M params, {len(meta['files'])} epochs, checkpoint "
        f"{meta['input_bytes'][-1] / MB:.0f} MB, embedding rows touched {meta['vocab_rows_used']}/{meta['vocab_rows']}",
        "| method | bytes | blocking save | total save | load | MB | blocking s | total s | load s "
        "| save extra RSS MB | load extra RSS MB | fsync | bit-exact |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for m, s in summ.items():
        if "error" in s:
            lines.append(f"| {m} | failed: {s['error'][:80]} |")
            continue
        lines.append(
            f"| {m} | {ratio(m, 'bytes')} | {ratio(m, 'blocking_s')} | {ratio(m, 'total_s')} | {ratio(m, 'load_s')} "
            f"| {s['bytes'] / MB:.1f} | {s['blocking_s']:.2f} | {s['total_s']:.2f} | {s['load_s']:.2f} "
            f"| {s['save_peak_extra'] / MB:.0f} | {s['load_peak_extra'] / MB:.0f} | {'yes' if s['fsync'] else 'no'} "
            f"| {s['exact']} |")
    for m, why in skipped.items():
        lines.append(f"| {m} | skipped: {why} |")
    return "\n".join(lines)


def inputs_for(workload: str, args, work: Path) -> dict:
    """The epoch inputs of ``workload``: fine-tuned afresh, or reused from ``--inputs-dir`` when a
    previous run with the same training settings left them there (``meta.json`` names them)."""
    if not args.inputs_dir:
        return train_and_dump(workload, args, work / "inputs" / workload)
    settings = {k: getattr(args, k) for k in TRAINING}
    out = Path(args.inputs_dir) / workload
    meta_file = out / "meta.json"
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("settings") == settings and all(Path(f).exists() for f in meta["files"]):
            progress(f"{workload}: reusing the epoch inputs in {out}")
            return meta
    shutil.rmtree(out, ignore_errors=True)
    meta = train_and_dump(workload, args, out)
    meta["settings"] = settings
    meta_file.write_text(json.dumps(meta))
    return meta


def run_parent(args) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    skipped = {m: why for m in methods if (why := unavailable(m))}
    methods = [m for m in methods if m not in skipped]
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    work = Path(tempfile.mkdtemp(prefix="peers-bench-"))
    t_all = time.perf_counter()
    print(f"torch {torch.__version__}, coral_torch {coral_torch.__version__} from "
          f"{os.path.dirname(coral_torch.__file__)}, {os.cpu_count()} CPUs; "
          f"epochs={args.epochs} steps={args.steps} batch={args.batch} seq_len={args.seq_len} "
          f"repeat={args.repeat}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    out: dict[str, Any] = {"args": {k: v for k, v in vars(args).items()}, "workloads": {}, "skipped": skipped}
    try:
        for w in workloads:
            meta = inputs_for(w, args, work)
            gc.collect()
            runs: dict[str, list[dict]] = {m: [] for m in methods}
            for rep in range(args.repeat):  # interleaved, so drifting load spreads over all methods
                for m in methods:
                    r = spawn(m, args, meta["files"], work, f"{w}-{m}-{rep}")
                    runs[m].append(r)
                    progress(f"{w} {m} #{rep}: " + (r["error"] if "error" in r else
                             f"{r['bytes'] / MB:.1f} MB, save {sum(r['blocking_s']):.2f}s/{sum(r['total_s']):.2f}s, "
                             f"load {sum(r['load_s']):.2f}s, {r['exact']}") + f" ({r['process_s']:.0f}s)")
            summ = {m: summarize(runs[m]) for m in methods}
            print(table(w, meta, summ, skipped), flush=True)
            if not all(s.get("reset_ok", True) for s in summ.values()):
                print("(a peak RSS reset failed in some run: its extra RSS is an upper bound)")
            out["workloads"][w] = {"meta": meta, "summary": summ, "runs": runs}
            if not args.inputs_dir:
                shutil.rmtree(work / "inputs" / w, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    wall = time.perf_counter() - t_all
    print("\nbit-exact: 'exact' = every tensor's bytes, value, container type and key order as saved; 'values' = "
          "every tensor and value bit-exact, some container/key types differ (DCP: int keys come back as str). "
          "fsync: the method makes its files durable (torch.save, zstd and zipnn do not). Extra RSS: peak over "
          "the baseline after the inputs were loaded; for loads, beyond the returned tensors.")
    print(f"ratios are medians of {args.repeat} run(s) vs torch.save's; times are sums over the epochs; "
          f"total wall time {wall:.0f}s; load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    out["wall_s"] = wall
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1, default=str))
        print(f"wrote {args.json_out}")
    bad_exact = [(w, m) for w, d in out["workloads"].items() for m, s in d["summary"].items()
                 if m.startswith("coral") and s.get("exact") != "exact"]
    return 1 if bad_exact else 0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in TRAINING.items():  # the fine-tune of epochs_bench (steps: per epoch)
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    ap.add_argument("--repeat", type=int, default=3, help="processes per method; medians are reported")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--async-workers", type=int, default=None,
                    help="coral-async encoder threads (default: the callback's choice for a CPU trainer, 1)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds one method process may take")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 epochs x 3 steps, 1 repeat")
    ap.add_argument("--inputs-dir", help="keep the fine-tuned epoch inputs here (one subdirectory per workload, "
                    "replaced when the training settings differ) and reuse them on the next run with the same settings")
    ap.add_argument("--json", dest="json_out", help="write all figures to this JSON file")
    ap.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # child: one method
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.method:
        return run_child(args)
    if args.quick:
        args.epochs, args.steps, args.repeat = min(args.epochs, 2), min(args.steps, 3), 1
    return run_parent(args)


if __name__ == "__main__":
    raise SystemExit(main())
