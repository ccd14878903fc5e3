"""QLoRA plumbing around bitsandbytes: quantize a model in memory and prepare it for training.
(Reading quantized weights back, merged exports and dequantization live in lorakit.lora.)

We never write a 4-bit format of our own: every quantized layer is a bitsandbytes `Linear4bit`
(NF4/FP4, double quantization, blocksize 64) or `Linear8bitLt`, the same layers transformers'
`BitsAndBytesConfig` builds, so adapters move freely between lorakit and PEFT.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lorakit import compat
from lorakit.base.modules import name_matches
from lorakit.log import get_logger

log = get_logger(__name__)

QUANT_TYPES = ("nf4", "fp4", "int8")  # the quantization names lorakit takes, everywhere


def quantize_model(
    model: nn.Module,
    quant_type: str = "nf4",
    compute_dtype: torch.dtype | None = None,
    skip: Iterable[str] = ("lm_head",),
    *,
    double_quant: bool = True,
    blocksize: int = 64,
    quant_storage: torch.dtype = torch.uint8,
    int8_threshold: float = 6.0,
) -> nn.Module:
    """Replace the model's `nn.Linear` layers by bitsandbytes quantized layers, in place.

    quant_type: "nf4" / "fp4" -> `Linear4bit` (double quantization unless `double_quant=False`),
        "int8" -> `Linear8bitLt` (LLM.int8() with outlier `int8_threshold`, as transformers).
    compute_dtype: dtype 4-bit layers compute in; default: each layer's current weight dtype.
    skip: module names (full, or a trailing dotted part) left as they are. The output embedding
        (lm_head) is always skipped, like any layer sharing its weight with the input embedding.
    Each layer is quantized on the device its weight is on; embeddings and norms are untouched.
    For checkpoints on disk, `load_model(..., quantization=...)` quantizes while loading instead.
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant_type {quant_type!r}; use one of {', '.join(QUANT_TYPES)}")
    compat.bitsandbytes()  # not installed: the error now, whatever the model holds
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    keep: set[int] = set()
    for getter in ("get_output_embeddings", "get_input_embeddings"):
        emb = getattr(model, getter, lambda: None)()
        if emb is not None and getattr(emb, "weight", None) is not None:
            keep.add(id(emb.weight))
    # adapter wrappers (lorakit's and PEFT's) keep the layer they wrap as `<name>.base_layer`
    if any(n == "base_layer" or n.endswith(".base_layer") for n, _ in model.named_modules()):
        raise ValueError("quantize the base model before adding LoRA adapters")
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear]  # not subclasses
    for name in names:
        old = model.get_submodule(name)
        if name_matches(name, skip) or id(old.weight) in keep:
            continue
        if quant_type == "int8":
            new = _int8_layer(old, int8_threshold)
        else:
            new = _4bit_layer(
                old, quant_type, compute_dtype, double_quant, blocksize, quant_storage
            )
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.data, requires_grad=False)
        new.train(old.training)
        model.set_submodule(name, new)
    report_unquantized_experts(model)
    return model


def report_unquantized_experts(model: nn.Module) -> None:
    """Say which weights stay unquantized in a quantized model: Mixture-of-Experts weights fused
    into 3-D parameters (transformers 5), which bitsandbytes cannot hold (it quantizes linear
    layers). They keep the model's dtype, and usually most of its memory."""
    experts = [
        (n, p)
        for n, p in model.named_parameters()
        if p.ndim == 3 and not isinstance(p, compat.bitsandbytes().nn.Params4bit)
    ]
    if experts:
        size = sum(p.numel() * p.element_size() for _, p in experts)
        names = ", ".join(n for n, _ in experts[:2]) + (", ..." if len(experts) > 2 else "")
        log.info(
            f"bitsandbytes quantizes linear layers only: {len(experts)} Mixture-of-Experts "
            f"weights ({names}; {size / 2**20:,.1f} MiB) stay in {experts[0][1].dtype}"
        )


def _int8_layer(old: nn.Linear, threshold: float) -> nn.Module:
    """LLM.int8() `Linear8bitLt` holding `old`'s weight (without its bias)."""
    bnb = compat.bitsandbytes()
    new = bnb.nn.Linear8bitLt(
        old.in_features,
        old.out_features,
        bias=old.bias is not None,
        has_fp16_weights=False,
        threshold=threshold,
        device="meta",
    )
    # Int8Params quantizes when it moves off the CPU-resident float weight
    new.weight = bnb.nn.Int8Params(
        old.weight.data.cpu(), requires_grad=False, has_fp16_weights=False
    ).to(old.weight.device)
    return new


def _4bit_layer(
    old: nn.Linear,
    quant_type: str,
    compute_dtype: torch.dtype | None,
    double_quant: bool,
    blocksize: int,
    quant_storage: torch.dtype,
) -> nn.Module:
    """`Linear4bit` holding `old`'s weight (without its bias), on the regular layout."""
    bnb = compat.bitsandbytes()
    new = bnb.nn.Linear4bit(
        old.in_features,
        old.out_features,
        bias=old.bias is not None,
        compute_dtype=compute_dtype or old.weight.dtype,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=quant_storage,
        device="meta",
    )
    params = bnb.nn.Params4bit(
        old.weight.data,
        requires_grad=False,
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=quant_storage,
        module=new,
    )
    new.weight = compat.quantize_params4bit(params, old.weight.device)
    compat.keep_regular_layout(new)
    return new


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> bitsandbytes quantized linear layer (4-bit or 8-bit)."""
    bnb = compat.bitsandbytes()
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    }


def quantized_storage_bits(model: nn.Module) -> tuple[int, int]:
    """(bits stored, weights represented) over the 4-bit layers: packed weights, absmax, nested
    absmax statistics, code tables and offsets; bits / weights is the cost per parameter."""
    bnb = compat.bitsandbytes()
    bits = params = 0
    seen: set[tuple[str, int]] = set()  # code tables may be shared between layers: count once

    def add(t):
        nonlocal bits
        if isinstance(t, torch.Tensor):
            key = (str(t.device), t.data_ptr())
            if key not in seen:
                seen.add(key)
                bits += t.numel() * t.element_size() * 8

    for m in model.modules():
        if not isinstance(m, bnb.nn.Linear4bit):
            continue
        qs = m.weight.quant_state
        params += m.in_features * m.out_features
        add(m.weight.data)
        for t in (qs.absmax, qs.code, qs.offset):
            add(t)
        if qs.state2 is not None:
            for t in (qs.state2.absmax, qs.state2.code):
                add(t)
    return bits, params


# --------------------------------------------------------------------------------- k-bit training


def enable_checkpointing(model: nn.Module, checkpoint_kwargs: dict | None = None) -> None:
    """Activation (gradient) checkpointing of every decoder layer, non-reentrant by default.
    transformers >= 5.2x names it `activation_checkpointing_enable` (the old name goes in v6)."""
    kwargs = {"use_reentrant": False, **(checkpoint_kwargs or {})}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def prepare_for_kbit_training(
    model: nn.Module,
    gradient_checkpointing: bool = False,
    gradient_checkpointing_kwargs: dict | None = None,
) -> nn.Module:
    """Ready a (quantized) base model for adapter training, in place.

    Freezes every base parameter; with `gradient_checkpointing`, enables it (non-reentrant
    unless told otherwise), makes the input embeddings' output require grad (so checkpointed
    blocks always see a graph) and turns the KV cache off.

    Unlike PEFT's `prepare_model_for_kbit_training`, it does not cast every non-quantized
    parameter to fp32: embeddings, lm_head and norms are frozen, the adapters (fp32 in lorakit's
    LoRA layers) are what learns, and the upcast costs memory (+57 MiB of embeddings on
    SmolLM2-135M, GiBs on 7B+ models with large vocabularies). Norms stay in the base dtype:
    Llama-style RMSNorm already computes its statistics in fp32, and upcasting norm weights
    alone would hand fp32 activations to bf16 layers (a dtype error at lm_head).
    Measured on SmolLM2-135M NF4, one LoRA step on a chat sample against an all-fp32 reference:
    a bf16 base gives loss +0.040, LoRA-gradient relative error 14% (cosine 0.991); PEFT's
    layout (fp32 non-quantized, bf16 compute) +0.012 and 3%. The gap is the bf16 residual
    stream, the usual bf16-training noise, not the norms; who wants it closed loads the base
    with `load_model(..., dtype="float32", compute_dtype="bfloat16", quantization="nf4")`.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        enable_checkpointing(model, gradient_checkpointing_kwargs)
        model.enable_input_require_grads()
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
    return model


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict | None = None,
) -> nn.Module:
    """PEFT's signature and defaults (gradient checkpointing on) for `prepare_for_kbit_training`,
    so a PEFT script runs with only its import changed."""
    return prepare_for_kbit_training(
        model, use_gradient_checkpointing, gradient_checkpointing_kwargs
    )
