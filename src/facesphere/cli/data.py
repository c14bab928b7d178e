"""``facesphere data ...``: dataset utilities."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from facesphere.cli.errors import user_errors

logger = logging.getLogger("facesphere")
app = typer.Typer(help="Dataset utilities.", no_args_is_help=True)


@app.command("synth")
def synth(output: Path = typer.Argument(..., help="folder to write <identity>/<sample>.png into"),
          identities: int = typer.Option(100, min=2), samples: int = typer.Option(20, min=1),
          height: int = typer.Option(112, min=16), width: int = typer.Option(112, min=16),
          seed: int = typer.Option(0), difficulty: float = typer.Option(1.0, min=0.0)) -> None:
    """Write synthetic face identities as an image folder (one sub-folder per identity)."""
    from facesphere.data import SyntheticFaces, write_image_folder

    with user_errors():
        dataset = SyntheticFaces(identities, samples, image_size=(height, width), seed=seed, difficulty=difficulty)
        write_image_folder(dataset, output)
    logger.info("wrote %d images of %d identities to %s", len(dataset), identities, output)
