"""``facesphere export SOURCE OUT``: a model folder, training run or checkpoint as a model folder or ONNX file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from facesphere.cli.errors import user_errors

logger = logging.getLogger("facesphere")

Source = typer.Argument(..., help="model folder (card.json + model.safetensors), training run folder (its newest "
                                  "checkpoint) or checkpoint file (step_XXXXXXXX.pt)")
Output = typer.Argument(..., help="OUT.onnx: one ONNX file (dynamic batch axis); any other path: a model folder")


def export_command(source: Path = Source, output: Path = Output,
                   name: Optional[str] = typer.Option(None, help="model name for the card (default: the source's)"),
                   opset: Optional[int] = typer.Option(None, help="ONNX opset (default: the exporter's)"),
                   fold_bn: bool = typer.Option(True, "--fold-bn/--keep-bn", help="ONNX: fold BatchNorm into the convs"),
                   check: bool = typer.Option(True, "--check/--no-check",
                                              help="reload what was written and compare embeddings on 4 random crops"),
                   overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing OUT"),
                   ) -> None:
    """Export a stored model or training run as a model folder or an ONNX file (card included), then check it."""
    from facesphere.models.export import export_model

    with user_errors():
        exported = export_model(source, output, name=name, overwrite=overwrite, check=check, opset=opset,
                                fold_bn=fold_bn)
    if exported.parity is not None:
        logger.info("check: %s", exported.parity.describe())
    logger.info("wrote %s %s (%s)", exported.kind, exported.path, exported.card.input_spec.describe())
