"""Core LoRA: validation, error messages, file safety, dtypes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import make_tiny_gpt2, make_tiny_llama
from safetensors.torch import load_file

from lorakit import LoraConfig, LoraModel, get_lora_model
from lorakit.lora.files import CONFIG_NAME, WEIGHTS_NAME, AdapterFileError


@pytest.mark.parametrize("field,value,needle", [
    ("r", 0, "r=0"), ("r", 2.5, "integer"), ("lora_alpha", -1, "lora_alpha"),
    ("lora_dropout", 1.0, "[0, 1)"), ("bias", "some", "bias"),
    ("target_modules", [], "target_modules"), ("target_modules", "(", "regex"),
    ("init_lora_weights", "olora", "init_lora_weights"), ("use_rslora", "yes", "use_rslora"),
    ("rank_pattern", {"q_proj": 0}, "rank_pattern"), ("layers_to_transform", "1", "layers_to"),
])
def test_config_validation_names_the_field(field, value, needle):
    with pytest.raises(ValueError, match=field) as e:
        LoraConfig(**{field: value})
    assert needle in str(e.value)


def test_targets_matching_nothing_list_the_linear_layers():
    with pytest.raises(ValueError) as e:
        get_lora_model(make_tiny_llama(), LoraConfig(target_modules=["query", "value"]))
    msg = str(e.value)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in msg
    assert "lm_head" not in msg


def test_non_linear_target_is_refused():
    with pytest.raises(ValueError, match="Embedding"):
        get_lora_model(make_tiny_llama(), LoraConfig(target_modules=["embed_tokens"]))


def test_all_linear_skips_output_embedding_and_is_saved_expanded(tmp_path):
    model = get_lora_model(make_tiny_gpt2(), LoraConfig())
    targets = model.peft_config["default"].target_modules
    assert "lm_head" not in targets and len(targets) == 8
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["fan_in_fan_out"] is True and saved["inference_mode"] is True
    assert saved["target_modules"] == sorted(targets)
    keys = load_file(tmp_path / WEIGHTS_NAME)
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in keys


def test_wrong_base_shape_error_names_module_and_shapes(tmp_path):
    get_lora_model(make_tiny_llama(), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM
    bigger = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=48,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2))
    with pytest.raises(ValueError) as e:
        LoraModel.from_pretrained(bigger, tmp_path)
    msg = str(e.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "(8, 32)" in msg and "(8, 64)" in msg
    # the failed load leaves no half-injected adapter behind
    assert not any("lora" in n for n, _ in bigger.named_parameters())


def test_unknown_config_keys_warn_and_unsupported_features_fail(tmp_path):
    get_lora_model(make_tiny_llama(), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg | {"brand_new_knob": 3, "peft_version": "9"}))
    with pytest.warns(UserWarning, match="brand_new_knob"):
        LoraModel.from_pretrained(make_tiny_llama(), tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg | {"lora_bias": True}))
    with pytest.raises(ValueError, match="lora_bias"):
        LoraModel.from_pretrained(make_tiny_llama(), tmp_path)


def test_legacy_bin_adapter_loads_with_weights_only(tmp_path, input_ids):
    model = get_lora_model(make_tiny_llama(), LoraConfig(init_lora_weights=False))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    (tmp_path / WEIGHTS_NAME).unlink()
    torch.save(tensors, tmp_path / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match="a pickle, which lorakit does not load"):
        LoraModel.from_pretrained(make_tiny_llama(), tmp_path)  # no pickle unless asked
    loaded = LoraModel.from_pretrained(make_tiny_llama(), tmp_path, allow_pickle=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids).logits,
                                   model(input_ids=input_ids).logits)


def test_crash_during_save_keeps_the_previous_adapter(tmp_path, monkeypatch, input_ids):
    first = get_lora_model(make_tiny_llama(), LoraConfig(init_lora_weights=False))
    first.save_pretrained(tmp_path)
    good = (tmp_path / WEIGHTS_NAME).read_bytes()
    second = get_lora_model(make_tiny_llama(seed=5), LoraConfig(init_lora_weights=False, r=2))

    def crash(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        second.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp left
    LoraModel.from_pretrained(make_tiny_llama(), tmp_path)


@pytest.mark.parametrize("name", ["a/b", "..", "lora_x", "x.y", "", "__base__"])
def test_bad_adapter_names(name):
    model = get_lora_model(make_tiny_llama(), LoraConfig())
    with pytest.raises(ValueError, match="adapter name"):
        model.add_adapter(name, LoraConfig())


def test_safe_merge_refuses_nan():
    model = get_lora_model(make_tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    layer = model.model.model.layers[0].self_attn.q_proj
    before = layer.base_layer.weight.clone()
    with torch.no_grad():
        layer.adapters["default"].lora_B.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before)


def test_bf16_base_keeps_dtype_and_fp32_adapters(input_ids):
    base = make_tiny_llama().to(torch.bfloat16)
    model = get_lora_model(base, LoraConfig(init_lora_weights=False))
    layer = model.model.model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.adapters["default"].lora_A.dtype == torch.float32
    out = model(input_ids=input_ids).logits
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.adapters["default"].lora_A.grad.dtype == torch.float32
    # merge is computed in fp32 and rounded once into bf16
    w = layer.base_layer.weight.float()
    ad = layer.adapters["default"]
    expected = (w + ad.scaling * ad.lora_B.detach() @ ad.lora_A.detach()).to(torch.bfloat16)
    model.merge_adapter()
    assert torch.equal(layer.base_layer.weight, expected)


def test_disable_adapters_and_generate_pass_through(input_ids):
    base = make_tiny_llama()
    expected = base.generate(input_ids[:1], max_new_tokens=5, do_sample=False)
    model = get_lora_model(make_tiny_llama(), LoraConfig(init_lora_weights=False))
    with model.disable_adapters():
        torch.testing.assert_close(model.generate(input_ids[:1], max_new_tokens=5, do_sample=False),
                                   expected)
    # a zero-initialised adapter (the default) starts exactly at the base model
    fresh = get_lora_model(make_tiny_llama(), LoraConfig())
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=input_ids).logits, base(input_ids=input_ids).logits)


def test_dropout_applies_in_training_only(input_ids):
    model = get_lora_model(make_tiny_llama(), LoraConfig(lora_dropout=0.5, init_lora_weights=False))
    model.eval()
    with torch.no_grad():
        a, b = model(input_ids=input_ids).logits, model(input_ids=input_ids).logits
    assert torch.equal(a, b)
    model.train()
    torch.manual_seed(0)
    c = model(input_ids=input_ids).logits
    assert not torch.allclose(a, c)


def test_disable_adapters_restores_the_exact_previous_state(input_ids):
    model = get_lora_model(make_tiny_llama(), LoraConfig(init_lora_weights=False))
    with model.disable_adapters():
        pass
    layers = [m for m in model.model.modules() if hasattr(m, "merged_adapters")]
    assert all(layer.merged_adapters == [] for layer in layers)  # nothing merged behind our back
    model(input_ids=input_ids).logits.sum().backward()
    assert layers[0].adapters["default"].lora_A.grad is not None
    model.merge_adapter()
    with model.disable_adapters():
        pass
    assert all(layer.merged_adapters == ["default"] for layer in layers)
