"""InsightFace's gender/age model read without MXNet: the sample its authors shipped, a NumPy interpretation of the
MXNet graph on the same files as independent truth, the decoding rule, and refusals of damaged or foreign files."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from conftest import require_data
from PIL import Image
from test_model_import import _np_forward

from facesphere.models.genderage import GenderAgeModel, decode, load_genderage
from facesphere.models.mxnet_params import MXNetFormatError, parse_symbol, read_params

GENDERAGE = "weights/genderage_insightface"
Y1 = "weights/mobilefacenet_insightface_y1"
LFW = "data/lfw_112x112/lfw-112X112"


@pytest.fixture(scope="module")
def folder():
    return require_data(GENDERAGE)


@pytest.fixture(scope="module")
def model(folder) -> GenderAgeModel:
    return load_genderage(folder)


def _tom_hanks(folder) -> np.ndarray:
    return np.asarray(Image.open(folder / "Tom_Hanks_54745.png").convert("RGB"))


def test_the_shipped_sample_is_a_thirty_year_old_man(model, folder):
    """SOURCE.txt records what InsightFace's own code gives for its sample: gender 1 (male), age 30."""
    found = model.predict(_tom_hanks(folder)[None])
    assert found.age.tolist() == [30.0] and found.gender.tolist() == ["male"] and found.male[0] > 0.5
    stage = model.run(_tom_hanks(folder)[None].repeat(3, axis=0), None)  # the pipeline stage, batched
    assert stage["age"].tolist() == [30.0] * 3 and stage["gender"].tolist() == ["male"] * 3


def test_every_array_of_the_file_is_used(model, folder):
    records = read_params(folder / "model-0000.params")
    assert len(records) == 146 and sum(r.array.size for r in records) == 272_546  # SOURCE.txt's counts
    state = model.net.state_dict()
    # every array becomes a state entry (StateFiller refuses unused ones), plus one batch counter per BatchNorm
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert len(state) - len(counters) == 146
    assert sum(v.numel() for k, v in state.items() if k not in counters) == 272_546
    layers = dict(model.net.layers.named_children())
    assert layers["conv_1_batchnorm"].eps == 1e-3 and layers["bn1"].eps == 2e-5 and layers["fc1"].eps == 2e-5
    assert layers["conv_1_batchnorm"].weight.eq(1).all() and layers["fc1"].weight.eq(1).all()  # fix_gamma
    assert not layers["bn1"].weight.eq(1).all()  # bn1 is fix_gamma=False: its stored gamma is used


def test_matches_a_numpy_interpretation_of_the_mxnet_graph(model, folder):
    """The graph run node by node in float64 NumPy with MXNet's operator semantics (BatchNorm's default eps 1e-3,
    fixed gamma = 1, the graph's own input arithmetic) on the same files, for the sample and three LFW faces."""
    symbol = parse_symbol(folder / "model-symbol.json")
    params = {r.name: r.array for r in read_params(folder / "model-0000.params")}
    lfw = require_data(LFW)
    images = [_tom_hanks(folder)] + [np.asarray(Image.open(p).convert("RGB"))
                                     for p in sorted(lfw.glob("*/*.jpg"))[:60:20]]
    ours = model.raw_outputs(np.stack(images)).astype(np.float64)
    reference = np.stack([_np_forward(symbol, params, image)["fc1"] for image in images])
    np.testing.assert_allclose(ours, reference, atol=1e-4 * np.abs(reference).max())
    ages, male = decode(reference)
    found = model.predict(np.stack(images))
    np.testing.assert_array_equal(found.age, ages)
    np.testing.assert_allclose(found.male, male, atol=1e-5)


def test_decoding_counts_the_yes_votes_of_the_age_classifiers():
    outputs = np.zeros((2, 202))
    outputs[0, :2] = [0.0, np.log(3.0)]  # P(male) = 3 / 4
    pairs = outputs[:, 2:].reshape(2, 100, 2)
    pairs[0, :37, 1] = 1.0  # "age > k" for k < 37: 37 votes
    pairs[1, ::2, 1] = 1.0  # every other classifier: 50 votes, whatever their order
    outputs[:, 2:] = pairs.reshape(2, 200)
    ages, male = decode(outputs)
    assert ages.tolist() == [37.0, 50.0]
    np.testing.assert_allclose(male, [0.75, 0.5])
    with pytest.raises(ValueError, match=r"\(N, 202\)"):
        decode(np.zeros((2, 128)))


def test_reads_the_folder_either_file_and_logs_the_licence(folder, caplog):
    with caplog.at_level(logging.INFO, logger="facesphere.models.genderage"):
        a = load_genderage(folder / "model-symbol.json")
    assert "non-commercial research" in caplog.text and "non-commercial research" in a.describe()
    b = load_genderage(folder / "model-0000.params")
    x = torch.rand(2, 3, 112, 112) * 255
    with torch.no_grad():
        torch.testing.assert_close(a.net(x), b.net(x))
    with pytest.raises(ValueError, match=r"takes \(N, 112, 112, 3\) uint8 RGB crops"):
        a.predict(np.zeros((1, 112, 96, 3), np.uint8))


def test_damaged_or_foreign_files_are_refused_in_one_line(folder, tmp_path):
    def copy(name: str, parts=("model-symbol.json", "model-0000.params")):
        target = tmp_path / name
        target.mkdir()
        for part in parts:
            shutil.copy(folder / part, target / part)
        return target

    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_genderage(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no -symbol.json beside it"):
        load_genderage(copy("no_symbol", ("model-0000.params",)))
    with pytest.raises(ValueError, match="cannot tell which checkpoint"):
        load_genderage(copy("no_params", ("model-symbol.json",)))
    truncated = copy("truncated")
    data = (truncated / "model-0000.params").read_bytes()
    (truncated / "model-0000.params").write_bytes(data[: len(data) // 2])
    with pytest.raises(MXNetFormatError, match="file truncated"):
        load_genderage(truncated)
    huge = copy("huge")
    with open(huge / "model-0000.params", "r+b") as handle:
        handle.truncate(2**30)  # sparse: refused by its size before a byte is read
    with pytest.raises(ValueError, match="too large for the light gender/age model"):
        load_genderage(huge)
    with pytest.raises(ValueError, match="does not feed exactly one layer"):  # the recognition model's residual graph
        load_genderage(require_data(Y1))
