"""GGUF export for llama.cpp, Ollama and LM Studio, written with the `gguf` package.

- `export_gguf`: the merged model (adapters folded in fp32, 4/8-bit bases dequantized, as
  `export_merged` does) as one GGUF file with llama.cpp's architecture keys, tensor names and
  layout, and the tokenizer.
- `export_gguf_lora`: one adapter alone in llama.cpp's LoRA-adapter GGUF (`llama-server --lora`,
  Ollama's `ADAPTER`), refused before anything is written where llama.cpp could not load it.

Tensors keep transformers' [out, in] layout (GGUF lists dimensions innermost first, so the
file says [in, out], as llama.cpp expects); only q/k rows are reordered for llama.cpp's llama
graph (`gguf_meta.permute_rows`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from lorakit.atomic import atomic_file
from lorakit.errors import ConfigError
from lorakit.lora.export import merged_tensors, unwrapped
from lorakit.lora.gguf_meta import (
    Architecture,
    architecture_of,
    permute_rows,
    rope_factors,
    write_hparams,
    write_tokenizer,
)
from lorakit.lora.layer import LoraLayer
from lorakit.lora.params import ParamLoraLayer

Q = gguf.GGMLQuantizationType
# --outtype -> (general.file_type, the type of 2-D weights)
OUTTYPES: dict[str, tuple[gguf.LlamaFileType, Q]] = {
    "f32": (gguf.LlamaFileType.ALL_F32, Q.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, Q.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, Q.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
    "q4_0": (gguf.LlamaFileType.MOSTLY_Q4_0, Q.Q4_0),
}
ADAPTER_OUTTYPES = ("f32", "f16", "bf16")
# types only llama.cpp's own `llama-quantize` makes (k-quants need its search for scales;
# i-quants an importance matrix); named here so the refusal can say so
LLAMA_QUANTIZE_TYPES = (
    "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m",
    "q5_k_s", "q5_k_m", "q6_k", "iq2_xxs", "iq2_xs", "iq3_xxs", "iq3_s", "iq4_nl", "iq4_xs",
)  # fmt: skip


def check_outtype(outtype: str, adapter: bool = False) -> str:
    """`outtype` lower-cased, or a ConfigError that names the types lorakit writes."""
    kind = outtype.lower()
    allowed = ADAPTER_OUTTYPES if adapter else tuple(OUTTYPES)
    if kind in allowed:
        return kind
    hint = ""
    if kind in LLAMA_QUANTIZE_TYPES and not adapter:
        hint = (
            f"; {kind} needs llama.cpp's compiled `llama-quantize`: export f16 and run "
            f"`llama-quantize model-f16.gguf model-{kind}.gguf {kind.upper()}`"
        )
    what = "a LoRA adapter GGUF" if adapter else "a GGUF model"
    raise ConfigError(f"--outtype {outtype!r}: {what} is written as {', '.join(allowed)}{hint}")


def _encode(name: str, array: np.ndarray, want: Q) -> tuple[np.ndarray, Q]:
    """(data, type) of one tensor as llama.cpp's converter stores it: 1-D tensors (norms,
    biases) and MoE routers in F32; with q4_0 the embeddings and output head in Q8_0 (their
    error weighs most, `llama-quantize` keeps them wider too); rows that are not whole
    quantization blocks in F16."""
    if array.ndim == 1 or ".ffn_gate_inp." in name:
        want = Q.F32
    elif want == Q.Q4_0 and name in ("token_embd.weight", "output.weight"):
        want = Q.Q8_0
    if want in (Q.Q8_0, Q.Q4_0) and array.shape[-1] % gguf.GGML_QUANT_SIZES[want][0]:
        want = Q.F16
    if want == Q.F32:
        return np.ascontiguousarray(array, dtype=np.float32), want
    if want == Q.F16:
        return array.astype(np.float16), want
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), want), want


def _tensor_name(key: str, tensor_map: gguf.TensorNameMap) -> str:
    name = tensor_map.get_name(key, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ConfigError(f"GGUF export has no llama.cpp name for the tensor {key!r}")
    # fused expert parameters have no ".weight" suffix in transformers; llama.cpp's do
    return name if name.endswith((".weight", ".bias")) else name + ".weight"


def _gguf_tensors(
    key: str, array: np.ndarray, config: Any, arch: Architecture, tensor_map: gguf.TensorNameMap
) -> Iterator[tuple[str, np.ndarray]]:
    """llama.cpp's tensors for one transformers tensor: renamed, q/k rows permuted for the llama
    graph, fused gate_up experts split into llama.cpp's separate gate and up tensors."""
    if key.endswith(".mlp.experts.gate_up_proj"):
        block = key.split(".")[2]
        gate, up = np.split(array, 2, axis=1)  # [experts, 2·ff, hidden]: gate rows first
        yield f"blk.{block}.ffn_gate_exps.weight", gate
        yield f"blk.{block}.ffn_up_exps.weight", up
        return
    name = _tensor_name(key, tensor_map)
    if arch.permute_qk and ".attn_q." in name:
        array = permute_rows(array, config.num_attention_heads)
    elif arch.permute_qk and ".attn_k." in name:
        array = permute_rows(array, config.num_key_value_heads)
    yield name, array


def _model_tensors(model: nn.Module, config: Any, arch: Architecture):
    """(name, fp32 array) of the merged model in llama.cpp's names; a tied output head is
    left out (llama.cpp reuses token_embd), unless an adapter made it differ."""
    tensor_map = gguf.get_tensor_name_map(arch.arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    embedding = None
    for key, tensor in merged_tensors(model):
        array = tensor.detach().to(torch.float32).cpu().numpy()
        if key.endswith("embed_tokens.weight"):
            embedding = array
        if key == "lm_head.weight" and tied and np.array_equal(array, embedding):
            continue
        yield from _gguf_tensors(key, array, config, arch, tensor_map)
    factors = rope_factors(model)
    if factors is not None:
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors


def export_gguf(
    lora_model: nn.Module,
    path: str | os.PathLike,
    tokenizer: Any,
    outtype: str = "f16",
    name: str | None = None,
) -> Path:
    """Write the LoRA model (its active adapters merged; a bare transformers model works too)
    as one GGUF model file at `path`, atomically. Returns the path."""
    kind = check_outtype(outtype)
    base = unwrapped(lora_model)
    config = base.config
    arch = architecture_of(config)
    file_type, want = OUTTYPES[kind]
    path = Path(path)
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch.name)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or path.stem)
        write_hparams(writer, config, arch)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_tokenizer(writer, tokenizer, config.vocab_size)
        for tensor_name, array in _model_tensors(base, config, arch):
            data, qtype = _encode(tensor_name, array, want)
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        _finish(writer)
    return path


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ------------------------------------------------------------------------------- LoRA adapter


def check_llama_cpp_adapter(lora_model: nn.Module, adapter: str) -> None:
    """Refuse, naming the reason, an adapter llama.cpp's LoRA GGUF cannot carry: llama.cpp adds
    s · B·A to matrix products and nothing else."""
    config = lora_model.peft_config[adapter]
    base = lora_model.model
    why = []
    if config.modules_to_save:
        why.append(
            f"it trains full copies of {config.modules_to_save} (modules_to_save), which a "
            f"llama.cpp adapter cannot replace"
        )
    if config.use_dora:
        why.append("it is a DoRA adapter; llama.cpp applies no DoRA magnitudes")
    if config.bias != "none":
        why.append(f"it trains the base biases (bias={config.bias!r})")
    for module_name, layer in base.named_modules():
        if isinstance(layer, ParamLoraLayer) and adapter in layer.adapters:
            why.append(f"it adapts the fused expert parameters of {module_name}")
            break
        if isinstance(layer, LoraLayer) and adapter in layer.adapters:
            if _is_tied_head(base, layer.base_layer):
                why.append(f"it adapts {module_name}, which the base ties to its embeddings")
    if why:
        raise ConfigError(
            f"adapter {adapter!r} cannot be written as a llama.cpp LoRA GGUF: "
            + "; ".join(why)
            + ". Export the merged model instead (--format gguf)."
        )


def _is_tied_head(model: nn.Module, layer: nn.Module) -> bool:
    """llama.cpp has no output tensor for a head tied to the embeddings, nothing to adapt."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    return bool(tied) and getattr(layer, "weight", None) is model.get_input_embeddings().weight


def _adapter_tensors(lora_model: nn.Module, adapter: str, alpha: float, arch: Architecture):
    """(name, array) pairs `<base tensor>.lora_a` [r, in] and `.lora_b` [out, r]. llama.cpp
    scales every pair by alpha / r with one alpha per file, so a layer whose scale differs
    (rsLoRA, rank_pattern, alpha_pattern) has its own scale folded into B."""
    base = lora_model.model
    config = base.config
    tensor_map = gguf.get_tensor_name_map(arch.arch, config.num_hidden_layers)
    for module_name, layer in base.named_modules():
        if not (isinstance(layer, LoraLayer) and adapter in layer.adapters):
            continue
        parts = layer.adapters[adapter]
        a = parts.lora_A.detach().to(torch.float32).cpu().numpy()
        b = parts.lora_B.detach().to(torch.float32).cpu().numpy()
        fold = parts.scaling * parts.r / alpha
        if fold != 1.0:
            b = b * np.float32(fold)
        [(name, b)] = _gguf_tensors(module_name + ".weight", b, config, arch, tensor_map)
        yield name + ".lora_a", a
        yield name + ".lora_b", b


def export_gguf_lora(
    lora_model: nn.Module, path: str | os.PathLike, adapter: str | None = None, outtype="f32"
) -> Path:
    """Write adapter `adapter` (default: the active one) of a LoRA model as a llama.cpp LoRA
    GGUF at `path`, atomically, after `check_llama_cpp_adapter`. Returns the path."""
    kind = check_outtype(outtype, adapter=True)
    adapter = adapter or lora_model.active_adapter
    arch = architecture_of(lora_model.model.config)
    check_llama_cpp_adapter(lora_model, adapter)
    alpha = float(lora_model.peft_config[adapter].lora_alpha)
    want = OUTTYPES[kind][1]
    path = Path(path)
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch.name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(path.stem)
        writer.add_file_type(OUTTYPES[kind][0])
        for name, array in _adapter_tensors(lora_model, adapter, alpha, arch):
            data, qtype = _encode(name, array, want)
            writer.add_tensor(name, data, raw_dtype=qtype)
        _finish(writer)
    return path
