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

from ._version import __version__
from .cli_common import CliError, format_table, human, open_repo, short_metrics
from .cli_maintenance import (
    cmd_gc,
    cmd_prune,
    cmd_pull,
    cmd_push,
    cmd_rm,
    cmd_stats,
    cmd_tag,
    cmd_verify,
)
from .errors import CoralError, RefNotFoundError
from .format import refnames
from .inspect import tensor_change, tensor_index, tensors_of

if TYPE_CHECKING:
    pass

log = logging.getLogger("coral_torch.cli")


def cmd_log(args: argparse.Namespace) -> int:
    repo = open_repo(args)
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
    rows_out = [
        [
            r.short_id + (" LOSSY" if r.lossy else ""),
            r.run,
            "" if r.epoch is None else r.epoch,
            "" if r.step is None else r.step,
            short_metrics(r.metrics),
            human(r.logical_bytes),
            human(r.new_bytes),
            f"{(r.new_bytes / r.logical_bytes) if r.logical_bytes else 0:.3f}",
            ", ".join(dict.fromkeys(refnames.display_name(x) for x in r.refs)),
        ]
        for r in rows
    ]
    print(format_table(rows_out, ["commit", "run", "epoch", "step", "metrics", "logical", "stored", "ratio", "refs"]))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    repo = open_repo(args)
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
    print(f"logical {human(row.logical_bytes)}  written {human(row.new_bytes)}\n")
    print(
        format_table(
            [
                [
                    t["name"],
                    t["dtype"],
                    "x".join(map(str, t["shape"])) or "()",
                    t["stored"],
                    human(t["stored_bytes"]) if t["stored_bytes"] else "-",
                ]
                for t in out
            ],
            ["tensor", "dtype", "shape", "how stored", "bytes"],
        )
    )
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    repo = open_repo(args)
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
        format_table(
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
    repo = open_repo(args)
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
    print(f"exported {cid[:10]} to {out} ({human(out.stat().st_size)})")
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
    repo = open_repo(args, create=True)
    run = args.run or "import"
    before = sum(p.stat().st_size for p in paths)
    start_disk = repo.stats()["disk_bytes"]
    ids = []
    for p in tqdm(paths, desc="import", unit="file", disable=not sys.stderr.isatty()):
        obj = torch.load(p, map_location="cpu", weights_only=not args.trust)
        stats = repo.commit(obj, run=run, message=f"import {p.name}", keep=True, info={"source": str(p)})
        ids.append(stats.commit_id)
        print(f"{stats.commit_id[:10]}  {p.name}  {human(p.stat().st_size)} -> {human(stats.written_bytes)} written")
    after = repo.stats()["disk_bytes"] - start_disk
    print(
        f"imported {len(ids)} file(s): {human(before)} as files -> {human(after)} in the repository "
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
