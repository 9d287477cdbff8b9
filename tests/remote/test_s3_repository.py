"""Repositories on S3 (``repo="s3://bucket/prefix"``): save and load through a node-local cache,
conditional publish, two writers on one run, fresh nodes, bad input. Real servers only: moto's
threaded server, and ``rclone serve s3`` (which ignores ``If-None-Match``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _lightning_models import TRAINER_DEFAULTS, TinyModel, diff, tiny_loaders, train_state  # noqa: E402
from nodes import node_env  # noqa: E402
from s3_server import s3_config  # noqa: E402

import coral_torch  # noqa: E402
from coral_torch.callbacks import CoralCheckpoint, CoralCheckpointIO  # noqa: E402
from coral_torch.errors import (  # noqa: E402
    BucketNotFoundError,
    CoralError,
    RefConflictError,
    RemoteRepositoryNotFoundError,
    UnsupportedLocationError,
)
from coral_torch.location import S3Location, parse_location  # noqa: E402
from coral_torch.repository.handles import close_repositories, open_repository  # noqa: E402
from coral_torch.repository.repository import Repository  # noqa: E402
from coral_torch.repository.s3_repository import S3Repository  # noqa: E402
from coral_torch.storage.s3_store import S3Config  # noqa: E402

pytestmark = [pytest.mark.timeout(300), pytest.mark.filterwarnings("ignore::UserWarning")]


def _state(seed: int = 0, rows: int = 256) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(rows, 128, generator=g), "b": torch.zeros(7), "step": 3, "name": "x"}


@pytest.fixture
def s3_env(server, bucket, tmp_path, monkeypatch):
    """This process sees the moto server through the standard AWS environment and keeps its
    cache in its own directory; the handle cache is emptied around the test."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    monkeypatch.setenv("CORAL_CACHE_DIR", str(tmp_path / "cache-here"))
    close_repositories()
    yield f"s3://{bucket}/ckpts"
    close_repositories()


def _fresh_node(tmp_path: Path, name: str, code: str, endpoint: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a process that shares nothing with this one but the S3 server: its own
    working directory, HOME and cache."""
    node = tmp_path / name
    env = node_env(node, endpoint)
    return subprocess.run([sys.executable, "-c", code], cwd=node, env=env, capture_output=True, text=True, timeout=240)


# ------------------------------------------------------------------------------ locations
def test_locations_are_parsed_and_urls_are_never_local_paths(tmp_path):
    assert parse_location("s3://bucket/a/b/") == S3Location("bucket", "a/b")
    assert parse_location("s3://bucket") == S3Location("bucket", "")
    assert parse_location(tmp_path / "r") == (tmp_path / "r").absolute()
    for bad in ["gs://bucket/x", "https://example.com/r", "file:///tmp/r", "s3://Bad_Bucket/x", "s3://bk/../x"]:
        with pytest.raises(UnsupportedLocationError) as e:
            parse_location(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(UnsupportedLocationError, match="checkpoint reference"):
        parse_location("coral://latest")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(UnsupportedLocationError):
            coral_torch.save({"x": torch.ones(2)}, tmp_path / "a.pt", repo="gs://bucket/x")
    finally:
        os.chdir(cwd)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing was created, no 'gs:' directory


def test_dcp_and_strategy_take_s3_and_refuse_other_urls():
    from coral_torch.callbacks import CoralModelParallelStrategy
    from coral_torch.dcp import CoralStorageReader, CoralStorageWriter

    assert CoralStorageWriter("s3://bucket/x").location == S3Location("bucket", "x")  # opened on first use
    assert CoralModelParallelStrategy(repo="s3://bucket/x").repo_path == S3Location("bucket", "x")
    for make in (CoralStorageWriter, CoralStorageReader):
        with pytest.raises(UnsupportedLocationError):
            make("gs://bucket/x")


# ------------------------------------------------------------------------------ save / load
def test_save_and_load_through_s3_with_dedup_and_deltas(s3_env, server, tmp_path):
    sd = _state()
    cid1 = coral_torch.save(sd, tmp_path / "e1.pt", repo=s3_env)
    pointer = json.loads((tmp_path / "e1.pt").read_text())
    assert pointer["repo"] == s3_env and pointer["commit"] == cid1
    repo = open_repository(s3_env)
    assert isinstance(repo, S3Repository)
    first = repo.last_publish["bytes_uploaded"]
    assert first > 0 and repo.last_publish["objects_uploaded"] == 2

    sd["w"][3] += 1.0  # one row changes: a delta against the parent
    coral_torch.save(sd, tmp_path / "e2.pt", repo=s3_env)
    assert 0 < repo.last_publish["bytes_uploaded"] < first / 10

    cid3 = coral_torch.save(sd, tmp_path / "e3.pt", repo=s3_env)  # unchanged: nothing new goes up
    assert repo.last_publish["objects_uploaded"] == 0 and repo.last_publish["bytes_uploaded"] == 0

    # the pointer file alone finds the repository; a fresh node loads bit-exact with an empty cache
    back = coral_torch.load(tmp_path / "e3.pt")
    assert torch.equal(back["w"], sd["w"]) and back["step"] == 3
    (tmp_path / "node" / "e3.pt").parent.mkdir()
    (tmp_path / "node" / "e3.pt").write_bytes((tmp_path / "e3.pt").read_bytes())
    torch.save(sd, tmp_path / "want.pt")
    code = (
        "import torch, coral_torch\n"
        f"want = torch.load({str(tmp_path / 'want.pt')!r})\n"
        f"for f in ['coral://latest', 'e3.pt', {cid3[:8]!r}]:\n"
        f"    got = coral_torch.load(f, repo={s3_env!r}) if f != 'e3.pt' else coral_torch.load(f)\n"
        "    assert got.keys() == want.keys() and got['name'] == 'x'\n"
        "    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in ('w', 'b'))\n"
        "print('ok')\n"
    )
    out = _fresh_node(tmp_path, "node", code, server.endpoint)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
    assert not (tmp_path / "node" / ".coral").exists()  # no local repository appeared there


def test_cli_reads_an_s3_repository(s3_env, server, tmp_path):
    coral_torch.save(_state(), tmp_path / "a.pt", repo=s3_env, run="exp")
    code = (
        "import sys, torch\nfrom coral_torch import cli\n"
        f"for argv in (['log'], ['show', 'exp'], ['verify'], ['export', 'exp', 'out.pt']):\n"
        f"    assert cli.main(['--repo', {s3_env!r}, *argv]) == 0, argv\n"
        "print('exported', sorted(torch.load('out.pt', weights_only=True)))\n"
    )
    out = _fresh_node(tmp_path, "cli", code, server.endpoint)
    assert out.returncode == 0, (out.stdout + out.stderr)[-2000:]
    assert "exp/latest" in out.stdout and "exported ['b', 'name', 'step', 'w']" in out.stdout


# ------------------------------------------------------------------------------ objects on demand
def _cached(cache: Path) -> set[str]:
    """The objects the cache directory (a plain local repository) holds."""
    with Repository(cache) as local:
        return {r.hash for r in local.catalog.all_objects()}


def _objects(repo: Repository, cid: str) -> set[str]:
    return {h for _, h, _ in repo.catalog.commit_objects(cid)}


def test_fetch_brings_commits_and_refs_and_reads_fetch_only_the_objects_they_need(s3_env, server, bucket, tmp_path):
    writer = S3Repository(parse_location(s3_env), cache_dir=tmp_path / "writer")
    sa = _state(1)
    sb = {**sa, "w": sa["w"].clone()}
    sb["w"][3] += 1.0  # a delta against a's w; b's "b" is a's
    sc = {**_state(2), "b": torch.ones(7)}
    a, b, c = (writer.commit(sd, run="r").commit_id for sd in (sa, sb, sc))

    node = S3Repository(parse_location(s3_env), cache_dir=tmp_path / "node")
    stats = node.fetch()
    assert stats["commits_downloaded"] == 3 and "objects_downloaded" not in stats
    assert node.cache_usage() == 0 and _cached(tmp_path / "node") == set()
    assert [row.id for row in node.log("r")] == [c, b, a] and node.resolve("r/latest") == c
    report = node.verify()  # the cache lists commits whose objects are only on the bucket
    assert report.ok, report
    assert _cached(tmp_path / "node") == set()

    got = node.load(c)  # fetches c's objects, nothing else
    assert torch.equal(got["w"], sc["w"]) and torch.equal(got["b"], sc["b"])
    assert _cached(tmp_path / "node") == _objects(writer, c)
    got = node.load(b)  # b's objects and the delta base they need (a's w)
    assert torch.equal(got["w"], sb["w"])
    want = _objects(writer, c) | _objects(writer, b)
    w_b = node.catalog.get_object(node.tensor_index(b)["w"][0])
    assert w_b is not None and w_b.kind == "delta"  # a one-row change: stored as a delta
    assert _cached(tmp_path / "node") == want | {w_b.base}
    assert node.verify().ok

    # a node that never read the parent saves on top of it: its tensors go whole into its cache,
    # only what the bucket lacks goes up, and every node loads the result bit-exact
    other = S3Repository(parse_location(s3_env), cache_dir=tmp_path / "other")
    sd = {**sc, "w": sc["w"].clone()}
    sd["w"][0] += 1.0
    d = other.commit(sd, run="r").commit_id
    assert other.get_commit(d).parent == c
    assert other.last_publish["objects_uploaded"] == 1  # "b" is c's, already on the bucket
    with Repository(tmp_path / "other") as local:
        assert {r.kind for r in local.catalog.all_objects()} == {"full"}
    fresh = S3Repository(parse_location(s3_env), cache_dir=tmp_path / "fresh")
    got = fresh.load("r/latest")
    assert torch.equal(got["w"], sd["w"]) and torch.equal(got["b"], sd["b"])
    assert fresh.verify().ok

    # an object that neither the cache nor the bucket has is damage
    w_a = writer.tensor_index(a)["w"][0]
    assert w_b.base == w_a
    s3 = server.client()
    for key in (f"ckpts/weights/{w_a}", f"ckpts/metadata/{w_a}.json"):
        s3.delete_object(Bucket=bucket, Key=key)
    report = fresh.verify()
    assert not report.ok and a in report.damaged_commits and c not in report.damaged_commits
    assert d not in report.damaged_commits
    assert node.verify().ok  # node's cache holds it
    for r in (writer, node, other, fresh):
        r.close()


# ------------------------------------------------------------------------------ first saves
def test_a_prefix_holding_only_layout_keys_is_a_repository_being_created(s3_env, server, bucket, tmp_path):
    """A rank opening the repository while another uploads the first save (payload before metadata)."""
    s3 = server.client()
    s3.put_object(Bucket=bucket, Key=f"ckpts/weights/{'ab' * 32}", Body=b"a payload whose metadata is on its way")
    s3.put_object(Bucket=bucket, Key="ckpts/.coral-probe/0123.json", Body=b"{}")
    with pytest.raises(RemoteRepositoryNotFoundError, match="no coral-torch repository"):
        S3Repository(parse_location(s3_env), cache_dir=tmp_path / "c0", create=False)
    repo = S3Repository(parse_location(s3_env), cache_dir=tmp_path / "rank1")
    assert repo.fetch() == {} and repo.log() == []
    cid = repo.commit(_state(), run="r").commit_id
    other = S3Repository(parse_location(s3_env), cache_dir=tmp_path / "rank0", create=False)
    assert other.resolve("r/latest") == cid and torch.equal(other.load(cid)["w"], _state()["w"])
    # a key outside the layout beside them is something else
    s3.put_object(Bucket=bucket, Key=f"other/weights/{'cd' * 32}", Body=b"x")
    s3.put_object(Bucket=bucket, Key="other/notes.txt", Body=b"not a repository")
    with pytest.raises(RemoteRepositoryNotFoundError, match="something other than"):
        S3Repository(parse_location(f"s3://{bucket}/other"), cache_dir=tmp_path / "c2")
    for r in (repo, other):
        r.close()


# ------------------------------------------------------------------------------ two writers
def _stale_writer_loses(location: str, tmp_path: Path, config: S3Config | None = None) -> None:
    kw = {"config": config} if config is not None else {}
    a = S3Repository(parse_location(location), cache_dir=tmp_path / "cache-a", **kw)
    b = S3Repository(parse_location(location), cache_dir=tmp_path / "cache-b", **kw)
    a.commit(_state(1), run="shared")
    won = a.resolve("shared/latest")

    real_fetch = b.fetch
    raced = {}

    def fetch_while_a_saves():  # B has read the run's latest; A moves it before B publishes
        if not raced:
            raced["cid"] = a.commit(_state(2), run="shared").commit_id
        return real_fetch()

    b.fetch = fetch_while_a_saves  # type: ignore[method-assign]
    with pytest.raises(RefConflictError) as e:
        b.commit(_state(3), run="shared")
    assert "\n" not in str(e.value) and e.value.current == raced["cid"] and e.value.expected == won
    b.fetch = real_fetch  # type: ignore[method-assign]
    # the winner's commit is the run's latest; the loser's commit is kept, nothing is lost
    fresh = S3Repository(parse_location(location), cache_dir=tmp_path / "cache-c", **kw)
    assert fresh.resolve("shared/latest") == raced["cid"]
    kept = [c.id for c in fresh.log()]
    assert won in kept and raced["cid"] in kept and len(kept) == 3
    (lost,) = [c for c in kept if c not in (won, raced["cid"])]
    assert fresh.resolve(lost) == lost and torch.equal(fresh.load(lost)["w"], _state(3)["w"])
    # the loser's cache follows the bucket (not its own lost commit), and its next save wins
    b.fetch()
    assert b.resolve("shared/latest") == raced["cid"]
    again = b.commit(_state(4), run="shared").commit_id
    assert b.get_commit(again).parent == raced["cid"]
    assert S3Repository(parse_location(location), cache_dir=tmp_path / "cache-d", **kw).resolve("shared/latest") == again
    for r in (a, b, fresh):
        r.close()


def test_two_writers_on_one_run_moto(s3_env, tmp_path):
    _stale_writer_loses(s3_env, tmp_path)


def test_racing_writers_exactly_one_wins(s3_env, tmp_path):
    import threading

    repos = [S3Repository(parse_location(s3_env), cache_dir=tmp_path / f"c{i}") for i in range(3)]
    results: list = [None] * 3
    start = threading.Barrier(3)

    def save(i: int) -> None:
        start.wait()
        try:
            results[i] = repos[i].commit(_state(10 + i), run="race").commit_id
        except RefConflictError as exc:
            results[i] = exc

    threads = [threading.Thread(target=save, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wins = [r for r in results if isinstance(r, str)]
    assert len(wins) >= 1
    fresh = S3Repository(parse_location(s3_env), cache_dir=tmp_path / "fresh")
    latest = fresh.resolve("race/latest")
    assert latest in wins
    assert {c.id for c in fresh.log()} >= set(wins) | {r.current for r in results if isinstance(r, RefConflictError)}
    assert len(fresh.log()) == 3  # every commit is on the bucket: the losers' under keep/<id>
    for r in [*repos, fresh]:
        r.close()


def test_two_writers_on_one_run_rclone(rclone_server, tmp_path):
    bucket = rclone_server.create_bucket("racing")
    config = s3_config(rclone_server.endpoint, bucket)
    _stale_writer_loses(f"s3://{bucket}/ckpts", tmp_path, config)


# ------------------------------------------------------------------------------ Lightning
def test_lightning_resume_on_a_fresh_node_equals_a_straight_run(s3_env, tmp_path, monkeypatch):
    import lightning.pytorch as pl

    def fit(epochs: int, repo: str, ckpt: str | None = None, seed: int = 1):
        pl.seed_everything(seed, verbose=False)
        model = TinyModel()
        cb = CoralCheckpoint(repo=repo, run="exp")
        plugins = [CoralCheckpointIO(repo)] if ckpt else None
        trainer = pl.Trainer(**{**TRAINER_DEFAULTS, "default_root_dir": str(tmp_path)}, max_epochs=epochs, callbacks=[cb], plugins=plugins)
        trainer.fit(model, *tiny_loaders(), ckpt_path=ckpt)
        return train_state(model, trainer)

    straight = fit(3, f"{s3_env}-straight")
    fit(2, s3_env)
    close_repositories()  # a fresh node: another cache, no open handles
    monkeypatch.setenv("CORAL_CACHE_DIR", str(tmp_path / "cache-node-b"))
    resumed = fit(3, s3_env, ckpt="coral://exp/latest", seed=123)
    assert resumed["global_step"] == straight["global_step"] == 3 * 8
    assert diff(straight, resumed) == []


# ------------------------------------------------------------------------------ bad input
def test_missing_bucket_is_one_line_and_creates_nothing(server, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    monkeypatch.setenv("CORAL_CACHE_DIR", str(tmp_path / "cache"))
    close_repositories()
    with pytest.raises(BucketNotFoundError) as e:
        coral_torch.save(_state(), tmp_path / "a.pt", repo="s3://no-such-bucket-here/x")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "a.pt").exists()


def test_prefix_holding_something_else_is_refused(s3_env, server, bucket, tmp_path):
    server.client().put_object(Bucket=bucket, Key="ckpts/notes.txt", Body=b"not a repository")
    with pytest.raises(RemoteRepositoryNotFoundError, match="something other than"):
        coral_torch.save(_state(), tmp_path / "a.pt", repo=s3_env)
    assert not (tmp_path / "a.pt").exists()


def test_load_from_an_empty_prefix_is_an_error(s3_env, tmp_path):
    with pytest.raises(CoralError):
        coral_torch.load("coral://latest", repo=s3_env)
    assert not (tmp_path / "cache-here").exists()


def test_gc_on_s3_with_the_cli_after_retention(s3_env, server, tmp_path):
    from coral_torch import cli
    from coral_torch.retention import LatestN

    for i in range(4):
        sd = _state(i)  # every tensor changes: released commits leave objects only they need
        coral_torch.save(sd, f=None, repo=s3_env, run="r", keep=LatestN(1))
    before = len(server.client().list_objects_v2(Bucket=s3_env.split("/")[2])["Contents"])
    assert cli.main(["--repo", s3_env, "gc", "--grace", "0"]) == 0  # a dry run
    assert cli.main(["--repo", s3_env, "gc", "--yes", "--grace", "0"]) == 0
    after = len(server.client().list_objects_v2(Bucket=s3_env.split("/")[2])["Contents"])
    assert after < before
    close_repositories()
    fresh = S3Repository(parse_location(s3_env), cache_dir=tmp_path / "fresh")
    assert torch.equal(fresh.load("r/latest")["w"], _state(3)["w"]) and len(fresh.log("r")) == 1
    fresh.close()


def test_a_commit_published_elsewhere_resolves_at_once(s3_env, tmp_path):
    a = S3Repository(parse_location(s3_env), cache_dir=tmp_path / "a")
    b = S3Repository(parse_location(s3_env), cache_dir=tmp_path / "b")
    a.commit(_state(1), run="r")
    a.fetch()  # a's cache is fresh now; b publishes within the same second
    c = b.commit(_state(2), run="r").commit_id
    assert a.resolve(c) == c and a.resolve("r/latest") == c
    for r in (a, b):
        r.close()
