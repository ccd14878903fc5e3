"""Private and version-dependent parts of other libraries, behind one small module.

Each entry names the version it was checked against; tests/test_compat.py fails loudly when an
installed library no longer has what an entry relies on. Nothing here imports a heavy library at
import time: bitsandbytes is imported on first use, through `bitsandbytes()`.
"""

from __future__ import annotations

import copy
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import torch
from torch import nn

# ------------------------------------------------------------------------------- bitsandbytes
# Checked against bitsandbytes 0.50.2.
#
# On CPUs with AVX512-BF16, a `Linear4bit` repacks its weight into a CPU-only tiled layout at its
# first forward in eval mode without grad (`_convert_weight_packed_for_cpu`, flagged by
# `quant_state.packing_format_for_cpu`; the layer decides with its `support_avx512bf16_for_cpu`
# attribute). That layout rounds the absmax scales to bf16, drops double quantization, computes
# in bf16 whatever the compute dtype, and its matmul has no backward; everything that reads the
# weight in the regular layout afterwards (the backward pass's dequantization, merges) reads
# garbage. lorakit keeps every 4-bit layer it loads, quantizes or adapts on the regular layout
# (measured in bench/qlora_cpu_layout.py: the tiled path is slower for prefill and no faster for
# decoding on the default model), and reads a layer that was tiled before it saw it exactly.
BNB_CHECKED = "0.50.2"

# bitsandbytes' CPU backend logs this at import on AVX512-BF16 CPUs: it would fetch an optional
# kernel for the tiled layout from the Hugging Face hub, which lorakit never uses (see above).
_KERNELS_HUB_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropKernelsHubWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_KERNELS_HUB_MESSAGE)


def silence_bitsandbytes_hub_kernel_warning() -> None:
    """Drop bitsandbytes' 'Failed to load CPU gemm_4bit_forward from kernels-community' log line
    (idempotent). Call before bitsandbytes is first imported: it logs while importing."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropKernelsHubWarning) for f in logger.filters):
        logger.addFilter(_DropKernelsHubWarning())


def bitsandbytes() -> ModuleType:
    """Import bitsandbytes (with a clear error if it is missing or broken)."""
    silence_bitsandbytes_hub_kernel_warning()
    try:
        import bitsandbytes as bnb
    except Exception as e:  # ImportError, or a broken native library
        raise ImportError(f"quantization needs bitsandbytes (pip install bitsandbytes): {e}") from e
    return bnb


def loaded_bitsandbytes() -> ModuleType | None:
    """bitsandbytes if something already imported it, else None (no module can then be one of
    its layers, and plain models avoid its import cost)."""
    return sys.modules.get("bitsandbytes")


def is_cpu_tiled(module: nn.Module) -> bool:
    """Whether a `Linear4bit` holds its weight in bitsandbytes' CPU tiled layout."""
    state = getattr(module.weight, "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def keep_regular_layout(module: nn.Module) -> None:
    """Keep a bitsandbytes `Linear4bit` on the regular 4-bit layout from now on: no repacking at
    eval forwards, and a layer that was already repacked is restored (see `untile`)."""
    module.support_avx512bf16_for_cpu = False
    if is_cpu_tiled(module):
        untile(module)


def keep_regular_layouts(model: nn.Module) -> nn.Module:
    """`keep_regular_layout` on every bitsandbytes 4-bit layer of `model` (in place); a no-op
    when bitsandbytes is not loaded."""
    bnb = loaded_bitsandbytes()
    if bnb is not None:
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                keep_regular_layout(module)
    return model


def untile(module: nn.Module) -> None:
    """Return a tiled `Linear4bit` to the regular layout, exactly: the same 4-bit codes and the
    same (bf16-rounded) absmax values the tiled layer computes with, stored unnested in fp32.

    bitsandbytes' own inverse re-quantizes the absmax to restore double quantization, which
    changes the weights again; the original nested statistics are gone, so we keep what the
    layer holds now. The layer's double-quantization setting is remembered for re-quantization
    (merges), see `double_quant`.
    """
    import bitsandbytes.functional as bnbf

    weight = module.weight
    tiled = weight.quant_state
    state = copy.copy(tiled)  # bitsandbytes' inverse edits the state it gets
    state.original_nested = False  # skip its lossy re-quantization of absmax
    data, state = bnbf._convert_weight_packed_for_cpu_inverse(weight.data, state)
    # tiled absmax: (in / blocksize, out) in bf16; regular: flat, row-major over (out, in)
    state.absmax = tiled.absmax.t().reshape(-1).to(torch.float32)
    state.nested, state.offset, state.state2 = False, None, None
    state.lorakit_double_quant = bool(getattr(tiled, "original_nested", False))
    weight.data, weight.quant_state = data, state
    module.quant_state = state


def double_quant(quant_state) -> bool:
    """The layer's own double-quantization setting (also for a layer restored by `untile`)."""
    return bool(getattr(quant_state, "lorakit_double_quant", quant_state.nested))


def quantize_params4bit(param, device: torch.device | str):
    """Quantize a float `Params4bit` on `device` (bitsandbytes' `_quantize`: `.to(device)` does
    it too, but only when the device changes)."""
    return param._quantize(device)


# ------------------------------------------------------------------------------------- torch
# Checked against torch 2.13.0.
TORCH_CHECKED = "2.13.0"


def torch_cpu_has(feature: str) -> bool:
    """torch's own probe of a CPU feature ("avx512_bf16", "amx_tile"): the private
    `torch.cpu._is_<feature>_supported()`; any failure (a renamed probe) counts as "no"."""
    probe = getattr(torch.cpu, f"_is_{feature}_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except Exception:  # noqa: BLE001 - a private probe: never let it break loading
        return False


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether forward (pre-)hooks are registered on the module itself (FSDP2 and others add
    them); torch keeps them in private dicts and offers no public query."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def own_state(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """A module's own parameters and persistent buffers: its `state_dict` entries without the
    children's (torch keeps non-persistent buffer names in a private set)."""
    for name, p in module.named_parameters(recurse=False):
        yield name, p
    for name, b in module.named_buffers(recurse=False):
        if name not in module._non_persistent_buffers_set:
            yield name, b


# ------------------------------------------------------------------------------ transformers
# Checked against transformers 5.24.0.
TRANSFORMERS_CHECKED = "5.24.0"


def attn_implementation(config) -> str | None:
    """The attention implementation a model runs ("sdpa", "eager", "flash_attention_2", ...):
    transformers keeps it in the private `config._attn_implementation`."""
    return getattr(config, "_attn_implementation", None)


def no_split_modules(model) -> tuple[str, ...]:
    """Class names of the model's blocks that must stay whole (its decoder layers): the private
    `_no_split_modules` of transformers' models, which accelerate and FSDP wrapping read too."""
    return tuple(getattr(model, "_no_split_modules", None) or ())


def unquantized_config(config):
    """A copy of a model config without what a quantized load recorded in it (the public
    `quantization_config` and the private `_pre_quantization_dtype`)."""
    config = copy.deepcopy(config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    return config


def grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None,
    transposed: bool,
) -> torch.Tensor:
    """Rows of `x` sorted by expert (group ends `offsets`) times their expert's slice of a fused
    3-D `weight`: transformers' private `_grouped_linear`, which its MoE experts use (the
    torch grouped-GEMM where it runs, a loop over experts otherwise)."""
    from transformers.integrations.moe import _grouped_linear

    return _grouped_linear(x, weight, offsets, bias=bias, is_transposed=transposed)


def moe_conversion_pattern(model_type: str | None) -> str | None:
    """The v4 → v5 checkpoint conversion family of a model type ("mixtral", "qwen2_moe", ...)
    if transformers converts its checkpoints (its experts were nn.Linear layers in v4): the
    private `_MODEL_TO_CONVERSION_PATTERN`, which PEFT reads to map old target names."""
    from transformers.conversion_mapping import (
        _MODEL_TO_CONVERSION_PATTERN,
        get_checkpoint_conversion_mapping,
    )

    if model_type is None or get_checkpoint_conversion_mapping(model_type) is None:
        return None
    # transformers 5.24 leaves mixtral itself out of the table; PEFT adds it back
    return {**_MODEL_TO_CONVERSION_PATTERN, "mixtral": "mixtral"}.get(model_type)


class KVLayer:
    """One decoder layer's key/value tensors, [batch, kv_heads, length, head_dim] each."""

    keys: torch.Tensor
    values: torch.Tensor


def new_kv_cache():
    """An empty cache that the model fills on its first forward (transformers' DynamicCache)."""
    from transformers import DynamicCache

    return DynamicCache()


def cache_argument(model) -> str:
    """The forward keyword that takes a KV cache: `cache` since transformers 5.2x (which warns
    about `past_key_values`, to be removed in 5.40), `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def kv_layers(cache) -> list[KVLayer]:
    """The per-layer key/value holders of a filled DynamicCache. The serving scheduler reorders,
    pads and concatenates rows of these in place; since transformers 4.56 a DynamicCache keeps
    them as `cache.layers[i].keys` / `.values` (no public batch-concatenation API exists)."""
    layers = list(cache.layers)
    for layer in layers:
        if type(layer).__name__ != "DynamicLayer":  # sliding-window or quantized layers
            raise TypeError(f"cannot batch a {type(layer).__name__} cache layer")
    return layers


@contextmanager
def contiguous_head_input(model) -> Iterator[None]:
    """Within the block, the output embedding (lm_head) gets its input with standard strides.
    With `logits_to_keep=1` transformers hands it `hidden[:, -1:, :]`, a view that keeps the
    sequence's strides (even for one prompt, where it counts as contiguous); torch's matmul then
    declines to fold it into one GEMM and copies the [vocab, hidden] weight per row instead:
    ~50 ms for one prompt and ~200 ms for four on the default model, against 3 ms."""
    head = model.get_output_embeddings()
    if head is None:
        yield
        return

    def restride(_, args):
        return (args[0].clone(memory_format=torch.contiguous_format), *args[1:])

    handle = head.register_forward_pre_hook(restride)
    try:
        yield
    finally:
        handle.remove()


# Any lorakit import lands here first (lorakit.base imports this module): silence the line before
# something (transformers' trainer utilities, PEFT, lorakit itself) imports bitsandbytes.
silence_bitsandbytes_hub_kernel_warning()
