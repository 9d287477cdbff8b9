"""What every ``coral-torch`` command shares: the one-line user error, number and table
formatting, opening the repository ``--repo`` names, and the S3 remote an argument names."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from .errors import NotARepositoryError

if TYPE_CHECKING:
    from .repository import Repository
    from .storage.s3_store import S3Config


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 1."""


# ------------------------------------------------------------------------------------ helpers
def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*[str(c) for c in r]) for r in rows]
    return "\n".join(lines)


def open_repo(args: argparse.Namespace, *, create: bool = False) -> Repository:
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


def short_metrics(metrics: dict[str, Any], limit: int = 2) -> str:
    keys = [k for k in metrics if "loss" in k] or list(metrics)
    return " ".join(
        f"{k}={metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}" for k in keys[:limit]
    )


def remote_config(args: argparse.Namespace) -> S3Config:
    from .storage.s3_store import S3Config

    url = args.remote
    if not url.startswith("s3://"):
        raise CliError(f"remote must look like s3://bucket[/prefix], not {url!r}")
    bucket, _, prefix = url[5:].partition("/")
    return S3Config(bucket=bucket, prefix=prefix, endpoint_url=args.endpoint_url, region=args.region)


# ------------------------------------------------------------------------------------ commands
