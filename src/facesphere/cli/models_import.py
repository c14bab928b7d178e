"""``facesphere import``: convert public weights into a facesphere model folder (weights + card)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from facesphere.cli.errors import user_errors

logger = logging.getLogger("facesphere")

KIND_HELP = ("auto (by file type) or an importer of facesphere.models.importers.IMPORTERS: insightface "
             "(MXNet MobileFaceNet/iResNet, architecture detected), insightface_mobilefacenet, insightface_iresnet, "
             "xiaoccer (PyTorch MobileFaceNet); an unknown name lists them")


def import_model(source: Path = typer.Argument(..., help="checkpoint file, or a folder holding one "
                                                         "(MXNet: model-0000.params + model-symbol.json)"),
                 output: Path = typer.Argument(..., help="model folder to write (model.safetensors + card.json)"),
                 kind: str = typer.Option("auto", help=KIND_HELP),
                 name: Optional[str] = typer.Option(None, help="model name for the card (default: known name or derived)"),
                 overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing model in OUTPUT"),
                 ) -> None:
    """Convert public weights (InsightFace MXNet, Xiaoccer PyTorch) into a facesphere model folder."""
    from facesphere.models import import_weights, save_model
    from facesphere.models.store import CARD_FILE, WEIGHTS_FILE

    with user_errors():
        existing = [f for f in (CARD_FILE, WEIGHTS_FILE) if (output / f).exists()]
        if existing and not overwrite:
            raise ValueError(f"{output} already holds a model ({', '.join(existing)}); pass --overwrite to replace it")
        backbone, card = import_weights(source, kind=kind, name=name)
        save_model(output, backbone, card)
    for line in card.describe().splitlines():
        logger.info("%s", line)
    logger.info("wrote %s and %s to %s", WEIGHTS_FILE, CARD_FILE, output)
