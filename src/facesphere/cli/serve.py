"""``facesphere serve``: the REST API and web page over a persistent gallery (uvicorn)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from facesphere.cli.errors import user_errors
from facesphere.cli.faces import (
    MODEL_HELP,
    AgeModelOpt,
    DetectorOpt,
    IndexOpt,
    RectifierOpt,
    StorageOpt,
    ThreadsOpt,
    WeightsOpt,
)

logger = logging.getLogger("facesphere")


def serve(gallery: Path = typer.Option(..., "--gallery", help="gallery database (SQLite), created if missing"),
          model: Path = typer.Option(..., "--model", help=MODEL_HELP), detector: str = DetectorOpt,
          detector_weights: Path = WeightsOpt,
          api_keys: Optional[Path] = typer.Option(None, "--api-keys", exists=True, dir_okay=False,
                                                  help="file of API keys, one per line (default: $FACESPHERE_API_KEYS)"),
          host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (0.0.0.0: every interface)"),
          port: int = typer.Option(8000, "--port", min=0, max=65535),
          threshold: Optional[Path] = typer.Option(None, "--threshold", help="calibrated threshold file "
                                                   "(`facesphere calibrate`) for open-set matches and verify"),
          match_threshold: Optional[float] = typer.Option(None, "--match-threshold", min=-1.0, max=1.0,
                                                          help="open-set cosine threshold, when not calibrated"),
          index: str = IndexOpt, storage: str = StorageOpt,
          max_upload_mb: float = typer.Option(10.0, "--max-upload-mb", min=0.01, help="largest request body"),
          max_pixels: int = typer.Option(25_000_000, "--max-pixels", min=1, help="largest image, width x height"),
          max_faces: int = typer.Option(20, "--max-faces", min=1, help="faces analysed per photo"),
          flip: bool = typer.Option(True, "--flip/--no-flip", help="flip-sum test-time augmentation"),
          threads: Optional[int] = ThreadsOpt, age_model: Optional[Path] = AgeModelOpt,
          rectifier: Optional[Path] = RectifierOpt,
          review: Optional[Path] = typer.Option(None, "--review", help="output folder of `facesphere clean profile`: "
                                                "review its flagged images on the page /review")) -> None:
    """Serve detect / embed / verify / identify and gallery enrolment over HTTP, with a web page at / (and the
    review of a cleaning at /review with --review)."""
    import uvicorn

    from facesphere.pipeline import AnalyzerSpec
    from facesphere.service import ServiceSettings, build_app, read_api_keys

    with user_errors():
        settings = ServiceSettings(api_keys=read_api_keys(api_keys), max_request_bytes=int(max_upload_mb * 2**20),
                                   max_image_pixels=max_pixels, max_faces=max_faces, match_threshold=match_threshold)
        spec = AnalyzerSpec(detector=detector, detector_weights=detector_weights, model=model, threads=threads,
                            flip=flip, age_model=age_model, rectifier=rectifier)
        app = build_app(spec, gallery, settings, threshold=threshold, index=index, storage=storage, review=review)
        service = app.state.service
        logger.info("serving %s (%d identities) on http://%s:%d  (page /, API /docs, spec /openapi.json)",
                    service.analyzer.embedder.card.name, len(service.gallery), host, port)
    uvicorn.run(app, host=host, port=port, log_level="info", log_config=None)
