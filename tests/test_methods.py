import pytest

from flex_pbs import PBSConfig
from flex_pbs.methods import METHODS, method_config


def test_methods_are_configurations_of_one_engine():
    assert method_config("dense") is None
    assert method_config("pbs") == PBSConfig()
    assert method_config("xattention") == PBSConfig(permute="none", force_local_blocks=0)
    assert method_config("pbs_mean") == PBSConfig(scoring="mean", permute="key", segment_size=256, force_local_blocks=0)
    assert method_config("meanpool", threshold=0.8) == PBSConfig(
        scoring="mean", permute="none", force_local_blocks=0, threshold=0.8
    )
    assert method_config("pbs_antidiagonal") == method_config("xattention").replace(permute="key", segment_size=256)
    fine = method_config("pbs_fine")
    assert (fine.block_size, fine.segment_size, fine.stride, fine.peak_weight) == (64, 64, 8, 0.5)
    # Every other method scores as published: no peak estimate.
    assert all(config.peak_weight == 0 for name, config in METHODS.items() if config and name != "pbs_fine")
    assert fine.force_local_blocks * fine.block_size == PBSConfig().force_local_blocks * PBSConfig().block_size
    assert set(METHODS) == {"dense", "pbs", "pbs_fine", "pbs_antidiagonal", "pbs_mean", "xattention", "meanpool"}


def test_unknown_method_and_bad_overrides():
    with pytest.raises(ValueError, match="unknown method 'flash'"):
        method_config("flash")
    with pytest.raises(ValueError, match="threshold"):
        method_config("pbs", threshold=1.5)
    with pytest.raises(TypeError, match="unknown PBSConfig key"):
        method_config("pbs", treshold=0.5)
    with pytest.raises(ValueError, match="dense"):
        method_config("dense", threshold=0.5)
