"""Damage a real repository one byte flip, truncation or manifest edit at a time and check every outcome.

``python _fuzz_worker.py WORKDIR TRIALS SEED`` builds a repository (several commits of a model with
deltas, a tag, pointer files), then for each trial copies it, damages one of its files at a random
place, and with a fresh process-level view (no caches):

- loads every commit (by pointer file and by id): each load must return exactly what was saved or
  raise a ``CoralError``; anything else (wrong data, a foreign exception) is a failure;
- runs ``verify``: it must not raise anything but a ``CoralError`` and must report damage whenever
  some load failed.

The damage is stratified over :data:`KINDS` (what is damaged: a pack, the catalog, a pointer file;
how: a bit flip, a truncation, a digit changed in a commit manifest, which keeps its JSON valid):
trial ``i`` makes damage of kind ``CYCLE[i % len(CYCLE)]``, so any ``TRIALS >= len(KINDS)`` covers
every kind (the first ``len(KINDS)`` entries of the cycle are the kinds, once each); the file of that
class, the place and the bit are drawn from the seeded generator.

Prints one JSON line: counts per outcome, counts per kind and outcome, and the failures (at most 40,
with what was damaged).
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


def build(root: Path) -> tuple[list[tuple[str, Path, dict]], list[str]]:
    """A repository with 4 commits of an evolving model (deltas, dedup, a tag), each with a pointer;
    and its pack names in the order the commits wrote them (their names hold a time and a random part,
    so sorting them would not pick the same pack for the same draw from one run to the next)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=gen)
    frozen = torch.randn(32, 32, generator=gen)
    out = []
    packs: list[str] = []
    for epoch in range(4):
        w = w + 1e-3 * torch.randn(64, 128, generator=gen)
        obj = {"state_dict": {"w": w.clone(), "frozen": frozen, "b": torch.randn(128, generator=gen).half(),
                              "steps": torch.tensor(epoch)},
               "epoch": epoch, "name": f"epoch-{epoch}", "lr": 0.1 / (epoch + 1)}
        pointer = root / f"epoch{epoch}.pt"
        cid = coral_torch.save(obj, pointer, tag=f"e{epoch}" if epoch == 1 else None)
        out.append((cid, pointer, obj))
        packs += sorted(p.name for p in (root / ".coral" / "packs").iterdir() if p.name not in packs)
    repo = coral_torch.open_repository(root / ".coral")
    repo.catalog.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    repo.close()
    assert sorted(packs) == sorted(p.name for p in (root / ".coral" / "packs").iterdir()), packs
    return out, packs


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


# (file class, how); the cycle weights pack bit flips (the most varied structure) and pointer flips
KINDS = ("pack-flip", "catalog-manifest-digit", "pointer-flip", "pack-truncate", "catalog-flip",
         "pointer-truncate", "catalog-truncate")
CYCLE = KINDS + ("pack-flip", "pointer-flip", "pack-flip")


def damage(kind: str, files: dict[str, list[Path]], rng: random.Random) -> str:
    """Damage one file of the class ``kind`` names, the way it names; returns what was done."""
    where, how = kind.split("-", 1)
    f = rng.choice(files[where])
    data = bytearray(f.read_bytes())
    if not data:
        raise RuntimeError(f"{f.name} is empty: nothing to damage")
    if how == "manifest-digit":
        # an edit that keeps the JSON valid: a digit in a manifest (epoch, step, shape, lr, ...)
        starts = [i for i in range(len(data)) if data.startswith(b'{"format":', i)]
        if not starts:
            raise RuntimeError(f"{f.name}: no commit manifest found to edit")
        start = rng.choice(starts)
        digits = [i for i in range(start, min(len(data), start + 4000)) if 48 <= data[i] <= 57]
        i = rng.choice(digits)
        old = data[i]
        data[i] = 48 + (old - 48 + rng.randrange(1, 10)) % 10
        f.write_bytes(bytes(data))
        return f"{f.name}: manifest digit at {i} {chr(old)} -> {chr(data[i])}"
    if how == "flip":
        i = rng.randrange(len(data))
        bit = 1 << rng.randrange(8)
        data[i] ^= bit
        f.write_bytes(bytes(data))
        return f"{f.name}: flip byte {i} of {len(data)} (bit {bit})"
    assert how == "truncate", kind
    cut = rng.randrange(len(data))
    f.write_bytes(bytes(data[:cut]))
    return f"{f.name}: truncate to {cut} of {len(data)}"


def trial(base: Path, work: Path, commits, packs: list[str], kind: str, rng: random.Random) -> tuple[str, str]:
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(base, work)
    repo_dir = work / ".coral"
    files = {"pack": [repo_dir / "packs" / name for name in packs], "catalog": [repo_dir / "catalog.sqlite"],
             "pointer": [work / p.name for _, p, _ in commits]}
    what = f"{kind} {damage(kind, files, rng)}"
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
    pointer_damage = kind.startswith("pointer-")
    if failed_loads and ok and not pointer_damage:
        return "verify_ok_on_damage", f"{what}: {failed_loads} load(s) failed but verify said ok"
    if failed_loads:
        return "detected", what
    return ("detected" if not ok else "harmless"), what


def main() -> None:
    workdir, trials, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    if trials < len(KINDS):
        raise SystemExit(f"{trials} trials cannot cover the {len(KINDS)} kinds of damage; use at least {len(KINDS)}")
    base = workdir / "base"
    base.mkdir(parents=True)
    commits, packs = build(base)
    coral_torch.api.close_repositories()
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    by_kind: dict[str, dict[str, int]] = {k: {} for k in KINDS}
    failures: list[str] = []
    for n in range(trials):
        kind = CYCLE[n % len(CYCLE)]
        try:
            outcome, what = trial(base, workdir / "work", commits, packs, kind, rng)
        except Exception:  # noqa: BLE001 - a crash of the harness itself is a failure too
            outcome, what = "foreign", f"{kind}: " + traceback.format_exc(limit=3)
        counts[outcome] = counts.get(outcome, 0) + 1
        by_kind[kind][outcome] = by_kind[kind].get(outcome, 0) + 1
        if outcome not in ("detected", "harmless") and len(failures) < 40:
            failures.append(f"{outcome}: {what}")
    print(json.dumps({"counts": counts, "kinds": by_kind, "failures": failures}))


if __name__ == "__main__":
    os.environ.setdefault("CORAL_TORCH_LOG", "error")
    main()
