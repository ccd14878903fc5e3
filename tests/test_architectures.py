"""""all-linear" across the architectures people fine-tune: on dense models lorakit adapts exactly
PEFT's modules; on the Mixture-of-Experts families PEFT converts, whose experts and routers are
not linear layers in transformers 5, it adapts them as PEFT's target_parameters too."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers as T
from peft import get_peft_model_state_dict

from lorakit import LoraConfig, get_lora_model
from lorakit.lora.files import peft_parameters
from lorakit.lora.layer import lora_layers

SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=64,
             n_embd=64, n_layer=2, n_head=4, n_positions=64, ffn_dim=96, word_embed_proj_dim=64,
             moe_intermediate_size=48, num_experts=4, num_local_experts=4, num_experts_per_tok=2,
             shared_expert_intermediate_size=48)
DENSE = ["LlamaConfig", "MistralConfig", "Qwen2Config", "Qwen3Config", "GemmaConfig",
         "Gemma2Config", "Gemma3TextConfig", "Phi3Config", "Olmo2Config", "GraniteConfig",
         "Starcoder2Config", "GPT2Config", "GPTNeoXConfig", "OPTConfig", "FalconConfig"]
MOE = ["MixtralConfig", "Qwen3MoeConfig", "OlmoeConfig", "Qwen2MoeConfig"]


def tiny(config_name: str) -> torch.nn.Module:
    """A tiny random causal LM of the architecture, its sizes set where the config has them."""
    config = getattr(T, config_name)()
    for key, value in SIZES.items():
        if hasattr(config, key):
            try:
                setattr(config, key, value)
            except AttributeError:  # a derived property (Falcon's head_dim)
                pass
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(config, key, None), int) and getattr(config, key) >= 128:
            setattr(config, key, 0)
    if hasattr(config, "layer_types") and config.layer_types is not None:
        config.layer_types = config.layer_types[: config.num_hidden_layers]
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config).eval()


def adapted(model: torch.nn.Module) -> set[str]:
    """Names of the modules lorakit wrapped in `model` (a transformers model)."""
    return {name for name, _ in lora_layers(model)}


def peft_adapted(model: peft.PeftModel) -> set[str]:
    base = model.get_base_model()
    return {n for n, m in base.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


@pytest.mark.parametrize("config_name", DENSE)
def test_all_linear_adapts_what_peft_adapts(config_name):
    ours = get_lora_model(tiny(config_name), LoraConfig(r=4, target_modules="all-linear"))
    theirs = peft.get_peft_model(tiny(config_name),
                                 peft.LoraConfig(r=4, target_modules="all-linear"))
    assert adapted(ours.model) == peft_adapted(theirs) != set()


@pytest.mark.parametrize("config_name", MOE[:3])
def test_all_linear_on_a_moe_model_adapts_the_experts_as_peft_does(config_name):
    """Mixtral, Qwen3-MoE and OLMoE: the attention, every expert's fused weights and the
    routers, under PEFT's names and shapes (Qwen2-MoE, which PEFT leaves frozen, fails loudly:
    tests/test_moe.py)."""
    ours = get_lora_model(tiny(config_name), LoraConfig(r=4, target_modules="all-linear"))
    theirs = peft.get_peft_model(tiny(config_name),
                                 peft.LoraConfig(r=4, target_modules="all-linear"))
    keys = {k: tuple(p.shape) for k, p in peft_parameters(ours, "default").items()}
    assert keys == {k: tuple(v.shape) for k, v in get_peft_model_state_dict(theirs).items()}
    assert any(k.endswith("mlp.experts.base_layer.lora_A.weight") for k in keys)
