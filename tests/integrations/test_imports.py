"""Import cost: ``import coral_torch`` and the catalog-only CLI commands stay free of torch,
Lightning and boto3 (each fresh interpreter would pay seconds for them), the lazy package names
still resolve, and the light modules import on their own (no cycles)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import coral_torch
import coral_torch.repository
import coral_torch.storage

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "lightning", "boto3", "botocore", "h5py")


def _python(code: str) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    return res


def _loaded_after(statement: str, modules=HEAVY + ("h5py",)) -> list[str]:
    res = _python(f"""
        import json, sys
        {statement}
        print(json.dumps([m for m in {list(modules)!r} if m in sys.modules]))
    """)
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_import_coral_torch_is_light():
    assert _loaded_after("import coral_torch") == []


def test_s3_loads_on_first_use():
    assert "boto3" not in _loaded_after("import coral_torch; coral_torch.Repository")
    assert "boto3" in _loaded_after("import coral_torch; coral_torch.S3Store")


@pytest.mark.parametrize("module", [coral_torch, coral_torch.storage, coral_torch.repository])
def test_lazy_packages_keep_their_public_names(module):
    for name in module.__all__:
        assert getattr(module, name) is not None, name
        assert name in dir(module)
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018
    from coral_torch.repository.repository import Repository
    from coral_torch.storage.s3_store import S3Store

    assert coral_torch.Repository is coral_torch.repository.Repository is Repository
    assert coral_torch.S3Store is coral_torch.storage.S3Store is S3Store


@pytest.mark.parametrize("module", ["coral_torch.inspect", "coral_torch.plots", "coral_torch.cli",
                                    "coral_torch.repository.repository", "coral_torch.storage.hdf5_store"])
def test_light_modules_import_first_without_torch_or_cycles(module):
    loaded = _loaded_after(f"import {module}", tuple(m for m in HEAVY if m != "h5py") + ("coral_torch.cli",))
    assert [m for m in loaded if m != module] == []  # plots and inspect must not need the CLI


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small")
    torch.manual_seed(0)
    sd = {"w": torch.randn(16, 16), "b": torch.zeros(16)}
    for epoch in range(2):
        sd = {"w": sd["w"] + 0.01 * torch.randn(16, 16), "b": sd["b"] + 1}
        coral_torch.save({"epoch": epoch, "state_dict": sd}, root / f"e{epoch}.pt", run="exp",
                         metrics={"val_loss": 1.0 / (epoch + 1)}, tag=f"e{epoch}")
    return root / ".coral"


CATALOG_ONLY = [
    ["log"], ["log", "--json"], ["show", "latest"], ["show", "e0", "--json"], ["tag"], ["tag", "release", "e0"],
    ["tag", "--delete", "release"], ["gc"], ["stats"], ["stats", "--json"], ["--help"], ["--version"],
]


def test_catalog_only_commands_import_no_torch_lightning_or_boto3(small_repo):
    res = _python(f"""
        import contextlib, io, json, sys
        from coral_torch.cli import main

        report = []
        for argv in {CATALOG_ONLY!r}:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                try:
                    code = main(["--repo", {str(small_repo)!r}, *argv])
                except SystemExit as e:  # --help, --version
                    code = e.code
            report.append([argv, code, [m for m in {list(HEAVY)!r} if m in sys.modules], out.getvalue()])
        print(json.dumps(report))
    """)
    report = json.loads(res.stdout.strip().splitlines()[-1])
    for argv, code, heavy, out in report:
        assert code == 0, (argv, res.stderr)
        assert heavy == [], f"coral-torch {' '.join(argv)} imported {heavy}"
        assert out.strip(), argv
    assert "exp" in report[0][3] and "release" in report[5][3]
