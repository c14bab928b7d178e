"""The package's layers import downward only: ``lint-imports`` checks the contracts in pyproject.toml.

Deployment code (models, pipeline, service, gallery, detect, align, backbones, heads) must never
import evaluation, training or the CLI, not even lazily inside a function; every layer imports only
the layers below it. The second test proves the check can fail: the same contracts on a copy of the
package with one lazy upward import are reported broken, naming the import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import importlinter  # noqa: F401  (the `test` extra: a missing tool must fail here, not skip the check)

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def _lint_imports(src: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with the repository's contracts on the ``facesphere`` package under ``src``; no cache written."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([sys.executable, "-c", LINT, str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=src, env=env, capture_output=True, text=True, timeout=120)


def test_the_package_keeps_its_layers():
    result = _lint_imports(SRC)
    assert result.returncode == 0, f"import contracts broken:\n{result.stdout}\n{result.stderr}"
    assert "0 broken" in result.stdout


def test_a_lazy_upward_import_is_reported(tmp_path):
    copy = tmp_path / "src"
    shutil.copytree(SRC / "facesphere", copy / "facesphere", ignore=shutil.ignore_patterns("__pycache__"))
    with (copy / "facesphere" / "models" / "store.py").open("a") as handle:
        handle.write("\n\ndef _sneaky():\n    from facesphere.evaluate import verification\n\n    return verification\n")
    result = _lint_imports(copy)
    assert result.returncode != 0
    assert "facesphere.models is not allowed to import facesphere.evaluate" in result.stdout
    assert "facesphere.models.store -> facesphere.evaluate" in result.stdout
    assert "2 broken" in result.stdout  # both the layers and the deployment contract catch it
