import pytest

from flex_pbs import PBSConfig
from flex_pbs.engine.layout import BlockLayout
from flex_pbs.engine.methods import METHODS, method_config


def test_methods_are_configurations_of_one_engine():
    assert method_config("dense") is None
    assert method_config("pbs") == PBSConfig()
    default = PBSConfig()
    assert (default.block_size, default.key_block_size, default.peak_weight, default.force_local_blocks) == (128, 64, 0.5, 8)
    assert (default.permute, default.key_sort, default.segment_size) == ("auto", "front", 512)
    # The baselines: square 128-token blocks scored as published (no peak estimate), no local window;
    # unpermuted with a one-block diagonal segment, or permuted as the paper does.
    square = {"key_block_size": None, "peak_weight": 0.0, "force_local_blocks": 0}
    paper = {"permute": "key", "key_sort": "full", "segment_size": 256}
    assert method_config("xattention") == PBSConfig(permute="none", segment_size=128, **square)
    assert method_config("pbs_mean") == PBSConfig(scoring="mean", **paper, **square)
    assert method_config("meanpool", threshold=0.8) == PBSConfig(
        scoring="mean", permute="none", segment_size=128, threshold=0.8, **square)
    assert method_config("pbs_antidiagonal") == method_config("xattention").replace(**paper)
    # pbs_fast: speed first (square blocks, XAttention's scoring, local 4).
    assert method_config("pbs_fast") == method_config("xattention").replace(force_local_blocks=4)
    fine = method_config("pbs_fine")
    assert (fine.block_size, fine.key_block_size, fine.segment_size, fine.stride, fine.peak_weight) == (64, None, 64, 8, 0.5)
    assert {name for name, config in METHODS.items() if config and config.peak_weight} == {"pbs", "pbs_unpermuted", "pbs_fine"}
    # The same 512-token local window in the three presets that have one.
    for name in ("pbs", "pbs_unpermuted", "pbs_fast", "pbs_fine"):
        layout = BlockLayout.from_config(method_config(name), 4096, 4096)
        assert method_config(name).force_local_blocks * layout.kv_block == 512, name
    assert method_config("pbs_unpermuted") == PBSConfig(permute="none", segment_size=128)
    assert set(METHODS) == {"dense", "pbs", "pbs_unpermuted", "pbs_fast", "pbs_fine", "pbs_antidiagonal", "pbs_mean", "xattention", "meanpool"}


def test_unknown_method_and_bad_overrides():
    with pytest.raises(ValueError, match="unknown method 'flash'"):
        method_config("flash")
    with pytest.raises(ValueError, match="threshold"):
        method_config("pbs", threshold=1.5)
    with pytest.raises(TypeError, match="unknown PBSConfig key"):
        method_config("pbs", treshold=0.5)
    with pytest.raises(ValueError, match="dense"):
        method_config("dense", threshold=0.5)
