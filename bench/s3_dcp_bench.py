"""Sharded checkpoints straight to S3 from 2 ranks, no shared file system: coral-torch vs DCP.

An FSDP2 model (>= ``--params`` parameters, default 50M: ``--layers`` Linear layers of ``width x
width``) with AdamW trains on 2 CPU ranks (gloo); after every training step it is saved, ``--saves``
times, by each method in its own pair of processes. Each rank is a simulated node: its own working
directory, HOME and cache; the ranks share nothing but the S3 server, ``rclone serve s3`` on
127.0.0.1 (disk-backed; moto keeps objects in memory), reached through a counting TCP proxy
(tests/s3_proxy.py), so "uploaded" is every byte the ranks sent to S3 (HTTP included).

Methods:
  dcp          ``dcp.save`` with ``FileSystemWriter`` into the node's directory, then each rank uploads
               the files it wrote (boto3 ``upload_file``): what users without a shared file system do
  dcp-async    the same with ``dcp.async_save``: blocking = until ``async_save`` returns; the upload
               follows once the future is done
  dcp-fsspec   ``dcp.save`` with DCP's ``FsspecWriter`` straight to ``s3://`` (s3fs), loaded with
               ``FsspecReader``; needs ``--fsspec-python``: an interpreter with s3fs (which pins an
               older botocore than this project's environment has), torch and this project
  coral        ``coral_torch.dcp.save(..., repo="s3://...")``: every rank uploads its own new objects
  coral-async  ``coral_torch.dcp.async_save(..., repo="s3://...")``
  coral-background  what ``CoralModelParallelStrategy`` / ``CoralCheckpoint`` do during ``fit``
               (``BackgroundShardedSaves``): stage into buffers kept from one save to the next, then
               save in the background over a gloo group of its own; blocking = until ``submit`` returns

Then two fresh processes on fresh nodes (empty caches) load the last save: coral from the bucket,
DCP after downloading the save's files (``FileSystemReader``), ``--loads`` times (the median is
shown). Times are wall seconds, summed over the saves; blocking is what the training loop waits for.

Usage (one run at a time; nothing else busy on the machine)::

    .venv/bin/python bench/s3_dcp_bench.py                       # 50M parameters, 5 saves
    .venv/bin/python bench/s3_dcp_bench.py --quick               # 4M parameters, 3 saves: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

MB = 1e6
KEY, SECRET, REGION = "bench-key", "bench-secret", "us-east-1"
METHODS = ("dcp", "dcp-async", "dcp-fsspec", "coral", "coral-async", "coral-background")


# ============================================================================ worker (one rank)
def build(width: int, layers: int):
    import torch
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    return model


def step(model, opt, width: int, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, width, generator=g)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def state_of(model, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def s3_client(endpoint: str):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                        region_name=REGION, config=Config(s3={"addressing_style": "path"},
                                                          request_checksum_calculation="when_required",
                                                          response_checksum_validation="when_required"))


def fsspec_options(endpoint: str) -> dict:
    return {"endpoint_url": endpoint, "key": KEY, "secret": SECRET}


def fsspec_writer(path: str, endpoint: str):
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    return FsspecWriter(path, **fsspec_options(endpoint))


def upload_dir(client, bucket: str, local: Path, prefix: str) -> None:
    for p in sorted(local.rglob("*")):
        if p.is_file():
            client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(local)}")


def download_prefix(client, bucket: str, prefix: str, local: Path) -> None:
    local.mkdir(parents=True, exist_ok=True)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            client.download_file(bucket, o["Key"], str(local / o["Key"][len(prefix) + 1:]))


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    import coral_torch.dcp as cdcp

    torch.set_num_threads(1)
    if os.environ.get("BENCH_LOG"):  # coral-torch's INFO log on stderr, with the time of each line
        import logging

        logging.basicConfig(level=logging.INFO, format="%(relativeCreated)8.0f ms %(name)s: %(message)s")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = build(args.width, args.layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    client = s3_client(args.endpoint)
    url = f"s3://{args.bucket}/{args.method}"
    node = Path.cwd()
    out: dict[str, Any] = {"blocking_s": [], "total_s": []}
    if args.role == "save":
        pending: list = []
        background = None
        if args.method == "coral-background":
            from coral_torch.callbacks.background_sharded import BackgroundShardedSaves
            from coral_torch.repository.options import CommitOptions

            background = BackgroundShardedSaves(nice=0)
        for i in range(args.saves):
            step(model, opt, args.width, seed=i)
            sd = state_of(model, opt)
            dist.barrier()
            t0 = time.perf_counter()
            if args.method == "coral":
                cdcp.save(sd, repo=url, run="bench")
                blocking = total = time.perf_counter() - t0
            elif args.method == "dcp-fsspec":
                dcp.save(sd, storage_writer=fsspec_writer(f"s3://{args.bucket}/dcp-fsspec/save{i}", args.endpoint))
                blocking = total = time.perf_counter() - t0
            elif background is not None:  # the next save waits for the previous publish (in submit)
                background.submit(sd, repo=url, options=CommitOptions(run="bench"))
                blocking = time.perf_counter() - t0
                background.wait()
                total = time.perf_counter() - t0
            elif args.method == "coral-async":
                for fut, _w in pending:  # the next save waits for the previous publish
                    fut.result()
                pending = [cdcp.async_save(sd, repo=url, run="bench")]
                blocking = time.perf_counter() - t0
                pending[0][0].result()
                total = time.perf_counter() - t0
            else:
                where = node / "dcp" / f"save{i}"
                if args.method == "dcp":
                    dcp.save(sd, storage_writer=dcp.FileSystemWriter(str(where)))
                    blocking = time.perf_counter() - t0
                else:
                    fut = dcp.async_save(sd, storage_writer=dcp.FileSystemWriter(str(where)))
                    blocking = time.perf_counter() - t0
                    fut.result()
                dist.barrier()  # the coordinator's .metadata is written: every rank's files are there
                upload_dir(client, args.bucket, where, f"{args.method}/save{i}")
                total = time.perf_counter() - t0
                if args.method == "dcp":
                    blocking = total  # training waits for the upload too
            dist.barrier()
            out["blocking_s"].append(blocking)
            out["total_s"].append(total)
        if background is not None:
            background.close()
    else:  # load the last save on a fresh node
        sd = state_of(model, opt)
        dist.barrier()
        profiler = None
        if args.profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        t0 = time.perf_counter()
        if args.method.startswith("coral"):
            cdcp.load(sd, "bench/latest", repo=url)
        elif args.method == "dcp-fsspec":
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

            path = f"s3://{args.bucket}/dcp-fsspec/save{args.saves - 1}"
            dcp.load(sd, storage_reader=FsspecReader(path, **fsspec_options(args.endpoint)))
        else:
            local = node / "download"
            download_prefix(client, args.bucket, f"{args.method}/save{args.saves - 1}", local)
            dcp.load(sd, storage_reader=dcp.FileSystemReader(str(local)))
        dist.barrier()
        out["load_s"] = time.perf_counter() - t0
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(str(Path(args.profile) / f"{args.method}-load-rank{rank}.prof"))
    if rank == 0:
        Path(args.result).write_text(json.dumps(out))
    dist.destroy_process_group()


# ============================================================================ parent
def run_pair(args, method: str, role: str, root: Path, endpoint: str, tag: str = "") -> dict:
    from s3_server import free_port

    port = free_port()
    result = root / f"{method}-{role}{tag}.json"
    procs = []
    for rank in range(2):
        node = root / f"{method}-{role}{tag}-node{rank}"
        (node / "home").mkdir(parents=True)
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "HOME": str(node / "home"), "CORAL_CACHE_DIR": str(node / "cache"), "AWS_ENDPOINT_URL": endpoint,
               "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": REGION,
               "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
               "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
               "PYTHONPATH": str(HERE.parent)}
        python = args.fsspec_python if method == "dcp-fsspec" else sys.executable
        cmd = [python, __file__, "--worker", "--role", role, "--method", method, "--endpoint", endpoint,
               "--bucket", args.bucket, "--width", str(args.width), "--layers", str(args.layers),
               "--saves", str(args.saves), "--result", str(result)]
        if args.profile:
            cmd += ["--profile", str(Path(args.profile).absolute())]
        procs.append(subprocess.Popen(cmd, env=env, cwd=node, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    for p in procs:
        out, _ = p.communicate(timeout=args.timeout)
        if p.returncode != 0:
            raise SystemExit(f"{method} {role} failed:\n{out[-4000:]}")
        if os.environ.get("BENCH_LOG"):
            print(f"--- {method} {role}{tag} rank {procs.index(p)}\n{out}", file=sys.stderr)
    return json.loads(result.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=50e6)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=0, help="layer width (default: from --params and --layers)")
    ap.add_argument("--saves", type=int, default=5)
    ap.add_argument("--loads", type=int, default=3, help="fresh-node loads of the last save (the median is shown)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--quick", action="store_true", help="4M parameters, 3 saves")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", dest="json_out")
    ap.add_argument("--fsspec-python", help="a Python with s3fs for the dcp-fsspec method (else it is skipped)")
    ap.add_argument("--profile", metavar="DIR", help="write a cProfile of each rank's load into DIR")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    ap.add_argument("--bucket", default="bench", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.quick:
        args.params, args.saves = 4e6, 3
    if not args.width:
        args.width = int((args.params / args.layers) ** 0.5 + 63) // 64 * 64
    params = args.layers * (args.width * args.width + args.width)
    from s3_server import CuttingProxy, RcloneS3Server

    root = Path(tempfile.mkdtemp(prefix="s3-dcp-bench-"))
    server = RcloneS3Server(root / "s3", key=KEY, secret=SECRET).start()
    proxy = CuttingProxy(server.port).start()
    endpoint = f"http://127.0.0.1:{proxy.port}"
    rows: dict[str, dict] = {}
    try:
        server.create_bucket(args.bucket)
        print(f"{params / 1e6:.1f}M parameters ({args.layers} x Linear({args.width}, {args.width})) + AdamW, "
              f"checkpoint {params * 12 / MB:.0f} MB, 2 ranks, {args.saves} saves; S3: rclone serve s3 on "
              f"127.0.0.1; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            if method == "dcp-fsspec" and not args.fsspec_python:
                print("[s3_dcp_bench] dcp-fsspec skipped: no --fsspec-python", file=sys.stderr, flush=True)
                continue
            up0 = proxy.bytes_up
            saved = run_pair(args, method, "save", root, endpoint)
            uploaded = proxy.bytes_up - up0
            down0 = proxy.bytes_down
            loads = [run_pair(args, method, "load", root, endpoint, tag=str(i))["load_s"] for i in range(args.loads)]
            rows[method] = {"uploaded": uploaded, "blocking_s": sum(saved["blocking_s"]),
                            "total_s": sum(saved["total_s"]), "load_s": statistics.median(loads), "loads_s": loads,
                            "load_downloaded": (proxy.bytes_down - down0) / args.loads, "per_save": saved}
            r = rows[method]
            print(f"[s3_dcp_bench] {method}: uploaded {r['uploaded'] / MB:.0f} MB, blocking {r['blocking_s']:.2f}s, "
                  f"total {r['total_s']:.2f}s, fresh-node load {r['load_s']:.2f}s", file=sys.stderr, flush=True)
    finally:
        proxy.stop()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    ref = rows.get("dcp")
    ref_async = rows.get("dcp-async")
    print("\n| method | uploaded MB | vs dcp | blocking s | vs dcp-async | total s | fresh-node load s | vs dcp |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for m, r in rows.items():
        up = f"{r['uploaded'] / ref['uploaded']:.3f}x" if ref else "-"
        bl = f"{r['blocking_s'] / ref_async['blocking_s']:.3f}x" if ref_async else "-"
        ld = f"{r['load_s'] / ref['load_s']:.3f}x" if ref else "-"
        print(f"| {m} | {r['uploaded'] / MB:.0f} | {up} | {r['blocking_s']:.2f} | {bl} | {r['total_s']:.2f} | "
              f"{r['load_s']:.2f} | {ld} |")
    print("\ngoals: uploaded <= 0.5x dcp; blocking <= dcp-async's; fresh-node load <= 1.0x dcp's")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"params": params, "saves": args.saves, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
