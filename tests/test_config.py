"""Typed configs: built-ins validate, overrides use the YAML field names, mistakes name the field."""

from __future__ import annotations

import types
import typing

import pytest
from pydantic import BaseModel, ValidationError

from facesphere.evaluate.protocols import PROTOCOLS
from facesphere.train.config import ConfigError, ExperimentConfig, apply_override, builtin_config_names, load_config


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


# ------------------------------------------------------------------ booleans are not numbers (every field)

REQUIRED = {"ObjectiveConfig": {"name": "recognition"}, "ProtocolRun": {"name": PROTOCOLS.names()[0], "path": "x"}}


def _leaf(annotation):
    """(kind, element kinds) of a field: "int", "float", "bool", "seq" (with its element annotations) or None."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _leaf(args[0])
    if annotation in (int, float, bool):
        return annotation.__name__
    if origin in (list, tuple) and all(a in (int, float) for a in args if a is not Ellipsis) and args:
        return "seq"
    return None


def _models(model=ExperimentConfig, seen=None):
    """Every config model reachable from ExperimentConfig (sections, list entries)."""
    seen = seen if seen is not None else {}
    seen[model.__name__] = model
    for field in model.model_fields.values():
        for candidate in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel) and candidate.__name__ not in seen:
                _models(candidate, seen)
    return seen


FIELDS = [(name, field_name, _leaf(f.annotation)) for name, model in _models().items()
          for field_name, f in model.model_fields.items() if _leaf(f.annotation)]


def _validate(model_name, field, value):
    model = _models()[model_name]
    return getattr(model.model_validate({**REQUIRED.get(model_name, {}), field: value}), field)


def test_the_field_table_covers_every_kind():
    kinds = {kind for *_, kind in FIELDS}
    assert kinds == {"int", "float", "bool", "seq"} and len(FIELDS) > 40


@pytest.mark.parametrize(("model", "field", "kind"), FIELDS, ids=[f"{m}.{f}" for m, f, _ in FIELDS])
def test_booleans_and_numbers_never_stand_in_for_each_other(model, field, kind):
    """int: refuses true/false and 2.5, accepts integral values; float: refuses true/false, accepts an int as a float;
    bool: accepts only true/false (not 1, 0, "yes", "true"); number lists/tuples: refuse a boolean element."""
    refused = {"int": [True, False, 2.5], "float": [True, False], "bool": [1, 0, "yes", "true", None],
               "seq": [[True, 1.0], [1, False]]}[kind]
    for value in refused:
        with pytest.raises(ValidationError, match=field):
            _validate(model, field, value)
    if kind == "bool":
        assert _validate(model, field, True) is True and _validate(model, field, False) is False
    elif kind in ("int", "float"):
        accepted = [v for v in (2, 1, 0, 100) if _accepts(model, field, v)]
        assert accepted, f"{model}.{field} accepts none of 0, 1, 2, 100"
        stored = _validate(model, field, accepted[0])
        assert type(stored) is (int if kind == "int" else float) and stored == accepted[0]
        if kind == "int":
            assert _validate(model, field, float(accepted[0])) == accepted[0]  # 1e4 from --set is 10000


def _accepts(model, field, value):
    try:
        _validate(model, field, value)
    except ValidationError:
        return False
    return True


def test_yaml_batch_size_true_is_refused_naming_the_field(tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  batch_size: true\n")
    with pytest.raises(ConfigError, match=r"data\.batch_size: .*boolean"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=r"eval\.flip: .*true or false"):
        load_config(None, ["eval.flip=1"])
    cfg = load_config(None, ["optim.lr=1", "train.steps=1e4", "eval.flip=false", "optim.betas=[0, 1]"])
    assert (cfg.optim.lr, cfg.train.steps, cfg.eval.flip, cfg.optim.betas) == (1.0, 10000, False, (0.0, 1.0))
    assert type(cfg.optim.lr) is float and type(cfg.train.steps) is int


def test_a_directory_or_non_utf8_file_as_config_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    (tmp_path / "c.yaml").write_bytes(b"name: \xff\n")
    with pytest.raises(ConfigError, match="c.yaml: not UTF-8"):
        load_config(tmp_path / "c.yaml")
