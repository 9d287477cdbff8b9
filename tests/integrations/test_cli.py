"""The `coral-torch` command line: every command on a real repository, bad input to each, and the
import/export round trip of Lightning .ckpt files."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from coral_torch import Repository
from coral_torch.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers
from _lightning_models import TRAINER_DEFAULTS, TinyModel, tiny_loaders  # noqa: E402


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def snapshot(path: Path) -> dict[str, object]:
    """Every pack file with its size and mtime, plus the catalog's full content: proof that
    nothing changed (the WAL makes the catalog file's own mtime meaningless)."""
    files: dict[str, object] = {
        str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file() and not p.name.endswith(("-wal", "-shm")) and p.name not in ("lock", "catalog.sqlite")
    }
    con = sqlite3.connect(path / "catalog.sqlite")
    files["catalog"] = "\n".join(con.iterdump())
    con.close()
    return files


@pytest.fixture(scope="module")
def ckpt_files(tmp_path_factory) -> list[Path]:
    """Five real Lightning .ckpt files, one per epoch."""
    root = tmp_path_factory.mktemp("lightning")
    pl.seed_everything(0)
    train, val = tiny_loaders()
    mc = ModelCheckpoint(dirpath=root / "ckpts", save_top_k=-1, filename="{epoch}")
    trainer = pl.Trainer(max_epochs=5, callbacks=[mc], default_root_dir=root, **TRAINER_DEFAULTS)
    trainer.fit(TinyModel(), train, val)
    files = sorted((root / "ckpts").glob("epoch=*.ckpt"))
    assert len(files) == 5
    return files


@pytest.fixture()
def repo_path(tmp_path) -> Path:
    path = tmp_path / ".coral"
    repo = Repository(path)
    torch.manual_seed(0)
    sd = {"w": torch.randn(64, 64), "b": torch.zeros(64), "frozen": torch.ones(128, 8)}
    for epoch in range(3):
        sd = {**sd, "w": sd["w"] + 0.01 * torch.randn(64, 64), "b": sd["b"] + 1}
        repo.commit({"epoch": epoch, "state_dict": dict(sd)}, run="exp", metrics={"val_loss": 1.0 / (epoch + 1)},
                    monitor="val_loss", tags=[f"e{epoch}"])
    repo.close()
    return path


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "coral-torch" in capsys.readouterr().out
    for cmd in ("log", "show", "diff", "export", "import", "tag", "gc", "verify", "stats", "push", "pull"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: coral-torch" in capsys.readouterr().out


def test_log_show_diff_stats(capsys, repo_path):
    code, out, _ = run(capsys, "--repo", str(repo_path), "log")
    assert code == 0 and out.count("exp") >= 3 and "val_loss=" in out
    code, out, _ = run(capsys, "--repo", str(repo_path), "log", "--json")
    rows = json.loads(out)
    assert [r["epoch"] for r in rows] == [2, 1, 0] and all(r["stored_bytes"] <= r["logical_bytes"] for r in rows)
    code, out, _ = run(capsys, "--repo", str(repo_path), "show", "e1", "--json")
    how = {t["name"]: t["stored"] for t in json.loads(out)["tensors"]}
    assert how["state_dict/frozen"] == "same as parent" and how["state_dict/w"] in ("delta", "new")
    code, out, _ = run(capsys, "--repo", str(repo_path), "show", "latest")
    assert code == 0 and "state_dict/w" in out
    code, out, _ = run(capsys, "--repo", str(repo_path), "diff", "e0", "e2", "--json")
    status = {t["tensor"]: t for t in json.loads(out)["tensors"]}
    assert status["state_dict/frozen"]["status"] == "unchanged"
    assert status["state_dict/b"]["changed_pct"] == 100.0
    assert 0 < status["state_dict/w"]["rel_l2"] < 0.1
    code, out, _ = run(capsys, "--repo", str(repo_path), "stats", "--json")
    assert json.loads(out)["commits"] == 3


def test_stats_plot(capsys, repo_path, tmp_path):
    pytest.importorskip("matplotlib")
    out_png = tmp_path / "stats.png"
    code, _, _ = run(capsys, "--repo", str(repo_path), "stats", "--plot", str(out_png))
    assert code == 0 and out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tag_gc_verify(capsys, repo_path):
    code, out, _ = run(capsys, "--repo", str(repo_path), "tag", "release", "e1")
    assert code == 0
    code, out, _ = run(capsys, "--repo", str(repo_path), "tag")
    assert "release" in out
    repo = Repository(repo_path, create=False)
    first = repo.resolve("e0")
    for name in [n for n, c in repo.refs().items() if c == first]:
        repo.delete_ref(name)
    assert repo.catalog.get_commit(first) is None  # its last ref went: removed with it
    # a commit no ref ever named (as an interrupted run can leave) is what gc finds
    stray = repo.commit({"w": torch.randn(64, 64)}, run="stray", keep=False, head=False).commit_id
    before = snapshot(repo_path)
    code, out, _ = run(capsys, "--repo", str(repo_path), "gc")  # dry run
    assert code == 0 and "would remove 1 commit" in out
    assert snapshot(repo_path) == before
    code, out, _ = run(capsys, "--repo", str(repo_path), "gc", "--yes")
    assert code == 0 and "removed 1 commit" in out
    assert repo.catalog.get_commit(stray) is None
    code, out, _ = run(capsys, "--repo", str(repo_path), "verify")
    assert code == 0 and out.strip().endswith("ok")


def test_verify_reports_damage(capsys, repo_path):
    pack = sorted((repo_path / "packs").glob("*.h5"))[0]
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pack.write_bytes(bytes(data))
    code, out, _ = run(capsys, "--repo", str(repo_path), "verify")
    assert code == 1 and "DAMAGED" in out


def test_import_export_lightning_ckpts_round_trip(capsys, ckpt_files, tmp_path):
    repo = tmp_path / "imported"
    code, out, err = run(capsys, "--repo", str(repo), "import", *map(str, ckpt_files))
    assert code == 0, err
    assert "imported 5 file(s)" in out and "->" in out
    r = Repository(repo, create=False)
    commits = list(reversed(r.log()))
    assert len(commits) == 5
    for src, commit in zip(ckpt_files, commits):
        out_file = tmp_path / f"{src.stem}.ckpt"
        code, _, err = run(capsys, "--repo", str(repo), "export", commit.id[:12], str(out_file))
        assert code == 0, err
        original = torch.load(src, weights_only=False)
        exported = torch.load(out_file, weights_only=False)
        assert_equal(original, exported)


def assert_equal(a, b, path="") -> None:
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{path}/{i}")
    else:
        assert a == b, path


def test_export_safetensors(capsys, repo_path, tmp_path):
    from safetensors.torch import load_file

    out_file = tmp_path / "model.safetensors"
    code, _, err = run(capsys, "--repo", str(repo_path), "export", "e2", str(out_file))
    assert code == 0, err
    loaded = load_file(out_file)
    want = Repository(repo_path, create=False).load("e2")["state_dict"]
    assert set(loaded) == set(want) and all(torch.equal(loaded[k], want[k]) for k in want)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_export_file_modes_follow_the_umask(capsys, repo_path, tmp_path, umask):
    """safetensors writes through a 0600 temporary file; an export gets the mode any new file gets
    (0666 less the umask), the same for .safetensors as for .pt."""
    old = os.umask(umask)
    try:
        modes = {}
        for name in ("model.pt", "model.safetensors"):
            code, _, err = run(capsys, "--repo", str(repo_path), "export", "e2", str(tmp_path / name))
            assert code == 0, err
            modes[name] = stat.S_IMODE((tmp_path / name).stat().st_mode)
    finally:
        os.umask(old)
    assert modes == {"model.pt": 0o666 & ~umask, "model.safetensors": 0o666 & ~umask}, {k: oct(v) for k, v in modes.items()}


@pytest.mark.parametrize("cmd", [["log"], ["log", "--json"], ["show", "latest"], ["show", "latest", "--json"]])
def test_stdout_closed_early_exits_quietly(repo_path, cmd):
    """`coral-torch show latest | head` once ended in a BrokenPipeError line. The reader of stdout is
    gone before the command writes (a pipe whose read end is already closed: what `| head` does to a
    longer output, without the race): nothing on stderr, exit 141 (128 + SIGPIPE, as git's)."""
    exe = Path(sys.executable).parent / "coral-torch"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "coral_torch.cli"]
    r, w = os.pipe()
    os.close(r)
    try:
        res = subprocess.run([*argv, "--repo", str(repo_path), *cmd], stdout=w, stderr=subprocess.PIPE,
                             text=True, timeout=120)
    finally:
        os.close(w)
    assert res.stderr == "" and res.returncode == 141, (res.returncode, res.stderr)


def _ambiguous_prefix(repo_path: Path) -> str:
    """Add a commit row whose id shares a 6-char prefix with a real one (ids are hashes, so a
    real collision at 4+ chars needs thousands of commits)."""
    con = sqlite3.connect(repo_path / "catalog.sqlite")
    cid, manifest = con.execute("SELECT id, manifest FROM commits LIMIT 1").fetchone()
    twin = cid[:6] + ("0" if cid[6] != "0" else "1") + cid[7:]
    con.execute("INSERT INTO commits(id, parent, run, time, manifest, logical_bytes, new_bytes) "
                "VALUES (?, NULL, 'x', 0, ?, 0, 0)", (twin, manifest))
    con.commit()
    con.close()
    return cid[:6]


@pytest.mark.parametrize("argv", [
    ["show", "nosuchref"],
    ["show", "AMBIG"],
    ["diff", "e0", "nosuchref"],
    ["export", "nosuchref", "OUT/x.pt"],
    ["export", "e0", "OUT/x.unknown"],
    ["tag", "t", "nosuchref"],
    ["tag", "--delete", "nosuchtag"],
    ["tag", "bad/name", "e0"],
    ["import", "MISSING.pt"],
    ["import", "TEXT.pt"],
    ["import", "NOTENSORS.pt"],
    ["import", "DIR"],
    ["push", "not-a-url"],
    ["pull", "http://x/y"],
])
def test_bad_input_is_one_line_error_and_changes_nothing(capsys, repo_path, tmp_path, argv):
    prefix = _ambiguous_prefix(repo_path)
    (tmp_path / "TEXT.pt").write_text("this is not a checkpoint\n")
    torch.save({"a": 1, "b": [2, 3]}, tmp_path / "NOTENSORS.pt")
    (tmp_path / "DIR").mkdir()
    subst = {"AMBIG": prefix, "MISSING.pt": str(tmp_path / "missing.pt"), "TEXT.pt": str(tmp_path / "TEXT.pt"),
             "NOTENSORS.pt": str(tmp_path / "NOTENSORS.pt"), "DIR": str(tmp_path / "DIR")}
    args = [subst.get(a, a.replace("OUT", str(tmp_path / "out"))) for a in argv]
    before = snapshot(repo_path)
    code, out, err = run(capsys, "--repo", str(repo_path), *args)
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("coral-torch: error:"), err
    assert "Traceback" not in err
    assert snapshot(repo_path) == before
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    if argv[1:] == ["AMBIG"]:
        assert "ambiguous" in err


@pytest.mark.parametrize("cmd", [["log"], ["show", "latest"], ["verify"], ["gc"], ["stats"], ["tag"]])
def test_not_a_repository(capsys, tmp_path, cmd):
    code, _, err = run(capsys, "--repo", str(tmp_path / "nope"), *cmd)
    assert code == 1 and "not a coral-torch repository" in err
    assert not (tmp_path / "nope").exists()


def test_console_script_runs_as_a_subprocess(repo_path):
    exe = Path(sys.executable).parent / "coral-torch"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "coral_torch.cli"]
    res = subprocess.run(cmd + ["--repo", str(repo_path), "log"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "exp" in res.stdout
    res = subprocess.run(cmd + ["--repo", str(repo_path), "show", "zzzz"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr


README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize("argv, code, says", [
    (["export", "best", "/nonexistent/dir/x.pt"], 1, "directory /nonexistent/dir does not exist"),
    (["export", "e0", "TMP"], 1, "is a directory"),
    (["import", str(README)], 1, "is not a torch checkpoint file"),
    (["--repo", "missing", "log"], 1, "not a coral-torch repository"),
    (["show", "nosuchref"], 1, "no commit matches 'nosuchref'"),
    (["tag", "latest", "HASH"], 1, "'latest' is reserved"),
    (["tag", "best", "HASH"], 1, "'best' is reserved"),
    (["tag", "HEAD", "HASH"], 1, "'HEAD' is reserved"),
    (["nosuchcommand"], 2, "invalid choice: 'nosuchcommand'"),
    (["log", "-n", "many"], 2, "invalid int value: 'many'"),
    (["show"], 2, "the following arguments are required: ref"),
])
def test_each_bad_input_gets_one_clear_line(capsys, monkeypatch, repo_path, tmp_path, argv, code, says):
    monkeypatch.chdir(tmp_path)  # a relative --repo resolves here
    cid = Repository(repo_path, create=False).resolve("e0")
    args = [{"HASH": cid, "TMP": str(tmp_path)}.get(a, a) for a in argv]
    if args[0] != "--repo":
        args = ["--repo", str(repo_path), *args]
    before = snapshot(repo_path)
    try:
        got = main(args)
    except SystemExit as e:  # argparse: bad usage
        got = e.code
    out, err = capsys.readouterr()
    assert got == code, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("coral-torch: error: "), err
    assert says in lines[0] and "Traceback" not in err and out == ""
    assert snapshot(repo_path) == before
    assert not (tmp_path / "missing").exists()
    if code == 1:  # --debug shows the real exception (and its traceback) instead
        with pytest.raises(Exception):
            main(["--debug", *args])


def test_missing_repository_says_how_to_point_at_or_make_one(capsys, tmp_path):
    code, _, err = run(capsys, "--repo", str(tmp_path / "nope"), "log")
    assert code == 1 and "--repo" in err and "$CORAL_REPO" in err and "coral-torch import" in err


def test_unexpected_exception_is_one_line_with_its_type(capsys, monkeypatch, repo_path):
    def boom(self, run=None):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(Repository, "log", boom)
    code, out, err = run(capsys, "--repo", str(repo_path), "log")
    assert code == 1 and out == ""
    assert err.splitlines() == ["coral-torch: error: RuntimeError: disk on fire (run with --debug for the traceback)"]
    with pytest.raises(RuntimeError, match="disk on fire"):
        main(["--repo", str(repo_path), "--debug", "log"])


def test_diff_decodes_only_tensors_that_differ(capsys, monkeypatch, repo_path):
    from coral_torch import inspect

    seen: list[list[str]] = []
    real = inspect.tensors_of

    def spy(repo, cid, names=None):
        seen.append(sorted(names) if names is not None else None)
        return real(repo, cid, names=names)

    monkeypatch.setattr("coral_torch.cli.tensors_of", spy)
    code, out, _ = run(capsys, "--repo", str(repo_path), "diff", "e0", "e2", "--json")
    assert code == 0 and seen == [["state_dict/b", "state_dict/w"]] * 2
    assert {t["tensor"]: t["status"] for t in json.loads(out)["tensors"]}["state_dict/frozen"] == "unchanged"
