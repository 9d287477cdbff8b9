"""Epoch checkpoints of a real fine-tune: torch.save (ModelCheckpoint) vs coral_torch vs zipnn.

Fine-tunes all-MiniLM-L6-v2 (22.7M parameters, :mod:`minilm`) on a small real text
classification task with AdamW + linear warmup/decay, and after every epoch saves the full
checkpoint dict Lightning's ``ModelCheckpoint`` writes, in the same run, with

  (a) ``torch.save`` to one file per epoch (the ModelCheckpoint baseline),
  (b) ``coral_torch.save(ckpt, f"{dir}/epoch{N}.pt")`` (pointer file + ``{dir}/.coral``),
  (c) zipnn (``ZipNN(input_format="byte", bytearray_dtype="float32", threads=1)``) on each
      ``torch.save`` file's bytes.

Then it times loading every epoch with ``torch.load`` and ``coral_torch.load`` and checks that each
coral load is bit-identical to what was saved (raw bytes of every tensor, every non-tensor value,
container types and key order). A second scenario freezes the backbone (only the head trains).
Optional: the same checkpoints into repositories with ``DeltaConfig(max_chain_length=K)``.

    .venv/bin/python bench/epochs_bench.py                 # 5 epochs x 30 steps, ~3-4 min on 2 cores
    .venv/bin/python bench/epochs_bench.py --quick         # smoke run
    .venv/bin/python bench/epochs_bench.py --json out.json --keep /tmp/epochs
"""

from __future__ import annotations

import argparse
import collections
import copy
import gc
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from minilm import (  # noqa: E402
    MiniLMClassifier,
    freeze_backbone,
    labeled_corpus,
    linear_warmup_lambda,
    load_minilm,
    load_tokenizer,
    no_decay_param_groups,
)

import coral_torch  # noqa: E402
from coral_torch import DeltaConfig, Repository  # noqa: E402

TARGETS = {"bytes_full": 0.55, "bytes_frozen": 0.20, "save_time": 2.5, "load_time": 2.0}
MB = 1e6


# ================================================================================ helpers
def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def timed(fn, *a, **k) -> tuple[Any, float]:
    gc.collect()
    t0 = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t0


def category(name: str) -> str:
    """Which part of a Lightning checkpoint a flattened tensor name belongs to."""
    if name.startswith("state_dict/"):
        return "weights"
    if name.startswith("optimizer_states/"):
        leaf = name.rsplit("/", 1)[-1]
        return {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq", "step": "opt step"}.get(leaf, "opt other")
    return "other"


def iter_tensors(obj: Any, prefix: str = ""):
    """(name, tensor) in the naming scheme of coral_torch.adapters (keys joined by '/')."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from iter_tensors(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from iter_tensors(v, f"{prefix}/{i}" if prefix else str(i))


def raw_bytes(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return np.zeros(0, np.uint8)
    return t.reshape(-1).view(torch.uint8).numpy()


def compare(a: Any, b: Any, path: str = "") -> list[str]:
    """Differences between ``a`` (loaded) and ``b`` (saved): bit-exact tensors, equal values,
    same container types and key order."""
    if isinstance(b, torch.Tensor):
        if not isinstance(a, torch.Tensor):
            return [f"{path}: {type(a).__name__} instead of a tensor"]
        if a.dtype != b.dtype or a.shape != b.shape:
            return [f"{path}: {a.dtype}{list(a.shape)} != {b.dtype}{list(b.shape)}"]
        if type(a) is not type(b) or a.requires_grad != b.requires_grad:
            return [f"{path}: {type(a).__name__}(requires_grad={a.requires_grad}) != "
                    f"{type(b).__name__}(requires_grad={b.requires_grad})"]
        if not np.array_equal(raw_bytes(a), raw_bytes(b)):
            return [f"{path}: tensor bytes differ"]
        return []
    if type(a) is not type(b):
        return [f"{path}: {type(a).__name__} != {type(b).__name__}"]
    if isinstance(b, dict):
        if list(a.keys()) != list(b.keys()):
            return [f"{path}: keys differ"]
        out = []
        if getattr(a, "_metadata", None) != getattr(b, "_metadata", None):
            out.append(f"{path}: _metadata differs")
        for k in b:
            out += compare(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in compare(x, y, f"{path}/{i}")]
    if isinstance(b, float) and math.isnan(b):
        return [] if isinstance(a, float) and math.isnan(a) else [f"{path}: {a!r} != nan"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def lightning_version() -> str:
    for dist in ("lightning", "pytorch-lightning"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return "2.6.6"


def build_checkpoint(model, opt, sched, *, epoch: int, global_step: int, loss: float, dirpath: str,
                     best: dict, hparams: dict) -> dict:
    """The dict ``ModelCheckpoint`` has Lightning write after an epoch (Trainer.save_checkpoint)."""
    score = torch.tensor(loss)
    ckpt_path = f"{dirpath}/epoch={epoch}-step={global_step}.ckpt"
    best["k"][ckpt_path] = score
    if best["score"] is None or loss < float(best["score"]):
        best["score"], best["path"] = score, ckpt_path
    key = ("ModelCheckpoint{'monitor': 'train_loss', 'mode': 'min', 'every_n_train_steps': 0, "
           "'every_n_epochs': 1, 'train_time_interval': None}")
    progress = lambda n: {"ready": n, "started": n, "processed": n, "completed": n}  # noqa: E731
    steps_done = global_step
    return {
        "epoch": epoch,
        "global_step": global_step,
        "pytorch-lightning_version": lightning_version(),
        "state_dict": model.state_dict(),
        "loops": {
            "fit_loop": {
                "state_dict": {},
                "epoch_loop.state_dict": {"_batches_that_stepped": steps_done},
                "epoch_loop.batch_progress": {"total": progress(steps_done), "current": progress(steps_done),
                                              "is_last_batch": True},
                "epoch_loop.scheduler_progress": {"total": {"ready": steps_done, "completed": steps_done},
                                                  "current": {"ready": steps_done, "completed": steps_done}},
                "epoch_loop.automatic_optimization.state_dict": {},
                "epoch_loop.automatic_optimization.optim_progress": {
                    "optimizer": {"step": {"total": progress(steps_done), "current": progress(steps_done)},
                                  "zero_grad": {"total": progress(steps_done), "current": progress(steps_done)}}},
                "epoch_loop.manual_optimization.state_dict": {},
                "epoch_progress": {"total": progress(epoch + 1), "current": progress(epoch + 1)},
            },
            "validate_loop": {"state_dict": {}, "batch_progress": {"total": progress(0), "current": progress(0),
                                                                   "is_last_batch": False}},
        },
        "callbacks": {
            key: {
                "monitor": "train_loss",
                "best_model_score": best["score"],
                "best_model_path": best["path"],
                "current_score": score,
                "dirpath": dirpath,
                "best_k_models": dict(best["k"]),
                "kth_best_model_path": ckpt_path,
                "kth_value": score,
                "last_model_path": "",
            }
        },
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [sched.state_dict()],
        "hparams_name": "kwargs",
        "hyper_parameters": dict(hparams),
    }


# ================================================================================== data
class Batches:
    """Seeded, reshuffled-every-pass batches of (input_ids, attention_mask, labels)."""

    def __init__(self, batch: int, seq_len: int, seed: int):
        items, self.label_names = labeled_corpus()
        tok = load_tokenizer()
        self.enc = [tok.encode(s, seq_len) for s, _ in items]
        self.labels = [lab for _, lab in items]
        self.tok, self.batch = tok, batch
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.used_ids: set[int] = set()

    def next(self):
        if len(self.order) < self.batch:
            perm = list(range(len(self.enc)))
            self.rng.shuffle(perm)
            self.order += perm
        idx, self.order = self.order[: self.batch], self.order[self.batch :]
        ids, mask = self.tok.pad([self.enc[i] for i in idx])
        self.used_ids.update(int(x) for x in ids.unique())
        return ids, mask, torch.tensor([self.labels[i] for i in idx])


# ========================================================================= plane analysis
def _zstd():
    try:  # the codec coral_torch uses (read-only use of its compressor settings)
        from coral_torch.format import codec

        return codec._compressor(codec.DEFAULT_LEVEL)
    except Exception:  # pragma: no cover
        import zstandard

        return zstandard.ZstdCompressor(level=1)


def plane_analysis(cur: dict, prev: Optional[dict]) -> dict:
    """Per category and byte plane of the fp32 tensors: zstd size of the tensor itself and of its
    XOR against the previous epoch, plus the fraction of elements that did not change at all."""
    comp = _zstd()
    prev_t = dict(iter_tensors(prev)) if prev is not None else {}
    out: dict[str, dict] = {}
    for name, t in iter_tensors(cur):
        if t.dtype != torch.float32 or t.numel() < 64:
            continue
        c = out.setdefault(category(name), {"logical": 0, "full_planes": [0] * 4, "xor_planes": [0] * 4,
                                            "unchanged": 0, "elements": 0, "zero_elements": 0})
        raw = raw_bytes(t)
        c["logical"] += raw.size
        c["elements"] += t.numel()
        c["zero_elements"] += int((raw.view(np.uint32) == 0).sum())
        planes = np.ascontiguousarray(raw.reshape(-1, 4).T)
        for k in range(4):
            c["full_planes"][k] += min(len(comp.compress(planes[k].data)), planes[k].size)
        p = prev_t.get(name)
        if p is not None and p.shape == t.shape and p.dtype == t.dtype:
            x = np.bitwise_xor(raw.view(np.uint32), raw_bytes(p).view(np.uint32))
            c["unchanged"] += int((x == 0).sum())
            xp = np.ascontiguousarray(x.view(np.uint8).reshape(-1, 4).T)
            for k in range(4):
                c["xor_planes"][k] += min(len(comp.compress(xp[k].data)), xp[k].size)
    return out


# ============================================================================== scenario
def commit_breakdown(repo: Repository, cid: str) -> dict[str, dict[str, int]]:
    """New stored bytes of one commit by checkpoint part, from the catalog (dedup counted once)."""
    out: dict[str, dict[str, int]] = {}
    try:
        rows = repo.catalog.conn.execute(
            "SELECT co.name, co.hash, co.how, o.stored_bytes, o.nbytes, o.kind FROM commit_objects co "
            "JOIN objects o ON o.hash = co.hash WHERE co.commit_id = ?", (cid,)
        ).fetchall()
    except Exception as exc:  # the catalog schema is not a public API; keep the benchmark running
        return {"error": {"message": str(exc)}}  # type: ignore[dict-item]
    seen: set[str] = set()
    for name, h, how, stored, nbytes, kind in rows:
        c = out.setdefault(category(name), {"logical": 0, "written": 0, "full": 0, "delta": 0, "dedup": 0,
                                            "full_bytes": 0, "delta_bytes": 0})
        c["logical"] += nbytes
        if how == "dedup" or h in seen:
            c["dedup"] += 1
            continue
        seen.add(h)
        c["written"] += stored
        c[kind] = c.get(kind, 0) + 1
        c[f"{kind}_bytes"] = c.get(f"{kind}_bytes", 0) + stored
    return out


def top_tensors(repo: Repository, cids: list[str], n: int = 8) -> list[tuple[str, int, int]]:
    tot: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    try:
        for cid in cids:
            seen: set[str] = set()
            for name, h, how, stored, nbytes in repo.catalog.conn.execute(
                "SELECT co.name, co.hash, co.how, o.stored_bytes, o.nbytes FROM commit_objects co "
                "JOIN objects o ON o.hash = co.hash WHERE co.commit_id = ?", (cid,)
            ):
                tot[name][1] += nbytes
                if how != "dedup" and h not in seen:
                    seen.add(h)
                    tot[name][0] += stored
    except Exception:
        return []
    return sorted(((k, v[0], v[1]) for k, v in tot.items()), key=lambda r: -r[1])[:n]


def run_scenario(name: str, args, root: Path, *, frozen: bool, chain_ks: list[int]) -> dict:
    print(f"\n=== scenario: {name} ({'backbone frozen, head trains' if frozen else 'full fine-tune'}) ===",
          flush=True)
    seed_all(args.seed)
    data = Batches(args.batch, args.seq_len, args.seed)
    model = MiniLMClassifier(load_minilm(), num_labels=len(data.label_names))
    if frozen:
        freeze_backbone(model)
    model.head.train()
    if not frozen:
        model.train()
    total_steps = args.epochs * args.steps
    warmup = max(1, total_steps // 10)
    lr = args.lr * (50 if frozen else 1)  # a head alone trains with a larger step
    opt = torch.optim.AdamW(no_decay_param_groups(model, args.weight_decay), lr=lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_lambda(total_steps, warmup))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    hparams = {"lr": lr, "weight_decay": args.weight_decay, "batch_size": args.batch, "seq_len": args.seq_len,
               "epochs": args.epochs, "steps_per_epoch": args.steps, "frozen": frozen, "seed": args.seed}

    tdir, cdir = root / name / "torch", root / name / "coral"
    tdir.mkdir(parents=True)
    cdir.mkdir(parents=True)
    repo = coral_torch.open_repository(cdir / ".coral")
    captured: list = []
    real_commit = repo.commit

    def spy(*a, **k):  # keep the CommitStats that coral_torch.save drops (instance attribute only)
        s = real_commit(*a, **k)
        captured.append(s)
        return s

    repo.commit = spy  # type: ignore[method-assign]
    krepos: dict[int, tuple[Repository, Path]] = {}
    for K in chain_ks:
        kd = root / name / f"coral_k{K}"
        kd.mkdir(parents=True)
        krepos[K] = (Repository(kd / ".coral", delta_config=DeltaConfig(max_chain_length=K)), kd)

    epochs: list[dict] = []
    snaps: list[dict] = []
    prev_snap: Optional[dict] = None
    planes: dict = {}
    kstats: dict[int, list[dict]] = {K: [] for K in chain_ks}
    global_step = 0
    best = {"score": None, "path": "", "k": {}}
    t_train = 0.0
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        losses = []
        for _ in range(args.steps):
            ids, mask, labels = data.next()
            loss = model.loss(ids, mask, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            global_step += 1
            losses.append(loss.item())
        t_epoch = time.perf_counter() - t0
        t_train += t_epoch
        mean_loss = float(np.mean(losses))
        ckpt = build_checkpoint(model, opt, sched, epoch=epoch, global_step=global_step, loss=mean_loss,
                                dirpath=str(tdir), best=best, hparams=hparams)

        tfile = tdir / f"epoch={epoch}-step={global_step}.ckpt"
        _, t_save = timed(torch.save, ckpt, tfile)
        _, t_fsync = timed(fsync_path, tfile)
        cfile = cdir / f"epoch{epoch}.pt"
        n_before = len(captured)
        cid, c_save = timed(coral_torch.save, ckpt, str(cfile))
        stats = captured[-1] if len(captured) > n_before else None
        snap = copy.deepcopy(ckpt)  # what was saved, frozen (optimizer state mutates in place)
        snaps.append(snap)
        row = {
            "epoch": epoch, "global_step": global_step, "loss": mean_loss,
            "torch_bytes": tfile.stat().st_size, "torch_save_s": t_save, "torch_fsync_s": t_fsync,
            "coral_commit": cid, "coral_save_s": c_save,
            "coral_written": stats.written_bytes if stats else None,
            "coral_logical": stats.logical_bytes if stats else None,
            "coral_new_full": stats.new_full if stats else None,
            "coral_new_delta": stats.new_delta if stats else None,
            "coral_dedup": stats.deduplicated if stats else None,
            "coral_dir_bytes": dir_bytes(cdir / ".coral"),
            "breakdown": commit_breakdown(repo, cid),
            "torch_file": str(tfile), "coral_file": str(cfile),
        }
        for K, (krepo, kd) in krepos.items():
            kc: list = []
            orig = krepo.commit
            krepo.commit = lambda *a, _o=orig, _c=kc, **k: _c.append(_o(*a, **k)) or _c[-1]  # type: ignore
            _, ks = timed(coral_torch.save, ckpt, str(kd / f"epoch{epoch}.pt"), repo=krepo)
            krepo.commit = orig  # type: ignore[method-assign]
            kstats[K].append({"written": kc[-1].written_bytes if kc else None, "save_s": ks,
                              "new_delta": kc[-1].new_delta if kc else None})
        if epoch == args.epochs - 1 and args.planes:
            planes = plane_analysis(snap, prev_snap)
        prev_snap = snap
        epochs.append(row)
        print(f"epoch {epoch}: loss {mean_loss:.3f}  train {t_epoch:.1f}s  "
              f"torch.save {row['torch_bytes'] / MB:.1f} MB {t_save:.2f}s  coral +{(row['coral_written'] or 0) / MB:.1f} MB "
              f"{c_save:.2f}s", flush=True)

    # ---- loads (page cache hot for both; every coral load checked bit-exactly)
    mismatches: dict[int, list[str]] = {}
    for row, snap in zip(epochs, snaps):
        tls, cls = [], []
        for rep in range(max(1, args.load_repeat)):  # best of N: the machine may be shared
            a, tl = timed(torch.load, row["torch_file"], weights_only=True)
            b, cl = timed(coral_torch.load, row["coral_file"])
            tls.append(tl)
            cls.append(cl)
            if rep + 1 < args.load_repeat:
                del a, b
        row["torch_load_s"], row["coral_load_s"] = min(tls), min(cls)
        row["torch_load_all_s"], row["coral_load_all_s"] = tls, cls
        diff_c = compare(b, snap, "coral")
        diff_t = compare(a, snap, "torch")
        row["coral_exact"] = not diff_c
        row["torch_exact"] = not diff_t
        if diff_c:
            mismatches[row["epoch"]] = diff_c[:10]
        del a, b

    # ---- chain-length variants: bytes, and the load of every epoch (best of --load-repeat)
    chain = {}
    for K, (krepo, kd) in krepos.items():
        loads, exact = [], True
        for e in range(args.epochs):
            best = math.inf
            for _ in range(max(1, args.load_repeat)):
                b, kl = timed(coral_torch.load, str(kd / f"epoch{e}.pt"), repo=krepo)
                best = min(best, kl)
                if e == args.epochs - 1:
                    exact = exact and not compare(b, snaps[-1])
                del b
            loads.append(best)
        chain[K] = {"per_epoch_written": [s["written"] for s in kstats[K]],
                    "save_s": sum(s["save_s"] for s in kstats[K]),
                    "dir_bytes": dir_bytes(kd / ".coral"), "last_load_s": loads[-1], "load_s": loads,
                    "last_exact": exact}
        krepo.close()

    # ---- zipnn on each torch.save file
    zip_res = None
    if args.zipnn:
        try:
            from zipnn import ZipNN

            zn = ZipNN(input_format="byte", bytearray_dtype="float32", threads=1)
            zsizes, ztimes = [], []
            last = None
            for row in epochs:
                data_bytes = Path(row["torch_file"]).read_bytes()
                # zipnn 0.5.4 corrupts memory on inputs that are not a whole number of float32s
                data_bytes += b"\0" * (-len(data_bytes) % 4)
                # zipnn 0.5.4 rewrites its input buffer in place: give it a private copy and
                # compare the round trip with the untouched original
                comp, zt = timed(zn.compress, bytes(bytearray(data_bytes)))
                zsizes.append(len(comp))
                ztimes.append(zt)
                last = (comp, data_bytes)
            dec, zdt = timed(zn.decompress, last[0])
            zip_res = {"bytes": zsizes, "compress_s": ztimes, "decompress_last_s": zdt,
                       "roundtrip_ok": bytes(dec) == last[1]}
            del last, dec
        except Exception as exc:  # pragma: no cover
            zip_res = {"error": repr(exc)}

    rstats = repo.stats()
    coral_dir = dir_bytes(cdir / ".coral")
    packs = dir_bytes(cdir / ".coral" / "packs")
    pointers = sum(Path(r["coral_file"]).stat().st_size for r in epochs)
    top = top_tensors(repo, [r["coral_commit"] for r in epochs])
    vocab_rows = int(model.backbone.embeddings.word_embeddings.weight.shape[0])
    return {
        "name": name, "frozen": frozen, "trainable_params": trainable,
        "params": sum(p.numel() for p in model.parameters()), "train_s": t_train,
        "epochs": epochs, "mismatches": mismatches, "chain": chain, "zipnn": zip_res, "planes": planes,
        "repo_stats": rstats, "coral_dir_bytes": coral_dir, "coral_pack_bytes": packs,
        "coral_catalog_bytes": coral_dir - packs, "pointer_bytes": pointers, "top_tensors": top,
        "vocab_rows_used": len(data.used_ids), "vocab_rows": vocab_rows, "load_repeat": max(1, args.load_repeat),
    }


# ================================================================================ report
def fmt_mb(b: Optional[float]) -> str:
    return "-" if b is None else f"{b / MB:8.2f}"


def report(res: dict) -> dict:
    ep = res["epochs"]
    t_bytes = sum(r["torch_bytes"] for r in ep)
    c_bytes = res["coral_dir_bytes"]
    t_save = sum(r["torch_save_s"] for r in ep)
    t_fsync = sum(r["torch_fsync_s"] for r in ep)
    c_save = sum(r["coral_save_s"] for r in ep)
    t_load = sum(r["torch_load_s"] for r in ep)
    c_load = sum(r["coral_load_s"] for r in ep)
    print(f"\n--- {res['name']}: {res['params'] / 1e6:.2f}M params ({res['trainable_params'] / 1e6:.3f}M trainable), "
          f"training {res['train_s']:.1f}s, word-embedding rows touched {res['vocab_rows_used']}/{res['vocab_rows']}")
    hdr = (f"{'epoch':>5} {'loss':>6} {'torch MB':>9} {'coral MB':>9} {'cor/tor':>7} {'coral s':>8} "
           f"{'torch s':>8} {'+fsync':>7} {'t.load s':>8} {'c.load s':>8} {'exact':>5}  new full/delta/dedup")
    print(hdr)
    print("-" * len(hdr))
    for r in ep:
        ratio = (r["coral_written"] or 0) / r["torch_bytes"]
        print(f"{r['epoch']:>5} {r['loss']:6.3f} {fmt_mb(r['torch_bytes']):>9} {fmt_mb(r['coral_written']):>9} "
              f"{ratio:7.3f} {r['coral_save_s']:8.3f} {r['torch_save_s']:8.3f} {r['torch_fsync_s']:7.3f} "
              f"{r['torch_load_s']:8.3f} {r['coral_load_s']:8.3f} {'yes' if r['coral_exact'] else 'NO':>5}  "
              f"{r['coral_new_full']}/{r['coral_new_delta']}/{r['coral_dedup']}")
    print("-" * len(hdr))
    print(f"{'total':>5} {'':6} {fmt_mb(t_bytes):>9} {fmt_mb(sum((r['coral_written'] or 0) for r in ep)):>9} "
          f"{sum((r['coral_written'] or 0) for r in ep) / t_bytes:7.3f} {c_save:8.3f} {t_save:8.3f} {t_fsync:7.3f} "
          f"{t_load:8.3f} {c_load:8.3f}")
    rs = res["repo_stats"]
    print(f"coral .coral dir on disk: {c_bytes / MB:.2f} MB (packs {res['coral_pack_bytes'] / MB:.2f} MB + catalog "
          f"{res['coral_catalog_bytes'] / MB:.2f} MB) + pointer files {res['pointer_bytes']} B")
    print("Repository.stats(): " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in rs.items() if k != "path"))
    summary = {
        "torch_bytes": t_bytes, "coral_bytes": c_bytes, "coral_bytes_ratio": c_bytes / t_bytes,
        "coral_save_s": c_save, "torch_save_s": t_save, "torch_save_fsync_s": t_save + t_fsync,
        "save_time_ratio": c_save / t_save, "save_time_ratio_vs_fsync": c_save / (t_save + t_fsync),
        "coral_load_s": c_load, "torch_load_s": t_load, "load_time_ratio": c_load / t_load,
        "save_time_ratio_median_epoch": float(np.median([r["coral_save_s"] / r["torch_save_s"] for r in ep])),
        "load_time_ratio_median_epoch": float(np.median([r["coral_load_s"] / r["torch_load_s"] for r in ep])),
        "all_exact": all(r["coral_exact"] for r in ep), "torch_roundtrip_exact": all(r["torch_exact"] for r in ep),
    }
    z = res["zipnn"]
    if z and "bytes" in z:
        summary.update(zipnn_bytes=sum(z["bytes"]), zipnn_ratio=sum(z["bytes"]) / t_bytes,
                       zipnn_compress_s=sum(z["compress_s"]))
        print(f"zipnn (byte/float32, threads=1) of the torch.save files: {sum(z['bytes']) / MB:.2f} MB "
              f"({summary['zipnn_ratio']:.3f}x), compress {sum(z['compress_s']):.2f}s total, "
              f"decompress last {z['decompress_last_s']:.2f}s, roundtrip "
              f"{'ok' if z['roundtrip_ok'] else 'NOT bit-exact'}; "
              f"per epoch MB: {' '.join(f'{b / MB:.1f}' for b in z['bytes'])}")
    elif z:
        print(f"zipnn failed: {z.get('error')}")
    print(f"ratios: coral/torch.save bytes {summary['coral_bytes_ratio']:.3f}x"
          + (f", zipnn/torch.save bytes {summary['zipnn_ratio']:.3f}x" if "zipnn_ratio" in summary else "")
          + f", save time {summary['save_time_ratio']:.2f}x (vs torch.save+fsync {summary['save_time_ratio_vs_fsync']:.2f}x,"
          f" median per epoch {summary['save_time_ratio_median_epoch']:.2f}x)"
          + f", load time {summary['load_time_ratio']:.2f}x (median per epoch {summary['load_time_ratio_median_epoch']:.2f}x;"
          f" best of {res['load_repeat']}), bit-exact: {'all epochs' if summary['all_exact'] else 'NO'}")
    if res["mismatches"]:
        print("MISMATCHES:", json.dumps(res["mismatches"], indent=1))

    # breakdown by checkpoint part
    cats: dict[str, dict[str, int]] = collections.defaultdict(lambda: collections.defaultdict(int))
    for r in ep:
        for c, d in r["breakdown"].items():
            for k, v in d.items():
                if isinstance(v, int):
                    cats[c][k] += v
    if cats:
        print("\nwhere the coral bytes go (all epochs; logical = bytes in the checkpoints):")
        print(f"{'part':>12} {'logical MB':>11} {'written MB':>11} {'ratio':>6} {'share':>6}   "
              f"{'1st epoch MB':>12} {'later MB/epoch':>14} {'later ratio':>11}")
        tot_w = sum(d["written"] for d in cats.values()) or 1
        for c, d in sorted(cats.items(), key=lambda kv: -kv[1]["written"]):
            first = ep[0]["breakdown"].get(c, {})
            later_w = d["written"] - first.get("written", 0)
            later_l = d["logical"] - first.get("logical", 0)
            n_later = max(1, len(ep) - 1)
            print(f"{c:>12} {d['logical'] / MB:11.2f} {d['written'] / MB:11.2f} "
                  f"{d['written'] / max(1, d['logical']):6.3f} {d['written'] / tot_w:6.1%}   "
                  f"{first.get('written', 0) / MB:12.2f} {later_w / n_later / MB:14.2f} "
                  f"{later_w / max(1, later_l):11.3f}")
    if res["top_tensors"]:
        print("largest tensors by bytes written (all epochs):")
        for n, w, l in res["top_tensors"]:
            print(f"  {w / MB:8.2f} MB of {l / MB:8.2f} MB ({w / max(1, l):.3f})  {n}")
    if res["planes"]:
        print("byte planes of the last epoch's fp32 tensors, zstd-1 bytes (plane 3 = sign+exponent high bits):")
        print(f"{'part':>12} {'logical MB':>10} {'zero el.':>8} {'unchanged':>9}   "
              f"{'own encoding: p0/p1/p2/p3 MB':>30}   {'XOR vs prev: p0/p1/p2/p3 MB':>30}")
        for c, d in sorted(res["planes"].items(), key=lambda kv: -kv[1]["logical"]):
            el = max(1, d["elements"])
            print(f"{c:>12} {d['logical'] / MB:10.2f} {d['zero_elements'] / el:8.1%} {d['unchanged'] / el:9.1%}   "
                  f"{'/'.join(f'{x / MB:.2f}' for x in d['full_planes']):>30}   "
                  f"{'/'.join(f'{x / MB:.2f}' for x in d['xor_planes']):>30}")
    if res["chain"]:
        print("DeltaConfig(max_chain_length=K), same checkpoints (default repo above uses K="
              f"{DeltaConfig().max_chain_length}):")
        summary["chain"] = {}
        for K, d in sorted(res["chain"].items()):
            ratio = d["dir_bytes"] / t_bytes
            load_ratio = sum(d["load_s"]) / t_load
            summary["chain"][K] = {"bytes": d["dir_bytes"], "ratio": ratio, "save_s": d["save_s"],
                                   "last_load_s": d["last_load_s"], "load_s": d["load_s"], "load_ratio": load_ratio}
            print(f"  K={K}: {d['dir_bytes'] / MB:8.2f} MB ({ratio:.3f}x torch.save), per epoch MB "
                  f"{' '.join(f'{(w or 0) / MB:.1f}' for w in d['per_epoch_written'])}, save {d['save_s']:.2f}s, "
                  f"load every epoch {sum(d['load_s']):.2f}s ({load_ratio:.2f}x torch.load; "
                  f"{' '.join(f'{x:.2f}' for x in d['load_s'])}), last exact {'yes' if d['last_exact'] else 'NO'}")
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per epoch")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chain-k", default=None,
                    help="comma-separated max_chain_length values to try (default '0,4'; '' = none)")
    ap.add_argument("--no-frozen", action="store_true", help="skip the frozen-backbone scenario")
    ap.add_argument("--no-zipnn", dest="zipnn", action="store_false")
    ap.add_argument("--no-planes", dest="planes", action="store_false", help="skip the byte-plane analysis")
    ap.add_argument("--load-repeat", type=int, default=2, help="time each load this many times, keep the best")
    ap.add_argument("--quick", action="store_true",
                    help="2 epochs x 4 steps, no chain sweep unless --chain-k is given (smoke test)")
    ap.add_argument("--json", dest="json_out", help="write all results to this JSON file")
    ap.add_argument("--keep", help="write checkpoints under this directory and keep them")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.steps = min(args.epochs, 2), min(args.steps, 4)
        if args.chain_k is None:
            args.chain_k = ""
    if args.chain_k is None:
        args.chain_k = "0,4"
    chain_ks = [int(k) for k in args.chain_k.split(",") if k.strip()]
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    if args.keep:
        root = Path(args.keep).absolute()
        if root.exists() and any(root.iterdir()):
            raise SystemExit(f"--keep {root} exists and is not empty")
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = Path(tempfile.mkdtemp(prefix="coral-epochs-"))
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, coral_torch {coral_torch.__version__}, {os.cpu_count()} CPUs, "
          f"threads {torch.get_num_threads()}; epochs={args.epochs} steps={args.steps} batch={args.batch} "
          f"seq_len<={args.seq_len} lr={args.lr} seed={args.seed}; dir {root}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    results, summaries = [], {}
    try:
        scenarios = [("full", False)] + ([] if args.no_frozen else [("frozen", True)])
        for name, frozen in scenarios:
            res = run_scenario(name, args, root, frozen=frozen, chain_ks=chain_ks if not frozen else [])
            summaries[name] = report(res)
            results.append(res)
            gc.collect()
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    print("\n=== targets ===")
    checks = []
    s = summaries.get("full")
    if s:
        checks += [
            ("full: coral/torch.save bytes", s["coral_bytes_ratio"], TARGETS["bytes_full"]),
            ("full: save time coral/torch.save", s["save_time_ratio"], TARGETS["save_time"]),
            ("full: load time coral/torch.load", s["load_time_ratio"], TARGETS["load_time"]),
        ]
    f = summaries.get("frozen")
    if f:
        checks.append(("frozen: coral/torch.save bytes", f["coral_bytes_ratio"], TARGETS["bytes_frozen"]))
        checks.append(("frozen: save time coral/torch.save", f["save_time_ratio"], TARGETS["save_time"]))
        checks.append(("frozen: load time coral/torch.load", f["load_time_ratio"], TARGETS["load_time"]))
    ok_all = True
    for label, v, tgt in checks:
        ok = v <= tgt
        ok_all &= ok
        print(f"  {label:<38} {v:6.3f}x  target <= {tgt:.2f}x  {'OK' if ok else 'MISSED'}")
    exact = all(x["all_exact"] for x in summaries.values())
    print(f"  {'bit-exact coral loads (every epoch)':<38} {'yes' if exact else 'NO'}")
    print(f"total wall time {time.perf_counter() - t0:.1f}s; load average at the end "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (timings are only comparable on an idle machine)")
    if args.json_out:
        def clean(o):
            if isinstance(o, dict):
                return {str(k): clean(v) for k, v in o.items()}
            if isinstance(o, (list, tuple)):
                return [clean(v) for v in o]
            if isinstance(o, (np.integer, np.floating)):
                return o.item()
            return o

        with open(args.json_out, "w") as fh:
            json.dump(clean({"args": vars(args), "summaries": summaries, "results": results,
                             "targets": TARGETS}), fh, indent=1)
        print(f"wrote {args.json_out}")
    return 0 if exact else 1


if __name__ == "__main__":
    raise SystemExit(main())
