"""Data layer: synthetic faces, image decoding, folder/list data sets, augmentation, sampler, loaders."""

from __future__ import annotations

import io
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facesphere.data import (
    AugmentConfig,
    ColorJitter,
    Compose,
    GlobalBatchSampler,
    HorizontalFlip,
    ImageError,
    ImageFolderDataset,
    ImageListDataset,
    ListFileError,
    ScaleTranslate,
    SyntheticFaces,
    augment_rng,
    build_loader,
    load_image,
    resize_to,
    set_loader_epoch,
    to_tensor,
    to_uint8,
    write_image_folder,
)

AUGMENT = {"flip": 0.5, "scale": (0.9, 1.1), "translate": 0.05, "brightness": 0.2, "contrast": 0.2, "saturation": 0.2}


def _png_header(width: int, height: int) -> bytes:
    """A PNG that only declares its size (IHDR + IEND, no pixel data), as a decompression bomb would."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# ----------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_across_instances():
    a = SyntheticFaces(4, 3, seed=5)
    b = SyntheticFaces(4, 3, seed=5)
    for index in (0, 4, 11):
        assert torch.equal(a[index][0], b[index][0])
    assert not torch.equal(a[0][0], SyntheticFaces(4, 3, seed=6)[0][0])


def test_synthetic_identities_differ_and_samples_vary():
    ds = SyntheticFaces(6, 4, seed=0)
    images = np.stack([ds.load_uint8(i).astype(np.float32) for i in range(len(ds))])
    flat = images.reshape(6, 4, -1)
    within = np.mean([np.abs(flat[k, i] - flat[k, j]).mean() for k in range(6) for i in range(4) for j in range(i + 1, 4)])
    assert within > 10.0, "samples of one identity must differ visibly"
    for k in range(6):
        for m in range(k + 1, 6):
            assert not np.array_equal(flat[k, 0], flat[m, 0])
    # Without variation every sample of an identity is the same image.
    still = SyntheticFaces(2, 3, difficulty=0.0)
    assert np.array_equal(still.load_uint8(0), still.load_uint8(2))
    assert not np.array_equal(still.load_uint8(0), still.load_uint8(3))


def test_synthetic_mean_colour_does_not_identify():
    """Lighting and colour cast must hide skin tone enough that mean colour is a poor identifier."""
    ids, per = 30, 8
    ds = SyntheticFaces(ids, per, seed=1)
    features = np.stack([ds.load_uint8(i)[30:90, 30:82].reshape(-1, 3).mean(0) for i in range(len(ds))])
    labels = ds.labels
    train = np.arange(len(ds)) % 2 == 0
    centroids = np.stack([features[train & (labels == k)].mean(0) for k in range(ids)])
    test = ~train
    predicted = np.argmin(((features[test][:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = float((predicted == labels[test]).mean())
    assert accuracy < 0.4, f"nearest-centroid on mean colour reaches {accuracy:.2f}"


def test_identity_offset_gives_disjoint_identities():
    full = SyntheticFaces(6, 2, seed=3)
    train = SyntheticFaces(3, 2, seed=3)
    held_out = SyntheticFaces(3, 2, seed=3, identity_offset=3)
    assert held_out.labels.tolist() == [0, 0, 1, 1, 2, 2]
    for i in range(len(held_out)):
        assert torch.equal(held_out[i][0], full[6 + i][0])  # same seed, later id range
        for j in range(len(train)):
            assert not torch.equal(held_out[i][0], train[j][0])


def test_synthetic_other_sizes_and_validation():
    ds = SyntheticFaces(2, 2, image_size=(112, 96))
    image, targets = ds[3]
    assert image.shape == (3, 112, 96) and targets == {"label": 1}
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(ValueError):
        SyntheticFaces(0, 2)


# ------------------------------------------------------------------------------------------ contract


def _folder_dataset(tmp_path: Path) -> ImageFolderDataset:
    write_image_folder(SyntheticFaces(3, 2, seed=2, image_size=(64, 56)), tmp_path / "folder")
    return ImageFolderDataset(tmp_path / "folder", augment=AUGMENT)


def _list_dataset(tmp_path: Path) -> ImageListDataset:
    rng = np.random.default_rng(0)
    lines = []
    for i, label in enumerate([2, 0, 1, 2]):
        _write_png(tmp_path / "imgs" / f"{i}.png", rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))
        lines.append(f"imgs/{i}.png {label}")
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    return ImageListDataset(tmp_path / "train.txt", augment=AUGMENT)


@pytest.mark.parametrize("kind", ["synthetic", "folder", "list"])
def test_dataset_contract(kind, tmp_path):
    if kind == "synthetic":
        ds = SyntheticFaces(3, 2, image_size=(64, 56), augment=AUGMENT)
    elif kind == "folder":
        ds = _folder_dataset(tmp_path)
    else:
        ds = _list_dataset(tmp_path)
    assert isinstance(ds.num_classes, int) and ds.num_classes == 3
    assert isinstance(ds.labels, np.ndarray) and ds.labels.dtype == np.int64 and len(ds.labels) == len(ds)
    height, width = ds.image_size
    ds.set_epoch(2)
    for index in range(len(ds)):
        image, targets = ds[index]
        assert image.dtype == torch.float32 and image.shape == (3, height, width)
        assert -1.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert set(targets) == set(ds.target_names) == {"label"}
        label = targets["label"]
        assert type(label) is int and label == ds.labels[index] and 0 <= label < ds.num_classes


def test_to_tensor_round_trip():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    tensor = to_tensor(rgb)
    assert tensor.shape == (3, 5, 7)
    assert torch.allclose(tensor[:, 0, 0], (torch.tensor(rgb[0, 0], dtype=torch.float32) - 127.5) / 128)
    assert np.array_equal(to_uint8(tensor), rgb)
    assert np.array_equal(to_uint8(to_tensor(rgb[None])), rgb[None])


# -------------------------------------------------------------------------------------- image folder


def test_image_folder_round_trip_is_exact(tmp_path):
    synthetic = SyntheticFaces(3, 4, seed=9, image_size=(64, 64), identity_offset=40)
    progress = []
    assert write_image_folder(synthetic, tmp_path, progress=lambda done, total: progress.append((done, total))) == 12
    assert progress[-1] == (12, 12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00040", "00041", "00042"]
    assert not list(tmp_path.rglob("*.tmp"))
    folder = ImageFolderDataset(tmp_path)
    assert folder.classes == ["00040", "00041", "00042"]
    assert folder.labels.tolist() == synthetic.labels.tolist()
    assert folder.image_size == (64, 64)
    for index in range(len(folder)):
        assert np.array_equal(folder.load_uint8(index), synthetic.load_uint8(index))
        assert torch.equal(folder[index][0], synthetic[index][0])
    assert write_image_folder(synthetic, tmp_path) == 0  # existing files are kept: re-running resumes


def test_image_folder_skips_empty_resizes_and_errors(tmp_path, caplog):
    rng = np.random.default_rng(1)
    _write_png(tmp_path / "b" / "x.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    _write_png(tmp_path / "b" / "y.PNG", rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    _write_png(tmp_path / "a" / "z.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(tmp_path, image_size=(32, 32))
    assert "empty" in caplog.text
    assert ds.classes == ["a", "b"] and ds.labels.tolist() == [0, 1, 1]
    assert [p.name for p in ds.paths] == ["z.png", "x.png", "y.PNG"]
    assert ds[2][0].shape == (3, 32, 32)  # 20x30 resized
    with pytest.raises(ImageError, match="differs"):
        ImageFolderDataset(tmp_path, image_size=(32, 32), strict=True)[2]
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path / "none")
    with pytest.raises(FileNotFoundError):
        ImageFolderDataset(tmp_path / "missing")


# ---------------------------------------------------------------------------------------- list files


def test_list_file_parsing(tmp_path):
    _write_png(tmp_path / "data" / "a b.png", np.zeros((8, 8, 3), np.uint8))
    _write_png(tmp_path / "data" / "c.png", np.full((8, 8, 3), 200, np.uint8))
    (tmp_path / "lists").mkdir()
    text = "# header comment\n\n  data/a b.png   3\n\ndata/c.png\t1  # trailing comment\n"
    (tmp_path / "list.txt").write_text(text)
    ds = ImageListDataset(tmp_path / "list.txt")
    assert ds.labels.tolist() == [3, 1] and ds.num_classes == 4
    assert ds.paths[0] == tmp_path / "data" / "a b.png"
    assert ds.load_uint8(1)[0, 0].tolist() == [200, 200, 200]
    (tmp_path / "lists" / "other.txt").write_text("data/c.png 0\n")
    assert ImageListDataset(tmp_path / "lists" / "other.txt", root=tmp_path).paths[0] == tmp_path / "data" / "c.png"
    with pytest.raises(ValueError, match="num_classes"):
        ImageListDataset(tmp_path / "list.txt", num_classes=2)


@pytest.mark.parametrize(
    ("content", "line", "reason"),
    [
        ("a.png 0\n# c\nb.png\n", 3, "expected"),
        ("a.png 0\n\nb.png x\n", 3, "not an integer"),
        ("a.png 0\nb.png 1\nc.png -1\n", 3, "negative"),
        ("a.png 1.5\n", 1, "not an integer"),
    ],
)
def test_list_file_errors_name_the_line(tmp_path, content, line, reason):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(ListFileError, match=reason) as info:
        ImageListDataset(path, image_size=(8, 8))
    assert info.value.line == line and f"bad.txt:{line}:" in str(info.value)


def test_list_file_with_a_huge_label_is_refused_before_any_allocation(tmp_path):
    """One stray label (2e9) would size the classifier for 2e9 classes (~1 TB): refused, naming the line."""
    (tmp_path / "list.txt").write_text("a.png 0\nb.png 1\n# comment\nc.png 2000000000\nd.png 1\n")
    with pytest.raises(ListFileError, match=r"label 2000000000 of 'c.png'.*only 3 labels are used.*remap-list") as info:
        ImageListDataset(tmp_path / "list.txt", image_size=(8, 8))
    assert info.value.line == 4


def test_train_refuses_a_huge_label_in_one_line_under_a_memory_limit(tmp_path):
    """Through the CLI with the address space capped at 6 GB: exit 2, one line, no model was built."""
    import resource
    import subprocess

    from _training import cli, env, sets

    _write_png(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "list.txt").write_text("a.png 0\na.png 1\na.png 2000000000\n")
    limit = 6 * 2**30
    done = subprocess.run(cli("train", "quickstart", *sets([f"data.list_file={tmp_path / 'list.txt'}", "data.kind=list",
                                                            f"output_dir={tmp_path / 'runs'}", "data.num_workers=0"])),
                          env=env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "list.txt:3: label 2000000000" in " ".join(done.stderr.split())
    assert not (tmp_path / "runs").exists()


def test_sparse_labels_of_ordinary_size_are_accepted(tmp_path):
    """A filtered subset of MS1M keeps its labels (up to 93k, 5k used): allowed, the classifier has 93k rows."""
    labels = np.random.default_rng(0).choice(93_431, size=5_000, replace=False)
    labels[0] = 93_430
    (tmp_path / "list.txt").write_text("".join(f"x/{i}.jpg {label}\n" for i, label in enumerate(labels)))
    assert ImageListDataset(tmp_path / "list.txt", image_size=(8, 8)).num_classes == 93_431


def test_remap_list_renumbers_labels_densely(tmp_path):
    from facesphere.data.lists import parse_list_file, remap_list_file

    (tmp_path / "list.txt").write_text("a b.png 2000000000\nc.png 7\nd.png 2000000000\ne.png 93000\n")
    assert remap_list_file(tmp_path / "list.txt", tmp_path / "dense.txt") == 3
    assert parse_list_file(tmp_path / "dense.txt") == [("a b.png", 2), ("c.png", 0), ("d.png", 2), ("e.png", 1)]
    assert ImageListDataset(tmp_path / "dense.txt", image_size=(8, 8)).num_classes == 3


@pytest.mark.parametrize(("label", "reason"), [("1_000", "not an integer"), ("\u0663", "not an integer"),
                                                ("99999999999999999999", "out of range"), ("9" * 5000, "out of range")])
def test_list_labels_are_plain_int64_decimals(tmp_path, label, reason):
    (tmp_path / "list.txt").write_text(f"a.png 0\nb.png {label}\n", encoding="utf-8")
    with pytest.raises(ListFileError, match=reason) as info:
        ImageListDataset(tmp_path / "list.txt", image_size=(8, 8))
    assert info.value.line == 2


def test_list_file_not_utf8_names_the_line(tmp_path):
    (tmp_path / "list.txt").write_bytes(b"a.png 0\nb\xff.png 1\n")
    with pytest.raises(ListFileError, match="not UTF-8") as info:
        ImageListDataset(tmp_path / "list.txt", image_size=(8, 8))
    assert info.value.line == 2


def test_empty_list_file_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no entries"):
        ImageListDataset(tmp_path / "empty.txt")


# --------------------------------------------------------------------------------------- load_image


def test_load_image_modes(tmp_path):
    Image.new("L", (3, 2), 77).save(tmp_path / "gray.png")
    gray = load_image(tmp_path / "gray.png")
    assert gray.shape == (2, 3, 3) and gray.dtype == np.uint8 and (gray == 77).all()

    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 255, 0, 0))
    rgba.save(tmp_path / "rgba.png")
    assert load_image(tmp_path / "rgba.png").tolist() == [[[255, 0, 0], [128, 128, 128]]]  # transparent -> grey

    Image.fromarray(np.array([[0, 65535], [25700, 257]], dtype=np.uint16)).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert load_image(tmp_path / "g16.png")[..., 0].tolist() == [[0, 255], [100, 1]]  # scaled, not clipped

    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50])
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "palette.png")
    assert load_image(tmp_path / "palette.png").tolist() == [[[10, 20, 30], [200, 100, 50]]]

    Image.new("RGB", (1, 1), (10, 200, 30)).save(tmp_path / "one.png")
    assert load_image(tmp_path / "one.png").tolist() == [[[10, 200, 30]]]


def test_load_image_applies_exif_orientation(tmp_path):
    image = Image.new("RGB", (40, 20))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    image.paste((0, 0, 255), (20, 0, 40, 20))  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display after turning 90 degrees clockwise
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    upright = load_image(tmp_path / "rotated.jpg")
    assert upright.shape == (40, 20, 3)
    assert upright[5, 10, 0] > 200 and upright[5, 10, 2] < 50  # red on top
    assert upright[35, 10, 2] > 200 and upright[35, 10, 0] < 50  # blue below


def _broken_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    jpeg = buffer.getvalue()
    files = {
        "truncated": ("truncated.jpg", jpeg[: len(jpeg) // 2], "truncated"),
        "text": ("text.jpg", b"hello, this is not an image\n", "not a recognised image"),
        "empty": ("empty.jpg", b"", "empty file"),
        "bomb": ("bomb.png", _png_header(100_000, 100_000), "decompression bomb"),
        "over_our_limit": ("big.png", _png_header(8000, 8000), "exceeds the limit"),
        "zero": ("zero.png", _png_header(0, 10), "not a recognised"),
    }
    out = {}
    for key, (name, data, reason) in files.items():
        (tmp_path / name).write_bytes(data)
        out[key] = (tmp_path / name, reason)
    out["missing"] = (tmp_path / "missing.jpg", "not found")
    return out


@pytest.mark.parametrize("case", ["truncated", "text", "empty", "bomb", "over_our_limit", "zero", "missing"])
def test_load_image_rejects_bad_files(tmp_path, case):
    path, reason = _broken_files(tmp_path)[case]
    with pytest.raises(ImageError, match=reason) as info:
        load_image(path)
    assert info.value.path == str(path) and info.value.reason


def test_worker_errors_keep_their_type(tmp_path):
    _write_png(tmp_path / "a" / "good.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "a" / "zbad.png").write_bytes(b"not a png")
    dataset = ImageFolderDataset(tmp_path)
    loader = build_loader(dataset, GlobalBatchSampler(len(dataset), 2), num_workers=1)
    with pytest.raises(ImageError, match="zbad.png"):
        list(loader)


def test_load_image_pillow_limit_between_one_and_two_times(tmp_path, monkeypatch):
    """Pillow only warns between 1x and 2x its limit; we refuse those too."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    (tmp_path / "mid.png").write_bytes(_png_header(40, 40))  # 1600 pixels: 1.6x the limit
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(tmp_path / "mid.png", max_pixels=None)


# ------------------------------------------------------------------------------------- augmentation


def test_augmentation_is_a_function_of_seed_epoch_index():
    a = SyntheticFaces(3, 3, augment=AUGMENT, seed=4)
    b = SyntheticFaces(3, 3, augment=AUGMENT, seed=4)
    a.set_epoch(3)
    b.set_epoch(3)
    assert torch.equal(a[5][0], b[5][0])
    b.set_epoch(4)
    assert not torch.equal(a[5][0], b[5][0])
    plain = SyntheticFaces(3, 3, seed=4)
    assert not torch.equal(a[5][0], plain[5][0])
    image = plain.load_uint8(2)
    transform = AugmentConfig(**AUGMENT).build()
    assert np.array_equal(transform(image, augment_rng(0, 1, 2)), transform(image, augment_rng(0, 1, 2)))
    assert not np.array_equal(transform(image, augment_rng(0, 1, 2)), transform(image, augment_rng(0, 1, 3)))


def test_transforms_basic_properties():
    image = np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    rng = np.random.default_rng(0)
    flip = HorizontalFlip(p=1.0)
    once = flip(image, rng)
    assert np.array_equal(once[:, 0], image[:, -1])
    assert np.array_equal(flip(once, rng), image)
    assert HorizontalFlip(p=0.0)(image, rng) is image
    identity = AugmentConfig().build()
    assert AugmentConfig().is_identity and len(identity) == 0 and identity(image, rng) is image
    assert ScaleTranslate()(image, rng) is image and ColorJitter()(image, rng) is image
    for transform in (ScaleTranslate((0.8, 1.2), 0.1), ColorJitter(0.4, 0.4, 0.4), Compose([flip, ColorJitter(0.1)])):
        out = transform(image, rng)
        assert out.shape == image.shape and out.dtype == np.uint8
    assert resize_to(image, (12, 10)).shape == (12, 10, 3) and resize_to(image, (24, 20)) is image
    with pytest.raises(ValueError):
        AugmentConfig(scale=(1.2, 0.9))


# ------------------------------------------------------------------------------------------ sampler


def test_sampler_union_over_ranks_is_the_single_process_batch():
    single = GlobalBatchSampler(50, 8, seed=1)
    ranks = [GlobalBatchSampler(50, 8, rank=r, world_size=2, seed=1) for r in range(2)]
    for epoch in (0, 1):
        for sampler in [single, *ranks]:
            sampler.set_epoch(epoch)
        batches = list(single)
        per_rank = [list(s) for s in ranks]
        assert len(batches) == len(single) == len(ranks[0]) == 6
        for b, batch in enumerate(batches):
            assert len(per_rank[0][b]) == len(per_rank[1][b]) == 4
            assert sorted(per_rank[0][b] + per_rank[1][b]) == sorted(batch)
    single.set_epoch(0)
    first = list(single)
    single.set_epoch(1)
    assert first != list(single)
    assert len({i for batch in first for i in batch}) == 48  # a permutation: no repeats within an epoch


def test_sampler_start_batch_and_errors():
    sampler = GlobalBatchSampler(40, 8, seed=2)
    sampler.set_epoch(1)
    full = list(sampler)
    sampler.set_start_batch(3)
    assert list(sampler) == full[3:]
    assert list(sampler) == full  # the skip applies to one iteration only
    with pytest.raises(ValueError, match="divisible"):
        GlobalBatchSampler(40, 6, world_size=4)
    with pytest.raises(ValueError):
        GlobalBatchSampler(40, 8, rank=2, world_size=2)
    last = GlobalBatchSampler(21, 8, rank=1, world_size=4, drop_last=False)
    batches = list(last)
    assert len(batches) == len(last) == 3 and all(len(b) >= 1 for b in batches)


def test_dataloader_workers_match_single_process():
    dataset = SyntheticFaces(4, 4, image_size=(32, 32), augment=AUGMENT, seed=7)
    results = []
    for workers in (0, 2):
        sampler = GlobalBatchSampler(len(dataset), 4, seed=3)
        loader = build_loader(dataset, sampler, num_workers=workers)
        epochs = []
        for epoch in (0, 1):  # persistent workers must see the new epoch's augmentation
            set_loader_epoch(loader, epoch)
            epochs.append([(x.clone(), y["label"].clone()) for x, y in loader])
        results.append(epochs)
        del loader
    for epoch in (0, 1):
        assert len(results[0][epoch]) == len(results[1][epoch]) == 4
        for (x0, y0), (x1, y1) in zip(results[0][epoch], results[1][epoch]):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert not torch.equal(results[0][0][0][0], results[0][1][0][0])
