"""`coral-torch` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ._version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coral-torch",
        description="Deduplicating, delta-encoding, bit-exact checkpoints for PyTorch and Lightning.",
    )
    parser.add_argument("--version", action="version", version=f"coral-torch {__version__}")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
