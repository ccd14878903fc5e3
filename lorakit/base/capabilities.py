"""What a base model can do, asked before training relies on it: whether packed examples and
custom 4-D masks stay as given (transformers' masking_utils builds the mask), and with which
attention implementation. Answers are reasons ("why not"), or None when it can.
"""

from __future__ import annotations

import sys

from lorakit import compat
from lorakit.errors import ConfigError

# Attention implementations whose mask builder honours packed position_ids at any batch size.
MASKED_IMPLS = ("eager", "sdpa", "flex_attention")
FLASH_IMPLS = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
_MASK_BUILDERS = ("create_causal_mask", "create_sliding_window_causal_mask")


def hf_model(model):
    """The transformers model inside `model` (itself, or wrapped by an adapter library)."""
    from transformers import PreTrainedModel

    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


def packing_problem(
    model, batch_size: int | None = None, use_cache: bool | None = None
) -> str | None:
    """Why `model` would let packed examples attend to each other, or None when it would not.

    batch_size: rows per forward; flash attention isolates packed examples only with 1 (None:
    unknown, treated as more than one).
    use_cache: what the caller's forwards pass as `use_cache` (None: they pass nothing, so the
    model's config decides).
    """
    problem = mask_builder_problem(model)
    if problem:
        return problem
    config = hf_model(model).config
    impl = compat.attn_implementation(config)
    if impl in FLASH_IMPLS:
        if batch_size != 1:
            return (
                f"attention implementation {impl!r} separates packed examples only in a "
                "batch of one row; use batch size 1, or 'sdpa'"
            )
    elif impl not in MASKED_IMPLS:
        return (
            f"attention implementation {impl!r} does not separate packed examples; use one "
            f"of {MASKED_IMPLS + FLASH_IMPLS}"
        )
    if use_cache or (use_cache is None and getattr(config, "use_cache", False)):
        return (
            "model.config.use_cache is True: the forward then builds a KV cache, and with a "
            "cache transformers ignores packed position_ids; set model.config.use_cache = "
            "False for training"
        )
    return None


def mask_builder_problem(model) -> str | None:
    """Why `model` would not take packed position_ids or a custom 4-D mask as given, or None.
    transformers' mask builders (masking_utils) do; a model with its own mask code may not."""
    base = hf_model(model)
    if base is None:
        return f"{type(model).__name__} is not a transformers model"
    module = sys.modules.get(type(base).__module__)
    if not any(hasattr(module, f) for f in _MASK_BUILDERS):
        return (
            f"{type(base).__name__} does not build its attention mask with "
            "transformers.masking_utils"
        )
    return None


def packing_supported(model, batch_size: int | None = None, use_cache: bool | None = None) -> bool:
    """Whether packed examples stay isolated in `model` (see `packing_problem` for why not)."""
    return packing_problem(model, batch_size, use_cache) is None


def check_packing_supported(
    model, batch_size: int | None = None, use_cache: bool | None = None
) -> None:
    """Raise ValueError, saying why, when packing would let examples attend to each other."""
    problem = packing_problem(model, batch_size, use_cache)
    if problem:
        raise ConfigError(f"cannot train with packing: {problem}")
