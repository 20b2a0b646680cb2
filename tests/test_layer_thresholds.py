import json

import pytest

from flex_pbs.integrations.layer_thresholds import (
    FORMAT,
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
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        load_layer_thresholds(tmp_path / "bad.json")


@pytest.mark.parametrize(
    "thresholds, message",
    [([0.9, 0.8], r"'layer_thresholds' must be a mapping .*got a list"),
     ("0.9", r"'layer_thresholds' must be a mapping .*got a string"),
     (None, r"'layer_thresholds' must be a mapping .*got null"),
     ({"0": "0.9"}, r"'layer_thresholds'.*threshold of layer 0 must be in \(0, 1\], got '0.9' \(a string, not a number\)"),
     ({"0": None}, r"'layer_thresholds'.*threshold of layer 0 must be in \(0, 1\], got None"),
     ({"0": [0.9]}, r"'layer_thresholds'.*threshold of layer 0 must be in \(0, 1\]"),
     ({"-1": 0.9}, r"'layer_thresholds'.*layer '-1' is not a layer index")],
    ids=["list", "str", "null", "str-threshold", "null-threshold", "list-threshold", "negative-layer"],
)
def test_a_malformed_file_names_the_file_and_the_key(tmp_path, thresholds, message):
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({"format": FORMAT, "layer_thresholds": thresholds}))
    with pytest.raises(ValueError, match=message) as raised:
        load_layer_thresholds(path)
    assert str(path) in str(raised.value)


def test_a_file_without_thresholds_or_not_json_names_the_file(tmp_path):
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({"format": FORMAT}))
    with pytest.raises(ValueError, match=r"has no 'layer_thresholds'") as raised:
        load_layer_thresholds(path)
    assert str(path) in str(raised.value)
    save_layer_thresholds(path, {0: 0.9, 1: 0.8})
    path.write_text(path.read_text()[:40])  # truncated
    with pytest.raises(ValueError, match=r"is not valid JSON \(truncated or not written by flex-pbs-calibrate\?\)") as raised:
        load_layer_thresholds(path)
    assert str(path) in str(raised.value)
    path.write_bytes(b"\xff\xfe{")  # not even text
    with pytest.raises(ValueError, match="is not valid JSON") as raised:
        load_layer_thresholds(path)
    assert str(path) in str(raised.value)
