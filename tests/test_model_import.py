"""Model import: MXNet NDArray reader, InsightFace/Xiaoccer converters, stored models, model cards.

The NDArray files here are written by a minimal writer in this file (independent of the reader);
the numerical checks against the real InsightFace model use a NumPy interpreter of its symbol graph.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import require_data
from facesphere.backbones import build_backbone
from facesphere.models import (
    CheckpointFormatError,
    InputSpec,
    ModelCard,
    ModelCardMismatch,
    MXNetFormatError,
    UnsupportedModel,
    WeightMismatch,
    import_insightface,
    import_weights,
    import_xiaoccer,
    input_spec_of,
    load_model,
    save_model,
)
from facesphere.models.mxnet_params import parse_symbol, read_params
from facesphere.models.store import load_card

Y1 = "weights/mobilefacenet_insightface_y1"
XIAOCCER = "weights/mobilefacenet_casia_xiaoccer/068.ckpt"
LFW = "data/lfw_112x112/lfw-112X112"

# ------------------------------------------------------------------------------------------------
# A minimal, independent NDArray-list writer (MXNet's NDArray::Save layout).

FLAGS = {np.dtype("float32"): 0, np.dtype("float64"): 1, np.dtype("float16"): 2, np.dtype("uint8"): 3,
         np.dtype("int32"): 4, np.dtype("int8"): 5, np.dtype("int64"): 6}


def ndarray_bytes(a: np.ndarray, version: int = 2) -> bytes:
    a = np.ascontiguousarray(a)
    if version == 2:
        head = struct.pack("<Ii", 0xF993FAC9, 0) + struct.pack("<I", a.ndim) + struct.pack(f"<{a.ndim}q", *a.shape)
    elif version == 1:
        head = struct.pack("<I", 0xF993FAC8) + struct.pack("<I", a.ndim) + struct.pack(f"<{a.ndim}q", *a.shape)
    else:  # legacy: no magic, uint32 dims
        head = struct.pack("<I", a.ndim) + struct.pack(f"<{a.ndim}I", *a.shape)
    return head + struct.pack("<iii", 1, 0, FLAGS[a.dtype]) + a.astype(a.dtype.newbyteorder("<")).tobytes()


def row_sparse_bytes(dense_shape: tuple[int, ...], rows: np.ndarray, values: np.ndarray) -> bytes:
    out = struct.pack("<Ii", 0xF993FAC9, 1)
    out += struct.pack("<I", values.ndim) + struct.pack(f"<{values.ndim}q", *values.shape)  # storage shape
    out += struct.pack("<I", len(dense_shape)) + struct.pack(f"<{len(dense_shape)}q", *dense_shape)
    out += struct.pack("<iii", 1, 0, FLAGS[values.dtype])
    out += struct.pack("<i", 6) + struct.pack("<I", 1) + struct.pack("<q", len(rows))  # aux 0: int64 row ids
    return out + values.tobytes() + rows.astype("<i8").tobytes()


def ndarray_list(arrays: dict[str, np.ndarray] | list[bytes], names: list[str] | None = None, version: int = 2) -> bytes:
    if isinstance(arrays, dict):
        names = list(arrays)
        blobs = [ndarray_bytes(a, version) for a in arrays.values()]
    else:
        blobs = arrays
    names = names or []
    parts = [struct.pack("<QQQ", 0x112, 0, len(blobs)), *blobs, struct.pack("<Q", len(names))]
    for name in names:
        raw = name.encode()
        parts += [struct.pack("<Q", len(raw)), raw]
    return b"".join(parts)


def write(tmp_path: Path, data: bytes, name: str = "model-0000.params") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------------------
# NDArray reader


@pytest.mark.parametrize("version", [2, 1, 0])
def test_ndarray_reader_round_trip(tmp_path, version):
    rng = np.random.default_rng(0)
    arrays = {
        "arg:conv_weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "aux:bn_moving_var": rng.random(4).astype(np.float64),
        "arg:half": rng.standard_normal((2, 5)).astype(np.float16),
        "arg:ids": np.arange(7, dtype=np.int64),
        "arg:bytes": np.arange(6, dtype=np.uint8).reshape(2, 3),
    }
    records = read_params(write(tmp_path, ndarray_list(arrays, version=version)))
    assert [r.name for r in records] == list(arrays)
    for record, expected in zip(records, arrays.values()):
        assert record.array.dtype == expected.dtype and record.array.shape == expected.shape
        np.testing.assert_array_equal(record.array, expected)
        assert record.version == version and record.context == (1, 0) and record.stype == "default"
    assert records[0].offset == 24  # list magic, reserved, count


def test_ndarray_reader_unnamed_and_sparse(tmp_path):
    values = np.array([[1, 2], [3, 4]], dtype=np.float32)
    blobs = [ndarray_bytes(np.ones(3, np.float32)), row_sparse_bytes((5, 2), np.array([1, 3]), values)]
    records = read_params(write(tmp_path, ndarray_list(blobs)))
    assert [r.name for r in records] == [None, None]
    assert records[1].stype == "row_sparse"
    expected = np.zeros((5, 2), np.float32)
    expected[[1, 3]] = values
    np.testing.assert_array_equal(records[1].array, expected)


def test_truncated_file_names_the_offset(tmp_path):
    data = ndarray_list({"arg:w": np.ones((2, 3), np.float32), "arg:b": np.zeros(2, np.float32)})
    first_data = 24 + 4 + 4 + 4 + 2 * 8 + 4 + 4 + 4  # magic, stype, ndim, dims, context, dtype
    with pytest.raises(MXNetFormatError, match=rf"at byte offset {first_data}: file truncated"):
        read_params(write(tmp_path, data[:first_data + 10]))
    for cut in (5, 20, 30, len(data) - 3):
        with pytest.raises(MXNetFormatError, match=r"at byte offset \d+: file truncated"):
            read_params(write(tmp_path, data[:cut]))


def test_corrupt_file_names_the_offset(tmp_path):
    data = bytearray(ndarray_list({"arg:w": np.ones((2, 3), np.float32)}))
    bad_magic = b"\x13" + bytes(data[1:])
    with pytest.raises(MXNetFormatError, match="at byte offset 0: not an MXNet NDArray list"):
        read_params(write(tmp_path, bad_magic))
    bad_ndim = bytearray(data)
    bad_ndim[32:36] = struct.pack("<I", 1000)  # ndim of array 0 (after magic and stype)
    with pytest.raises(MXNetFormatError, match="at byte offset 32: array 0 shape: implausible ndim 1000"):
        read_params(write(tmp_path, bytes(bad_ndim)))
    bad_dtype = bytearray(data)
    bad_dtype[60:64] = struct.pack("<i", 99)
    with pytest.raises(MXNetFormatError, match="at byte offset 60: array 0: unsupported dtype flag 99"):
        read_params(write(tmp_path, bytes(bad_dtype)))
    with pytest.raises(MXNetFormatError, match="unexpected trailing bytes"):
        read_params(write(tmp_path, bytes(data) + b"junk"))
    huge_count = bytearray(data)
    huge_count[16:24] = struct.pack("<Q", 10**12)
    with pytest.raises(MXNetFormatError, match="at byte offset 16: .*array count 1000000000000 cannot fit"):
        read_params(write(tmp_path, bytes(huge_count)))


def test_symbol_parser_reads_batchnorm_settings_and_input_arithmetic():
    nodes = [
        {"op": "null", "name": "data", "inputs": []},
        {"op": "_minus_scalar", "name": "m", "attrs": {"scalar": "127.5"}, "inputs": [[0, 0, 0]]},
        {"op": "_mul_scalar", "name": "s", "attrs": {"scalar": "0.0078125"}, "inputs": [[1, 0, 0]]},
        {"op": "null", "name": "c_weight", "inputs": []},
        {"op": "Convolution", "name": "c", "attrs": {"kernel": "(3, 3)", "stride": "(2, 2)", "num_group": "1",
                                                     "no_bias": "True"}, "inputs": [[2, 0, 0], [3, 0, 0]]},
        {"op": "BatchNorm", "name": "bn_a", "attrs": {"fix_gamma": "False"}, "inputs": [[4, 0, 0]]},
        {"op": "BatchNorm", "name": "bn_b", "param": {"eps": "2e-05"}, "inputs": [[5, 0, 0]]},
    ]
    symbol = parse_symbol(json.dumps({"nodes": nodes, "heads": [[6, 0, 0]]}))
    assert symbol.input_affine() == (127.5, 128.0, "s")
    a, b = symbol.batchnorm("bn_a"), symbol.batchnorm("bn_b")
    assert (a.eps, a.fix_gamma) == (1e-3, False)  # MXNet defaults: eps 1e-3, fix_gamma True
    assert (b.eps, b.fix_gamma) == (2e-5, True)
    assert symbol["c"].attr("kernel") == (3, 3) and symbol["c"].attr("no_bias") is True
    with pytest.raises(MXNetFormatError, match="not valid JSON"):
        parse_symbol("{ nope")


# ------------------------------------------------------------------------------------------------
# iResNet: a synthetic InsightFace checkpoint written from a facesphere iresnet18


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights and BN statistics, so a wrong mapping cannot pass by symmetry."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
            elif name.endswith(("running_mean", "bias")):
                tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.1)
            elif tensor.ndim == 1:  # BN gamma, PReLU slope
                tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
            else:
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=g) / fan_in ** 0.5)
    return model.eval()


def insightface_iresnet_names(model) -> dict[str, str]:
    """facesphere iresnet state-dict key -> InsightFace fresnet.py parameter name (written from the convention)."""
    names = {}

    def bn(target, node):
        names.update({f"{target}.weight": f"arg:{node}_gamma", f"{target}.bias": f"arg:{node}_beta",
                      f"{target}.running_mean": f"aux:{node}_moving_mean",
                      f"{target}.running_var": f"aux:{node}_moving_var"})

    names["stem.0.0.weight"] = "arg:conv0_weight"
    bn("stem.0.1", "bn0")
    names["stem.1.weight"] = "arg:relu0_gamma"
    for s, stage in enumerate(model.stages):
        for u, unit in enumerate(stage):
            p, t = f"stage{s + 1}_unit{u + 1}", f"stages.{s}.{u}"
            bn(f"{t}.bn1", f"{p}_bn1")
            names[f"{t}.conv1.0.weight"] = f"arg:{p}_conv1_weight"
            bn(f"{t}.conv1.1", f"{p}_bn2")
            names[f"{t}.prelu.weight"] = f"arg:{p}_relu1_gamma"
            names[f"{t}.conv2.0.weight"] = f"arg:{p}_conv2_weight"
            bn(f"{t}.conv2.1", f"{p}_bn3")
            if not isinstance(unit.shortcut, torch.nn.Identity):
                names[f"{t}.shortcut.0.weight"] = f"arg:{p}_conv1sc_weight"
                bn(f"{t}.shortcut.1", f"{p}_sc")
    bn("bn", "bn1")
    names["embedding.0.weight"], names["embedding.0.bias"] = "arg:pre_fc1_weight", "arg:pre_fc1_bias"
    bn("embedding.1", "fc1")
    return names


@pytest.fixture
def synthetic_iresnet(tmp_path):
    """(reference model with fc1 gamma 1 and eps 2e-5, params path) at 32x32 to stay light."""
    reference = _randomise(build_backbone("iresnet18", embedding_size=64, input_size=(32, 32), bn_eps=2e-5))
    state = reference.state_dict()
    arrays = {}
    for key, mx_name in insightface_iresnet_names(reference).items():
        arrays[mx_name] = state[key].numpy()
    arrays["arg:fc1_gamma"] = np.full(64, 3.0, np.float32)  # fix_gamma: stored value must be ignored
    with torch.no_grad():
        reference.embedding[1].weight.fill_(1.0)
    return reference, write(tmp_path, ndarray_list(arrays))


def test_iresnet_import_round_trip(synthetic_iresnet):
    reference, path = synthetic_iresnet
    model, card = import_insightface(path)
    assert card.backbone == "iresnet18" and card.input_size == (32, 32) and card.embedding_size == 64
    assert card.backbone_args == {"bn_eps": 2e-5}
    assert card.mean == (127.5,) * 3 and card.std == (128.0,) * 3 and card.colour_order == "RGB"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


def test_iresnet_import_lists_missing_and_unused(tmp_path, synthetic_iresnet):
    _, path = synthetic_iresnet
    records = read_params(path)
    arrays = {r.name: r.array for r in records if r.name != "arg:stage2_unit1_conv2_weight"}
    arrays["arg:stage9_unit1_extra_weight"] = np.zeros(3, np.float32)
    broken = write(tmp_path, ndarray_list(arrays), "broken-0000.params")
    with pytest.raises(WeightMismatch) as caught:
        import_insightface(broken)
    message = str(caught.value)
    assert "missing source tensor 'stage2_unit1_conv2_weight'" in message
    assert "unused source tensors (1): stage9_unit1_extra_weight" in message
    assert "unfilled target entries (1): stages.1.0.conv2.0.weight" in message


def test_unknown_layout_is_refused(tmp_path):
    path = write(tmp_path, ndarray_list({"arg:dense0_weight": np.ones((2, 2), np.float32)}))
    with pytest.raises(UnsupportedModel, match="not an InsightFace MobileFaceNet or iResNet"):
        import_insightface(path)


# ------------------------------------------------------------------------------------------------
# The real InsightFace MobileFaceNet (y1)


def _lfw_images(people: list[str], per_person: int) -> tuple[np.ndarray, np.ndarray]:
    from facesphere.data.images import load_image

    root = require_data(LFW)
    images, labels = [], []
    for label, person in enumerate(people):
        for path in sorted((root / person).glob("*.jpg"))[:per_person]:
            images.append(load_image(path))
            labels.append(label)
    return np.stack(images), np.array(labels)


def _np_conv(x: np.ndarray, w: np.ndarray, stride: tuple, pad: tuple, groups: int) -> np.ndarray:
    """Direct NumPy cross-correlation, (C, H, W) -> (O, H', W'), float64."""
    c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    oh, ow = (h + 2 * pad[0] - kh) // stride[0] + 1, (wd + 2 * pad[1] - kw) // stride[1] + 1
    patches = np.stack([xp[:, i:i + stride[0] * oh:stride[0], j:j + stride[1] * ow:stride[1]]
                        for i in range(kh) for j in range(kw)], axis=1)  # (C, kh*kw, oh, ow)
    patches = patches.reshape(groups, cg, kh * kw, oh, ow)
    weights = w.reshape(groups, o // groups, cg, kh * kw)
    return np.einsum("gock,gckhw->gohw", weights, patches, optimize=True).reshape(o, oh, ow)


def _np_forward(symbol, params: dict, image: np.ndarray, stop: str | None = None) -> dict[str, np.ndarray]:
    """Interpret the MXNet graph in NumPy (float64) for one raw HxWx3 image; outputs by node name."""
    out: dict[int, np.ndarray] = {}
    p = {k.split(":", 1)[1]: v.astype(np.float64) for k, v in params.items()}
    for node in symbol.nodes:
        ins = [out.get(i) for i in node.inputs]
        if node.op == "null":
            out[node.index] = image.transpose(2, 0, 1).astype(np.float64) if node.name == "data" else p.get(node.name)
        elif node.op == "_minus_scalar":
            out[node.index] = ins[0] - float(node.attrs["scalar"])
        elif node.op == "_mul_scalar":
            out[node.index] = ins[0] * float(node.attrs["scalar"])
        elif node.op == "Convolution":
            out[node.index] = _np_conv(ins[0], ins[1], node.attr("stride", (1, 1)), node.attr("pad", (0, 0)),
                                       node.attr("num_group", 1))
        elif node.op == "BatchNorm":
            x, gamma, beta, mean, var = ins
            eps = node.attr("eps", 1e-3)
            gamma = np.ones_like(gamma) if node.attr("fix_gamma", True) else gamma
            shape = (-1,) + (1,) * (x.ndim - 1)
            out[node.index] = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * gamma.reshape(shape) \
                + beta.reshape(shape)
        elif node.op == "LeakyReLU":
            assert node.attrs["act_type"] == "prelu"
            x, gamma = ins
            out[node.index] = np.where(x > 0, x, x * gamma.reshape(-1, 1, 1))
        elif node.op == "Activation":
            assert node.attrs["act_type"] == "relu"
            out[node.index] = np.maximum(ins[0], 0)
        elif node.op == "Pooling":
            assert node.attr("global_pool") is True and node.attrs["pool_type"] == "avg"
            out[node.index] = ins[0].mean(axis=(1, 2), keepdims=True)
        elif node.op == "Flatten":
            out[node.index] = ins[0].reshape(-1)
        elif node.op == "elemwise_add":
            out[node.index] = ins[0] + ins[1]
        elif node.op == "FullyConnected":
            out[node.index] = ins[1] @ ins[0].reshape(-1) + ins[2]
        else:
            raise AssertionError(f"unexpected op {node.op}")
        if node.name == stop:
            break
    return {node.name: out[node.index] for node in symbol.nodes if node.index in out and node.op != "null"}


@pytest.fixture(scope="module")
def y1():
    folder = require_data(Y1)
    model, card = import_insightface(folder / "model-0000.params")
    return folder, model, card


def test_y1_every_tensor_consumed(y1):
    folder, model, card = y1
    records = read_params(folder / "model-0000.params")
    assert len(records) == 284 and sum(r.array.size for r in records) == 1_022_848
    assert all(r.version == 2 and r.stype == "default" and r.dtype_flag == 0 for r in records)
    # the importer's StateFiller already refused any unused tensor or unfilled entry; check the result
    assert sum(p.numel() for p in model.parameters()) == 1_003_136
    assert card.backbone == "mobilefacenet" and card.backbone_args == {"bn_eps": 1e-3}
    assert card.input_size == (112, 112) and card.embedding_size == 128 and card.colour_order == "RGB"
    assert card.mean == (127.5,) * 3 and card.std == (128.0,) * 3
    assert model.features[0][0][1].eps == 1e-3 and model.embedding[1].weight.eq(1).all()  # fc1 fix_gamma
    assert [f.benchmark for f in card.published] == ["LFW", "CFP-FP", "AgeDB-30"]


def test_y1_matches_numpy_interpretation_of_the_mxnet_graph(y1):
    folder, model, card = y1
    symbol = parse_symbol(folder / "model-symbol.json")
    params = {r.name: r.array for r in read_params(folder / "model-0000.params")}
    assert "eps" not in symbol["conv_1_batchnorm"].attrs  # so MXNet's default 1e-3 applies
    raw, _ = _lfw_images(["Aaron_Eckhart"], 1)
    reference = _np_forward(symbol, params, raw[0])

    captured = {}
    hooks = [model.features[0].register_forward_hook(lambda m, i, o: captured.__setitem__("conv_1", o)),
             model.features[1].register_forward_hook(lambda m, i, o: captured.__setitem__("conv_2_dw", o))]
    try:
        with torch.no_grad():
            x = card.normalise(torch.from_numpy(raw).permute(0, 3, 1, 2))
            card.check_input(x)
            embedding = model(x)[0].double().numpy()
    finally:
        for hook in hooks:
            hook.remove()
    first = captured["conv_1"][0].double().numpy()
    np.testing.assert_allclose(first, reference["conv_1_relu"], atol=1e-4)
    np.testing.assert_allclose(captured["conv_2_dw"][0].double().numpy(), reference["conv_2_dw_relu"], atol=1e-4)
    scale = np.abs(reference["fc1"]).max()
    np.testing.assert_allclose(embedding, reference["fc1"], atol=1e-4 * scale)


def test_y1_genuine_pairs_score_above_impostors(y1):
    from facesphere.data.images import to_tensor

    _, model, card = y1
    people = ["Colin_Powell", "Donald_Rumsfeld", "George_W_Bush", "Tony_Blair"]
    images, labels = _lfw_images(people, 10)
    x = to_tensor(images)
    card.check_input(x, InputSpec.facesphere())
    with torch.no_grad():
        e = torch.nn.functional.normalize(model(x)).numpy()
    scores = e @ e.T
    i, j = np.triu_indices(len(labels), 1)
    same = labels[i] == labels[j]
    genuine, impostor = scores[i, j][same], scores[i, j][~same]
    assert len(genuine) == 180 and len(impostor) == 600
    assert genuine.mean() - impostor.mean() > 0.4, (genuine.mean(), impostor.mean())
    auc = (genuine[:, None] > impostor[None, :]).mean()
    assert auc > 0.99, auc


# ------------------------------------------------------------------------------------------------
# Xiaoccer PyTorch MobileFaceNet (112x96)


def test_xiaoccer_import_gives_finite_embeddings_at_112x96():
    from facesphere.data.images import to_tensor

    model, card = import_xiaoccer(require_data(XIAOCCER))
    assert card.input_size == (112, 96) and card.alignment == "sphereface_112x96" and card.embedding_size == 128
    assert tuple(model.gdconv[0].weight.shape) == (512, 1, 7, 6)
    images, labels = _lfw_images(["Colin_Powell", "Tony_Blair"], 2)
    x = to_tensor(images[:, :, 8:104])  # 112x112 ArcFace crop -> 112x96 (a different alignment: sanity only)
    card.check_input(x)
    with torch.no_grad():
        e = torch.nn.functional.normalize(model(x))
    assert e.shape == (4, 128) and torch.isfinite(e).all()
    scores = e @ e.T
    assert scores[0, 1] > max(scores[0, 2], scores[0, 3]) and scores[2, 3] > max(scores[2, 0], scores[2, 1])


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"epoch": 1, "net_state_dict": {"w": torch.zeros(1)}, "payload": _Evil(str(marker))}, path)
    with pytest.raises(CheckpointFormatError, match="weights_only"):
        import_xiaoccer(path)
    assert not marker.exists()
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(CheckpointFormatError):
        import_xiaoccer(raw)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# Stored models and cards


def _card(**changes) -> ModelCard:
    fields = dict(name="tiny", backbone="mobilefacenet", backbone_args={"bn_eps": 1e-3}, input_size=(112, 96),
                  colour_order="RGB", mean=(127.5,) * 3, std=(128.0,) * 3, alignment="sphereface_112x96",
                  embedding_size=32, licence="test", source="test")
    fields.update(changes)
    return ModelCard(**fields)


def test_save_load_round_trip(tmp_path):
    card = _card()
    model = _randomise(card.build_backbone())
    save_model(tmp_path / "m", model, card)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["card.json", "model.safetensors"]
    loaded, loaded_card = load_model(tmp_path / "m", expected=InputSpec.facesphere((112, 96), "sphereface_112x96"))
    assert loaded_card.model_copy(update={"weights_sha256": None}) == card
    assert loaded.features[0][0][1].eps == 1e-3
    x = torch.randn(2, 3, 112, 96)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

    with pytest.raises(ModelCardMismatch, match="model expects 112x96"):
        load_model(tmp_path / "m", expected=InputSpec.facesphere((112, 112)))
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(WeightMismatch, match="sha256 differs"):
        load_model(tmp_path / "m")


def test_save_refuses_a_card_that_does_not_rebuild_the_backbone(tmp_path):
    model = build_backbone("mobilefacenet", embedding_size=32, input_size=(112, 96))  # bn_eps 1e-5
    with pytest.raises(WeightMismatch, match="does not rebuild"):
        save_model(tmp_path / "m", model, _card())
    assert not (tmp_path / "m" / "card.json").exists()


def test_card_mismatch_messages():
    card = _card(input_size=(112, 112), alignment="arcface_112x112", backbone_args={})
    card.check(InputSpec.facesphere())
    with pytest.raises(ModelCardMismatch, match="model expects RGB, got BGR") as caught:
        card.check(InputSpec(colour_order="BGR", size=(112, 112), mean=(127.5,) * 3, std=(128.0,) * 3))
    assert caught.value.problems == ["model expects RGB, got BGR"]
    with pytest.raises(ModelCardMismatch) as caught:
        card.check(InputSpec.raw((112, 96), "BGR", alignment="sphereface_112x96"))
    assert caught.value.problems == [
        "model expects RGB, got BGR",
        "model expects 112x112 (HxW) images, got 112x96",
        "model expects faces aligned to arcface_112x112, got sphereface_112x96",
        "model expects (x - 127.5) / 128, got raw 0-255 pixels",
    ]
    with pytest.raises(ModelCardMismatch, match=r"expects \(N, 3, 112, 112\) images, got \(1, 3, 112, 96\)"):
        card.check_input(torch.zeros(1, 3, 112, 96))
    with pytest.raises(ModelCardMismatch, match="raw pixels, or another normalisation"):
        card.check_input(torch.full((1, 3, 112, 112), 200.0))

    class Loader:
        input_spec = InputSpec.raw((112, 112), "BGR")

    assert input_spec_of(Loader()) == Loader.input_spec


def test_card_prepare_converts_colour_and_normalisation():
    card = _card(input_size=(4, 4), alignment="arcface_112x112", backbone_args={})
    bgr = torch.randint(0, 256, (2, 3, 4, 4)).float()
    prepared = card.prepare(bgr, InputSpec.raw((4, 4), "BGR"))
    torch.testing.assert_close(prepared, (bgr.flip(1) - 127.5) / 128)
    same = card.normalise(bgr)
    assert card.prepare(same, card.input_spec) is same
    with pytest.raises(ModelCardMismatch, match="4x4"):
        card.prepare(bgr, InputSpec.raw((4, 5)))


def test_card_is_strict_json():
    card = _card()
    assert ModelCard.from_json(card.to_json()) == card
    data = json.loads(card.to_json())
    data["colour_order"] = "rgb"
    with pytest.raises(ValueError):
        ModelCard.from_json(json.dumps(data))
    data["colour_order"], data["surprise"] = "RGB", 1
    with pytest.raises(ValueError):
        ModelCard.from_json(json.dumps(data))


def test_bn_eps_backbone_argument():
    default = build_backbone("mobilefacenet")
    custom = build_backbone("iresnet18", input_size=(32, 32), bn_eps=2e-5)
    assert {m.eps for m in default.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)} == {1e-5}
    assert {m.eps for m in custom.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)} == {2e-5}


# ------------------------------------------------------------------------------------------------
# Command


def test_import_command(tmp_path, caplog):
    import typer
    from typer.testing import CliRunner

    from facesphere.cli.models_import import import_model

    app = typer.Typer()
    app.command("import")(import_model)
    app.command("other")(lambda: None)
    runner = CliRunner()
    missing = runner.invoke(app, ["import", str(tmp_path / "nope"), str(tmp_path / "out")])
    assert missing.exit_code == 2 and "Traceback" not in missing.output

    folder = require_data(Y1)
    result = runner.invoke(app, ["import", str(folder), str(tmp_path / "y1")])
    assert result.exit_code == 0, result.output
    _, card = load_model(tmp_path / "y1", expected=InputSpec.facesphere())
    assert card.name == "mobilefacenet_insightface_y1"
    again = runner.invoke(app, ["import", str(folder), str(tmp_path / "y1")])
    assert again.exit_code == 2 and "pass --overwrite to replace it" in again.output + caplog.text


def test_import_accepts_the_symbol_file_the_folder_or_the_params(y1):
    folder, model, _ = y1
    reference = {k: v for k, v in model.state_dict().items()}
    for source in (folder / "model-symbol.json", folder, folder / "model-0000.params"):
        imported, card = import_weights(source)
        assert card.backbone == "mobilefacenet"
        for key, value in imported.state_dict().items():
            assert torch.equal(value, reference[key]), (source, key)


def test_the_importer_registry_picks_by_name_or_by_file(tmp_path):
    from facesphere.models.importers import KINDS, _resolve

    (tmp_path / "model-0000.params").write_bytes(b"")
    (tmp_path / "model-symbol.json").write_text("{}")
    importer, path = _resolve(tmp_path, "auto")
    assert (importer.name, path.name) == ("insightface", "model-0000.params")
    assert _resolve(tmp_path / "model-symbol.json", "insightface_iresnet")[0].name == "insightface_iresnet"
    (tmp_path / "068.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"cannot tell which checkpoint.*068.ckpt.*model-0000.params"):
        _resolve(tmp_path, "auto")  # two checkpoint types: refuse to guess
    assert _resolve(tmp_path, "xiaoccer")[1].name == "068.ckpt"  # a named importer looks for its own files
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown checkpoint type '.npz'"):
        _resolve(tmp_path / "w.npz", "auto")
    with pytest.raises(ValueError, match="unknown kind 'onnx'; expected one of " + ", ".join(KINDS)):
        import_weights(tmp_path, kind="onnx")


def test_a_corrupt_weights_file_without_a_digest_is_a_weight_mismatch(tmp_path):
    card = _card()
    save_model(tmp_path / "m", card.build_backbone(), card)
    unsigned = load_card(tmp_path / "m").model_copy(update={"weights_sha256": None})
    (tmp_path / "m" / "card.json").write_text(unsigned.to_json())
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(WeightMismatch, match="not a readable safetensors file"):
        load_model(tmp_path / "m")
