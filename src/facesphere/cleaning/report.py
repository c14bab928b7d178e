"""The noise report of a profiled set: figures, histograms and contact sheets, as JSON, PNG and one HTML page.

``write_report`` writes into the cleaning output folder (beside the list files of ``cleaning.lists``):

- ``report.json``: the overall counts per status and the estimated rates (flagged / readable images; the label-noise
  rate counts flips and outliers, the two kinds IMDb-Face separates, arXiv 1807.11649 §3), the set-level problems,
  and per identity its size, centres, spread, flagged flips / outliers / duplicates and estimated noise fraction
  ((flips + outliers) / readable images of the identity);
- ``histograms.png``: own-cosine and other-cosine histograms by status with the threshold drawn, and the
  per-identity noise fractions;
- ``flips.png``, ``outliers.png``, ``duplicates.png``: contact sheets, one row per flagged image: the image, then
  its identity's typical images (highest own cosine) and, for a flip, the suggested identity's typical images (for a
  duplicate, the image it repeats first);
- ``report.html``: all of it, with relative links to the PNGs and the lists.

An image that cannot be read is drawn as a grey tile and listed; it never stops the report.
"""

from __future__ import annotations

import html
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from facesphere.cleaning.lists import FLAGGED_FILES, KEPT, TYPICAL, UNREADABLE, typical_images, write_cleaned_lists
from facesphere.cleaning.noise import Status
from facesphere.cleaning.review import load_source
from facesphere.evaluate.contact_sheet import write_image_grid
from facesphere.evaluate.plots import save_figure
from facesphere.utils.files import atomic_write_text, check_writable

logger = logging.getLogger(__name__)

__all__ = ["PROFILE", "check_new_output", "noise_figures", "rewrite_report", "write_cleaning", "write_report"]

PROFILE = "profile"  # the saved NoiseProfile inside a cleaning output folder
REPORT_JSON, REPORT_HTML, HISTOGRAMS = "report.json", "report.html", "histograms.png"
SHEETS = {"flip": "flips.png", "outlier": "outliers.png", "duplicate": "duplicates.png"}
STATUS_NAMES = {Status.CLEAN: "clean", Status.FLIP: "flip", Status.OUTLIER: "outlier", Status.DUPLICATE: "duplicate",
                Status.UNREADABLE: "unreadable"}
_BLANK = np.full((8, 8, 3), 255, np.uint8)  # an empty slot (an identity with fewer typical images)
_GREY = np.full((8, 8, 3), 160, np.uint8)  # an image that could not be read


def _number(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def _rate(count: int, total: int) -> float | None:
    return count / total if total else None


def noise_figures(profile) -> dict:
    """The report's figures: ``summary`` (``NoiseProfile.summary`` with the label-noise rate added), ``problems``,
    and ``identities``, one record per identity (see the module doc)."""
    status = np.asarray(profile.status)
    labels = np.asarray(profile.labels, dtype=np.int64)
    classes = len(profile.identity_names)
    summary = {key: _number(value) if isinstance(value, float) else value for key, value in profile.summary().items()}
    summary["noise_rate"] = _rate(summary["flip"] + summary["outlier"], summary["readable"])
    per = {name: np.bincount(labels[status == code], minlength=classes)[:classes]
           for code, name in STATUS_NAMES.items() if code != Status.CLEAN}
    size = np.asarray(profile.identity_size, dtype=np.int64)
    identities = [{"label": c, "identity": profile.identity_names[c], "size": int(size[c]),
                   "centres": int(profile.identity_centres[c]), "spread": _number(profile.identity_spread[c]),
                   "flips": int(per["flip"][c]), "outliers": int(per["outlier"][c]),
                   "duplicates": int(per["duplicate"][c]), "unreadable": int(per["unreadable"][c]),
                   "noise_fraction": _rate(int(per["flip"][c] + per["outlier"][c]), int(size[c]))}
                  for c in range(classes)]
    return {"summary": summary, "problems": list(profile.problems), "identities": identities}


def _histograms(profile, figures: dict, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15.0, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    status = np.asarray(profile.status)
    bins = np.linspace(-1.0, 1.0, 81)
    for ax, values, title in ((axes[0], profile.own_cosine, "cosine to own identity (leave-one-out)"),
                              (axes[1], profile.other_cosine, "cosine to nearest other identity")):
        values = np.asarray(values, dtype=np.float64)
        for code, name in STATUS_NAMES.items():
            chosen = values[(status == code) & np.isfinite(values)]
            if len(chosen):
                ax.hist(chosen, bins=bins, histtype="step", linewidth=1.5, label=f"{name} ({len(chosen)})")
        ax.axvline(profile.threshold, color="black", linestyle="--", label=f"threshold {profile.threshold:.3f}")
        ax.set_yscale("symlog")
        ax.set(xlabel="cosine", ylabel="images", title=title)
        ax.legend(fontsize=8)
    fractions = [r["noise_fraction"] for r in figures["identities"] if r["noise_fraction"] is not None]
    axes[2].hist(fractions, bins=np.linspace(0.0, 1.0, 21), color="tab:red")
    axes[2].set_yscale("symlog")
    axes[2].set(xlabel="(flips + outliers) / images", ylabel="identities",
                title=f"per-identity noise fraction ({len(fractions)} identities)")
    return save_figure(fig, path)


def _sheet(profile, kind: str, load_image: Callable, path: Path, max_rows: int, typical: int) -> tuple[Path, int, int]:
    """The contact sheet of ``kind``: (path, rows shown, flagged in all)."""
    status = np.asarray(profile.status)
    flagged = np.flatnonzero(status == {"flip": Status.FLIP, "outlier": Status.OUTLIER,
                                        "duplicate": Status.DUPLICATE}[kind])
    own = np.asarray(profile.own_cosine, dtype=np.float64)
    other = np.asarray(profile.other_cosine, dtype=np.float64)
    if kind == "flip":  # most confident first: the largest lead of the other identity over its own
        flagged = flagged[np.argsort(-(np.nan_to_num(other[flagged], nan=-2) - np.nan_to_num(own[flagged], nan=2)),
                                     kind="stable")]
    elif kind == "outlier":  # farthest from every identity first
        flagged = flagged[np.argsort(np.nan_to_num(np.fmax(own[flagged], other[flagged]), nan=2), kind="stable")]
    shown = flagged[:max_rows]
    labels = np.asarray(profile.labels, dtype=np.int64)
    suggested = np.asarray(profile.other_label, dtype=np.int64)
    names = profile.identity_names
    typical_of = typical_images(profile, [*labels[shown], *suggested[shown][suggested[shown] >= 0]], typical)
    cache: dict[int, np.ndarray] = {}

    def image(index: int) -> np.ndarray:
        if index not in cache:
            try:
                cache[index] = np.asarray(load_image(profile.sources[index]))
            except Exception as error:  # noqa: BLE001 - any unreadable image becomes a grey tile, never a crash
                logger.warning("%s: %s", profile.sources[index], error)
                cache[index] = _GREY
        return cache[index]

    def group(indices: list[int], caption: str) -> tuple[list[np.ndarray], list[str]]:
        indices = indices[:typical]
        return ([image(i) for i in indices] + [_BLANK] * (typical - len(indices)),
                [caption] * len(indices) + [""] * (typical - len(indices)))

    tiles, captions = [], []
    for index in shown:
        label, other_label = int(labels[index]), int(suggested[index])
        first = f"#{index} {names[label]}" + (f" -> {names[other_label]}" if kind == "flip" else "")
        row_tiles, row_captions = [image(int(index))], [first]
        if kind == "duplicate":
            dup = int(profile.duplicate_of[index])
            row_tiles.append(image(dup) if dup >= 0 else _BLANK)
            row_captions.append(f"same as #{dup}" if dup >= 0 else "")
        for indices, caption in [(typical_of.get(label, []), names[label])] + (
                [(typical_of.get(other_label, []), names[other_label])] if kind == "flip" else []):
            group_tiles, group_captions = group(indices, caption)
            row_tiles += group_tiles
            row_captions += group_captions
        tiles += row_tiles
        captions += row_captions
    columns = 1 + (kind == "duplicate") + typical * (2 if kind == "flip" else 1)
    title = {"flip": "flips: image (own -> suggested) | typical of own identity | typical of suggested identity",
             "outlier": "outliers: image | typical of own identity",
             "duplicate": "duplicates: image | the image it repeats | typical of own identity"}[kind]
    if not tiles:
        tiles, captions, columns = [_BLANK], ["none flagged"], 1
    write_image_grid(path, tiles, captions, columns=columns, tile=96,
                     title=f"{title}  ({len(shown)} of {len(flagged)} shown)")
    return path, len(shown), len(flagged)


def _table(columns: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    head = f"<thead><tr>{head}</tr></thead>" if columns else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in row) + "</tr>"
                   for row in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _html(profile, figures: dict, sheets: dict[str, tuple[Path, int, int]], max_rows: int) -> str:
    e = html.escape
    s = figures["summary"]
    summary = _table([], [
        ["model", s["model"]], ["threshold (cosine)", f"{s['threshold']:.4f} at FAR {s['far']:g}"],
        ["images (readable)", f"{s['images']} ({s['readable']})"], ["identities", s["identities"]],
        *[[name, s[name]] for name in STATUS_NAMES.values()],
        ["estimated flip rate", _percent(s["flip_rate"])], ["estimated outlier rate", _percent(s["outlier_rate"])],
        ["estimated label-noise rate (flips + outliers)", _percent(s["noise_rate"])],
        ["duplicate rate", _percent(s["duplicate_rate"])]])
    problems = ("<ul>" + "".join(f"<li><code>{e(str(p.get('source', '')))}</code>: {e(str(p.get('reason', '')))}</li>"
                                 for p in figures["problems"][:max_rows]) + "</ul>"
                + (f"<p>{len(figures['problems']) - max_rows} more in {REPORT_JSON}</p>"
                   if len(figures["problems"]) > max_rows else "")) if figures["problems"] else "<p>none</p>"
    noisy = sorted((r for r in figures["identities"] if r["flips"] + r["outliers"] + r["duplicates"]),
                   key=lambda r: (-(r["noise_fraction"] or 0), -r["size"], r["label"]))
    identity_table = _table(["label", "identity", "images", "centres", "spread", "flips", "outliers", "duplicates",
                             "noise fraction"],
                            [[r["label"], r["identity"], r["size"], r["centres"],
                              "n/a" if r["spread"] is None else f"{r['spread']:.3f}", r["flips"], r["outliers"],
                              r["duplicates"], _percent(r["noise_fraction"])] for r in noisy[:max_rows]])
    status = np.asarray(profile.status)
    unreadable = np.flatnonzero(status == Status.UNREADABLE)
    reasons = {p.get("source"): p.get("reason", "") for p in figures["problems"]}
    unreadable_table = _table(["image", "identity", "reason"],
                              [[profile.sources[i], profile.identity_names[int(profile.labels[i])],
                                reasons.get(profile.sources[i], "unreadable")] for i in unreadable[:max_rows]])
    sheet_html = "".join(
        f"<h3>{e(kind)}s: {shown} of {total} shown</h3><p><a href=\"{e(FLAGGED_FILES[kind])}\">"
        f"{e(FLAGGED_FILES[kind])}</a> lists all of them.</p><img src=\"{e(path.name)}\" alt=\"{e(kind)} contact sheet\">"
        for kind, (path, shown, total) in sheets.items())
    files = " · ".join(f"<a href=\"{e(name)}\">{e(name)}</a>"
                       for name in (KEPT, *FLAGGED_FILES.values(), UNREADABLE, TYPICAL, REPORT_JSON))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>facesphere noise report</title>
<style>body{{font-family:system-ui,sans-serif;margin:1.5em;max-width:1400px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}}img{{max-width:100%}}code{{word-break:break-all}}</style>
</head><body>
<h1>Noise report: {e(s['model'])}</h1>
<p>Lists: {files}</p>
<h2>Summary</h2>{summary}
<h2>Problems</h2>{problems}
<h2>Histograms</h2><img src="{e(HISTOGRAMS)}" alt="cosine histograms">
<h2>Flagged images</h2>{sheet_html}
<h2>Identities with flagged images ({min(len(noisy), max_rows)} of {len(noisy)} shown; all in {e(REPORT_JSON)})</h2>
{identity_table}
<h2>Unreadable images ({min(len(unreadable), max_rows)} of {len(unreadable)} shown)</h2>{unreadable_table}
</body></html>
"""


def write_report(profile, out_dir: str | os.PathLike, load_image: Callable[[str], np.ndarray] = load_source,
                 max_rows: int = 40, typical: int = 4) -> dict:
    """Write the report of ``profile`` (a ``NoiseProfile``) into ``out_dir`` (see the module doc) and return the
    figures of ``report.json``. ``load_image(source)`` returns an image as HxWx3 uint8 RGB (it may raise: that
    image is drawn grey); at most ``max_rows`` flagged images per sheet and rows per HTML table."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = noise_figures(profile)
    _histograms(profile, figures, out_dir / HISTOGRAMS)
    sheets = {kind: _sheet(profile, kind, load_image, out_dir / name, max_rows, typical) for kind, name in SHEETS.items()}
    figures["files"] = {"histograms": HISTOGRAMS, **{f"{kind}_sheet": name for kind, name in SHEETS.items()},
                        "html": REPORT_HTML}
    atomic_write_text(out_dir / REPORT_JSON, json.dumps(figures, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    atomic_write_text(out_dir / REPORT_HTML, _html(profile, figures, sheets, max_rows))
    s = figures["summary"]
    logger.info("%s: report of %d images (flip rate %s, outlier rate %s)", out_dir, s["images"],
                _percent(s["flip_rate"]), _percent(s["outlier_rate"]))
    return figures


def check_new_output(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` when a cleaning can be written there: a writable folder without a finished cleaning (``kept.txt``:
    its review decisions would be lost; an interrupted profiling may resume); a FileExistsError naming it otherwise,
    before any work is done."""
    out_dir = check_writable(out_dir, folder=True)
    if (out_dir / KEPT).exists():
        raise FileExistsError(f"{out_dir}: holds a finished cleaning (its review decisions would be lost); give a new "
                              "folder, or `facesphere clean report` to render its report again")
    return out_dir


def write_cleaning(profile, out_dir: str | os.PathLike, load_image: Callable[[str], np.ndarray] = load_source) -> dict:
    """The list files and the report of ``profile`` in ``out_dir`` (the profile itself belongs in
    ``out_dir/profile``, where ``rewrite_report`` finds it); returns a short summary."""
    out_dir = Path(out_dir)
    written = write_cleaned_lists(profile, out_dir)
    return _summary(write_report(profile, out_dir, load_image), out_dir, written)


def rewrite_report(out_dir: str | os.PathLike, load_image: Callable[[str], np.ndarray] = load_source) -> dict:
    """Render the report of a cleaning output folder again from its saved profile (the lists are left alone)."""
    from facesphere.cleaning.profile import NoiseProfile

    out_dir = Path(out_dir)
    if not (out_dir / PROFILE).is_dir():
        raise FileNotFoundError(f"{out_dir / PROFILE}: no saved profile; not the output folder of facesphere clean profile")
    return _summary(write_report(NoiseProfile.load(out_dir / PROFILE), out_dir, load_image), out_dir)


def _summary(figures: dict, out_dir: Path, written: dict | None = None) -> dict:
    summary = dict(figures["summary"])
    if written is not None:
        summary["lists"] = written
    summary["report"] = str(out_dir / REPORT_HTML)
    return summary
