"""mallopt tuning: applied only when asked, recorded for benchmarks, switchable off."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

CODE = ("from facesphere.utils.allocator import tune_malloc, allocator_settings; "
        "ok = tune_malloc(); print(ok, sorted(allocator_settings()['mallopt'].items()))")


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tune_malloc_applies_and_records():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != "FACESPHERE_MALLOC"}).stdout
    assert out.strip() == "True [('mmap_threshold', 1073741824), ('trim_threshold', 1073741824)]"


def test_opt_out_leaves_malloc_alone():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True,
                         env={**os.environ, "FACESPHERE_MALLOC": "default"}).stdout
    assert out.strip() == "False []"
