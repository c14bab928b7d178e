"""A small profiled set on disk for the cleaning tests: real image files, a hand-made NoiseProfile with every status,
a hostile identity name, an unreadable file and a missing one."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from facesphere.cleaning.noise import Status

HOSTILE = "<script>document.title='pwned'</script> & \"co\""
NAMES = ["alice", "bob", HOSTILE]
C, F, O, D, U = Status.CLEAN, Status.FLIP, Status.OUTLIER, Status.DUPLICATE, Status.UNREADABLE
# per image: (identity, status, other identity, duplicate of)
LAYOUT = [(0, C, 1, -1), (0, C, 1, -1), (0, C, 2, -1), (0, F, 1, -1),
          (1, C, 0, -1), (1, C, 0, -1), (1, O, 2, -1), (1, D, 0, 4),
          (2, C, 0, -1), (2, C, 1, -1), (2, F, 0, -1), (2, U, -1, -1),
          (0, U, -1, -1)]
UNREADABLE_FILE, MISSING_FILE = 11, 12


def make_noisy_set(root: Path):
    """(profile, source folder) with ``LAYOUT``'s images written under ``root / 'images'``."""
    from facesphere.cleaning.profile import NoiseProfile

    folder = root / "images"
    sources = []
    for i, (label, status, _, _) in enumerate(LAYOUT):
        path = folder / f"id{label}" / f"img {i}.png"  # a space: list paths may hold one
        path.parent.mkdir(parents=True, exist_ok=True)
        if i == UNREADABLE_FILE:
            path.write_bytes(b"not an image\n")
        elif i != MISSING_FILE:
            Image.fromarray(np.full((24, 20, 3), (40 * label, 10 * i, 200 - 15 * i), np.uint8)).save(path)
        sources.append(str(path))
    rng = np.random.default_rng(0)
    status = np.array([s for _, s, _, _ in LAYOUT], np.uint8)
    labels = np.array([lab for lab, _, _, _ in LAYOUT], np.int64)
    own = rng.uniform(0.3, 0.9, len(LAYOUT)).astype(np.float32)
    other = rng.uniform(-0.1, 0.5, len(LAYOUT)).astype(np.float32)
    own[status == U] = other[status == U] = np.nan
    readable = status != U
    profile = NoiseProfile(
        sources=sources, labels=labels, identity_names=list(NAMES), status=status, own_cosine=own, other_cosine=other,
        other_label=np.array([o for _, _, o, _ in LAYOUT], np.int64),
        duplicate_of=np.array([d for _, _, _, d in LAYOUT], np.int64),
        identity_size=np.bincount(labels[readable], minlength=3).astype(np.int64),
        identity_centres=np.array([1, 2, 1], np.int64), identity_spread=np.array([0.7, np.nan, 0.6], np.float32),
        threshold=0.3, far=1e-3, model="test-model", duplicate_cosine=0.97,
        problems=[{"source": sources[UNREADABLE_FILE], "reason": "not a recognised image format"},
                  {"source": sources[MISSING_FILE], "reason": "file not found"}])
    return profile, folder


def hashes(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its content hash (and folders), to prove nothing changed."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}
