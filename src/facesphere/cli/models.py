"""``facesphere backbones`` and ``facesphere heads``: what is registered, and what it costs."""

from __future__ import annotations

import inspect
from typing import Optional

import typer

from facesphere.cli.errors import user_errors


def backbones(name: Optional[str] = typer.Argument(None, help="one backbone; omit for all"),
              embedding_size: Optional[int] = typer.Option(None, help="embedding size D (default: the backbone's)")) -> None:
    """List backbones with parameters and multiply-adds at their input size."""
    from rich.console import Console
    from rich.table import Table

    from facesphere.backbones import BACKBONES, build_backbone, count_complexity

    table = Table("backbone", "input (HxW)", "D", "parameters", "multiply-adds")
    with user_errors():
        for key in [name] if name else BACKBONES.names():
            model = build_backbone(key, **_embedding_size_args(BACKBONES.get(key), embedding_size))
            c = count_complexity(model)
            h, w = model.input_size
            table.add_row(key, f"{h}x{w}", str(model.embedding_size), f"{c.parameters / 1e6:.3f}M", f"{c.multiply_adds / 1e6:.1f}M")
    Console().print(table)


def _embedding_size_args(constructor, embedding_size: int | None) -> dict:
    """``embedding_size`` for a backbone, or for the recogniser inside a wrapper (GridFace / STN)."""
    if not embedding_size:
        return {}
    parameters = inspect.signature(constructor).parameters
    if "embedding_size" not in parameters and "recognizer_args" in parameters:
        return {"recognizer_args": {"embedding_size": embedding_size}}
    return {"embedding_size": embedding_size}


def heads() -> None:
    """List the margin heads and their first docstring line."""
    from facesphere.heads import HEADS

    names = HEADS.names()
    width = max(map(len, names))
    for key in names:
        doc = (HEADS.get(key).__doc__ or "").strip().splitlines()
        typer.echo(f"{key:{width}s} {doc[0] if doc else ''}")
