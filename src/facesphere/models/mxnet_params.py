"""Read MXNet checkpoints without MXNet: ``*.params`` (NDArray list) files and ``*-symbol.json`` graphs.

A ``.params`` file is MXNet's NDArray list format (``NDArray::Save`` / ``NDArray::Load`` in MXNet's
``src/ndarray/ndarray.cc``), little-endian throughout:

* ``uint64`` list magic ``0x112``, ``uint64`` reserved (0);
* ``uint64`` array count, then each array:

  - ``uint32`` array magic: ``0xF993FAC9`` (v2, MXNet >= 1.0), ``0xF993FACA`` (v3, numpy shape
    semantics, same layout) or ``0xF993FAC8`` (v1); anything else is the legacy format, where
    these four bytes are already ``ndim`` and the dims are ``uint32``;
  - v2/v3: ``int32`` storage type (0 dense, 1 row_sparse, 2 csr); sparse arrays then store their
    storage shape;
  - shape: ``uint32`` ndim (``int32`` in v3, -1 = unknown) and ``ndim`` ``int64`` dims (``uint32`` in
    the legacy format); an array with no shape ends here;
  - context: ``int32`` device type, ``int32`` device id; ``int32`` dtype flag (mshadow's type enum);
  - sparse arrays: per auxiliary array (row indices; or CSR indptr and indices) an ``int32`` dtype
    flag and a shape;
  - the raw data (storage shape size x item size), then the auxiliary data;

* ``uint64`` name count (0 or the array count), then each name as ``uint64`` length + bytes.
  ``Module.save_checkpoint`` names are ``arg:<param>`` and ``aux:<param>`` (BN moving statistics).

Everything is parsed from one in-memory buffer with bounds checks, so a truncated or corrupt file
raises :class:`MXNetFormatError` naming the byte offset instead of reading garbage. Nothing is
unpickled or executed.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

LIST_MAGIC = 0x112
V1_MAGIC = 0xF993FAC8
V2_MAGIC = 0xF993FAC9
V3_MAGIC = 0xF993FACA
MAX_NDIM = 32
"""More dimensions than any real tensor has: a larger ndim means a corrupt header."""

STORAGE_TYPES = {0: "default", 1: "row_sparse", 2: "csr"}
_NUM_AUX = {0: 0, 1: 1, 2: 2}

# mshadow's type enum (mshadow/base.h): flag -> little-endian numpy dtype. 12 (bfloat16) has no numpy type.
DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("<f8"),
    2: np.dtype("<f2"),
    3: np.dtype("u1"),
    4: np.dtype("<i4"),
    5: np.dtype("i1"),
    6: np.dtype("<i8"),
    7: np.dtype("?"),
    8: np.dtype("<i2"),
    9: np.dtype("<u2"),
    10: np.dtype("<u4"),
    11: np.dtype("<u8"),
}

# MXNet operator defaults that matter for conversion (src/operator/nn/batch_norm-inl.h).
BATCHNORM_DEFAULTS = {"eps": 1e-3, "momentum": 0.9, "fix_gamma": True, "use_global_stats": False}


class MXNetFormatError(ValueError):
    """A ``.params`` or ``-symbol.json`` file is not what MXNet writes; the message names where."""


@dataclass(frozen=True)
class NDArrayRecord:
    """One array of a ``.params`` file: its name, dense values and header fields."""

    name: str | None
    array: np.ndarray
    version: int  # 0 legacy, 1, 2 or 3
    stype: str  # "default", "row_sparse" or "csr" (the array is always returned dense)
    context: tuple[int, int]  # (device type, device id) it was saved from: 1 = CPU, 2 = GPU
    dtype_flag: int
    offset: int  # byte offset of the array's header in the file


class _Reader:
    """Bounds-checked little-endian cursor over a buffer; errors carry the path and byte offset."""

    def __init__(self, buffer: bytearray, path: str) -> None:
        self.buffer = buffer
        self.view = memoryview(buffer)
        self.pos = 0
        self.path = path

    def fail(self, message: str, offset: int | None = None) -> MXNetFormatError:
        where = self.pos if offset is None else offset
        return MXNetFormatError(f"{self.path}: at byte offset {where}: {message}")

    def need(self, size: int, what: str) -> None:
        if size < 0 or self.pos + size > len(self.buffer):
            left = len(self.buffer) - self.pos
            raise self.fail(f"file truncated: {what} needs {size} bytes, only {left} left (file size {len(self.buffer)})")

    def unpack(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        value = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += size
        return value[0] if len(value) == 1 else value

    def shape(self, version: int, what: str) -> tuple[int, ...] | None:
        """A TShape: ndim then dims; ``None`` for an unknown (v3 ndim -1) shape."""
        start = self.pos
        ndim = self.unpack("<i" if version == 3 else "<I", f"{what} ndim")
        if version == 3 and ndim == -1:
            return None
        if not 0 <= ndim <= MAX_NDIM:
            raise self.fail(f"{what}: implausible ndim {ndim} (corrupt header?)", start)
        dims = self.unpack(f"<{ndim}{'I' if version == 0 else 'q'}", f"{what} dims") if ndim else ()
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        if any(d < 0 for d in dims):
            raise self.fail(f"{what}: negative dimension in {dims} (corrupt header?)", start)
        return dims

    def array(self, dtype: np.dtype, shape: tuple[int, ...], what: str) -> np.ndarray:
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        nbytes = count * dtype.itemsize
        self.need(nbytes, f"{what} data ({count} x {dtype})")
        # A view onto the (writable) file buffer: no second copy of the weights.
        out = np.frombuffer(self.view[self.pos:self.pos + nbytes], dtype=dtype).reshape(shape)
        self.pos += nbytes
        return out


def read_params(path: str | os.PathLike) -> list[NDArrayRecord]:
    """Parse a ``.params`` file into its arrays, in file order, with names when the file has them."""
    path = Path(path)
    size = path.stat().st_size
    buffer = bytearray(size)
    with open(path, "rb") as handle:
        if handle.readinto(buffer) != size:
            raise MXNetFormatError(f"{path}: file changed while reading")
    return parse_params(buffer, str(path))


def parse_params(buffer: bytes | bytearray, source: str = "<buffer>") -> list[NDArrayRecord]:
    """Parse NDArray-list bytes (see the module docstring); ``source`` names the data in errors."""
    reader = _Reader(buffer if isinstance(buffer, bytearray) else bytearray(buffer), source)
    magic = reader.unpack("<Q", "list magic")
    if magic != LIST_MAGIC:
        raise reader.fail(f"not an MXNet NDArray list: magic {magic:#x}, expected {LIST_MAGIC:#x}", 0)
    reserved = reader.unpack("<Q", "reserved field")
    if reserved != 0:
        raise reader.fail(f"reserved field is {reserved}, expected 0 (corrupt header?)", 8)
    count_at = reader.pos
    count = reader.unpack("<Q", "array count")
    # Every array takes at least 8 bytes: a huge count means corruption, not a huge file.
    if count > (len(reader.buffer) - reader.pos) // 8:
        raise reader.fail(f"file truncated or corrupt: array count {count} cannot fit in the remaining "
                          f"{len(reader.buffer) - reader.pos} bytes", count_at)

    parsed = [_parse_array(reader, index) for index in range(count)]

    names_at = reader.pos
    name_count = reader.unpack("<Q", "name count")
    if name_count not in (0, count):
        raise reader.fail(f"{name_count} names for {count} arrays (corrupt file?)", names_at)
    names: list[str | None] = []
    for index in range(name_count):
        at = reader.pos
        length = reader.unpack("<Q", f"length of name {index}")
        reader.need(length, f"name {index}")
        raw = bytes(reader.view[reader.pos:reader.pos + length])
        reader.pos += length
        try:
            names.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise reader.fail(f"name {index} is not valid UTF-8: {raw[:40]!r}", at) from None
    if reader.pos != len(reader.buffer):
        raise reader.fail(f"{len(reader.buffer) - reader.pos} unexpected trailing bytes after the names")
    if name_count and len(set(names)) != len(names):
        raise reader.fail("duplicate array names", names_at)
    if not name_count:
        names = [None] * count
    records = [NDArrayRecord(name, *fields) for name, fields in zip(names, parsed)]
    logger.debug("%s: %d arrays, %d bytes", source, count, len(reader.buffer))
    return records


def _parse_array(reader: _Reader, index: int) -> tuple:
    """One NDArray; returns the NDArrayRecord fields after ``name``."""
    start = reader.pos
    what = f"array {index}"
    magic = reader.unpack("<I", f"{what} magic")
    if magic in (V2_MAGIC, V3_MAGIC):
        version = 2 if magic == V2_MAGIC else 3
        stype_flag = reader.unpack("<i", f"{what} storage type")
        if stype_flag not in STORAGE_TYPES:
            raise reader.fail(f"{what}: unknown storage type {stype_flag}", start + 4)
    elif magic == V1_MAGIC:
        version, stype_flag = 1, 0
    else:
        version, stype_flag = 0, 0
        reader.pos = start  # legacy: the four bytes were the ndim
    num_aux = _NUM_AUX[stype_flag]
    storage_shape = reader.shape(version, f"{what} storage shape") if num_aux else None
    shape = reader.shape(version, f"{what} shape")
    if shape is None or (version != 3 and len(shape) == 0):
        # An empty ("none") NDArray: MXNet writes nothing after the shape. (In v3 a 0-d shape is a scalar.)
        return (np.empty((0,), dtype=np.float32), version, STORAGE_TYPES[stype_flag], (0, 0), -1, start)
    dev_type, dev_id = reader.unpack("<ii", f"{what} context")
    dtype_at = reader.pos
    dtype_flag = reader.unpack("<i", f"{what} dtype flag")
    if dtype_flag not in DTYPES:
        raise reader.fail(f"{what}: unsupported dtype flag {dtype_flag}", dtype_at)
    aux: list[tuple[np.dtype, tuple[int, ...]]] = []
    for k in range(num_aux):
        aux_at = reader.pos
        aux_flag = reader.unpack("<i", f"{what} aux {k} dtype flag")
        if aux_flag not in DTYPES:
            raise reader.fail(f"{what}: unsupported aux dtype flag {aux_flag}", aux_at)
        aux_shape = reader.shape(version, f"{what} aux {k} shape")
        aux.append((DTYPES[aux_flag], aux_shape or ()))
    data = reader.array(DTYPES[dtype_flag], storage_shape if num_aux else shape, what)
    aux_data = [reader.array(dt, sh, f"{what} aux {k}") for k, (dt, sh) in enumerate(aux)]
    if num_aux:
        data = _densify(reader, start, what, stype_flag, shape, data, aux_data)
    return (data, version, STORAGE_TYPES[stype_flag], (dev_type, dev_id), dtype_flag, start)


def _densify(reader: _Reader, start: int, what: str, stype: int, shape: tuple[int, ...],
             data: np.ndarray, aux: list[np.ndarray]) -> np.ndarray:
    """Dense copy of a row_sparse (aux: row indices) or csr (aux: indptr, column indices) array."""
    dense = np.zeros(shape, dtype=data.dtype)
    try:
        if stype == 1:
            dense[aux[0].astype(np.int64)] = data
        else:
            indptr, indices = aux[0].astype(np.int64), aux[1].astype(np.int64)
            rows = np.repeat(np.arange(shape[0]), np.diff(indptr))
            dense[rows, indices] = data
    except (IndexError, ValueError) as error:
        raise reader.fail(f"{what}: inconsistent sparse indices ({error})", start) from None
    return dense


def load_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{name: array}`` of a named ``.params`` file (names keep their ``arg:``/``aux:`` prefixes)."""
    records = read_params(path)
    if records and records[0].name is None:
        raise MXNetFormatError(f"{path}: the arrays have no names; use read_params for an unnamed list")
    return {record.name: record.array for record in records}  # type: ignore[misc]


def strip_prefixes(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop ``arg:``/``aux:`` prefixes (Module checkpoints); a name present under both is an error."""
    out: dict[str, np.ndarray] = {}
    for name, value in params.items():
        bare = name.split(":", 1)[1] if name.startswith(("arg:", "aux:")) else name
        if bare in out:
            raise MXNetFormatError(f"parameter {bare!r} appears twice (as arg: and aux:)")
        out[bare] = value
    return out


# ----------------------------------------------------------------------------------------------
# Symbol JSON


def parse_attr(value: str) -> Any:
    """An MXNet attribute string as a Python value: "(3, 3)" -> (3, 3), "True" -> True, "2e-05" -> 2e-05."""
    text = value.strip()
    if text in ("True", "true"):
        return True
    if text in ("False", "false"):
        return False
    if text in ("None", "none"):
        return None
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return value
    if isinstance(parsed, list):
        parsed = tuple(parsed)
    return parsed if isinstance(parsed, (int, float, tuple)) else value


@dataclass(frozen=True)
class SymbolNode:
    """One node of the graph: ``op`` is "null" for variables (weights and the data input)."""

    index: int
    name: str
    op: str
    attrs: dict[str, str] = field(default_factory=dict)
    inputs: tuple[int, ...] = ()  # indices of the input nodes

    def attr(self, key: str, default: Any = None) -> Any:
        """A parsed attribute (see :func:`parse_attr`), or ``default`` when absent."""
        return parse_attr(self.attrs[key]) if key in self.attrs else default


@dataclass(frozen=True)
class BatchNormSettings:
    """What an MXNet BatchNorm does at inference: eps, and whether gamma is fixed to 1."""

    eps: float
    fix_gamma: bool
    momentum: float
    use_global_stats: bool


class MXNetSymbol:
    """A parsed ``*-symbol.json``: nodes in file (topological) order, looked up by name."""

    def __init__(self, nodes: list[SymbolNode], heads: list[int], source: str = "<symbol>") -> None:
        self.nodes = nodes
        self.heads = heads
        self.source = source
        self._by_name = {node.name: node for node in nodes}

    def __getitem__(self, name: str) -> SymbolNode:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def ops(self, op: str) -> list[SymbolNode]:
        """All nodes of operator ``op`` (e.g. "BatchNorm"), in graph order."""
        return [node for node in self.nodes if node.op == op]

    def batchnorm(self, name: str) -> BatchNormSettings:
        """Settings of the BatchNorm node ``name``, with MXNet's defaults for absent attributes."""
        node = self._by_name.get(name)
        if node is None or node.op != "BatchNorm":
            raise KeyError(f"{self.source}: no BatchNorm node named {name!r}")
        return BatchNormSettings(
            eps=float(node.attr("eps", BATCHNORM_DEFAULTS["eps"])),
            fix_gamma=bool(node.attr("fix_gamma", BATCHNORM_DEFAULTS["fix_gamma"])),
            momentum=float(node.attr("momentum", BATCHNORM_DEFAULTS["momentum"])),
            use_global_stats=bool(node.attr("use_global_stats", BATCHNORM_DEFAULTS["use_global_stats"])),
        )

    def batchnorms(self) -> dict[str, BatchNormSettings]:
        """``{BatchNorm node name: settings}`` for every BatchNorm in the graph."""
        return {node.name: self.batchnorm(node.name) for node in self.ops("BatchNorm")}

    def input_affine(self, data: str = "data") -> tuple[float, float, str]:
        """(mean, std, last node) of the scalar arithmetic applied to the data input before the first layer.

        Follows the chain of ``_minus_scalar``/``_plus_scalar``/``_mul_scalar``/``_div_scalar``
        (and ``_copy``/``identity``) nodes fed by ``data``, so that the chain computes
        ``(x - mean) / std``; the last node's name is what the first layer should read. Returns
        (0, 1, data) when the graph feeds the data straight into a layer.
        """
        if data not in self._by_name:
            raise MXNetFormatError(f"{self.source}: no input node named {data!r}")
        scale, shift = 1.0, 0.0
        current = self._by_name[data].index
        while True:
            consumers = [node for node in self.nodes if current in node.inputs]
            if len(consumers) != 1:
                break
            node = consumers[0]
            if node.op in ("_copy", "identity"):
                pass
            elif node.op in ("_minus_scalar", "_plus_scalar", "_mul_scalar", "_div_scalar"):
                value = float(node.attr("scalar"))
                if node.op == "_minus_scalar":
                    shift -= value
                elif node.op == "_plus_scalar":
                    shift += value
                elif node.op == "_mul_scalar":
                    scale, shift = scale * value, shift * value
                else:
                    scale, shift = scale / value, shift / value
            else:
                break
            current = node.index
        if scale == 0:
            raise MXNetFormatError(f"{self.source}: the input is multiplied by 0")
        # scale * x + shift == (x - mean) / std
        return -shift / scale, 1.0 / scale, self.nodes[current].name


def parse_symbol(path_or_text: str | os.PathLike) -> MXNetSymbol:
    """Parse a ``-symbol.json`` file (or its text) of any MXNet version (``attrs``/``attr``/``param`` keys)."""
    if isinstance(path_or_text, str) and path_or_text.lstrip().startswith("{"):
        source, text = "<symbol>", path_or_text
    else:
        source = str(path_or_text)
        text = Path(path_or_text).read_text(encoding="utf-8")
    try:
        graph = json.loads(text)
    except json.JSONDecodeError as error:
        raise MXNetFormatError(f"{source}: not valid JSON ({error})") from None
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list):
        raise MXNetFormatError(f"{source}: not an MXNet symbol (no 'nodes' list)")
    nodes: list[SymbolNode] = []
    for index, raw in enumerate(graph["nodes"]):
        try:
            attrs: dict[str, str] = {}
            for key in ("param", "attr", "attrs"):  # MXNet < 0.9 used "param"/"attr"; later "attrs"
                attrs.update({str(k): str(v) for k, v in (raw.get(key) or {}).items()})
            inputs = tuple(int(entry[0]) for entry in raw.get("inputs", []))
            if any(not 0 <= i < index for i in inputs):
                raise ValueError(f"input index out of range in {inputs}")
            nodes.append(SymbolNode(index, str(raw["name"]), str(raw["op"]), attrs, inputs))
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise MXNetFormatError(f"{source}: node {index} is malformed ({error})") from None
    heads = [int(entry[0]) for entry in graph.get("heads", [])]
    return MXNetSymbol(nodes, heads, source)


__all__ = [
    "MXNetFormatError",
    "NDArrayRecord",
    "read_params",
    "parse_params",
    "load_params",
    "strip_prefixes",
    "MXNetSymbol",
    "SymbolNode",
    "BatchNormSettings",
    "parse_symbol",
    "parse_attr",
    "DTYPES",
    "BATCHNORM_DEFAULTS",
]
