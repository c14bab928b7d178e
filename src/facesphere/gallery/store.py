"""A persistent gallery of enrolled identities: SQLite in WAL mode, bound to one model card.

The store is the truth: identities (unique name, JSON metadata) and their templates (one unit embedding
per enrolled image). Every write is one transaction committed with ``synchronous=FULL``, so an
enrolment that returned survives a kill -9 of the process. A gallery records the card of the model
that made its templates and refuses embeddings of any other model (templates of different models
never mix). Search indexes (``facesphere.gallery.index``) are rebuilt from the store.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facesphere.models.card import ModelCard

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS identities (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, metadata TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS templates (
    id INTEGER PRIMARY KEY, identity INTEGER NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
    embedding BLOB NOT NULL, source TEXT, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS templates_identity ON templates(identity);
"""


class GalleryError(ValueError):
    """A gallery operation that cannot be done (unknown identity, wrong model, bad embedding)."""


class UnknownIdentity(GalleryError):
    """No identity of that name in the gallery."""


class GalleryNotFound(GalleryError, FileNotFoundError):
    """No gallery database at that path (and no model card to create one)."""


class GalleryUnusable(GalleryError):
    """The gallery file cannot be read or written by SQLite: damaged, truncated, not a database, or locked."""


class BadName(GalleryError):
    """An identity name that could not be addressed everywhere (API paths, the page, the command line)."""


MAX_NAME_LENGTH = 200
_REFUSED_CATEGORIES = {"Cc": "a control character", "Cs": "a lone surrogate", "Zl": "a line separator",
                       "Zp": "a paragraph separator"}


def identity_name(name: object) -> str:
    """``name`` without surrounding whitespace, or :class:`BadName` when it could not be addressed: empty, ``.`` or
    ``..`` (URL dot segments, removed by browsers and HTTP clients even when percent-encoded), longer than
    ``MAX_NAME_LENGTH`` characters, or holding a control character (NUL included), a lone surrogate or a
    line/paragraph separator. Anything else (any script, spaces, ``/ % # ? " ' <>``) is a valid name: the API and
    the page percent-encode it. The one check of every name the library, the CLI and the service accept."""
    if not isinstance(name, str):
        raise BadName(f"an identity name must be text, not {type(name).__name__}")
    stripped = name.strip()
    if not stripped:
        raise BadName("an identity needs a non-empty name (not only spaces or control characters)")
    if stripped in (".", ".."):
        raise BadName(f"{stripped!r} cannot be an identity name (it could not be addressed in a URL)")
    if len(stripped) > MAX_NAME_LENGTH:
        raise BadName(f"identity names are at most {MAX_NAME_LENGTH} characters, got {len(stripped)}")
    for char in stripped:
        what = _REFUSED_CATEGORIES.get(unicodedata.category(char))
        if what:
            raise BadName(f"identity name {stripped!r} holds {what} (U+{ord(char):04X})")
    return stripped


def _metadata_json(metadata: Any) -> str:
    """``metadata`` as standard JSON text: an object of JSON values, no NaN or infinity (which JSON cannot hold)."""
    if not isinstance(metadata, dict):
        raise GalleryError(f"metadata must be a JSON object, not {type(metadata).__name__}")
    try:
        return json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise GalleryError(f"metadata is not storable as JSON ({error})") from None


def _sqlite_errors(method):
    """Run a ``Gallery`` method with SQLite's errors turned into :class:`GalleryUnusable` naming the file."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as error:
            raise GalleryUnusable(f"{self.path}: cannot use the gallery database ({error})") from None

    return guarded


@dataclass(frozen=True)
class Identity:
    name: str
    metadata: dict[str, Any]
    templates: int


def _card_key(card: ModelCard) -> dict[str, Any]:
    """What must agree for templates to be comparable: the model and its input contract."""
    return {"name": card.name, "backbone": card.backbone, "embedding_size": card.embedding_size,
            "input_size": list(card.input_size), "alignment": card.alignment, "colour_order": card.colour_order,
            "weights_sha256": card.weights_sha256}


SQLITE_MAGIC = b"SQLite format 3\0"
SIDECARS = ("-wal", "-shm")  # the files SQLite creates next to a WAL-mode database when it is opened


def _check_header(path: Path) -> None:
    """Raise ``GalleryUnusable`` when ``path`` (not empty) is not an SQLite database or is shorter than its header
    declares, read as plain bytes: SQLite would refuse it only after creating the -wal/-shm files of a WAL-mode
    database. The declared size is trusted only when valid (file format section 1.3.7, "in-header database size")
    and when no -wal file exists (a crash mid-checkpoint may leave the file short until the WAL is replayed)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        header = handle.read(100)
    if len(header) < 100 or not header.startswith(SQLITE_MAGIC):
        raise GalleryUnusable(f"{path} is not a facesphere gallery (not an SQLite database); nothing was changed")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    if header[24:28] == header[92:96] and pages and not Path(f"{path}-wal").exists() and size < page_size * pages:
        raise GalleryUnusable(f"{path}: truncated gallery database ({size:,} bytes, its header declares "
                              f"{page_size * pages:,}); nothing was changed")


def _remove_new_sidecars(path: Path, existed: set[str]) -> None:
    """Remove the -wal/-shm files of ``path`` that were not in ``existed`` before a failed open, while the -wal
    holds nothing (an empty -wal and its -shm are what opening an unusable file leaves; nothing is lost)."""
    wal, shm = (Path(f"{path}{suffix}") for suffix in SIDECARS)
    if "-wal" not in existed and wal.exists() and wal.stat().st_size == 0:
        wal.unlink(missing_ok=True)
    if "-shm" not in existed and not wal.exists():
        shm.unlink(missing_ok=True)


def _existing_sidecars(path: Path) -> set[str]:
    return {suffix for suffix in SIDECARS if Path(f"{path}{suffix}").exists()}


def _require_gallery(path: Path, creating: bool) -> None:
    """Raise ``GalleryError`` unless ``path`` is an SQLite database holding a facesphere model card, checked through
    its header and then a read-only connection, so another application's database (or an empty file) is refused
    unchanged (a -wal/-shm the check created is removed again).

    ``creating``: an SQLite database without any table (a gallery another process is creating right now) is
    accepted too."""
    _check_header(path)
    existed = _existing_sidecars(path)
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
            card = db.execute("SELECT value FROM meta WHERE key='card'").fetchone() if "meta" in tables else None
        finally:
            db.close()
    except sqlite3.DatabaseError as error:
        _remove_new_sidecars(path, existed)
        raise GalleryError(f"{path} is not a facesphere gallery ({error})") from None
    if card is None and not (creating and not tables):
        raise GalleryError(f"{path} is not a facesphere gallery (no model card); nothing was changed")


class Gallery:
    """Open (or create, when ``card`` is given) the gallery database at ``path``.

    An existing file is checked read-only first: only a facesphere gallery (or an empty file, when creating) is
    ever written to. Creation is one transaction (schema and card together), so processes creating the same gallery
    at once all open the one gallery; SQLite's errors (a damaged file) are :class:`GalleryUnusable`."""

    def __init__(self, path: str | Path, card: ModelCard | None = None) -> None:
        self.path = Path(path)
        exists = self.path.exists()
        if not exists and card is None:
            raise GalleryNotFound(f"{self.path}: no such gallery; give the model card to create one")
        if exists and not self.path.is_file():
            raise GalleryNotFound(f"{self.path}: not a gallery file (a folder or a special file)")
        if exists and (card is None or self.path.stat().st_size > 0):
            # read-only: a file that is not ours is refused before anything is written
            _require_gallery(self.path, creating=card is not None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existed = _existing_sidecars(self.path)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        try:
            self._open(card)
        except BaseException as error:
            self._db.close()
            if isinstance(error, GalleryUnusable):  # a damaged file: leave nothing next to it
                _remove_new_sidecars(self.path, existed)
            raise

    @_sqlite_errors
    def _open(self, card: ModelCard | None) -> None:
        deadline = time.monotonic() + 30
        while True:  # switching to WAL does not wait for a creator racing us (no busy handler): retry
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._transaction():  # schema and card at once: a racing creator sees neither or both
            for statement in filter(str.strip, SCHEMA.split(";")):
                self._db.execute(statement)
            if card is not None:
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('card', ?)", (card.model_dump_json(),))
            stored = self._db.execute("SELECT value FROM meta WHERE key='card'").fetchone()
        if stored is None:
            raise GalleryError(f"{self.path} is not a facesphere gallery (no model card)")
        self.card = ModelCard.model_validate_json(stored[0])
        if card is not None:
            self.check_card(card)
        self.embedding_size = self.card.embedding_size

    def check_card(self, card: ModelCard) -> None:
        """Raise ``GalleryError`` unless embeddings of ``card``'s model are comparable with this gallery's."""
        if _card_key(card) != _card_key(self.card):
            raise GalleryError(f"{self.path} holds templates of model {self.card.name!r}; embeddings of "
                               f"{card.name!r} cannot be mixed in (use another gallery)")

    # ------------------------------------------------------------------------------------------ writes
    def _transaction(self):
        db = self._db

        class _Tx:
            def __enter__(self):
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self, kind, value, tb):
                if kind is None:
                    db.execute("COMMIT")
                elif db.in_transaction:  # SQLite may have rolled back by itself (e.g. on a damaged page)
                    db.execute("ROLLBACK")
                return False

        return _Tx()

    def _check(self, embeddings) -> np.ndarray:
        array = np.asarray(embeddings, dtype=np.float32)
        if array.ndim == 1:
            array = array[None]
        if array.ndim != 2 or array.shape[1] != self.embedding_size or not len(array):
            raise GalleryError(f"expected (N, {self.embedding_size}) embeddings of {self.card.name!r}, got "
                               f"{array.shape}")
        norms = np.linalg.norm(array, axis=1, keepdims=True)
        if not np.isfinite(array).all() or (norms < 1e-6).any():
            raise GalleryError("embeddings must be finite and non-zero")
        return array / norms

    @_sqlite_errors
    def enrol(self, name: str, embeddings, metadata: dict[str, Any] | None = None,
              sources: Sequence[str] | None = None) -> Identity:
        """Add templates to ``name`` (created if new; ``metadata`` merged in) in one durable transaction.

        ``name`` is checked and stripped by :func:`identity_name`."""
        name = identity_name(name)
        vectors = self._check(embeddings)
        sources = list(sources) if sources is not None else [None] * len(vectors)
        if len(sources) != len(vectors):
            raise GalleryError(f"{len(sources)} sources for {len(vectors)} embeddings")
        now = time.time()
        with self._transaction():
            row = self._db.execute("SELECT id, metadata FROM identities WHERE name=?", (name,)).fetchone()
            if row is None:
                identity = self._db.execute("INSERT INTO identities (name, metadata, created, updated) VALUES (?,?,?,?)",
                                            (name, _metadata_json(metadata or {}), now, now)).lastrowid
            else:
                identity = row[0]
                merged = {**json.loads(row[1]), **(metadata or {})}
                self._db.execute("UPDATE identities SET metadata=?, updated=? WHERE id=?", (_metadata_json(merged), now, identity))
            self._db.executemany("INSERT INTO templates (identity, embedding, source, created) VALUES (?,?,?,?)",
                                 [(identity, v.tobytes(), s, now) for v, s in zip(vectors, sources)])
        return self.get(name)

    @_sqlite_errors
    def update(self, name: str, metadata: dict[str, Any]) -> Identity:
        """Replace ``name``'s metadata."""
        with self._transaction():
            done = self._db.execute("UPDATE identities SET metadata=?, updated=? WHERE name=?",
                                    (_metadata_json(metadata), time.time(), name)).rowcount
        if not done:
            raise UnknownIdentity(f"no identity named {name!r}")
        return self.get(name)

    @_sqlite_errors
    def remove(self, name: str) -> None:
        """Delete ``name`` and all its templates."""
        with self._transaction():
            done = self._db.execute("DELETE FROM identities WHERE name=?", (name,)).rowcount
        if not done:
            raise UnknownIdentity(f"no identity named {name!r}")

    # ------------------------------------------------------------------------------------------ reads
    @_sqlite_errors
    def get(self, name: str) -> Identity:
        row = self._db.execute("SELECT i.name, i.metadata, COUNT(t.id) FROM identities i LEFT JOIN templates t "
                               "ON t.identity=i.id WHERE i.name=? GROUP BY i.id", (name,)).fetchone()
        if row is None:
            raise UnknownIdentity(f"no identity named {name!r}")
        return Identity(row[0], json.loads(row[1]), int(row[2]))

    @_sqlite_errors
    def identities(self) -> list[Identity]:
        rows = self._db.execute("SELECT i.name, i.metadata, COUNT(t.id) FROM identities i LEFT JOIN templates t "
                                "ON t.identity=i.id GROUP BY i.id ORDER BY i.name").fetchall()
        return [Identity(r[0], json.loads(r[1]), int(r[2])) for r in rows]

    @_sqlite_errors
    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM identities").fetchone()[0])

    @_sqlite_errors
    def identity_templates(self) -> tuple[list[str], np.ndarray]:
        """Names and one unit template per identity (the normalised mean of its image embeddings)."""
        rows = self._db.execute("SELECT i.name, t.embedding FROM templates t JOIN identities i ON t.identity=i.id "
                                "ORDER BY i.name, t.id").fetchall()
        names: list[str] = []
        sums: list[np.ndarray] = []
        for name, blob in rows:
            vector = np.frombuffer(blob, dtype=np.float32)
            if names and names[-1] == name:
                sums[-1] = sums[-1] + vector
            else:
                names.append(name)
                sums.append(vector.astype(np.float32).copy())
        if not sums:
            return [], np.zeros((0, self.embedding_size), dtype=np.float32)
        matrix = np.stack(sums)
        return names, matrix / np.linalg.norm(matrix, axis=1, keepdims=True)

    @_sqlite_errors
    def template(self, name: str) -> np.ndarray:
        """``name``'s unit template: the normalised mean of its image embeddings."""
        rows = self._db.execute("SELECT t.embedding FROM templates t JOIN identities i ON t.identity=i.id "
                                "WHERE i.name=?", (name,)).fetchall()
        if not rows:
            raise UnknownIdentity(f"no identity named {name!r}")
        total = np.sum([np.frombuffer(blob, dtype=np.float32) for (blob,) in rows], axis=0)
        return (total / np.linalg.norm(total)).astype(np.float32)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["MAX_NAME_LENGTH", "BadName", "Gallery", "GalleryError", "GalleryNotFound", "GalleryUnusable", "Identity",
           "UnknownIdentity", "identity_name"]
