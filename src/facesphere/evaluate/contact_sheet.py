"""Contact sheets of failed verification pairs: false accepts and false rejects, side by side, one PNG.

Each failed pair is drawn as its two images next to each other with the pair's score and the
threshold it was judged against underneath; false accepts (impostor pairs scoring at or above the
threshold) come first, worst (highest score) first, then false rejects, worst (lowest score) first.
The PNG is written atomically, so a reader never sees half a file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from facesphere.data.transforms import resize_to
from facesphere.utils.files import atomic_path

logger = logging.getLogger(__name__)

__all__ = ["PairTile", "failure_contact_sheet", "render_failure_sheet", "render_image_grid", "select_failures",
           "write_failure_sheet", "write_image_grid"]

_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)
_ACCEPT = (200, 40, 40)
_REJECT = (40, 90, 200)


@dataclass(frozen=True)
class PairTile:
    """One failed pair: two HxWx3 uint8 RGB images, its score, the threshold applied, and an optional caption."""

    image1: np.ndarray
    image2: np.ndarray
    score: float
    threshold: float
    caption: str = ""


def select_failures(scores, same, thresholds, max_per_kind: int | None = 16) -> tuple[np.ndarray, np.ndarray]:
    """Indices of false accepts (highest score first) and false rejects (lowest score first).

    ``thresholds`` is one threshold for all pairs or one per pair (e.g. each pair's k-fold threshold);
    a pair is accepted when ``score >= threshold``.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(same, dtype=bool)
    t = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), s.shape)
    accepted = s >= t
    fa = np.flatnonzero(accepted & ~y)
    fr = np.flatnonzero(~accepted & y)
    fa = fa[np.argsort(-s[fa], kind="stable")]
    fr = fr[np.argsort(s[fr], kind="stable")]
    if max_per_kind is not None:
        fa, fr = fa[:max_per_kind], fr[:max_per_kind]
    return fa, fr


def _font():
    try:
        return ImageFont.load_default(size=11)
    except TypeError:  # Pillow without FreeType sizing
        return ImageFont.load_default()


def _fit(image: np.ndarray, tile: int) -> np.ndarray:
    """Resize to fit a tile x tile square (aspect kept), centred on the background colour."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"tiles must be HxWx3 uint8 RGB, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    scale = tile / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = resize_to(image, (nh, nw))
    canvas = np.full((tile, tile, 3), _BACKGROUND, dtype=np.uint8)
    y0, x0 = (tile - nh) // 2, (tile - nw) // 2
    canvas[y0 : y0 + nh, x0 : x0 + nw] = resized
    return canvas


def render_failure_sheet(
    false_accepts: Sequence[PairTile],
    false_rejects: Sequence[PairTile],
    tile: int = 96,
    columns: int = 4,
    title: str = "",
) -> np.ndarray:
    """The sheet as an HxWx3 uint8 RGB array (see the module doc for the layout)."""
    if tile < 16 or columns < 1:
        raise ValueError(f"tile must be >= 16 and columns >= 1, got {tile} and {columns}")
    font = _font()
    gap, text_h, header_h = 6, 28, 22
    cell_w, cell_h = 2 * tile + 2, tile + text_h
    width = columns * (cell_w + gap) + gap
    sections = [
        (f"False accepts: impostor pairs with score >= threshold ({len(false_accepts)} shown)", false_accepts, _ACCEPT),
        (f"False rejects: genuine pairs with score < threshold ({len(false_rejects)} shown)", false_rejects, _REJECT),
    ]
    height = gap + (header_h if title else 0)
    for _, tiles, _ in sections:
        rows = max(1, -(-len(tiles) // columns))
        height += header_h + rows * (cell_h + gap)
    sheet = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    y = gap
    if title:
        draw.text((gap, y), title, fill=_TEXT, font=font)
        y += header_h
    for heading, tiles, colour in sections:
        draw.text((gap, y + 4), heading, fill=colour, font=font)
        y += header_h
        if not tiles:
            draw.text((gap, y + 4), "none", fill=_TEXT, font=font)
        for k, pair in enumerate(tiles):
            row, col = divmod(k, columns)
            x0, y0 = gap + col * (cell_w + gap), y + row * (cell_h + gap)
            sheet.paste(Image.fromarray(_fit(pair.image1, tile)), (x0, y0))
            sheet.paste(Image.fromarray(_fit(pair.image2, tile)), (x0 + tile + 2, y0))
            draw.rectangle((x0 - 1, y0 - 1, x0 + cell_w, y0 + tile), outline=colour)
            draw.text((x0, y0 + tile + 2), f"score {pair.score:.3f}  thr {pair.threshold:.3f}", fill=_TEXT, font=font)
            if pair.caption:
                draw.text((x0, y0 + tile + 14), pair.caption[: max(8, cell_w // 6)], fill=_TEXT, font=font)
        y += max(1, -(-len(tiles) // columns)) * (cell_h + gap)
    return np.asarray(sheet, dtype=np.uint8)


def write_failure_sheet(
    path: str | os.PathLike, false_accepts: Sequence[PairTile], false_rejects: Sequence[PairTile], **kwargs
) -> Path:
    """Render (``render_failure_sheet`` options) and write the sheet as a PNG at ``path``, atomically."""
    array = render_failure_sheet(false_accepts, false_rejects, **kwargs)
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    logger.info("wrote %s (%d false accepts, %d false rejects)", path, len(false_accepts), len(false_rejects))
    return path


def failure_contact_sheet(
    path: str | os.PathLike,
    load: Callable[[int], np.ndarray],
    left,
    right,
    scores,
    same,
    thresholds,
    max_per_kind: int | None = 16,
    captions: Sequence[str] | None = None,
    **kwargs,
) -> Path:
    """Select the worst failures of a pair set and write their sheet.

    ``load(i)`` returns image ``i`` as HxWx3 uint8 RGB; pair k is ``(left[k], right[k])``; ``captions``
    (one per pair, optional) are printed under each pair; ``kwargs`` go to ``render_failure_sheet``.
    """
    s = np.asarray(scores, dtype=np.float64)
    t = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), s.shape)
    fa, fr = select_failures(s, same, t, max_per_kind)

    def tiles(indices):
        return [PairTile(load(int(left[k])), load(int(right[k])), float(s[k]), float(t[k]),
                         captions[k] if captions is not None else "") for k in indices]

    return write_failure_sheet(path, tiles(fa), tiles(fr), **kwargs)


def render_image_grid(images: Sequence[np.ndarray], captions: Sequence[str] = (), tile: int = 96, columns: int = 8,
                      title: str = "") -> np.ndarray:
    """Single images in rows of ``columns`` tiles, each with its caption underneath (e.g. samples of a data set)."""
    if tile < 16 or columns < 1:
        raise ValueError(f"tile must be >= 16 and columns >= 1, got {tile} and {columns}")
    font = _font()
    gap, text_h, header_h = 6, 16, 22 if title else 0
    columns = max(1, min(columns, len(images)))
    rows = max(1, -(-len(images) // columns))
    sheet = Image.new("RGB", (gap + columns * (tile + gap), gap + header_h + rows * (tile + text_h + gap)), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((gap, gap), title, fill=_TEXT, font=font)
    for k, image in enumerate(images):
        row, col = divmod(k, columns)
        x0, y0 = gap + col * (tile + gap), gap + header_h + row * (tile + text_h + gap)
        sheet.paste(Image.fromarray(_fit(image, tile)), (x0, y0))
        if k < len(captions) and captions[k]:
            draw.text((x0, y0 + tile + 2), captions[k][: max(6, tile // 6)], fill=_TEXT, font=font)
    return np.asarray(sheet, dtype=np.uint8)


def write_image_grid(path: str | os.PathLike, images: Sequence[np.ndarray], captions: Sequence[str] = (), **kwargs) -> Path:
    """Render (``render_image_grid`` options) and write the grid as a PNG at ``path``, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(render_image_grid(images, captions, **kwargs)).save(tmp, format="PNG")
    logger.info("wrote %s (%d images)", path, len(images))
    return path
