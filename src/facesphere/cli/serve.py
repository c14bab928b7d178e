"""``facesphere serve``: the REST API and web page over a persistent gallery (uvicorn)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from facesphere.cli.errors import user_errors
from facesphere.cli.faces import MODEL_HELP, DetectorOpt, ThreadsOpt, WeightsOpt, build_analyzer

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
          index: str = typer.Option("auto", "--index", help="auto, flat, hnsw or ivfpq"),
          storage: str = typer.Option("fp32", "--storage", help="index storage: fp32, fp16 or int8"),
          max_upload_mb: float = typer.Option(10.0, "--max-upload-mb", min=0.01, help="largest request body"),
          max_pixels: int = typer.Option(25_000_000, "--max-pixels", min=1, help="largest image, width x height"),
          max_faces: int = typer.Option(20, "--max-faces", min=1, help="faces analysed per photo"),
          flip: bool = typer.Option(True, "--flip/--no-flip", help="flip-sum test-time augmentation"),
          threads: Optional[int] = ThreadsOpt) -> None:
    """Serve detect / embed / verify / identify and gallery enrolment over HTTP, with a web page at /."""
    import uvicorn

    from facesphere.gallery import Gallery, LiveGallery
    from facesphere.pipeline import Threshold
    from facesphere.service import ServiceSettings, create_app, read_api_keys
    from facesphere.service.model_thread import ModelThread

    with user_errors():
        if threshold is not None and match_threshold is not None:
            raise ValueError("give --threshold or --match-threshold, not both")
        settings_keys = read_api_keys(api_keys)
        model_thread = ModelThread()  # loads and runs every network (see facesphere.service.model_thread)
        analyzer = model_thread.run(build_analyzer, detector, detector_weights, model, threads=threads, flip=flip)
        card = analyzer.embedder.card
        if threshold is not None:
            calibrated = Threshold.load(threshold)
            calibrated.check_model(card.name, card.embedding_size)
            match_threshold = calibrated.value
        if match_threshold is None:
            logger.warning("no --threshold or --match-threshold: every match is reported as known (closed-set)")
        settings = ServiceSettings(api_keys=settings_keys, max_request_bytes=int(max_upload_mb * 2**20),
                                   max_image_pixels=max_pixels, max_faces=max_faces, match_threshold=match_threshold)
        live = model_thread.run(LiveGallery, Gallery(gallery, card), kind=index, storage=storage)
        app = create_app(analyzer, live, settings, model_thread)
        logger.info("serving %s (%d identities) on http://%s:%d  (page /, API /docs, spec /openapi.json)",
                    card.name, len(live), host, port)
    uvicorn.run(app, host=host, port=port, log_level="info", log_config=None)
