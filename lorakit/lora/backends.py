"""The one dispatch point for frozen base layers.

A LoRA layer always computes `base_layer(x) + delta(x)`; the base layer's own forward applies
the frozen weight, whatever its storage (fp32/bf16 `nn.Linear`, GPT-2's transposed `Conv1D`,
bitsandbytes 4-bit). Backends differ only in how that weight is read as a dense matrix and
written back (merge / unmerge / PiSSA), which is what this module answers.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def _bnb_linear4bit_cls():
    # bitsandbytes is only imported by code that quantizes; if it is not loaded, no module can be
    # one of its layers, and we avoid its import cost for plain models.
    bnb = sys.modules.get("bitsandbytes")
    return None if bnb is None else bnb.nn.Linear4bit


def is_linear4bit(module: nn.Module) -> bool:
    cls = _bnb_linear4bit_cls()
    return cls is not None and isinstance(module, cls)


def is_packed_4bit(param: torch.Tensor) -> bool:
    """A bitsandbytes 4-bit parameter: two weights per stored byte."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(param, bnb.nn.Params4bit)


def is_linear8bit(module: nn.Module) -> bool:
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear8bitLt)


def _refuse_int8(module: nn.Module) -> None:
    # Linear8bitLt keeps int8 values plus row scales that move between the weight and the layer
    # state after the first forward: reading its raw weight as a matrix would give garbage.
    if is_linear8bit(module):
        raise NotImplementedError(
            "merging into an 8-bit (bitsandbytes Linear8bitLt) base is not supported; write a "
            "merged bf16/fp32 model with lorakit.base.export_merged(...) instead")


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
    """The frozen weight as an fp32 (out, in) matrix: a copy, never a view of the stored one."""
    _refuse_int8(module)
    if is_linear4bit(module):
        return _dequantize_linear4bit(module)
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


def _unpack_cpu_format(module: nn.Module) -> None:
    # On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit's weight into a CPU-only tiled
    # layout at its first eval forward; the regular dequantize kernel misreads that layout.
    # Undo it in place, as bitsandbytes' own state_dict saving does (it repacks on next use).
    import bitsandbytes.functional as bnbf

    w = module.weight
    if getattr(w.quant_state, "packing_format_for_cpu", False):
        w.data, w.quant_state = bnbf._convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
        module.quant_state = w.quant_state


def _dequantize_linear4bit(module: nn.Module) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    if getattr(module.weight, "quant_state", None) is None:
        raise ValueError(f"{type(module).__name__} holds no quantized weight yet (its weight is "
                         "quantized when the layer is moved to a device)")
    _unpack_cpu_format(module)
    w = module.weight
    # dequantize_4bit allocates a fresh (out, in) tensor in the quant state's dtype
    return bnbf.dequantize_4bit(w.data, w.quant_state).to(torch.float32)


def _requantize_linear4bit(module: nn.Module, weight: torch.Tensor) -> None:
    """Quantize an fp32 (out, in) matrix into the layer's existing 4-bit format (lossy)."""
    import bitsandbytes as bnb

    if getattr(module.weight, "quant_state", None) is None:
        raise ValueError(f"{type(module).__name__} holds no quantized weight to replace")
    _unpack_cpu_format(module)  # the CPU tiled layout reports bf16 / non-nested settings
    old = module.weight
    qs = old.quant_state
    if tuple(weight.shape) != tuple(qs.shape):
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match the layer's "
                         f"{tuple(qs.shape)}")
    # Quantize from the dtype the layer was quantized from, so dequantization keeps its dtype.
    new = bnb.nn.Params4bit(weight.detach().to(device=old.device, dtype=qs.dtype),
                            requires_grad=False, blocksize=qs.blocksize,
                            compress_statistics=qs.nested, quant_type=qs.quant_type,
                            quant_storage=getattr(old, "quant_storage", torch.uint8),
                            module=module)
    module.weight = new._quantize(old.device)  # also updates module.quant_state
