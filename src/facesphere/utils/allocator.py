"""glibc malloc tuning for eager PyTorch on CPU.

Under glibc's defaults every large activation (> the dynamic mmap threshold) is mmap'ed and
unmapped each step, so the kernel zero-fills fresh pages again and again; on this project's
reference machine that cost up to half the step time. Raising the mmap and trim thresholds keeps
freed memory in the heap for reuse. ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` in the
environment do the same before start-up; :func:`tune_malloc` does it from inside the process
(``mallopt``), which is what the ``facesphere`` CLI calls first. Nothing happens on import.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
DEFAULT_THRESHOLD = 1 << 30
"""1 GiB for both thresholds. Higher values (2**31 - 1 for mmap, the most mallopt takes; -1 disables
trimming) also keep multi-GiB classifier temporaries in the heap: a 1M-class Partial FC step ran 4.3x
faster (benchmarks/partial_fc.py), but the heap fragments, and with them the 1M-class full classifier
of that benchmark was killed for exceeding this machine's 24 GiB. Pass them to tune_malloc when the
memory is there."""

_applied: dict[str, int | str] = {}


def _libc():
    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def tune_malloc(mmap_threshold: int = DEFAULT_THRESHOLD, trim_threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds (a negative trim threshold disables trimming); True when both
    were accepted. Skipped (returns False) on non-glibc systems and when ``FACESPHERE_MALLOC=default``.
    """
    if os.environ.get("FACESPHERE_MALLOC", "").lower() == "default":
        return False
    libc = _libc()
    if libc is None:
        return False
    ok_mmap = libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold)) == 1
    ok_trim = libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(trim_threshold)) == 1
    if ok_mmap:
        _applied["mmap_threshold"] = mmap_threshold
    if ok_trim:
        _applied["trim_threshold"] = "disabled" if trim_threshold < 0 else trim_threshold
    logger.debug("mallopt mmap_threshold=%s trim_threshold=%s", ok_mmap, ok_trim)
    return ok_mmap and ok_trim


def allocator_settings() -> dict[str, object]:
    """What a benchmark should record: mallopt values applied here and the MALLOC_* environment."""
    env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k in ("LD_PRELOAD", "FACESPHERE_MALLOC")}
    return {"mallopt": dict(_applied), "environment": env, "libc": platform.libc_ver()[0] or "unknown"}
