"""`coral-torch` command line: inspect, export, import, tag, gc, verify and sync a repository.

Errors are one line on stderr with a non-zero exit code (1: the operation failed, 2: bad usage);
``--debug`` shows the traceback.

Start-up is kept cheap: commands that only read the catalog (``log``, ``show``, ``tag``, ``gc``
dry run, ``stats``) never import torch, Lightning or boto3; the others import what they need.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from . import refnames
from ._version import __version__
from .errors import CoralError, NotARepositoryError, RefNotFoundError
from .inspect import tensor_change, tensor_index, tensors_of

if TYPE_CHECKING:
    from .repository import Repository
    from .storage.s3_store import S3Config

log = logging.getLogger("coral_torch.cli")


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 1."""


# ------------------------------------------------------------------------------------ helpers
def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*[str(c) for c in r]) for r in rows]
    return "\n".join(lines)


def _open_repo(args: argparse.Namespace, *, create: bool = False) -> Repository:
    from .repository.handles import open_repository, repository_path

    try:
        return open_repository(args.repo or None, create=create)
    except NotARepositoryError as exc:
        if create:
            raise
        raise CliError(
            f"{repository_path(args.repo or None)} is not a coral-torch repository (no catalog.sqlite); "
            "point --repo or $CORAL_REPO at one (e.g. --repo ckpts/.coral), "
            "or create one with `coral-torch import FILE.ckpt`"
        ) from exc


def _short_metrics(metrics: dict[str, Any], limit: int = 2) -> str:
    keys = [k for k in metrics if "loss" in k] or list(metrics)
    return " ".join(
        f"{k}={metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}" for k in keys[:limit]
    )


def _remote(args: argparse.Namespace) -> S3Config:
    from .storage.s3_store import S3Config

    url = args.remote
    if not url.startswith("s3://"):
        raise CliError(f"remote must look like s3://bucket[/prefix], not {url!r}")
    bucket, _, prefix = url[5:].partition("/")
    return S3Config(bucket=bucket, prefix=prefix, endpoint_url=args.endpoint_url, region=args.region)


# ------------------------------------------------------------------------------------ commands
def cmd_log(args: argparse.Namespace) -> int:
    repo = _open_repo(args)
    rows = repo.log(args.run)[: args.n] if args.n else repo.log(args.run)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "id": r.id,
                        "run": r.run,
                        "epoch": r.epoch,
                        "step": r.step,
                        "time": r.time,
                        "metrics": r.metrics,
                        "logical_bytes": r.logical_bytes,
                        "stored_bytes": r.new_bytes,
                        "ratio": (r.new_bytes / r.logical_bytes) if r.logical_bytes else 0.0,
                        "refs": r.refs,
                        "parent": r.parent,
                        "message": r.message,
                        "lossy": bool(r.lossy),
                    }
                    for r in rows
                ],
                indent=1,
            )
        )
        return 0
    table = [
        [
            r.short_id + (" LOSSY" if r.lossy else ""),
            r.run,
            "" if r.epoch is None else r.epoch,
            "" if r.step is None else r.step,
            _short_metrics(r.metrics),
            _human(r.logical_bytes),
            _human(r.new_bytes),
            f"{(r.new_bytes / r.logical_bytes) if r.logical_bytes else 0:.3f}",
            ", ".join(dict.fromkeys(refnames.display_name(x) for x in r.refs)),
        ]
        for r in rows
    ]
    print(_table(table, ["commit", "run", "epoch", "step", "metrics", "logical", "stored", "ratio", "refs"]))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    repo = _open_repo(args)
    row = repo.get_commit(args.ref)
    try:
        parent = tensor_index(repo, row.parent) if row.parent else {}
    except RefNotFoundError:  # the parent was garbage-collected
        parent = {}
    hows = {n: how for n, _, how in repo.catalog.commit_objects(row.id)}
    out = []
    for name, h, dtype, shape, _device, _ in row.manifest["tensors"]:
        how = hows.get(name, "dedup")
        if how == "dedup" and parent.get(name, (None,))[0] == h:
            how = "same as parent"
        elif how.startswith("full"):  # "full/skipN": stored whole while its delta kept losing
            how = "new"
        obj = repo.catalog.get_object(h)
        out.append(
            {
                "name": name,
                "dtype": dtype,
                "shape": shape,
                "stored": how,
                "hash": h,
                "stored_bytes": obj.stored_bytes if obj and how in ("new", "delta") else 0,
            }
        )
    if args.json:
        print(
            json.dumps(
                {
                    "id": row.id,
                    "run": row.run,
                    "epoch": row.epoch,
                    "step": row.step,
                    "metrics": row.metrics,
                    "refs": row.refs,
                    "tensors": out,
                },
                indent=1,
            )
        )
        return 0
    print(
        f"commit {row.id}\nrun {row.run}  epoch {row.epoch}  step {row.step}  "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(row.time))}"
    )
    if row.metrics:
        print("metrics " + " ".join(f"{k}={v}" for k, v in row.metrics.items()))
    if row.refs:
        print("refs " + ", ".join(row.refs))
    print(f"logical {_human(row.logical_bytes)}  written {_human(row.new_bytes)}\n")
    print(
        _table(
            [
                [
                    t["name"],
                    t["dtype"],
                    "x".join(map(str, t["shape"])) or "()",
                    t["stored"],
                    _human(t["stored_bytes"]) if t["stored_bytes"] else "-",
                ]
                for t in out
            ],
            ["tensor", "dtype", "shape", "how stored", "bytes"],
        )
    )
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    repo = _open_repo(args)
    a_id, b_id = repo.resolve(args.ref_a), repo.resolve(args.ref_b)
    a_idx, b_idx = tensor_index(repo, a_id), tensor_index(repo, b_id)
    differ = [n for n in a_idx if n in b_idx and a_idx[n][0] != b_idx[n][0]]
    ta = tensors_of(repo, a_id, names=differ)
    tb = tensors_of(repo, b_id, names=differ)
    rows: list[dict[str, Any]] = []
    for name in list(dict.fromkeys(list(a_idx) + list(b_idx))):
        if name not in a_idx:
            rows.append({"tensor": name, "status": "added"})
        elif name not in b_idx:
            rows.append({"tensor": name, "status": "removed"})
        elif a_idx[name][0] == b_idx[name][0]:
            rows.append({"tensor": name, "status": "unchanged", "changed_pct": 0.0, "rel_l2": 0.0})
        else:
            changed, rel = tensor_change(ta[name], tb[name])
            rows.append({"tensor": name, "status": "changed", "changed_pct": 100 * changed, "rel_l2": rel})
    if args.json:
        print(json.dumps({"a": a_id, "b": b_id, "tensors": rows}, indent=1))
        return 0
    print(f"diff {a_id[:10]} -> {b_id[:10]}")
    print(
        _table(
            [
                [
                    r["tensor"],
                    r["status"],
                    f"{r['changed_pct']:.2f}%" if "changed_pct" in r else "-",
                    f"{r['rel_l2']:.3e}" if "rel_l2" in r else "-",
                ]
                for r in rows
            ],
            ["tensor", "status", "changed", "rel. L2"],
        )
    )
    n_changed = sum(r["status"] != "unchanged" for r in rows)
    print(f"\n{n_changed} of {len(rows)} tensors differ")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    repo = _open_repo(args)
    out = Path(args.output)
    suffix = out.suffix.lower()
    if out.is_dir():
        raise CliError(f"{out} is a directory; give the file to write, e.g. {out / 'model.pt'}")
    if suffix not in (".pt", ".pth", ".ckpt", ".safetensors", ".bin"):
        raise CliError(f"output must end in .pt, .pth, .ckpt, .bin or .safetensors, not {out.name!r}")
    parent = out.parent
    if not parent.is_dir():
        raise CliError(f"cannot write {out}: directory {parent} does not exist; create it first (mkdir -p {parent})")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"cannot write {out}: no write permission in directory {parent}")
    cid = repo.resolve(args.ref)
    import torch

    obj = repo.load(cid, map_location="cpu", weights_only=not args.trust)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import save_file

            tensors = _safetensors_dict(obj)
            save_file(tensors, str(tmp), metadata={"coral_commit": cid})
            os.chmod(tmp, 0o666 & ~_umask())  # safetensors writes 0600 (a mkstemp file it renames)
        else:
            torch.save(obj, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"exported {cid[:10]} to {out} ({_human(out.stat().st_size)})")
    return 0


def _umask() -> int:
    """This process's umask (read by setting it and back: the CLI runs one command on one thread)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _safetensors_dict(obj: Any) -> dict[str, Any]:
    import torch

    src = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(src, dict):
        raise CliError("this checkpoint is not a dict of tensors; export it as .pt instead")
    out: dict[str, Any] = {}
    seen: dict[int, str] = {}
    for k, v in src.items():
        if isinstance(v, torch.Tensor):
            t = v.detach().contiguous()
            key = t.untyped_storage().data_ptr() if t.numel() else None
            if key is not None and key in seen:
                t = t.clone()  # safetensors refuses shared memory: write tied tensors twice
            if key is not None:
                seen[key] = k
            out[str(k)] = t
    if not out:
        raise CliError("no tensors to export to safetensors; export it as .pt instead")
    return out


def cmd_import(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    paths = [Path(p) for p in args.files]
    # validate every file before changing anything
    for p in paths:
        if p.is_dir():
            raise CliError(f"{p} is a directory; pass the checkpoint files in it (e.g. {p / '*.ckpt'})")
        if not p.is_file():
            raise CliError(f"cannot read {p}: no such file")
        kind = _torch_file_kind(p)
        if kind is None:
            raise CliError(
                f"{p} is not a torch checkpoint file; import takes files written by torch.save "
                "or Lightning (.pt, .pth, .ckpt)"
            )
        try:
            obj = torch.load(p, map_location="cpu", weights_only=not args.trust, mmap=kind == "zip")
        except Exception as exc:  # noqa: BLE001 - any load failure is the user's file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = (
                " (if you trust it, retry with --trust)"
                if "weights_only" in str(exc).lower() or "Unsupported global" in str(exc)
                else ""
            )
            raise CliError(f"{p} is not a readable torch checkpoint: {first[:200]}{hint}") from exc
        if not _has_tensors(obj):
            raise CliError(f"{p} holds no tensors: not a checkpoint")
        del obj
    repo = _open_repo(args, create=True)
    run = args.run or "import"
    before = sum(p.stat().st_size for p in paths)
    start_disk = repo.stats()["disk_bytes"]
    ids = []
    for p in tqdm(paths, desc="import", unit="file", disable=not sys.stderr.isatty()):
        obj = torch.load(p, map_location="cpu", weights_only=not args.trust)
        stats = repo.commit(obj, run=run, message=f"import {p.name}", keep=True, info={"source": str(p)})
        ids.append(stats.commit_id)
        print(f"{stats.commit_id[:10]}  {p.name}  {_human(p.stat().st_size)} -> {_human(stats.written_bytes)} written")
    after = repo.stats()["disk_bytes"] - start_disk
    print(
        f"imported {len(ids)} file(s): {_human(before)} as files -> {_human(after)} in the repository "
        f"({after / before if before else 0:.3f}x)"
    )
    return 0


def _torch_file_kind(path: Path) -> str | None:
    """``"zip"`` for a torch.save file (the format since torch 1.6; Lightning .ckpt too),
    ``"legacy"`` for the older pickle-based torch.save format, None for anything else."""
    with open(path, "rb") as f:
        head = f.read(2)
    if zipfile.is_zipfile(path):
        return "zip"
    if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle PROTO opcode
        return "legacy"
    return None


def _has_tensors(obj: Any, depth: int = 0) -> bool:
    import torch

    if isinstance(obj, torch.Tensor):
        return True
    if depth > 6:
        return False
    if isinstance(obj, dict):
        return any(_has_tensors(v, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_tensors(v, depth + 1) for v in obj)
    return False


def cmd_tag(args: argparse.Namespace) -> int:
    repo = _open_repo(args)
    if args.delete:
        if not repo.delete_ref(refnames.tag_ref(args.delete, check=False)):
            raise CliError(f"no tag {args.delete!r}")
        print(f"deleted tag {args.delete}")
        return 0
    if args.name is None:
        for name, cid in repo.refs(refnames.TAGS).items():
            print(f"{name[len(refnames.TAGS) :]}  {cid[:10]}")
        return 0
    cid = repo.tag(args.name, args.ref or "latest")
    print(f"tagged {cid[:10]} as {args.name}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    repo = _open_repo(args)
    stats = repo.gc(dry_run=not args.yes, orphan_grace_s=args.grace)
    verb = "would remove" if not args.yes else "removed"
    print(
        f"{verb} {stats['commits_removed']} commit(s), {stats['objects_removed']} object(s), "
        f"{stats['packs_removed']} pack(s) (rewrite {stats['packs_rewritten']}), "
        f"{stats['orphan_files_removed']} orphan file(s)"
    )
    if stats.get("dead_refs"):
        print(
            f"{'dropped' if args.yes else 'would drop'} {len(stats['dead_refs'])} dead ref(s) "
            "(pointer files deleted or replaced, ended resumes)"
        )
    if args.yes:
        print(
            f"reclaimed {_human(stats['bytes_reclaimed'])}: "
            f"{_human(stats['bytes_before'])} -> {_human(stats['bytes_after'])}"
        )
    else:
        print(f"about {_human(stats['bytes_reclaimable'])} reclaimable; run `coral-torch gc --yes` to delete")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from .retention import AnyOf, BestN, EveryNEpochs, EveryNSteps, LatestN, Policy

    parts: list[Policy] = []
    if args.keep_latest is not None:
        parts.append(LatestN(args.keep_latest))
    if args.keep_best is not None:
        if not args.monitor:
            raise CliError("--keep-best needs --monitor METRIC (a metric logged with the commits)")
        parts.append(BestN(args.keep_best, args.monitor, args.mode))
    if args.keep_every_steps is not None:
        parts.append(EveryNSteps(args.keep_every_steps))
    if args.keep_every_epochs is not None:
        parts.append(EveryNEpochs(args.keep_every_epochs))
    if not parts:
        raise CliError(
            "say what to keep: --keep-latest N, --keep-best N --monitor M, --keep-every-steps N "
            "or --keep-every-epochs N (they combine: a commit any of them selects stays)"
        )
    keep = AnyOf(*parts)
    optimizer = LatestN(args.optimizer_latest) if args.optimizer_latest is not None else None
    repo = _open_repo(args)
    runs = [args.run] if args.run else sorted({c.run for c in repo.log()})
    if not runs:
        print("no commits")
        return 0
    total = 0
    for run in runs:
        if not repo.log(run):
            raise CliError(f"no run {run!r} in {repo.path}; `coral-torch log` lists the runs")
        r = repo.retain(run, keep, keep_optimizer=optimizer, release_files=args.remove_files, dry_run=not args.yes)
        total += r.bytes_freed
        verb = "would remove" if r.dry_run else "removed"
        line = f"run {run}: keep {len(r.kept)}, {verb} {len(r.removed)} commit(s)"
        if r.stripped:
            line += f", {'would strip' if r.dry_run else 'stripped'} optimizer state of {len(r.stripped)}"
        if r.files_removed:
            line += f", {'would delete' if r.dry_run else 'deleted'} {len(r.files_removed)} pointer file(s)"
        print(line)
        for cid, names in r.held.items():
            print(f"  {cid[:10]} stays: held by {', '.join(refnames.display_name(n) for n in names)}")
    if args.yes:
        print(f"freed {_human(total)}")
    else:
        print(
            f"would free about {_human(total)} of stored objects; run again with --yes to do it"
            + ("" if args.remove_files else " (--remove-files also releases commits that pointer files hold)")
        )
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from .checkpoint_files import forget_pointer
    from .pointers import read_pointer_file

    repo = _open_repo(args)
    before = repo.stats()["disk_bytes"]
    for target in args.targets:
        p = Path(target)
        if p.is_file():
            pointer = read_pointer_file(p)
            if pointer is None:
                raise CliError(f"{p} is not a coral-torch pointer file; refusing to delete it")
            if not pointer.repo.exists() or not os.path.samefile(pointer.repo, repo.path):
                raise CliError(f"{p} points into {pointer.repo}, not {repo.path}; pass --repo {pointer.repo}")
            forget_pointer(p, repo)  # the file first: a crash leaves a dead ref, which gc drops
            print(f"removed {p} (commit {pointer.commit[:10]})")
            continue
        refs = repo.refs()
        tag = refnames.tag_ref(target, check=False)
        name = target if target in refs else tag if tag in refs else None
        if name is None:
            raise CliError(
                f"{target!r} is neither a pointer file nor a ref in {repo.path}; "
                "`coral-torch log` shows each commit's refs"
            )
        repo.delete_ref(name)
        print(f"removed ref {name}")
    print(f"freed {_human(max(0, before - repo.stats()['disk_bytes']))}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    repo = _open_repo(args)
    report = repo.verify()
    print(f"checked {report.objects_checked} object(s), {report.commits_checked} commit(s)")
    for p in report.missing_packs:
        print(f"missing pack: {p}")
    for p, why in report.unreadable_packs.items():
        print(f"unreadable pack {p}: {why}")
    for h, why in report.damaged_objects.items():
        print(f"damaged object {h[:12]}: {why}")
    for cid, names in report.damaged_commits.items():
        print(f"damaged checkpoint {cid[:10]}: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}")
    for cid, why in report.damaged_manifests.items():
        print(f"damaged checkpoint {cid[:10]} (catalog): {why}")
    for name, cid in report.dangling_refs.items():
        print(f"ref {name} names commit {cid[:10]}, which does not exist")
    if report.orphan_files:
        print(
            f"{len(report.orphan_files)} orphan file(s) "
            "(left by interrupted saves; `coral-torch gc --yes` removes them)"
        )
    if not report.ok:
        print(report.RECOVERY)
    print("ok" if report.ok else "DAMAGED")
    return 0 if report.ok else 1


def cmd_stats(args: argparse.Namespace) -> int:
    repo = _open_repo(args)
    s = repo.stats()
    if args.json:
        print(json.dumps(s, indent=1))
    else:
        print(
            f"repository   {s['path']}\ncommits      {s['commits']}\nobjects      {s['objects']} "
            f"({s['delta_objects']} deltas)\nlogical      {_human(s['logical_bytes'])}\n"
            f"on disk      {_human(s['disk_bytes'])}\nratio        {s['ratio']:.3f}"
        )
    if args.plot:
        from .plots import plot_repository

        plot_repository(repo, Path(args.plot), run=args.run)
        print(f"wrote {args.plot}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .storage.s3_store import S3Store

    repo = _open_repo(args)
    with S3Store(_remote(args)) as store:
        s = repo.push(store, progress=None, verify=args.verify)
    print(
        f"pushed {s['commits_uploaded']} commit(s), {s['objects_uploaded']} object(s) "
        f"({_human(s['object_bytes'])}; {s['objects_skipped']} already there), {s['refs_updated']} ref(s) "
        f"to {store.url} in {s['seconds']:.1f}s"
    )
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from .repository.remote import require_remote_repository
    from .storage.s3_store import S3Store

    with S3Store(_remote(args)) as store:  # reach the remote before creating anything locally
        require_remote_repository(store)  # a mistyped or empty prefix: an error, and no local repository
        repo = _open_repo(args, create=True)
        s = repo.pull(store, progress=None)
    print(
        f"pulled {s['commits_downloaded']} commit(s), {s['objects_downloaded']} object(s) "
        f"({_human(s['bytes_transferred'])}; {s['objects_skipped']} already here), {s['refs']} ref(s) "
        f"from {store.url} in {s['seconds']:.1f}s"
    )
    return 0


# ------------------------------------------------------------------------------------ parser
class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"coral-torch: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``coral-torch`` argument parser; each subcommand sets ``func`` to its handler."""
    parser = _Parser(
        prog="coral-torch",
        description="Deduplicating, delta-encoding, bit-exact checkpoints for PyTorch and Lightning.",
    )
    parser.add_argument("--version", action="version", version=f"coral-torch {__version__}")
    parser.add_argument("--repo", help="repository directory (default: $CORAL_REPO or ./.coral)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("log", help="list commits, newest first")
    p.add_argument("--run", help="only this run")
    p.add_argument("-n", type=int, help="at most N commits")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_log)

    p = sub.add_parser("show", help="the tensors of a commit and how each is stored")
    p.add_argument("ref", help="hash prefix, tag, run, latest or best")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("diff", help="per-tensor change between two commits")
    p.add_argument("ref_a")
    p.add_argument("ref_b")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("export", help="write a commit as a plain .pt/.ckpt or .safetensors file")
    p.add_argument("ref")
    p.add_argument("output", help="out.pt, out.ckpt or out.safetensors")
    p.add_argument("--trust", action="store_true", help="allow pickled values (only for checkpoints you trust)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="store existing torch.save / Lightning .ckpt files as commits")
    p.add_argument("files", nargs="+")
    p.add_argument("--run", help="run name for the commits (default: import)")
    p.add_argument("--trust", action="store_true", help="allow pickled values (only for files you trust)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("tag", help="list, add or delete tags")
    p.add_argument("name", nargs="?")
    p.add_argument("ref", nargs="?", help="commit to tag (default: latest)")
    p.add_argument("--delete", metavar="NAME")
    p.set_defaults(func=cmd_tag)

    p = sub.add_parser("gc", help="remove commits no ref keeps and reclaim disk (dry run unless --yes)")
    p.add_argument("--yes", action="store_true", help="really delete")
    p.add_argument(
        "--grace",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="keep unknown pack files younger than this (written, not yet published; default 3600)",
    )
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("prune", help="apply a retention policy to runs (dry run unless --yes)")
    p.add_argument("--run", help="only this run (default: every run)")
    p.add_argument("--keep-latest", type=int, metavar="N", help="keep the N newest commits")
    p.add_argument("--keep-best", type=int, metavar="N", help="keep the N best commits by --monitor")
    p.add_argument("--monitor", metavar="METRIC", help="metric for --keep-best (as logged, e.g. val_loss)")
    p.add_argument("--mode", choices=("min", "max"), default="min", help="lower (min) or higher (max) is better")
    p.add_argument("--keep-every-steps", type=int, metavar="N", help="keep one commit per N training steps")
    p.add_argument("--keep-every-epochs", type=int, metavar="N", help="keep one commit per N epochs")
    p.add_argument(
        "--optimizer-latest", type=int, metavar="N", help="only the N newest commits keep per-parameter optimizer state"
    )
    p.add_argument(
        "--remove-files", action="store_true", help="also release commits that pointer files hold, deleting those files"
    )
    p.add_argument("--yes", action="store_true", help="really do it")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("rm", help="remove pointer files or refs; commits nothing else keeps go with them")
    p.add_argument("targets", nargs="+", metavar="FILE_OR_REF", help="a pointer file, a ref name or a tag")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("verify", help="re-hash every object; exit 1 if anything is damaged")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("stats", help="repository size and savings")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", metavar="OUT.png", help="plot bytes per commit and per-layer change (needs matplotlib)")
    p.add_argument("--run", help="run for the per-layer heatmap (default: the latest commit's run)")
    p.set_defaults(func=cmd_stats)

    for name, fn, helptext in (
        ("push", cmd_push, "send commits, refs and objects to S3"),
        ("pull", cmd_pull, "fetch commits, refs and objects from S3"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("remote", help="s3://bucket[/prefix]")
        p.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, ...)")
        p.add_argument("--region")
        if name == "push":
            p.add_argument(
                "--verify",
                action="store_true",
                help="also check every object of every pushed commit on the remote; resend damaged ones",
            )
        p.set_defaults(func=fn)
    return parser


def _error_line(exc: BaseException) -> str:
    """One line for an error: our own errors say what to do; anything else gets its type and a
    pointer to ``--debug``."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, (CliError, CoralError)):
        return first or type(exc).__name__
    return (
        f"{type(exc).__name__}: {first} (run with --debug for the traceback)"
        if first
        else f"{type(exc).__name__} (run with --debug for the traceback)"
    )


STDOUT_CLOSED = 141  # 128 + SIGPIPE: what a shell reports for git, cat, ... whose reader went away


def _stdout_closed() -> int:
    """The reader of stdout went away (``coral-torch log | head``): stop quietly, like git. Exit
    141, as a tool killed by SIGPIPE does: the output was cut short, so ``set -o pipefail`` scripts
    see what they would see with any other Unix tool, and it is not mistaken for a failure (1)."""
    try:  # what is still buffered must not fail again when Python flushes stdout at exit
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # replaced by a test or an embedding program
        return STDOUT_CLOSED
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
    return STDOUT_CLOSED


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``coral-torch`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit code: 0
    ok, 1 failed (one ``coral-torch: error: ...`` line on stderr; ``--debug`` raises instead), 2 bad
    usage (argparse exits), 130 interrupted, 141 stdout closed early (``| head``: no error message)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not as a traceback when Python exits
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except KeyboardInterrupt:
        print("coral-torch: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line unless --debug
        if args.debug:
            raise
        print(f"coral-torch: error: {_error_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
