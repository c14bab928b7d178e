"""Enrolled identities (SQLite store bound to a model card) and 1:N search over them (faiss)."""

from facesphere.gallery.index import (
    INDEX_KINDS,
    STORAGES,
    Match,
    SearchIndex,
    build_faiss_index,
    choose_kind,
    resolve_kind,
)
from facesphere.gallery.live import IndexDisagrees, LiveGallery, open_live_gallery
from facesphere.gallery.store import (
    MAX_NAME_LENGTH,
    BadName,
    Gallery,
    GalleryError,
    GalleryNotFound,
    GalleryUnusable,
    Identity,
    UnknownIdentity,
    identity_name,
)

__all__ = ["INDEX_KINDS", "MAX_NAME_LENGTH", "STORAGES", "BadName", "Gallery", "GalleryError", "GalleryNotFound",
           "GalleryUnusable", "Identity", "IndexDisagrees", "LiveGallery", "Match", "SearchIndex", "UnknownIdentity",
           "build_faiss_index", "choose_kind", "identity_name", "open_live_gallery", "resolve_kind"]
