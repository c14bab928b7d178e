"""Pair sets from any source (LFW pairs.txt, InsightFace ``.bin``, CSV) and their verification evaluation.

A ``PairSet`` holds each distinct image once plus index pairs into that list, so ``evaluate_pairset``
embeds every image a single time however many pairs use it (LFW: 7,701 images for 6,000 pairs).

Preprocessing is a ``Preprocess`` callable (HxWx3 uint8 RGB -> normalised (3, H, W) float tensor), so a
model card can bring its own size, colour order and mean/std (``model_input.CardPreprocess``); the
default is facesphere's ``to_tensor`` ((x - 127.5) / 128, RGB) after checking the 112x112 size.

VAL@FAR follows insightface's ``calculate_val`` (papers.md §12): for each of the k folds, the threshold
giving the target FAR on the other folds is found by *linear interpolation* between the two ROC
vertices bracketing the target, then VAL (TAR) and FAR are measured on the held-out fold; the report
gives their means and the VAL std. insightface interpolates over a fixed grid of squared-L2
distances (``np.arange(0, 4, 0.001)``); here the vertices are the exact training impostor scores
(impostor score m_k, the k-th highest, is the threshold at which FAR = k/N), which is the limit of that
grid. Departures: pairs are accepted when ``score >= threshold`` (insightface: ``dist < threshold``),
and a target below 1/N training impostors gives ``None`` instead of insightface's reject-all
threshold 0. The plain TAR@FAR values of ``verification_report`` (one exact ROC over all pairs, no
interpolation) are reported alongside.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from facesphere.data.images import MEAN, STD, load_image, to_tensor
from facesphere.data.transforms import resize_to
from facesphere.evaluate.embeddings import cosine_scores, extract_embeddings
from facesphere.evaluate.verification import DEFAULT_FAR_TARGETS, _fold_ids, kfold_accuracy, roc, verification_report

logger = logging.getLogger(__name__)

__all__ = [
    "ImagePreprocess",
    "PairSet",
    "Preprocess",
    "embed_images",
    "embed_pairset",
    "evaluate_pairset",
    "load_pairset",
    "read_pairs_csv",
    "val_at_far",
]


# --------------------------------------------------------------------------- preprocessing


@runtime_checkable
class Preprocess(Protocol):
    """Maps one HxWx3 uint8 RGB image to the model's normalised (3, H, W) float tensor."""

    def __call__(self, image: np.ndarray) -> torch.Tensor: ...


class ImagePreprocess:
    """Size check (or resize), colour order and mean/std normalisation: the knobs a model card sets.

    Args:
        size: expected (H, W); ``None`` accepts any size.
        mean, std: scalars or per-channel triples, in the model's channel order.
        channel_order: "RGB" or "BGR" (the tensor's channel order).
        resize: resize a differently sized image (``resize_to``) instead of raising ``ValueError``.
    The defaults reproduce ``to_tensor`` exactly (and use it).
    """

    def __init__(self, size: tuple[int, int] | None = (112, 112), mean=MEAN, std=STD,
                 channel_order: str = "RGB", resize: bool = False) -> None:
        if channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {channel_order!r}")
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.mean = np.broadcast_to(np.asarray(mean, dtype=np.float32), (3,)).copy()
        self.std = np.broadcast_to(np.asarray(std, dtype=np.float32), (3,)).copy()
        if np.any(self.std == 0):
            raise ValueError("std must be non-zero")
        self.channel_order = channel_order
        self.resize = bool(resize)
        self._default = channel_order == "RGB" and np.all(self.mean == MEAN) and np.all(self.std == STD)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.dtype} {image.shape}")
        if self.size is not None and image.shape[:2] != self.size:
            if not self.resize:
                raise ValueError(f"image is {image.shape[0]}x{image.shape[1]}, the model expects "
                                 f"{self.size[0]}x{self.size[1]}: align it first, or use resize=True")
            image = resize_to(image, self.size)
        if self._default:
            return to_tensor(image)
        if self.channel_order == "BGR":
            image = image[:, :, ::-1]
        x = (image.astype(np.float32) - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))

    def __repr__(self) -> str:
        return (f"ImagePreprocess(size={self.size}, mean={self.mean.tolist()}, std={self.std.tolist()}, "
                f"channel_order={self.channel_order!r}, resize={self.resize})")


# --------------------------------------------------------------------------- pair sets


def _default_load(source: Any) -> np.ndarray:
    if isinstance(source, np.ndarray):
        return source
    return load_image(source)


@dataclass
class PairSet:
    """Distinct images plus index pairs into them.

    Attributes:
        name: used in reports and plot legends.
        images: one source per distinct image: a path, an HxWx3 uint8 array, or anything ``loader`` takes.
        left, right: (N,) int64 indices into ``images``; pair k is ``(images[left[k]], images[right[k]])``.
        same: (N,) bool, True for genuine pairs.
        folds: (N,) fold ids, or None for contiguous equal folds in pair order.
        loader: source -> HxWx3 uint8 RGB; default ``load_image`` for paths, identity for arrays.
    """

    name: str
    images: Sequence[Any]
    left: np.ndarray
    right: np.ndarray
    same: np.ndarray
    folds: np.ndarray | None = None
    loader: Callable[[Any], np.ndarray] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.left = np.asarray(self.left, dtype=np.int64)
        self.right = np.asarray(self.right, dtype=np.int64)
        self.same = np.asarray(self.same, dtype=bool)
        n = self.same.shape[0]
        if self.same.ndim != 1 or self.left.shape != (n,) or self.right.shape != (n,):
            raise ValueError(f"left, right and same must be 1-D of equal length, got {self.left.shape}, "
                             f"{self.right.shape}, {self.same.shape}")
        if n == 0:
            raise ValueError(f"pair set {self.name!r} has no pairs")
        m = len(self.images)
        if min(self.left.min(), self.right.min()) < 0 or max(self.left.max(), self.right.max()) >= m:
            raise ValueError(f"pair indices out of range for {m} images")
        if self.folds is not None:
            self.folds = np.asarray(self.folds, dtype=np.int64)
            if self.folds.shape != (n,):
                raise ValueError(f"folds must have one id per pair, got shape {self.folds.shape}")

    def __len__(self) -> int:
        return int(self.same.shape[0])

    @property
    def num_images(self) -> int:
        return len(self.images)

    def load(self, index: int) -> np.ndarray:
        """Image ``index`` as HxWx3 uint8 RGB."""
        return (self.loader or _default_load)(self.images[index])

    def image_name(self, index: int) -> str:
        """A short name for captions: the file stem for paths (or sources with a ``stem``), ``#index`` otherwise."""
        source = self.images[index]
        if isinstance(source, (str, os.PathLike)):
            return Path(source).stem
        stem = getattr(source, "stem", None)
        return stem if isinstance(stem, str) else f"#{index}"

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_path_pairs(cls, paths1: Sequence, paths2: Sequence, same, folds=None, name: str = "pairs",
                        loader: Callable[[Any], np.ndarray] | None = None) -> PairSet:
        """Deduplicate the images of two parallel path lists (by resolved path) into a ``PairSet``."""
        if len(paths1) != len(paths2):
            raise ValueError(f"{len(paths1)} left paths but {len(paths2)} right paths")
        index: dict[str, int] = {}
        images: list[Path] = []

        def slot(p) -> int:
            key = os.path.normpath(os.path.abspath(os.fspath(p)))
            if key not in index:
                index[key] = len(images)
                images.append(Path(p))
            return index[key]

        left = [slot(p) for p in paths1]
        right = [slot(p) for p in paths2]
        return cls(name, images, np.array(left), np.array(right), same, folds, loader)

    @classmethod
    def from_lfw(cls, pairs_path: str | os.PathLike, root: str | os.PathLike, name: str = "lfw",
                 ext: str = ".jpg", check: bool = True) -> PairSet:
        """The LFW protocol: ``pairs.txt`` over the image folder ``root``, with its 10 folds."""
        from facesphere.evaluate.lfw import lfw_pair_paths

        p1, p2, same, folds = lfw_pair_paths(pairs_path, root, ext=ext, check=check)
        ps = cls.from_path_pairs(p1, p2, same, folds, name=name)
        logger.info("%s: %d pairs over %d distinct images", name, len(ps), ps.num_images)
        return ps

    @classmethod
    def from_bin(cls, path: str | os.PathLike, name: str | None = None,
                 image_size: tuple[int, int] | None = None) -> PairSet:
        """An InsightFace ``.bin`` (safe reader): identical encodings become one image; folds contiguous."""
        from facesphere.evaluate.binsets import load_bin

        images, issame, slots = load_bin(path, image_size=image_size, dedupe=True)
        return cls(name or Path(path).stem, images, slots[0::2], slots[1::2], issame, None)

    @classmethod
    def from_csv(cls, path: str | os.PathLike, root: str | os.PathLike | None = None, name: str | None = None,
                 check: bool = True) -> PairSet:
        """A CSV of ``path1,path2,same[,fold]`` rows (see ``read_pairs_csv``)."""
        p1, p2, same, folds = read_pairs_csv(path, root=root, check=check)
        return cls.from_path_pairs(p1, p2, same, folds, name=name or Path(path).stem)


_TRUE = {"1", "true", "t", "yes", "y", "same", "genuine", "match", "matched", "positive"}
_FALSE = {"0", "false", "f", "no", "n", "diff", "different", "impostor", "imposter", "mismatch", "mismatched", "negative"}


_HEADER_FIRST = {"path1", "path_1", "image1", "image_1", "img1", "file1", "left", "first"}


def _is_int(token: str) -> bool:
    try:
        int(token)
    except ValueError:
        return False
    return True


def _label(token: str) -> bool | None:
    t = token.strip().lower()
    return True if t in _TRUE else False if t in _FALSE else None


def read_pairs_csv(path: str | os.PathLike, root: str | os.PathLike | None = None, check: bool = True
                   ) -> tuple[list[Path], list[Path], np.ndarray, np.ndarray | None]:
    """Parse ``path1,path2,same[,fold]`` rows: (paths1, paths2, same, folds or None).

    The first row is a header (skipped) when its third field is not a label, its fourth is not an
    integer, or its first field is a column name such as ``path1``. Labels: 1/0, true/false,
    yes/no, same/different, genuine/impostor, match/mismatch (any case). Either every row has a fold
    id (an integer) or none has. Blank rows and rows starting with ``#`` are ignored. Relative paths
    are resolved against ``root`` (default: the CSV's folder). Errors name the line.
    """
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    p1: list[Path] = []
    p2: list[Path] = []
    same: list[bool] = []
    folds: list[int] = []
    first = True
    has_fold: bool | None = None
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        for row in reader:
            line = reader.line_num
            fields = [f.strip() for f in row]
            if not fields or all(not f for f in fields) or fields[0].startswith("#"):
                continue
            if len(fields) not in (3, 4):
                raise ValueError(f"{path}:{line}: expected 'path1,path2,same[,fold]', got {len(fields)} fields")
            label = _label(fields[2])
            if first:
                first = False
                if label is None or fields[0].lower() in _HEADER_FIRST or (len(fields) == 4 and not _is_int(fields[3])):
                    continue  # header
            if label is None:
                raise ValueError(f"{path}:{line}: {fields[2]!r} is not a same/different label")
            if has_fold is None:
                has_fold = len(fields) == 4
            elif has_fold != (len(fields) == 4):
                raise ValueError(f"{path}:{line}: either every row has a fold column or none has")
            if len(fields) == 4:
                try:
                    folds.append(int(fields[3]))
                except ValueError:
                    raise ValueError(f"{path}:{line}: fold {fields[3]!r} is not an integer") from None
            if not fields[0] or not fields[1]:
                raise ValueError(f"{path}:{line}: empty image path")
            a, b = (Path(f) if Path(f).is_absolute() else base / f for f in fields[:2])
            if check:
                for p in (a, b):
                    if not p.is_file():
                        raise FileNotFoundError(f"{path}:{line}: image {p} does not exist")
            p1.append(a)
            p2.append(b)
            same.append(label)
    if not same:
        raise ValueError(f"{path}: no pairs")
    return p1, p2, np.array(same, dtype=bool), (np.array(folds, dtype=np.int64) if folds else None)


def load_pairset(path: str | os.PathLike, kind: str | None = None, **kwargs) -> PairSet:
    """A ``PairSet`` from a ``.bin``, a ``.csv`` or an LFW pairs file (``kind`` or the extension decides).

    ``kwargs`` go to the constructor: ``root`` is required for LFW pairs files.
    """
    path = Path(path)
    kind = kind or {".bin": "bin", ".csv": "csv", ".txt": "lfw"}.get(path.suffix.lower())
    if kind == "bin":
        return PairSet.from_bin(path, **kwargs)
    if kind == "csv":
        return PairSet.from_csv(path, **kwargs)
    if kind == "lfw":
        if "root" not in kwargs:
            raise ValueError("an LFW pairs file needs root=<image folder>")
        return PairSet.from_lfw(path, **kwargs)
    raise ValueError(f"cannot tell the pair-set format of {path}; pass kind='bin', 'csv' or 'lfw'")


# --------------------------------------------------------------------------- embedding


class _Images(Dataset):
    def __init__(self, count: int, load: Callable[[int], np.ndarray], preprocess: Callable) -> None:
        self.count, self.load, self.preprocess = count, load, preprocess

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        return self.preprocess(self.load(index)), 0


class _FunctionModule(nn.Module):
    """Wraps a plain ``(B, C, H, W) tensor -> (B, D)`` function so ``extract_embeddings`` can drive it."""

    def __init__(self, fn: Callable) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fn(x)
        return out if isinstance(out, torch.Tensor) else torch.as_tensor(np.asarray(out))


def embed_images(
    model: nn.Module | Callable,
    count: int,
    load: Callable[[int], np.ndarray],
    preprocess: Callable[[np.ndarray], torch.Tensor] | None = None,
    flip: bool | str = "sum",
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Embeddings (count, D) of images ``load(0..count-1)``, L2-normalised, flip as ``extract_embeddings``.

    ``model`` is an ``nn.Module`` or any function from a (B, C, H, W) tensor to (B, D) embeddings.
    Image 0 is preprocessed once up front, so a preprocessing refusal (size, model card) comes
    before any embedding is computed.
    """
    module = model if isinstance(model, nn.Module) else _FunctionModule(model)
    preprocess = preprocess or ImagePreprocess()
    if count > 0:
        preprocess(load(0))  # fail fast (wrong size, model-card mismatch) before the embedding pass
    dataset = _Images(count, load, preprocess)
    return extract_embeddings(module, dataset, batch_size=batch_size, device=device, flip=flip,
                              amp_dtype=amp_dtype, progress=progress)


def embed_pairset(model: nn.Module | Callable, pairset: PairSet, **kwargs) -> np.ndarray:
    """Embed every distinct image of ``pairset`` once (``embed_images`` options)."""
    return embed_images(model, pairset.num_images, pairset.load, **kwargs)


# --------------------------------------------------------------------------- VAL@FAR


def _interpolated_threshold(scores: np.ndarray, same: np.ndarray, far_target: float) -> float | None:
    """Score threshold at ``far_target`` on these pairs, interpolated between impostor scores (module doc)."""
    imp = np.sort(scores[~same])[::-1]  # m_1 >= m_2 >= ...: accepting >= m_k gives FAR k/N
    n = imp.size
    x = far_target * n * (1.0 + 1e-12)
    if n == 0 or x < 1.0:
        return None
    k = int(math.floor(x))
    if k >= n:
        return float(imp[-1])
    frac = x - k
    upper, lower = imp[k - 1], imp[k]  # vertices (k/N, m_k) and ((k+1)/N, m_{k+1})
    return float(upper + frac * (lower - upper)) if frac > 1e-9 else float(upper)


def val_at_far(scores, same, far_target: float = 1e-3, n_folds: int = 10, folds=None) -> dict:
    """insightface-style VAL@FAR: per-fold interpolated threshold from the other folds (module doc).

    Returns ``far_target``, ``val_mean``, ``val_std`` (population), ``far_mean`` and per-fold
    ``thresholds``; the three figures are None when a training split has fewer than 1/far_target
    impostor pairs, or when a held-out fold lacks genuine or impostor pairs.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(same, dtype=bool)
    ids = _fold_ids(s.size, n_folds, folds)
    vals, fars, thresholds = [], [], []
    for fold in range(int(ids.max()) + 1):
        test = ids == fold
        thr = _interpolated_threshold(s[~test], y[~test], far_target)
        thresholds.append(thr)
        if thr is None or not y[test].any() or y[test].all():
            vals = fars = None
            continue
        if vals is not None:
            accept = s[test] >= thr
            vals.append(float(np.mean(accept[y[test]])))
            fars.append(float(np.mean(accept[~y[test]])))
    return {
        "far_target": float(far_target),
        "val_mean": None if vals is None else float(np.mean(vals)),
        "val_std": None if vals is None else float(np.std(vals)),
        "far_mean": None if fars is None else float(np.mean(fars)),
        "thresholds": thresholds,
    }


# --------------------------------------------------------------------------- evaluation


def _pair_thresholds(scores: np.ndarray, same: np.ndarray, n_folds: int, folds) -> np.ndarray:
    """The k-fold threshold each pair was judged with (may be +-inf: accept or reject everything)."""
    ids = _fold_ids(scores.size, n_folds, folds)
    return kfold_accuracy(scores, same, n_folds=n_folds, folds=folds).thresholds[ids]


def evaluate_pairset(
    model: nn.Module | Callable,
    pairset: PairSet,
    *,
    preprocess: Callable[[np.ndarray], torch.Tensor] | None = None,
    flip: bool | str = "sum",
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    n_folds: int = 10,
    folds=None,
    far_targets: Sequence[float] = DEFAULT_FAR_TARGETS,
    val_far: float = 1e-3,
    out_dir: str | os.PathLike | None = None,
    max_failures: int = 16,
    embeddings: np.ndarray | None = None,
    progress: bool = False,
) -> dict:
    """Embed, score (cosine) and report one pair set; optionally write plots, a failure sheet and JSON.

    Returns ``verification_report`` (k-fold accuracy with ``folds`` / ``pairset.folds`` / ``n_folds``
    contiguous folds, ROC numbers, exact TAR@FAR for ``far_targets``) plus ``name``, ``num_images``,
    ``flip`` and ``val_at_far`` (insightface-style VAL@FAR=``val_far``, module doc). With ``out_dir``
    it writes ``roc.png``, ``det.png``, ``failures.png`` (false accepts/rejects at each pair's k-fold
    threshold) and ``report.json``, listed under ``files``. Pass ``embeddings`` (one row per
    distinct image) to skip the embedding pass.
    """
    if embeddings is None:
        embeddings = embed_pairset(model, pairset, preprocess=preprocess, flip=flip, batch_size=batch_size,
                                   device=device, amp_dtype=amp_dtype, progress=progress)
    embeddings = np.asarray(embeddings)
    if embeddings.shape[0] != pairset.num_images:
        raise ValueError(f"{embeddings.shape[0]} embeddings for {pairset.num_images} images")
    folds = pairset.folds if folds is None else np.asarray(folds)
    scores = cosine_scores(embeddings, pairset.left, pairset.right)
    report = verification_report(scores, pairset.same, n_folds=n_folds, far_targets=far_targets, folds=folds)
    report = {"name": pairset.name, "num_images": pairset.num_images, "flip": str(flip), **report,
              "val_at_far": val_at_far(scores, pairset.same, val_far, n_folds=n_folds, folds=folds)}
    logger.info("%s: accuracy %.4f ± %.4f, VAL@FAR=%g %s", pairset.name, report["accuracy_mean"],
                report["accuracy_std"], val_far, report["val_at_far"]["val_mean"])
    if out_dir is not None:
        report["files"] = _write_outputs(Path(out_dir), pairset, scores, report, n_folds, folds, max_failures)
    return report


def _write_outputs(out: Path, pairset: PairSet, scores: np.ndarray, report: dict, n_folds: int, folds,
                   max_failures: int) -> dict:
    from facesphere.evaluate.contact_sheet import failure_contact_sheet
    from facesphere.evaluate.plots import plot_det, plot_roc
    from facesphere.utils.files import atomic_write_text

    far, tar, _ = roc(scores, pairset.same)
    files = {
        "roc": str(plot_roc({pairset.name: (far, tar)}, out / "roc.png", title=f"ROC: {pairset.name}")),
        "det": str(plot_det({pairset.name: (far, tar)}, out / "det.png", title=f"DET: {pairset.name}")),
    }
    thresholds = _pair_thresholds(scores, pairset.same, n_folds, folds)
    captions = [f"{pairset.image_name(a)} | {pairset.image_name(b)}" for a, b in zip(pairset.left, pairset.right)]
    files["failures"] = str(failure_contact_sheet(out / "failures.png", pairset.load, pairset.left, pairset.right,
                                                  scores, pairset.same, thresholds, max_per_kind=max_failures,
                                                  captions=captions, title=f"{pairset.name}: failed pairs"))
    files["report"] = str(out / "report.json")
    atomic_write_text(out / "report.json", json.dumps({**report, "files": files}, indent=2, allow_nan=False))
    return files
