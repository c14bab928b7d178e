"""Stored models: a folder with ``model.safetensors`` (weights, no pickle) and ``card.json`` (a ModelCard).

A folder is saved as one unit: both files are written into a temporary sibling folder, fsynced, and the
sibling then takes the folder's place in one step (see :func:`_replace_folder`), so a crash at any moment
leaves the old model or the new one, never new weights beside an old card.

Also the strict weight filling shared by the importers: :class:`StateFiller` fills a backbone's
state dict from named source tensors, and refuses to finish unless every source tensor was used
exactly once and every target entry was filled with the right shape.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from facesphere.models.card import InputSpec, ModelCard

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"


class WeightMismatch(ValueError):
    """Weights that do not fit a backbone; ``problems`` lists what is missing, unused or misshapen."""

    def __init__(self, what: str, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__(f"{what}:\n  " + "\n  ".join(self.problems))


def _listing(label: str, names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
    return f"{label} ({len(names)}): {shown}"


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_blob_id(path: str | os.PathLike) -> str:
    """The file's git blob id (SHA-1 of ``b"blob <size>\\0" + content``), as GitHub lists it."""
    size = Path(path).stat().st_size
    digest = hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class StateFiller:
    """Fill ``model``'s state dict from ``source`` tensors, each consumed exactly once.

    Importers call :meth:`take` for source tensors and :meth:`put` for targets; problems (absent or
    reused sources, unknown, refilled or misshapen targets) are collected, and :meth:`finish`
    raises one :class:`WeightMismatch` listing all of them plus the unused sources and unfilled
    targets, or loads the filled state dict into the model.
    """

    def __init__(self, model: nn.Module, source: Mapping[str, np.ndarray | torch.Tensor], what: str) -> None:
        self.model = model
        self.source = source
        self.what = what
        self.target = model.state_dict()
        self.used: set[str] = set()
        self.filled: dict[str, torch.Tensor] = {}
        self.problems: list[str] = []

    def has(self, name: str) -> bool:
        return name in self.source

    def take(self, name: str) -> torch.Tensor | None:
        """The source tensor ``name`` as a CPU torch tensor; None (and a recorded problem) if absent or reused."""
        if name not in self.source:
            self.problems.append(f"missing source tensor {name!r}")
            return None
        if name in self.used:
            self.problems.append(f"source tensor {name!r} used twice")
            return None
        self.used.add(name)
        value = self.source[name]
        return torch.from_numpy(np.array(value)) if isinstance(value, np.ndarray) else value.detach().cpu()

    def put(self, target: str, value: torch.Tensor | None, origin: str = "") -> None:
        """Fill target entry ``target`` (a state-dict key) with ``value``; None (a failed take) is skipped."""
        if value is None:
            return
        if target not in self.target:
            self.problems.append(f"no target entry {target!r} (for {origin or 'a source tensor'})")
            return
        if target in self.filled:
            self.problems.append(f"target {target!r} filled twice")
            return
        expected = self.target[target]
        if tuple(value.shape) != tuple(expected.shape):
            self.problems.append(f"shape mismatch: {origin or 'source'} {tuple(value.shape)} -> "
                                 f"{target} {tuple(expected.shape)}")
            return
        self.filled[target] = value.to(expected.dtype).contiguous()

    def copy(self, target: str, name: str, transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """``put(target, transform(take(name)))``."""
        value = self.take(name)
        if value is not None and transform is not None:
            value = transform(value)
        self.put(target, value, name)

    def finish(self) -> nn.Module:
        """Raise :class:`WeightMismatch` unless everything matched; else load the weights and return the model."""
        problems = list(self.problems)
        unused = [name for name in self.source if name not in self.used]
        unfilled = [name for name in self.target if name not in self.filled]
        if unused:
            problems.append(_listing("unused source tensors", unused))
        if unfilled:
            problems.append(_listing("unfilled target entries", unfilled))
        if problems:
            raise WeightMismatch(f"{self.what} does not map onto {type(self.model).__name__}", problems)
        self.model.load_state_dict(self.filled, strict=True)
        logger.info("%s: filled all %d entries from all %d source tensors", self.what, len(self.filled), len(self.source))
        return self.model


def check_state_dict(model: nn.Module, tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise :class:`WeightMismatch` unless ``tensors`` has exactly ``model``'s keys, shapes and dtypes."""
    expected = model.state_dict()
    problems = []
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing:
        problems.append(_listing("missing", missing))
    if unexpected:
        problems.append(_listing("unexpected", unexpected))
    for key in expected.keys() & tensors.keys():
        a, b = expected[key], tensors[key]
        if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
            problems.append(f"{key}: stored {tuple(b.shape)} {b.dtype}, model has {tuple(a.shape)} {a.dtype}")
    if problems:
        raise WeightMismatch(what, problems)


def _structure(model: nn.Module) -> list[tuple[str, str, float | None]]:
    """(name, type, BN eps) of every module: what the card must rebuild beyond state-dict shapes."""
    out = []
    for name, module in model.named_modules():
        eps = module.eps if isinstance(module, nn.modules.batchnorm._BatchNorm) else None
        out.append((name, type(module).__name__, eps))
    return out


def save_model(folder: str | os.PathLike, backbone: nn.Module, card: ModelCard) -> Path:
    """Write ``model.safetensors`` and ``card.json`` into ``folder``, both in one atomic step (module doc); returns
    the folder. Other files already in ``folder`` are kept; one writer per folder at a time.

    Refuses a card that does not rebuild exactly this backbone (module tree, BN eps, state-dict
    shapes), so whatever is saved loads back identically. The card stored gains ``weights_sha256``.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    rebuilt = card.build_backbone()
    if _structure(rebuilt) != _structure(backbone):
        differ = [f"{a} vs {b}" for a, b in zip(_structure(rebuilt), _structure(backbone)) if a != b][:5]
        raise WeightMismatch(f"card {card.name!r} does not rebuild this backbone", differ or ["module count differs"])
    tensors = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    check_state_dict(rebuilt, tensors, f"card {card.name!r} does not rebuild this backbone")

    with _new_folder(folder) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "facesphere_model": card.name})
        digest = file_sha256(tmp / WEIGHTS_FILE)
        stored = ModelCard.from_json(card.model_copy(update={"weights_sha256": digest}).to_json())  # re-validated
        (tmp / CARD_FILE).write_text(stored.to_json(), encoding="utf-8")
    logger.info("saved %s (%d tensors) to %s", card.name, len(tensors), folder)
    return folder


_RENAME_EXCHANGE = 2  # linux/fs.h: swap two paths atomically


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_cwd = -100
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: no exchange here
        return False
    raise OSError(error, os.strerror(error), str(b))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """A hard link (no bytes copied, the old folder is removed anyway), or a copy where links are impossible."""
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


def _backup_of(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.old"


def _recover(folder: Path) -> None:
    """Undo what a save killed between its two renames left (the fallback path of :func:`_replace_folder`): the
    old folder waiting under its backup name goes back; a backup beside a complete folder, and temporary folders
    of killed saves, are removed."""
    backup = _backup_of(folder)
    if backup.is_dir():
        if folder.exists():
            shutil.rmtree(backup)
        else:
            os.rename(backup, folder)
            logger.warning("%s: restored the previous model left by an interrupted save", folder)
    for stale in folder.parent.glob(f".{glob.escape(folder.name)}.*.new"):
        shutil.rmtree(stale, ignore_errors=True)


def _replace_folder(new: Path, folder: Path) -> None:
    """Put the complete folder ``new`` in place of ``folder`` as one step, keeping the old one's other files.

    Where the system can swap two paths atomically (Linux), ``new`` and ``folder`` are exchanged and the old
    version, now at ``new``, is removed. Elsewhere ``folder`` is renamed to a backup, ``new`` renamed in and the
    backup removed; a save killed between the renames is undone by :func:`_recover` at the next save."""
    if folder.exists():
        for entry in folder.iterdir():  # a README or notes kept beside the model survive the save
            if entry.name not in (WEIGHTS_FILE, CARD_FILE) and not (new / entry.name).exists():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
                else:
                    _link_or_copy(entry, new / entry.name)
        shutil.copymode(folder, new)
        _fsync(new)
        if not _exchange(new, folder):
            backup = _backup_of(folder)
            os.rename(folder, backup)
            os.rename(new, folder)
            _fsync(folder.parent)
            shutil.rmtree(backup)
    else:
        os.rename(new, folder)
    _fsync(folder.parent)


@contextlib.contextmanager
def _new_folder(folder: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``folder``; on success fsync what was written there and put it in
    ``folder``'s place (:func:`_replace_folder`). On failure ``folder`` is left as it was."""
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder")
    tmp = folder.parent / f".{folder.name}.{secrets.token_hex(6)}.new"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _recover(folder)
        tmp.mkdir()  # the usual permissions (umask), unlike mkdtemp's 0700
    except OSError as error:  # name the folder the user gave, not the temporary sibling
        raise type(error)(error.errno, error.strerror, str(folder)) from None
    try:
        yield tmp
        for entry in tmp.iterdir():
            _fsync(entry)
        _replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_card(folder: str | os.PathLike) -> ModelCard:
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no model card (is {folder} a facesphere model folder?)")
    try:
        return ModelCard.from_json(path.read_bytes())
    except ValueError as error:
        raise ValueError(f"{path}: invalid model card: {error}") from None


def load_model(folder: str | os.PathLike, expected: InputSpec | None = None,
               device: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    """Rebuild a stored model in eval mode: (backbone, card).

    ``expected`` is the input the caller will feed; a mismatch with the card raises
    ``ModelCardMismatch`` before any weight is read. Weights are read with safetensors (no pickle),
    checked against the card's sha256, and must match the rebuilt backbone key for key and shape
    for shape.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    card = load_card(folder)
    if expected is not None:
        card.check(expected)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: weights file missing")
    if card.weights_sha256 is not None and file_sha256(weights) != card.weights_sha256:
        raise WeightMismatch(f"{weights}", ["sha256 differs from card.json's weights_sha256 "
                                             "(modified, or the folder was only partly rewritten)"])
    backbone = card.build_backbone()
    try:
        tensors = load_file(str(weights), device="cpu")
    except Exception as error:  # noqa: BLE001 - safetensors reports a corrupt file as its own SafetensorError
        raise WeightMismatch(f"{weights}", [f"not a readable safetensors file ({error})"]) from None
    check_state_dict(backbone, tensors, f"{weights} does not fit {card.backbone}")
    backbone.load_state_dict(tensors, strict=True)
    backbone.to(device).eval()
    logger.info("loaded %s from %s", card.name, folder)
    return backbone, card


__all__ = [
    "save_model",
    "load_model",
    "load_card",
    "StateFiller",
    "WeightMismatch",
    "check_state_dict",
    "file_sha256",
    "git_blob_id",
    "WEIGHTS_FILE",
    "CARD_FILE",
]
