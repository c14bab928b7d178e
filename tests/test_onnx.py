"""ONNX export of the backbones: ONNX Runtime parity with PyTorch, dynamic batch, the card in the metadata."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import require_data

from facesphere.backbones import build_backbone
from facesphere.models.card import training_card
from facesphere.models.card import ModelCardMismatch
from facesphere.models.embedding_parity import compare_embeddings
from facesphere.models.export_onnx import CARD_METADATA_KEY, export_onnx
from facesphere.models.onnx_runtime import OnnxCardError, OnnxEmbedder
from facesphere.models.torch_embedder import TorchEmbedder

Y1 = "weights/mobilefacenet_insightface_y1"
LFW = "data/lfw_112x112/lfw-112X112"
BACKBONES = {"mobilefacenet": {}, "iresnet18": {}, "sphereface4": {}}
COSINE_TOLERANCE = 1e-5


def _randomise_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN statistics and affine terms, so folding them is really tested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(n, generator=generator))
                    m.bias.copy_(0.1 * torch.randn(n, generator=generator))
    return model.eval()


def _crops(n: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size[0], size[1], 3), dtype=np.uint8)


@pytest.fixture(scope="module", params=list(BACKBONES))
def exported(request, tmp_path_factory):
    name = request.param
    torch.manual_seed(0)
    model = _randomise_batchnorm(build_backbone(name, **BACKBONES[name]))
    card = training_card(model, f"test_{name}", name)
    path = export_onnx(model, card, tmp_path_factory.mktemp(name) / f"{name}.onnx")
    return model, card, path


@pytest.mark.parametrize("batch", [1, 7])
def test_onnx_runtime_matches_pytorch(exported, batch):
    model, card, path = exported
    embedder = OnnxEmbedder(path, threads=1)
    x = TorchEmbedder(model, card).preprocess(_crops(batch, card.input_size, seed=batch))
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    out = embedder.run(x)
    assert out.shape == (batch, card.embedding_size) and out.dtype == np.float32
    parity = compare_embeddings(reference, out)
    assert parity.max_cosine_difference < COSINE_TOLERANCE, parity.describe()
    assert parity.relative_abs_difference < 1e-4, parity.describe()


def test_card_round_trips_through_metadata(exported):
    import onnx

    _, card, path = exported
    proto = onnx.load(str(path))
    metadata = {p.key: p.value for p in proto.metadata_props}
    assert metadata["facesphere.batchnorm_folded"] == "true"
    assert metadata["facesphere.exporter"] in ("dynamo", "torchscript")
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)  # one file
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
    assert OnnxEmbedder(path, threads=1).card == card
    assert metadata[CARD_METADATA_KEY] == card.to_json()


def test_embed_twins_agree_with_flip(exported):
    model, card, path = exported
    crops = _crops(3, card.input_size, seed=5)
    embedder = OnnxEmbedder(path, threads=1)
    onnx_out = embedder.embed(crops, flip=True, batch_size=2)
    torch_out = TorchEmbedder(model, card).embed(crops, flip=True, batch_size=2)
    assert onnx_out.shape == (3, card.embedding_size)
    np.testing.assert_allclose(np.linalg.norm(onnx_out, axis=1), 1.0, rtol=1e-5)
    assert compare_embeddings(torch_out, onnx_out).max_cosine_difference < COSINE_TOLERANCE
    # flip-sum really adds the mirrored crop's embedding
    plain = embedder.embed(crops, normalize=False)
    mirrored = embedder.embed(crops[:, :, ::-1], normalize=False)
    summed = embedder.embed(crops, flip=True, normalize=False)
    np.testing.assert_allclose(summed, plain + mirrored, rtol=1e-4, atol=1e-5 * np.abs(summed).max())


def test_wrong_input_size_is_a_clear_error(exported):
    _, card, path = exported
    embedder = OnnxEmbedder(path, threads=1)
    h, w = card.input_size
    with pytest.raises(ModelCardMismatch, match=rf"{path.name}.*expects \(N, 3, {h}, {w}\).*\(2, 3, 100, 100\)"):
        embedder.run(np.zeros((2, 3, 100, 100), dtype=np.float32))
    with pytest.raises(ModelCardMismatch, match=rf"{h}x{w}.*got 100x100"):
        embedder.embed(np.zeros((1, 100, 100, 3), dtype=np.uint8))
    with pytest.raises(ModelCardMismatch, match="float32"):
        embedder.run(np.zeros((1, 3, h, w), dtype=np.float64))


def test_unavailable_provider_is_logged_not_silent(exported, caplog):
    _, _, path = exported
    with caplog.at_level(logging.WARNING):
        embedder = OnnxEmbedder(path, providers=["NoSuchExecutionProvider", "CPUExecutionProvider"], threads=1)
    assert "NoSuchExecutionProvider" in caplog.text
    assert embedder.providers == ["CPUExecutionProvider"]


def test_onnx_file_without_card_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "plain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])])
    path = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(OnnxCardError, match=r"plain\.onnx: no facesphere model card"):
        OnnxEmbedder(path)


def test_export_refuses_a_card_for_another_backbone(tmp_path):
    model = build_backbone("sphereface4")
    card = training_card(build_backbone("mobilefacenet"), "other", "mobilefacenet")
    with pytest.raises(ValueError, match="card 'other' says"):
        export_onnx(model, card, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_export_command(tmp_path, caplog):
    import typer
    from typer.testing import CliRunner

    from facesphere.cli.export import export_command
    from facesphere.models import save_model

    model = _randomise_batchnorm(build_backbone("sphereface4"))
    card = training_card(model, "cli_sphereface4", "sphereface4")
    save_model(tmp_path / "model", model, card)
    app = typer.Typer()
    app.command()(export_command)
    out = tmp_path / "out" / "model.onnx"
    with caplog.at_level(logging.INFO):
        result = CliRunner().invoke(app, [str(tmp_path / "model"), str(out)])
    assert result.exit_code == 0, result.output
    assert "check: 4 embeddings: max 1 - cos" in caplog.text
    assert OnnxEmbedder(out, threads=1).card.name == "cli_sphereface4"
    again = CliRunner().invoke(app, [str(tmp_path / "model"), str(out)])
    assert again.exit_code == 2  # refuses to overwrite without --overwrite


def _tiny_run(root, seed: int, step: int) -> torch.nn.Module:
    """A training run folder with one checkpoint as the trainer writes it (config + ``model.backbone.*``)."""
    torch.manual_seed(seed)
    backbone = _randomise_batchnorm(build_backbone("sphereface4", embedding_size=16), seed)
    weights = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    weights["head.weight"] = torch.zeros(3, 16)  # the rest of the model: not exported
    config = {"name": "tiny", "model": {"backbone": "sphereface4", "backbone_args": {"embedding_size": 16}}}
    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save({"config": config, "model": weights, "step": step}, root / "checkpoints" / f"step_{step:08d}.pt")
    return backbone


def test_a_training_run_becomes_a_model_folder_or_an_onnx_file_with_one_command(tmp_path):
    from typer.testing import CliRunner

    from facesphere.cli.main import app
    from facesphere.models import load_embedder
    from facesphere.models.export import export_model

    run = tmp_path / "run"
    _tiny_run(run, seed=1, step=2)
    newest = _tiny_run(run, seed=2, step=7)  # the run's newest checkpoint is the one exported
    crops = _crops(5, (112, 96))
    expected = TorchEmbedder(newest, training_card(newest, "reference", "sphereface4")).embed(crops, normalize=False)
    runner = CliRunner()

    folder = tmp_path / "tiny_model"
    result = runner.invoke(app, ["export", str(run), str(folder), "--name", "tiny-final"])
    assert result.exit_code == 0, result.output
    embedder = load_embedder(folder)
    assert embedder.card.name == "tiny-final" and embedder.card.alignment == "sphereface_112x96"
    assert np.array_equal(embedder.embed(crops, normalize=False), expected)  # safetensors: bit for bit
    assert runner.invoke(app, ["export", str(run), str(folder)]).exit_code == 2  # one line, no traceback
    with pytest.raises(FileExistsError, match="already holds card.json, model.safetensors; pass overwrite"):
        export_model(run, folder)
    assert runner.invoke(app, ["export", str(run), str(folder), "--overwrite"]).exit_code == 0

    onnx_file = tmp_path / "tiny.onnx"
    checkpoint = run / "checkpoints" / "step_00000007.pt"
    result = runner.invoke(app, ["export", str(checkpoint), str(onnx_file)])
    assert result.exit_code == 0, result.output
    onnx = load_embedder(onnx_file, threads=1)
    assert onnx.card.name == "tiny-step7"
    assert compare_embeddings(expected, onnx.embed(crops, normalize=False)).max_cosine_difference < COSINE_TOLERANCE
    # a model folder is a source too: folder -> ONNX gives the same network
    again = runner.invoke(app, ["export", str(folder), str(tmp_path / "again.onnx")])
    assert again.exit_code == 0, again.output


def test_an_export_that_changes_the_embeddings_is_refused(tmp_path, monkeypatch):
    from facesphere.models import export as module

    _tiny_run(tmp_path / "run", seed=3, step=1)
    real = module.load_embedder

    def tampered(path, **kwargs):  # the written model answers with other weights
        embedder = real(path, **kwargs)
        with torch.no_grad():
            next(embedder.backbone.parameters()).mul_(-1.0)
        return embedder

    monkeypatch.setattr(module, "load_embedder", tampered)
    with pytest.raises(module.ExportMismatch, match="disagrees with the source"):
        module.export_model(tmp_path / "run", tmp_path / "out")


def _lfw_crops(n: int) -> np.ndarray:
    from facesphere.data.images import load_image

    root = require_data(LFW)
    people = sorted(p for p in root.iterdir() if p.is_dir())[:n]
    return np.stack([load_image(min(person.glob("*.jpg"))) for person in people])


def test_insightface_y1_export_on_real_faces(tmp_path):
    from facesphere.models import import_weights

    model, card = import_weights(require_data(Y1))
    path = export_onnx(model, card, tmp_path / "y1.onnx")
    crops = _lfw_crops(8)
    reference = TorchEmbedder(model, card).embed(crops, normalize=False)
    out = OnnxEmbedder(path, threads=1).embed(crops, normalize=False)
    parity = compare_embeddings(reference, out)
    logging.getLogger(__name__).info("y1 on 8 LFW faces, ONNX Runtime vs PyTorch: %s", parity.describe())
    assert parity.max_cosine_difference < COSINE_TOLERANCE, parity.describe()
    assert parity.relative_abs_difference < 1e-4, parity.describe()


def test_fallback_to_the_torchscript_exporter_is_logged(tmp_path, monkeypatch, caplog):
    import onnx

    from facesphere.models import export_onnx as module

    def broken(*args, **kwargs):
        raise RuntimeError("simulated dynamo failure")

    monkeypatch.setattr(module, "_export_dynamo", broken)
    model = _randomise_batchnorm(build_backbone("sphereface4"))
    card = training_card(model, "fallback", "sphereface4")
    with caplog.at_level(logging.WARNING):
        path = export_onnx(model, card, tmp_path / "fallback.onnx")
    assert "falling back to the TorchScript exporter" in caplog.text and "simulated dynamo failure" in caplog.text
    metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert metadata["facesphere.exporter"] == "torchscript"
    x = TorchEmbedder(model, card).preprocess(_crops(3, card.input_size))
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    assert compare_embeddings(reference, OnnxEmbedder(path, threads=1).run(x)).max_cosine_difference < COSINE_TOLERANCE


def test_embed_puts_rgb_crops_in_the_cards_colour_order_and_normalisation():
    model = _randomise_batchnorm(build_backbone("mobilefacenet", input_size=(64, 64)))
    card = training_card(model, "bgr", "mobilefacenet").model_copy(
        update={"colour_order": "BGR", "mean": (100.0, 120.0, 140.0), "std": (50.0, 60.0, 70.0)})
    crops = _crops(2, card.input_size)
    x = TorchEmbedder(model, card).preprocess(crops)
    bgr = crops[..., ::-1].transpose(0, 3, 1, 2).astype(np.float32)
    expected = (bgr - np.array([100.0, 120.0, 140.0], np.float32)[:, None, None]) / np.array(
        [50.0, 60.0, 70.0], np.float32)[:, None, None]
    np.testing.assert_allclose(x, expected, rtol=1e-6, atol=1e-6)
