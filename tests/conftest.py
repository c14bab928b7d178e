"""Shared test settings: research data location, and skip-or-fail when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


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
