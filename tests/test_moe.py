"""LoRA on Mixture-of-Experts models (`target_parameters`), PEFT as the oracle.

Tiny random Qwen3-MoE, Mixtral, OLMoE, gpt-oss (transposed experts with biases) and Qwen2-MoE,
plus one dense model: the adapted names and shapes equal PEFT's, PEFT's adapter (non-zero B)
gives PEFT's logits in lorakit and the other way round, gradients equal PEFT's; merged equals
unmerged; each row of a mixed batch equals that row alone; what PEFT refuses is refused.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import peft
import pytest
import torch
from conftest import make_tiny_moe, save_tiny_chat_model, write_sum_rows
from test_architectures import tiny
from transformers import AutoModelForCausalLM

from lorakit import LoraConfig, LoraModel, get_lora_model
from lorakit.errors import ConfigError
from lorakit.lora import BASE_ADAPTER
from lorakit.lora.files import peft_parameters
from lorakit.lora.params import ParamLoraLayer, param_layers

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
CASES = {
    "qwen3_moe-all-linear": ("Qwen3MoeConfig", dict(target_modules="all-linear")),
    "mixtral-all-linear": ("MixtralConfig", dict(target_modules="all-linear")),
    "olmoe-all-linear-rslora": ("OlmoeConfig", dict(target_modules="all-linear", use_rslora=True)),
    "gpt_oss-experts": ("GptOssConfig", dict(target_modules=["q_proj"], target_parameters=EXPERTS)),
    "qwen2_moe-explicit": (
        "Qwen2MoeConfig",
        dict(target_modules=["q_proj"], target_parameters=[*EXPERTS, "mlp.gate.weight"]),
    ),
    "qwen3_moe-down_proj-only": ("Qwen3MoeConfig", dict(target_modules=[],
                                                        target_parameters=["down_proj"])),
    "llama-dense": ("LlamaConfig", dict(target_modules="all-linear")),
}


def peft_keys(model: peft.PeftModel) -> dict[str, torch.nn.Parameter]:
    """PEFT's saved key -> its live trainable parameter."""
    return {
        "base_model.model." + n.removeprefix("base_model.model.").replace(".default", ""): p
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def pair(case: str, seed: int = 1):
    """(base, PEFT model, lorakit model): both with PEFT's random non-zero adapter."""
    config_name, kwargs = CASES[case]
    base = tiny(config_name)
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **copy.deepcopy(kwargs)),
    )
    ours = get_lora_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, **kwargs))
    mine = peft_parameters(ours, "default")
    with torch.no_grad():
        for key, p in peft_keys(theirs).items():
            mine[key].copy_(p)
    return base, theirs, ours


def ids(rows: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", CASES)
def test_adapted_names_and_logits_equal_peft(case):
    base, theirs, ours = pair(case)
    assert {k: tuple(p.shape) for k, p in peft_parameters(ours, "default").items()} == {
        k: tuple(p.shape) for k, p in peft_keys(theirs).items()
    }
    x = ids()
    expected = theirs(x).logits
    torch.testing.assert_close(ours(x).logits, expected, rtol=0, atol=1e-5)
    assert (expected - base(x).logits).abs().max() > 1e-3  # the adapters do something


@pytest.mark.parametrize("case", [c for c in CASES if c != "llama-dense"])
def test_gradients_equal_peft(case):
    _, theirs, ours = pair(case)
    x = ids(seed=2)
    for model in (theirs, ours):
        model(x, labels=x).loss.backward()
    mine = peft_parameters(ours, "default")
    for key, p in peft_keys(theirs).items():
        torch.testing.assert_close(mine[key].grad, p.grad, rtol=1e-4, atol=1e-6, msg=key)
    assert any(k.endswith("experts.lora_B.weight") for k in mine)


@pytest.mark.parametrize("case", ["qwen3_moe-all-linear", "gpt_oss-experts"])
def test_adapter_files_go_both_ways(case, tmp_path):
    base, theirs, ours = pair(case)
    x = ids()
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "lorakit")
    saved = json.loads((tmp_path / "lorakit" / "adapter_config.json").read_text())
    assert set(saved["target_parameters"]) == set(json.loads(
        (tmp_path / "peft" / "adapter_config.json").read_text())["target_parameters"])
    loaded = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(loaded(x).logits, theirs(x).logits, rtol=0, atol=1e-5)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lorakit")
    torch.testing.assert_close(back(x).logits, ours(x).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["qwen3_moe-all-linear", "gpt_oss-experts"])
def test_merged_equals_unmerged(case):
    base, _, ours = pair(case)
    x = ids()
    before = {n: p.clone() for n, p in base.named_parameters()}
    expected = ours(x).logits
    ours.merge_adapter(safe_merge=True)
    torch.testing.assert_close(ours(x).logits, expected, rtol=0, atol=1e-5)
    ours.unmerge_adapter()
    torch.testing.assert_close(ours(x).logits, expected, rtol=0, atol=1e-5)
    merged = ours.merge_and_unload()
    assert not any(isinstance(m, ParamLoraLayer) for m in merged.modules())
    torch.testing.assert_close(merged(x).logits, expected, rtol=0, atol=1e-5)
    assert set(dict(merged.named_parameters())) == set(before)  # PEFT's names again


def test_safe_merge_refuses_nan_and_leaves_the_weights():
    _, _, ours = pair("qwen3_moe-all-linear")
    layer = next(layer for _, layer in param_layers(ours.model))
    weight = layer.base_layer.down_proj.detach().clone()
    with torch.no_grad():
        layer.adapters["default"]["down_proj"].lora_B[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ours.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.down_proj, weight)


def two_adapters():
    """A tiny Qwen3-MoE with adapters 'a' and 'b' (non-zero, different) on all-linear."""
    model = get_lora_model(
        make_tiny_moe(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
        adapter_name="a",
    )
    torch.manual_seed(5)
    model.add_adapter("b", LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    return model


def alone(model: LoraModel, name: str, x: torch.Tensor) -> torch.Tensor:
    if name == BASE_ADAPTER:
        with model.disable_adapters():
            return model(x).logits
    model.set_adapter(name)
    return model(x).logits


def test_mixed_batch_rows_equal_each_row_alone():
    model = two_adapters()
    x = ids(rows=3)
    names = ["b", BASE_ADAPTER, "a"]
    mixed = model(x, adapter_names=names).logits
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], alone(model, name, x[i : i + 1])[0],
                                   rtol=0, atol=1e-5)
    assert (mixed[0] - mixed[2]).abs().max() > 1e-3


def test_mixed_generate_keeps_each_rows_adapter():
    model = two_adapters()
    x = ids(rows=2, length=5)
    beams = dict(max_new_tokens=4, do_sample=False, num_beams=2, num_return_sequences=2)
    out = model.generate(x, adapter_names=["a", "b"], **beams)  # rows repeated for the beams
    for i, name in enumerate(["a", "b"]):
        model.set_adapter(name)
        assert torch.equal(out[2 * i : 2 * i + 2], model.generate(x[i : i + 1], **beams))
    assert not torch.equal(out[0], out[2])


def test_switch_disable_delete():
    model = two_adapters()
    x = ids()
    with model.disable_adapters():
        base = model(x).logits
    model.set_adapter("b")
    b = model(x).logits
    model.set_adapter("a")
    a = model(x).logits
    assert (a - b).abs().max() > 1e-3 and (a - base).abs().max() > 1e-3
    model.delete_adapter("a")
    assert model.active_adapters == ["b"]
    torch.testing.assert_close(model(x).logits, b, rtol=0, atol=0)
    unloaded = model.unload()
    torch.testing.assert_close(unloaded(x).logits, base, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["cat", "svd"])
def test_add_weighted_adapter_on_experts(kind):
    model = two_adapters()
    model.add_weighted_adapter(["a", "b"], [0.7, -0.4], "mix", combination_type=kind,
                               svd_rank=12)
    for _, layer in param_layers(model.model):
        for param in layer.shapes:
            deltas = {n: layer.adapters[n][param].delta().double() for n in ("a", "b", "mix")}
            torch.testing.assert_close(deltas["mix"], 0.7 * deltas["a"] - 0.4 * deltas["b"],
                                       rtol=1e-5, atol=1e-6)
    assert "mlp.experts.gate_up_proj" in " ".join(model.peft_config["mix"].target_parameters)


def test_trainable_report_counts_the_experts(capsys):
    model = get_lora_model(make_tiny_moe(), LoraConfig(r=4, target_modules="all-linear"))
    model.print_trainable_parameters()
    out = capsys.readouterr().out
    # 2 layers × (gate_up_proj, down_proj) × 4 experts, and 2 routers
    assert "of which on Mixture-of-Experts weights" in out
    assert "(16 expert matrices, 2 routers)" in out


# -- refusals: what PEFT refuses, with PEFT's reason; never a silent skip -------------------
@pytest.mark.parametrize("option, reason", [
    (dict(lora_dropout=0.1), "lora_dropout != 0"),
    (dict(use_dora=True), "use_dora=True"),
])
def test_refuses_what_peft_refuses(option, reason):
    config = dict(r=4, target_modules=["q_proj"], target_parameters=["gate_up_proj"], **option)
    with pytest.raises(ValueError, match=reason):
        peft.get_peft_model(make_tiny_moe(), peft.LoraConfig(**config))
    model = make_tiny_moe()
    with pytest.raises(ConfigError, match=reason):
        get_lora_model(model, LoraConfig(**config))
    assert not any("lora" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("field, entry", [
    ("target_parameters", "up_gate_proj"), ("target_modules", "q_projection"),
])
def test_an_entry_that_matches_nothing_is_named(field, entry):
    config = dict(target_modules=["q_proj"], target_parameters=["down_proj"])
    config[field] = [*config[field], entry]
    with pytest.raises(ConfigError, match=f"'{entry}'.*matches no"):
        get_lora_model(make_tiny_moe(), LoraConfig(r=4, **config))


def test_a_3d_parameter_of_unknown_layout_is_an_error():
    model = make_tiny_moe()
    experts = model.model.layers[0].mlp.experts
    del experts.is_transposed  # a 3-D weight without transformers' layout flag
    with pytest.raises(ConfigError, match=r"layers\.0\.mlp\.experts\.down_proj.*layout"):
        get_lora_model(model, LoraConfig(r=4, target_modules=[], target_parameters=["down_proj"]))


def test_all_linear_where_peft_leaves_the_experts_frozen_fails_loudly():
    """PEFT's all-linear adapts the experts of the families transformers converts only; on
    Qwen2-MoE it would train the attention alone. lorakit says so and offers the fix."""
    model = tiny("Qwen2MoeConfig")
    with pytest.raises(ConfigError, match=r"frozen.*target_parameters=\['down_proj', "
                                          r"'gate_up_proj'\]"):
        get_lora_model(model, LoraConfig(r=4, target_modules="all-linear"))
    fixed = get_lora_model(model, LoraConfig(r=4, target_modules="all-linear",
                                             target_parameters=["gate_up_proj", "down_proj"]))
    assert len(list(param_layers(fixed.model))) == 2


def test_qlora_on_a_moe_base_quantizes_the_linear_layers_and_says_what_it_keeps(tmp_path, capsys):
    """bitsandbytes holds linear layers only: the attention is 4-bit, the fused experts keep the
    base dtype (said in one line), and the adapters on both train."""
    from lorakit.base.loading import load_model
    from lorakit.lora import backends

    make_tiny_moe().save_pretrained(tmp_path)
    model, _ = load_model(str(tmp_path), dtype=torch.bfloat16, quantization="nf4")
    assert "4 Mixture-of-Experts weights" in capsys.readouterr().out
    attention = model.model.layers[0].self_attn.q_proj
    assert backends.is_linear4bit(attention)
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    lora = get_lora_model(model, LoraConfig(r=4, target_modules="all-linear"))
    x = ids(rows=4)
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = lora(x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    trained = peft_parameters(lora, "default")
    assert all(trained[k].abs().sum() > 0 for k in trained if k.endswith("lora_B.weight"))


@pytest.mark.default_model  # the tiny model borrows SmolLM2's tokenizer and chat template
def test_cli_trains_a_moe_model_whose_adapter_peft_loads(tmp_path, smol_tokenizer):
    """`lorakit train` in a fresh process, as a user types it, on a Mixture-of-Experts model:
    the experts are adapted (and reported), and PEFT loads the adapter with lorakit's logits."""
    model_dir = save_tiny_chat_model(tmp_path / "moe", smol_tokenizer,
                                     make_tiny_moe(vocab_size=len(smol_tokenizer)))
    write_sum_rows(tmp_path / "train.jsonl", 16)
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(
        [sys.executable, "-m", "lorakit", "train", "--model", str(model_dir), "--data",
         str(tmp_path / "train.jsonl"), "--output", str(tmp_path / "out"), "--max-steps", "3",
         "--batch-size", "4", "--lr", "1e-2", "--dtype", "float32"],
        env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "of which on Mixture-of-Experts weights" in res.stdout
    assert "Mixture-of-Experts weights" in (tmp_path / "out" / "report.md").read_text()
    adapter = tmp_path / "out" / "adapter"
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir),
                                            adapter)
    ours = LoraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    x = ids(rows=2, length=6)
    torch.testing.assert_close(ours(x).logits, theirs(x).logits, rtol=0, atol=1e-5)
    trained = peft_parameters(ours, "default")
    assert all(trained[k].abs().sum() > 0 for k in trained if k.endswith("lora_B.weight"))


def test_merged_export_folds_the_expert_adapters(tmp_path):
    """export_merged (what `lorakit merge` writes): a plain checkpoint, experts merged in fp32."""
    from lorakit.lora.export import export_merged

    _, _, ours = pair("qwen3_moe-all-linear")
    export_merged(ours, tmp_path / "merged", dtype="float32")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    x = ids()
    torch.testing.assert_close(plain(x).logits, ours(x).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("option", [
    dict(layers_to_transform=[1]), dict(exclude_modules=["model.layers.0.mlp.experts"]),
])
def test_layer_filters_apply_to_modules_only_as_in_peft(option):
    """PEFT matches target_parameters by name alone; the files must hold the same tensors, so
    lorakit does too, with a warning instead of PEFT's silence."""
    config = dict(r=4, target_modules=["q_proj"], target_parameters=["down_proj"])
    theirs = peft.get_peft_model(make_tiny_moe(),
                                 peft.LoraConfig(**config, **copy.deepcopy(option)))
    with pytest.warns(UserWarning, match="target_modules only"):
        ours = get_lora_model(make_tiny_moe(), LoraConfig(**config, **option))
    assert set(peft_parameters(ours, "default")) == set(
        peft.get_peft_model_state_dict(theirs))


def test_bf16_autocast_on_experts_tracks_fp32():
    """The trainer's bf16 autocast (the default on AVX512-BF16 CPUs; forced here, so every CPU
    runs it): the experts' update is computed outside autocast, in the adapters' fp32, and the
    loss and expert gradients stay within bf16 rounding of the fp32 step."""
    _, _, ours = pair("qwen3_moe-all-linear")
    x = ids(seed=2)
    grads = {}
    for autocast in (False, True):
        ours.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = ours(x, labels=x).loss
        loss.backward()
        grads[autocast] = (float(loss), {
            k: p.grad.clone() for k, p in peft_parameters(ours, "default").items()
            if "experts" in k})
    (loss32, g32), (loss16, g16) = grads[False], grads[True]
    assert loss16 == pytest.approx(loss32, rel=2e-2)
    for key, g in g32.items():
        assert (g16[key] - g).norm() <= 0.1 * g.norm() + 1e-6, key
