"""One rank of a multi-process FSDP2 (gloo, CPU) run for tests/integrations/test_dcp.py.

    python tests/_dcp_worker.py <scenario> <json args>   (RANK, WORLD_SIZE, MASTER_* in the env)

Scenarios: ``save`` (train, save, save unchanged, train, save, async_save, then load 2->2 into a
fresh model; on an ``s3://`` repository each rank also reports what its first three saves uploaded),
``load`` (a fresh model loads ``ref`` 2->2), ``killed`` (rank 1 dies while writing its pack),
``after_kill`` (one more save). Rank 0 writes a JSON report and the full (gathered) tensors it saved,
for the test to compare.

Faults of sharded saves to S3 (tests/remote/test_s3_dcp_faults.py), on run ``shard``:
``s3_kill`` (a save, then one more step and a save during which rank ``victim`` SIGKILLs itself:
``kill="upload"`` after uploading about half of its objects, ``kill="move_ref"`` at the coordinator's
first ref move, after its commit document); ``s3_save`` (``train`` steps more, a save, and with
``load`` a 2->2 load of it into a fresh model); ``s3_gated`` (optionally a ``prior`` save, ``train``
steps more, then a save whose coordinator waits in ``publish_shards`` for ``<gate>/go``, having written
``<gate>/planned``: another job publishes on the run meanwhile).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")

from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import coral_torch.dcp as cdcp  # noqa: E402
from coral_torch import Repository  # noqa: E402


def build(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Embedding(64, 32), torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 8)
    )
    for layer in (model[0], model[1], model[3]):
        fully_shard(layer)
    fully_shard(model)
    return model


def train(model, opt, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 64, (16,), generator=g)
        loss = model(x).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def full(sd: dict) -> dict:
    """Every value gathered into a plain tensor (a collective: all ranks call it)."""
    out = {}
    for k, v in sd.items():
        if isinstance(v, dict):
            out[k] = full(v)
        elif isinstance(v, DTensor):
            out[k] = v.full_tensor()
        elif isinstance(v, torch.Tensor):
            out[k] = v.detach().clone()  # optimizer state is live: later steps change it in place
        else:
            out[k] = v
    return out


def state(model, opt) -> dict:
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd, "extra": {"epoch": 1, "note": "hello"}}


def uploaded(repo: str) -> dict:
    """What this rank's last save uploaded to the ``s3://`` repository ``repo``, read from (and then
    cleared on) the process's cached handle, the one the DCP writer used: ``write_shard`` sets its
    ``last_publish`` on every save where the rank has plan items, uploading nothing included. Cleared,
    a save that skipped ``write_shard`` (the rank wrote nothing: it uploaded nothing) reads as zeros
    instead of the previous save's figures."""
    from coral_torch.repository.handles import open_repository

    handle = open_repository(repo, create=False)
    stats = getattr(handle, "last_publish", None) or {}
    handle.last_publish = {}
    return {
        "write_shard": bool(stats),
        "objects_uploaded": int(stats.get("objects_uploaded", 0)),
        "objects_skipped": int(stats.get("objects_skipped", 0)),
        "bytes_uploaded": int(stats.get("bytes_uploaded", 0)),
    }


def load_into_fresh(ref: str, repo: str) -> tuple[str | None, dict]:
    """Load commit ``ref`` into a fresh model (another seed, an optimizer with state to overwrite),
    resharded as it is now; the commit id loaded and the full (gathered) state it then has."""
    fresh = build(7)
    fopt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    train(fresh, fopt, 1, seed=9)
    target = state(fresh, fopt)
    cid = cdcp.load(target, ref, repo=repo)
    set_state_dict(fresh, fopt, model_state_dict=target["model"], optim_state_dict=target["optim"])
    return cid, full(state(fresh, fopt))


def failure(exc: BaseException) -> dict:
    """What a rank saw of a failed save: the exception and (DCP's ``CheckpointException``) its cause."""
    cause = exc.__cause__
    return {
        "error": type(exc).__name__,
        "message": str(exc)[:4000],
        "cause": type(cause).__name__ if cause is not None else None,
        "cause_message": str(cause)[:4000] if cause is not None else None,
    }


def s3_kill(args: dict, rank: int, model, opt, report: dict) -> None:
    """A save, then a save during which rank ``victim`` SIGKILLs itself (``kill``: where)."""
    import coral_torch.repository.s3_repository as s3r

    repo = args["repo"]
    report["prior"] = cdcp.save(state(model, opt), repo=repo, run="shard")
    train(model, opt, 1, seed=5)  # new state: each rank has objects to write
    if rank == int(args["victim"]):
        if args["kill"] == "upload":  # about half of its objects go up, then the rank dies
            real_upload = s3r.upload_objects

            def upload_then_die(repo_, objects, hashes, *a, **k):
                todo = sorted(hashes)
                half = max(1, len(todo) // 2)
                real_upload(repo_, objects, todo[:half], *a, **k)
                with open(f"{args['out']}.{rank}.upload.json", "w") as f:
                    json.dump({"uploaded": todo[:half], "not_uploaded": todo[half:]}, f)
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)

            s3r.upload_objects = upload_then_die
        elif args["kill"] == "move_ref":  # the commit document is written; no ref moves

            def die(*a, **k):
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)

            s3r.move_ref = die
        else:
            raise ValueError(args["kill"])
    t0 = time.monotonic()
    try:
        report["saved"] = cdcp.save(state(model, opt), repo=repo, run="shard")
    except BaseException as exc:  # noqa: BLE001 - what the survivor sees is the report
        report.update(failure(exc))
    report["seconds"] = time.monotonic() - t0


def s3_gated(args: dict, rank: int, model, opt, report: dict) -> None:
    """A save whose coordinator publishes only once ``<gate>/go`` exists (another job publishes first)."""
    from pathlib import Path

    from coral_torch.repository.s3_repository import S3Repository

    repo = args["repo"]
    if args.get("prior"):
        report["prior"] = cdcp.save(state(model, opt), repo=repo, run="shard")
    for seed in args.get("train", []):
        train(model, opt, 1, seed=seed)
    sd = state(model, opt)
    saved = full(sd)
    if rank == 0:
        torch.save({"saved": saved}, args["out"] + ".pt")
        gate = Path(args["gate"])
        real_publish = S3Repository.publish_shards

        def gated(self, *a, **k):
            (gate / "planned").write_text("planned")  # the save was planned (runs/<run>/latest read)
            deadline = time.monotonic() + float(args.get("gate_timeout", 150))
            while not (gate / "go").exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{gate / 'go'} never appeared")
                time.sleep(0.05)
            return real_publish(self, *a, **k)

        S3Repository.publish_shards = gated  # type: ignore[method-assign]
    try:
        report["saved"] = cdcp.save(sd, repo=repo, run="shard", keep=bool(args.get("keep", True)))
    except BaseException as exc:  # noqa: BLE001 - the test reads what each rank saw
        report.update(failure(exc))


def main() -> None:
    scenario, args = sys.argv[1], json.loads(sys.argv[2])
    dist.init_process_group("gloo", timeout=timedelta(seconds=float(args.get("timeout", 60))))
    rank = dist.get_rank()
    repo = args["repo"]
    report: dict = {}
    model = build(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, 2, seed=1)

    if scenario == "save":
        on_s3 = repo.startswith("s3://")
        ups: dict = {}
        sd = state(model, opt)
        report["first"] = cdcp.save(sd, repo=repo, run="shard", metrics={"loss": 1.0})
        if on_s3:
            ups["first"] = uploaded(repo)
        report["unchanged"] = cdcp.save(state(model, opt), repo=repo, run="shard")
        if on_s3:
            ups["unchanged"] = uploaded(repo)
        train(model, opt, 1, seed=2)
        sd = state(model, opt)
        report["third"] = cdcp.save(sd, repo=repo, run="shard")
        if on_s3:
            ups["third"] = uploaded(repo)
            report["uploaded"] = ups
        saved = full(sd)
        train(model, opt, 1, seed=3)
        fut, writer = cdcp.async_save(state(model, opt), repo=repo, run="shard")
        fut.result()
        report["async"] = writer.commit_id
        async_full = full(state(model, opt))
        # 2 -> 2: a fresh model (other seed) loads the third commit, resharded as it is now
        report["loaded"], back = load_into_fresh(report["third"], repo)
        if rank == 0:
            torch.save({"third": saved, "async": async_full, "back": back}, args["out"] + ".pt")
    elif scenario == "killed":
        train(model, opt, 1, seed=5)  # new state: each rank has objects to write
        if rank == 1:
            real = Repository.write_objects

            def die(self, *a, **k):
                real(self, *a, **k)  # its pack is written, then the rank dies before reporting
                os._exit(3)

            Repository.write_objects = die
        try:
            cdcp.save(state(model, opt), repo=repo, run="shard")
            report["saved"] = True
        except Exception as exc:  # noqa: BLE001 - what the survivor sees is the report
            report["error"] = type(exc).__name__
    elif scenario == "load":  # fresh processes (on fresh nodes: empty caches) load a commit 2 -> 2
        report["loaded"], back = load_into_fresh(args["ref"], repo)
        if rank == 0:
            torch.save({"back": back}, args["out"] + ".pt")
    elif scenario == "after_kill":
        report["cid"] = cdcp.save(state(model, opt), repo=repo, run="shard")
    elif scenario == "s3_kill":
        s3_kill(args, rank, model, opt, report)
    elif scenario == "s3_save":
        for seed in args.get("train", []):
            train(model, opt, 1, seed=seed)
        sd = state(model, opt)
        saved = full(sd)
        report["cid"] = cdcp.save(sd, repo=repo, run="shard")
        back = None
        if args.get("load"):
            report["loaded"], back = load_into_fresh(report["cid"], repo)
        if rank == 0:
            torch.save({"saved": saved, "back": back}, args["out"] + ".pt")
    elif scenario == "s3_gated":
        s3_gated(args, rank, model, opt, report)
    report["rank"] = rank
    with open(f"{args['out']}.{rank}.json", "w") as f:
        json.dump(report, f)
    if scenario not in ("killed", "s3_kill", "s3_gated"):
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Everything this rank had to do and report is done, and its process group is destroyed. Skip the
    # interpreter's finalization: gloo's threads, freed there, occasionally abort the process
    # ("terminate called without an active exception", pytorch#65231), which would fail a finished run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
