import json

import pytest

from flex_pbs.integrations.layer_thresholds import (
    check_layer_thresholds,
    load_layer_thresholds,
    save_layer_thresholds,
)


def test_round_trip_keeps_thresholds_and_notes(tmp_path):
    path = save_layer_thresholds(tmp_path / "t.json", {3: 0.8, 0: 0.95}, target_density=0.3)
    assert load_layer_thresholds(path) == {0: 0.95, 3: 0.8}
    assert json.loads(path.read_text())["target_density"] == 0.3


@pytest.mark.parametrize(
    "thresholds, message",
    [({-1: 0.9}, "not a layer index"), ({"x": 0.9}, "not a layer index"), ({1.5: 0.9}, "not a layer index"),
     ({0: 0.0}, r"must be in \(0, 1\]"), ({0: 1.2}, r"must be in \(0, 1\]"), ({0: True}, r"must be in \(0, 1\]")],
)
def test_bad_thresholds_name_the_layer(thresholds, message):
    with pytest.raises(ValueError, match=message):
        check_layer_thresholds(thresholds)


def test_loading_something_else_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="flex-pbs-calibrate"):
        load_layer_thresholds(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="not a flex_pbs layer thresholds file"):
        load_layer_thresholds(tmp_path / "other.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        load_layer_thresholds(tmp_path / "bad.json")
