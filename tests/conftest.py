"""Shared test settings: research data location, and skip-or-fail when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Property tests of parsers: no per-example deadline (two shared cores), the same examples on every run (a red CI
# is reproducible), and a count that a long fuzzing run can raise: FACESPHERE_FUZZ_EXAMPLES=100000 pytest -k property.
settings.register_profile("facesphere", deadline=None, derandomize=True, print_blob=True,
                          max_examples=int(os.environ.get("FACESPHERE_FUZZ_EXAMPLES", "200")))
settings.load_profile("facesphere")


def data_root() -> Path:
    """FACESPHERE_DATA, default ../shared next to the repository (research files are never committed)."""
    default = Path(__file__).resolve().parents[1].parent / "shared"
    return Path(os.environ.get("FACESPHERE_DATA", default))


def require_data(relative: str) -> Path:
    """Path of a research file; skips the test when absent, or fails when FACESPHERE_REQUIRE_DATA=1 (CI)."""
    path = data_root() / relative
    if not path.exists():
        reason = f"research data {path} is absent (set FACESPHERE_DATA to the folder holding it)"
        if os.environ.get("FACESPHERE_REQUIRE_DATA") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield
