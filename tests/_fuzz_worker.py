"""Damage a real repository one byte flip or truncation at a time and check every outcome.

``python _fuzz_worker.py WORKDIR TRIALS SEED`` builds a repository (several commits of a model with
deltas, a tag, pointer files), then for each trial copies it, damages one of its files (a pack, the
catalog, a pointer) at a random place, and with a fresh process-level view (no caches):

- loads every commit (by pointer file and by id): each load must return exactly what was saved or
  raise a ``CoralError``; anything else (wrong data, a foreign exception) is a failure;
- runs ``verify``: it must not raise anything but a ``CoralError`` and must report damage whenever
  some load failed.

Prints one JSON line: counts per outcome and the failures (at most 20, with what was damaged).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import traceback
from pathlib import Path

import torch

import coral_torch
from coral_torch import Repository
from coral_torch.errors import CoralError


def build(root: Path) -> list[tuple[str, Path, dict]]:
    """A repository with 4 commits of an evolving model (deltas, dedup, a tag), each with a pointer."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=gen)
    frozen = torch.randn(32, 32, generator=gen)
    out = []
    for epoch in range(4):
        w = w + 1e-3 * torch.randn(64, 128, generator=gen)
        obj = {"state_dict": {"w": w.clone(), "frozen": frozen, "b": torch.randn(128, generator=gen).half(),
                              "steps": torch.tensor(epoch)},
               "epoch": epoch, "name": f"epoch-{epoch}", "lr": 0.1 / (epoch + 1)}
        pointer = root / f"epoch{epoch}.pt"
        cid = coral_torch.save(obj, pointer, tag=f"e{epoch}" if epoch == 1 else None)
        out.append((cid, pointer, obj))
    repo = coral_torch.open_repository(root / ".coral")
    repo.catalog.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    repo.close()
    return out


def same(a, b) -> bool:
    """Bit-exact equality of nested checkpoints (tensors by dtype, shape and raw bytes)."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape:
            return False
        return a.numel() == 0 or bytes(a.contiguous().view(-1).view(torch.uint8).numpy()) == bytes(
            b.contiguous().view(-1).view(torch.uint8).numpy())
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def damage(files: list[Path], rng: random.Random) -> str:
    f = rng.choice(files)
    data = bytearray(f.read_bytes())
    if not data:
        return f"{f.name}: empty, untouched"
    if f.name == "catalog.sqlite" and rng.random() < 0.4:
        # an edit that keeps the JSON valid: a digit in a manifest (epoch, step, shape, lr, ...)
        starts = [i for i in range(len(data)) if data.startswith(b'{"format":', i)]
        if starts:
            start = rng.choice(starts)
            digits = [i for i in range(start, min(len(data), start + 4000)) if 48 <= data[i] <= 57]
            if digits:
                i = rng.choice(digits)
                old = data[i]
                data[i] = 48 + (old - 48 + rng.randrange(1, 10)) % 10
                f.write_bytes(bytes(data))
                return f"{f.name}: manifest digit at {i} {chr(old)} -> {chr(data[i])}"
    if rng.random() < 0.75:
        i = rng.randrange(len(data))
        bit = 1 << rng.randrange(8)
        data[i] ^= bit
        f.write_bytes(bytes(data))
        return f"{f.name}: flip byte {i} of {len(data)} (bit {bit})"
    cut = rng.randrange(len(data))
    f.write_bytes(bytes(data[:cut]))
    return f"{f.name}: truncate to {cut} of {len(data)}"


def trial(base: Path, work: Path, commits, rng: random.Random) -> tuple[str, str]:
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(base, work)
    repo_dir = work / ".coral"
    files = sorted(p for p in (repo_dir / "packs").iterdir()) + [repo_dir / "catalog.sqlite"]
    files += [work / p.name for _, p, _ in commits]
    what = damage(files, rng)
    failed_loads = 0
    for cid, pointer, expected in commits:
        for how in ("pointer", "id"):
            try:
                if how == "pointer":
                    got = coral_torch.load(work / pointer.name)
                else:
                    got = coral_torch.load(cid, repo=repo_dir)
            except CoralError:
                failed_loads += 1
                continue
            except Exception as exc:  # noqa: BLE001 - the point of the test
                return "foreign", f"{what}: load by {how} raised {type(exc).__name__}: {exc}"
            if not same(expected, got):
                return "wrong", f"{what}: load by {how} of {cid[:10]} returned different data"
    try:
        report = Repository(repo_dir, create=False).verify()
        ok = report.ok
    except CoralError:
        ok = False
    except Exception as exc:  # noqa: BLE001
        return "foreign", f"{what}: verify raised {type(exc).__name__}: {exc}"
    finally:
        coral_torch.api.close_repositories()
    pointer_damage = what.split(":")[0].endswith(".pt")
    if failed_loads and ok and not pointer_damage:
        return "verify_ok_on_damage", f"{what}: {failed_loads} load(s) failed but verify said ok"
    if failed_loads:
        return "detected", what
    return ("detected" if not ok else "harmless"), what


def main() -> None:
    workdir, trials, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    base = workdir / "base"
    base.mkdir(parents=True)
    commits = build(base)
    coral_torch.api.close_repositories()
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    failures: list[str] = []
    for _ in range(trials):
        try:
            kind, what = trial(base, workdir / "work", commits, rng)
        except Exception:  # noqa: BLE001 - a crash of the harness itself is a failure too
            kind, what = "foreign", traceback.format_exc(limit=3)
        counts[kind] = counts.get(kind, 0) + 1
        if kind not in ("detected", "harmless") and len(failures) < 40:
            failures.append(f"{kind}: {what}")
    print(json.dumps({"counts": counts, "failures": failures}))


if __name__ == "__main__":
    os.environ.setdefault("CORAL_TORCH_LOG", "error")
    main()
