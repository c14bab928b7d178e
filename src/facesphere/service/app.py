"""The REST API and web page of ``facesphere serve`` (FastAPI).

Endpoints under ``/v1`` need an ``X-API-Key`` header: detect, embed, verify, identify, and enrol / list /
update / delete identities of the gallery. ``/health`` and the page (``/``) are open; the page asks for
a key and sends it with every call. Bodies over ``max_request_bytes`` get 413; the library's typed
errors get the status of :data:`ERROR_STATUS` (images over ``max_image_pixels`` 413, unreadable images
400, photos without a face 422, unknown identities 404). Every error is JSON ``{"error": "..."}``. Faces
carry the named extras of the analyser's stages (``facesphere.pipeline.stages``) next to box, score and
landmarks, and every face its ``age`` and ``age_source`` (``null`` when the service has no age estimate).
The OpenAPI spec is at ``/openapi.json``; its pages ``/docs`` (Swagger UI) and ``/redoc`` load their
scripts from the app itself (the assets bundled by fastapi-offline), so they work without internet. A gallery file
SQLite cannot use answers 500 with a JSON error naming it.

Started with a review folder (``facesphere serve --review DIR``, the output of ``facesphere clean profile``), the app
also serves the review page ``/review`` and ``/v1/review/...``: the flagged images with their identities' typical
images (thumbnails of images the folder's lists name, nothing else), and a decision per image, written through
``facesphere.cleaning.review``.

The networks and the index run on one dedicated thread (``ModelThread``), one request at a time (each
call already uses every CPU thread); gallery writes are committed to the SQLite store before the search
index changes (``LiveGallery``).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from hashlib import sha256
from importlib import resources
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

import facesphere
from facesphere.cleaning.review import ReviewError, ReviewFolder, ReviewItem
from facesphere.data.images import ImageError, ImageTooLarge, load_image_bytes
from facesphere.gallery import (
    GalleryError,
    GalleryUnusable,
    Identity,
    LiveGallery,
    UnknownIdentity,
    identity_name,
    open_live_gallery,
)
from facesphere.pipeline import AnalyzerSpec, NoFaceFound, build_analyzer, decide, open_set_threshold, pick_face
from facesphere.service.limits import BodySizeLimit
from facesphere.service.model_thread import ModelThread
from facesphere.service.settings import ServiceSettings

logger = logging.getLogger(__name__)
API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, description="one of the keys the service was started with")


class BadMetadata(ValueError):
    """Identity metadata that is not a JSON object."""


class TooManyFiles(ValueError):
    """More photos in one request than the service takes."""


ERROR_STATUS: dict[type[Exception], int] = {
    ImageTooLarge: 413,
    TooManyFiles: 413,
    ImageError: 400,
    NoFaceFound: 422,
    BadMetadata: 422,
    UnknownIdentity: 404,
    ReviewError: 404,
    GalleryUnusable: 500,
    GalleryError: 422,
}
"""HTTP status of each expected error type; the most specific class in an error's MRO decides."""


def status_of(error: Exception) -> int:
    return next((ERROR_STATUS[kind] for kind in type(error).__mro__ if kind in ERROR_STATUS), 500)


# ---------------------------------------------------------------------------------------------- response models
class FaceOut(BaseModel):
    """A face; further keys are the named per-face extras of the analyser's stages (facesphere.pipeline.stages)."""

    model_config = ConfigDict(extra="allow")

    box: list[float] = Field(description="x1, y1, x2, y2 in pixels of the uploaded photo")
    score: float
    landmarks: list[list[float]] = Field(description="5 points: eyes, nose tip, mouth corners (x, y)")
    age: float | None = Field(None, description="estimated age in years; null when the service has no estimate "
                                                "(no age branch in the model and no age/gender estimator)")
    age_source: str | None = Field(None, description="what estimated the age: the estimator stage's name "
                                                     "(e.g. genderage_insightface), 'norm' (the model's age branch, "
                                                     "OE-CNN), or null")


class EmbeddedFace(FaceOut):
    embedding: list[float] = Field(description="unit-length embedding (cosine = dot product)")


class MatchOut(BaseModel):
    name: str
    score: float = Field(description="cosine between the face and the identity's template")
    known: bool = Field(description="score >= the service's open-set threshold (always true without one)")


class IdentifiedFace(FaceOut):
    matches: list[MatchOut]


class PhotoOut(BaseModel):
    width: int
    height: int
    faces: list[FaceOut]


class EmbeddedPhotoOut(PhotoOut):
    faces: list[EmbeddedFace]


class IdentifyOut(BaseModel):
    width: int
    height: int
    threshold: float | None
    faces: list[IdentifiedFace]


class VerifyOut(BaseModel):
    cosine: float
    same: bool | None = Field(description="decision at the service's threshold (null without one)")
    threshold: float | None
    faces: list[FaceOut]


class IdentityOut(BaseModel):
    name: str
    metadata: dict[str, Any]
    templates: int


class MetadataIn(BaseModel):
    metadata: dict[str, Any]


class InfoOut(BaseModel):
    version: str
    model: str
    embedding_size: int
    alignment: str
    identities: int
    index: str
    threshold: float | None
    age_source: str | None = Field(description="what answers every face's age: an estimator stage's name, 'norm' "
                                               "(the model's age branch), or null (no ages)")
    limits: dict[str, int]


class ReviewOut(BaseModel):
    folder: str
    total: int = Field(description="items matching the request before paging")
    offset: int
    items: list[ReviewItem] = Field(description="flagged images (kind, index, path, identity, suggestion, cosines, "
                                                "decision; the typical images to show beside each, by index)")


class DecisionIn(BaseModel):
    decision: Literal["confirm", "reject", "pending"] = Field(
        description="confirm: relabel a flip to the suggested identity, drop an outlier or duplicate; reject: keep the "
                    "image under its label; pending: undecided again")


def _identity(identity: Identity) -> IdentityOut:
    return IdentityOut(name=identity.name, metadata=identity.metadata, templates=identity.templates)


# ---------------------------------------------------------------------------------------------- the app
class FaceService:
    """The analyser, the live gallery and the limits shared by every request."""

    def __init__(self, analyzer, gallery: LiveGallery, settings: ServiceSettings,
                 model_thread: ModelThread | None = None) -> None:
        if analyzer.embedder is None:
            raise ValueError("the service needs an embedding model")
        gallery.gallery.check_card(analyzer.embedder.card)
        self.analyzer, self.gallery, self.settings = analyzer, gallery, settings
        self.analyzer.max_faces = settings.max_faces
        self.model_thread = model_thread or ModelThread()
        self._key_digests = [sha256(k.encode()).digest() for k in settings.api_keys]

    def check_key(self, key: str | None) -> None:
        if not key:
            raise HTTPException(401, "missing API key: send it in the X-API-Key header")
        digest = sha256(key.encode()).digest()
        if not any(hmac.compare_digest(digest, known) for known in self._key_digests):
            raise HTTPException(401, "invalid API key")

    def decode(self, upload: UploadFile) -> np.ndarray:
        return load_image_bytes(upload.file.read(), upload.filename or "upload",
                                max_pixels=self.settings.max_image_pixels)

    def analyze(self, upload: UploadFile, embed: bool = True):
        """(photo, its analysis named after the upload)."""
        image = self.decode(upload)
        result = self.model_thread.run(self.analyzer.analyze, [image], embed=embed)[0]
        result.source = upload.filename or "upload"
        return image, result

    def one_face(self, upload: UploadFile, index: int = 0):
        return pick_face(self.analyze(upload)[1], index)


def _face_out(face) -> FaceOut:
    return FaceOut(**face.to_dict(embedding=False))


def create_app(analyzer, gallery: LiveGallery, settings: ServiceSettings,
               model_thread: ModelThread | None = None, review: ReviewFolder | None = None) -> FastAPI:
    """The FastAPI application serving ``analyzer`` and ``gallery`` within ``settings``' limits.

    ``model_thread``: the thread that loaded the analyser's models (a new one if None); ``review``: a review folder
    whose page and routes to serve (none if None)."""
    service = FaceService(analyzer, gallery, settings, model_thread)
    on_model_thread = service.model_thread.run
    # FastAPIOffline: /docs and /redoc load Swagger UI and ReDoc from the app itself (no CDN), so they work offline
    app = FastAPIOffline(title="facesphere", version=facesphere.__version__,
                         description="Face detection, embedding, verification and 1:N identification against an "
                                     "enrolled gallery. Every /v1 endpoint needs an X-API-Key header.")
    app.state.service = service

    def require_key(key: Annotated[str | None, Security(API_KEY)]) -> None:
        service.check_key(key)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's and Starlette's own (404, malformed multipart)
    async def _http_error(request: Request, error: StarletteHTTPException):
        return JSONResponse({"error": error.detail}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        return JSONResponse({"error": f"invalid request: {problems}"}, status_code=422)

    async def _expected_error(request: Request, error: Exception):
        if status_of(error) >= 500:  # the service's own fault (e.g. a damaged gallery file): the operator must know
            logger.error("%s %s failed: %s", request.method, request.url.path, error)
        return JSONResponse({"error": str(error)}, status_code=status_of(error))

    for kind in ERROR_STATUS:
        app.add_exception_handler(kind, _expected_error)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception):
        logger.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"error": f"internal error ({type(error).__name__}); see the server log"}, status_code=500)

    keyed = [Depends(require_key)]

    @app.get("/health", tags=["service"])
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/info", dependencies=keyed, tags=["service"])
    def info() -> InfoOut:
        card = analyzer.embedder.card
        return InfoOut(version=facesphere.__version__, model=card.name, embedding_size=card.embedding_size,
                       alignment=card.alignment, identities=len(gallery),
                       index=f"{gallery.index.kind}/{gallery.index.storage}", threshold=settings.match_threshold,
                       age_source=analyzer.age_source,
                       limits={"max_request_bytes": settings.max_request_bytes,
                               "max_image_pixels": settings.max_image_pixels, "max_faces": settings.max_faces,
                               "max_files": settings.max_files})

    @app.post("/v1/detect", dependencies=keyed, tags=["faces"])
    def detect(image: UploadFile = File(..., description="a photo (JPEG, PNG, ...)")) -> PhotoOut:
        """Faces in a photo, largest first: box, score, 5 landmarks."""
        array, result = service.analyze(image, embed=False)
        return PhotoOut(width=array.shape[1], height=array.shape[0], faces=[_face_out(f) for f in result.faces])

    @app.post("/v1/embed", dependencies=keyed, tags=["faces"])
    def embed(image: UploadFile = File(...)) -> EmbeddedPhotoOut:
        """Every face with its unit-length embedding."""
        array, result = service.analyze(image)
        return EmbeddedPhotoOut(width=array.shape[1], height=array.shape[0],
                                faces=[EmbeddedFace(**f.to_dict(embedding=False), embedding=f.embedding.tolist())
                                       for f in result.faces])

    @app.post("/v1/verify", dependencies=keyed, tags=["faces"])
    def verify(image1: UploadFile = File(...), image2: UploadFile = File(...)) -> VerifyOut:
        """Are the largest faces of two photos the same person?"""
        first, second = service.one_face(image1), service.one_face(image2)
        cosine = service.analyzer.compare(first, second).cosine
        threshold = settings.match_threshold
        return VerifyOut(cosine=round(cosine, 6), same=decide(cosine, threshold), threshold=threshold,
                         faces=[_face_out(first), _face_out(second)])

    @app.post("/v1/identify", dependencies=keyed, tags=["gallery"])
    def identify(image: UploadFile = File(...), k: int = Query(settings.top_k, ge=1, le=100)) -> IdentifyOut:
        """Every face of a photo with its top-k gallery matches (open-set: ``known`` says above the threshold)."""
        array, result = service.analyze(image)
        faces = result.faces
        found = on_model_thread(gallery.search, np.stack([f.embedding for f in faces]), k,
                                settings.match_threshold) if faces else []
        out = [IdentifiedFace(**face.to_dict(embedding=False),
                              matches=[MatchOut(name=m.name, score=round(m.score, 6), known=m.known) for m in matches])
               for face, matches in zip(faces, found)]
        return IdentifyOut(width=array.shape[1], height=array.shape[0], threshold=settings.match_threshold, faces=out)

    @app.post("/v1/identities", dependencies=keyed, tags=["gallery"], status_code=201)
    def enrol(name: str = Form(..., description="the identity's name: printable, not '.' or '..', surrounding "
                                                "spaces dropped (facesphere.gallery.identity_name)"),
              images: list[UploadFile] = File(..., description="one or more photos of the person"),
              face: int = Form(0, ge=0, description="which face of each photo, 0 = the largest"),
              metadata: str = Form("{}", description="JSON object merged into the identity's metadata")) -> IdentityOut:
        """Enrol a person (or add photos to them): one template per photo, committed before the reply."""
        name = identity_name(name)  # refused before any photo is analysed
        if len(images) > settings.max_files:
            raise TooManyFiles(f"{len(images)} photos in one enrolment; the limit is {settings.max_files}")
        try:
            extra = json.loads(metadata)
        except json.JSONDecodeError as error:
            raise BadMetadata(f"metadata is not JSON: {error}") from None
        if not isinstance(extra, dict):
            raise BadMetadata("metadata must be a JSON object")
        faces = [service.one_face(upload, face) for upload in images]
        identity = on_model_thread(gallery.enrol, name, np.stack([f.embedding for f in faces]), extra,
                                   [u.filename or "upload" for u in images])
        logger.info("enrolled %r (%d templates)", identity.name, identity.templates)
        return _identity(identity)

    @app.get("/v1/identities", dependencies=keyed, tags=["gallery"])
    def list_identities() -> list[IdentityOut]:
        return [_identity(i) for i in gallery.identities()]

    @app.get("/v1/identities/{name:path}", dependencies=keyed, tags=["gallery"])
    def get_identity(name: str) -> IdentityOut:
        return _identity(gallery.get(name))

    @app.patch("/v1/identities/{name:path}", dependencies=keyed, tags=["gallery"])
    def update_identity(name: str, body: MetadataIn) -> IdentityOut:
        """Replace an identity's metadata."""
        return _identity(gallery.update(name, body.metadata))

    @app.delete("/v1/identities/{name:path}", dependencies=keyed, tags=["gallery"], status_code=204)
    def delete_identity(name: str) -> Response:
        on_model_thread(gallery.remove, name)
        logger.info("removed %r", name)
        return Response(status_code=204)

    static = resources.files("facesphere.service") / "static"

    @app.get("/", include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse((static / "index.html").read_text(encoding="utf-8"))

    if review is not None:
        _add_review_routes(app, review, keyed, static)

    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    return app


def _add_review_routes(app: FastAPI, review: ReviewFolder, keyed: list, static) -> None:
    """The review page and its API (see the module doc)."""

    @app.get("/review", include_in_schema=False)
    def review_page() -> HTMLResponse:
        return HTMLResponse((static / "review.html").read_text(encoding="utf-8"))

    @app.get("/v1/review/items", dependencies=keyed, tags=["review"])
    def review_items(pending: bool = Query(False, description="only the undecided items"),
                     offset: int = Query(0, ge=0), limit: int = Query(50, ge=1, le=500)) -> ReviewOut:
        """The flagged images of the review folder with their decisions, ``limit`` from ``offset`` on."""
        items = review.items(pending_only=pending)
        return ReviewOut(folder=str(review.folder), total=len(items), offset=offset, items=items[offset:offset + limit])

    @app.get("/v1/review/images/{index}", dependencies=keyed, tags=["review"],
             responses={200: {"content": {"image/jpeg": {}}}})
    def review_image(index: int, size: int = Query(256, ge=16, le=1024)) -> Response:
        """A JPEG thumbnail of an image the review lists name (404 for any other index)."""
        return Response(review.thumbnail(index, size), media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600"})

    @app.post("/v1/review/items/{index}", dependencies=keyed, tags=["review"])
    def review_decide(index: int, body: DecisionIn) -> ReviewItem:
        """Decide a flagged image: the list files are rewritten atomically before the reply."""
        return review.decide(index, body.decision)


def build_app(analyzer: AnalyzerSpec, gallery: str | os.PathLike, settings: ServiceSettings,
              threshold: str | os.PathLike | None = None, index: str = "auto", storage: str = "fp32",
              review: str | os.PathLike | None = None) -> FastAPI:
    """The service ``facesphere serve`` runs: the analyser of ``analyzer`` (its ``model`` may be a model folder,
    an .onnx, a training run folder or a checkpoint) loaded on its own model thread, the gallery database
    (created for the model when missing) and the open-set threshold: a calibrated ``threshold`` file checked
    against the model, else ``settings.match_threshold``; ``review``: a cleaning output folder to review on
    ``/review``."""
    folder = ReviewFolder(review) if review is not None else None  # refused before any model loads
    if analyzer.model is None:
        raise ValueError("the service needs an embedding model (AnalyzerSpec.model)")
    model_thread = ModelThread()  # loads and runs every network (see facesphere.service.model_thread)
    built = model_thread.run(build_analyzer, analyzer)
    card = built.embedder.card
    value = open_set_threshold(card, threshold, settings.match_threshold)
    if value is None:
        logger.warning("no threshold: every match is reported as known (closed-set)")
    live = model_thread.run(open_live_gallery, gallery, card, kind=index, storage=storage)
    return create_app(built, live, settings.model_copy(update={"match_threshold": value}), model_thread, folder)


__all__ = ["ERROR_STATUS", "BadMetadata", "FaceService", "TooManyFiles", "build_app", "create_app", "status_of"]
