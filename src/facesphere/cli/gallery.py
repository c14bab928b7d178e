"""``facesphere gallery enrol | list | remove | check``: manage a gallery database offline.

A running ``facesphere serve`` keeps its index in memory: restart it after offline changes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from facesphere.cli.errors import user_errors
from facesphere.cli.faces import (
    MODEL_HELP,
    DetectorOpt,
    IndexOpt,
    OutOpt,
    StorageOpt,
    ThreadsOpt,
    WeightsOpt,
    analyzer_from_flags,
    emit,
)

logger = logging.getLogger("facesphere")
app = typer.Typer(help="Enrol, list, remove and check the identities of a gallery database.", no_args_is_help=True)
GalleryArg = typer.Argument(..., help="gallery database (SQLite)")


@app.command("enrol")
def enrol(gallery: Path = GalleryArg,
          folder: Path = typer.Argument(..., exists=True, file_okay=False,
                                        help="one sub-folder of photos per person; the sub-folder's name is the identity"),
          model: Path = typer.Option(..., "--model", help=MODEL_HELP), detector: str = DetectorOpt,
          detector_weights: Path = WeightsOpt, batch: int = typer.Option(16, "--batch", min=1, help="photos per pass"),
          threads: Optional[int] = ThreadsOpt) -> None:
    """Enrol the largest face of every photo (one template per photo); photos without a face are reported."""
    from rich.progress import Progress

    from facesphere.gallery import Gallery, identity_name
    from facesphere.pipeline import PeopleFolder

    with user_errors():
        people = PeopleFolder(folder)
        for person in people.people:  # every name is checked before any model is loaded or anything written
            identity_name(person.name)
        analyzer = analyzer_from_flags(detector, detector_weights, model, threads=threads)
        skipped = 0
        with Gallery(gallery, analyzer.embedder.card) as store, Progress() as progress:
            task = progress.add_task("enrolling", total=len(people))
            for person in people.embed(analyzer, batch):
                for problem in person.skipped:
                    logger.warning("%s", problem)
                skipped += len(person.skipped)
                if person.embeddings:
                    store.enrol(person.name, person.embeddings, sources=person.sources)
                progress.advance(task)
            logger.info("%s: %d identities; %d photos skipped", gallery, len(store), skipped)


@app.command("list")
def list_identities(gallery: Path = GalleryArg, out: Optional[Path] = OutOpt) -> None:
    """Identities with their metadata and template counts, and the model the gallery is bound to, as JSON."""
    from facesphere.gallery import Gallery

    with user_errors(), Gallery(gallery) as store:
        emit({"model": store.card.name, "embedding_size": store.embedding_size,
              "identities": [{"name": i.name, "metadata": i.metadata, "templates": i.templates}
                             for i in store.identities()]}, out)


@app.command("remove")
def remove(gallery: Path = GalleryArg, names: list[str] = typer.Argument(..., help="identities to delete")) -> None:
    """Delete identities and all their templates."""
    from facesphere.gallery import Gallery

    with user_errors(), Gallery(gallery) as store:
        for name in names:
            store.remove(name)
            logger.info("removed %r", name)


@app.command("check")
def check(gallery: Path = GalleryArg, index: str = IndexOpt, storage: str = StorageOpt) -> None:
    """Build the search index from the store and check that every identity's template finds itself first."""
    from facesphere.gallery import open_live_gallery

    with user_errors():
        live = open_live_gallery(gallery, kind=index, storage=storage)
        try:
            logger.info("%s", live.check())
        finally:
            live.close()
