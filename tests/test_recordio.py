"""MXNet RecordIO without MXNet: format round trips, an independent writer, corrupt files, the InsightFace
layout, DataLoader workers, the CLI, and the OpenCV JPEG path of load_image_bytes."""

from __future__ import annotations

import io
import json
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from conftest import require_data
from PIL import Image
from typer.testing import CliRunner

from facesphere.cli.main import app
from facesphere.data import (
    AugmentConfig,
    GlobalBatchSampler,
    ImageError,
    ImageFolderDataset,
    SyntheticFaces,
    build_loader,
    images,
    load_image,
    load_image_bytes,
    write_image_folder,
)
from facesphere.data.record_dataset import (
    RecordDataset,
    describe_records,
    pack_folder,
    read_layout,
)
from facesphere.data.recordio import (
    IRHeader,
    RecordIOError,
    RecordIOReader,
    RecordIOWriter,
    pack,
    unpack,
)

MAGIC = struct.pack("<I", 0xCED7230A)


# ------------------------------------------------------------------ an independent writer, straight from the spec


def _spec_parts(payload: bytes) -> list[tuple[int, bytes]]:
    """(cflag, data) parts: cut wherever the magic sits at a 4-byte aligned offset, dropping it."""
    cuts = [i for i in range(0, len(payload) - 3, 4) if payload[i:i + 4] == MAGIC]
    if not cuts:
        return [(0, payload)]
    bounds = [0, *[c + 4 for c in cuts]]
    ends = [*cuts, len(payload)]
    pieces = [payload[s:e] for s, e in zip(bounds, ends)]
    return [(1 if i == 0 else 3 if i == len(pieces) - 1 else 2, p) for i, p in enumerate(pieces)]


def _spec_write(rec, records: list[tuple[int, bytes]]) -> None:
    """Write ``(key, payload)`` records as .rec + .idx with plain struct.pack (not facesphere's writer)."""
    out, idx = bytearray(), []
    for key, payload in records:
        idx.append(f"{key}\t{len(out)}\n")
        for cflag, data in _spec_parts(payload):
            out += struct.pack("<II", 0xCED7230A, cflag << 29 | len(data)) + data + b"\0" * (-len(data) % 4)
    rec.write_bytes(bytes(out))
    rec.with_suffix(".idx").write_text("".join(idx))


def _spec_header(flag: int, label, key: int) -> bytes:
    if flag:
        return struct.pack("<IfQQ", flag, 0.0, key, 0) + struct.pack(f"<{flag}f", *label)
    return struct.pack("<IfQQ", 0, float(label), key, 0)


def _jpeg(seed: int, size=(24, 32), comment: bytes = b"") -> bytes:
    rng = np.random.default_rng(seed)
    image = cv_smooth(rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    if comment:  # a COM segment right after SOI
        data = data[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + data[2:]
    return data


def cv_smooth(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((image.shape[1] // 4, image.shape[0] // 4)).resize(
        (image.shape[1], image.shape[0]), Image.BILINEAR))


def _pillow(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


# ---------------------------------------------------------------------------------------------- format


def test_writer_splits_at_aligned_magic_and_reader_rejoins(tmp_path):
    payloads = [b"abc", MAGIC + b"1234" + MAGIC, b"x" + MAGIC + b"yyy", b"12345678" + MAGIC, MAGIC, b"",
                b"ab" + MAGIC + MAGIC, b"abcd" + MAGIC * 3 + b"z"]
    with RecordIOWriter(tmp_path / "a.rec") as writer:
        for p in payloads:
            writer.write(p)
    reference = tmp_path / "ref.rec"
    _spec_write(reference, list(enumerate(payloads)))
    assert (tmp_path / "a.rec").read_bytes() == reference.read_bytes()  # byte-identical to the spec writer
    assert (tmp_path / "a.idx").read_text() == reference.with_suffix(".idx").read_text()
    raw = (tmp_path / "a.rec").read_bytes()
    assert len(raw) % 4 == 0
    reader = RecordIOReader(tmp_path / "a.rec")
    assert [reader.read(k) for k in range(len(payloads))] == payloads
    assert [p for _, p in reader.scan()] == payloads
    assert [p for _, p in reader] == payloads
    scanned = RecordIOReader(tmp_path / "a.rec", idx_path=None)  # no index: scan the file
    assert np.array_equal(scanned.offsets, reader.offsets) and scanned.read(3) == payloads[3]
    # The aligned magic produced first/last parts, the unaligned one did not.
    second = int(reader.offsets[1])
    assert struct.unpack_from("<I", raw, second + 4)[0] >> 29 == 1
    third = int(reader.offsets[2])
    assert struct.unpack_from("<I", raw, third + 4)[0] >> 29 == 0


def test_irheader_pack_unpack():
    header, payload = unpack(pack(IRHeader(0, 7.0, 12, 3), b"img"))
    assert header == IRHeader(0, 7.0, 12, 3) and payload == b"img"
    header, payload = unpack(pack(IRHeader(0, (5.0, 0.25, -1.0), 4), b"x"))
    assert header.flag == 3 and header.label == (5.0, 0.25, -1.0) and header.labels[0] == 5.0 and payload == b"x"
    with pytest.raises(RecordIOError, match="flag 9 needs 9 label floats"):
        unpack(struct.pack("<IfQQ", 9, 0.0, 0, 0) + b"\0" * 8, "x.rec", 40)
    with pytest.raises(RecordIOError, match="x.rec at byte 40"):
        unpack(b"short", "x.rec", 40)


def test_writer_is_atomic(tmp_path):
    with pytest.raises(RuntimeError), RecordIOWriter(tmp_path / "a.rec") as writer:
        writer.write(b"data")
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with RecordIOWriter(tmp_path / "a.rec") as writer:
        writer.write(b"data")
        assert not (tmp_path / "a.rec").exists()  # only temporary files until close
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.idx", "a.rec"]
    with pytest.raises(ValueError, match="duplicate"), RecordIOWriter(tmp_path / "b.rec") as writer:
        writer.write(b"1", key=3)
        writer.write(b"2", key=3)


# ------------------------------------------------------------------------------- independent InsightFace pack


def test_independent_insightface_rec_reads_back(tmp_path):
    # 5 images of 2 identities; image 3 has a label array (identity = label[0]); image 2's JPEG carries the
    # magic at an aligned record offset (split into parts) and at an unaligned one (kept in place).
    comment = b"ab" + MAGIC + b"c" + MAGIC  # COM data starts at record byte 24 + 6 = 30: magic at 32 (aligned), 37
    jpegs = [_jpeg(i, comment=comment if i == 2 else b"") for i in range(1, 6)]
    labels = [0, 0, 1, 1, 1]
    a, b = 6, 8
    records = [(0, _spec_header(2, (a, b), 0))]
    for key, (data, label) in enumerate(zip(jpegs, labels), start=1):
        header = _spec_header(2, (label, 0.5), key) if key == 3 else _spec_header(0, label, key)
        records.append((key, header + data))
    records += [(6, _spec_header(2, (1, 3), 6)), (7, _spec_header(2, (3, 6), 7))]
    root = tmp_path / "ds"
    root.mkdir()
    _spec_write(root / "train.rec", records)
    (root / "property").write_text("2,24,32\n")

    raw = (root / "train.rec").read_bytes()
    reader = RecordIOReader(root / "train.rec")
    offset = int(reader.offsets[2])
    assert struct.unpack_from("<I", raw, offset + 4)[0] >> 29 == 1  # really split
    assert reader.read(2) == records[2][1]  # ... and re-joined with the magic back in place
    header, payload = reader.read_header(3)
    assert header.flag == 2 and header.label == (1.0, 0.5) and header.id == 3 and payload == jpegs[2]
    assert reader.read_label_header(2) == IRHeader(0, 0.0, 2, 0)

    layout = read_layout(reader)
    assert layout.header == (6, 8) and layout.image_keys.tolist() == [1, 2, 3, 4, 5]
    assert layout.identity_ranges.tolist() == [[1, 3], [3, 6]]
    ds = RecordDataset(root)
    assert len(ds) == 5 and ds.num_classes == 2 and ds.image_size == (24, 32)
    assert ds.labels.tolist() == labels
    for i, data in enumerate(jpegs):
        image, targets = ds[i]
        assert targets == {"label": labels[i]}
        assert np.array_equal(ds.load_uint8(i), _pillow(data))
        assert image.shape == (3, 24, 32) and image.dtype == torch.float32
    assert ds.source(1).endswith("train.rec#2")


def test_independent_rec_without_header_record(tmp_path):
    jpegs = [_jpeg(i) for i in range(4)]
    labels = [2, 0, 1, 2]
    _spec_write(tmp_path / "plain.rec", [(k, _spec_header(0, lab, k) + d) for k, (d, lab) in enumerate(zip(jpegs, labels))])
    ds = RecordDataset(tmp_path / "plain.rec")
    assert ds.layout.header is None and ds.keys.tolist() == [0, 1, 2, 3]
    assert ds.labels.tolist() == labels and ds.num_classes == 3 and ds.image_size == (24, 32)
    assert np.array_equal(ds.load_uint8(3), _pillow(jpegs[3]))
    (tmp_path / "plain.idx").unlink()  # no index: records keyed 0.. in file order
    assert RecordDataset(tmp_path / "plain.rec").labels.tolist() == labels


def test_rec_with_a_huge_label_or_class_count_is_refused(tmp_path):
    """A stray label (or property) of 2e9 would size the classifier for 2e9 classes: refused, naming the record."""
    jpeg = _jpeg(0)
    _spec_write(tmp_path / "plain.rec", [(k, _spec_header(0, lab, k) + jpeg) for k, lab in enumerate([0, 1, 2e9])])
    with pytest.raises(RecordIOError, match=r"plain.rec#2: label 2000000000: the classifier would have 2,000,000,001"):
        RecordDataset(tmp_path / "plain.rec")
    _spec_write(tmp_path / "train.rec", [(k, _spec_header(0, lab, k) + jpeg) for k, lab in enumerate([0, 1, 1])])
    (tmp_path / "property").write_text("2000000000,24,32\n")
    with pytest.raises(RecordIOError, match=r"property: property says 2,000,000,000 classes"):
        RecordDataset(tmp_path)


@pytest.mark.parametrize("label", [(float("inf"), 5.0), (3.0e38, 3.0e38), (float("nan"), 2.0), (2.0, 1.5)])
def test_header_record_with_an_unusable_range_is_a_recordio_error(tmp_path, label):
    """Found by the property tests: an infinite or huge (a, b) in record 0 ended in OverflowError / MemoryError."""
    _spec_write(tmp_path / "x.rec", [(0, _spec_header(2, label, 0)), (1, _spec_header(0, 0, 1) + _jpeg(0))])
    with pytest.raises(RecordIOError, match="record 0|header record 0"):
        RecordDataset(tmp_path / "x.rec")


# ----------------------------------------------------------------------------------------- pack_folder


def _folder(tmp_path):
    root = tmp_path / "faces"
    write_image_folder(SyntheticFaces(3, 4, image_size=(40, 36)), root)
    jpeg_dir = root / "00003 jpeg person"
    jpeg_dir.mkdir()
    for i in range(3):
        (jpeg_dir / f"{i}.jpg").write_bytes(_jpeg(10 + i, size=(40, 36)))
    (root / "00001" / "extra.jpeg").write_bytes(_jpeg(20, size=(40, 36)))
    return root


def test_pack_folder_round_trip(tmp_path):
    root = _folder(tmp_path)
    result = pack_folder(root, tmp_path / "out", progress=False)
    folder = ImageFolderDataset(root)
    assert result.images == len(folder) == 16 and result.identities == 4
    assert result.stored == {"jpeg as is": 4, "png as is": 12}
    assert (tmp_path / "out" / "property").read_text().strip() == "4,40,36"
    ds = RecordDataset(tmp_path / "out")
    assert ds.num_classes == folder.num_classes == 4 and ds.image_size == (40, 36)
    assert ds.labels.tolist() == folder.labels.tolist()
    for i, path in enumerate(folder.paths):
        assert ds.read_image_bytes(i)[1] == path.read_bytes()  # stored byte for byte
        assert np.array_equal(ds.decode(i), folder.decode(i))
        assert np.array_equal(ds.load_uint8(i), folder.load_uint8(i))
    starts = [int(np.argmax(folder.labels == c)) + 1 for c in range(4)] + [len(folder) + 1]
    assert ds.layout.identity_ranges.tolist() == [[starts[c], starts[c + 1]] for c in range(4)]
    assert ds.layout.header == (17, 21)
    info = describe_records(ds)
    assert info["images"] == 16 and info["identities"] == 4 and info["formats"] == {"png": 12, "jpeg": 4}
    assert info["images_per_identity"] == {"min": 3, "median": 4.0, "max": 5}
    with pytest.raises(FileExistsError):
        pack_folder(root, tmp_path / "out", progress=False)


def test_pack_folder_jpeg_reencode_and_other_formats(tmp_path):
    root = tmp_path / "faces"
    write_image_folder(SyntheticFaces(2, 2, image_size=(32, 32)), root)
    Image.fromarray(np.full((32, 32, 3), 77, np.uint8)).save(root / "00000" / "z.bmp")
    result = pack_folder(root, tmp_path / "png", progress=False)
    assert result.stored == {"png as is": 4, "bmp re-encoded as png": 1}
    ds, folder = RecordDataset(tmp_path / "png"), ImageFolderDataset(root)
    assert all(np.array_equal(ds.decode(i), folder.decode(i)) for i in range(len(ds)))  # lossless
    result = pack_folder(root, tmp_path / "jpg", jpeg=True, quality=90, progress=False)
    assert result.stored == {"png re-encoded as jpeg": 4, "bmp re-encoded as jpeg": 1}
    assert RecordDataset(tmp_path / "jpg").read_image_bytes(0)[1][:3] == b"\xff\xd8\xff"


def test_pack_folder_leaves_nothing_on_failure(tmp_path):
    root = _folder(tmp_path)
    (root / "00002" / "broken.png").write_bytes((root / "00002" / "0000.png").read_bytes()[:100])
    with pytest.raises(ImageError, match="broken.png"):
        pack_folder(root, tmp_path / "out", progress=False)
    assert list((tmp_path / "out").iterdir()) == []


def _png_bomb(width: int, height: int) -> bytes:
    """A small PNG declaring ``width x height`` RGB pixels, its data a compressed run of zeros (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = zlib.compress(bytes((1 + 3 * width) * 16), 9)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


@pytest.mark.parametrize("verify", ["--verify", "--no-verify"])
@pytest.mark.parametrize(("name", "data", "reason"), [
    ("bomb.png", _png_bomb(60_000, 60_000), "decompression bomb"),  # above Pillow's own limit
    ("big.png", _png_bomb(8_000, 8_000), "exceeds the limit of 40000000 pixels"),  # above ours only
    ("junk.png", b"\x89PNG\r\n\x1a\nnot really", "not a recognised image format|cannot decode|cannot read the image header"),
])
def test_cli_pack_refuses_a_bomb_in_one_line_with_or_without_verify(tmp_path, verify, name, data, reason):
    """--no-verify skips decoding but still reads every header: a bomb is refused by name, exit 2, nothing written."""
    root = _folder(tmp_path)
    (root / "00001" / name).write_bytes(data)
    assert len(data) < 20_000
    result = CliRunner().invoke(app, ["data", "pack", str(root), str(tmp_path / "out"), verify])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in text and result.exception.__class__ is SystemExit, text
    assert re.search(f"00001/{name}: .*({reason})", text), text
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


# --------------------------------------------------------------------------------------- corrupt files


@pytest.fixture
def packed(tmp_path):
    root = tmp_path / "faces"
    write_image_folder(SyntheticFaces(2, 3, image_size=(32, 32)), root)
    pack_folder(root, tmp_path / "ds", progress=False)
    return tmp_path / "ds"


def test_flipped_magic_names_the_offset(packed):
    reader = RecordIOReader(packed / "train.rec")
    offset = int(reader.offsets[2])
    raw = bytearray((packed / "train.rec").read_bytes())
    raw[offset] ^= 0xFF
    (packed / "train.rec").write_bytes(bytes(raw))
    with pytest.raises(RecordIOError, match=rf"train.rec at byte {offset}: bad magic"):
        RecordIOReader(packed / "train.rec").read(2)
    ds = RecordDataset(packed)  # labels come from the identity records: the image header is not read yet
    with pytest.raises(RecordIOError, match=rf"at byte {offset}"):
        ds[1]
    with pytest.raises(RecordIOError, match=rf"at byte {offset}"):
        list(RecordIOReader(packed / "train.rec", idx_path=None).scan())


def test_truncated_rec_names_the_offset(packed):
    reader = RecordIOReader(packed / "train.rec")
    last_image = int(reader.offsets[6])
    raw = (packed / "train.rec").read_bytes()
    (packed / "train.rec").write_bytes(raw[:last_image + 50])  # cut inside image record 6
    with pytest.raises(RecordIOError, match=r"train.idx:8 at byte \d+: record 7: offset lies beyond the end"):
        RecordIOReader(packed / "train.rec", packed / "train.idx")  # the identity records are gone
    (packed / "train.idx").unlink()
    with pytest.raises(RecordIOError, match=rf"at byte {last_image}: truncated"):
        RecordIOReader(packed / "train.rec")
    (packed / "train.rec").write_bytes(raw[:last_image + 4])  # inside the part header
    with pytest.raises(RecordIOError, match="truncated"):
        RecordIOReader(packed / "train.rec")


def test_truncated_record_found_on_read(tmp_path):
    with RecordIOWriter(tmp_path / "a.rec") as writer:
        writer.write(b"x" * 40)
        writer.write(b"y" * 40)
    raw = (tmp_path / "a.rec").read_bytes()
    (tmp_path / "a.rec").write_bytes(raw[:-10])
    reader = RecordIOReader(tmp_path / "a.rec")  # the index only points at the start: fine until read
    assert reader.read(0) == b"x" * 40
    with pytest.raises(RecordIOError, match=r"a.rec at byte 48: truncated: a part of 40 bytes runs past the end"):
        reader.read(1)


def test_idx_beyond_eof_and_garbage_lines(packed):
    idx = packed / "train.idx"
    lines = idx.read_text().splitlines()
    size = (packed / "train.rec").stat().st_size
    idx.write_text("\n".join([*lines[:3], f"3\t{size + 64}", *lines[4:]]) + "\n")
    with pytest.raises(RecordIOError, match=rf"train.idx:4 at byte {size + 64}: record 3: offset lies beyond the end"):
        RecordDataset(packed)
    idx.write_text("\n".join([*lines[:2], "2 garbage", *lines[3:]]) + "\n")
    with pytest.raises(RecordIOError, match=r"train.idx:3: expected"):
        RecordIOReader(packed / "train.rec")
    idx.write_text("\n".join([*lines[:5], "not a line at all", *lines[5:]]) + "\n")
    with pytest.raises(RecordIOError, match=r"train.idx:6: expected"):
        RecordIOReader(packed / "train.rec")


def test_continuation_flags_out_of_order(tmp_path):
    data = struct.pack("<II", 0xCED7230A, 3 << 29 | 4) + b"abcd"  # a "last part" with no first part
    (tmp_path / "a.rec").write_bytes(data)
    with pytest.raises(RecordIOError, match=r"a.rec at byte 0: continuation flag 3 out of order"):
        RecordIOReader(tmp_path / "a.rec", idx_path=None)
    data = struct.pack("<II", 0xCED7230A, 1 << 29 | 4) + b"abcd" + struct.pack("<II", 0xCED7230A, 0 << 29 | 4) + b"efgh"
    (tmp_path / "b.rec").write_bytes(data)
    (tmp_path / "b.idx").write_text("0\t0\n")
    with pytest.raises(RecordIOError, match=r"b.rec at byte 12: continuation flag 0 out of order"):
        RecordIOReader(tmp_path / "b.rec").read(0)


def test_header_flag_beyond_record(tmp_path):
    _spec_write(tmp_path / "a.rec", [(0, struct.pack("<IfQQ", 0, 1.0, 0, 0) + b"img"),
                                     (1, struct.pack("<IfQQ", 50, 0.0, 1, 0) + b"\0" * 12)])
    reader = RecordIOReader(tmp_path / "a.rec")
    offset = int(reader.offsets[1])
    with pytest.raises(RecordIOError, match=rf"a.rec at byte {offset}: header flag 50 needs 50 label floats"):
        RecordDataset(tmp_path / "a.rec")


# ------------------------------------------------------------------------------------------- real data


def test_celebrity_images_round_trip(tmp_path):
    source = require_data("data/glint360k_celeb_subset/datasets/celebrity_images")
    result = pack_folder(source, tmp_path / "celeb", progress=False)
    folder = ImageFolderDataset(source)
    assert result.images == len(folder) == 712 and result.identities == folder.num_classes == 24
    ds = RecordDataset(tmp_path / "celeb")
    assert ds.num_classes == 24 and ds.image_size == (112, 112) and ds.labels.tolist() == folder.labels.tolist()
    for i, path in enumerate(folder.paths):
        assert ds.read_image_bytes(i)[1] == path.read_bytes()
        assert np.array_equal(ds.decode(i), folder.decode(i)), path


# ---------------------------------------------------------------------------------------------- loader


def test_dataloader_workers_match_single_process(packed):
    ds = RecordDataset(packed, augment=AugmentConfig(flip=0.5, scale=(1.0, 1.1)), seed=3)
    sampler = GlobalBatchSampler(len(ds), 2, seed=1)

    def batches(workers):
        loader = build_loader(ds, sampler, num_workers=workers, persistent_workers=False)
        return [(x.clone(), y["label"].clone()) for x, y in loader]

    single, multi = batches(0), batches(2)
    assert len(single) == len(multi) == 3
    for (x0, y0), (x1, y1) in zip(single, multi):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_pack_and_inspect(tmp_path):
    runner = CliRunner()
    root = _folder(tmp_path)
    result = runner.invoke(app, ["data", "pack", str(root), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    sheet = tmp_path / "sheet.png"
    result = runner.invoke(app, ["data", "inspect", str(tmp_path / "out"), "--json", "--samples", "6", "--sheet", str(sheet)])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["images"] == 16 and info["identities"] == 4 and info["records"] == 21 and info["layout"] == "insightface"
    assert info["property"] == {"num_classes": 4, "height": 40, "width": 36} and info["samples_decoded"] == 6
    with Image.open(sheet) as image:
        assert image.format == "PNG" and image.size[0] > 6 * 36
    result = runner.invoke(app, ["data", "inspect", str(tmp_path / "out")])
    assert result.exit_code == 0 and "images per identity" in result.output


def test_cli_corrupt_file_is_one_clear_error(packed):
    runner = CliRunner()
    raw = bytearray((packed / "train.rec").read_bytes())
    raw[0] ^= 0xFF
    (packed / "train.rec").write_bytes(bytes(raw))
    result = runner.invoke(app, ["data", "inspect", str(packed)])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "Traceback" not in text and "at byte 0: bad magic" in text


# ------------------------------------------------------------------------------ JPEG path of load_image_bytes


@pytest.fixture(params=["opencv", "pillow"])
def jpeg_decoder(request, monkeypatch):
    monkeypatch.setattr(images, "JPEG_DECODER", request.param)
    return request.param


def test_jpeg_decoders_agree_and_keep_safety_checks(tmp_path, jpeg_decoder):
    data = _jpeg(1, size=(48, 40))
    assert np.array_equal(load_image_bytes(data), _pillow(data))
    gray = io.BytesIO()
    Image.fromarray(np.arange(48 * 40, dtype=np.uint8).reshape(48, 40) * 7).save(gray, format="JPEG")
    assert np.array_equal(load_image_bytes(gray.getvalue()), _pillow(gray.getvalue()))
    with pytest.raises(ImageError, match="x.rec#3: cannot decode: truncated"):
        load_image_bytes(data[: len(data) * 2 // 3], "x.rec#3")
    with pytest.raises(ImageError, match="exceeds the limit of 100 pixels"):
        load_image_bytes(data, max_pixels=100)
    assert np.array_equal(load_image_bytes(data + b"trailing"), _pillow(data))  # not EOI-terminated: Pillow path
    # EXIF orientation 6 (rotate 90 CW): upright like load_image, never OpenCV's raw pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = io.BytesIO()
    Image.fromarray(_pillow(data)).save(rotated, format="JPEG", exif=exif.tobytes())
    (tmp_path / "r.jpg").write_bytes(rotated.getvalue())
    upright = load_image_bytes(rotated.getvalue())
    assert upright.shape == (40, 48, 3) and np.array_equal(upright, load_image(tmp_path / "r.jpg"))


def test_record_reader_survives_pickling(packed):
    import pickle

    ds = RecordDataset(packed)
    first = ds.decode(0)
    clone = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(clone.decode(0), first) and clone.labels.tolist() == ds.labels.tolist()


def test_training_reads_a_packed_record_dataset(tmp_path):
    """``data.kind: record`` trains from the .rec exactly as from the folder it was packed from."""
    from facesphere.train.config import load_config
    from facesphere.train.data_setup import build_dataset
    from facesphere.train.trainer import Trainer, read_metrics

    root = _folder(tmp_path)
    pack_folder(root, tmp_path / "rec", progress=False)
    common = ["model.backbone=sphereface4", "model.backbone_args={embedding_size: 16, input_size: [40, 36]}",
              "model.head=cosface", "data.batch_size=8", "data.num_workers=0", "train.steps=3", "train.progress=false",
              "train.tensorboard=false", "eval.enabled=false", f"output_dir={tmp_path}", "train.log_every=1"]
    runs = {}
    for kind in ("record", "folder"):
        data_root = tmp_path / ("rec" if kind == "record" else "faces")
        cfg = load_config(None, common + [f"name={kind}", f"data.kind={kind}", f"data.root={data_root}"])
        assert build_dataset(cfg).num_classes == 4
        Trainer(cfg).fit()
        runs[kind] = [r["loss"] for r in read_metrics(tmp_path / kind / "metrics.csv")]
    assert len(runs["record"]) == 3 and runs["record"] == runs["folder"]


def test_an_index_entry_pointing_at_another_record_is_refused(packed):
    """A corrupt .idx whose entry for one image points at another image's valid offset would train on that image
    under the wrong label; the record header's id names its key, so reading it (training, `data inspect`) refuses."""
    idx = packed / "train.idx"
    rows = [line.split("\t") for line in idx.read_text().splitlines()]
    keys = [int(k) for k, _ in rows]
    reader = RecordIOReader(packed / "train.rec")
    images = [k for k in keys if k and reader.read_label_header(k).flag == 0]  # image records, not identity ones
    victim, other = images[0], images[-1]
    offsets = {int(k): o for k, o in rows}
    idx.write_text("".join(f"{k}\t{offsets[other] if k == victim else offsets[k]}\n" for k in keys))
    dataset = RecordDataset(packed)  # labels come from the identity records: the check is on reading an image
    position = int(np.flatnonzero(dataset.keys == victim)[0])
    with pytest.raises(RecordIOError, match=rf"maps key {victim} to a record whose header says it is record {other}"):
        dataset[position]
    dataset[int(np.flatnonzero(dataset.keys == other)[0])]  # the record itself still reads under its own key
    result = CliRunner().invoke(app, ["data", "inspect", str(packed)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "does not match the file" in " ".join(result.output.split())
