"""A LoRA model as a plain transformers model: merged export and dequantization of its base.

`export_merged` is the recommended way to merge a QLoRA adapter: every 4/8-bit layer is read as
its exact dense values, the active adapters are added in fp32, and the result is written as an
ordinary (bf16/fp32) checkpoint that any transformers code opens.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from lorakit import compat
from lorakit.atomic import atomic_directory
from lorakit.base.loading import resolve_dtype
from lorakit.base.quantize import quantized_layers
from lorakit.lora import backends
from lorakit.lora.layer import LoraLayer, ModulesToSave
from lorakit.lora.params import ParamLoraLayer


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every bitsandbytes 4/8-bit linear layer by an `nn.Linear` in `dtype`, in place.

    This recovers the quantized values exactly (not the original pre-quantization weights)."""
    for name, layer in list(quantized_layers(model).items()):
        lin = nn.Linear(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            device="meta",
            dtype=dtype,
        )
        lin.weight = nn.Parameter(backends.dense_weight(layer).to(dtype), requires_grad=False)
        if layer.bias is not None:
            lin.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
        lin.train(layer.training)
        model.set_submodule(name, lin)
    return model


def unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model a LoraModel wraps, or `model` itself. (A transformers causal LM
    has a `.model` too, its decoder stack without the head, so that attribute does not tell.)"""
    return model.model if hasattr(model, "peft_config") else model


def merged_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of the plain model a LoRA model on a (quantized) base stands for, one at a
    time under their state-dict names: each LoRA layer's dense base weight plus its active
    adapters folded in fp32, quantized layers dequantized, full copies (modules_to_save) under
    their original names. Tensors keep their dtype; merged weights are fp32."""

    def visit(module: nn.Module, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
        if isinstance(module, LoraLayer):
            base = module.base_layer
            pending = (
                []
                if module.disabled
                else [n for n in module.active_adapters if n not in module.merged_adapters]
            )
            with torch.no_grad():
                w = module.merged_weight(pending)
            yield prefix + "weight", w.t() if backends.is_fan_in_fan_out(base) else w
            if getattr(base, "bias", None) is not None:
                yield prefix + "bias", base.bias.detach()
            return
        if isinstance(module, ParamLoraLayer):
            pending = [] if module.disabled else module.running()
            with torch.no_grad():
                merged = module.merged_parameters(pending)
            for n, t in compat.own_state(module.base_layer):
                yield prefix + n, merged.get(n, t).detach()
            for n, child in module.base_layer.named_children():
                yield from visit(child, prefix + n + ".")
            return
        if isinstance(module, ModulesToSave):
            yield from visit(module.current, prefix)
            return
        if backends.is_linear8bit(module) or backends.is_linear4bit(module):
            with torch.no_grad():
                dense = backends.dense_weight(module)
            yield prefix + "weight", dense
            if module.bias is not None:
                yield prefix + "bias", module.bias.detach()
            return
        for n, t in compat.own_state(module):
            yield prefix + n, t.detach()
        for n, child in module.named_children():
            yield from visit(child, prefix + n + ".")

    # no `torch.no_grad()` around the generator: it would stay on in the caller between yields
    yield from visit(model, "")


def _merged_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`merged_tensors` as a state dict, floating-point tensors cast to `dtype`."""
    return {k: t.to(dtype) if t.is_floating_point() else t for k, t in merged_tensors(model)}


def export_merged(
    lora_model: nn.Module,
    out_dir: str | os.PathLike,
    dtype: str | torch.dtype = "bfloat16",
    tokenizer=None,
) -> Path:
    """Write the LoRA model as a plain, unquantized transformers checkpoint (the recommended way
    to merge a QLoRA adapter): every 4/8-bit layer is dequantized, the active adapters are added
    in fp32, the result is cast to `dtype` ("bfloat16", "float16" or "float32") and saved with
    `save_pretrained` (plus `tokenizer`, if given). `AutoModelForCausalLM.from_pretrained(out_dir)`
    opens it. The LoRA model itself is left unchanged. The directory appears atomically.
    """
    torch_dtype = resolve_dtype(dtype)
    base = unwrapped(lora_model)
    state = _merged_state_dict(base, torch_dtype)
    config = compat.unquantized_config(base.config)
    with torch.device("meta"):  # no allocation, no random init: every tensor is assigned below
        plain = type(base)(config)
    plain.load_state_dict(state, strict=True, assign=True)
    out_emb, in_emb = plain.get_output_embeddings(), plain.get_input_embeddings()
    tied = getattr(config, "tie_word_embeddings", False)
    if tied and out_emb is not None and not torch.equal(out_emb.weight, in_emb.weight):
        config.tie_word_embeddings = False  # an adapted or trained lm_head no longer matches
    elif tied:
        plain.tie_weights()
    plain.to(torch_dtype)  # parameters already are; this also records the dtype in the config
    if getattr(base, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(base.generation_config)

    out = Path(out_dir)
    with atomic_directory(out) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out
