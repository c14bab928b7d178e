"""``--set`` parsing, one implementation for configs and protocol options (facesphere.utils.overrides)."""

import pytest

from facesphere.utils.overrides import apply_overrides, parse_options, parse_value


def test_values_parse_as_yaml_with_numbers_coerced():
    assert parse_value("1e-3") == 1e-3 and isinstance(parse_value("1e-3"), float)
    assert parse_value("5") == 5 and isinstance(parse_value("5"), int)
    assert parse_value("[1, 2e1]") == [1, 20.0]
    assert parse_value("null") is None and parse_value("true") is True
    assert parse_value("112x96") == "112x96"
    assert parse_value("a: [b") == "a: [b"  # not YAML: kept as text


def test_nested_overrides_create_sections_and_refuse_non_sections():
    data = {"optim": {"lr": 0.1}, "name": "x"}
    apply_overrides(data, ["optim.lr=0.05", "model.head_args.margin=0.3"])
    assert data == {"optim": {"lr": 0.05}, "name": "x", "model": {"head_args": {"margin": 0.3}}}
    with pytest.raises(ValueError, match="'name' is not a section"):
        apply_overrides(data, ["name.sub=1"])
    for bad in ("novalue", "=3", ".=3"):
        with pytest.raises(ValueError, match="key=value"):
            parse_options([bad])


def test_quoted_text_stays_text_and_exponents_are_numbers_in_yaml_files_too(tmp_path):
    from facesphere.train.config import load_config

    assert parse_value('"2024"') == "2024" and parse_value("'1e-3'") == "1e-3" and parse_value("2e1") == 20.0
    cfg = load_config(None, ['name="2024"'])
    assert cfg.name == "2024"
    (tmp_path / "c.yaml").write_text("train:\n  steps: 1e4\noptim:\n  lr: 1e-3\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.train.steps == 10000 and cfg.optim.lr == 1e-3


def test_a_number_indexes_an_existing_list_and_nothing_else():
    data = {"objectives": [{"name": "aligned_embedding", "args": {"teacher": "a"}}, {"name": "grid_continuity"}]}
    apply_overrides(data, ["objectives.0.args.teacher=models/y1", "objectives.1.weight=0.5"])
    assert data["objectives"] == [{"name": "aligned_embedding", "args": {"teacher": "models/y1"}},
                                  {"name": "grid_continuity", "weight": 0.5}]
    for bad, message in (("objectives.2.weight=1", "list of 2; '2' is not an index"),
                         ("objectives.first.weight=1", "'first' is not an index"),
                         ("objectives.0.name.x=1", "'name' is not a section")):
        with pytest.raises(ValueError, match=message):
            apply_overrides(data, [bad])
    assert data["objectives"][1] == {"name": "grid_continuity", "weight": 0.5}  # a refused item changed nothing
