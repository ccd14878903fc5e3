"""What a GGUF file says besides its tensors: llama.cpp's architecture keys and tokenizer.

The facts here are llama.cpp's conventions (its `convert_hf_to_gguf.py` and `llama-vocab.cpp`):
which transformers model types map to which llama.cpp architecture, which hyperparameter keys
each architecture reads, how a Hugging Face tokenizer becomes `tokenizer.ggml.*` arrays, and
which pre-tokenizer name selects the splitting regex the HF tokenizer uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from lorakit.errors import ConfigError
from lorakit.log import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class Architecture:
    """A llama.cpp architecture lorakit writes."""

    arch: gguf.MODEL_ARCH
    # llama.cpp's "llama" graph applies RoPE to interleaved pairs, transformers to two halves:
    # its converter permutes the rows of q_proj / k_proj (and of a LoRA B on them) to match
    permute_qk: bool = False
    moe: bool = False
    experts: str = "num_experts"  # the config's name for the number of experts
    # the config's name for one expert's width, where it is not `intermediate_size`
    expert_width: str | None = "moe_intermediate_size"
    # RoPE types whose frequencies llama.cpp's graph takes as `rope_freqs` divisors
    rope_types: tuple[str, ...] = ("default",)

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


_SCALED = ("default", "linear", "llama3")  # static frequencies, no attention scaling
# transformers model_type -> llama.cpp architecture (Mistral runs on llama.cpp's llama graph)
ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(gguf.MODEL_ARCH.LLAMA, permute_qk=True, rope_types=_SCALED),
    "mistral": Architecture(gguf.MODEL_ARCH.LLAMA, permute_qk=True, rope_types=_SCALED),
    "qwen2": Architecture(gguf.MODEL_ARCH.QWEN2),
    "qwen3": Architecture(gguf.MODEL_ARCH.QWEN3),
    "qwen3_moe": Architecture(gguf.MODEL_ARCH.QWEN3MOE, moe=True),
    "mixtral": Architecture(
        gguf.MODEL_ARCH.LLAMA,
        permute_qk=True,
        moe=True,
        experts="num_local_experts",
        expert_width=None,
        rope_types=_SCALED,
    ),
}


def architecture_of(config: Any) -> Architecture:
    """The llama.cpp architecture of a transformers config, or a ConfigError naming those
    lorakit writes."""
    found = ARCHITECTURES.get(getattr(config, "model_type", None))
    if found is None:
        raise ConfigError(
            f"GGUF export supports the model types {', '.join(sorted(ARCHITECTURES))}; this "
            f"model is {config.model_type!r} (llama.cpp's convert_hf_to_gguf.py may convert "
            f"the merged directory that `lorakit merge` writes)"
        )
    rope = rope_type(config)
    if rope not in found.rope_types:
        raise ConfigError(
            f"GGUF export of {config.model_type!r} models takes RoPE types "
            f"{', '.join(found.rope_types)}; this model uses {rope!r}"
        )
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        log.warning(
            f"llama.cpp's {found.name} graph attends to the whole context; this model looks "
            f"back {window} tokens only, so its GGUF answers differently past {window} tokens"
        )
    if found.moe and not getattr(config, "norm_topk_prob", True):
        raise ConfigError(
            "llama.cpp's MoE graphs renormalize the chosen experts' routing weights; "
            "this model does not (norm_topk_prob=False), so its GGUF would compute otherwise"
        )
    return found


def rope_type(config: Any) -> str:
    return (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")


def rope_factors(model: Any) -> np.ndarray | None:
    """llama.cpp's `rope_freqs`: per rotary pair, what its graph divides the unscaled frequency
    base^(-2i/d) by, read off the frequencies the model itself computes with (linear: the
    factor everywhere; llama3: 1 for fast pairs, the factor for slow ones, smooth between).
    None for unscaled RoPE."""
    config = model.config
    if rope_type(config) == "default":
        return None
    rotary = next(m for m in model.modules() if hasattr(m, "inv_freq"))
    dim = head_dim(config)
    unscaled = float(config.rope_parameters["rope_theta"]) ** (
        -np.arange(0, dim, 2, dtype=np.float64) / dim
    )
    return (unscaled / rotary.inv_freq.double().cpu().numpy()).astype(np.float32)


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def permute_rows(w, n_head: int):
    """llama.cpp's row order for q/k projections (rotary pairs interleaved); `w` is a numpy or
    torch array whose first axis is n_head · head_dim."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_hparams(writer: gguf.GGUFWriter, config: Any, arch: Architecture) -> None:
    """The `<arch>.*` keys llama.cpp reads for the architectures in ARCHITECTURES."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    dim = head_dim(config)
    writer.add_rope_dimension_count(dim)
    if dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    writer.add_feed_forward_length(config.intermediate_size)
    if arch.moe:
        writer.add_expert_count(getattr(config, arch.experts))
        writer.add_expert_used_count(config.num_experts_per_tok)
        if arch.expert_width is not None:
            writer.add_expert_feed_forward_length(getattr(config, arch.expert_width))


# ---------------------------------------------------------------------------------- tokenizer

# The splitting regexes of Hugging Face tokenizers that llama.cpp knows under a name.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer.json: the name whose
    regexes split text as the tokenizer's pre-tokenizer does."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    shape = tuple(_step_shape(s) for s in steps)
    names = {
        (("ByteLevel", True),): "gpt-2",
        (("Digits", True), ("ByteLevel", True)): "smollm",
        (("Split", _LLAMA3_REGEX), ("ByteLevel", False)): "llama-bpe",
        (("Split", _QWEN2_REGEX), ("ByteLevel", False)): "qwen2",
    }
    if shape not in names:
        raise ConfigError(
            f"the tokenizer splits text with {json.dumps(pre)[:300]}, which lorakit does not "
            f"know a llama.cpp pre-tokenizer for (it knows those of GPT-2, SmolLM, Llama 3 and "
            f"Qwen2); llama.cpp would tokenize differently from the model's training"
        )
    return names[shape]


def _step_shape(step: dict[str, Any]) -> tuple[str, Any]:
    kind = step.get("type")
    if kind == "ByteLevel":
        return kind, step.get("use_regex", True)
    if kind == "Digits":
        return kind, step.get("individual_digits", False)
    if kind == "Split":
        return kind, (step.get("pattern") or {}).get("Regex")
    return kind, None


def write_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int) -> None:
    """`tokenizer.ggml.*` and `tokenizer.chat_template` for a byte-level BPE tokenizer: the
    vocabulary padded to the model's `vocab_size` (llama.cpp needs one entry per embedding
    row), token types, merges, special token ids and whether BOS / EOS are added."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ConfigError(
            "GGUF export writes byte-level BPE tokenizers (Llama 3, SmolLM, Qwen, GPT-2 "
            "style); this tokenizer is a SentencePiece-style one, which llama.cpp's "
            "convert_hf_to_gguf.py converts from the merged directory `lorakit merge` writes"
        )
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec))
    tokens, types = vocabulary(tokenizer, vocab_size)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = model.get("merges") or []
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for key, value in _special_ids(tokenizer).items():
        writer.add_uint32(f"tokenizer.ggml.{key}", value)
    add_bos, add_eos = _adds_bos_eos(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    writer.add_add_space_prefix(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def vocabulary(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings by id and their llama.cpp types: special added tokens are CONTROL, other
    added tokens USER_DEFINED, ids without a token (padded embedding rows) UNUSED."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ConfigError(
            f"the tokenizer has ids up to {max(by_id)} but the model only {vocab_size} "
            f"embedding rows"
        )
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(
                gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
            )
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _special_ids(tokenizer: Any) -> dict[str, int]:
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "unknown_token_id": tokenizer.unk_token_id,
        "padding_token_id": tokenizer.pad_token_id,
    }
    return {k: int(v) for k, v in ids.items() if v is not None}


def _adds_bos_eos(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding a text adds BOS / EOS, read from what the tokenizer does."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    extra = len(with_special) - len(bare)
    add_bos = extra > 0 and with_special[0] == tokenizer.bos_token_id
    add_eos = extra > 0 and with_special[-1] == tokenizer.eos_token_id
    return bool(add_bos), bool(add_eos)
