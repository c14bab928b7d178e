"""Enrolled identities (SQLite store bound to a model card) and 1:N search over them (faiss)."""

from facesphere.gallery.index import Match, SearchIndex, build_faiss_index, choose_kind
from facesphere.gallery.live import LiveGallery
from facesphere.gallery.store import Gallery, GalleryError, Identity

__all__ = ["Gallery", "GalleryError", "Identity", "LiveGallery", "Match", "SearchIndex", "build_faiss_index", "choose_kind"]
