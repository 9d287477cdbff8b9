"""``coral-torch`` commands that change or check a repository: tag, gc, prune, rm, verify, stats,
push and pull (the inspecting ones, and the parser, are in :mod:`coral_torch.cli`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli_common import CliError, human, open_repo, remote_config
from .format import refnames


def cmd_tag(args: argparse.Namespace) -> int:
    repo = open_repo(args)
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
    repo = open_repo(args)
    stats = repo.gc(dry_run=not args.yes, orphan_grace_s=args.grace)
    verb = "would remove" if not args.yes else "removed"
    if "bucket" in stats:  # a repository on S3
        print(
            f"{verb} {stats['commits_removed']} commit(s) and {stats['objects_removed']} object(s) from "
            f"{stats['bucket']} ({human(stats['bytes_freed'])}); "
            f"kept {stats['kept_young']} younger than the grace period"
        )
        for problem in stats.get("problems", []):
            print(f"not collected: {problem}")
        if not args.yes:
            print("run `coral-torch gc --yes` to delete")
        return 0
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
            f"reclaimed {human(stats['bytes_reclaimed'])}: "
            f"{human(stats['bytes_before'])} -> {human(stats['bytes_after'])}"
        )
    else:
        print(f"about {human(stats['bytes_reclaimable'])} reclaimable; run `coral-torch gc --yes` to delete")
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
    repo = open_repo(args)
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
        print(f"freed {human(total)}")
    else:
        print(
            f"would free about {human(total)} of stored objects; run again with --yes to do it"
            + ("" if args.remove_files else " (--remove-files also releases commits that pointer files hold)")
        )
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from .checkpoint.checkpoint_files import forget_pointer
    from .checkpoint.pointers import read_pointer_file, same_repository

    repo = open_repo(args)
    before = repo.stats()["disk_bytes"]
    for target in args.targets:
        p = Path(target)
        if p.is_file():
            pointer = read_pointer_file(p)
            if pointer is None:
                raise CliError(f"{p} is not a coral-torch pointer file; refusing to delete it")
            if not same_repository(pointer.repo, repo.location):
                raise CliError(f"{p} points into {pointer.repo}, not {repo.location}; pass --repo {pointer.repo}")
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
    print(f"freed {human(max(0, before - repo.stats()['disk_bytes']))}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    repo = open_repo(args)
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
    repo = open_repo(args)
    s = repo.stats()
    if args.json:
        print(json.dumps(s, indent=1))
    else:
        print(
            f"repository   {s['path']}\ncommits      {s['commits']}\nobjects      {s['objects']} "
            f"({s['delta_objects']} deltas)\nlogical      {human(s['logical_bytes'])}\n"
            f"on disk      {human(s['disk_bytes'])}\nratio        {s['ratio']:.3f}"
        )
    if args.plot:
        from .plots import plot_repository

        plot_repository(repo, Path(args.plot), run=args.run)
        print(f"wrote {args.plot}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .storage.s3_store import S3Store

    repo = open_repo(args)
    with S3Store(remote_config(args)) as store:
        s = repo.push(store, progress=None, verify=args.verify)
    print(
        f"pushed {s['commits_uploaded']} commit(s), {s['objects_uploaded']} object(s) "
        f"({human(s['object_bytes'])}; {s['objects_skipped']} already there), {s['refs_updated']} ref(s) "
        f"to {store.url} in {s['seconds']:.1f}s"
    )
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from .repository.remote import require_remote_repository
    from .storage.s3_store import S3Store

    with S3Store(remote_config(args)) as store:  # reach the remote before creating anything locally
        require_remote_repository(store)  # a mistyped or empty prefix: an error, and no local repository
        repo = open_repo(args, create=True)
        s = repo.pull(store, progress=None)
    print(
        f"pulled {s['commits_downloaded']} commit(s), {s['objects_downloaded']} object(s) "
        f"({human(s['bytes_transferred'])}; {s['objects_skipped']} already here), {s['refs']} ref(s) "
        f"from {store.url} in {s['seconds']:.1f}s"
    )
    return 0


# ------------------------------------------------------------------------------------ parser
