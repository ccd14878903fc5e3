"""Every causal-LM architecture the installed transformers ships, built tiny with random weights,
and what "all-linear" adapts on it: PEFT's saved keys next to lorakit's (or lorakit's refusal).

Shared by tests/test_every_architecture.py and scripts/architectures_table.py.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import logging
import re
import warnings
from dataclasses import dataclass, field

import peft
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from lorakit.errors import ConfigError
from lorakit.lora import LoraConfig, get_lora_model
from lorakit.lora.files import peft_parameters

MODEL_TYPES: list[str] = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
RANK = 4
N_LAYERS = 2
N_EXPERTS = 4
MAX_PARAMS = 30_000_000

# attribute -> tiny value, set wherever a config (or a nested config) has it as an int
SIZES: dict[str, int] = {
    **dict.fromkeys(
        [
            "num_hidden_layers",
            "n_layer",
            "num_layers",
            "n_layers",
            "decoder_layers",
            "encoder_layers",
            "num_decoder_layers",
        ],
        N_LAYERS,
    ),
    **dict.fromkeys(
        [
            "hidden_size",
            "n_embd",
            "d_model",
            "dim",
            "word_embed_proj_dim",
            "embedding_size",
            "d_embed",
        ],
        64,
    ),
    **dict.fromkeys(
        [
            "num_attention_heads",
            "n_head",
            "n_heads",
            "decoder_attention_heads",
            "encoder_attention_heads",
            "num_heads",
        ],
        4,
    ),
    **dict.fromkeys(
        ["num_key_value_heads", "n_kv_heads", "multi_query_group_num", "num_kv_heads"], 2
    ),
    **dict.fromkeys(
        ["head_dim", "d_head", "attention_head_size", "v_head_dim", "qk_nope_head_dim"], 16
    ),
    "qk_rope_head_dim": 8,
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    **dict.fromkeys(
        [
            "intermediate_size",
            "ffn_dim",
            "n_inner",
            "decoder_ffn_dim",
            "encoder_ffn_dim",
            "d_ff",
            "ffn_hidden_size",
            "d_inner",
        ],
        128,
    ),
    **dict.fromkeys(
        [
            "moe_intermediate_size",
            "expert_intermediate_size",
            "shared_expert_intermediate_size",
            "moe_ffn_hidden_size",
            "expert_hidden_size",
            "ffn_hidden_size_moe",
        ],
        32,
    ),
    **dict.fromkeys(
        [
            "num_experts",
            "num_local_experts",
            "n_routed_experts",
            "moe_num_experts",
            "num_routed_experts",
        ],
        N_EXPERTS,
    ),
    **dict.fromkeys(
        ["num_experts_per_tok", "top_k", "moe_topk", "moe_k", "num_experts_per_token", "moe_top_k"],
        2,
    ),
    **dict.fromkeys(["n_group", "topk_group", "num_expert_group", "n_shared_experts"], 1),
    "vocab_size": 128,
    **dict.fromkeys(
        ["max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length"], 128
    ),
    **dict.fromkeys(["sliding_window", "attention_window", "window_size"], 32),
}


@dataclass
class Row:
    """One architecture: whether it built, what PEFT and lorakit adapt, or why not."""

    model_type: str
    built: bool = False
    reason: str = ""  # why it was not built
    peft_keys: dict[str, tuple[int, ...]] | None = None
    peft_error: str = ""
    peft_counts: tuple[int, int, int] = (0, 0, 0)  # linear modules, expert parameters, routers
    lorakit_keys: dict[str, tuple[int, ...]] | None = None
    refused: str = ""  # the first line of lorakit's ConfigError
    crash: str = ""  # anything else lorakit raised (a failure)
    expert_params: list[str] = field(default_factory=list)  # ndim-3 non-conv base parameters


def first_line(exc: BaseException, width: int = 160) -> str:
    """`Type: first line of the message`, at most `width` characters."""
    text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return text if len(text) <= width else text[: width - 1] + "…"


FILL_NONE = {
    "head_dim": 16,
    "num_key_value_heads": 2,
    "n_routed_experts": N_EXPERTS,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
}
# model types whose sizes are tied in ways the generic shrink cannot see
EXTRA: dict[str, dict] = {
    "mamba2": {"num_heads": 8, "n_groups": 1},  # hidden_size * expand == num_heads * head_dim
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "reformer": {"axial_pos_embds_dim": [32, 32], "axial_pos_shape": [8, 16]},
    "prophetnet": {"num_encoder_layers": N_LAYERS, "num_decoder_layers": N_LAYERS},
}
LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def _get(config: PretrainedConfig, key: str) -> object:
    """`config.key`, or None where it is missing or may not be read globally (per-layer)."""
    try:
        return getattr(config, key, None)
    except Exception:  # noqa: BLE001 - transformers' per-layer attributes raise their own error
        return None


def _settable(config: PretrainedConfig, key: str) -> bool:
    return not isinstance(getattr(type(config), key, None), property)


def _per_layer(values: list, n: int) -> list:
    """`n` entries of a per-layer list that keep each kind it has (dense then sparse, ...)."""
    kinds = [v for i, v in enumerate(values) if v not in values[:i]]
    return (kinds + [values[-1]] * n)[:n] if len(kinds) <= n else values[:n]


def _shrink(config: PretrainedConfig) -> dict:
    """The tiny values for the attributes `config` has, nested configs as dicts of theirs."""
    out: dict = {}
    depth = next((v for k in LAYER_COUNTS if isinstance(v := _get(config, k), int)), None)
    for key, value in SIZES.items():
        current = _get(config, key)
        if not _settable(config, key) or isinstance(current, bool):
            continue
        if isinstance(current, int) and current > value:
            out[key] = value
        elif current is None and key in FILL_NONE and key in config.to_dict():
            out[key] = FILL_NONE[key]
        elif isinstance(current, list) and depth and len(current) == depth:
            out[key] = [value] * N_LAYERS
    if isinstance(_get(config, "first_k_dense_replace"), int) and config.first_k_dense_replace:
        out["first_k_dense_replace"] = 1
    if isinstance(_get(config, "kv_lora_rank"), int) and "num_attention_heads" in out:
        # latent attention (DeepSeek-V2/V3 and kin): a key/value head per query head, and the
        # rotary embedding sized by head_dim = the rotary part of a head
        out["num_key_value_heads"] = out["num_attention_heads"]
        out["head_dim"] = SIZES["qk_rope_head_dim"]
    if _get(config, "is_decoder") is False:
        out["is_decoder"] = True
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        current = _get(config, key)
        if isinstance(current, int) and current >= SIZES["vocab_size"]:
            out[key] = 0
    if depth and depth > N_LAYERS:
        for key, value in config.to_dict().items():
            if key not in out and isinstance(value, list) and len(value) == depth:
                out[key] = _per_layer(value, N_LAYERS)
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = _get(config, key)
        if isinstance(sub, PretrainedConfig):
            out[key] = {**sub.to_dict(), **_shrink(sub)}
    return out


def tiny_config(model_type: str) -> PretrainedConfig:
    """The architecture's default config with every known size made tiny: passed to the config
    class (which derives what depends on them), else set on the default config one by one."""
    default = AutoConfig.for_model(model_type)
    overrides = {**_shrink(default), **EXTRA.get(model_type, {})}
    try:
        return AutoConfig.for_model(model_type, **overrides)
    except Exception:  # noqa: BLE001 - some config classes refuse a kwarg their setter takes
        for key, value in overrides.items():
            if not isinstance(value, dict):
                with contextlib.suppress(Exception):
                    setattr(default, key, value)
        return default


@contextlib.contextmanager
def _quiet():
    """Silence transformers' and PEFT's warnings and prints while building and adapting."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@functools.lru_cache(maxsize=None)
def build(model_type: str) -> torch.nn.Module | str:
    """The tiny fp32 model (seed 0, eval mode), or a one-line reason it could not be built."""
    try:
        with _quiet():
            config = tiny_config(model_type)
            with torch.device("meta"):  # its size first: a config that did not shrink is a row
                size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
            if size > MAX_PARAMS:
                return f"does not shrink: {size / 1e6:.0f}M parameters at the tiny sizes"
            torch.manual_seed(0)
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    except Exception as exc:  # noqa: BLE001 - any reason transformers cannot build it is a row
        return first_line(exc)


def _is_conv(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.modules.conv._ConvNd)


def expert_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the base model's fused expert weights: 3-D parameters of a module whose path or
    class names experts (not RWKV's time mixing, XLNet's attention or Reformer's positions,
    which are 3-D too but not layers "all-linear" names)."""
    names = []
    for module_name, module in model.named_modules():
        if _is_conv(module):
            continue
        if "expert" not in f"{module_name}.{type(module).__name__}".lower():
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.ndim == 3:
                names.append(f"{module_name}.{pname}" if module_name else pname)
    return names


def _peft_counts(peft_model: peft.PeftModel) -> tuple[int, int, int]:
    """(linear modules, expert parameters, routers) that PEFT wrapped."""
    linear = experts = routers = 0
    for name, module in peft_model.get_base_model().named_modules():
        if not isinstance(module, peft.tuners.lora.LoraLayer):
            continue
        if type(module).__name__ == "ParamWrapper":
            experts += 1
        elif re.search(r"(router|\.gate)$", name) and getattr(module, "out_features", 0) in (
            N_EXPERTS,
        ):
            routers += 1
        else:
            linear += 1
    return linear, experts, routers


def _shapes(params: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in params.items()}


@functools.lru_cache(maxsize=None)
def run(model_type: str) -> Row:
    """Build the architecture and adapt "all-linear" with PEFT and with lorakit."""
    row = Row(model_type)
    model = build(model_type)
    if isinstance(model, str):
        row.reason = model
        return row
    row.built = True
    row.expert_params = expert_parameters(model)
    try:
        with _quiet():
            theirs = peft.get_peft_model(
                copy.deepcopy(model), peft.LoraConfig(target_modules="all-linear", r=RANK)
            )
        row.peft_keys = _shapes(peft.get_peft_model_state_dict(theirs))
        row.peft_counts = _peft_counts(theirs)
        del theirs
    except Exception as exc:  # noqa: BLE001 - PEFT's own failure is recorded, not ours
        row.peft_error = first_line(exc)
    try:
        with _quiet():
            ours = get_lora_model(
                copy.deepcopy(model), LoraConfig(target_modules="all-linear", r=RANK)
            )
        row.lorakit_keys = _shapes(peft_parameters(ours, "default"))
    except ConfigError as exc:
        row.refused = first_line(exc)
    except Exception as exc:  # noqa: BLE001 - a crash is recorded and fails the test
        import traceback

        row.crash = "".join(traceback.format_exception(exc)[-3:])
    return row


# --- explicit target_parameters on transformers-described experts -------------------------

FLAGS = ("is_transposed", "has_gate", "has_bias", "is_concatenated", "has_post_expert_norm")
# Types built on transformers 5.24 whose experts modules carry `is_transposed` (measured):
# tests/test_every_architecture.py checks this list against the models as built.
EXPERT_TYPES: list[str] = (
    "afmoe aria_text axk1 axk2 bailing_hybrid beam cohere2_moe deepseek_v2 deepseek_v3 "
    "deepseek_v32 deepseek_v4 dots1 dots3_note_text ernie4_5_moe exaone_moe flex_olmo glm4_moe "
    "glm4_moe_lite glm_moe_dsa gpt_oss granitemoe granitemoe_swa granitemoehybrid "
    "granitemoeshared hunyuan_v1_moe hy_v3 hy_v4 inkling2_loop_text inkling2_text inkling_text "
    "jamba kimi_linear kolibri1 laguna lara_mini mellum mimo_v2_flash minimax minimax_m2 "
    "minimax_m3_vl_text mixtral nemotron_h olmoe phimoe qwen2_moe qwen3_5_moe qwen3_5_moe_text "
    "qwen3_moe qwen3_next sarvam_mla sarvam_moe solar_open zaya"
).split()


def described_experts(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Modules (by name) whose fused 3-D expert weights transformers describes (`is_transposed`)."""
    return {
        name: module
        for name, module in model.named_modules()
        if hasattr(module, "is_transposed")
        and any(p.ndim == 3 for p in module.parameters(recurse=False))
    }


def expert_targets(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters): one attention projection ("q_proj") where the model
    has one, and the described experts' 3-D parameters named "<experts module>.<parameter>"
    ("experts.down_proj": a bare "down_proj" would also name InklingSharedExperts' weights,
    whose layout transformers does not describe and lorakit refuses)."""
    leaves = {
        f"{name.rsplit('.', 1)[-1]}.{pname}"
        for name, module in described_experts(model).items()
        for pname, p in module.named_parameters(recurse=False)
        if p.ndim == 3
    }
    has_q = any(
        name.rsplit(".", 1)[-1] == "q_proj" and isinstance(m, torch.nn.Linear)
        for name, m in model.named_modules()
    )
    return (["q_proj"] if has_q else []), sorted(leaves)


@dataclass
class ExpertRow:
    """One experts architecture with explicit target_parameters: PEFT's adapter in lorakit."""

    model_type: str
    experts_class: str = ""
    flags: dict[str, object] = field(default_factory=dict)
    expert_modules: list[str] = field(default_factory=list)  # described experts modules' names
    target_modules: list[str] = field(default_factory=list)
    target_parameters: list[str] = field(default_factory=list)
    not_run: str = ""  # the base model itself cannot build or run a forward
    peft_error: str = ""  # PEFT refuses the config (or cannot run its adapted model)
    crash: str = ""  # lorakit raised: the traceback's last 6 lines
    peft_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    lorakit_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    logit_diff: float = float("nan")  # max |lorakit - PEFT|
    base_diff: float = float("nan")  # max |PEFT - base|: the adapter does something
    grad_mismatch: list[str] = field(default_factory=list)  # keys whose gradients differ


def peft_trainable(model: peft.PeftModel) -> dict[str, torch.nn.Parameter]:
    """PEFT's saved key -> its live trainable parameter (as tests/test_moe.py's peft_keys)."""
    return {
        "base_model.model." + n.removeprefix("base_model.model.").replace(".default", ""): p
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def copy_adapter(
    theirs: dict[str, torch.nn.Parameter], mine: dict[str, torch.nn.Parameter]
) -> None:
    """PEFT's adapter tensors into lorakit's parameters, key by key (the mutation point)."""
    with torch.no_grad():
        for key, p in theirs.items():
            if key in mine and mine[key].shape == p.shape:
                mine[key].copy_(p)


def _tail(exc: BaseException, lines: int = 6) -> str:
    import traceback

    return "\n".join("".join(traceback.format_exception(exc)).strip().splitlines()[-lines:])


def _loss_grads(model: torch.nn.Module, x: torch.Tensor, params: dict) -> dict:
    model.zero_grad(set_to_none=True)
    model(input_ids=x, labels=x, use_cache=False).loss.backward()
    return {k: None if p.grad is None else p.grad.detach().clone() for k, p in params.items()}


@functools.lru_cache(maxsize=None)
def run_explicit(model_type: str) -> ExpertRow:
    """PEFT (init_lora_weights=False, seed 1) and lorakit with the same explicit targets; PEFT's
    adapter copied into lorakit; logits (and their distance from the base) and gradients."""
    row = ExpertRow(model_type)
    model = build(model_type)
    if isinstance(model, str):
        row.not_run = model
        return row
    experts = described_experts(model)
    row.expert_modules = list(experts)
    if experts:
        module = next(iter(experts.values()))
        row.experts_class = type(module).__name__
        row.flags = {f: getattr(module, f, None) for f in FLAGS}
    row.target_modules, row.target_parameters = expert_targets(model)
    vocab = model.get_input_embeddings().num_embeddings
    x = torch.randint(0, min(vocab, 128), (2, 9), generator=torch.Generator().manual_seed(0))
    try:
        with _quiet(), torch.no_grad():
            base_logits = model.eval()(input_ids=x, use_cache=False).logits
    except Exception as exc:  # noqa: BLE001 - the base model itself does not run: a row
        row.not_run = first_line(exc)
        return row
    kwargs = dict(r=RANK, lora_alpha=2 * RANK, target_modules=row.target_modules)
    try:
        with _quiet():
            torch.manual_seed(1)
            theirs = peft.get_peft_model(
                copy.deepcopy(model),
                peft.LoraConfig(
                    init_lora_weights=False,
                    target_parameters=list(row.target_parameters),
                    **copy.deepcopy(kwargs),
                ),
            ).eval()
            theirs_params = peft_trainable(theirs)
            with torch.no_grad():
                theirs_logits = theirs(input_ids=x, use_cache=False).logits
            theirs_grads = _loss_grads(theirs, x, theirs_params)
    except Exception as exc:  # noqa: BLE001 - PEFT's refusal is recorded, not ours
        row.peft_error = first_line(exc)
        return row
    row.peft_shapes = _shapes(theirs_params)
    row.base_diff = (theirs_logits - base_logits).abs().max().item()
    try:
        with _quiet():
            ours = get_lora_model(
                copy.deepcopy(model),
                LoraConfig(target_parameters=list(row.target_parameters), **kwargs),
            ).eval()
            mine = peft_parameters(ours, "default")
            row.lorakit_shapes = _shapes(mine)
            copy_adapter(theirs_params, mine)
            with torch.no_grad():
                ours_logits = ours(input_ids=x, use_cache=False).logits
            ours_grads = _loss_grads(ours, x, mine)
    except Exception as exc:  # noqa: BLE001 - anything lorakit raises here is a failure
        row.crash = _tail(exc)
        return row
    row.logit_diff = (ours_logits - theirs_logits).abs().max().item()
    for key, g in theirs_grads.items():
        o = ours_grads.get(key)
        if g is None or o is None or o.shape != g.shape:
            if not (g is None and o is None):
                row.grad_mismatch.append(key)
        elif not torch.allclose(o, g, rtol=1e-3, atol=1e-5):
            row.grad_mismatch.append(key)
    return row


def explicit_status(row: ExpertRow) -> str:
    """`not run` / `PEFT refuses` / `same as PEFT` / `differs` / `crashes`."""
    if row.not_run:
        return "not run"
    if row.peft_error:
        return "PEFT refuses"
    if row.crash:
        return "crashes"
    same = (
        row.lorakit_shapes == row.peft_shapes
        and row.logit_diff <= 1e-4
        and row.base_diff > 1e-4
        and not row.grad_mismatch
    )
    return "same as PEFT" if same else "differs"
