"""Repository.push / Repository.pull against a real S3 server (moto's ThreadedMotoServer on 127.0.0.1;
no decorator mocks, no botocore stubs).

Faults are real: connections are dropped mid-push by a TCP proxy (tests/s3_proxy.py, mode "tcp"), the server
is stopped mid-push and started again, objects on the server are damaged with plain boto3 calls,
credentials are checked by moto's IAM (switched on for the auth tests).

The invariant every interrupted push must keep (checked with boto3, not with coral-torch): no
remote ref names a commit whose document is missing, and no commit document exists whose objects
(or their delta bases) are missing.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers

from _lightning_models import TRAINER_DEFAULTS, TinyModel, diff, tiny_loaders, train_state  # noqa: E402
from s3_proxy import FaultProxy  # noqa: E402
from s3_server import REGION, TEST_KEY, TEST_SECRET, free_port  # noqa: E402

from coral_torch import (
    Repository,  # noqa: E402
    cli,  # noqa: E402
)
from coral_torch.callbacks import CoralCheckpoint, CoralCheckpointIO  # noqa: E402
from coral_torch.errors import (  # noqa: E402
    BucketNotFoundError,
    CorruptObjectError,
    IntegrityError,
    InvalidRefNameError,
    RemoteAuthError,
    RemoteConnectionError,
    RemoteError,
    RemoteRepositoryNotFoundError,
    SyncIncompleteError,
)
from coral_torch.storage.s3_store import S3Config, S3Store  # noqa: E402

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore:.*LeafSpec"),
]
MiB = 1 << 20


@pytest.fixture
def open_store():
    """Opens S3Stores (closed at the end of the test). Passing a store instead of an S3Config to
    push/pull skips setting up a boto3 client each time (~0.2 s): most tests reuse one."""
    opened: list[S3Store] = []

    def make(cfg: S3Config) -> S3Store:
        opened.append(S3Store(cfg))
        return opened[-1]

    yield make
    for st in opened:
        st.close()


def make_config(server, bucket, **kw) -> S3Config:
    opts = dict(
        bucket=bucket,
        prefix="team/exp",
        region=REGION,
        endpoint_url=server.endpoint,
        access_key=TEST_KEY,
        secret_key=TEST_SECRET,
        addressing_style="path",
        progress=False,
        max_attempts=2,
        connect_timeout=2,
        read_timeout=15,
        max_concurrency=4,
    )
    opts.update(kw)
    return S3Config(**opts)


# ------------------------------------------------------------------------------------ helpers
def raw(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def random_bits(n: int, seed: int) -> torch.Tensor:
    """fp32 tensor of random bit patterns: incompressible."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**31), 2**31 - 1, (n,), dtype=torch.int32, generator=g).view(torch.float32)


class Trainee:
    """A fake training run: a frozen embedding (never changes: deduplicated), layers that change a
    little every step (XOR deltas), an AdamW-like state and a step counter."""

    def __init__(self, seed: int, width: int = 128, frozen: Optional[torch.Tensor] = None):
        g = torch.Generator().manual_seed(seed)
        self.g = g
        self.frozen = frozen if frozen is not None else torch.randn(512, 64, generator=g)
        self.w1 = torch.randn(width, width, generator=g)
        self.w2 = torch.randn(width, width, generator=g)
        self.m = torch.zeros(width, width)
        self.step = 0

    def train(self) -> None:
        self.step += 1
        rows = torch.randint(0, self.w1.shape[0], (4,), generator=self.g)
        self.w1[rows] += 1e-3 * torch.randn(4, self.w1.shape[1], generator=self.g)
        self.w2[:, :3] -= 1e-3
        self.m[rows] = 0.9 * self.m[rows] + 0.1

    def checkpoint(self) -> dict:
        return {"epoch": self.step, "state_dict": {"emb.weight": self.frozen, "l1.weight": self.w1,
                                                   "l2.weight": self.w2},
                "optimizer_states": [{"exp_avg": self.m, "step": torch.tensor(float(self.step))}],
                "note": f"step {self.step}"}


def build_repo(path: Path) -> tuple[Repository, dict[str, dict]]:
    """Two runs sharing a frozen tensor, several commits with deltas, tags. Returns the repository
    and {commit id: the checkpoint dict as committed (deep copy)}."""
    repo = Repository(path, workers=2)
    saved: dict[str, dict] = {}
    frozen = torch.randn(512, 64, generator=torch.Generator().manual_seed(99))
    for run, seed, n in (("r1", 1, 4), ("r2", 2, 3)):
        t = Trainee(seed, frozen=frozen)
        for i in range(n):
            t.train()
            ck = t.checkpoint()
            tags = [f"{run}-e{i}"] if i in (0, n - 1) else []
            stats = repo.commit(ck, run=run, tags=tags, metrics={"loss": 1.0 / (i + 1)})
            saved[stats.commit_id] = _deep_copy(ck)
    return repo, saved


def _deep_copy(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _deep_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deep_copy(v) for v in obj]
    return obj


def same_checkpoint(a: Any, b: Any) -> list[str]:
    return diff(a, b)


def remote_problems(client, bucket: str, prefix: str) -> list[str]:
    """What breaks the push invariant, checked with plain boto3: refs naming missing commit docs,
    commit docs naming missing objects (payload or metadata) or delta bases."""
    keys: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []) or []:
            keys[o["Key"][len(prefix):]] = o["Size"]

    def doc(key: str) -> dict:
        return json.loads(client.get_object(Bucket=bucket, Key=prefix + key)["Body"].read())

    problems: list[str] = []

    def object_ok(h: str, depth: int = 0) -> bool:
        if depth > 1000:
            return False
        if f"metadata/{h}.json" in keys:
            return f"weights/{h}" in keys
        if f"metadata/{h}.delta.json" in keys:
            if f"deltas/{h}" not in keys:
                return False
            return object_ok(str(doc(f"metadata/{h}.delta.json")["reference_hash"]), depth + 1)
        return False

    commits = {k[len("commits/"):-len(".json")] for k in keys if k.startswith("commits/") and k.endswith(".json")}
    for k in keys:
        if k.startswith("refs/") and k.endswith(".json"):
            cid = doc(k)["commit"]
            if cid not in commits:
                problems.append(f"{k} -> {cid}: no commit document")
    for cid in commits:
        d = doc(f"commits/{cid}.json")
        for name, h, _ in d["objects"]:
            if not object_ok(h):
                problems.append(f"commit {cid[:10]} needs {name} ({h}): missing on the remote")
    return problems


def remote_keys(client, bucket: str, prefix: str = "") -> list[str]:
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", []) or []]
    return out


def assert_consistent(repo: Repository) -> None:
    """Every commit the repository lists loads; verify finds nothing; no temporary packs left."""
    for c in repo.log():
        repo.load(c.id)
    report = repo.verify()
    assert report.ok, (report.damaged_objects, report.damaged_commits, report.missing_packs)
    assert not list((repo.path / "packs").glob(".tmp-*"))


def make_trainer(**kw: Any) -> "pl.Trainer":
    return pl.Trainer(**{**TRAINER_DEFAULTS, **kw})


# ================================================================================ 1. round trip
def test_round_trip_into_empty_repository(server, bucket, tmp_path, open_store):
    cfg = make_config(server, bucket)
    A, saved = build_repo(tmp_path / "a" / ".coral")
    stats_a = {c.id: c for c in A.log()}
    assert len(stats_a) == 7
    # the repository really holds deltas and deduplicated tensors
    hows = [how for cid in stats_a for _, _, how in A.catalog.commit_objects(cid)]
    assert hows.count("delta") >= 6 and hows.count("dedup") >= 6

    first = A.push(cfg)
    assert first["commits_uploaded"] == 7 and first["object_bytes"] > 0
    # the frozen tensor is stored once, remotely too
    client = server.client()
    frozen_hash = A.catalog.commit_objects(A.resolve("r1-e0"))
    emb = [h for n, h, _ in frozen_hash if n.endswith("emb.weight")][0]
    assert sum(k.endswith(emb) for k in remote_keys(client, bucket, "team/exp/weights/")) == 1
    assert remote_problems(client, bucket, "team/exp/") == []

    B = Repository(tmp_path / "elsewhere" / "b" / ".coral", workers=2)
    got = B.pull(cfg)
    assert got["commits_downloaded"] == 7 and got["objects_downloaded"] == first["objects_uploaded"]
    assert got["bytes_transferred"] > 0

    for cid, ck in saved.items():
        loaded = B.load(cid)
        assert same_checkpoint(loaded, ck) == [], cid
        assert same_checkpoint(loaded, A.load(cid)) == []
    assert B.refs() == A.refs()
    for ref in ("r1", "r2", "r1-e0", "r1-e3", "r2-e2", "runs/r2/latest", "latest", A.resolve("latest")[:8]):
        assert B.resolve(ref) == A.resolve(ref), ref
    assert [(c.id, c.parent, c.run, c.epoch, c.metrics) for c in B.log()] == \
           [(c.id, c.parent, c.run, c.epoch, c.metrics) for c in A.log()]
    assert_consistent(B)

    # nothing to do the second time, both ways
    remote = open_store(cfg)
    again = A.push(remote)
    assert again["object_bytes"] == 0 and again["objects_uploaded"] == 0
    assert again["commits_uploaded"] == 0 and again["refs_updated"] == 0 and again["bytes_transferred"] == 0
    again_pull = B.pull(remote)
    assert again_pull["objects_downloaded"] == 0 and again_pull["commits_downloaded"] == 0
    assert again_pull["bytes_transferred"] == 0
    assert len(list((B.path / "packs").glob("*.h5"))) == 1  # the second pull wrote no pack

    # incremental: one more commit sends only what is new
    t = Trainee(1, frozen=saved[A.resolve("r1")]["state_dict"]["emb.weight"])
    for _ in range(5):
        t.train()
    new = A.commit(t.checkpoint(), run="r1", tags=["fresh"])
    inc = A.push(remote)
    assert inc["commits_uploaded"] == 1 and 0 < inc["object_bytes"] < first["object_bytes"]
    inc_pull = B.pull(remote)
    assert inc_pull["commits_downloaded"] == 1 and inc_pull["objects_downloaded"] == inc["objects_uploaded"]
    assert B.resolve("fresh") == new.commit_id == B.resolve("r1") == B.resolve("latest")
    assert same_checkpoint(B.load("fresh"), A.load("fresh")) == []
    assert_consistent(B)
    A.close()
    B.close()


def test_push_sends_only_live_commits(server, bucket, tmp_path, open_store):
    """A commit no ref names is not pushed (it is garbage); the objects the pushed one needs are."""
    cfg = open_store(make_config(server, bucket))
    A = Repository(tmp_path / "a", workers=2)
    t = Trainee(5)
    t.train()
    dead = A.commit(t.checkpoint(), run="x", keep=False).commit_id
    t.train()
    live = A.commit(t.checkpoint(), run="x", keep=False).commit_id  # moves runs/x/latest: `dead` has no ref
    assert A.push(cfg)["commits_uploaded"] == 1
    client = server.client()
    assert remote_keys(client, bucket, f"team/exp/commits/{dead}") == []
    assert remote_keys(client, bucket, f"team/exp/commits/{live}") != []
    B = Repository(tmp_path / "b", workers=2)
    B.pull(cfg)
    assert [c.id for c in B.log()] == [live]
    assert same_checkpoint(B.load(live), A.load(live)) == []  # its delta base came along
    assert_consistent(B)


def test_commit_made_during_a_push_is_not_half_pushed(server, bucket, tmp_path, monkeypatch, open_store):
    """Training goes on while `coral-torch push` runs: a commit made after the push chose what to
    send must not get a remote ref (its objects and document were not sent); the next push sends it."""
    cfg = open_store(make_config(server, bucket, prefix="during"))
    path = tmp_path / "a"
    A = Repository(path, workers=2)
    t = Trainee(8)
    t.train()
    first = A.commit(t.checkpoint(), run="live").commit_id
    trainer_side = Repository(path, workers=2)  # the training process's own handle
    made: list[str] = []
    from coral_torch.repository.remote import pushing

    real_upload = pushing.upload_objects

    def upload_while_training(*a, **kw):
        out = real_upload(*a, **kw)
        if not made:
            t.train()
            made.append(trainer_side.commit(t.checkpoint(), run="live", tags=["mid"]).commit_id)
        return out

    monkeypatch.setattr(pushing, "upload_objects", upload_while_training)
    A.push(cfg)
    assert made
    assert remote_problems(server.client(), bucket, "during/") == []
    B = Repository(tmp_path / "b", workers=2)
    B.pull(cfg)
    assert_consistent(B)
    assert B.resolve("live") == first
    monkeypatch.undo()
    assert A.push(cfg)["commits_uploaded"] == 1
    B.pull(cfg)
    assert B.resolve("live") == made[0] == B.resolve("mid")
    assert_consistent(B)


# =========================================================================== 2. second machine
def _fit(repo_path: Path, max_epochs: int, *, ckpt: Optional[str] = None, seed: int = 1,
         plugins: Optional[list] = None, **cb_kw: Any):
    pl.seed_everything(seed, verbose=False)
    model = TinyModel()
    cb = CoralCheckpoint(repo=repo_path, run="exp", **cb_kw)
    trainer = make_trainer(max_epochs=max_epochs, callbacks=[cb], plugins=plugins)
    trainer.fit(model, *tiny_loaders(), ckpt_path=ckpt)
    return model, trainer, cb


def test_resume_on_a_second_machine_is_bit_exact(server, bucket, tmp_path):
    cfg = make_config(server, bucket, prefix="resume")
    a_path = tmp_path / "machine-a" / ".coral"
    _, _, cb = _fit(a_path, 2)
    cid = cb.last_commit
    A = Repository(a_path, create=False)  # a fresh object, not the callback's
    assert A.push(cfg)["commits_uploaded"] == 2
    A.close()

    # machine B: an empty directory, a fresh Repository for the pull, then resume by hash
    b_path = tmp_path / "machine-b" / ".coral"
    B = Repository(b_path)
    assert B.pull(cfg)["commits_downloaded"] == 2
    B.close()
    model_b, trainer_b, cb_b = _fit(b_path, 3, ckpt=f"coral://{cid}", seed=123,
                                    plugins=[CoralCheckpointIO(b_path)])
    state_b = train_state(model_b, trainer_b)

    # machine A continues itself
    model_a, trainer_a, cb_a = _fit(a_path, 3, ckpt=f"coral://{cid}", seed=7)
    state_a = train_state(model_a, trainer_a)
    assert state_a["global_step"] == state_b["global_step"] == 3 * 8
    assert diff(state_b, state_a) == []
    # ... and both wrote the very same commit (content-addressed)
    assert cb_b.last_commit == cb_a.last_commit
    assert Repository(b_path, create=False).get_commit(cb_b.last_commit).parent == cid


# ======================================================================= 3. callback s3 push
def test_callback_pushes_on_train_end(server, bucket, tmp_path):
    cfg = make_config(server, bucket, prefix="cb")
    _, _, cb = _fit(tmp_path / ".coral", 2, s3=cfg)
    assert cb.push_stats is not None and "error" not in cb.push_stats
    assert cb.push_stats["commits_uploaded"] == 2 and cb.push_stats["object_bytes"] > 0
    client = server.client()
    assert remote_keys(client, bucket, f"cb/commits/{cb.last_commit}.json")
    assert remote_problems(client, bucket, "cb/") == []
    B = Repository(tmp_path / "b")
    B.pull(cfg)
    assert B.resolve("exp") == cb.last_commit
    assert_consistent(B)


@pytest.mark.parametrize("fault", ["endpoint", "credentials"])
def test_callback_push_failure_keeps_training_and_local_data(server, bucket, tmp_path, caplog, capsys, fault):
    good = make_config(server, bucket, prefix="cbfail")
    auth_on = False
    try:
        if fault == "endpoint":
            bad = make_config(server, bucket, prefix="cbfail", endpoint_url=f"http://127.0.0.1:{free_port()}",
                              max_attempts=1, connect_timeout=1)
        else:
            allow_all = {"Version": "2012-10-17",
                         "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
            key, secret = server.create_user(f"u{uuid.uuid4().hex[:8]}", allow_all)
            good = make_config(server, bucket, prefix="cbfail", access_key=key, secret_key=secret)
            bad = make_config(server, bucket, prefix="cbfail", access_key=key, secret_key="not-the-secret")
            server.enforce_auth(True)
            auth_on = True
        repo_path = tmp_path / ".coral"
        with caplog.at_level(logging.ERROR, logger="coral_torch"):
            _, trainer, cb = _fit(repo_path, 2, s3=bad)
        assert trainer.state.finished and trainer.global_step == 2 * 8
        assert cb.push_stats is not None and "error" in cb.push_stats
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR and "push to S3 failed" in r.getMessage()]
        assert len(errors) == 1, [r.getMessage() for r in caplog.records]
        msg = errors[0].getMessage()
        assert "Local checkpoints are intact" in msg and str(repo_path.absolute()) in msg
        assert ("127.0.0.1" in msg) if fault == "endpoint" else ("rejected the credentials" in msg)
        # the hint is a command that works
        assert f"coral-torch --repo {repo_path.absolute()} push s3://{bucket}/cbfail/" in msg

        local = Repository(repo_path, create=False)
        assert len(local.log()) == 2 and local.resolve("exp") == cb.last_commit
        assert_consistent(local)
        if not auth_on:  # the failure came before anything was sent
            assert remote_keys(server.client(), bucket, "cbfail/") == []

        # a later push succeeds: with the CLI command the log suggested, or from Python
        if fault == "endpoint":
            hint = msg.split("retry with `", 1)[1].split("`", 1)[0]
            argv = hint.split()[1:]  # the hint names the dead endpoint: point it at the live one
            argv[argv.index("--endpoint-url") + 1] = server.endpoint
            assert cli.main(argv) == 0
            assert "pushed" in capsys.readouterr().out
        else:
            assert local.push(good)["commits_uploaded"] == 2
        B = Repository(tmp_path / "b")
        B.pull(good)
        assert B.resolve("exp") == cb.last_commit
        assert same_checkpoint(B.load("exp"), local.load("exp")) == []
    finally:
        if auth_on:
            server.enforce_auth(False)


# ================================================================================== 4. faults
def _fault_repo(path: Path) -> Repository:
    """A repository whose push is a few MB in ~20 objects (random, incompressible bytes)."""
    repo = Repository(path, workers=2)
    g = torch.Generator().manual_seed(3)
    sd = {f"layer{i}.weight": random_bits(64 * 1024, seed=100 + i) for i in range(6)}  # 256 KiB each
    for step in range(3):
        for v in sd.values():
            idx = torch.randint(0, v.numel(), (2000,), generator=g)
            v[idx] = torch.randn(2000, generator=g)
        repo.commit({"state_dict": sd, "step": step}, run="f", tags=[f"s{step}"])
    return repo


@pytest.fixture(scope="module")
def fault_source(tmp_path_factory):
    path = tmp_path_factory.mktemp("fault") / ".coral"
    repo = _fault_repo(path)
    loads = {c.id: repo.load(c.id) for c in repo.log()}
    repo.close()
    return path, loads


# Where the connection drops: part-way through the object uploads, or in the middle of the 2nd
# commit document / the 3rd ref written (offsets measured on a whole push of the same repository).
CUT_POINTS = {"objects": ("objects", 0.6), "commit-docs": ("commits/", 1), "refs": ("refs/", 2)}


@pytest.fixture(scope="module")
def push_marks(server, fault_source):
    """A whole push of the fault repository through the proxy: its object bytes and, for each commit
    document and ref it wrote, how many bytes had gone up before (prefix and bucket names of the same
    length as the tests' keep the requests the same size)."""
    from coral_torch.repository.remote import pushing

    src, _ = fault_source
    bucket = f"coral-{uuid.uuid4().hex[:12]}"
    server.client().create_bucket(Bucket=bucket)
    A = Repository(src, create=False, workers=2)
    marks: list[tuple[str, int]] = []
    with FaultProxy(server.port, mode="tcp") as proxy, pytest.MonkeyPatch.context() as mp:
        real_put = pushing.write_document

        def spy(store, key, doc):
            marks.append((key, proxy.bytes_up))
            return real_put(store, key, doc)

        mp.setattr(pushing, "write_document", spy)
        full = A.push(make_config(server, bucket, prefix="cut-x", endpoint_url=proxy.endpoint, max_concurrency=2))
    A.close()
    assert full["commits_uploaded"] == 3 and full["object_bytes"] > 1_000_000
    assert [k.split("/")[0] for k, _ in marks] == ["commits"] * 3 + ["refs"] * 7
    return full, marks


@pytest.mark.parametrize("where", list(CUT_POINTS))
def test_push_interrupted_by_dropped_connection(server, bucket, tmp_path, fault_source, push_marks, where,
                                               open_store):
    src, loads = fault_source
    full, marks = push_marks
    A = Repository(src, create=False, workers=2)
    client = server.client()
    with FaultProxy(server.port, mode="tcp") as proxy:
        cfg = make_config(server, bucket, prefix=f"cut-{list(CUT_POINTS).index(where)}", endpoint_url=proxy.endpoint,
                          max_concurrency=2, connect_timeout=1)
        phase, at = CUT_POINTS[where]
        if phase == "objects":
            cut = int(at * marks[0][1])
        else:
            cut = [off for k, off in marks if k.startswith(phase)][at] + 150  # inside that request
        remote = open_store(cfg)
        direct = open_store(make_config(server, bucket, prefix=cfg.prefix))
        proxy.cut_after(cut, stay_down=True)
        t0 = time.monotonic()
        with pytest.raises(RemoteError) as ei:
            A.push(remote)
        assert time.monotonic() - t0 < 60
        assert proxy.cuts == 1
        err = ei.value
        assert isinstance(err, (SyncIncompleteError, RemoteConnectionError)), type(err)
        assert err.__cause__ is None
        text = str(err)
        assert "127.0.0.1" in text and ("connection" in text or "again" in text)
        objects_phase = isinstance(err, SyncIncompleteError)
        assert objects_phase == (phase == "objects"), text  # the cut landed where it was meant to

        # the invariant, checked with boto3 directly: nothing references what is not there
        assert remote_problems(client, bucket, cfg.prefix) == []
        partial_commits = len(remote_keys(client, bucket, cfg.prefix + "commits/"))
        partial_refs = len(remote_keys(client, bucket, cfg.prefix + "refs/"))
        expected = {"objects": (0, 0), "commits/": (1, 0), "refs/": (3, 2)}[phase]
        assert (partial_commits, partial_refs) == expected

        # a reader that pulls now sees only complete commits
        early = Repository(tmp_path / "early", workers=2)
        early.pull(direct)
        assert len(early.log()) == partial_commits
        for c in early.log():
            assert same_checkpoint(early.load(c.id), loads[c.id]) == []
        assert_consistent(early)

        # back up: the re-run completes and does not send finished objects again
        proxy.set_down(False)
        again = A.push(remote)
        assert again["commits_uploaded"] == 3 - partial_commits
        if objects_phase:
            assert again["objects_skipped"] >= err.stats["uploaded"] + err.stats["deltas_uploaded"] > 0
            assert 0 < again["object_bytes"] < full["object_bytes"]
        else:  # the objects were all there already: only documents were missing
            assert again["object_bytes"] == 0 and again["objects_skipped"] == full["objects_uploaded"]
        assert A.push(remote)["bytes_transferred"] == 0
    assert remote_problems(client, bucket, cfg.prefix) == []
    B = Repository(tmp_path / "b", workers=2)
    B.pull(direct)
    assert sorted(c.id for c in B.log()) == sorted(loads)
    for cid, ck in loads.items():
        assert same_checkpoint(B.load(cid), ck) == []
    assert B.refs() == A.refs()
    assert_consistent(B)
    A.close()


def test_push_survives_server_stop_and_restart(server, bucket, tmp_path, fault_source, push_marks, monkeypatch):
    """The server goes away mid-push (stopped: its connections drop, new ones are refused) and comes
    back on the same port. moto keeps its state in the process, so the restarted server still holds
    what the first push finished; the second push sends only the rest."""
    from moto.server import ThreadedMotoServer

    src, loads = fault_source
    full, _ = push_marks
    n_objects = full["objects_uploaded"]
    A = Repository(src, create=False, workers=2)
    port = free_port()
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    srv.start()
    running = True
    try:
        with FaultProxy(port, mode="tcp") as proxy:  # stands for the network: it drops the dead server's connections
            cfg = make_config(server, bucket, prefix="restart", endpoint_url=proxy.endpoint, max_concurrency=2,
                              connect_timeout=1)
            from coral_torch.storage.s3.objects import S3Objects

            real_pair = S3Objects.put_pair
            lock = threading.Lock()
            started = [0]

            def put_pair(self, *a, **kw):
                nonlocal running
                with lock:
                    started[0] += 1
                    if started[0] == 7:  # six objects are up (or on their way): the server stops
                        srv.stop()
                        running = False
                        proxy.cut_after(0, stay_down=False)
                return real_pair(self, *a, **kw)

            monkeypatch.setattr(S3Objects, "put_pair", put_pair)
            with pytest.raises(SyncIncompleteError) as ei:
                A.push(cfg)
            monkeypatch.undo()
            assert not running
            assert "127.0.0.1" in str(ei.value)
            first = ei.value.stats
            assert 0 < first["uploaded"] + first["deltas_uploaded"] < n_objects
            assert remote_problems(server.client(), bucket, "restart/") == []
            assert remote_keys(server.client(), bucket, "restart/commits/") == []

            srv = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            srv.start()
            running = True
            again = A.push(cfg)
            assert again["commits_uploaded"] == 3
            assert again["objects_skipped"] >= first["uploaded"] + first["deltas_uploaded"]
            assert again["object_bytes"] < full["object_bytes"]
    finally:
        if running:
            srv.stop()
    B = Repository(tmp_path / "b", workers=2)
    B.pull(make_config(server, bucket, prefix="restart"))
    for cid, ck in loads.items():
        assert same_checkpoint(B.load(cid), ck) == []
    assert B.refs() == A.refs()
    assert_consistent(B)
    A.close()


def test_pull_interrupted_then_resumed(server, bucket, tmp_path, fault_source, push_marks):
    src, loads = fault_source
    full, _ = push_marks
    n_objects = full["objects_uploaded"]
    A = Repository(src, create=False, workers=2)
    A.push(make_config(server, bucket, prefix="down"))
    B = Repository(tmp_path / "b", workers=2)
    with FaultProxy(server.port, mode="tcp") as proxy:
        cfg = make_config(server, bucket, prefix="down", endpoint_url=proxy.endpoint, max_concurrency=2,
                          connect_timeout=1)
        proxy.cut_after(900_000, stay_down=True, direction="down")  # mid-download, and stays down
        with pytest.raises(SyncIncompleteError) as ei:
            B.pull(cfg)
        assert proxy.cuts == 1
        msg = str(ei.value)
        assert "No commit or ref was pulled yet; run the pull again" in msg and "127.0.0.1" in msg
        got = ei.value.stats["downloaded"] + ei.value.stats["deltas_downloaded"]
        assert 0 < got < n_objects
        # nothing visible, and what arrived is kept for the next try
        assert B.log() == [] and B.refs() == {}
        assert_consistent(B)
        kept = len(B.catalog.all_objects())
        assert 0 < kept <= got

        proxy.set_down(False)
        down0 = proxy.bytes_down
        done = B.pull(cfg)
        assert done["commits_downloaded"] == 3
        assert done["objects_downloaded"] == n_objects - kept and done["objects_skipped"] == kept
        assert proxy.bytes_down - down0 < full["object_bytes"]
    for cid, ck in loads.items():
        assert same_checkpoint(B.load(cid), ck) == []
    assert B.refs() == A.refs()
    assert_consistent(B)
    A.close()


def _flip(client, bucket: str, key: str) -> None:
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    mid = len(body) // 2
    for i in range(mid, min(len(body), mid + 16)):
        body[i] ^= 0x5A
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body))


@pytest.mark.parametrize("group", ["weights", "deltas"])
def test_corrupted_object_detected_on_pull(server, bucket, tmp_path, group, open_store):
    cfg = open_store(make_config(server, bucket, prefix="bad"))
    A, saved = build_repo(tmp_path / "a")
    ids = [c.id for c in A.log()]
    A.push(cfg)
    B = Repository(tmp_path / "b", workers=2)
    B.pull(cfg)  # a good first pull
    before = sorted(c.id for c in B.log())

    # A commits more; one of the new objects is damaged on the server after the push
    t = Trainee(1, frozen=saved[A.resolve("r1")]["state_dict"]["emb.weight"])
    for _ in range(6):
        t.train()
    new = A.commit(t.checkpoint(), run="r1", tags=["new"]).commit_id
    t.train()
    ck = t.checkpoint()
    ck["state_dict"]["head.weight"] = random_bits(4096, seed=77)  # a new tensor: stored in full, whatever
    newer = A.commit(ck, run="r1", tags=["newer"]).commit_id      # the delta policy does with the rest
    incoming = A.push(cfg)["objects_uploaded"]
    assert incoming >= 3
    client = server.client()
    kind = "full" if group == "weights" else "delta"
    victims = [h for _, h, how in A.catalog.commit_objects(newer) if how == kind]
    assert victims, A.catalog.commit_objects(newer)
    victim = victims[0]
    _flip(client, bucket, f"bad/{group}/{victim}")

    pushed_new = A.push(cfg)["objects_uploaded"]  # nothing new; the damage is on the server only
    assert pushed_new == 0
    with pytest.raises(SyncIncompleteError) as ei:
        B.pull(cfg)
    msg = str(ei.value)
    assert victim in msg and "damaged" in msg and "No commit or ref was pulled" in msg, msg
    assert list(ei.value.failures) == [victim] and isinstance(ei.value.failures[victim], IntegrityError)
    # nothing half-visible: B is exactly as before and fully loadable
    assert sorted(c.id for c in B.log()) == before
    assert new not in {c.id for c in B.log()} and newer not in {c.id for c in B.log()}
    assert_consistent(B)
    # the damaged tensor is never handed out by the store either
    if group == "weights":
        with pytest.raises(IntegrityError):
            cfg.load(victim)

    # repaired (the source pushes its intact copy again), the pull completes
    client.delete_object(Bucket=bucket, Key=f"bad/metadata/{victim}" + (".json" if group == "weights" else ".delta.json"))
    assert A.push(cfg)["objects_uploaded"] == 1
    repaired = B.pull(cfg)
    assert repaired["commits_downloaded"] == 2
    # the intact objects of the refused pull were kept: only the repaired one (and, for a damaged
    # delta base, the deltas built on it) came down again
    assert 1 <= repaired["objects_downloaded"] < incoming
    assert same_checkpoint(B.load("newer"), A.load("newer")) == []
    assert len(B.log()) == len(ids) + 2
    assert_consistent(B)


def test_tampered_commit_document_is_refused(server, bucket, tmp_path):
    """A commit document changed on the remote is refused by its checksum; one changed and re-sealed
    with a fresh checksum (forged) still does not hash to its id. Nothing is pulled either time."""
    from coral_torch.storage.s3_store import encode_document

    cfg = make_config(server, bucket, prefix="forged")
    A, _ = build_repo(tmp_path / "a")
    A.push(cfg)
    client = server.client()
    cid = A.resolve("r2")
    key = f"forged/commits/{cid}.json"
    doc = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    doc["manifest"]["tensors"][0][1] = doc["manifest"]["tensors"][1][1]  # point a tensor at other bytes
    B = Repository(tmp_path / "b", workers=2)
    for body, match in ((json.dumps(doc).encode(), "document checksum mismatch"),
                        (encode_document(doc), "does not hash to its id")):
        client.put_object(Bucket=bucket, Key=key, Body=body)
        with pytest.raises(CorruptObjectError, match=match) as ei:
            B.pull(cfg)
        assert cid in str(ei.value) and "Nothing was pulled" in str(ei.value)
        assert B.log() == [] and B.refs() == {}
        assert_consistent(B)
    # the source's next push sees the damaged document (its ETag is not the expected one) and rewrites it
    assert A.push(cfg)["commits_repaired"] == 1
    B.pull(cfg)
    assert B.refs() == A.refs()
    assert_consistent(B)


def test_wrong_credentials_and_missing_bucket(server, bucket, tmp_path):
    A, _ = build_repo(tmp_path / "a")
    B = Repository(tmp_path / "b", workers=2)
    missing = make_config(server, f"coral-missing-{uuid.uuid4().hex[:8]}")
    for op in (A.push, B.pull):
        with pytest.raises(BucketNotFoundError) as ei:
            op(missing)
        assert missing.bucket in str(ei.value) and server.endpoint in str(ei.value)
        assert ei.value.__cause__ is None

    allow_all = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    key, _ = server.create_user(f"u{uuid.uuid4().hex[:8]}", allow_all)
    server.enforce_auth(True)
    try:
        for creds, code, ops in (
            ({"access_key": key, "secret_key": "wrong-secret-5f1e"}, "SignatureDoesNotMatch", (A.push, B.pull)),
            ({"access_key": "AKIANOSUCHKEY0000000", "secret_key": "wrong-secret-5f1e"}, "InvalidAccessKeyId",
             (A.push,)),
        ):
            cfg = make_config(server, bucket, **creds)
            for op in ops:
                with pytest.raises(RemoteAuthError) as ei:
                    op(cfg)
                msg = str(ei.value)
                assert "rejected the credentials" in msg and code in msg, msg
                assert "wrong-secret-5f1e" not in msg and ei.value.__cause__ is None
    finally:
        server.enforce_auth(False)
    assert remote_keys(server.client(), bucket) == []
    assert B.log() == [] and not list((B.path / "packs").iterdir())
    # and with the right ones it works
    A.push(make_config(server, bucket))
    B.pull(make_config(server, bucket))
    assert len(B.log()) == 7
    assert_consistent(B)


# ======================================================================= 5. concurrent pushes
def _two_sides(tmp_path: Path) -> tuple[Repository, Repository, list[str], list[str]]:
    """A and C: different commits of the same run name, from the same start (shared objects)."""
    A = Repository(tmp_path / "a", workers=2)
    C = Repository(tmp_path / "c", workers=2)
    ids: dict[str, list[str]] = {"a": [], "c": []}
    for repo, key, lr in ((A, "a", 1e-3), (C, "c", -2e-3)):
        t = Trainee(11)  # the same start: both sides push some identical objects (the frozen tensor)
        for i in range(3):
            t.train()
            t.w2 += lr * (i + 1)
            # tags name every commit; both sides move runs/shared/latest
            ids[key].append(repo.commit(t.checkpoint(), run="shared", keep=(i == 0), tags=[f"{key}{i}"]).commit_id)
    assert not set(ids["a"]) & set(ids["c"])
    return A, C, ids["a"], ids["c"]


@pytest.mark.parametrize("mode", ["sequential", "threads"])
def test_concurrent_pushes_lose_no_commit(server, bucket, tmp_path, mode):
    cfg_a = make_config(server, bucket, prefix="shared")
    cfg_c = make_config(server, bucket, prefix="shared")
    A, C, a_ids, c_ids = _two_sides(tmp_path)
    if mode == "sequential":
        A.push(cfg_a)
        C.push(cfg_c)
    else:
        errors: list[BaseException] = []
        barrier = threading.Barrier(2)

        def go(repo: Repository, cfg: S3Config) -> None:
            try:
                barrier.wait()
                repo.push(cfg)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=go, args=(r, c)) for r, c in ((A, cfg_a), (C, cfg_c))]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert not errors, errors
    assert remote_problems(server.client(), bucket, "shared/") == []

    D = Repository(tmp_path / "d", workers=2)
    D.pull(make_config(server, bucket, prefix="shared"))
    have = {c.id for c in D.log()}
    # pushed: every commit some ref named at push time (tags name them all here)
    assert set(a_ids) | set(c_ids) <= have
    for repo, ids in ((A, a_ids), (C, c_ids)):
        for cid in ids:
            assert same_checkpoint(D.load(cid), repo.load(cid)) == []
    # the run's head is one of the two sides' heads; the other head is still named by its tag
    assert D.resolve("shared") in (a_ids[-1], c_ids[-1])
    assert D.resolve("a2") == a_ids[-1] and D.resolve("c2") == c_ids[-1]
    assert_consistent(D)
    if mode == "sequential":  # the newer update of the shared ref wins
        assert D.resolve("shared") == c_ids[-1]


def test_moved_ref_commit_is_kept_on_pull(server, bucket, tmp_path, open_store):
    """Two machines move the same ref and nothing else names their commits: the losing commit is
    still on the remote and pull keeps it (keep/<id>)."""
    cfg = open_store(make_config(server, bucket, prefix="heads"))
    A = Repository(tmp_path / "a", workers=2)
    C = Repository(tmp_path / "c", workers=2)
    a = A.commit(Trainee(1).checkpoint(), run="r", keep=False).commit_id
    time.sleep(0.01)
    c = C.commit(Trainee(2).checkpoint(), run="r", keep=False).commit_id
    A.push(cfg)
    st = C.push(cfg)
    assert st["refs_updated"] == 1
    st = A.push(cfg)  # A's ref value is older: the remote keeps C's
    assert st["refs_kept_remote"] == 1 and st["refs_updated"] == 0
    D = Repository(tmp_path / "d", workers=2)
    D.pull(cfg)
    assert D.resolve("r") == c
    assert D.refs("keep/") == {f"keep/{a}": a}
    assert same_checkpoint(D.load(a), A.load(a)) == []
    assert_consistent(D)


# ============================================================================= 6. multipart
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_large_object_goes_up_in_parts(server, bucket, tmp_path):
    cfg = make_config(server, bucket, prefix="big", multipart_threshold=64 * MiB, multipart_chunksize=16 * MiB)
    A = Repository(tmp_path / "a", workers=2)
    big = random_bits(17_500_000, seed=4)  # 70 MB of random bits: the codec cannot shrink it
    cid = A.commit({"w": big, "small": torch.ones(3)}, run="big").commit_id
    h = [h for n, h, _ in A.catalog.commit_objects(cid) if n == "w"][0]
    stats = A.push(cfg)
    assert stats["object_bytes"] >= 64 * MiB
    head = server.client().head_object(Bucket=bucket, Key=f"big/weights/{h}")
    assert head["ContentLength"] >= 64 * MiB
    etag = head["ETag"].strip('"')
    assert "-" in etag and int(etag.rsplit("-", 1)[1]) > 1, etag
    B = Repository(tmp_path / "b", workers=2)
    B.pull(cfg)
    assert raw(B.load(cid)["w"]) == raw(big)


# =================================================================================== 7. CLI
def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coral_torch.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ})


def test_cli_push_and_pull(server, bucket, tmp_path, capsys):
    A, saved = build_repo(tmp_path / "a")
    A.close()
    url = f"s3://{bucket}/cli/prefix"
    p = _cli("--repo", str(tmp_path / "a"), "push", url, "--endpoint-url", server.endpoint)
    assert p.returncode == 0, p.stderr
    assert "pushed" in p.stdout
    empty = tmp_path / "fresh-dir" / "b"
    rc = cli.main(["--repo", str(empty), "pull", url, "--endpoint-url", server.endpoint, "--region", REGION])
    assert rc == 0
    assert "pulled" in capsys.readouterr().out
    B = Repository(empty, create=False)
    for cid, ck in saved.items():
        assert same_checkpoint(B.load(cid), ck) == []
    assert_consistent(B)


def test_cli_errors_are_one_line(server, bucket, tmp_path, capsys):
    A, _ = build_repo(tmp_path / "a")
    A.close()
    cases = [
        ("push", f"http://{bucket}/x", []),  # not an s3:// URL
        ("push", "s3://", []),  # no bucket
        ("push", f"s3://coral-missing-{uuid.uuid4().hex[:6]}/x", ["--endpoint-url", server.endpoint]),
        ("pull", f"s3://coral-missing-{uuid.uuid4().hex[:6]}/x", ["--endpoint-url", server.endpoint]),
        ("push", f"s3://{bucket}/x", ["--endpoint-url", f"http://127.0.0.1:{free_port()}"]),
        ("push", f"s3://{bucket}/x", ["--endpoint-url", "not-a-url"]),
    ]
    for cmd, url, extra in cases:
        rc = cli.main(["--repo", str(tmp_path / ("a" if cmd == "push" else "b")), cmd, url, *extra])
        err = capsys.readouterr().err
        assert rc != 0, (cmd, url)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("coral-torch: error:"), (url, err)
    # pull of a missing bucket left no repository half-made behind with content
    assert not list((tmp_path / "b" / "packs").glob("*")) if (tmp_path / "b").exists() else True


@pytest.mark.parametrize("case, says", [
    ("typo", "there is nothing at"),  # the repository is at team/exp; team/exq was asked for
    ("bucket root", "there is nothing at"),  # s3://bucket with nothing in it
    ("not a repository", "holds no coral-torch repository"),  # keys there, none a push writes
    ("missing bucket", "does not exist"),
])
def test_pull_of_no_repository_is_an_error_and_creates_nothing(server, bucket, tmp_path, capsys, case, says):
    """`coral-torch pull s3://bucket/typo` once said "pulled 0 commit(s)", exited 0 and made a local
    repository. Now: one line saying what is wrong, exit 1, nothing created locally; the Python
    API raises the same error and leaves the repository it was given exactly as it was."""
    client = server.client()
    client.put_object(Bucket=bucket, Key=f"team/exp/commits/{'0' * 32}.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key="datasets/readme.txt", Body=b"not checkpoints")
    if case == "bucket root":
        bucket = f"coral-empty-{uuid.uuid4().hex[:6]}"
        client.create_bucket(Bucket=bucket)
    target = {"typo": f"{bucket}/team/exq", "bucket root": bucket, "not a repository": f"{bucket}/datasets",
              "missing bucket": f"coral-missing-{uuid.uuid4().hex[:6]}/team/exp"}[case]
    local = tmp_path / "fresh" / ".coral"
    rc = cli.main(["--repo", str(local), "pull", f"s3://{target}", "--endpoint-url", server.endpoint,
                   "--region", REGION])
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 1 and out == "" and len(lines) == 1, (out, err)
    assert lines[0].startswith("coral-torch: error:") and says in lines[0] and "pulled" not in lines[0], err
    assert not (tmp_path / "fresh").exists()  # no repository directory, no catalog

    bucket_name, _, prefix = target.partition("/")
    repo = Repository(tmp_path / "api")
    before = sorted((p.relative_to(repo.path), p.stat().st_size) for p in repo.path.rglob("*") if p.is_file())
    want = BucketNotFoundError if case == "missing bucket" else RemoteRepositoryNotFoundError
    with pytest.raises(want) as ei:
        repo.pull(make_config(server, bucket_name, prefix=prefix, check_bucket=False))
    assert says in str(ei.value) and "\n" not in str(ei.value)
    after = sorted((p.relative_to(repo.path), p.stat().st_size) for p in repo.path.rglob("*") if p.is_file())
    assert after == before and repo.log() == [] and repo.refs() == {}
    repo.close()


# ==================================================================== 8. names, late failures
@pytest.mark.parametrize("bad", ["tags/new\nline", "tags/nul\x00byte", "tags/../../escape"])
def test_push_refuses_a_bad_local_ref_name_before_sending_anything(server, bucket, tmp_path, bad):
    """A ref name that could break a key or leave the prefix (written into the catalog by an older
    version or by hand) stops the push up front: nothing at all reaches the remote."""
    A, _ = build_repo(tmp_path / "a")
    with A.catalog.transaction() as c:
        c.execute("INSERT INTO refs(name, commit_id, updated) VALUES (?,?,?)", (bad, A.resolve("r1"), time.time()))
    with pytest.raises(InvalidRefNameError) as ei:
        A.push(make_config(server, bucket, prefix="names"))
    msg = str(ei.value)
    assert "before anything was sent" in msg and "\n" not in msg and repr(bad) in msg
    assert remote_keys(server.client(), bucket) == []


def _sealed_ref(server, bucket: str, prefix: str, name: str, cid: str) -> None:
    from coral_torch.storage.s3_store import encode_document

    body = encode_document({"kind": "ref", "name": name, "commit": cid, "updated": time.time()})
    server.client().put_object(Bucket=bucket, Key=f"{prefix}/refs/{name}.json", Body=body)


@pytest.mark.parametrize("bad", ["tags/x\ty", "tags/..x/../.."])
def test_pull_refuses_a_bad_remote_ref_name(server, bucket, tmp_path, bad, open_store):
    """A ref on the remote whose name is not valid (a well-formed document: only its name is wrong)
    is refused, and nothing is pulled."""
    cfg = open_store(make_config(server, bucket, prefix="rn"))
    A, _ = build_repo(tmp_path / "a")
    A.push(cfg)
    _sealed_ref(server, bucket, "rn", bad, A.resolve("r1"))
    B = Repository(tmp_path / "b", workers=2)
    with pytest.raises(InvalidRefNameError) as ei:
        B.pull(cfg)
    assert "Nothing was pulled" in str(ei.value) and "\n" not in str(ei.value)
    assert B.log() == [] and B.refs() == {} and not B.catalog.all_objects()


def test_pull_refuses_a_damaged_ref_then_a_push_repairs_it(server, bucket, tmp_path, open_store):
    """A ref document damaged on the remote is not skipped (a ref silently missing): the pull
    refuses; the source's next push sees the ETag differ, reads it, and writes it again."""
    cfg = open_store(make_config(server, bucket, prefix="badref"))
    A, _ = build_repo(tmp_path / "a")
    A.push(cfg)
    key = "badref/refs/tags/r1-e0.json"
    client = server.client()
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0x01
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    B = Repository(tmp_path / "b", workers=2)
    with pytest.raises(CorruptObjectError, match="tags/r1-e0.*damaged"):
        B.pull(cfg)
    assert B.log() == [] and B.refs() == {}
    assert A.push(cfg)["refs_updated"] == 1
    B.pull(cfg)
    assert B.refs() == A.refs()
    assert_consistent(B)


def test_pull_failing_late_leaves_no_pack_behind(server, bucket, tmp_path, open_store):
    """The objects sync finished but the pull cannot publish (an object a commit needs is gone from
    the remote): no commit or ref is pulled, the verified objects that arrived are catalogued (no
    stray pack in packs/), and the next pull fetches only what was missing."""
    cfg = open_store(make_config(server, bucket, prefix="late"))
    A, saved = build_repo(tmp_path / "a")
    total = A.push(cfg)["objects_uploaded"]
    client = server.client()
    victim = next(h for _, h, how in A.catalog.commit_objects(A.resolve("r2-e0")) if how == "full")
    for key in (f"late/metadata/{victim}.json", f"late/weights/{victim}"):
        client.delete_object(Bucket=bucket, Key=key)
    B = Repository(tmp_path / "b", workers=2)
    with pytest.raises(CorruptObjectError, match="the remote is incomplete"):
        B.pull(cfg)
    assert B.log() == [] and B.refs() == {}
    report = B.verify()
    assert report.ok and report.orphan_files == [], report.orphan_files
    assert not list((B.path / "packs").glob(".tmp-*"))
    kept = len(B.catalog.all_objects())
    assert kept > 0
    assert A.push(cfg)["objects_uploaded"] == 1  # the missing object is sent again
    got = B.pull(cfg)  # the missing object, and the deltas built on it that could not be kept
    assert got["objects_downloaded"] == total - kept and got["objects_skipped"] == kept
    for cid, ck in saved.items():
        assert same_checkpoint(B.load(cid), ck) == []
    assert_consistent(B)


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_repull_replaces_objects_of_a_damaged_local_pack(server, bucket, tmp_path, damage, open_store):
    """A pack of a pulled repository is cut short or lost: the next pull fetches its objects again
    and the repository is whole again (the damaged pack is forgotten)."""
    cfg = open_store(make_config(server, bucket, prefix="local"))
    A, saved = build_repo(tmp_path / "a")
    A.push(cfg)
    B = Repository(tmp_path / "b", workers=2)
    B.pull(cfg)
    pack = next((B.path / "packs").glob("*.h5"))
    if damage == "truncated":
        with open(pack, "r+b") as f:
            f.truncate(pack.stat().st_size // 2)
    else:
        pack.unlink()
    B.close()
    B = Repository(tmp_path / "b", workers=2)
    assert not B.verify().ok
    got = B.pull(cfg)
    assert got["objects_replaced"] == got["objects_downloaded"] > 0
    for cid, ck in saved.items():
        assert same_checkpoint(B.load(cid), ck) == []
    assert_consistent(B)
    assert pack.name not in B.catalog.packs()
