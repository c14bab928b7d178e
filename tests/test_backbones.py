"""Tests for facesphere.backbones: shapes, input checks, published complexity figures, BN folding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from facesphere.backbones import (
    BACKBONES,
    Backbone,
    Complexity,
    build_backbone,
    count_complexity,
    fuse_batchnorm,
)
from facesphere.backbones.fuse import ConvBN

EXPECTED_NAMES = {
    "mobilefacenet",
    "mobilefacenet_m",
    "mobilefacenet_s",
    "iresnet18",
    "iresnet34",
    "iresnet50",
    "iresnet100",
    "iresnet200",
    "sphereface4",
    "sphereface10",
    "sphereface20",
    "sphereface36",
    "sphereface64",
}
# One name per constructor (aliases such as "sphere20" build the same network).
CANONICAL = sorted(EXPECTED_NAMES)
SLOW = {"iresnet200"}  # ~5 s on one core (build + two forwards); iresnet100 takes ~2.5 s


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


def _within(value: float, reference: float, tolerance: float) -> bool:
    return abs(value - reference) <= tolerance * reference


def _randomise_batchnorm(model: nn.Module) -> None:
    """Non-trivial BN statistics and affine parameters, so folding is actually exercised."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)


def test_registry_has_every_backbone() -> None:
    assert EXPECTED_NAMES <= set(BACKBONES.names())
    assert "sphere20" in BACKBONES


@pytest.mark.parametrize("name", _params(CANONICAL))
def test_forward_shape_train_and_eval(name: str) -> None:
    torch.manual_seed(0)
    model = build_backbone(name)
    assert isinstance(model, Backbone)
    x = torch.randn(2, 3, *model.input_size)
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            y = model(x)
        assert y.shape == (2, model.embedding_size)
        assert torch.isfinite(y).all()


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [
        ("mobilefacenet", (2, 3, 100, 100), "mobilefacenet expects 112x112 input, i.e. (N, 3, 112, 112)"),
        ("mobilefacenet", (2, 1, 112, 112), "got 1x112x112"),
        ("iresnet18", (3, 112, 112), "iresnet18 expects 112x112 input"),
        (
            "sphereface20",
            (2, 3, 112, 112),
            "sphereface20 expects 112x96 input, i.e. (N, 3, 112, 96) RGB images, got 3x112x112",
        ),
    ],
)
def test_wrong_input_raises_readable_error(name: str, shape: tuple[int, ...], message: str) -> None:
    model = build_backbone(name)
    with pytest.raises(ValueError) as info:
        model(torch.zeros(shape))
    assert message in str(info.value)


def test_mobilefacenet_complexity_matches_paper() -> None:
    # MobileFaceNets (arXiv 1804.07573) Table 2: 0.99M parameters, 221M MAdds at 112x112, D=128.
    c = count_complexity(build_backbone("mobilefacenet"))
    assert _within(c.parameters, 0.99e6, 0.02), c
    assert _within(c.multiply_adds, 221e6, 0.02), c


@pytest.mark.parametrize(("size", "kernel"), [((112, 96), (7, 6)), ((96, 96), (6, 6))])
def test_mobilefacenet_other_input_sizes(size: tuple[int, int], kernel: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = build_backbone("mobilefacenet", input_size=size, embedding_size=256)
    assert model.gdconv[0].kernel_size == kernel  # GDConv covers the whole final map
    y = model(torch.randn(2, 3, *size))
    assert y.shape == (2, 256)


def test_mobilefacenet_variants() -> None:
    m = build_backbone("mobilefacenet_m")
    s = build_backbone("mobilefacenet_s")
    assert (m.embedding_size, s.embedding_size) == (512, 128)
    full = count_complexity(build_backbone("mobilefacenet")).parameters
    assert count_complexity(s).parameters < count_complexity(m).parameters < full
    with pytest.raises(ValueError):
        build_backbone("mobilefacenet_m", embedding_size=128)


@pytest.mark.parametrize(
    ("name", "params", "madds"),
    # Figures from the project digest's own build of SphereFace-20/64 at 112x96 (prototxt layout).
    [("sphereface20", 22.7e6, 1.75e9), ("sphereface64", 48.2e6, 6.1e9)],
)
def test_sphereface_complexity(name: str, params: float, madds: float) -> None:
    c = count_complexity(build_backbone(name))
    assert _within(c.parameters, params, 0.02), c
    assert _within(c.multiply_adds, madds, 0.02), c


def test_sphereface_has_no_batchnorm_and_conv_biases() -> None:
    model = build_backbone("sphereface20")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 + 2 * (1 + 2 + 4 + 1) and all(c.bias is not None for c in convs)


def test_iresnet50_matches_published_figures() -> None:
    c = count_complexity(build_backbone("iresnet50"))
    # Parameters: 43.576 M ("MParams") for insightface's LResNet50E-IR,ArcFace@ms1m-refine-v1, read in
    # openvinotoolkit/open_model_zoo models/public/face-recognition-resnet50-arcface/*.md. The count of
    # the converted MXNet graph may book-keep BN/PReLU affine terms differently (they total ~0.1% of
    # the network), so 0.5% tolerance: enough for that, far below one residual unit (~2.7%).
    assert _within(c.parameters, 43.576e6, 0.005), c
    # Compute: "r50 ... FLOPs 6.3" (G, i.e. multiply-adds at 112x112) in deepinsight/insightface
    # recognition/arcface_torch/README.md; 1% covers rounding to two significant digits.
    assert _within(c.multiply_adds, 6.3e9, 0.01), c


def test_iresnet_structure() -> None:
    model = build_backbone("iresnet18", embedding_size=256, dropout=0.4)
    assert [len(stage) for stage in model.stages] == [2, 2, 2, 2]
    assert model.stem[0][0].stride == (1, 1)  # no downsampling in the stem
    assert model.embedding[0].in_features == 512 * 7 * 7
    assert model.dropout.p == 0.4 and model.embedding_size == 256


def test_count_complexity_closed_form() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),  # 8x8 -> 4x4
        nn.BatchNorm2d(8),
        nn.PReLU(8),
        nn.Conv2d(8, 8, 3, padding=1, groups=4),  # grouped, 4x4 -> 4x4
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )
    net.train()
    net[1].eval()
    c = count_complexity(net, input_size=(8, 8))
    conv1 = 8 * 4 * 4 * 3 * 3 * 3
    conv2 = 8 * 4 * 4 * (8 // 4) * 3 * 3
    linear = 128 * 10
    assert c.multiply_adds == conv1 + conv2 + linear
    params = 8 * 27 + (8 + 8) + 8 + (8 * 2 * 9 + 8) + (128 * 10 + 10)
    assert c.parameters == params
    assert isinstance(c, Complexity) and "MAdds" in str(c)
    # Training flags are restored module by module.
    assert net.training and not net[1].training and net[0].training
    with pytest.raises(ValueError, match="input_size"):
        count_complexity(net)


@pytest.mark.parametrize(("name", "dtype"), [("mobilefacenet", torch.float32), ("iresnet18", torch.float64)])
def test_fuse_batchnorm_matches_eval_outputs(name: str, dtype: torch.dtype) -> None:
    # iResNet-18 with random BN statistics has outputs of magnitude ~40, where float32 rounding
    # alone (unfused vs float64) reaches ~1e-4; float64 isolates the folding error.
    torch.manual_seed(0)
    model = build_backbone(name)
    _randomise_batchnorm(model)
    model = model.to(dtype).eval()
    fused = fuse_batchnorm(model)
    assert not fused.training
    assert len(list(fused.modules())) < len(list(model.modules()))
    assert not any(isinstance(m, ConvBN) for m in fused.modules())
    x = torch.randn(2, 3, *model.input_size, dtype=dtype)
    with torch.no_grad():
        expected, got = model(x), fused(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert count_complexity(fused).multiply_adds == count_complexity(model).multiply_adds


def test_fuse_batchnorm_plain_sequential() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=True),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
        nn.BatchNorm1d(5),
    )
    _randomise_batchnorm(net)
    net.eval()
    fused = fuse_batchnorm(net)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    assert net.training is False and isinstance(net[1], nn.BatchNorm2d)  # the original is untouched
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), net(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["mobilefacenet", "iresnet18", "sphereface20"])
def test_gradients_reach_first_conv(name: str) -> None:
    torch.manual_seed(0)
    model = build_backbone(name).train()
    model(torch.randn(2, 3, *model.input_size)).square().sum().backward()
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.grad is not None
    assert torch.isfinite(first_conv.weight.grad).all() and first_conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["mobilefacenet", "iresnet18", "sphereface10"])
def test_channels_last_matches_contiguous(name: str) -> None:
    torch.manual_seed(0)
    model = build_backbone(name).eval()
    x = torch.randn(2, 3, *model.input_size)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_dynamo_captures_full_graph() -> None:
    # Cheap torch.compile check: Dynamo must capture the whole forward (shape check included)
    # without graph breaks; the eager backend skips Inductor's slow code generation.
    torch.manual_seed(0)
    model = build_backbone("mobilefacenet").eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.slow
def test_torch_compile_inductor() -> None:
    torch.manual_seed(0)
    model = build_backbone("sphereface4").eval()
    compiled = torch.compile(model)
    x = torch.randn(2, 3, 112, 96)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="expects 112x96"):
        compiled(torch.randn(2, 3, 112, 112))
