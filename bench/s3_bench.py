"""Push/pull of real fine-tuning checkpoints to S3: coral_torch's Repository vs plain torch.save files.

Fine-tunes all-MiniLM-L6-v2 (22.7M parameters, :mod:`minilm`) on a small real text-classification
task with AdamW, and after every epoch stores the full checkpoint (model + optimizer state) twice:

  (a) ``Repository.commit`` into a coral_torch repository (dedup + XOR deltas + byte-plane codec),
  (b) ``torch.save`` to one file per epoch.

Then, against a local S3 server (moto, in its own process, on 127.0.0.1), it times

  * ``Repository.push`` of the repository, a second push (must send no object bytes), and
    ``Repository.pull`` into an empty repository (every epoch then checked bit-exact against the
    torch.save file),
  * the ``aws s3 sync``-style baseline: boto3 ``upload_file`` of the torch.save files, one after
    another, with ``TransferConfig(max_concurrency=8)`` and the same multipart settings as
    ``S3Config`` (64 MiB threshold, 16 MiB parts), then ``download_file`` of each.

All traffic goes through a counting TCP proxy (tests/s3_server.py's ``CuttingProxy``, which never
cuts here), so "wire" bytes are what really crossed the socket: payloads, metadata documents,
listings and HTTP headers. "Logical" bytes are the checkpoints' tensor bytes (the same for both).

    .venv/bin/python bench/s3_bench.py                    # 5 epochs x 20 steps, ~3 min on 2 cores
    .venv/bin/python bench/s3_bench.py --quick            # 2 epochs x 3 steps: smoke run
    .venv/bin/python bench/s3_bench.py --epochs 5 --steps 30 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import boto3  # noqa: E402
from boto3.s3.transfer import TransferConfig  # noqa: E402
from botocore.config import Config as BotoConfig  # noqa: E402
from s3_server import CuttingProxy, free_port  # noqa: E402

from coral_torch import Repository, S3Config  # noqa: E402

MiB = 1 << 20
MB = 1e6
KEY, SECRET, REGION = "bench-key", "bench-secret", "us-east-1"
TARGET_RATIO = 0.55


# =============================================================================== S3 server
class MotoProcess:
    """moto's S3 server in a child process (so the server does not share this process's GIL)."""

    def __init__(self) -> None:
        self.port = free_port()
        code = ("import logging, sys; logging.disable(logging.CRITICAL); "
                "from moto.server import ThreadedMotoServer; "
                f"s = ThreadedMotoServer(ip_address='127.0.0.1', port={self.port}, verbose=False); s.start(); "
                "sys.stdin.read(); s.stop()")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/moto-api/", timeout=2).read()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start")
                time.sleep(0.2)

    def stop(self) -> None:
        try:
            self.proc.stdin.close()  # the child stops when its stdin closes
            self.proc.wait(timeout=20)
        except Exception:  # noqa: BLE001
            self.proc.kill()
            self.proc.wait()


# ============================================================================= training
def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_and_checkpoint(args, root: Path) -> dict[str, Any]:
    """Fine-tune; after every epoch commit the checkpoint and torch.save it. Returns what was made."""
    from minilm import (
        MiniLMClassifier,
        labeled_corpus,
        linear_warmup_lambda,
        load_minilm,
        load_tokenizer,
        no_decay_param_groups,
    )

    seed_all(args.seed)
    items, label_names = labeled_corpus()
    tok = load_tokenizer()
    enc = [tok.encode(s, args.seq_len) for s, _ in items]
    labels = [lab for _, lab in items]
    rng = random.Random(args.seed)
    order: list[int] = []

    def batch():
        nonlocal order
        if len(order) < args.batch:
            perm = list(range(len(enc)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[: args.batch], order[args.batch:]
        ids, mask = tok.pad([enc[i] for i in idx])
        return ids, mask, torch.tensor([labels[i] for i in idx])

    model = MiniLMClassifier(load_minilm(), num_labels=len(label_names))
    model.train()
    total = args.epochs * args.steps
    opt = torch.optim.AdamW(no_decay_param_groups(model, 0.01), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_lambda(total, max(1, total // 10)))
    params = sum(p.numel() for p in model.parameters())

    repo = Repository(root / "coral" / ".coral")
    tdir = root / "torch"
    tdir.mkdir(parents=True)
    out: dict[str, Any] = {"params": params, "epochs": [], "files": [], "commits": []}
    step = 0
    t_train = 0.0
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        losses = []
        for _ in range(args.steps):
            ids, mask, y = batch()
            loss = model.loss(ids, mask, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.item())
        t_train += time.perf_counter() - t0
        ckpt = {"epoch": epoch, "global_step": step, "state_dict": model.state_dict(),
                "optimizer_states": [opt.state_dict()], "lr_schedulers": [sched.state_dict()],
                "hyper_parameters": {"lr": args.lr, "batch": args.batch, "seq_len": args.seq_len}}
        t0 = time.perf_counter()
        st = repo.commit(ckpt, run="minilm", epoch=epoch, step=step, metrics={"loss": float(np.mean(losses))})
        t_commit = time.perf_counter() - t0
        f = tdir / f"epoch={epoch}-step={step}.ckpt"
        t0 = time.perf_counter()
        torch.save(ckpt, f)
        t_save = time.perf_counter() - t0
        out["files"].append(f)
        out["commits"].append(st.commit_id)
        out["epochs"].append({"epoch": epoch, "loss": float(np.mean(losses)), "logical": st.logical_bytes,
                              "written": st.written_bytes, "file": f.stat().st_size, "commit_s": t_commit,
                              "save_s": t_save, "new_full": st.new_full, "new_delta": st.new_delta,
                              "dedup": st.deduplicated})
        print(f"  epoch {epoch}: loss {np.mean(losses):.4f}  file {f.stat().st_size / MB:.1f} MB  "
              f"commit wrote {st.written_bytes / MB:.1f} MB ({st.new_full} full, {st.new_delta} delta, "
              f"{st.deduplicated} dedup)", flush=True)
        del ckpt
    repo.close()
    out["train_s"] = t_train
    out["repo"] = root / "coral" / ".coral"
    return out


# ================================================================================ helpers
def tensor_bytes(obj: Any, prefix: str = ""):
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        yield prefix, str(t.dtype), tuple(t.shape), (t.reshape(-1).view(torch.uint8).numpy() if t.numel() else
                                                     np.zeros(0, np.uint8))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensor_bytes(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensor_bytes(v, f"{prefix}/{i}")


def same_tensors(a: Any, b: Any) -> bool:
    ta, tb = list(tensor_bytes(a)), list(tensor_bytes(b))
    return len(ta) == len(tb) and all(
        x[0] == y[0] and x[1] == y[1] and x[2] == y[2] and np.array_equal(x[3], y[3]) for x, y in zip(ta, tb))


class Wire:
    """Bytes through the proxy since ``start``."""

    def __init__(self, proxy: Optional[CuttingProxy]):
        self.proxy = proxy
        self.up0 = self.down0 = 0

    def start(self) -> None:
        gc.collect()
        if self.proxy is not None:
            self.up0, self.down0 = self.proxy.bytes_up, self.proxy.bytes_down

    def read(self) -> tuple[int, int]:
        if self.proxy is None:
            return 0, 0
        return self.proxy.bytes_up - self.up0, self.proxy.bytes_down - self.down0


def mbps(nbytes: float, seconds: float) -> str:
    return f"{nbytes / MB / seconds:8.1f}" if seconds > 0 else "       -"


# =================================================================================== main
def run(args) -> dict[str, Any]:
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="s3bench-"))
    if args.keep and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    for var, val in (("AWS_ACCESS_KEY_ID", KEY), ("AWS_SECRET_ACCESS_KEY", SECRET), ("AWS_DEFAULT_REGION", REGION),
                     ("AWS_EC2_METADATA_DISABLED", "true")):
        os.environ[var] = val
    print(f"training MiniLM: {args.epochs} epochs x {args.steps} steps (batch {args.batch}, seq {args.seq_len})",
          flush=True)
    made = train_and_checkpoint(args, root)
    logical = sum(e["logical"] for e in made["epochs"])
    file_bytes = sum(e["file"] for e in made["epochs"])

    server = MotoProcess()
    proxy = None if args.no_proxy else CuttingProxy(server.port).start()
    endpoint = proxy.endpoint if proxy is not None else f"http://127.0.0.1:{server.port}"
    wire = Wire(proxy)
    boto_cfg = BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 5, "mode": "standard"},
                          max_pool_connections=2 * args.concurrency + 4)
    client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=KEY,
                          aws_secret_access_key=SECRET, config=boto_cfg)
    bucket = "s3-bench"
    client.create_bucket(Bucket=bucket)
    res: dict[str, Any] = {"params": made["params"], "epochs": made["epochs"], "logical_bytes": logical,
                           "train_s": made["train_s"],
                           "file_bytes": file_bytes, "endpoint": endpoint, "concurrency": args.concurrency}
    try:
        cfg = S3Config(bucket=bucket, prefix="coral", endpoint_url=endpoint, region=REGION, access_key=KEY,
                       secret_key=SECRET, addressing_style="path", progress=False,
                       max_concurrency=args.concurrency)
        repo = Repository(made["repo"], create=False)

        # ---- coral_torch push / second push / pull
        wire.start()
        t0 = time.perf_counter()
        push = repo.push(cfg)
        res["push_s"] = time.perf_counter() - t0
        res["push_wire_up"], res["push_wire_down"] = wire.read()
        res["push"] = push
        wire.start()
        t0 = time.perf_counter()
        push2 = repo.push(cfg)
        res["push2_s"] = time.perf_counter() - t0
        res["push2_wire_up"], _ = wire.read()
        res["push2"] = push2
        print(f"coral push: {push['object_bytes'] / MB:.1f} MB of objects in {res['push_s']:.1f}s; "
              f"second push: {push2['object_bytes']} object bytes", flush=True)

        pulled = Repository(root / "pulled" / ".coral")
        wire.start()
        t0 = time.perf_counter()
        pull = pulled.pull(cfg)
        res["pull_s"] = time.perf_counter() - t0
        _, res["pull_wire_down"] = wire.read()
        res["pull"] = pull
        print(f"coral pull: {pull['bytes_transferred'] / MB:.1f} MB in {res['pull_s']:.1f}s", flush=True)

        # ---- baseline: boto3 upload_file / download_file of the torch.save files
        tcfg = TransferConfig(max_concurrency=args.concurrency, multipart_threshold=cfg.multipart_threshold,
                              multipart_chunksize=cfg.multipart_chunksize)
        wire.start()
        t0 = time.perf_counter()
        for f in made["files"]:
            client.upload_file(str(f), bucket, f"plain/{f.name}", Config=tcfg)
        res["upload_s"] = time.perf_counter() - t0
        res["upload_wire_up"], _ = wire.read()
        ddir = root / "downloaded"
        ddir.mkdir()
        wire.start()
        t0 = time.perf_counter()
        for f in made["files"]:
            client.download_file(bucket, f"plain/{f.name}", str(ddir / f.name), Config=tcfg)
        res["download_s"] = time.perf_counter() - t0
        _, res["download_wire_down"] = wire.read()
        print(f"boto3 upload_file: {file_bytes / MB:.1f} MB in {res['upload_s']:.1f}s; "
              f"download_file in {res['download_s']:.1f}s", flush=True)

        # ---- checks: pulled commits are bit-exact to the torch.save files, downloads intact
        ok = True
        for cid, f in zip(made["commits"], made["files"]):
            ok &= same_tensors(pulled.load(cid), torch.load(ddir / f.name, weights_only=True))
            ok &= (ddir / f.name).stat().st_size == f.stat().st_size
        res["bit_exact"] = bool(ok)
        res["pulled_verify_ok"] = pulled.verify().ok
        pulled.close()
        repo.close()
    finally:
        if proxy is not None:
            proxy.stop()
        server.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return res


def print_table(res: dict[str, Any], args) -> None:
    L = res["logical_bytes"]
    ours_sent = res["push"]["bytes_transferred"]
    base_sent = res["file_bytes"]
    rows = [
        ("push   coral_torch Repository.push", ours_sent, res["push_wire_up"], res["push_s"]),
        ("upload torch.save files (upload_file)", base_sent, res["upload_wire_up"], res["upload_s"]),
        ("pull   coral_torch Repository.pull", res["pull"]["bytes_transferred"], res["pull_wire_down"],
         res["pull_s"]),
        ("download torch.save files (download_file)", base_sent, res["download_wire_down"], res["download_s"]),
    ]
    print()
    print(f"S3 push/pull: MiniLM-L6 ({res['params'] / 1e6:.1f}M params) + AdamW, {args.epochs} epochs x "
          f"{args.steps} steps, full checkpoint each epoch; moto on 127.0.0.1 (own process), "
          f"max_concurrency={res['concurrency']}")
    print(f"logical checkpoint bytes ({args.epochs} epochs' tensors): {L / MB:.1f} MB; "
          f"torch.save files: {base_sent / MB:.1f} MB")
    hdr = f"{'':42} {'moved MB':>9} {'wire MB':>9} {'time s':>8} {'logical MB/s':>13} {'wire MB/s':>10}"
    print(hdr)
    print("-" * len(hdr))
    for name, sent, wire_b, secs in rows:
        print(f"{name:42} {sent / MB:9.1f} {wire_b / MB:9.1f} {secs:8.2f} {mbps(L, secs):>13} {mbps(wire_b, secs):>10}")
    ratio = ours_sent / base_sent
    wratio = res["push_wire_up"] / res["upload_wire_up"] if res["upload_wire_up"] else float("nan")
    print("-" * len(hdr))
    print(f"bytes sent for {args.epochs} epochs: coral_torch {ours_sent / MB:.1f} MB vs torch.save files "
          f"{base_sent / MB:.1f} MB -> ratio {ratio:.3f}x (wire {wratio:.3f}x; target <= {TARGET_RATIO}x: "
          f"{'PASS' if ratio <= TARGET_RATIO else 'FAIL'})")
    p2 = res["push2"]
    print(f"second push: {p2['object_bytes']} object bytes, {p2['bytes_transferred']} bytes in all, "
          f"{res['push2_wire_up'] / 1e3:.1f} kB on the wire, {res['push2_s']:.2f}s (target 0 object bytes: "
          f"{'PASS' if p2['object_bytes'] == 0 else 'FAIL'})")
    print(f"pull into an empty repository: every epoch bit-exact to its torch.save file: "
          f"{'yes' if res['bit_exact'] else 'NO'}; verify ok: {res['pulled_verify_ok']}")
    per = ", ".join(f"e{e['epoch']} {e['written'] / MB:.1f}" for e in res["epochs"])
    print(f"coral written per epoch (MB): {per}; objects pushed {res['push']['objects_uploaded']}, "
          f"commits {res['push']['commits_uploaded']}")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per epoch")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--concurrency", type=int, default=8, help="max_concurrency for both sides")
    ap.add_argument("--quick", action="store_true", help="2 epochs x 3 steps (smoke run)")
    ap.add_argument("--no-proxy", action="store_true", help="talk to moto directly (no wire byte counts)")
    ap.add_argument("--json", dest="json_out", help="write the results to this JSON file")
    ap.add_argument("--keep", help="work in this directory and keep it")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.steps = 2, 3
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.perf_counter()
    res = run(args)
    print_table(res, args)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s (training {res['train_s']:.0f}s)")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(res, fh, indent=1, default=str)
    ok = res["bit_exact"] and res["pulled_verify_ok"] and res["push2"]["object_bytes"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
