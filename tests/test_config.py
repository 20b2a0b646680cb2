import pytest

from flex_pbs import PBSConfig


def test_defaults_are_valid():
    cfg = PBSConfig()
    assert (cfg.block_size, cfg.segment_size, cfg.scoring, cfg.permute) == (128, 512, "antidiagonal", "auto")
    assert (cfg.threshold, cfg.stride, cfg.force_local_blocks, cfg.force_sink) == (0.9, 8, 8, True)
    assert (cfg.key_block_size, cfg.peak_weight, cfg.key_sort, cfg.permute_gain) == (64, 0.5, "front", 2.0)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"segment_size": 200}, ValueError, "multiple of block_size"),
        ({"stride": 7}, ValueError, "must divide block_size"),
        ({"threshold": 0.0}, ValueError, "threshold"),
        ({"threshold": 1.5}, ValueError, "threshold"),
        ({"threshold": "0.9"}, TypeError, "threshold"),
        ({"scoring": "max"}, ValueError, "scoring"),
        ({"permute": "query"}, ValueError, "permute"),
        ({"block_size": 100}, ValueError, "multiple of 16"),
        ({"block_size": 128.0}, TypeError, "block_size"),
        ({"max_density": 0.0}, ValueError, "max_density"),
        ({"force_sink": 1}, TypeError, "force_sink"),
        ({"threshold_counts_forced": "no"}, TypeError, "threshold_counts_forced"),
        ({"permute": "key", "key_block_size": None, "segment_size": 128}, ValueError, r"segment_size >= 2 \* key_block_size"),
        ({"dense_below": -1}, ValueError, "dense_below"),
        ({"key_block_size": 40}, ValueError, "key_block_size must be a multiple of 16"),
        ({"key_block_size": 96}, ValueError, "must divide block_size"),
        ({"block_size": 32, "segment_size": 32}, ValueError, "key_block_size=None for square blocks"),
        ({"key_block_size": 32, "stride": 64}, ValueError, "must divide"),
        ({"key_block_size": 64.0}, TypeError, "key_block_size"),
        ({"peak_weight": 1.5}, ValueError, "peak_weight"),
        ({"peak_weight": -0.1}, ValueError, "peak_weight"),
        ({"peak_weight": True}, TypeError, "peak_weight"),
        ({"permute_gain": 0.5}, ValueError, "permute_gain must be a finite float >= 1"),
        ({"permute_gain": float("inf")}, ValueError, "permute_gain must be a finite float >= 1"),
        ({"permute_gain": "2"}, TypeError, "permute_gain"),
        ({"permute": "auto", "key_block_size": None, "segment_size": 128}, ValueError, r"segment_size >= 2 \* key_block_size"),
        ({"key_sort": "partial"}, ValueError, "key_sort must be one of"),
    ],
)
def test_bad_values_name_the_field(kwargs, error, words):
    with pytest.raises(error, match=words):
        PBSConfig(**kwargs)


def test_from_dict_rejects_unknown_keys_listing_valid_ones():
    with pytest.raises(TypeError, match=r"unknown PBSConfig key\(s\) \['treshold'\].*threshold"):
        PBSConfig.from_dict({"treshold": 0.9})


def test_replace_validates():
    assert PBSConfig().replace(threshold=0.8).threshold == 0.8
    with pytest.raises(ValueError):
        PBSConfig().replace(threshold=2.0)


def test_short_inputs_are_dense():
    cfg = PBSConfig(segment_size=256, dense_below=1000)
    assert cfg.is_dense_for(256) and cfg.is_dense_for(999) and not cfg.is_dense_for(1000)


def test_inputs_whose_blocks_are_all_forced_run_dense():
    cfg = PBSConfig()  # a 512-token diagonal segment + 8 local 64-key blocks: up to 1024 keys all forced
    assert cfg.is_dense_for(1024) and not cfg.is_dense_for(1025)
    assert PBSConfig(segment_size=128).is_dense_for(640) and not PBSConfig(segment_size=128).is_dense_for(641)
    assert not PBSConfig(force_local_blocks=0).is_dense_for(513)
    assert PBSConfig(segment_size=256, permute="key", force_local_blocks=0).is_dense_for(256)
    assert PBSConfig(dense_below=4096).is_dense_for(4095)
