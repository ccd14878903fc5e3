"""QLoRA on CPUs where bitsandbytes repacks 4-bit weights (AVX512-BF16): forced on every CPU.

bitsandbytes 0.50 repacks a `Linear4bit` into a CPU tiled layout at its first no-grad eval
forward when the CPU has AVX512-BF16 (absmax de-nested and rounded to bf16, inference kernel
without backward). The repacking itself is plain torch, so these tests force it on any CPU and
check that lorakit never lets it happen to layers it manages, and reads a layer that was tiled
before lorakit saw it exactly: dequantization, merge, export, DoRA norms and a training step,
against closed forms in float64. The end-to-end check with bitsandbytes' real tiled kernel needs
the CPU feature and is skipped, saying why, elsewhere.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402

from lorakit import LoraConfig, SFTTrainer, TrainConfig, get_lora_model  # noqa: E402
from lorakit.base import load_model, quantize_model  # noqa: E402
from lorakit.lora import export_merged  # noqa: E402
from lorakit.lora.backends import dense_weight  # noqa: E402

pytestmark = pytest.mark.cpu_path
HAS_AVX512_BF16 = bool(bnbf.has_avx512bf16())
needs_avx512_bf16 = pytest.mark.skipif(
    not HAS_AVX512_BF16, reason="bitsandbytes' tiled 4-bit kernel runs only on CPUs with "
    "AVX512-BF16; this CPU lacks it (the forced-layout tests above cover lorakit's own paths)")
VOCAB = 128


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    # out_features multiples of 32: the tiled layout packs 32 output rows per tile
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def linear4bit_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def is_tiled(layer: nn.Module) -> bool:
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def tile(layer: nn.Module) -> None:
    """What bitsandbytes does to a Linear4bit at its first no-grad eval forward on AVX512-BF16."""
    w = layer.weight
    w.data, w.quant_state = bnbf._convert_weight_packed_for_cpu(w.data, w.quant_state)
    layer.quant_state = w.quant_state
    assert w.quant_state.packing_format_for_cpu


def nf4_values(layer: nn.Module) -> torch.Tensor:
    """Closed form, float64: NF4 level of each stored 4-bit code × its block's absmax rounded to
    bf16 (what the tiled layout keeps), for a layer in the regular layout. (out, in)."""
    qs = layer.weight.quant_state
    packed = layer.weight.data.reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1).long()  # high nibble 1st
    absmax = bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested \
        else qs.absmax
    absmax = absmax.float().to(torch.bfloat16).double()
    levels = qs.code.double()[codes].reshape(-1, qs.blocksize)
    return (levels * absmax.reshape(-1, 1)).reshape(qs.shape)


def one_layer(out_features: int = 96, in_features: int = 64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return quantize_model(nn.Sequential(nn.Linear(in_features, out_features)), "nf4", skip=())[0]


@pytest.fixture
def force_avx512_bf16(monkeypatch):
    """Make bitsandbytes' layers believe the CPU has AVX512-BF16 (read when a layer is built)."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- lorakit's layers never tile

def test_quantize_model_layers_stay_regular_after_eval_forward(force_avx512_bf16, ids):
    model = quantize_model(tiny_llama(), "nf4")
    fresh = bnb.nn.Linear4bit(64, 64)
    assert fresh.support_avx512bf16_for_cpu  # the forcing works: bitsandbytes would tile
    with torch.no_grad():
        model(input_ids=ids)  # the CLI's before-training samples run exactly such forwards
    layers = linear4bit_layers(model)
    assert layers and not any(is_tiled(m) for m in layers)
    assert all(m.weight.quant_state.nested for m in layers)  # double quantization kept


def test_load_model_layers_stay_regular_after_eval_forward(force_avx512_bf16, tmp_path, ids):
    tiny_llama().save_pretrained(tmp_path / "tiny")
    model, _ = load_model(tmp_path / "tiny", quantization="nf4", tokenizer=False)
    with torch.no_grad():
        model(input_ids=ids)
    assert not any(is_tiled(m) for m in linear4bit_layers(model))


def test_get_lora_model_restores_and_keeps_every_4bit_layer_regular(force_avx512_bf16, ids):
    """A model quantized elsewhere (here: bitsandbytes' own layers, tiled by an eval forward
    before lorakit saw it): all its 4-bit layers, targeted or not, come back regular."""
    model = quantize_model(tiny_llama(), "nf4")
    for m in linear4bit_layers(model):
        m.support_avx512bf16_for_cpu = True  # as bitsandbytes builds them on such CPUs
        tile(m)
    lm = get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with torch.no_grad():
        lm(input_ids=ids)
    layers = linear4bit_layers(lm.model)
    assert not any(is_tiled(m) for m in layers)
    assert not any(m.support_avx512bf16_for_cpu for m in layers)


# --------------------------------------------------------------- reading a tiled layer exactly

def test_dense_weight_of_tiled_layer_is_exact():
    regular = one_layer()
    tiled = copy.deepcopy(regular)
    tile(tiled)
    want = nf4_values(regular)
    got = dense_weight(tiled)  # restores the regular layout in place, then dequantizes
    assert torch.equal(got, want.float())
    assert not is_tiled(tiled)
    # and that is the untiled layer up to the bf16 rounding of its absmax (2^-9 relative)
    w0 = dense_weight(regular)
    assert ((got - w0).abs() <= w0.abs() * 2 ** -8 + 1e-12).all()
    # the restored layer computes with those values, in training mode and with grad
    x = torch.randn(3, 64, dtype=torch.float32, requires_grad=True)
    tiled.train()
    y = tiled(x)
    y.sum().backward()
    bias = tiled.bias.detach().double()
    assert torch.allclose(y.double(), x.double() @ want.t() + bias, atol=1e-5, rtol=1e-5)
    assert torch.allclose(x.grad.double(), want.sum(0).expand(3, -1), atol=1e-5, rtol=1e-5)


def lora_on_tiled_copy(regular: nn.Module, **lora) -> object:
    """A LoRA model on a tiled copy of `regular` (one layer, named "0")."""
    tiled = copy.deepcopy(regular)
    tile(tiled)
    return get_lora_model(nn.Sequential(tiled),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["0"], **lora))


def test_merge_into_tiled_layer_keeps_its_settings():
    regular = one_layer()
    lm = lora_on_tiled_copy(regular, init_lora_weights=False)
    layer = lm.model[0]
    delta = layer.adapters["default"].delta_weight(torch.zeros(96, 64)).double()
    want = nf4_values(regular) + delta
    with pytest.warns(UserWarning, match="lossy"):
        lm.merge_adapter()
    qs = layer.base_layer.weight.quant_state
    assert (qs.quant_type, qs.blocksize, qs.nested, qs.dtype) == ("nf4", 64, True, torch.float32)
    assert not is_tiled(layer.base_layer)
    merged = dense_weight(layer.base_layer).double()
    # re-quantized to NF4: within half the widest level gap × the block's absmax
    assert (merged - want).abs().max() < 0.15 * want.abs().max()


def test_dora_norm_on_tiled_layer_is_exact():
    regular = one_layer()
    lm = lora_on_tiled_copy(regular, use_dora=True)
    magnitude = lm.model[0].adapters["default"].magnitude.detach().double()
    want = torch.linalg.norm(nf4_values(regular), dim=1)  # B = 0: ‖W‖ per output row
    assert torch.allclose(magnitude, want, rtol=1e-6, atol=0)


def test_export_merged_of_tiled_model_matches_closed_form(tmp_path, ids):
    from transformers import AutoModelForCausalLM
    regular = quantize_model(tiny_llama(), "nf4")
    model = copy.deepcopy(regular)
    for m in linear4bit_layers(model):
        tile(m)
    lm = get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                          init_lora_weights=False))
    export_merged(lm, tmp_path / "merged", dtype="float32")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    names = {n: m for n, m in regular.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    for name, ref_layer in names.items():
        delta = lm.model.get_submodule(name).adapters["default"].delta_weight(
            torch.zeros(ref_layer.out_features, ref_layer.in_features)).double()
        want = (nf4_values(ref_layer) + delta).float()
        assert torch.allclose(plain.get_submodule(name).weight, want, atol=1e-6, rtol=0), name
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, lm(input_ids=ids).logits, atol=1e-4)


def test_training_step_on_tiled_model_equals_dense_closed_form(ids):
    """Loss and every adapter gradient of a step on a model whose 4-bit layers were tiled equal
    those on an fp32 model holding the closed-form weights."""
    regular = quantize_model(tiny_llama(), "nf4")
    dense = tiny_llama()  # same embeddings, norms and head; 4-bit layers replaced below
    for name, layer in regular.named_modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            with torch.no_grad():
                dense.get_submodule(name).weight.copy_(nf4_values(layer).float())
    tiled = copy.deepcopy(regular)
    for m in linear4bit_layers(tiled):
        tile(m)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     init_lora_weights=False)
    results = []
    for model in (tiled, dense):
        torch.manual_seed(5)
        lm = get_lora_model(model, cfg)
        lm.train()
        loss = lm(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in lm.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (loss_t, grads_t), (loss_d, grads_d) = results
    assert torch.allclose(loss_t, loss_d, atol=1e-6)
    assert grads_t.keys() == grads_d.keys() and len(grads_t) == 12
    for n in grads_t:
        assert torch.allclose(grads_t[n], grads_d[n], atol=1e-6, rtol=1e-4), n


# ------------------------------------------------------------- with bitsandbytes' real kernel

@needs_avx512_bf16
def test_qlora_trains_after_eval_forward_with_real_tiled_kernel(tmp_path, ids):
    """On an AVX512-BF16 CPU: the CLI's before-training generations (no-grad eval forwards) then
    training give the adapter that training alone gives, and the loss falls."""
    from lorakit.data import SFTData
    tiny_llama().save_pretrained(tmp_path / "tiny")
    rows = [[1 + i % 16] * 12 for i in range(32)]  # repeat the first token: learnable fast
    data = SFTData([{"input_ids": r, "labels": r} for r in rows])

    def run(eval_forward_first: bool) -> tuple[dict, list[float]]:
        model, _ = load_model(tmp_path / "tiny", dtype="float32", quantization="nf4",
                              tokenizer=False)
        assert all(m.compute_dtype == torch.float32 for m in linear4bit_layers(model))
        if eval_forward_first:
            with torch.no_grad():
                model(input_ids=ids)
        torch.manual_seed(0)
        lm = get_lora_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        out = tmp_path / f"run{int(eval_forward_first)}"
        trainer = SFTTrainer(lm, TrainConfig(output_dir=str(out), max_steps=40, logging_steps=1,
                                             learning_rate=3e-2, lr_scheduler_type="constant", max_grad_norm=None,
                                             per_device_train_batch_size=8,
                                             bf16=False, save_steps=None, disable_tqdm=True),
                             train_data=data)
        trainer.train()
        losses = [r["loss"] for r in trainer_state_log(out)]
        return {n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}, \
            losses

    after_eval, losses = run(True)
    plain, _ = run(False)
    for n in plain:
        assert torch.equal(after_eval[n], plain[n]), n
    assert losses[-1] < losses[0] - 0.5


def trainer_state_log(out) -> list[dict]:
    import json
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


# ---------------------------------------------------------------------- the import-time warning

def test_hub_kernel_warning_is_filtered():
    """bitsandbytes logs 'Failed to load CPU gemm_4bit_forward from kernels-community' while
    importing on AVX512-BF16 CPUs (a kernel for the tiled layout lorakit never uses)."""
    import io
    import logging

    from lorakit import compat
    compat.silence_bitsandbytes_hub_kernel_warning()
    logger, seen = logging.getLogger("bitsandbytes.backends.cpu.ops"), io.StringIO()
    handler = logging.StreamHandler(seen)
    logger.addHandler(handler)
    try:
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. "
                       "Please ...", "x")
        logger.warning("another warning")
    finally:
        logger.removeHandler(handler)
    assert "kernels-community" not in seen.getvalue() and "another warning" in seen.getvalue()


def test_no_hub_kernel_warning_in_a_fresh_process():
    """Whoever imports bitsandbytes after lorakit (here: plainly; transformers' trainer utilities
    do it too), the line does not appear (on a CPU without AVX512-BF16 it never does)."""
    code = ("import lorakit, bitsandbytes.functional as f; "
            "print('avx512bf16', bool(f.has_avx512bf16()))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "kernels-community" not in res.stderr and "avx512bf16" in res.stdout
