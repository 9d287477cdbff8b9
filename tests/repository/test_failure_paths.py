"""Failure paths on real file systems: a full disk at every write step, read-only repositories
(a read-only mount, an unprivileged user), and random damage to every file of a repository.

Mounting needs root; those tests skip with the reason where it is not permitted.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

import coral_torch
from coral_torch import Repository
from coral_torch.errors import CoralError, DiskFullError, ReadOnlyRepositoryError

HERE = Path(__file__).resolve().parents[1]  # tests/: the workers and shared helpers
sys.path.insert(0, str(HERE))

from _fuzz_worker import KINDS as DAMAGE_KINDS  # noqa: E402


def _mount(args: list[str]) -> None:
    res = subprocess.run(["mount", *args], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"mounting is not permitted here: {res.stderr.strip()}")


@pytest.fixture
def small_tmpfs():
    """A 4 MiB tmpfs of our own (unmounted afterwards)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = Path(f"/tmp/coral-enospc-{uuid.uuid4().hex[:8]}")
    mnt.mkdir()
    _mount(["-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)])
    try:
        yield mnt
    finally:
        coral_torch.api.close_repositories()
        subprocess.run(["umount", str(mnt)], check=False)
        shutil.rmtree(mnt, ignore_errors=True)


def _checkpoint(seed: int, n: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, generator=g), "step": seed}


def _fill(mnt: Path, leave: int) -> Path:
    filler = mnt / "filler"
    filler.unlink(missing_ok=True)
    free = shutil.disk_usage(mnt).free
    with open(filler, "wb") as fh:
        fh.truncate(0)
        fh.write(b"\0" * max(0, free - leave))
    return filler


def _assert_clean(repo_dir: Path) -> None:
    r = Repository(repo_dir, create=False)
    try:
        names = {p.name for p in (repo_dir / "packs").iterdir()}
        assert not [n for n in names if n.startswith(".tmp")], names
        assert names == set(r.catalog.packs()), "a pack no commit records was left behind"
        assert r.verify().ok
    finally:
        r.close()


@pytest.mark.slow
def test_full_disk_at_every_write_step_is_named_and_leaves_the_repository_usable(small_tmpfs):
    mnt = small_tmpfs
    first = _checkpoint(0, 50_000)  # ~200 KB: room for it, then for the sweep
    path = mnt / "ck" / "last.pt"
    coral_torch.save(first, mnt / "ck" / "first.pt")
    repo_dir = mnt / "ck" / ".coral"
    big = _checkpoint(1, 120_000)  # ~480 KB raw, ~440 KB stored
    outcomes = {"saved": 0, "disk_full": 0}
    other = subprocess.Popen([sys.executable, "-c", _OTHER_PROCESS], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        _sweep(mnt, path, repo_dir, first, big, outcomes, other)
    finally:
        try:
            other.stdin.close()
        except BrokenPipeError:
            pass
        try:
            other.wait(timeout=60)
        except subprocess.TimeoutExpired:
            other.kill()
            other.wait()
    assert other.returncode == 0, other.stderr.read()[-2000:]
    assert outcomes["disk_full"] >= 3 and outcomes["saved"] >= 1, outcomes
    # with space back, saving works again in this very process
    coral_torch.save(_checkpoint(2, 1000), path)
    _assert_clean(repo_dir)


# one other process for the whole sweep (started once: a Python + torch start-up per step is seconds):
# for each repository path it reads, it takes the lock (opening the repository anew) and runs gc
_OTHER_PROCESS = r"""
import sys, coral_torch
for line in sys.stdin:
    r = coral_torch.Repository(line.strip(), create=False, lock_timeout=5)
    try:
        r.gc()
    finally:
        r.close()
    print("OK", flush=True)
"""


def _sweep(mnt: Path, path: Path, repo_dir: Path, first: dict, big: dict, outcomes: dict,
           other: subprocess.Popen) -> None:
    # free space from nothing to more than the save needs: the failure moves through the pack
    # write, its fsync and rename, the catalog transaction and the pointer file
    for leave in list(range(0, 600_000, 40_000)) + [4096, 16384, 65536]:
        filler = _fill(mnt, leave)
        try:
            coral_torch.save(big, path)
            outcomes["saved"] += 1
        except DiskFullError as exc:
            outcomes["disk_full"] += 1
            assert isinstance(exc, OSError) and isinstance(exc, CoralError)
            msg = str(exc)
            assert "\n" not in msg and ("full" in msg or "space" in msg), msg
        except CoralError as exc:  # anything else must still be named...
            pytest.fail(f"leave={leave}: {type(exc).__name__}: {exc}")
        finally:
            filler.unlink()
        # the repository is not wedged: the lock is free in this process and in another one
        _assert_clean(repo_dir)
        assert torch.equal(coral_torch.load(mnt / "ck" / "first.pt")["w"], first["w"])
        if path.exists():
            assert torch.equal(coral_torch.load(path)["w"], big["w"])
        try:
            other.stdin.write(f"{repo_dir}\n")
            other.stdin.flush()
            answer = other.stdout.readline().strip()
        except BrokenPipeError:
            answer = ""
        assert answer == "OK", (leave, answer, other.poll() is not None and other.stderr.read()[-2000:])


@pytest.fixture
def world_readable_dir():
    """A directory outside root's private pytest tree, so an unprivileged user can read it."""
    d = Path(f"/tmp/coral-ro-{uuid.uuid4().hex[:8]}")
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        coral_torch.api.close_repositories()
        shutil.rmtree(d, ignore_errors=True)


def _make_repo(root: Path, *, leave_wal: bool) -> tuple[Path, list[str], dict]:
    """A repository with two commits; with ``leave_wal`` the files are copied while it is open, so
    the copy has a non-empty WAL (committed data not yet in catalog.sqlite), as after a crash."""
    src = root / "src"
    objs = [_checkpoint(10, 5000), _checkpoint(11, 5000)]
    ids = [coral_torch.save(o, src / f"e{i}.pt") for i, o in enumerate(objs)]
    dst = root / "repo"
    if leave_wal:
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("lock", "*-shm"))
        assert (dst / ".coral" / "catalog.sqlite-wal").stat().st_size > 0
    else:
        coral_torch.api.close_repositories()
        shutil.copytree(src, dst)
    for p in [dst, *dst.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return dst, ids, {"e0": objs[0], "e1": objs[1]}


_READER = r"""
import json, sys, io, contextlib
import coral_torch
from coral_torch import Repository
from coral_torch.errors import ReadOnlyRepositoryError
from coral_torch.cli import main
root, ids = sys.argv[1], json.loads(sys.argv[2])
out = {}
out["loads"] = [float(coral_torch.load(f"{root}/e{i}.pt")["w"].sum()) for i in range(2)]
r = Repository(f"{root}/.coral", create=False)
out["log"] = [c.id for c in r.log()]
out["verify"] = r.verify().ok
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    out["cli_log"] = main(["--repo", f"{root}/.coral", "log"])
    out["cli_verify"] = main(["--repo", f"{root}/.coral", "verify"])
try:
    coral_torch.save({"x": 1}, f"{root}/new.pt")
    out["save"] = "saved?!"
except ReadOnlyRepositoryError as exc:
    out["save"] = "refused: " + str(exc)
try:
    r.gc()
    out["gc"] = "ran?!"
except ReadOnlyRepositoryError as exc:
    out["gc"] = "refused"
print(json.dumps(out))
"""


def _read_as(root: Path, ids: list[str], unprivileged: bool) -> dict:
    """Run the reader; ``unprivileged``: in a user namespace, where root has no capability over
    files and so meets their permission bits like any other user."""
    prefix = ["unshare", "--user"] if unprivileged else []
    res = subprocess.run([*prefix, sys.executable, "-c", _READER, str(root), json.dumps(ids)], capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, HOME="/tmp"), cwd="/tmp")
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("leave_wal", [False, True], ids=["clean", "leftover-wal"])
def test_read_only_mount_reads_and_refuses_writes(world_readable_dir, leave_wal):
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    root, ids, objs = _make_repo(world_readable_dir, leave_wal=leave_wal)
    mnt = world_readable_dir / "ro"
    mnt.mkdir()
    _mount(["--bind", str(root), str(mnt)])
    try:
        _mount(["-o", "remount,bind,ro", str(mnt)])
        out = _read_as(mnt, ids, False)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
    assert out["loads"] == [float(objs["e0"]["w"].sum()), float(objs["e1"]["w"].sum())]
    assert set(out["log"]) == set(ids) and out["verify"] and out["cli_log"] == 0 and out["cli_verify"] == 0
    assert out["save"].startswith("refused") and "read-only" in out["save"]
    assert out["gc"] == "refused"


@pytest.mark.slow
@pytest.mark.parametrize("leave_wal", [False, True], ids=["clean", "leftover-wal"])
def test_unprivileged_user_reads_a_repository_it_cannot_write(world_readable_dir, leave_wal):
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(["unshare", "--user", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"user namespaces are not permitted here: {probe.stderr.strip()}")
    root, ids, objs = _make_repo(world_readable_dir, leave_wal=leave_wal)
    # owned by someone else, no write bits: the reader may read, not write
    for p in [root, *root.rglob("*")]:
        os.chown(p, 65534, 65534)
        os.chmod(p, 0o555 if p.is_dir() else 0o444)
    out = _read_as(root, ids, True)
    assert out["loads"] == [float(objs["e0"]["w"].sum()), float(objs["e1"]["w"].sum())]
    assert set(out["log"]) == set(ids) and out["verify"] and out["cli_log"] == 0 and out["cli_verify"] == 0
    assert out["save"].startswith("refused")
    assert out["gc"] == "refused"
    assert not (root / "new.pt").exists()


def _fuzz_trials() -> int:
    """CORAL_FUZZ_TRIALS (default 120; 400 or more for a long run): at least one trial per kind of damage."""
    raw = os.environ.get("CORAL_FUZZ_TRIALS", "120")
    try:
        n = int(raw)
    except ValueError:
        pytest.fail(f"CORAL_FUZZ_TRIALS must be a whole number, not {raw!r}", pytrace=False)
    if n < len(DAMAGE_KINDS):
        pytest.fail(f"CORAL_FUZZ_TRIALS={n}: at least {len(DAMAGE_KINDS)}, one per kind of damage", pytrace=False)
    return n


@pytest.mark.slow
def test_random_damage_to_every_file_is_detected_or_harmless(tmp_path):
    """Byte flips, truncations and manifest edits of packs, catalog and pointers, stratified over the
    kinds of damage (tests/_fuzz_worker.py; CORAL_FUZZ_TRIALS of them, 120 by default): every load is
    bit-exact or a CoralError, and verify fails whenever a load fails."""
    trials = _fuzz_trials()
    res = subprocess.run([sys.executable, str(HERE / "_fuzz_worker.py"), str(tmp_path / "fz"), str(trials), "7"],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    counts = report["counts"]
    print("fuzz outcomes:", counts, "by kind:", report["kinds"])
    assert not report["failures"], "\n".join(report["failures"])
    assert sum(counts.values()) == trials
    assert counts.get("detected", 0) >= trials // 2, counts
    # every kind of damage was made (the worker's stratification: a smaller count drops no kind)
    assert set(report["kinds"]) == set(DAMAGE_KINDS) and all(sum(o.values()) for o in report["kinds"].values())


# ------------------------------------------------------------------------------------------------------
# Damage that loads do not meet but gc, push or a save do: verify must report it, and whatever meets it
# must raise a CoralError. Each case is one byte (or one row) that a random-flip probe found passing verify
# or escaping as a raw sqlite3/h5py/UnicodeDecodeError; the place is found by content, so that pack and
# catalog layouts may change.


@pytest.fixture(scope="module")
def damage_base(tmp_path_factory):
    """Two commits, one pack each (the second stores ``w`` as a delta), everything in catalog.sqlite."""
    root = tmp_path_factory.mktemp("damage") / "repo"
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 64, generator=g)
    objs, ids = [], []
    r = Repository(root)
    try:
        for i in range(2):
            w = w + 1e-3 * torch.randn(32, 64, generator=g)
            objs.append({"w": w.clone(), "b": torch.randn(64, generator=g), "step": torch.tensor(i)})
            ids.append(r.commit(objs[-1], tags=[f"t{i}"]).commit_id)
        r.catalog.checkpoint()
        assert sorted(o.kind for o in r.catalog.all_objects()) == ["delta"] + ["full"] * 5
    finally:
        r.close()
    return root, ids, objs


def _copy_of(damage_base, tmp_path: Path) -> Path:
    dst = tmp_path / "repo"
    shutil.copytree(damage_base[0], dst)
    return dst


def _edit(path: Path, pattern: bytes, at: int, new) -> None:
    """Replace byte ``at`` of (or after) the one occurrence of ``pattern`` in ``path`` by ``new(old byte)``."""
    data = bytearray(path.read_bytes())
    assert data.count(pattern) == 1, (path.name, pattern, data.count(pattern))
    i = data.index(pattern) + at
    old = data[i]
    data[i] = new(old)
    assert data[i] != old
    path.write_bytes(bytes(data))


def _other_hex(c: int) -> int:
    return ord("1") if c == ord("0") else ord("0")


def _object(repo_dir: Path, kind: str, shape: tuple):
    r = Repository(repo_dir, create=False)
    try:
        return next(o for o in r.catalog.all_objects() if o.kind == kind and tuple(o.shape) == shape)
    finally:
        r.close()


def _loads_intact(repo_dir: Path, ids: list[str], objs: list[dict]) -> None:
    """Loads read payloads where the catalog says they are (pread), not through HDF5: unaffected."""
    r = Repository(repo_dir, create=False)
    try:
        for cid, obj in zip(ids, objs):
            got = r.load(cid)
            assert all(torch.equal(got[k], obj[k]) for k in obj)
    finally:
        r.close()


def _verify(repo_dir: Path):
    r = Repository(repo_dir, create=False)
    try:
        return r.verify()
    finally:
        r.close()


# (object: kind and shape, or None for the pack of the first commit; the bytes to find; where in them;
# the new byte (a function of the old one); does HDF5Store.read_prepared (gc's and push's read) fail?)
_PACK_DAMAGE = {
    # the dataset's JSON attribute, which gc copies and push parses and decodes the payload against
    "attribute-json-syntax": ("full", (32, 64), lambda o: f'"hash":"{o.hash}"'.encode(), 6, lambda c: c ^ 1, True),
    "attribute-shape-digit": ("full", (32, 64), lambda o: b'"shape":[32,64]', 13, lambda c: c ^ 1, False),
    "attribute-hash": ("full", (32, 64), lambda o: f'"hash":"{o.hash}"'.encode(), 8, _other_hex, False),
    "attribute-payload-checksum": ("full", (64,), lambda o: f'"hash":"{o.hash}","nbytes":256,"encoding":"czp1",'
                                   '"payload_xxh3":"'.encode(), None, _other_hex, True),  # None: the byte after
    "delta-type": ("delta", (32, 64), lambda o: b'"delta_type":"xor"', 16, lambda c: c ^ 1, False),
    "delta-reference": ("delta", (32, 64), lambda o: f'"reference_hash":"{o.base}"'.encode(), 18, _other_hex,
                        False),
    # the address in the dataset's layout message: HDF5 reads 8 bytes off the payload
    "dataset-address": ("full", (32, 64), lambda o: b"\x03\x01" + struct.pack("<QQ", o.offset, o.length), 2,
                        lambda c: c ^ 8, True),
    # the superblock's base address: every HDF5 address in the pack is off, the payloads are not
    "superblock-base-address": ("full", (32, 64), None, 25, lambda c: c ^ 0x20, True),
}


@pytest.mark.parametrize("case", list(_PACK_DAMAGE))
def test_verify_reads_packs_as_gc_and_push_do(damage_base, tmp_path, case):
    from coral_torch.errors import CorruptObjectError
    from coral_torch.storage.hdf5_store import HDF5Store

    kind, shape, pattern, at, new, read_fails = _PACK_DAMAGE[case]
    repo_dir = _copy_of(damage_base, tmp_path)
    o = _object(repo_dir, kind, shape)
    pack = repo_dir / "packs" / o.pack
    if pattern is None:
        data = bytearray(pack.read_bytes())
        data[at] = new(data[at])
        pack.write_bytes(bytes(data))
    else:
        pat = pattern(o)
        _edit(pack, pat, len(pat) if at is None else at, new)
    _loads_intact(repo_dir, *damage_base[1:])
    report = _verify(repo_dir)
    assert not report.ok and o.hash in report.damaged_objects, report
    assert report.damaged_commits
    store = HDF5Store(pack, mode="r")
    try:
        if read_fails:  # named, never h5py's own KeyError / RuntimeError / OSError
            with pytest.raises(CorruptObjectError):
                store.read_prepared(o.hash, "deltas" if kind == "delta" else "weights")
        else:  # read back, but not what the catalog describes: push's decode fails (see below)
            assert store.read_prepared(o.hash, "deltas" if kind == "delta" else "weights") is not None
    finally:
        store.close()


def test_push_fails_where_verify_reports_a_damaged_attribute(damage_base, tmp_path, server, bucket):
    """The contract the cases above rest on, once end to end: push meets the damage verify reports."""
    from s3_server import REGION, TEST_KEY, TEST_SECRET

    from coral_torch.errors import SyncIncompleteError
    from coral_torch.storage.s3_store import S3Config

    repo_dir = _copy_of(damage_base, tmp_path)
    o = _object(repo_dir, "full", (32, 64))
    _edit(repo_dir / "packs" / o.pack, b'"shape":[32,64]', 13, lambda c: ord("5"))
    assert not _verify(repo_dir).ok
    cfg = S3Config(bucket=bucket, prefix="p", region=REGION, endpoint_url=server.endpoint, access_key=TEST_KEY,
                   secret_key=TEST_SECRET, addressing_style="path", progress=False, max_attempts=2)
    r = Repository(repo_dir, create=False)
    try:
        with pytest.raises(SyncIncompleteError):
            r.push(cfg)
    finally:
        r.close()


def test_catalog_schema_text_not_utf8_is_catalog_damaged(damage_base, tmp_path):
    """A flipped high bit in the schema (here the name of an index of table meta): SQLite quotes the name
    in its error, sqlite3 cannot decode that and raised UnicodeDecodeError (at open, on the first statement)."""
    from coral_torch.errors import CatalogDamagedError
    from coral_torch.repository.catalog import Catalog

    repo_dir = _copy_of(damage_base, tmp_path)
    catalog = repo_dir / "catalog.sqlite"
    _edit(catalog, b"indexsqlite_autoindex_meta_1meta", 24, lambda c: c | 0x80)
    for open_it in (lambda: Repository(repo_dir, create=False),
                    lambda: Catalog(catalog, create=False, writable=False),
                    lambda: coral_torch.load(damage_base[1][0], repo=repo_dir)):
        with pytest.raises(CatalogDamagedError) as err:
            open_it()
        msg = str(err.value)
        assert "\n" not in msg and str(catalog) in msg and "UTF-8" in msg and "restore" in msg, msg
    coral_torch.api.close_repositories()


def test_catalog_column_name_not_utf8_is_catalog_damaged(damage_base, tmp_path):
    """A column name that is not UTF-8 opens fine; sqlite3 raised UnicodeDecodeError building the
    column names of a query (the commit rows of log, load, verify)."""
    from coral_torch.errors import CatalogDamagedError

    repo_dir = _copy_of(damage_base, tmp_path)
    _edit(repo_dir / "catalog.sqlite", b"message TEXT NOT NULL", 1, lambda c: c | 0x80)
    r = Repository(repo_dir, create=False)
    try:
        for call in (r.log, r.verify, lambda: r.load(damage_base[1][0])):
            with pytest.raises(CatalogDamagedError):
                call()
    finally:
        r.close()


@pytest.mark.parametrize("case", ["column-renamed", "index-disagrees-with-table"])
def test_verify_reports_catalog_damage_that_gc_and_saves_meet(damage_base, tmp_path, case):
    """Schema and index damage that reads of rows never meet, and writes do: a renamed column (an
    insert names it), an index whose entries are not its table's (a delete updates it)."""
    from coral_torch.errors import CatalogDamagedError

    repo_dir = _copy_of(damage_base, tmp_path)
    catalog = repo_dir / "catalog.sqlite"
    if case == "column-renamed":
        _edit(catalog, b"created REAL NOT NULL", 2, lambda c: ord("x"))
    else:  # same length: the index keeps its entries for objects(pack) but is now declared on objects(kind)
        data = catalog.read_bytes()
        old = b"CREATE INDEX objects_pack ON objects(pack)"
        assert data.count(old) == 1
        catalog.write_bytes(data.replace(old, b"CREATE INDEX objects_pack ON objects(kind)"))
    _loads_intact(repo_dir, *damage_base[1:])
    with pytest.raises(CatalogDamagedError) as err:
        _verify(repo_dir)
    assert "\n" not in str(err.value) and str(catalog) in str(err.value)
    r = Repository(repo_dir, create=False)
    try:  # what verify reports is what a change meets
        with pytest.raises(CatalogDamagedError):
            if case == "column-renamed":
                r.commit({"x": torch.ones(3)})
            else:  # releasing the first commit deletes its own objects' rows
                for name in [n for n, cid in r.refs().items() if cid == damage_base[1][0]]:
                    r.delete_ref(name)
                r.gc()
    finally:
        r.close()


@pytest.mark.parametrize("case", ["commit-object-list", "ref-name"])
def test_verify_reports_catalog_rows_push_refuses(damage_base, tmp_path, case):
    """Rows loads do not read but push sends (and gc trusts): a commit's object list that is not its
    manifest's (gc would free a live object), a ref name push refuses."""
    import sqlite3

    repo_dir = _copy_of(damage_base, tmp_path)
    ids = damage_base[1]
    c = sqlite3.connect(repo_dir / "catalog.sqlite")
    try:
        if case == "commit-object-list":  # 'b' of the second commit now lists the object of 'step'
            step = c.execute("SELECT hash FROM commit_objects WHERE commit_id=? AND name='step'", (ids[1],)).fetchone()
            c.execute("UPDATE commit_objects SET hash=? WHERE commit_id=? AND name='b'", (step[0], ids[1]))
        else:
            c.execute("UPDATE refs SET name='tags/t\x11' WHERE name='tags/t1'")
        c.commit()
    finally:
        c.close()
    _loads_intact(repo_dir, *damage_base[1:])
    report = _verify(repo_dir)
    assert not report.ok and ids[1] in report.damaged_manifests, report


def _global_heap_objects(data: bytes, at: int) -> list[tuple[int, int, int]]:
    """``(header offset, index, size)`` of the objects of the intact HDF5 global heap collection at ``at``."""
    end = at + int.from_bytes(data[at + 8 : at + 16], "little")
    p, out = at + 16, []
    while p + 16 <= end:
        index, size = int.from_bytes(data[p : p + 2], "little"), int.from_bytes(data[p + 8 : p + 16], "little")
        out.append((p, index, size))
        p += 16 + (size + 7) // 8 * 8 if index else size
    return out


_VERIFY_IN_CHILD = r"""
import json, sys
from coral_torch import Repository
r = Repository(sys.argv[1], create=False)
rep = r.verify()
print(json.dumps({"ok": rep.ok, "unreadable": rep.unreadable_packs, "damaged": sorted(rep.damaged_objects)}))
"""


def test_verify_does_not_hang_on_a_global_heap_hdf5_loops_on(damage_base, tmp_path):
    """The objects' JSON attributes live in HDF5 global heap collections. One size grown by 256 (one bit:
    what the probe flipped) sends HDF5's decoder into the collection's free space, where an all-zero object
    header does not move it on: it spins forever, holding h5py's lock (gc and push would hang too). verify
    names the pack instead of reading it through HDF5 (run in a child: a regression hangs, it must fail)."""
    repo_dir = _copy_of(damage_base, tmp_path)
    o = _object(repo_dir, "full", (32, 64))
    pack = repo_dir / "packs" / o.pack
    data = bytearray(pack.read_bytes())
    at = data.index(b"GCOL")
    objs = _global_heap_objects(bytes(data), at)
    last = [x for x in objs if x[1] != 0][-1]
    free = [x for x in objs if x[1] == 0]
    assert free and free[0][2] > 512, objs  # room in the free space for the jump
    data[last[0] + 9] ^= 1  # the size's second byte: +256
    pack.write_bytes(bytes(data))
    _loads_intact(repo_dir, *damage_base[1:])
    res = subprocess.run([sys.executable, "-c", _VERIFY_IN_CHILD, str(repo_dir)], capture_output=True, text=True,
                         timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert not out["ok"] and o.pack in out["unreadable"] and o.hash in out["damaged"], out
    assert "global heap" in out["unreadable"][o.pack]


def test_hdf5_object_that_is_not_a_dataset_is_a_corrupt_object(tmp_path):
    """A damaged object header can make HDF5 see another kind of object (a named datatype, a group) where
    a dataset was: reading it raised TypeError from deep in h5py (gc, push); it is a CorruptObjectError."""
    import h5py
    import numpy as np

    from coral_torch.errors import CorruptObjectError
    from coral_torch.storage.hdf5_store import HDF5Store

    path = tmp_path / "s.h5"
    HDF5Store(path, mode="x").close()
    with h5py.File(path, "a") as f:
        f["weights"]["a" * 32] = np.dtype("f4")  # a named datatype
        f["deltas"].create_group("b" * 32)
    store = HDF5Store(path, mode="r")
    try:
        for key, group in (("a" * 32, "weights"), ("b" * 32, "deltas")):
            with pytest.raises(CorruptObjectError):
                store.read_prepared(key, group)
        with pytest.raises(CorruptObjectError):
            store.load("a" * 32)
        with pytest.raises(CorruptObjectError):
            store.load_delta("b" * 32)
    finally:
        store.close()


def test_catalog_schema_losing_a_column_is_catalog_damaged(damage_base, tmp_path):
    """One flipped byte turns the newline that ends a comment in the objects table's schema into another
    control character: the comment swallows the next column, rows have 12 values, not 13 (ValueError)."""
    from coral_torch.errors import CatalogDamagedError, CheckpointDamagedError

    repo_dir = _copy_of(damage_base, tmp_path)
    _edit(repo_dir / "catalog.sqlite", b"a full one\n    dtype TEXT NOT NULL", 10, lambda c: c ^ 0x10)
    r = Repository(repo_dir, create=False)
    try:
        for call, error in ((lambda: r.load(damage_base[1][0]), CheckpointDamagedError),
                            (r.verify, CatalogDamagedError)):
            with pytest.raises(error) as err:
                call()
            assert "\n" not in str(err.value) and "schema" in str(err.value)
    finally:
        r.close()
