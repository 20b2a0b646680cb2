"""The one place that adds and removes attention functions in transformers."""

import pytest
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from flex_pbs.integrations.registry import (
    add_attention,
    attention_registered,
    remove_attention,
)


def attention(*args, **kwargs):
    raise AssertionError("not called here")


def registered(name):
    return name in AttentionInterface._global_mapping, name in AttentionMaskInterface._global_mapping


def test_add_and_remove_touch_both_registries():
    add_attention("flex_pbs_test", attention, sdpa_mask)
    assert registered("flex_pbs_test") == (True, True)
    assert AttentionInterface()["flex_pbs_test"] is attention
    remove_attention("flex_pbs_test")
    assert registered("flex_pbs_test") == (False, False)
    remove_attention("flex_pbs_test")  # removing twice is not an error


def test_scoped_registration_is_removed_even_on_error():
    with pytest.raises(RuntimeError):
        with attention_registered("flex_pbs_scoped", attention, sdpa_mask):
            assert registered("flex_pbs_scoped") == (True, True)
            raise RuntimeError("boom")
    assert registered("flex_pbs_scoped") == (False, False)
