"""Property-based tests (hypothesis) of the data and config parsers: RecordIO records and index, list files,
configs and ``--set`` overrides. Every input is either read correctly or refused with the parser's typed error
(RecordIOError, ListFileError, ConfigError, ValueError for overrides); never another exception, never a wrong
record silently; what is written reads back equal."""

from __future__ import annotations

import math
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from facesphere.data.lists import ListFileError, parse_list_file, remap_list_file
from facesphere.data.record_dataset import RecordDataset
from facesphere.data.recordio import (
    MAGIC,
    IRHeader,
    RecordIOError,
    RecordIOReader,
    RecordIOWriter,
    pack,
    read_index,
    unpack,
)
from facesphere.train.config import ConfigError, ExperimentConfig, dump_config, load_config
from facesphere.utils.overrides import format_value, parse_override, parse_value

MAGIC_BYTES = struct.pack("<I", MAGIC)
pytestmark = pytest.mark.filterwarnings("ignore")
quick = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


_BASE: list[Path] = []


@pytest.fixture(autouse=True, scope="module")
def _base(tmp_path_factory):
    _BASE.append(tmp_path_factory.mktemp("property"))  # pytest keeps only its last few runs
    yield
    _BASE.pop()


def _tmp() -> Path:
    """A fresh folder per example (pytest's tmp_path is shared by all examples of one test)."""
    return Path(tempfile.mkdtemp(dir=_BASE[-1]))


# ------------------------------------------------------------------------------------------- RecordIO

# Payloads that often hold the magic at aligned and unaligned offsets, which split records into parts.
payloads = st.lists(st.sampled_from([b"", MAGIC_BYTES, b"\x00", b"ab", b"\x0a\x23\xd7", b"\xce\xd7\x23\x0a\xff"])
                    | st.binary(max_size=24), max_size=8).map(b"".join)
labels = st.floats(width=32, allow_nan=False) | st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=4).map(tuple)


@given(st.lists(st.tuples(labels, st.integers(0, 2**64 - 1), payloads), min_size=1, max_size=12))
@example([(0.0, 0, b"")])  # found: without an .idx, key 0 (file position) was refused against header id 1
def test_recordio_round_trip(records):
    """Random labels, ids and payloads (with the magic inside) written, then read back equal, by key and by scan."""
    folder = _tmp()
    with RecordIOWriter(folder / "x.rec") as writer:
        for key, (label, id2, payload) in enumerate(records, start=1):
            writer.write(pack(IRHeader(len(label) if isinstance(label, tuple) else 0, label, key, id2), payload), key=key)
    for reader in (RecordIOReader(folder / "x.rec"), RecordIOReader(folder / "x.rec", idx_path=None)):
        keys = reader.keys.tolist()
        assert len(keys) == len(records)
        for position, (label, id2, payload) in enumerate(records):
            header, data = reader.read_header(keys[position])
            assert data == payload and header.labels == (label if isinstance(label, tuple) else (label,))
            assert (header.id, header.id2) == (position + 1, id2)
    assert [data for _, data in reader.scan()] == [pack(IRHeader(len(lab) if isinstance(lab, tuple) else 0, lab, k, i), p)
                                                   for k, (lab, i, p) in enumerate(records, start=1)]


def _read_all(reader: RecordIOReader) -> None:
    for key in reader.keys.tolist():
        reader.read_header(key)
        reader.read_label_header(key)


@given(st.binary(max_size=300), st.booleans())
def test_arbitrary_bytes_as_rec_are_records_or_recordio_errors(data, magic_first):
    folder = _tmp()
    (folder / "x.rec").write_bytes((MAGIC_BYTES if magic_first else b"") + data)
    try:
        _read_all(RecordIOReader(folder / "x.rec", idx_path=None))
    except RecordIOError:
        pass


@st.composite
def packs_and_mutations(draw):
    records = draw(st.lists(payloads, min_size=2, max_size=6))
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
    return records, kind, draw(st.integers(0, 10_000)), draw(st.integers(1, 255)), draw(st.binary(min_size=1, max_size=8))


def _mutate(raw: bytearray, kind: str, at: int, xor: int, extra: bytes) -> None:
    if kind == "flip":
        raw[at] ^= xor
    elif kind == "truncate":
        del raw[at:]
    elif kind == "insert":
        raw[at:at] = extra
    else:
        del raw[at:at + len(extra)]


@given(packs_and_mutations())
def test_mutated_rec_reads_the_right_record_or_raises(case):
    """One mutation of a valid .rec (bit flip, truncation, inserted or deleted bytes), read through its .idx: a
    record the mutation did not touch reads back exactly when it lies before the mutation, and exactly or as a
    RecordIOError when after it (shifted); a touched record may read changed bytes (RecordIO has no checksum)
    but only ever raises a RecordIOError."""
    records, kind, where, xor, extra = case
    folder = _tmp()
    with RecordIOWriter(folder / "x.rec") as writer:
        for key, payload in enumerate(records, start=1):
            writer.write(pack(IRHeader(0, float(key), key, 0), payload), key=key)
    raw = bytearray((folder / "x.rec").read_bytes())
    starts = [int(line.split("\t")[1]) for line in (folder / "x.idx").read_text().splitlines()] + [len(raw)]
    at = where % len(raw)
    _mutate(raw, kind, at, xor, extra)
    (folder / "x.rec").write_bytes(bytes(raw))
    try:
        reader = RecordIOReader(folder / "x.rec")
    except RecordIOError:
        return
    for key, payload in enumerate(records, start=1):
        start, end = starts[key - 1], starts[key]
        try:
            header, data = reader.read_header(key)
        except RecordIOError:
            assert not end <= at or (kind == "truncate" and at == 0), "an untouched record before the mutation failed"
            continue
        if end <= at or (start > at and kind != "flip"):  # untouched (before), or shifted whole (after)
            assert header.id == key and data == payload


@given(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=6))
def test_idx_pointing_at_another_record_is_refused(swaps):
    """An index entry moved to another record's (valid) offset never pairs that record with this key's label."""
    folder = _tmp()
    with RecordIOWriter(folder / "x.rec") as writer:
        for key in range(1, 7):
            writer.write(pack(IRHeader(0, float(key), key, 0), bytes([key]) * key), key=key)
    offsets = dict(line.split("\t") for line in (folder / "x.idx").read_text().split("\n") if line)
    for a, b in swaps:
        offsets[str(a)], offsets[str(b)] = offsets[str(b)], offsets[str(a)]
    (folder / "x.idx").write_text("".join(f"{k}\t{o}\n" for k, o in offsets.items()))
    reader = RecordIOReader(folder / "x.rec")
    for key in range(1, 7):
        for read in (reader.read_header, lambda k: (reader.read_label_header(k), None)):
            try:
                header, _ = read(key)
            except RecordIOError as error:
                assert f"maps key {key}" in str(error)
                continue
            assert header.label == float(key) and header.id == key


@given(st.text(alphabet=st.sampled_from("0123456789 \t\n-+x#\r\x00\u00e9e_"), max_size=120) | st.text(max_size=60),
       st.integers(0, 10_000))
def test_random_index_text_is_parsed_or_refused(text, rec_size):
    folder = _tmp()
    (folder / "x.idx").write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        keys, offsets = read_index(folder / "x.idx", rec_size)
    except RecordIOError:
        return
    assert len(keys) == len(offsets) and np.all((offsets >= 0) & (offsets < max(rec_size, 1)) & (offsets % 4 == 0))


@given(st.binary(max_size=64))
def test_unpack_reads_a_header_or_raises(record):
    try:
        header, payload = unpack(record)
    except RecordIOError:
        return
    assert len(record) == 24 + 4 * max(header.flag, 0) + len(payload)


@given(packs_and_mutations())
@quick
def test_mutated_insightface_pack_is_a_dataset_or_a_typed_error(case):
    """RecordDataset over a mutated pack (header record, identity records, property): a data set or a RecordIOError
    / ValueError naming the file, never an IndexError, OverflowError or struct.error."""
    records, kind, where, xor, extra = case
    folder = _tmp()
    n = len(records)
    with RecordIOWriter(folder / "train.rec", folder / "train.idx") as writer:
        writer.write(pack(IRHeader(2, (float(n + 1), float(n + 3)), 0, 0)), key=0)
        for key in range(1, n + 1):
            writer.write(pack(IRHeader(0, float(key % 2), key, 0), records[key - 1]), key=key)
        writer.write(pack(IRHeader(2, (1.0, float(n // 2 + 1)), n + 1, 0)), key=n + 1)
        writer.write(pack(IRHeader(2, (float(n // 2 + 1), float(n + 1)), n + 2, 0)), key=n + 2)
    raw = bytearray((folder / "train.rec").read_bytes())
    _mutate(raw, kind, where % len(raw), xor, extra)
    (folder / "train.rec").write_bytes(bytes(raw))
    (folder / "property").write_bytes(extra)
    try:
        dataset = RecordDataset(folder, image_size=(8, 8))
    except (RecordIOError, ValueError):
        return
    assert len(dataset.labels) == len(dataset.keys) and dataset.num_classes >= 1


# ----------------------------------------------------------------------------------------- list files


def _plain_path(text: str) -> bool:
    return (bool(text) and text.strip() == text and not text.startswith("#") and " #" not in text
            and not any(c in text for c in "\n\r") and not any(c.isspace() and c not in " " for c in text))


paths = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20).filter(_plain_path)


@given(st.lists(st.tuples(paths, st.integers(0, 2**63 - 1)), min_size=1, max_size=10), st.sampled_from(["\n", "\r\n"]))
def test_list_file_round_trip(entries, newline):
    """Paths with spaces and any script, labels up to int64: written as lines, parsed back equal; remapped densely."""
    folder = _tmp()
    (folder / "list.txt").write_text("".join(f"{p} {label}{newline}" for p, label in entries), encoding="utf-8", newline="")
    assert parse_list_file(folder / "list.txt") == entries
    count = remap_list_file(folder / "list.txt", folder / "dense.txt")
    old = sorted({label for _, label in entries})
    assert count == len(old)
    assert parse_list_file(folder / "dense.txt") == [(p, old.index(label)) for p, label in entries]


@given(st.text(max_size=200) | st.binary(max_size=200))
def test_random_list_text_is_parsed_or_refused(content):
    folder = _tmp()
    if isinstance(content, str):
        (folder / "list.txt").write_text(content, encoding="utf-8", errors="surrogatepass")
    else:
        (folder / "list.txt").write_bytes(content)
    try:
        entries = parse_list_file(folder / "list.txt")
    except ListFileError as error:
        assert error.line >= 1 and str(error).startswith(f"{folder / 'list.txt'}:{error.line}: ")
        return
    assert all(isinstance(p, str) and p and 0 <= label < 2**63 for p, label in entries)


@given(st.lists(st.tuples(paths, st.integers(0, 99), st.lists(st.text("ab12+-", min_size=1, max_size=4), max_size=2)),
                min_size=1, max_size=5))
def test_extra_columns_are_part_of_the_path_or_refused(rows):
    """``path label extra...``: the label is the last field, so extra columns either end in an integer (then the path
    holds the rest) or are refused naming the line."""
    folder = _tmp()
    lines = [" ".join([p, str(label), *extra]) for p, label, extra in rows]
    (folder / "list.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        entries = parse_list_file(folder / "list.txt")
    except ListFileError as error:
        last = lines[error.line - 1].rsplit(" ", 1)[1]
        assert not (last.lstrip("+").isdigit() and len(last.lstrip("+0")) <= 18) or "negative" in str(error)
        return
    assert [f"{p} {label}" for p, label in entries] == [line.rsplit(" ", 1)[0] + " " + str(int(line.rsplit(" ", 1)[1]))
                                                       for line in lines]


# --------------------------------------------------------------------------------------------- configs

scalars = st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=False, width=32) | st.text(max_size=8)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                      max_leaves=6)


def _section_fields():
    """(section, field) names of ExperimentConfig's sections (plugins left out: it imports modules)."""
    out = []
    for name, field in ExperimentConfig.model_fields.items():
        sub = getattr(field.annotation, "model_fields", None)
        if sub:
            out += [(name, f) for f in sub]
        elif name != "plugins":
            out.append((name, None))
    return out


SECTION_FIELDS = _section_fields()


@given(st.lists(st.tuples(st.sampled_from(SECTION_FIELDS), values), max_size=6) | st.dictionaries(st.text(max_size=6), values, max_size=3))
@quick
def test_random_config_mappings_validate_or_raise_config_error(items):
    """Random values for the known fields (and random keys): a valid config or one ConfigError naming fields."""
    data: dict = {}
    if isinstance(items, dict):
        data = {k: v for k, v in items.items() if k != "plugins"}
    else:
        for (section, field), value in items:
            if field is None:
                data[section] = value
            elif isinstance(data.setdefault(section, {}), dict):
                data[section][field] = value
    folder = _tmp()
    (folder / "c.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    try:
        cfg = load_config(folder / "c.yaml")
    except ConfigError:
        return
    assert isinstance(cfg, ExperimentConfig)


@given(st.text(max_size=120) | st.binary(max_size=120))
@quick
def test_random_config_text_validates_or_raises_config_error(content):
    folder = _tmp()
    if isinstance(content, str):
        if "plugins" in content:
            return
        (folder / "c.yaml").write_text(content, encoding="utf-8", errors="surrogatepass")
    else:
        (folder / "c.yaml").write_bytes(content)
    try:
        load_config(folder / "c.yaml")
    except ConfigError:
        pass


valid_overrides = st.fixed_dictionaries({}, optional={
    "optim.lr": st.floats(1e-6, 10), "optim.momentum": st.floats(0, 0.99), "optim.nesterov": st.booleans(),
    "train.steps": st.integers(1, 10**6), "train.grad_clip": st.none() | st.floats(0.01, 100),
    "train.amp": st.sampled_from(["auto", "off", "bf16", "fp16"]), "data.batch_size": st.integers(1, 4096),
    "data.augment.scale": st.tuples(st.floats(0.5, 1), st.floats(1, 2)).map(list), "eval.flip": st.booleans(),
    "schedule.milestones": st.lists(st.integers(0, 1000), max_size=3), "seed": st.integers(0, 2**31),
    "name": st.text("abcXYZ019_- é", min_size=1, max_size=12).filter(lambda t: not t.startswith(".")),
    "model.head_args.scale": st.floats(1, 128)})


@given(valid_overrides)
@quick
def test_config_show_round_trip(overrides):
    """A valid config set through ``--set`` text, dumped as ``config show`` prints it and loaded again: equal."""
    cfg = load_config("quickstart", [f"{k}={format_value(v)}" for k, v in overrides.items()])
    for key, value in overrides.items():
        if not key.startswith("model."):
            node = cfg
            for part in key.split("."):
                node = getattr(node, part)
            assert (list(node) if isinstance(node, tuple) else node) == value
    folder = _tmp()
    (folder / "shown.yaml").write_text(dump_config(cfg), encoding="utf-8")
    assert load_config(folder / "shown.yaml") == cfg


# ------------------------------------------------------------------------------------------- overrides

override_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(st.characters(blacklist_categories=("Cs",))),
    lambda inner: st.lists(inner, max_size=3), max_leaves=6)


def _same(a, b) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return type(a) is type(b) and a == b


@given(override_values)
@example(">\U00010000")  # found: JSON's surrogate-pair escape read back as two lone surrogates
@example("2024")  # found: quoted numeric text became a number (no way to set a text field to "2024")
@example("1e-3")
def test_override_values_round_trip(value):
    """parse_value(format_value(v)) == v for None, bools, ints, floats, any text and lists of them."""
    text = format_value(value)
    assert _same(parse_value(text), value), (value, text, parse_value(text))


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_override_floats_round_trip_with_their_type(value):
    parsed = parse_value(format_value(value))
    assert isinstance(parsed, float) and _same(parsed, value)


@given(st.text(max_size=60))
def test_random_override_items_parse_or_raise_value_error(item):
    try:
        parts, _ = parse_override(item)
    except ValueError as error:
        assert "key=value" in str(error)
        return
    assert parts and all(parts) and "=" in item


@given(st.lists(st.text("abc.", min_size=1, max_size=6), min_size=1, max_size=4), override_values)
def test_random_key_paths_apply_or_raise_config_error(keys, value):
    """``--set`` with random key paths on a real config: validated or a ConfigError, never another exception."""
    items = [f"{key}={format_value(value)}" for key in keys]
    assume(all("plugins" not in k for k in keys))
    try:
        load_config("quickstart", items)
    except ConfigError:
        pass
