"""A gallery store and its search index kept in step, for a long-running service.

Every change is committed to the store first and applied to the index only after the commit returned,
all under one lock: a search never sees an identity the store could lose, and a crash loses nothing
the index had (the index is rebuilt from the store at start-up). When a quarter of the index's rows
are replaced or removed templates, it is rebuilt from the store.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from facesphere.gallery.index import IndexKind, Match, SearchIndex, Storage
from facesphere.gallery.store import Gallery, GalleryError, Identity
from facesphere.models.card import ModelCard

logger = logging.getLogger(__name__)


class IndexDisagrees(GalleryError):
    """The search index does not hold what the store holds."""


def open_live_gallery(path: str | os.PathLike, card: ModelCard | None = None, kind: IndexKind = "auto", storage: Storage = "fp32",
                      **index_options) -> LiveGallery:
    """The gallery database at ``path`` with its search index: created for ``card`` when missing; an
    existing one is checked against ``card`` (``GalleryError`` when its templates are of another model).
    Without ``card`` the gallery must exist (:class:`~facesphere.gallery.store.GalleryNotFound`). When the index
    cannot be built (damaged template pages), the store is closed again: its connection would otherwise keep the
    database's -wal/-shm files next to it."""
    gallery = Gallery(path, card)
    try:
        return LiveGallery(gallery, kind=kind, storage=storage, **index_options)
    except BaseException:
        gallery.close()
        raise


class LiveGallery:
    """``Gallery`` + ``SearchIndex`` behind one lock; safe to call from many threads."""

    def __init__(self, gallery: Gallery, kind: IndexKind = "auto", storage: Storage = "fp32",
                 rebuild_at: float = 0.25, **index_options) -> None:
        self.gallery = gallery
        self.kind, self.storage, self.index_options = kind, storage, index_options
        self.rebuild_at = rebuild_at
        self._lock = threading.RLock()
        self.rebuild()

    @property
    def card(self):
        return self.gallery.card

    def rebuild(self) -> None:
        """Build the index afresh from the store."""
        with self._lock:
            self.index = SearchIndex.from_gallery(self.gallery, self.kind, self.storage, **self.index_options)
            logger.info("search index: %d identities, %s/%s", len(self.index), self.index.kind, self.index.storage)

    def _after_write(self) -> None:
        if self.index.dead_fraction > self.rebuild_at:
            self.rebuild()

    def enrol(self, name: str, embeddings, metadata: dict[str, Any] | None = None, sources=None) -> Identity:
        with self._lock:
            identity = self.gallery.enrol(name, embeddings, metadata, sources)
            self.index.put(name, self.gallery.template(name))
            self._after_write()
            return identity

    def update(self, name: str, metadata: dict[str, Any]) -> Identity:
        with self._lock:
            return self.gallery.update(name, metadata)

    def remove(self, name: str) -> None:
        with self._lock:
            self.gallery.remove(name)
            self.index.discard(name)
            self._after_write()

    def get(self, name: str) -> Identity:
        with self._lock:
            return self.gallery.get(name)

    def identities(self) -> list[Identity]:
        with self._lock:
            return self.gallery.identities()

    def __len__(self) -> int:
        with self._lock:
            return len(self.index)

    def search(self, queries, k: int = 5, threshold: float | None = None) -> list[list[Match]]:
        with self._lock:
            return self.index.search(queries, k, threshold)

    def disagreements(self) -> tuple[list[str], list[str]]:
        """(names in only one of store and index, identities whose stored template does not find itself first).

        The first must be empty; the second too for exact search, while an approximate index may miss a few. A
        template that finds another identity first at the score it has with its own row (two identities holding
        the same photo) finds itself, tied."""
        with self._lock:
            names, matrix = self.gallery.identity_templates()
            missing = [f"{n}: in the store, not in the index" for n in sorted(set(names) - set(self.index.names))]
            missing += [f"{n}: in the index, not in the store" for n in sorted(set(self.index.names) - set(names))]
            misses = []
            for start in range(0, len(names), 4096):
                found = self.index.search(matrix[start:start + 4096], k=1)
                for name, vector, top in zip(names[start:start + 4096], matrix[start:start + 4096], found):
                    if not top or (top[0].name != name and not self._ties(name, vector, top[0].score)):
                        misses.append(f"{name}: its stored template finds {top[0] if top else None}")
            return missing, misses

    def _ties(self, name: str, template, best: float, tolerance: float = 1e-5) -> bool:
        own = self.index.score(name, template)
        return own is not None and own >= best - tolerance

    def check(self) -> str:
        """A one-line summary when the index agrees with the store, else :class:`IndexDisagrees`.

        Every identity must be in both; with exact search (flat/fp32) every stored template must also find
        itself first, while an approximate index may miss a few (counted in the summary)."""
        missing, misses = self.disagreements()
        count, kind = len(self), f"{self.index.kind}/{self.index.storage}"
        exact = kind == "flat/fp32"
        problems = missing + (misses if exact else [])
        if problems:
            for problem in problems[:20]:
                logger.error("%s", problem)
            raise IndexDisagrees(f"the {kind} index disagrees with the store: {len(missing)} identities in only one, "
                                 f"{len(misses)} templates not finding themselves")
        return (f"{count} identities: the {kind} index holds exactly the store's; "
                f"self-search top-1 {count - len(misses)}/{count}")

    def close(self) -> None:
        with self._lock:
            self.gallery.close()


__all__ = ["IndexDisagrees", "LiveGallery", "open_live_gallery"]
