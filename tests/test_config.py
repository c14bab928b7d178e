"""Typed configs: built-ins validate, overrides use the YAML field names, mistakes name the field."""

from __future__ import annotations

import pytest

from facesphere.train.config import ConfigError, apply_override, builtin_config_names, load_config


def test_every_builtin_config_validates():
    names = builtin_config_names()
    for loss in ("softmax", "normface", "sphereface", "coco", "cosface", "arcface", "quickstart"):
        assert loss in names
    for name in names:
        cfg = load_config(name)
        assert cfg.train.steps > 0


def test_overrides_parse_yaml_values_and_nested_fields():
    cfg = load_config("arcface", ["optim.lr=0.05", "train.grad_clip=5", "schedule.milestones=[10, 20]",
                                  "model.head_args.margin=0.3", "data.kind=synthetic"])
    assert cfg.optim.lr == 0.05
    assert cfg.train.grad_clip == 5.0
    assert cfg.schedule.milestones == [10, 20]
    assert cfg.model.head_args["margin"] == 0.3
    assert cfg.data.kind == "synthetic"


@pytest.mark.parametrize("override, field", [
    ("optim.lr=-1", "optim.lr"),
    ("optim.nme=sgd", "optim.nme"),
    ("train.amp=fp8", "train.amp"),
    ("data.batch_size=zero", "data.batch_size"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config("arcface", [override])


def test_unknown_component_and_argument_are_rejected():
    with pytest.raises(ConfigError, match="unknown head 'arcfase'"):
        load_config("arcface", ["model.head=arcfase"])
    with pytest.raises(ConfigError, match="does not take"):
        load_config("arcface", ["model.head_args.margn=0.3"])


def test_missing_file_and_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="neither a file nor a built-in"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        apply_override({}, "optim.lr")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
