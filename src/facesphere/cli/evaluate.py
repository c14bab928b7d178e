"""``facesphere eval MODEL PROTOCOL DATA``: a stored model or training checkpoint on a registered protocol.

The preprocessing comes from the model's card (``evaluate.model_input``), and any mismatch between
the card and what is fed (colour order, size) is refused before a single embedding is computed.
Writes ``results.json`` (atomically), ``results.md`` and the protocol's plots into ``--out``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any, Optional

import typer

from facesphere.cli.errors import user_errors
from facesphere.utils.device import resolve_device
from facesphere.utils.overrides import parse_options

logger = logging.getLogger("facesphere")

SET_HELP = ("protocol option key=value (repeatable), e.g. pairs=/data/lfw/pairs.txt, root=..., n_folds=10, "
            "val_far=1e-3; center_crop=HxW keeps the central HxW region (112x96 on ArcFace 112x112 crops for a "
            "SphereFace 112x96 model: columns 8..103); alignment=NAME declares the data's alignment template")
MODEL_HELP = ("model folder written by `facesphere import` / save_model (card.json + model.safetensors), "
              "a training checkpoint (runs/<name>/checkpoints/step_*.pt), or a run folder (its newest checkpoint)")
COLOUR_HELP = ("colour order the images are fed in: RGB (what facesphere's loaders yield) or BGR (the loaded "
               "images are really channel-swapped, as a caller feeding BGR would; refused unless the card expects BGR)")

def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers quoted first: accuracy ± std, VAL@FAR, or rank-1 for identification."""
    out: dict[str, Any] = {}
    if "accuracy_mean" in report:
        out.update(accuracy_mean=report["accuracy_mean"], accuracy_std=report["accuracy_std"])
    val = report.get("val_at_far")
    if isinstance(val, dict):
        out.update(val_far=val.get("far_target"), val_mean=val.get("val_mean"), val_std=val.get("val_std"))
    if "rank_1" in report:
        out["rank_1"] = report["rank_1"]
    return out


def _pct(value: Any, std: Any = None) -> str:
    if not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.2f}%" + (f" ± {100 * std:.2f}" if isinstance(std, (int, float)) else "")


def markdown(results: dict[str, Any]) -> str:
    """A small markdown table of the headline numbers and the input that produced them."""
    h, t, inp = results["headline"], results["throughput"], results["input"]
    far = h.get("val_far")
    rows = [
        ("model", f"{results['model']['name']} ({results['model']['kind']})"),
        ("protocol", results["protocol"]),
        ("data", results["data"]),
        ("accuracy (10-fold mean ± std)" if "accuracy_mean" in h else "rank-1",
         _pct(h.get("accuracy_mean"), h.get("accuracy_std")) if "accuracy_mean" in h else _pct(h.get("rank_1"))),
    ]
    if far is not None:
        rows.append((f"VAL@FAR={far:g}", _pct(h.get("val_mean"), h.get("val_std"))))
    ips = t.get("images_per_second")
    rows += [
        ("images", str(t["images"])),
        ("images/s", f"{ips:.1f}" if ips else "n/a"),
        ("wall time", f"{results['wall_seconds']:.1f} s"),
        ("flip", str(results["flip"])),
        ("model input", inp["model_expects"]),
        ("fed", f"{inp['fed_colour_order']}, alignment {inp['fed_alignment'] or 'not declared'}"),
        ("center crop", inp["center_crop"] or "none"),
    ]
    lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return f"# {results['model']['name']} on {results['protocol']}\n\n" + "\n".join(lines) + "\n"


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "model"


def evaluate(model: Path = typer.Argument(..., help=MODEL_HELP),
             protocol: str = typer.Argument(..., help="registered protocol: lfw, bin, csv, cacd_vs, "
                                                      "fgnet_identification, fgnet_verification"),
             data: Path = typer.Argument(..., help="the protocol's data path (LFW: aligned image folder or pairs.txt)"),
             options: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
             out: Optional[Path] = typer.Option(None, "--out", help="output folder (default runs/eval/<model>-<protocol>/)"),
             flip: bool = typer.Option(True, "--flip/--no-flip", help="add the mirrored image's embedding (flip-sum)"),
             batch_size: int = typer.Option(64, "--batch-size", min=1),
             device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, ..."),
             input_colour: str = typer.Option("RGB", "--input-colour", help=COLOUR_HELP),
             ) -> None:
    """Evaluate a model folder or training checkpoint on a protocol, with the preprocessing its card asks for."""
    from facesphere.evaluate.model_input import evaluate_with_card
    from facesphere.models.runs import load_backbone
    from facesphere.utils.files import atomic_write_text

    started = time.perf_counter()
    with user_errors():
        colour = input_colour.upper()
        if colour not in ("RGB", "BGR"):
            raise ValueError(f"--input-colour must be RGB or BGR, got {input_colour!r}")
        parsed = parse_options(options)
        resolved = str(resolve_device(device))
        backbone, card, described = load_backbone(model, resolved)
        out_dir = out if out is not None else Path("runs") / "eval" / f"{_safe_name(card.name)}-{protocol}"
        report = evaluate_with_card(backbone, card, protocol, data, parsed, fed_colour=colour, flip=flip,
                                    batch_size=batch_size, device=resolved, out_dir=out_dir)
        wall = time.perf_counter() - started
        results = {
            "model": {"name": card.name, **described, "card": card.model_dump(mode="json")},
            "protocol": protocol,
            "data": str(data),
            "options": report.pop("options"),
            "input": report.pop("input"),
            "flip": flip,
            "batch_size": batch_size,
            "device": resolved,
            "headline": headline(report),
            "throughput": report.pop("throughput"),
            "wall_seconds": wall,
            "report": report,
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2, default=str) + "\n")
        atomic_write_text(out_dir / "results.md", markdown(results))
    h, ips = results["headline"], results["throughput"]["images_per_second"]
    parts = []
    if "accuracy_mean" in h:
        parts.append(f"accuracy {_pct(h['accuracy_mean'], h['accuracy_std'])}")
    if "rank_1" in h:
        parts.append(f"rank-1 {_pct(h['rank_1'])}")
    if h.get("val_far") is not None:
        parts.append(f"VAL@FAR={h['val_far']:g} {_pct(h.get('val_mean'), h.get('val_std'))}")
    parts += [f"{ips:.1f} images/s" if ips else "images/s n/a", f"wall {wall:.1f} s"]
    logger.info("%s on %s: %s", card.name, protocol, ", ".join(parts))
    logger.info("results: %s (and results.md, plots) in %s", out_dir / "results.json", out_dir)
