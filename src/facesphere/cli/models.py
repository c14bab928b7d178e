"""``facesphere backbones`` and ``facesphere heads``: what is registered, and what it costs."""

from __future__ import annotations

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
    kwargs = {"embedding_size": embedding_size} if embedding_size else {}
    with user_errors():
        for key in [name] if name else BACKBONES.names():
            model = build_backbone(key, **kwargs)
            c = count_complexity(model)
            h, w = model.input_size
            table.add_row(key, f"{h}x{w}", str(model.embedding_size), f"{c.parameters / 1e6:.3f}M", f"{c.multiply_adds / 1e6:.1f}M")
    Console().print(table)


def heads() -> None:
    """List the margin heads and their first docstring line."""
    from facesphere.heads import HEADS

    names = HEADS.names()
    width = max(map(len, names))
    for key in names:
        doc = (HEADS.get(key).__doc__ or "").strip().splitlines()
        typer.echo(f"{key:{width}s} {doc[0] if doc else ''}")
