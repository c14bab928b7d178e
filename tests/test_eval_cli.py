"""``facesphere eval`` end to end with card enforcement, an independent LFW 10-fold check, and eval during training."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import require_data
from facesphere.backbones import build_backbone
from facesphere.cli.main import app
from facesphere.data import SyntheticFaces, write_image_folder
from facesphere.evaluate.pairset_eval import evaluate_pairset
from facesphere.evaluate.pairsets import PairSet
from facesphere.models.preprocess import CardPreprocess, FedInput
from facesphere.models import ModelCard, ModelCardMismatch, save_model

runner = CliRunner()
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _card(size=(32, 32), name="tiny") -> ModelCard:
    return ModelCard(name=name, backbone="mobilefacenet", input_size=size, colour_order="RGB", mean=(127.5,) * 3,
                     std=(128.0,) * 3, alignment="arcface_112x112", embedding_size=16, licence="test", source="test")


def _model_folder(tmp_path: Path, size=(32, 32)) -> Path:
    card = _card(size)
    backbone = build_backbone("mobilefacenet", embedding_size=16, input_size=size)
    return save_model(tmp_path / f"model_{size[0]}x{size[1]}", backbone, card)


def _csv_pairs(tmp_path: Path, size=(32, 32)) -> Path:
    """4 identities x 3 images and a pairs CSV with 3 folds, each holding genuine and impostor pairs."""
    root = tmp_path / f"faces_{size[0]}x{size[1]}"
    write_image_folder(SyntheticFaces(4, 3, image_size=size, seed=3), root)
    ids = sorted(p.name for p in root.iterdir())
    rows = ["path1,path2,same,fold"]
    for k, ident in enumerate(ids[:3]):
        other = ids[(k + 1) % len(ids)]
        rows += [f"{ident}/0000.png,{ident}/0001.png,1,{k}", f"{ident}/0001.png,{ident}/0002.png,1,{k}",
                 f"{ident}/0000.png,{other}/0000.png,0,{k}", f"{ident}/0002.png,{other}/0001.png,0,{k}"]
    path = root / "pairs.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _eval(*args: str):
    return runner.invoke(app, ["eval", *args, "--device", "cpu", "--batch-size", "8"])


def test_eval_model_folder_on_csv_writes_results(tmp_path):
    model, pairs, out = _model_folder(tmp_path), _csv_pairs(tmp_path), tmp_path / "out"
    result = _eval(str(model), "csv", str(pairs), "--out", str(out))
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["headline"]["accuracy_mean"] <= 1.0
    assert results["model"]["kind"] == "model folder" and results["model"]["name"] == "tiny"
    assert results["input"]["fed_colour_order"] == "RGB" and results["input"]["center_crop"] is None
    assert results["throughput"]["images"] == results["report"]["num_images"] == 11
    assert results["throughput"]["images_per_second"] > 0
    assert (out / "results.md").read_text().count("|") > 10
    assert (out / "roc.png").is_file() and (out / "det.png").is_file()


def test_bgr_feed_is_refused_before_any_embedding(tmp_path, monkeypatch):
    import facesphere.evaluate.embeddings as embeddings

    def no_embedding(*args, **kwargs):
        raise AssertionError("an embedding was computed")

    monkeypatch.setattr(embeddings, "extract_embeddings", no_embedding)
    model, pairs, out = _model_folder(tmp_path), _csv_pairs(tmp_path), tmp_path / "out"
    result = _eval(str(model), "csv", str(pairs), "--out", str(out), "--input-colour", "BGR")
    assert result.exit_code == 2, result.output
    assert not (out / "results.json").exists()
    # the same refusal as a real command line: one line, exit code 2, no traceback
    proc = subprocess.run([sys.executable, "-m", "facesphere", "eval", str(model), "csv", str(pairs), "--out",
                           str(out), "--input-colour", "BGR", "--device", "cpu"], env=_env(), capture_output=True,
                          text=True, timeout=120)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert "model expects RGB, got BGR" in text and "Traceback" not in text
    assert not (out / "results.json").exists()


def test_bgr_really_swaps_channels_for_a_bgr_card():
    card = _card().model_copy(update={"colour_order": "BGR"})
    image = np.zeros((32, 32, 3), np.uint8)
    image[..., 0] = 255  # red in RGB
    with pytest.raises(ModelCardMismatch, match="model expects BGR, got RGB"):
        CardPreprocess(card)
    x = CardPreprocess(card, FedInput("BGR"))(image)
    assert x[2].min() > 0.99 and x[0].max() < -0.99  # red arrives in the last channel


def test_size_mismatch_refused_unless_center_crop(tmp_path):
    model, pairs = _model_folder(tmp_path, size=(48, 32)), _csv_pairs(tmp_path, size=(48, 48))
    out = tmp_path / "out"
    result = _eval(str(model), "csv", str(pairs), "--out", str(out))
    assert result.exit_code == 2, result.output
    assert not (out / "results.json").exists()
    with pytest.raises(ModelCardMismatch, match=r"expects 48x32 \(HxW\) images, got 48x48.*center_crop=48x32"):
        CardPreprocess(_card((48, 32)))(np.zeros((48, 48, 3), np.uint8))
    result = _eval(str(model), "csv", str(pairs), "--out", str(out), "--set", "center_crop=48x32")
    assert result.exit_code == 0, result.output
    inp = json.loads((out / "results.json").read_text())["input"]
    assert inp["center_crop"] == "48x32" and inp["image_sizes"]["48x48"] == {"rows": [0, 47], "columns": [8, 39]}


def test_center_crop_maps_arcface_to_sphereface_alignment():
    card = _card((112, 96)).model_copy(update={"alignment": "sphereface_112x96"})
    pre = CardPreprocess(card, FedInput("RGB", alignment="arcface_112x112"), center_crop="112x96")
    image = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    x = pre(image)
    assert tuple(x.shape) == (3, 112, 96)
    assert np.array_equal(x.numpy(), (image[:, 8:104].transpose(2, 0, 1).astype(np.float32) - 127.5) / 128)
    with pytest.raises(ModelCardMismatch, match="aligned to sphereface_112x96, got arcface_112x112"):
        CardPreprocess(card, FedInput("RGB", alignment="arcface_112x112"))(image[:, :96])


# --------------------------------------------------------------------------- the LFW protocol, independently


def _plain_lfw_accuracy(pairs_file: Path, vectors: dict[str, np.ndarray]) -> tuple[float, float, np.ndarray]:
    """LFW 10-fold accuracy in plain numpy: folds from pairs.txt order, thresholds at every midpoint.

    Candidates are -inf, the midpoints of consecutive distinct training scores and +inf; among the
    candidates maximising training accuracy the lower median is taken (facesphere's documented tie rule).
    """
    lines = [ln.split() for ln in pairs_file.read_text().splitlines() if ln.strip()]
    n_sets, per = int(lines[0][0]), int(lines[0][1])
    a, b, same, fold = [], [], [], []
    for k, f in enumerate(lines[1:]):
        if len(f) == 3:
            a.append(f"{f[0]}_{int(f[1]):04d}"), b.append(f"{f[0]}_{int(f[2]):04d}"), same.append(True)
        else:
            a.append(f"{f[0]}_{int(f[1]):04d}"), b.append(f"{f[2]}_{int(f[3]):04d}"), same.append(False)
        fold.append(k // (2 * per))
    assert len(same) == n_sets * 2 * per
    va, vb = np.array([vectors[n] for n in a], np.float64), np.array([vectors[n] for n in b], np.float64)
    scores = (va * vb).sum(1) / (np.linalg.norm(va, axis=1) * np.linalg.norm(vb, axis=1))
    same, fold = np.array(same), np.array(fold)
    accuracies = []
    for k in range(n_sets):
        train, test = fold != k, fold == k
        u = np.unique(scores[train])
        candidates = np.concatenate([[-np.inf], (u[:-1] + u[1:]) / 2, [np.inf]])
        correct = ((scores[train][None, :] >= candidates[:, None]) == same[train][None, :]).sum(1)
        best = np.flatnonzero(correct == correct.max())
        threshold = candidates[best[(len(best) - 1) // 2]]
        accuracies.append(np.mean((scores[test] >= threshold) == same[test]))
    accuracies = np.array(accuracies)
    return float(accuracies.mean()), float(accuracies.std()), accuracies


def _check_against_facesphere(pairs_file: Path, seed: int) -> None:
    pairset = PairSet.from_lfw(pairs_file, pairs_file.parent / "no-images-needed", check=False)
    names = [pairset.image_name(i) for i in range(pairset.num_images)]
    rng = np.random.default_rng(seed)
    person = {}
    vectors = {}
    for n in names:  # same person -> nearby vectors, so the thresholds are not trivial
        who = n.rsplit("_", 1)[0]
        person.setdefault(who, rng.normal(size=8))
        vectors[n] = person[who] + 1.2 * rng.normal(size=8)
    embeddings = np.stack([vectors[n] for n in names]).astype(np.float32)
    vectors = {n: e for n, e in zip(names, embeddings)}  # the very same (float32) embeddings
    report = evaluate_pairset(None, pairset, embeddings=embeddings)
    mean, std, per_fold = _plain_lfw_accuracy(pairs_file, vectors)
    assert report["accuracy_mean"] == mean and report["accuracy_std"] == std
    assert report["fold_accuracies"] == per_fold.tolist()
    assert 0.55 < mean < 0.999


def test_lfw_accuracy_matches_a_plain_numpy_protocol_synthetic(tmp_path):
    rng = np.random.default_rng(1)
    people = [f"Person_{i:02d}" for i in range(30)]
    lines = ["10\t25"]
    for _ in range(10):
        for _ in range(25):
            lines.append(f"{rng.choice(people)}\t{rng.integers(1, 6)}\t{rng.integers(6, 11)}")
        for _ in range(25):
            p, q = rng.choice(len(people), 2, replace=False)
            lines.append(f"{people[p]}\t{rng.integers(1, 11)}\t{people[q]}\t{rng.integers(1, 11)}")
    pairs_file = tmp_path / "pairs.txt"
    pairs_file.write_text("\n".join(lines) + "\n")
    _check_against_facesphere(pairs_file, seed=2)


def test_lfw_accuracy_matches_a_plain_numpy_protocol_real_pairs():
    _check_against_facesphere(require_data("data/lfw_meta/facenet/data/pairs.txt"), seed=3)


# --------------------------------------------------------------------------- checkpoints and training


TINY_TRAIN = [
    "name=tiny", "model.backbone=mobilefacenet", "model.backbone_args={embedding_size: 16, input_size: [32, 32]}",
    "model.head=arcface", "model.head_args={scale: 16.0, margin: 0.2}", "data.kind=synthetic",
    "data.synthetic.num_identities=8", "data.synthetic.samples_per_identity=4", "data.batch_size=16",
    "data.num_workers=0", "optim.lr=0.05", "train.steps=2", "train.log_every=1", "train.checkpoint_every=100",
    "train.tensorboard=true", "train.progress=false", "eval.enabled=true", "eval.num_identities=4",
    "eval.samples_per_identity=3", "eval.pairs=20", "eval.batch_size=16", "eval.every_steps=1",
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from facesphere.train.config import load_config
    from facesphere.train.trainer import Trainer

    tmp = tmp_path_factory.mktemp("train")
    pairs = _csv_pairs(tmp)
    cfg = load_config(None, TINY_TRAIN + [f"output_dir={tmp / 'runs'}",
                                          f"eval.protocols=[{{name: csv, path: '{pairs}', label: faces}}]"])
    result = Trainer(cfg).fit()
    return tmp, pairs, result


def test_configured_protocol_runs_during_training(trained_run):
    tmp, _, result = trained_run
    run_dir = result.run_dir
    faces = result.evaluation["protocols"]["faces"]
    assert 0.0 <= faces["accuracy_mean"] <= 1.0 and faces["input"]["model_expects"].startswith("32x32 RGB")
    saved = json.loads((run_dir / "evaluation.json").read_text())
    assert saved["protocols"]["faces"]["accuracy_mean"] == faces["accuracy_mean"]
    assert "accuracy_mean" in saved  # the synthetic held-out verification is still there
    with open(run_dir / "eval_metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["step"], r["set"]) for r in rows] == [("1", "faces"), ("2", "faces")]
    assert (run_dir / "eval" / "faces" / "roc.png").is_file()
    assert any((run_dir / "tensorboard").iterdir())


def test_default_eval_config_has_no_protocols():
    from facesphere.train.config import ConfigError, load_config

    assert load_config(None).eval.protocols == []
    with pytest.raises(ConfigError, match="unknown evaluation protocol 'nope'"):
        load_config(None, ["eval.protocols=[{name: nope, path: x}]"])


def test_eval_training_checkpoint(trained_run, tmp_path):
    _, pairs, result = trained_run
    out = tmp_path / "out"
    res = _eval(str(result.checkpoint), "csv", str(pairs), "--out", str(out), "--no-flip")
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["kind"] == "training checkpoint" and results["model"]["step"] == 2
    assert results["model"]["card"]["input_size"] == [32, 32] and results["model"]["card"]["colour_order"] == "RGB"
    res = _eval(str(result.run_dir), "csv", str(pairs), "--out", str(tmp_path / "out2"))  # a run folder: newest checkpoint
    assert res.exit_code == 0, res.output


def test_unknown_option_and_protocol_are_one_line_errors(tmp_path):
    model, pairs = _model_folder(tmp_path), _csv_pairs(tmp_path)
    assert _eval(str(model), "csv", str(pairs), "--set", "bogus=1", "--out", str(tmp_path / "o")).exit_code == 2
    assert _eval(str(model), "nope", str(pairs), "--out", str(tmp_path / "o")).exit_code == 2
    assert _eval(str(model), "csv", str(pairs), "--set", "flip=false", "--out", str(tmp_path / "o")).exit_code == 2


def test_eval_help_and_option_parsing():
    from facesphere.cli.evaluate import parse_options

    result = runner.invoke(app, ["eval", "--help"])
    assert result.exit_code == 0 and "center_crop" in result.output
    assert parse_options(["val_far=1e-3", "n_folds=5", "center_crop=112x96", "pairs=/a/b.txt", "flag=true"]) == {
        "val_far": 1e-3, "n_folds": 5, "center_crop": "112x96", "pairs": "/a/b.txt", "flag": True}
    with pytest.raises(ValueError, match="key=value"):
        parse_options(["novalue"])
