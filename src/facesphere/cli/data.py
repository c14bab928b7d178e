"""``facesphere data ...``: dataset utilities."""

from __future__ import annotations

import contextlib
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


@app.command("pack")
def pack(folder: Path = typer.Argument(..., help="image folder: one sub-folder per identity"),
         out_dir: Path = typer.Argument(..., help="folder to write train.rec, train.idx and property into"),
         jpeg: bool = typer.Option(False, "--jpeg", help="re-encode non-JPEG images as JPEG (smaller, lossy); "
                                                        "default: JPEG/PNG kept byte for byte, others stored as PNG"),
         quality: int = typer.Option(95, min=1, max=100, help="JPEG quality with --jpeg"),
         overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing train.rec/idx/property"),
         verify: bool = typer.Option(True, "--verify/--no-verify", help="decode every image while packing"),
         ages: str = typer.Option("none", help="where the images' ages come from: none, side_file (ages.csv in "
                                               "the folder) or fgnet_names (SSSAyy[x].JPG); stored in each record's "
                                               "label as [identity, age]")) -> None:
    """Pack an image folder into an InsightFace RecordIO dataset (train.rec, train.idx, property)."""
    from facesphere.data.record_dataset import pack_folder

    with user_errors():
        pack_folder(folder, out_dir, quality=quality, jpeg=jpeg, overwrite=overwrite, verify=verify, ages=ages)


@app.command("remap-list")
def remap_list(list_file: Path = typer.Argument(..., exists=True, dir_okay=False, help="list file of '<path> <label>' lines"),
               out: Path = typer.Argument(..., dir_okay=False, help="list file to write, with labels renumbered 0..N-1")) -> None:
    """Renumber a list file's labels 0..N-1 (old order kept; each line notes its old label), so the classifier is
    sized by the identities in use, not by the largest label. Paths are copied as they are: write the new list
    next to the old one (relative paths start at the list's folder) or set data.root."""
    from facesphere.data.lists import remap_list_file

    with user_errors():
        if out.resolve() == list_file.resolve():
            raise FileExistsError(f"{out}: give a new file (the original keeps the old labels)")
        classes = remap_list_file(list_file, out)
    logger.info("wrote %s: %d classes", out, classes)


@app.command("inspect")
def inspect(path: Path = typer.Argument(..., help="dataset folder (with train.rec) or a .rec file"),
            samples: int = typer.Option(16, min=0, help="images to decode (evenly spaced) and show on the sheet"),
            sheet: Path | None = typer.Option(None, help="write a contact sheet PNG of the samples here"),
            json_output: bool = typer.Option(False, "--json", help="print the summary as JSON on stdout")) -> None:
    """Counts, identity sizes, image size and format of a RecordIO dataset; optionally a contact sheet."""
    import json

    import numpy as np

    from facesphere.data.record_dataset import RecordDataset, describe_records

    quiet = _quiet_logging() if json_output else contextlib.nullcontext()  # keep stdout pure JSON
    with user_errors(), quiet:
        dataset = RecordDataset(path)
        info = describe_records(dataset)
        picks = np.unique(np.linspace(0, len(dataset) - 1, min(samples, len(dataset))).astype(int)).tolist() if samples else []
        images = [dataset.decode(i) for i in picks]  # ImageError (exit 2) names <rec>#<key>
        captions = [f"#{int(dataset.keys[i])} id {int(dataset.labels[i])}" for i in picks]
        info["samples_decoded"] = len(images)
        info["sample_sizes"] = sorted({f"{im.shape[0]}x{im.shape[1]}" for im in images})
        if sheet is not None:
            from facesphere.evaluate.contact_sheet import write_image_grid

            write_image_grid(sheet, images, captions, title=f"{dataset.rec_path.name}: {len(dataset)} images, "
                                                            f"{dataset.num_classes} classes")
            info["sheet"] = str(sheet)
    if json_output:
        typer.echo(json.dumps(info, indent=2))
        return
    _print_summary(info)


@contextlib.contextmanager
def _quiet_logging():
    """Only warnings and errors from facesphere while the block runs (log lines share stdout with --json)."""
    package = logging.getLogger("facesphere")
    level = package.level
    package.setLevel(logging.WARNING)
    try:
        yield
    finally:
        package.setLevel(level)


def _print_summary(info: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=info["rec"], show_header=False)
    per = info["images_per_identity"]
    rows = [("layout", f"{info['layout']}" + (f" (header {info['header']})" if info["header"] else "")),
            ("records", f"{info['records']:,} ({info['rec_bytes'] / 1e6:,.1f} MB)"), ("images", f"{info['images']:,}"),
            ("identities", (f"{info['identities']:,} ({info['identities_with_images']:,} with images, "
                            f"{info['identity_records']:,} identity records)")),
            ("images per identity", f"min {per['min']}, median {per['median']:g}, max {per['max']}"),
            ("images with an age", f"{info['images_with_age']:,}"),
            ("image size", "x".join(map(str, info["image_size"])) + f" (stored: {info['stored_sizes']})"),
            ("formats", f"{info['formats']} of {info['formats_checked']} checked"),
            ("property", str(info["property"]) if info["property"] else "absent"),
            ("samples decoded", f"{info['samples_decoded']} {info['sample_sizes']}")]
    if "sheet" in info:
        rows.append(("contact sheet", info["sheet"]))
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)
