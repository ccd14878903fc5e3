"""The one dispatch point for frozen base layers.

A LoRA layer always computes `base_layer(x) + delta(x)`; the base layer's own forward applies
the frozen weight, whatever its storage (fp32/bf16 `nn.Linear`, GPT-2's transposed `Conv1D`,
bitsandbytes 4-bit). Backends differ only in how that weight is read as a dense matrix and
written back (merge / unmerge / PiSSA), which is what this module answers.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit import compat


def is_linear4bit(module: nn.Module) -> bool:
    bnb = compat.loaded_bitsandbytes()
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def is_packed_4bit(param: torch.Tensor) -> bool:
    """A bitsandbytes 4-bit parameter: two weights per stored byte."""
    bnb = compat.loaded_bitsandbytes()
    return bnb is not None and isinstance(param, bnb.nn.Params4bit)


def is_linear8bit(module: nn.Module) -> bool:
    bnb = compat.loaded_bitsandbytes()
    return bnb is not None and isinstance(module, bnb.nn.Linear8bitLt)


def keep_regular_layouts(model: nn.Module) -> None:
    """Keep every 4-bit layer of `model` readable and differentiable (see lorakit.compat)."""
    compat.keep_regular_layouts(model)


def _refuse_int8(module: nn.Module) -> None:
    # Linear8bitLt keeps int8 values plus row scales that move between the weight and the layer
    # state after the first forward: reading its raw weight as a matrix would give garbage.
    if is_linear8bit(module):
        raise NotImplementedError(
            "merging into an 8-bit (bitsandbytes Linear8bitLt) base is not supported; write a "
            "merged bf16/fp32 model with lorakit.lora.export_merged(...) instead"
        )


def is_supported(module: nn.Module) -> bool:
    """Layers a LoRA adapter can wrap: nn.Linear (incl. bnb 4-bit) and transformers Conv1D."""
    return isinstance(module, (nn.Linear, Conv1D))


def is_fan_in_fan_out(module: nn.Module) -> bool:
    """Conv1D stores its weight as (in, out), the transpose of nn.Linear."""
    return isinstance(module, Conv1D)


def in_out_features(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    return module.in_features, module.out_features


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The frozen weight as an fp32 (out, in) matrix: a copy, never a view of the stored one.
    Every storage reads: float, Conv1D, bitsandbytes 4-bit and 8-bit."""
    if is_linear4bit(module):
        return _dequantize_linear4bit(module)
    if is_linear8bit(module):
        return _dequantize_linear8bit(module)
    w = module.weight.detach()
    w = w.t() if is_fan_in_fan_out(module) else w
    return w.to(torch.float32, copy=True)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The frozen weight as an (out, in) matrix in its own dtype, without a copy where the storage
    allows it (a transposed view for Conv1D; 4-bit weights are dequantized). Read-only use."""
    _refuse_int8(module)
    if is_linear4bit(module):
        return _dequantize_linear4bit(module)
    w = module.weight.detach()
    return w.t() if is_fan_in_fan_out(module) else w


def write_dense_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Store an fp32 (out, in) matrix as the frozen weight, in the layer's own format."""
    _refuse_int8(module)
    if is_linear4bit(module):
        _requantize_linear4bit(module, weight)
        return
    stored = module.weight
    new = weight.t() if is_fan_in_fan_out(module) else weight
    with torch.no_grad():
        stored.copy_(new.to(stored.dtype))


def _dequantize_linear4bit(module: nn.Module) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    if getattr(module.weight, "quant_state", None) is None:
        raise ValueError(
            f"{type(module).__name__} holds no quantized weight yet (its weight is "
            "quantized when the layer is moved to a device)"
        )
    compat.keep_regular_layout(module)  # the regular dequantize kernel misreads the CPU tiling
    w = module.weight
    # dequantize_4bit allocates a fresh (out, in) tensor in the quant state's dtype
    return bnbf.dequantize_4bit(w.data, w.quant_state).to(torch.float32)


def _dequantize_linear8bit(module: nn.Module) -> torch.Tensor:
    w = module.weight
    if w.dtype != torch.int8:  # has_fp16_weights=True: a float weight, not quantized
        return w.detach().to(torch.float32, copy=True)
    import bitsandbytes.functional as bnbf

    # the row scales move from the weight to the layer's state at its first forward
    scb = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB
    return bnbf.int8_vectorwise_dequant(w.data, scb).to(torch.float32)


def _requantize_linear4bit(module: nn.Module, weight: torch.Tensor) -> None:
    """Quantize an fp32 (out, in) matrix into the layer's existing 4-bit format (lossy), with the
    layer's own settings: quant type, blocksize, double quantization, dtype, storage."""
    bnb = compat.bitsandbytes()

    if getattr(module.weight, "quant_state", None) is None:
        raise ValueError(f"{type(module).__name__} holds no quantized weight to replace")
    compat.keep_regular_layout(module)  # the CPU tiled layout reports bf16 / non-nested settings
    old = module.weight
    qs = old.quant_state
    if tuple(weight.shape) != tuple(qs.shape):
        raise ValueError(
            f"weight shape {tuple(weight.shape)} does not match the layer's {tuple(qs.shape)}"
        )
    # Quantize from the dtype the layer was quantized from, so dequantization keeps its dtype.
    new = bnb.nn.Params4bit(
        weight.detach().to(device=old.device, dtype=qs.dtype),
        requires_grad=False,
        blocksize=qs.blocksize,
        compress_statistics=compat.double_quant(qs),
        quant_type=qs.quant_type,
        quant_storage=getattr(old, "quant_storage", torch.uint8),
        module=module,
    )
    module.weight = compat.quantize_params4bit(new, old.device)  # also sets module.quant_state
