"""Dataset spec validation: bad specs get clear errors naming the problem."""

from __future__ import annotations

import pytest

from ctrserve.models.data.spec import SpecError, load_spec, parse_spec

pytestmark = pytest.mark.quick

GOOD = {
    "name": "toy", "loader": "synthetic", "user_id": "u",
    "features": [
        {"name": "u", "type": "sparse", "side": "user"},
        {"name": "item", "type": "sparse", "side": "item"},
        {"name": "price", "type": "dense", "side": "item", "transform": "log"},
        {"name": "hist", "type": "sequence", "max_len": 5, "fields": [{"name": "h_item", "share": "item"}]},
    ],
}


def _with(**changes):
    spec = {**GOOD, **changes}
    return spec


def test_good_spec_parses() -> None:
    spec = parse_spec(GOOD)
    assert [f.name for f in spec.features] == ["u", "item", "price", "hist"]
    assert spec.sequences[0].fields[0].share == "item"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (_with(features=[{"name": "a", "type": "sparse", "side": "user"}] * 2), "duplicate feature names"),
        (_with(features=[{"name": "a", "type": "categorical", "side": "user"}]), "features.0"),
        (_with(features=[{"name": "a", "type": "sparse", "side": "shop"}]), "side"),
        (_with(features=[{"name": "h", "type": "sequence", "max_len": 5,
                          "fields": [{"name": "hi", "share": "nope"}]}]), "shares 'nope'"),
        (_with(features=[{"name": "h", "type": "sequence", "max_len": 0,
                          "fields": [{"name": "hi", "share": "nope"}]}]), "max_len"),
        (_with(features=[{"name": "a", "type": "sparse", "side": "user", "colour": 3}]), "colour"),
        (_with(features=[]), "features"),
        ({k: v for k, v in GOOD.items() if k != "user_id"}, "user_id"),
        (_with(label="u"), "label 'u' must not also be a feature"),
        ([1, 2], "a dataset spec is a mapping"),
    ],
)
def test_bad_specs_get_clear_errors(spec, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec(spec)


def test_unknown_dataset_lists_known_ones() -> None:
    with pytest.raises(SpecError, match=r"no dataset spec 'nope'; known datasets: .*frappe.*synthetic"):
        load_spec("nope")


def test_invalid_yaml_is_reported(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
