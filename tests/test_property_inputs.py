"""Property tests of the input parsers: ``.bin`` verification sets, iBUG ``.pts`` files, model cards and image
decoding. Whatever the bytes, each parser returns a value or raises its typed error (a ``ValueError``) — never
another exception, never code execution — and valid inputs survive a write/read round trip."""

from __future__ import annotations

import io
import json
import pickle
import pickletools
import re
import uuid
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from facesphere.data.images import IMAGE_MAGIC, ImageError, load_image, load_image_bytes
from facesphere.evaluate.age import read_pts
from facesphere.evaluate.binsets import BinFormatError, UnsafePickleError, read_bin
from facesphere.models.card import MAX_EMBEDDING_SIZE, MAX_INPUT_SIDE, ModelCard

FIXTURE = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("property")


def _write(folder: Path, data: bytes, suffix: str) -> Path:
    path = folder / f"{uuid.uuid4().hex}{suffix}"
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- .bin


def _read_bin_or_typed_error(folder: Path, data: bytes):
    path = _write(folder, data, ".bin")
    try:
        return read_bin(path)
    except (BinFormatError, UnsafePickleError) as error:
        assert str(path) in str(error)
        return None
    finally:
        path.unlink()


PAYLOAD_MARKER = "facesphere_property_marker"


@given(data=st.binary(max_size=300))
def test_bin_reader_on_random_bytes(folder, data):
    _read_bin_or_typed_error(folder, data)


pairs_of_bytes = st.integers(1, 4).flatmap(lambda n: st.tuples(
    st.lists(st.binary(max_size=40), min_size=2 * n, max_size=2 * n), st.lists(st.booleans(), min_size=n, max_size=n)))


@given(pairs=pairs_of_bytes, protocol=st.integers(0, pickle.HIGHEST_PROTOCOL), as_tuple=st.booleans())
def test_bin_round_trip_of_valid_sets(folder, pairs, protocol, as_tuple):
    bins, issame = pairs
    data = pickle.dumps((tuple(bins) if as_tuple else bins, issame), protocol=protocol)
    encoded, same = _read_bin_or_typed_error(folder, data)
    assert encoded == bins and same.tolist() == issame


@given(pairs=pairs_of_bytes)
def test_bin_round_trip_of_numpy_encoded_sets(folder, pairs):
    """The Paddle variant: each image a uint8 array (here (n, 1) columns, as in small_lfw.bin), protocol 2."""
    bins, issame = pairs
    arrays = [np.frombuffer(b, np.uint8).reshape(-1, 1).copy() for b in bins]
    encoded, same = _read_bin_or_typed_error(folder, pickle.dumps((arrays, issame), protocol=2))
    assert encoded == bins and same.tolist() == issame


@given(pairs=pairs_of_bytes, protocol=st.integers(0, pickle.HIGHEST_PROTOCOL),
       edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255), st.sampled_from("rid")), max_size=4))
def test_bin_reader_on_mutated_valid_sets(folder, pairs, protocol, edits):
    data = bytearray(pickle.dumps(pairs, protocol=protocol))
    for where, value, how in edits:
        where %= len(data) + 1
        if how == "r" and where < len(data):
            data[where] = value
        elif how == "i":
            data.insert(where, value)
        elif where < len(data):
            del data[where]
    _read_bin_or_typed_error(folder, bytes(data))


OPCODES = [op for op in pickletools.opcodes if op.code not in ("\x80", ".")]
ARGUMENTS = {"decimalnl_short": b"1\n", "decimalnl_long": b"1L\n", "floatnl": b"1.5\n",
             "stringnl": b"'x'\n", "stringnl_noescape": b"os\n", "stringnl_noescape_pair": b"os\nsystem\n",
             "unicodestringnl": b"echo\n", "uint1": b"\x01", "uint2": b"\x01\x00", "uint4": b"\x01\x00\x00\x00",
             "uint8": b"\x01" + b"\x00" * 7, "int4": b"\x01\x00\x00\x00", "long1": b"\x01\x01",
             "long4": b"\x01\x00\x00\x00\x01", "string1": b"\x02ab", "string4": b"\x02\x00\x00\x00ab",
             "bytes1": b"\x02ab", "bytes4": b"\x02\x00\x00\x00ab", "bytes8": b"\x02" + b"\x00" * 7 + b"ab",
             "bytearray8": b"\x02" + b"\x00" * 7 + b"ab", "unicodestring1": b"\x02os",
             "unicodestring4": b"\x06\x00\x00\x00system", "unicodestring8": b"\x02" + b"\x00" * 7 + b"os",
             "float8": b"?\xf0\x00\x00\x00\x00\x00\x00"}


def _argument(op) -> bytes:
    return b"" if op.arg is None else ARGUMENTS[op.arg.name]


@given(ops=st.lists(st.sampled_from(OPCODES), max_size=30),
       tail=st.sampled_from([b".", b"", b"R.", b"b."]))
def test_bin_reader_on_random_opcode_streams_never_runs_anything(folder, ops, tail):
    """Streams of arbitrary opcodes (GLOBAL os.system, STACK_GLOBAL, REDUCE, BUILD, INST, OBJ, ...) whose string
    arguments name os / system / echo: parsed or refused, and nothing named by them is ever called."""
    stream = b"\x80\x02" + b"".join(op.code.encode("latin1") + _argument(op) for op in ops) + tail
    calls = []
    import os

    real_system = os.system
    os.system = lambda *args: calls.append(args)  # any escape would land here
    try:
        _read_bin_or_typed_error(folder, stream)
    finally:
        os.system = real_system
    assert not calls


def test_a_global_for_os_system_is_refused_before_it_is_called(folder, tmp_path):
    marker = tmp_path / PAYLOAD_MARKER
    data = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    assert _read_bin_or_typed_error(folder, data) is None and not marker.exists()


# --------------------------------------------------------------------------- .pts


@given(text=st.text(max_size=200))
def test_pts_reader_on_random_text(folder, text):
    path = _write(folder, text.encode("utf-8", "surrogatepass"), ".pts")
    try:
        points = read_pts(path)
    except ValueError:
        return
    finally:
        path.unlink()
    assert points.ndim == 2 and points.shape[1] == 2 and points.dtype == np.float64 and np.isfinite(points).all()


@given(count=st.just("2") | st.text(min_size=1, max_size=8).filter(
           lambda t: t.strip() and ":" not in t and "\n" not in t and "\r" not in t and not t.strip().isdecimal()),
       value=st.sampled_from(["nan", "inf", "-inf"]))
def test_pts_bad_header_or_non_finite_point_is_a_value_error_naming_the_file(folder, count, value):
    """A non-numeric n_points, or a nan/inf coordinate, is refused naming the file (was a bare int() error, or
    accepted)."""
    path = _write(folder, f"version: 1\nn_points: {count}\n{{\n1 2\n{value} 3\n}}\n".encode(), ".pts")
    with pytest.raises(ValueError, match=re.escape(path.name)):
        read_pts(path)
    path.unlink()


@given(points=st.lists(st.tuples(*[st.floats(-1e6, 1e6, allow_nan=False)] * 2), min_size=1, max_size=80),
       crlf=st.booleans())
def test_pts_round_trip(folder, points, crlf):
    lines = ["version: 1", f"n_points: {len(points)}", "{", *(f"{x!r} {y!r}" for x, y in points), "}"]
    path = _write(folder, ("\r\n" if crlf else "\n").join(lines).encode(), ".pts")
    np.testing.assert_array_equal(read_pts(path), np.array(points, dtype=np.float64))
    path.unlink()


# --------------------------------------------------------------------------- model cards

VALID_CARD = dict(name="tiny", backbone="mobilefacenet", backbone_args={"bn_eps": 1e-3}, input_size=[112, 96],
                  colour_order="RGB", mean=[127.5] * 3, std=[128.0] * 3, alignment="sphereface_112x96",
                  embedding_size=32, licence="test", source="test")

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=4), max_leaves=12)


def _card_or_typed_error(text):
    try:
        card = ModelCard.from_json(text)
    except ValueError:
        return None
    assert ModelCard.from_json(card.to_json()) == card  # whatever loads, saves and loads back the same
    return card


@given(value=json_values)
def test_card_from_random_json(value):
    _card_or_typed_error(json.dumps(value))


@given(data=st.binary(max_size=200))
def test_card_from_random_bytes(data):
    _card_or_typed_error(data)


@given(key=st.sampled_from(sorted(VALID_CARD)), drop=st.booleans(),
       value=json_values | st.lists(st.floats(), min_size=2, max_size=3) | st.lists(st.integers(-5, 2**40), min_size=1,
                                                                                     max_size=2) | st.integers())
def test_card_with_one_field_changed(key, value, drop):
    fields = dict(VALID_CARD)
    if drop:
        del fields[key]
    else:
        fields[key] = value
    card = _card_or_typed_error(json.dumps(fields))
    if card is not None:  # loads, so it can be built and fed: bounded sizes, finite normalisation
        assert all(np.isfinite(card.mean)) and all(np.isfinite(card.std)) and min(card.std) > 0
        assert max(card.input_size) <= MAX_INPUT_SIDE and card.embedding_size <= MAX_EMBEDDING_SIZE


finite = st.floats(-1e4, 1e4, allow_nan=False)


@given(name=st.text(min_size=1, max_size=20), size=st.tuples(st.integers(1, 512), st.integers(1, 512)),
       order=st.sampled_from(["RGB", "BGR"]), mean=st.tuples(finite, finite, finite),
       std=st.tuples(*[st.floats(1e-3, 1e4)] * 3), embedding=st.integers(1, 4096), notes=st.text(max_size=30),
       args=st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k not in ("input_size", "embedding_size")),
                            st.booleans() | st.integers() | finite | st.text(max_size=8), max_size=3))
def test_card_round_trip(name, size, order, mean, std, embedding, notes, args):
    card = ModelCard(name=name, backbone="mobilefacenet", backbone_args=args, input_size=size, colour_order=order,
                     mean=mean, std=std, alignment="arcface_112x112", embedding_size=embedding, licence="l",
                     source="s", notes=notes)
    assert ModelCard.from_json(card.to_json()) == card


# --------------------------------------------------------------------------- image decoding

MAGICS = [m for magics in IMAGE_MAGIC.values() for m in magics] + [b"RIFF\x10\x00\x00\x00WEBPVP8 "]


def _small_images() -> dict[str, bytes]:
    image = Image.fromarray(np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3))
    out = {}
    for fmt in ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM"):
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        out[fmt] = buffer.getvalue()
    return out


SMALL_IMAGES = _small_images()


def _decoded_or_typed_error(data: bytes, folder: Path | None = None):
    try:
        if folder is None:
            array = load_image_bytes(data, "probe")
        else:
            path = _write(folder, data, ".img")
            try:
                array = load_image(path)
            finally:
                path.unlink()
    except ImageError:
        return None
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3 and min(array.shape[:2]) >= 1
    return array


@given(magic=st.sampled_from(MAGICS), rest=st.binary(max_size=400))
def test_image_decoding_of_random_bytes_after_a_valid_magic(magic, rest):
    _decoded_or_typed_error(magic + rest)


@given(fmt=st.sampled_from(sorted(SMALL_IMAGES)),
       edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255), st.sampled_from("ridt")), min_size=1,
                      max_size=4))
def test_image_decoding_of_mutated_small_images(folder, fmt, edits):
    data = bytearray(SMALL_IMAGES[fmt])
    for where, value, how in edits:
        if not data:
            break
        where %= len(data)
        if how == "r":
            data[where] = value
        elif how == "i":
            data.insert(where, value)
        elif how == "d":
            del data[where]
        else:
            del data[max(where, 1):]
    _decoded_or_typed_error(bytes(data), folder if edits[0][0] % 2 else None)


@pytest.mark.parametrize("fmt", sorted(SMALL_IMAGES))
def test_every_format_with_a_magic_decodes(fmt):
    assert _decoded_or_typed_error(SMALL_IMAGES[fmt]).shape == (4, 5, 3)
