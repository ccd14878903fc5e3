"""LoRA variants against PEFT (the oracle) and closed forms: DoRA (forward, gradients, merge, files
both ways, 4-bit base), PiSSA (init, conversion to plain LoRA), LoRA+ (optimizer and trainer)."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from conftest import VOCAB, make_tiny_gpt2, make_tiny_llama
from conftest import perturb_trainables as perturb

from lorakit import LoraConfig, LoraModel, get_lora_model
from lorakit.lora.files import CONFIG_NAME
from lorakit.lora.layer import LoraLayer
from lorakit.lora.variants import DORA, PLAIN, DoraVariant, LoraVariant, variant_for

TOL = 1e-5


def make_base(kind: str):
    if kind == "gpt2":
        return make_tiny_gpt2()
    return make_tiny_llama(attention_bias=(kind == "llama_bias"))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def layers(model) -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


# -- the strategy objects ------------------------------------------------------------------------
def test_variant_selection_and_tensors():
    assert variant_for(False) is PLAIN and variant_for(True) is DORA
    assert isinstance(DORA, DoraVariant) and isinstance(DORA, LoraVariant)
    model = get_lora_model(make_tiny_llama(), LoraConfig(use_dora=True))
    adapter = model.model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert adapter.variant is DORA
    assert set(adapter.peft_tensors()) == {"lora_A.weight", "lora_B.weight",
                                           "lora_magnitude_vector"}
    assert adapter.magnitude.requires_grad and adapter.magnitude.shape == (32,)



def test_the_layer_runs_any_variant_it_is_given():
    """The layer asks its adapter's variant for forward and merges: a new variant (here: twice
    the plain update) works through LoraLayer without a change to the layer."""
    class Twice(LoraVariant):
        name = "twice"

        def forward(self, adapter, x, result, base_layer):
            return result + 2 * (x @ adapter.lora_A.t() @ adapter.lora_B.t()) * adapter.scaling

        def lora_delta(self, adapter):
            return 2 * super().lora_delta(adapter)

    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6)
    layer = LoraLayer(copy.deepcopy(base))
    layer.add_adapter("t", r=2, alpha=4, scaling=2.0, dropout=0.0, init=False, variant=Twice(),
                      dtype=torch.float32)
    layer.set_active(["t"])
    a, b = layer.adapters["t"].lora_A.detach(), layer.adapters["t"].lora_B.detach()
    x = torch.randn(3, 8)
    want = base(x) + 2 * 2.0 * (x @ a.t() @ b.t())
    with torch.no_grad():
        assert torch.allclose(layer(x), want, atol=1e-6)
        layer.merge()
        assert torch.allclose(layer.base_layer.weight, base.weight + 4.0 * (b @ a), atol=1e-6)
        assert torch.allclose(layer(x), want, atol=1e-5)  # merged: the base alone carries it


# -- DoRA ----------------------------------------------------------------------------------------
DORA_CASES = {
    "llama": ("llama", dict(target_modules="all-linear")),
    "llama_bias": ("llama_bias", dict(target_modules=["q_proj", "k_proj", "o_proj", "down_proj"])),
    "gpt2": ("gpt2", dict(target_modules="all-linear")),
    "rslora_patterns": ("llama", dict(target_modules="all-linear", use_rslora=True,
                                      rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3})),
}


def dora_kwargs(case: dict) -> dict:
    return dict(r=4, lora_alpha=8, init_lora_weights=False, use_dora=True) | case


@pytest.mark.parametrize("case", list(DORA_CASES))
def test_dora_files_both_ways_and_merged(case, input_ids, tmp_path):
    kind, kw = DORA_CASES[case]
    ours = get_lora_model(make_base(kind), LoraConfig(**dora_kwargs(kw)))
    perturb(ours)
    expected = logits(ours, input_ids)
    assert (expected - logits(make_base(kind), input_ids)).abs().max() > 1e-3

    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(make_base(kind), tmp_path / "ours")
    torch.testing.assert_close(logits(theirs, input_ids), expected, atol=TOL, rtol=0)
    # merged: ours against our unmerged result and against PEFT's merged model
    ours.merge_adapter()
    torch.testing.assert_close(logits(ours, input_ids), expected, atol=TOL, rtol=0)
    peft_merged = theirs.merge_and_unload()
    for name, layer in layers(ours.model):
        torch.testing.assert_close(layer.base_layer.weight, peft_merged.get_submodule(name).weight,
                                   atol=1e-6, rtol=0)
    ours.unmerge_adapter()
    for name, layer in layers(ours.model):
        torch.testing.assert_close(layer.base_layer.weight,
                                   make_base(kind).get_submodule(name).weight, atol=1e-6, rtol=0)

    peft_model = peft.get_peft_model(make_base(kind), peft.LoraConfig(**dora_kwargs(kw)))
    perturb(peft_model, seed=4)
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = LoraModel.from_pretrained(make_base(kind), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded, input_ids), logits(peft_model, input_ids),
                               atol=TOL, rtol=0)
    loaded.merge_adapter()
    torch.testing.assert_close(logits(loaded, input_ids), logits(peft_model, input_ids),
                               atol=TOL, rtol=0)


@pytest.mark.parametrize("init", [True, False])
def test_dora_magnitude_starts_at_the_weight_norm(init):
    ours = get_lora_model(make_tiny_llama(), LoraConfig(use_dora=True, init_lora_weights=init))
    for name, layer in layers(ours.model):
        ad = layer.adapters["default"]
        w = layer.base_layer.weight.double()
        expected = (w + ad.scaling * ad.lora_B.double() @ ad.lora_A.double()).norm(dim=1)
        torch.testing.assert_close(ad.magnitude.double(), expected, atol=1e-6, rtol=0)
    if init is True:  # zero B: the norm of W itself, as PEFT initialises it
        theirs = peft.get_peft_model(make_tiny_llama(), peft.LoraConfig(
            use_dora=True, target_modules="all-linear"))
        for name, layer in layers(ours.model):
            peft_layer = theirs.base_model.model.get_submodule(name)
            torch.testing.assert_close(layer.adapters["default"].magnitude,
                                       peft_layer.lora_magnitude_vector["default"].weight,
                                       atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind,dropout", [("llama", 0.0), ("llama_bias", 0.0), ("gpt2", 0.0),
                                          ("llama", 0.3)])
def test_dora_gradients_equal_peft(kind, dropout, input_ids, tmp_path):
    """Training semantics: the column norm is a constant for backprop (DoRA §4.3), dropout
    applies to the input of both the base and the LoRA path."""
    kw = dict(r=4, lora_alpha=8, init_lora_weights=False, use_dora=True, lora_dropout=dropout,
              target_modules="all-linear")
    ours = get_lora_model(make_base(kind), LoraConfig(**kw))
    perturb(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make_base(kind), tmp_path, is_trainable=True)
    results = []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(7)  # same dropout masks: one dropout call per layer in both libraries
        out = model(input_ids=input_ids).logits
        (out.square().mean() + out[..., 3].mean()).backward()
        results.append(out.detach())
    torch.testing.assert_close(results[0], results[1], atol=TOL, rtol=0)
    for name, layer in layers(ours.model):
        ad = layer.adapters["default"]
        pl = theirs.base_model.model.get_submodule(name)
        for mine, other in ((ad.lora_A, pl.lora_A["default"].weight),
                            (ad.lora_B, pl.lora_B["default"].weight),
                            (ad.magnitude, pl.lora_magnitude_vector["default"].weight)):
            torch.testing.assert_close(mine.grad, other.grad, atol=1e-6, rtol=1e-4)


def test_dora_gradient_treats_the_norm_as_constant():
    """Float64 closed form on one layer: y = m/‖W+sBA‖ ⊙ (W + sBA) x + b, ‖·‖ detached."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 10).requires_grad_(False)
    layer = LoraLayer(lin)
    layer.add_adapter("default", r=3, alpha=6.0, scaling=2.0, dropout=0.0, init=False,
                      variant=DORA, dtype=torch.float32)
    layer.set_active(["default"])
    ad = layer.adapters["default"]
    with torch.no_grad():
        ad.magnitude.mul_(1.3)
    x = torch.randn(4, 5, 12)
    layer(x).square().sum().backward()
    a, b, m = (t.detach().double().requires_grad_() for t in (ad.lora_A, ad.lora_B, ad.magnitude))
    w = lin.weight.double() + 2.0 * b @ a
    y = x.double() @ ((m / w.norm(dim=1).detach()).unsqueeze(1) * w).T + lin.bias.double()
    y.square().sum().backward()
    for mine, ref in ((ad.lora_A, a), (ad.lora_B, b), (ad.magnitude, m)):
        # fp32 against fp64: errors relative to the gradient's scale
        torch.testing.assert_close(mine.grad.double(), ref.grad, rtol=0,
                                   atol=1e-5 * ref.grad.abs().max().item())


def test_two_dora_adapters_merge_like_peft(input_ids, tmp_path):
    base = make_tiny_llama()
    ours = get_lora_model(base, LoraConfig(**dora_kwargs({})))
    ours.add_adapter("other", LoraConfig(**dora_kwargs(dict(r=2, lora_alpha=3))))
    ours.add_adapter("plain", LoraConfig(r=2, lora_alpha=3, init_lora_weights=False))
    ours.set_adapter(["default", "other", "plain"])
    perturb(ours)
    unmerged = logits(ours, input_ids)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    theirs.load_adapter(tmp_path / "other", "other")
    theirs.load_adapter(tmp_path / "plain", "plain")
    theirs.base_model.set_adapter(["default", "other", "plain"])
    torch.testing.assert_close(logits(theirs, input_ids), unmerged, atol=TOL, rtol=0)
    # merge one, then the others (each DoRA norm is taken on the unmerged weight, as in PEFT)
    ours.merge_adapter(["other"])
    ours.merge_adapter(["plain", "default"])
    theirs.merge_adapter(["other"])
    theirs.merge_adapter(["plain", "default"])
    for name, layer in layers(ours.model):
        torch.testing.assert_close(layer.base_layer.weight,
                                   theirs.base_model.model.get_submodule(name).base_layer.weight,
                                   atol=1e-6, rtol=0)
    ours.unmerge_adapter()
    for name, layer in layers(ours.model):
        torch.testing.assert_close(layer.base_layer.weight,
                                   make_tiny_llama().get_submodule(name).weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(ours, input_ids), unmerged, atol=TOL, rtol=0)


def test_dora_on_nf4_base_equals_peft(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.base import load_model, quantize_model

    def tiny():  # widths that are multiples of 32 (bitsandbytes' CPU tiles)
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)).eval()
    tiny().save_pretrained(tmp_path / "base")
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    ours = get_lora_model(quantize_model(tiny(), "nf4"), LoraConfig(**dora_kwargs({})))
    perturb(ours)
    expected = logits(ours.eval(), ids)
    ours.save_pretrained(tmp_path / "ours")
    pbase, _ = load_model(tmp_path / "base", dtype="float32", quantization="nf4", tokenizer=False)
    theirs = peft.PeftModel.from_pretrained(pbase, tmp_path / "ours").eval()
    assert (logits(theirs, ids) - expected).abs().max() <= 1e-4


def test_dora_on_bf16_base_keeps_dtypes(input_ids):
    model = get_lora_model(make_tiny_llama().to(torch.bfloat16),
                           LoraConfig(**dora_kwargs({})))
    ref = get_lora_model(make_tiny_llama(), LoraConfig(**dora_kwargs({})))
    ad = model.model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert ad.magnitude.dtype == torch.float32
    out = model(input_ids=input_ids).logits
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert ad.magnitude.grad is not None and ad.magnitude.grad.dtype == torch.float32
    torch.testing.assert_close(out.detach().float(), logits(ref, input_ids), atol=0.1, rtol=0.05)


# -- PiSSA ---------------------------------------------------------------------------------------
def pissa_kwargs(init: str = "pissa", **kw) -> dict:
    return dict(r=4, lora_alpha=8, init_lora_weights=init, target_modules="all-linear") | kw


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_pissa_init_equals_peft_and_keeps_the_model(kind, input_ids):
    base_logits = logits(make_base(kind), input_ids)
    ours = get_lora_model(make_base(kind), LoraConfig(**pissa_kwargs()))
    theirs = peft.get_peft_model(make_base(kind), peft.LoraConfig(**pissa_kwargs()))
    torch.testing.assert_close(logits(ours, input_ids), base_logits, atol=TOL, rtol=0)
    for name, layer in layers(ours.model):
        ad, pl = layer.adapters["default"], theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(ad.lora_A, pl.lora_A["default"].weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(ad.lora_B, pl.lora_B["default"].weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.base_layer.weight, pl.base_layer.weight, atol=1e-6, rtol=0)
        # s·B A is the best rank-r approximation of the original weight
        w = make_base(kind).get_submodule(name).weight.double()
        w = w.T if kind == "gpt2" else w
        u, s, vh = torch.linalg.svd(w)
        top = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
        torch.testing.assert_close(ad.scaling * ad.lora_B.double() @ ad.lora_A.double(), top,
                                   atol=1e-5, rtol=0)


def test_pissa_randomized_svd_init():
    torch.manual_seed(5)
    ours = get_lora_model(make_tiny_llama(), LoraConfig(**pissa_kwargs("pissa_niter_8")))
    torch.manual_seed(5)  # the same random numbers as PEFT's, in its order: the same adapter
    theirs = peft.get_peft_model(make_tiny_llama(), peft.LoraConfig(**pissa_kwargs("pissa_niter_8")))
    peft_layers = [m for m in theirs.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    for (name, layer), mod in zip(layers(ours.model), peft_layers, strict=True):
        assert torch.equal(layer.adapters["default"].lora_A, mod.lora_A["default"].weight), name
    original = make_tiny_llama()
    for name, layer in layers(ours.model):
        ad = layer.adapters["default"]
        w = original.get_submodule(name).weight.double()
        approx = ad.scaling * ad.lora_B.double() @ ad.lora_A.double()
        # residual + adapter is the original weight; the adapter holds the top singular values
        torch.testing.assert_close(layer.base_layer.weight.double() + approx, w, atol=1e-5, rtol=0)
        top = torch.linalg.svdvals(w)[:4]
        # randomized, with q = r as PEFT calls it (no oversampling): close, not exact
        torch.testing.assert_close(torch.linalg.svdvals(approx)[:4], top, atol=0, rtol=0.1)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("rslora", [False, True])
def test_pissa_converted_adapter_works_on_the_original_base(kind, rslora, input_ids, tmp_path):
    ours = get_lora_model(make_base(kind), LoraConfig(**pissa_kwargs(use_rslora=rslora)))
    perturb(ours)  # "training"
    trained = logits(ours, input_ids)
    ours.save_pretrained(tmp_path, convert_pissa_to_lora=True)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True
    assert saved["lora_alpha"] == pytest.approx(8 * 2 ** 0.5 if rslora else 16)
    for loaded in (LoraModel.from_pretrained(make_base(kind), tmp_path),
                   peft.PeftModel.from_pretrained(make_base(kind), tmp_path)):
        torch.testing.assert_close(logits(loaded, input_ids), trained, atol=TOL, rtol=0)


def test_pissa_conversion_from_an_initial_adapter_like_peft(input_ids, tmp_path):
    # PEFT's workflow: save the freshly initialised adapter, train, save relative to it
    theirs = peft.get_peft_model(make_tiny_llama(), peft.LoraConfig(**pissa_kwargs()))
    theirs.save_pretrained(tmp_path / "peft_init")
    perturb(theirs)
    trained = logits(theirs, input_ids)
    theirs.save_pretrained(tmp_path / "peft_conv",
                           path_initial_model_for_weight_conversion=str(tmp_path / "peft_init"))
    ours = LoraModel.from_pretrained(make_tiny_llama(), tmp_path / "peft_conv")
    torch.testing.assert_close(logits(ours, input_ids), trained, atol=TOL, rtol=0)

    # the same with lorakit on both ends, from an initial adapter saved by PEFT or by us
    ours = get_lora_model(make_tiny_llama(), LoraConfig(**pissa_kwargs()))
    ours.save_pretrained(tmp_path / "ours_init")
    perturb(ours)
    trained = logits(ours, input_ids)
    for init_dir in ("ours_init", "peft_init"):
        ours.save_pretrained(tmp_path / f"conv_{init_dir}",
                             path_initial_model_for_weight_conversion=tmp_path / init_dir)
        for loaded in (LoraModel.from_pretrained(make_tiny_llama(), tmp_path / f"conv_{init_dir}"),
                       peft.PeftModel.from_pretrained(make_tiny_llama(),
                                                      tmp_path / f"conv_{init_dir}")):
            torch.testing.assert_close(logits(loaded, input_ids), trained, atol=TOL, rtol=0)


def test_unconverted_pissa_adapter_reloads_by_redoing_the_init(input_ids, tmp_path):
    """Saved as is ("pissa" in its config), loading recomputes the residual base, as PEFT does."""
    ours = get_lora_model(make_tiny_llama(), LoraConfig(**pissa_kwargs()))
    perturb(ours)
    trained = logits(ours, input_ids)
    ours.save_pretrained(tmp_path)
    for loaded in (LoraModel.from_pretrained(make_tiny_llama(), tmp_path),
                   peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path)):
        torch.testing.assert_close(logits(loaded, input_ids), trained, atol=TOL, rtol=0)


def test_pissa_conversion_errors(tmp_path):
    plain = get_lora_model(make_tiny_llama(), LoraConfig(init_lora_weights=False))
    plain.save_pretrained(tmp_path / "plain", convert_pissa_to_lora=True)  # not PiSSA: as is
    assert json.loads((tmp_path / "plain" / CONFIG_NAME).read_text())["r"] == 8
    dora = get_lora_model(make_tiny_llama(), LoraConfig(**pissa_kwargs(use_dora=True)))
    with pytest.raises(ValueError, match="DoRA"):
        dora.save_pretrained(tmp_path / "d", convert_pissa_to_lora=True)
    two = get_lora_model(make_tiny_llama(), LoraConfig(**pissa_kwargs()))
    two.add_adapter("second", LoraConfig(**pissa_kwargs()))
    two.save_pretrained(tmp_path / "init")
    with pytest.raises(ValueError, match="select one adapter"):
        two.save_pretrained(tmp_path / "x",
                            path_initial_model_for_weight_conversion=tmp_path / "init")
    # a loaded PiSSA adapter keeps the init it recomputed, so it converts too
    loaded = LoraModel.from_pretrained(make_tiny_llama(), tmp_path / "init")
    loaded.save_pretrained(tmp_path / "conv", convert_pissa_to_lora=True)
    with pytest.raises(ValueError, match="not PiSSA-initialised"):
        from lorakit.lora.files import save_adapter
        save_adapter(plain, tmp_path / "y", "default", convert_to_lora=True)


# -- LoRA+ ---------------------------------------------------------------------------------------
def test_loraplus_optimizer_gives_b_ratio_times_the_lr():
    from lorakit import create_loraplus_optimizer

    model = get_lora_model(make_tiny_llama(), LoraConfig(use_dora=True))
    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0,
                                    weight_decay=0.1)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group = by_param[id(p)]
        if name.endswith("lora_B"):
            assert group["lr"] == pytest.approx(16e-3) and group["weight_decay"] == 0.1
        elif name.endswith("lora_A"):
            assert group["lr"] == pytest.approx(1e-3) and group["weight_decay"] == 0.1
        else:  # DoRA's magnitude: a vector, no decay, base lr
            assert name.endswith("magnitude") and group["lr"] == pytest.approx(1e-3)
            assert group["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in opt.param_groups) == \
        sum(p.requires_grad for p in model.parameters())


def test_trainer_loraplus_ratio_moves_b_ratio_times_faster(tmp_path):
    """Adam's first step moves every weight with a nonzero gradient by ≈ its lr, so one step
    shows each group's learning rate directly."""
    from lorakit import SFTTrainer, TrainConfig
    from lorakit.data import SFTData

    g = torch.Generator().manual_seed(0)
    data = SFTData([{"input_ids": torch.randint(0, VOCAB, (10,), generator=g).tolist(),
                     "labels": torch.randint(0, VOCAB, (10,), generator=g).tolist()}
                    for _ in range(4)])
    model = get_lora_model(make_tiny_llama(), LoraConfig(init_lora_weights=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainConfig(output_dir=str(tmp_path), max_steps=1, learning_rate=1e-3,
                       loraplus_lr_ratio=8.0, lr_scheduler_type="constant",
                       per_device_train_batch_size=4, save_steps=None, bf16=False,
                       disable_tqdm=True, max_grad_norm=None)
    SFTTrainer(model, args, train_data=data).train()
    step = {n: (p.detach() - before[n]).abs() for n, p in model.named_parameters() if n in before}
    a = torch.cat([s.flatten() for n, s in step.items() if n.endswith("lora_A")])
    b = torch.cat([s.flatten() for n, s in step.items() if n.endswith("lora_B")])
    assert a.median().item() == pytest.approx(1e-3, rel=0.05)
    assert b.median().item() == pytest.approx(8e-3, rel=0.05)
