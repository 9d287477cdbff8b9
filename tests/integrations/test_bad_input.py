"""Bad input to `coral_torch.load` / `save` gets one clear `CoralError` line, and nothing is changed.

Every case the first-hour report named, plus a table-driven sweep of malformed pointer files.
"""

from __future__ import annotations

import io
import json
import os
import pickle

import pytest
import torch

import coral_torch
from coral_torch.errors import (
    CheckpointNotFoundError,
    CoralError,
    InvalidRefNameError,
    MalformedPointerError,
    NotACheckpointError,
    NotARepositoryError,
    UnsafeCheckpointError,
)


def one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg.strip(), msg
    assert "\x1b[" not in msg, msg  # no terminal colour codes
    assert len(msg) < 400, msg
    return msg


@pytest.fixture
def saved(tmp_path):
    sd = {"w": torch.randn(8, 8), "step": 3}
    path = tmp_path / "ck" / "last.pt"
    cid = coral_torch.save(sd, path)
    return sd, path, cid


def good_pointer(cid: str) -> dict:
    return {"coral_torch_pointer": 1, "commit": cid, "repo": ".coral"}


# (name, file content as a function of the good pointer's commit id, expected error, message part)
MALFORMED = [
    ("empty", lambda cid: b"", NotACheckpointError, "empty"),
    ("whitespace", lambda cid: b"   \n", NotACheckpointError, "neither"),
    ("truncated", lambda cid: json.dumps(good_pointer(cid)).encode()[:30], MalformedPointerError, "damaged"),
    ("not json", lambda cid: b"{coral_torch_pointer: 1", MalformedPointerError, "damaged"),
    ("foreign json", lambda cid: b'{"model": "bert"}', MalformedPointerError, "JSON file"),
    ("json list", lambda cid: b"[1, 2, 3]", NotACheckpointError, "neither"),
    ("no commit", lambda cid: json.dumps({"coral_torch_pointer": 1, "repo": ".coral"}).encode(),
     MalformedPointerError, "commit"),
    ("commit null", lambda cid: json.dumps(dict(good_pointer(cid), commit=None)).encode(),
     MalformedPointerError, "commit"),
    ("commit short", lambda cid: json.dumps(dict(good_pointer(cid), commit=cid[:10])).encode(),
     MalformedPointerError, "commit"),
    ("commit not hex", lambda cid: json.dumps(dict(good_pointer(cid), commit="z" * 32)).encode(),
     MalformedPointerError, "commit"),
    ("commit int", lambda cid: json.dumps(dict(good_pointer(cid), commit=12)).encode(), MalformedPointerError, "commit"),
    ("repo null", lambda cid: json.dumps(dict(good_pointer(cid), repo=None)).encode(), MalformedPointerError, "repo"),
    ("repo empty", lambda cid: json.dumps(dict(good_pointer(cid), repo="")).encode(), MalformedPointerError, "repo"),
    ("repo list", lambda cid: json.dumps(dict(good_pointer(cid), repo=["a"])).encode(), MalformedPointerError, "repo"),
    ("repo missing", lambda cid: json.dumps(dict(good_pointer(cid), repo="nowhere/.coral")).encode(),
     NotARepositoryError, "does not exist"),
    ("version 0", lambda cid: json.dumps(dict(good_pointer(cid), coral_torch_pointer=0)).encode(),
     MalformedPointerError, "version"),
    ("version str", lambda cid: json.dumps(dict(good_pointer(cid), coral_torch_pointer="1")).encode(),
     MalformedPointerError, "version"),
    ("newer version", lambda cid: json.dumps(dict(good_pointer(cid), coral_torch_pointer=99)).encode(),
     MalformedPointerError, "newer coral-torch"),
    ("unknown commit", lambda cid: json.dumps(dict(good_pointer(cid), commit="f" * 32)).encode(),
     CoralError, "no commit matches"),
    ("huge", lambda cid: b"{" + b" " * 10000 + b"}", MalformedPointerError, "not a pointer"),
    ("binary junk", lambda cid: bytes(range(256)) * 4, NotACheckpointError, "neither"),
    ("text", lambda cid: b"root:x:0:0:root:/root:/bin/bash\n", NotACheckpointError, "neither"),
    ("zip junk", lambda cid: b"PK\x03\x04" + b"\0" * 100, NotACheckpointError, "neither"),
]


@pytest.mark.parametrize("name, content, error, part", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_pointer_files(tmp_path, saved, name, content, error, part):
    _, path, cid = saved
    bad = path.parent / f"bad-{name.replace(' ', '_')}.pt"
    bad.write_bytes(content(cid))
    catalog = path.parent / ".coral" / "catalog.sqlite"
    before = catalog.read_bytes()
    with pytest.raises(error) as info:
        coral_torch.load(bad)
    msg = one_line(info.value)
    assert part in msg, msg
    assert isinstance(info.value, CoralError)
    # the same bytes through a file object say the same
    with pytest.raises(CoralError):
        with open(bad, "rb") as fh:
            coral_torch.load(fh)
    assert catalog.read_bytes() == before  # nothing changed
    # and the good checkpoint next to it still loads
    assert torch.equal(coral_torch.load(path)["w"], saved[0]["w"])


def test_missing_file_says_so_and_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CORAL_REPO", raising=False)
    for arg in ("missing.pt", tmp_path / "missing.pt", "sub/dir/missing.ckpt"):
        with pytest.raises(CheckpointNotFoundError) as info:
            coral_torch.load(arg)
        assert isinstance(info.value, FileNotFoundError)  # what torch.load raises
        assert "missing" in one_line(info.value)
    with pytest.raises(CheckpointNotFoundError, match="neither a file nor a ref"):
        coral_torch.load("abcd1234")
    assert not (tmp_path / ".coral").exists()


def test_directory_and_system_files(tmp_path):
    with pytest.raises(NotACheckpointError, match="directory"):
        coral_torch.load(tmp_path)
    if os.path.exists("/etc/passwd"):
        with pytest.raises(NotACheckpointError) as info:
            coral_torch.load("/etc/passwd")
        one_line(info.value)


class Custom:
    pass


def test_unsafe_plain_torch_file_is_one_line_and_an_unpickling_error(tmp_path):
    p = tmp_path / "pickled.pt"
    torch.save({"obj": Custom()}, p)
    with pytest.raises(UnsafeCheckpointError) as info:
        coral_torch.load(p)
    assert isinstance(info.value, pickle.UnpicklingError)
    assert "weights_only=False" in one_line(info.value)


class _Pickled:
    def __init__(self, v):
        self.v = v


def test_unsafe_value_in_a_commit_is_one_line(tmp_path):
    path = tmp_path / "c.pt"
    coral_torch.save({"w": torch.zeros(2), "odd": _Pickled(3)}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        coral_torch.load(path)
    assert "weights_only=False" in one_line(info.value)
    assert coral_torch.load(path, weights_only=False)["odd"].v == 3


def test_reserved_and_malformed_ref_names_are_refused(tmp_path, saved):
    _, path, cid = saved
    repo = coral_torch.open_repository(path.parent / ".coral")
    for name in ("latest", "best", "HEAD", "a/b", "..", "x\ny", "x\0", "", " x"):
        with pytest.raises(InvalidRefNameError) as info:
            repo.tag(name, cid)
        one_line(info.value)
    for ref in ("tags/../../x", "tags/a\nb", "/abs", "tags//x"):
        with pytest.raises(InvalidRefNameError):
            repo.set_ref(ref, cid)
    with pytest.raises(InvalidRefNameError):
        coral_torch.save({"w": torch.zeros(1)}, tmp_path / "x.pt", run="../escape")
    assert not repo.refs("tags/")


def test_bad_arguments(tmp_path):
    with pytest.raises(CoralError, match="f must be"):
        coral_torch.save({"w": torch.zeros(1)}, 42)
    with pytest.raises(CoralError, match="directory"):
        coral_torch.save({"w": torch.zeros(1)}, tmp_path)
    with pytest.raises(CoralError, match="pickle_protocol"):
        coral_torch.save({"w": torch.zeros(1)}, tmp_path / "p.pt", pickle_module=pickle, pickle_protocol="high")
    with pytest.raises(CoralError, match="load takes"):
        coral_torch.load(42)
    with pytest.raises(NotACheckpointError, match="text mode"):
        (tmp_path / "t.pt").write_text("hello")
        with open(tmp_path / "t.pt") as fh:
            coral_torch.load(fh)
    with pytest.raises(NotACheckpointError, match="empty"):
        coral_torch.load(io.BytesIO())


_SAVE_INTO = r"""
import io, json, sys, contextlib
import torch
import coral_torch
from coral_torch.cli import main
from coral_torch.errors import ReadOnlyRepositoryError
ck, plain = sys.argv[1], sys.argv[2]
out = {}
try:
    coral_torch.save({"w": torch.ones(300)}, f"{ck}/new.pt")
    out["save"] = "saved?!"
except Exception as exc:
    out["save"] = [type(exc).__name__, isinstance(exc, ReadOnlyRepositoryError), str(exc)]
err = io.StringIO()
with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    out["cli"] = [main(["--repo", f"{ck}/.coral", "import", plain]), err.getvalue()]
print(json.dumps(out))
"""


def _files(path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != "lock"}


@pytest.mark.parametrize("how", ["no write permission", "read-only mount"])
def test_save_into_a_read_only_repository_is_one_clean_line(tmp_path, saved, how):
    """A save into a repository that cannot be written once showed HDF5's text ("unable to
    synchronously create file ... flags = 15, o_flags = c2"). Now: ReadOnlyRepositoryError, one line
    saying it is read-only and what to do, through the API and the CLI; nothing changes. Tests run as
    root, who ignores permission bits: the save runs in a user namespace (root without capabilities,
    the repository owned by nobody), or on a read-only bind mount."""
    import shutil
    import subprocess
    import sys

    _, path, _ = saved
    ck = path.parent
    coral_torch.api.close_repositories()
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.randn(300)}, plain)
    before = _files(ck / ".coral")
    prefix: list[str] = []
    target = ck
    if how == "no write permission":
        if shutil.which("unshare") is None or subprocess.run(["unshare", "--user", "true"]).returncode != 0:
            pytest.skip("user namespaces (unshare --user) are not available here")
        for p in [ck, *ck.rglob("*")]:
            os.chown(p, 65534, 65534)
            os.chmod(p, 0o555 if p.is_dir() else 0o444)
        prefix = ["unshare", "--user"]
    else:
        if os.geteuid() != 0:
            pytest.skip("a read-only bind mount needs root")
        target = tmp_path / "ro"
        target.mkdir()
        if subprocess.run(["mount", "--bind", str(ck), str(target)], capture_output=True).returncode != 0:
            pytest.skip("mounting is not permitted here")
    try:
        if how == "read-only mount":
            subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
        res = subprocess.run([*prefix, sys.executable, "-c", _SAVE_INTO, str(target), str(plain)],
                             capture_output=True, text=True, timeout=300, env=dict(os.environ, HOME="/tmp"))
    finally:
        if how == "read-only mount":
            subprocess.run(["umount", str(target)], check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    kind, is_read_only, msg = out["save"]
    assert kind == "ReadOnlyRepositoryError" and is_read_only, out
    code, err = out["cli"]
    assert code == 1 and err.count("\n") == 1 and err.startswith("coral-torch: error: "), err
    for text in (msg, err.strip()):
        one_line(Exception(text))
        assert "is read-only" in text and "writable" in text, text
        for hdf5_noise in ("flags", "errno =", "synchronously", "unable to", "Unable to"):
            assert hdf5_noise not in text, text
    assert _files(ck / ".coral") == before  # nothing written
