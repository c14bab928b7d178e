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
