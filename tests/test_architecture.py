"""The layers import one way: the import-linter contract of pyproject.toml holds for the source, and it
fails when a lower layer imports a higher one (checked on a copy with one upward import injected)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install -e .[test])")


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    return subprocess.run([str(LINT), "--no-cache", "--config", str(root / "pyproject.toml")], cwd=root, env=env,
                          capture_output=True, text=True)


def copy_project(tmp_path: Path) -> Path:
    copy = tmp_path / "project"
    shutil.copytree(ROOT / "src" / "poise", copy / "src" / "poise", ignore=shutil.ignore_patterns("__pycache__", "assets"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    return copy


def test_layers_import_one_way():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, upward", [
    ("functional/ogm.py", "from poise.train.distributed import all_reduce_sum"),
    ("train/engine.py", "from poise.methods.base import Method"),
    ("models/fusion.py", "import poise.train.trainer"),
])
def test_an_injected_upward_import_is_detected(tmp_path, module, upward):
    copy = copy_project(tmp_path)
    path = copy / "src" / "poise" / module
    path.write_text(path.read_text() + f"\n{upward}  # noqa\n")
    result = lint(copy)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout or "broken" in result.stdout
