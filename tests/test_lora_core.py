"""Core LoRA against independent references: PEFT (the oracle) and float64 closed forms."""

from __future__ import annotations


import peft
import pytest
import torch
from conftest import make_tiny_gpt2, make_tiny_llama, perturb_trainables

from lorakit import LoraConfig, LoraLayer, LoraModel, get_lora_model
from lorakit.lora.variants import PLAIN

TOL = 1e-5

LLAMA_CASES = {
    "list": dict(target_modules=["q_proj", "v_proj"]),
    "regex": dict(target_modules=r".*\.(q|v|down)_proj"),
    "all_linear": dict(target_modules="all-linear"),
    "bias_all": dict(target_modules="all-linear", bias="all"),
    "bias_lora_only": dict(target_modules=["q_proj", "k_proj", "o_proj"], bias="lora_only"),
    "rslora": dict(target_modules="all-linear", use_rslora=True, r=16, lora_alpha=8),
    "modules_to_save": dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    "patterns": dict(target_modules="all-linear", rank_pattern={"v_proj": 2},
                     alpha_pattern={r"layers\.1\.mlp\.up_proj": 3}),
    "layers_to_transform": dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1]),
    "exclude": dict(target_modules="all-linear", exclude_modules=["o_proj", "down_proj"]),
}
GPT2_CASES = {
    "list": dict(target_modules=["c_attn"]),
    "regex": dict(target_modules=r".*\.mlp\.c_(fc|proj)"),
    "all_linear": dict(target_modules="all-linear"),
    "bias_all": dict(target_modules="all-linear", bias="all"),
    "bias_lora_only": dict(target_modules="all-linear", bias="lora_only"),
    "modules_to_save": dict(target_modules=["c_attn"], modules_to_save=["lm_head"]),
}
CASES = ([("llama", k, v) for k, v in LLAMA_CASES.items()]
         + [("llama_bias", k, v) for k, v in LLAMA_CASES.items() if k.startswith("bias")]
         + [("gpt2", k, v) for k, v in GPT2_CASES.items()])


def make_base(kind: str):
    if kind == "gpt2":
        return make_tiny_gpt2()
    return make_tiny_llama(attention_bias=(kind == "llama_bias"))


def lora_kwargs(case: dict) -> dict:
    return dict(r=4, lora_alpha=8, init_lora_weights=False) | case


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind,name,case", CASES, ids=[f"{k}-{n}" for k, n, _ in CASES])
def test_peft_loads_ours_and_we_load_peft(kind, name, case, input_ids, tmp_path):
    ours = get_lora_model(make_base(kind), LoraConfig(**lora_kwargs(case)))
    perturb_trainables(ours)
    expected = logits(ours, input_ids)
    assert (expected - logits(make_base(kind), input_ids)).abs().max() > 1e-3  # adapter matters

    # 1. PEFT reads our files and computes the same logits
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(make_base(kind), tmp_path / "ours")
    torch.testing.assert_close(logits(theirs, input_ids), expected, atol=TOL, rtol=0)

    # 2. we read PEFT's files (written by PEFT from its own model) and compute the same logits
    peft_model = peft.get_peft_model(make_base(kind), peft.LoraConfig(**lora_kwargs(case)))
    perturb_trainables(peft_model, seed=4)
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = LoraModel.from_pretrained(make_base(kind), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded, input_ids), logits(peft_model, input_ids),
                               atol=TOL, rtol=0)


@pytest.mark.parametrize("kind,name,case", CASES, ids=[f"{k}-{n}" for k, n, _ in CASES])
def test_trainable_parameter_count_equals_peft(kind, name, case):
    ours = get_lora_model(make_base(kind), LoraConfig(**lora_kwargs(case)))
    theirs = peft.get_peft_model(make_base(kind), peft.LoraConfig(**lora_kwargs(case)))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    # and the same tensors are trainable, name for name
    ours_names = {n.replace(".adapters.default.", ".").replace(".copies.default.", ".")
                  for n, p in ours.model.named_parameters() if p.requires_grad}
    theirs_names = {n.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")
                    .replace(".default.weight", ".weight").replace("lora_A.weight", "lora_A")
                    .replace("lora_B.weight", "lora_B")
                    for n, p in theirs.named_parameters() if p.requires_grad}
    assert ours_names == theirs_names


@pytest.mark.parametrize("kind", ["llama", "llama_bias", "gpt2"])
def test_merge_unmerge_and_unload(kind, input_ids):
    base = make_base(kind)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_lora_model(base, LoraConfig(r=4, lora_alpha=16, init_lora_weights=False))
    perturb_trainables(model)
    unmerged = logits(model, input_ids)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, input_ids), unmerged, atol=TOL, rtol=0)
    with model.disable_adapters():  # disabling a merged adapter gives the base back
        torch.testing.assert_close(logits(model, input_ids), logits(make_base(kind), input_ids),
                                   atol=TOL, rtol=0)
    torch.testing.assert_close(logits(model, input_ids), unmerged, atol=TOL, rtol=0)
    model.unmerge_adapter()
    for name, layer in model.model.named_modules():
        if isinstance(layer, LoraLayer):
            torch.testing.assert_close(layer.base_layer.weight, before[f"{name}.weight"],
                                       atol=1e-6, rtol=0)
    merged = model.merge_and_unload()
    assert type(merged) is type(make_base(kind))
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, input_ids), unmerged, atol=TOL, rtol=0)


def test_merge_matches_closed_form_and_peft_merge(input_ids):
    model = get_lora_model(make_tiny_llama(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                         target_modules=["q_proj"]))
    layer = model.model.model.layers[0].self_attn.q_proj
    w0 = layer.base_layer.weight.detach().double().clone()
    a, b = (t.detach().double() for t in (layer.adapters["default"].lora_A,
                                          layer.adapters["default"].lora_B))
    model.merge_adapter()
    expected = w0 + (8 / 4) * b @ a
    torch.testing.assert_close(layer.base_layer.weight.double(), expected, atol=1e-6, rtol=0)


def test_gradients_match_float64_reference():
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 10, bias=True).requires_grad_(False)
    layer = LoraLayer(lin)
    layer.add_adapter("default", r=3, alpha=6.0, scaling=2.0, dropout=0.0, init=False,
                      variant=PLAIN,
                      dtype=torch.float32)
    layer.set_active(["default"])
    x = torch.randn(4, 5, 12)
    target = torch.randn(4, 5, 10)
    loss = ((layer(x) - target) ** 2).mean()
    loss.backward()
    ad = layer.adapters["default"]
    # float64 closed form of the same computation
    a = ad.lora_A.detach().double().requires_grad_()
    b = ad.lora_B.detach().double().requires_grad_()
    xd = x.double()
    y = xd @ lin.weight.double().T + lin.bias.double() + 2.0 * (xd @ a.T) @ b.T
    ((y - target.double()) ** 2).mean().backward()
    torch.testing.assert_close(ad.lora_A.grad.double(), a.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ad.lora_B.grad.double(), b.grad, rtol=1e-5, atol=1e-7)
    assert lin.weight.grad is None
