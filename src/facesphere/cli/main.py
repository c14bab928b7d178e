"""Entry point: logging, allocator tuning, and the command groups."""

from __future__ import annotations

import logging
import sys

import typer

from facesphere.cli import clean as clean_commands
from facesphere.cli import data as data_commands
from facesphere.cli import evaluate as eval_commands
from facesphere.cli import export as export_commands
from facesphere.cli import faces as face_commands
from facesphere.cli import gallery as gallery_commands
from facesphere.cli import models as model_commands
from facesphere.cli import models_import
from facesphere.cli import serve as serve_commands
from facesphere.cli import train as train_commands
from facesphere.cli.errors import run_app

app = typer.Typer(name="facesphere", help="Face recognition on the hypersphere: train, evaluate and inspect models.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
app.command("train")(train_commands.train)
app.command("quickstart")(train_commands.quickstart)
app.command("backbones")(model_commands.backbones)
app.command("heads")(model_commands.heads)
app.command("config")(train_commands.show_config)
app.command("import")(models_import.import_model)
app.command("eval")(eval_commands.evaluate)
app.command("export")(export_commands.export_command)
for _name in ("detect", "align", "embed", "verify", "draw", "rectify", "calibrate"):
    app.command(_name)(getattr(face_commands, _name))
app.command("serve")(serve_commands.serve)
app.add_typer(data_commands.app, name="data")
app.add_typer(gallery_commands.app, name="gallery")
app.add_typer(clean_commands.app, name="clean")


@app.callback()
def setup(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging"),
          default_malloc: bool = typer.Option(False, "--default-malloc",
                                              help="keep glibc's default malloc thresholds (slower eager training)")) -> None:
    """Set up logging (rich on a terminal, plain lines otherwise) and tune glibc malloc (large mmap/trim
    thresholds) before any work starts."""
    from rich.console import Console
    from rich.logging import RichHandler

    from facesphere.utils.allocator import tune_malloc

    if sys.stderr.isatty():
        handler: logging.Handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)
        fmt, datefmt = "%(message)s", "[%X]"
    else:  # a log file or a pipe: one plain line per record, never wrapped at a console width
        handler, fmt, datefmt = logging.StreamHandler(sys.stderr), "%(asctime)s %(levelname)s %(message)s", "%X"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt, datefmt=datefmt, handlers=[handler],
                        force=True)  # stderr: stdout carries JSON results
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build it tried is not news
    if not default_malloc:
        tune_malloc()


def main(args: list[str] | None = None) -> None:
    """The ``facesphere`` command: every refusal is one line on stderr with exit code 2 (``cli.errors.run_app``)."""
    sys.exit(run_app(app, args))
