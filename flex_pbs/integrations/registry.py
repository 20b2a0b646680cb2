"""Adding and removing attention functions in transformers, in one place.

transformers 5 dispatches attention by name through two registries: ``AttentionInterface``
(the attention function) and ``AttentionMaskInterface`` (the mask each layer receives). Both
must know a name for ``attn_implementation=name`` to work, and transformers offers no way to
remove a name again, so removal pops it from their mappings here and nowhere else.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface


def add_attention(name: str, attention: Callable, mask: Callable) -> None:
    """Register ``attention`` and its ``mask`` function under ``name`` (replacing any)."""
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, mask)


def remove_attention(name: str) -> None:
    """Forget ``name`` in both registries (no error if it is not there)."""
    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)


@contextlib.contextmanager
def attention_registered(name: str, attention: Callable, mask: Callable) -> Iterator[None]:
    """``name`` registered inside the block, removed afterwards."""
    add_attention(name, attention, mask)
    try:
        yield
    finally:
        remove_attention(name)
