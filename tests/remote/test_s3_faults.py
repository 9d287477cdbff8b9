"""Push and pull through a fault-injecting proxy (tests/s3_proxy.py) in front of a real S3 server
(moto's ThreadedMotoServer on 127.0.0.1; no in-process mocks or botocore stubs).

Each trial arms one fault (a connection cut part-way through a request or an answer, an answer
held past the client's read timeout, one bit flipped in an upload or a download) on the n-th
request of one kind (object payload, object metadata, commit document, ref document, listing),
runs a push or a pull through the proxy, then checks, with plain boto3 and xxhash rather than
coral-torch:

- the remote: no ref names a missing or damaged commit document, no intact commit document needs
  a missing or damaged object (metadata checksum, payload size and xxh3, delta bases);
- the local repository (pull): every commit it lists loads bit-exact, every ref it has is the
  source's, ``verify`` finds nothing, and no pack is left behind that the catalog does not know;
- then a clean re-run (no fault) must finish the job: the remote holds every ref of the source,
  every document and object intact (checked as above); the pulled repository equals the source.

Outcomes: ``absorbed`` (the operation succeeded and the result is complete and intact: the fault
was retried or repaired on the spot), ``refused`` (it raised a one-line coral-torch error, the
invariants held, and the clean re-run repaired everything), ``silently wrong`` (success claimed
with a wrong or incomplete result, an invariant broken, or a re-run that did not repair): every
trial asserts it is not the last. ``test_fault_summary`` writes the table of outcomes.

The matrix holds 51 push/pull trials; a session runs ``CORAL_S3_FAULT_TRIALS`` of them (default 24,
``all`` for every one), chosen by :func:`covering_order` so that any allowed count keeps every fault
kind (and repeat count) of every operation and every target of every operation at least once.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers

from s3_checks import remote_problems  # noqa: E402
from s3_proxy import Fault, FaultProxy  # noqa: E402
from s3_server import REGION, TEST_KEY, TEST_SECRET  # noqa: E402

from coral_torch import Repository  # noqa: E402
from coral_torch.errors import CoralError  # noqa: E402
from coral_torch.storage.s3_store import S3Config  # noqa: E402

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore::UserWarning")]

READ_TIMEOUT = 0.6
DELAY = 1.0  # past the read timeout
OUTCOMES: dict[str, Counter] = defaultdict(Counter)


def config(endpoint: str, bucket: str, prefix: str, **kw: Any) -> S3Config:
    opts: dict[str, Any] = dict(
        bucket=bucket, prefix=prefix, region=REGION, endpoint_url=endpoint, access_key=TEST_KEY,
        secret_key=TEST_SECRET, addressing_style="path", progress=False, max_attempts=2, connect_timeout=1,
        read_timeout=READ_TIMEOUT, max_concurrency=2,
    )
    opts.update(kw)
    return S3Config(**opts)


def random_bits(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**31), 2**31 - 1, (n,), dtype=torch.int32, generator=g).view(torch.float32)


def raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and raw(a) == raw(b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def local_problems(repo: Repository, source: "Source", complete: bool) -> list[str]:
    """What is wrong in a pulled repository: wrong data, foreign refs, damage, leftover packs;
    with ``complete``, anything of the source missing."""
    problems = []
    for c in repo.log():
        if c.id not in source.loads:
            problems.append(f"commit {c.id[:10]} is not the source's")
        elif not same(repo.load(c.id), source.loads[c.id]):
            problems.append(f"commit {c.id[:10]} loads other data")
        if c.id in source.meta and (c.run, c.epoch, c.step, c.metrics) != source.meta[c.id]:
            problems.append(f"commit {c.id[:10]}: run/epoch/step/metrics differ")
    for name, cid in repo.refs().items():
        if name.startswith("keep/") and cid in source.loads:
            continue
        if source.refs.get(name) != cid:
            problems.append(f"ref {name} -> {cid[:10]} is not the source's")
    report = repo.verify()
    if not report.ok:
        problems.append(f"verify: {report.damaged_objects or report.damaged_commits or report.missing_packs}")
    if report.orphan_files:
        problems.append(f"packs the catalog does not know: {report.orphan_files}")
    if complete:
        missing = {n: c for n, c in source.refs.items() if repo.refs().get(n) != c}
        if missing or len(repo.log()) != len(source.loads):
            problems.append(f"incomplete: refs {sorted(missing)} missing, {len(repo.log())} commits")
    return problems


# ------------------------------------------------------------------------------------ source
class Source:
    """The repository pushed in every trial: 3 commits of incompressible tensors with deltas."""

    def __init__(self, path: Path):
        self.path = path
        repo = Repository(path, workers=2)
        g = torch.Generator().manual_seed(3)
        sd = {f"layer{i}.weight": random_bits(8192, seed=100 + i) for i in range(2)}
        for step in range(3):
            for v in sd.values():
                idx = torch.randint(0, v.numel(), (300,), generator=g)
                v[idx] = torch.randn(300, generator=g)
            repo.commit({"state_dict": sd, "step": step, "epoch": step}, run="f", tags=[f"s{step}"],
                        metrics={"loss": 1.0 / (step + 1)})
        self.loads = {c.id: repo.load(c.id) for c in repo.log()}
        self.meta = {c.id: (c.run, c.epoch, c.step, c.metrics) for c in repo.log()}
        self.refs = repo.refs()
        repo.close()

    def open(self) -> Repository:
        return Repository(self.path, create=False, workers=2)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Source:
    return Source(tmp_path_factory.mktemp("faults") / ".coral")


@pytest.fixture(scope="module")
def fault_bucket(server) -> str:
    name = f"coral-faults-{uuid.uuid4().hex[:8]}"
    server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def pulled_prefix(server, fault_bucket, source) -> str:
    """The source, pushed once without faults: what the pull trials fetch."""
    A = source.open()
    A.push(config(server.endpoint, fault_bucket, "pullsrc"))
    A.close()
    return "pullsrc"


def raw_client(server):
    """A boto3 client that hands back stored bytes as they are (no response checksum validation:
    moto keeps the CRC32 the client sent with a body that was then damaged on the way)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=server.endpoint, region_name=REGION, aws_access_key_id=TEST_KEY,
        aws_secret_access_key=TEST_SECRET,
        config=Config(s3={"addressing_style": "path"}, response_checksum_validation="when_required"),
    )


def run(op: Callable[[], Any]) -> tuple[str, str]:
    """("ok", "") or ("refused", message) for an operation; any non-coral-torch error fails the test."""
    try:
        op()
        return "ok", ""
    except CoralError as exc:
        msg = str(exc)
        assert "\n" not in msg, f"not a one-line message: {msg!r}"
        return "refused", msg


# ----------------------------------------------------------------------------------- trials
KEY = r"/[^/?]+/[^/?]+/"  # /<bucket>/<prefix>/
PUSH_TARGETS = {
    "payload": (rf"^PUT {KEY}(weights|deltas)/", 3),
    "metadata": (rf"^PUT {KEY}metadata/", 2),
    "commit": (rf"^PUT {KEY}commits/", 1),
    "ref": (rf"^PUT {KEY}refs/", 2),
}
PULL_TARGETS = {
    "payload": (rf"^GET {KEY}(weights|deltas)/", 2),
    "weight-metadata": (rf"^GET {KEY}metadata/[0-9a-f]+\.json", 1),
    "delta-metadata": (rf"^GET {KEY}metadata/[0-9a-f]+\.delta\.json", 1),
    "commit": (rf"^GET {KEY}commits/", 1),
    "ref": (rf"^GET {KEY}refs/", 1),
}
LISTING = r"^GET /[^/?]+/?\?list-type=2"

PUSH_TRIALS = [(t, k, 1) for t in PUSH_TARGETS for k in ("cut_request", "cut_response", "delay", "corrupt_request")]
PUSH_TRIALS += [(t, "corrupt_request", 2) for t in PUSH_TARGETS]  # retries run out
PUSH_TRIALS += [(t, "cut_request", 2) for t in ("payload", "ref")]
PUSH_TRIALS += [("listing", k, 1) for k in ("cut_response", "corrupt_response")]
REPAIR_TARGETS = {  # what a push reads when it finds damaged documents on the remote
    "commit": (rf"^GET {KEY}commits/", 0),
    "ref": (rf"^GET {KEY}refs/", 0),
    "metadata": (rf"^GET {KEY}metadata/", 1),
}
REPAIR_TRIALS = [(t, k, 1) for t in REPAIR_TARGETS for k in ("cut_response", "corrupt_response")]
PULL_TRIALS = [(t, k, 1) for t in PULL_TARGETS for k in ("cut_response", "delay", "corrupt_response")
               if (t, k) != ("weight-metadata", "delay")]
PULL_TRIALS += [(t, "corrupt_response", 2) for t in ("payload", "delta-metadata", "commit", "ref")]
PULL_TRIALS += [("payload", "cut_request", 1), ("listing", "cut_response", 1)]
PULL_TRIALS += [("listing", "corrupt_response", 1)]
ALL_TRIALS = [("push", *t) for t in PUSH_TRIALS] + [("repair", *t) for t in REPAIR_TRIALS] + \
             [("pull", *t) for t in PULL_TRIALS]


def covering_order(trials: list[tuple[str, str, str, int]]) -> tuple[list[tuple[str, str, str, int]], int]:
    """``trials`` ((operation, target, kind, times)) reordered so that every prefix as long as the
    returned cover size holds every (operation, kind, times) and every (operation, target) at least
    once: first such a cover (greedy, ties in the listed order), then the rest, round robin over the
    operations, each time the trial whose kind and target have run least so far."""
    def strata(t: tuple[str, str, str, int]) -> set[tuple]:
        op, target, kind, times = t
        return {("kind", op, kind, times), ("target", op, target)}

    left, order = list(trials), []
    need = set().union(*(strata(t) for t in trials))
    while need:
        best = max(left, key=lambda t: len(strata(t) & need))
        order.append(best)
        left.remove(best)
        need -= strata(best)
    cover = len(order)
    used = Counter(st for t in order for st in strata(t))
    ops = list(dict.fromkeys(t[0] for t in trials))
    while left:
        for op in ops:
            mine = [t for t in left if t[0] == op]
            if mine:
                best = min(mine, key=lambda t: sum(used[st] for st in strata(t)))
                order.append(best)
                left.remove(best)
                used.update(strata(best))
    return order, cover


def chosen_trials() -> list[tuple[str, str, str, int]]:
    """The trials this session runs, in the listed order: CORAL_S3_FAULT_TRIALS of them (``all``: every
    one; default 24), the first of :func:`covering_order`, so no fault kind of any operation (nor any
    target) is dropped by a smaller count. The multipart trials always run."""
    order, cover = covering_order(ALL_TRIALS)
    raw = os.environ.get("CORAL_S3_FAULT_TRIALS", "24").strip().lower()
    if raw == "all":
        return list(ALL_TRIALS)
    if not raw.isdigit() or int(raw) < cover:
        raise pytest.UsageError(f"CORAL_S3_FAULT_TRIALS={raw!r}: 'all' or a whole number >= {cover} (the fewest "
                                f"trials that make every fault kind of every operation and hit every target)")
    keep = set(order[: int(raw)])
    return [t for t in ALL_TRIALS if t in keep]


CHOSEN = chosen_trials()
PUSH_RUN = [t[1:] for t in CHOSEN if t[0] == "push"]
REPAIR_RUN = [t[1:] for t in CHOSEN if t[0] == "repair"]
PULL_RUN = [t[1:] for t in CHOSEN if t[0] == "pull"]


def test_every_allowed_trial_count_keeps_every_fault_kind_and_target():
    """No S3 here: whatever CORAL_S3_FAULT_TRIALS allows, the chosen trials make every fault kind
    (and repeat count) of every operation, and hit every target of every operation."""
    order, cover = covering_order(ALL_TRIALS)
    assert sorted(order) == sorted(ALL_TRIALS) and cover <= 24
    kinds = {(op, k, n) for op, _, k, n in ALL_TRIALS}
    targets = {(op, t) for op, t, _, _ in ALL_TRIALS}
    for count in range(cover, len(ALL_TRIALS) + 1):
        chosen = order[:count]
        assert {(op, k, n) for op, _, k, n in chosen} == kinds, count
        assert {(op, t) for op, t, _, _ in chosen} == targets, count
    assert set(CHOSEN) <= set(ALL_TRIALS) and len(set(CHOSEN)) == len(CHOSEN)


def make_fault(targets: dict, target: str, kind: str, times: int) -> Fault:
    match, nth = targets[target] if target != "listing" else (LISTING, 1)
    return Fault(kind, match, nth=nth, times=times, at=0.6, delay=DELAY)


@pytest.mark.slow
@pytest.mark.parametrize("target,kind,times", PUSH_RUN, ids=[f"{t}-{k}-x{n}" for t, k, n in PUSH_RUN])
def test_push_fault(server, fault_bucket, source, target, kind, times):
    prefix = f"push-{target}-{kind}-{times}"
    client = raw_client(server)
    A = source.open()
    try:
        with FaultProxy(server.port, max_requests=400, max_seconds=60) as proxy:
            proxy.arm(make_fault(PUSH_TARGETS, target, kind, times))
            outcome, msg = run(lambda: A.push(config(proxy.endpoint, fault_bucket, prefix)))
            assert proxy.fired, f"the fault never fired: {proxy.requests}"
        problems, refs, damaged = remote_problems(client, fault_bucket, prefix + "/")
        assert problems == [], (outcome, msg, problems)  # the invariant holds, whatever happened
        if outcome == "ok":
            assert refs == source.refs and damaged == 0, f"silently wrong: push claimed success ({refs}, {damaged})"
        # a clean re-run repairs everything
        A.push(config(server.endpoint, fault_bucket, prefix, read_timeout=15))
        problems, refs, damaged = remote_problems(client, fault_bucket, prefix + "/")
        assert problems == [] and refs == source.refs and damaged == 0, ("not repaired", problems, refs, damaged)
    except AssertionError:
        OUTCOMES[f"push {kind}"]["silently wrong"] += 1
        raise
    finally:
        A.close()
    OUTCOMES[f"push {kind}"]["absorbed" if outcome == "ok" else "refused"] += 1


@pytest.mark.slow
@pytest.mark.parametrize("target,kind,times", REPAIR_RUN, ids=[f"{t}-{k}" for t, k, _ in REPAIR_RUN])
def test_repairing_push_fault(server, fault_bucket, source, target, kind, times):
    """A push that finds a damaged commit document and a damaged ref (it reads them, rewrites them,
    and checks every object of that commit), with a fault on those reads."""
    prefix = f"repair-{target}-{kind}"
    client = raw_client(server)
    A = source.open()
    try:
        A.push(config(server.endpoint, fault_bucket, prefix, read_timeout=15))
        head = A.resolve("s2")
        for key in (f"commits/{head}.json", "refs/tags/s1.json"):
            body = bytearray(client.get_object(Bucket=fault_bucket, Key=f"{prefix}/{key}")["Body"].read())
            body[len(body) // 2] ^= 0x01
            client.put_object(Bucket=fault_bucket, Key=f"{prefix}/{key}", Body=bytes(body))
        with FaultProxy(server.port, max_requests=400, max_seconds=60) as proxy:
            proxy.arm(make_fault(REPAIR_TARGETS, target, kind, times))
            outcome, msg = run(lambda: A.push(config(proxy.endpoint, fault_bucket, prefix)))
            assert proxy.fired, f"the fault never fired: {proxy.requests}"
        problems, refs, damaged = remote_problems(client, fault_bucket, prefix + "/")
        assert problems == [], (outcome, msg, problems)
        if outcome == "ok":
            assert refs == source.refs and damaged == 0, f"silently wrong: push claimed success ({refs}, {damaged})"
        A.push(config(server.endpoint, fault_bucket, prefix, read_timeout=15))
        problems, refs, damaged = remote_problems(client, fault_bucket, prefix + "/")
        assert problems == [] and refs == source.refs and damaged == 0, ("not repaired", problems, refs, damaged)
    except AssertionError:
        OUTCOMES[f"push (repairing) {kind}"]["silently wrong"] += 1
        raise
    finally:
        A.close()
    OUTCOMES[f"push (repairing) {kind}"]["absorbed" if outcome == "ok" else "refused"] += 1


@pytest.mark.slow
@pytest.mark.parametrize("target,kind,times", PULL_RUN, ids=[f"{t}-{k}-x{n}" for t, k, n in PULL_RUN])
def test_pull_fault(server, fault_bucket, source, pulled_prefix, tmp_path, target, kind, times):
    B = Repository(tmp_path / "b", workers=2)
    try:
        with FaultProxy(server.port, max_requests=400, max_seconds=60) as proxy:
            proxy.arm(make_fault(PULL_TARGETS, target, kind, times))
            outcome, msg = run(lambda: B.pull(config(proxy.endpoint, fault_bucket, pulled_prefix)))
            assert proxy.fired, f"the fault never fired: {proxy.requests}"
        assert local_problems(B, source, complete=outcome == "ok") == [], (outcome, msg)
        if outcome == "refused":
            assert B.log() == [] and not [r for r in B.refs() if not r.startswith("keep/")], msg
        again = B.pull(config(server.endpoint, fault_bucket, pulled_prefix, read_timeout=15))
        assert local_problems(B, source, complete=True) == []
        if outcome == "ok":
            assert again["objects_downloaded"] == 0 and again["commits_downloaded"] == 0
    except AssertionError:
        OUTCOMES[f"pull {kind}"]["silently wrong"] += 1
        raise
    finally:
        B.close()
    OUTCOMES[f"pull {kind}"]["absorbed" if outcome == "ok" else "refused"] += 1


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["corrupt_request", "cut_request"])
def test_multipart_upload_fault(server, fault_bucket, tmp_path, kind):
    """A damaged or cut part of a multipart upload: the whole object is verified (ETag of the parts,
    read back) before its metadata is written."""
    A = Repository(tmp_path / "a", workers=2)
    big = random_bits(1_600_000, seed=9)  # 6.4 MB: two 5 MiB parts
    cid = A.commit({"w": big}, run="big").commit_id
    prefix = f"multipart-{kind}"
    mp = dict(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
    with FaultProxy(server.port, max_requests=200, max_seconds=60) as proxy:
        proxy.arm(Fault(kind, r"^PUT [^?]+\?(.*&)?partNumber=1(&|$)", times=1, at=0.5))
        outcome, msg = run(lambda: A.push(config(proxy.endpoint, fault_bucket, prefix, read_timeout=15, **mp)))
        assert proxy.fired
    problems, refs, damaged = remote_problems(raw_client(server), fault_bucket, prefix + "/")
    assert problems == []
    if outcome == "ok":
        assert refs == A.refs() and damaged == 0
    A.push(config(server.endpoint, fault_bucket, prefix, read_timeout=15, **mp))
    B = Repository(tmp_path / "b", workers=2)
    B.pull(config(server.endpoint, fault_bucket, prefix, read_timeout=15, **mp))
    assert raw(B.load(cid)["w"]) == raw(big)
    OUTCOMES[f"push {kind} (multipart)"]["absorbed" if outcome == "ok" else "refused"] += 1


def test_fault_summary(request):
    """Writes the outcome table of the trials that ran in this session (nothing to check when none did)."""
    if not OUTCOMES:
        pytest.skip("no fault trials ran in this session")
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    lines = [f"fault trials: kind -> outcomes ({len(CHOSEN)} of the {len(ALL_TRIALS)} push/pull trials chosen, "
             f"CORAL_S3_FAULT_TRIALS=all for every one; 2 multipart)"]
    for kind in sorted(OUTCOMES):
        c = OUTCOMES[kind]
        lines.append(f"  {kind:34s} trials {sum(c.values()):3d}: absorbed {c['absorbed']:3d}, refused "
                     f"{c['refused']:3d}, silently wrong {c['silently wrong']}")
    if tr is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            tr.write_line("")
            for ln in lines:
                tr.write_line(ln)
    assert sum(c["silently wrong"] for c in OUTCOMES.values()) == 0, lines
