"""QLoRA: bitsandbytes 4-bit (and 8-bit) bases, LoRA training on them, merge, export, PEFT interop.

Tiny models here use hidden 64 / intermediate 128 / k,v width 32 rather than conftest's hidden 32:
bitsandbytes quantizes the flattened weight in blocks of 64 (any size works), but on CPUs with
AVX512-BF16 it repacks weights for inference in tiles of 32 output rows, which needs every
layer's out_features to be a multiple of 32.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

bnb = pytest.importorskip("bitsandbytes")

from lorakit import LoraConfig, LoraModel, get_lora_model  # noqa: E402
from lorakit.base import load_model, prepare_for_kbit_training, quantize_model  # noqa: E402
from lorakit.lora import dequantize_model, export_merged  # noqa: E402
from lorakit.base.loading import QuantizationUnsupportedError, _probe_quantization  # noqa: E402
from lorakit.base.quantize import quantized_layers, quantized_storage_bits  # noqa: E402
from lorakit.lora.backends import dense_weight, write_dense_weight  # noqa: E402

VOCAB = 128
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      **kw)
    return LlamaForCausalLM(cfg).to(dtype).eval()


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def tiny_dir(tmp_path):
    d = tmp_path / "tiny"
    tiny_llama().save_pretrained(d)
    return d


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def lora_cfg(**kw) -> LoraConfig:
    kw = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", **kw}
    return LoraConfig(**kw)


# ----------------------------------------------------------------------------------- injection

@pytest.mark.parametrize("quant_type,rel_err", [("nf4", 0.1), ("fp4", 0.2)])
def test_4bit_injection_layers_and_format(quant_type, rel_err, ids):
    ref = tiny_llama()
    model = quantize_model(tiny_llama(), quant_type)
    for i in range(2):
        layer = model.model.layers[i]
        for name in LINEAR_NAMES:
            mod = layer.get_submodule(("self_attn." if name in LINEAR_NAMES[:4] else "mlp.") + name)
            assert isinstance(mod, bnb.nn.Linear4bit), name
            w = mod.weight
            assert isinstance(w, bnb.nn.Params4bit) and w.dtype == torch.uint8
            assert not w.requires_grad
            qs = w.quant_state
            assert qs.quant_type == quant_type and qs.blocksize == 64
            assert qs.nested and qs.state2 is not None  # double quantization: absmax quantized
            assert qs.absmax.dtype == torch.uint8 and qs.state2.absmax.dtype == torch.float32
            assert qs.dtype == torch.float32 and mod.compute_dtype == torch.float32
            assert mod.quant_state is qs
    # embeddings, norms and lm_head untouched, in the base dtype
    assert type(model.model.embed_tokens) is nn.Embedding
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    norms = [m for m in model.modules() if "RMSNorm" in type(m).__name__]
    assert len(norms) == 5 and all(n.weight.dtype == torch.float32 for n in norms)
    assert len(quantized_layers(model)) == 14
    # 4-bit is an approximation of the same function (FP4's grid is coarser than NF4's)
    a, b = logits(ref, ids), logits(model, ids)
    assert torch.isfinite(b).all()
    assert (a - b).abs().mean() < rel_err * a.abs().mean()


def test_tied_lm_head_never_quantized():
    model = quantize_model(tiny_llama(tie_word_embeddings=True), "nf4", skip=())
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_skip_and_compute_dtype():
    model = quantize_model(tiny_llama(), "nf4", compute_dtype=torch.bfloat16,
                           skip=("down_proj", "model.layers.0.self_attn.q_proj"))
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert isinstance(model.model.layers[1].self_attn.q_proj, bnb.nn.Linear4bit)
    assert model.model.layers[1].self_attn.q_proj.compute_dtype == torch.bfloat16


def test_quantize_twice_or_after_lora_is_refused():
    model = get_lora_model(tiny_llama(), lora_cfg())
    with pytest.raises(ValueError, match="before adding LoRA"):
        quantize_model(model.model, "nf4")
    with pytest.raises(ValueError, match="quant_type"):
        quantize_model(tiny_llama(), "int4")


def test_bf16_base_nf4(ids):
    model = quantize_model(tiny_llama(dtype=torch.bfloat16), "nf4")
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.quant_state.dtype == torch.bfloat16 and q.compute_dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.bfloat16
    out = model(input_ids=ids).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_storage_is_about_4_bits_per_weight():
    layer = nn.Sequential(nn.Linear(1024, 1024, bias=False))
    quantize_model(layer, "nf4", skip=())
    bits, n = quantized_storage_bits(layer)
    assert n == 1024 * 1024
    # 4 (packed) + 8/64 (uint8 absmax) + 32/(64*256) (nested fp32 absmax) + code tables
    assert 4.12 < bits / n <= 4.2
    single = nn.Sequential(nn.Linear(1024, 1024, bias=False))
    quantize_model(single, "nf4", skip=(), double_quant=False)
    bits1, _ = quantized_storage_bits(single)
    assert bits1 / n > 4.5  # fp32 absmax per block of 64: double quant is what buys the 0.37 bit


def test_load_model_quantizes_like_quantize_model(tiny_dir, ids):
    """transformers' BitsAndBytesConfig path (used by load_model) == our in-memory path."""
    loaded, tok = load_model(tiny_dir, dtype="float32", quantization="nf4", tokenizer=False)
    assert tok is None
    ours = quantize_model(tiny_llama(), "nf4")
    a, b = dict(quantized_layers(loaded)), dict(quantized_layers(ours))
    assert a.keys() == b.keys() and len(a) == 14
    for name in a:
        qa, qb = a[name].weight.quant_state, b[name].weight.quant_state
        assert torch.equal(a[name].weight.data, b[name].weight.data), name
        assert torch.equal(qa.absmax, qb.absmax) and torch.equal(qa.state2.absmax, qb.state2.absmax)
        assert (qa.blocksize, qa.quant_type, qa.nested) == (64, "nf4", True)
    assert type(loaded.lm_head) is nn.Linear
    assert torch.equal(logits(loaded, ids), logits(ours, ids))


def test_load_model_compute_dtype_and_fp4(tiny_dir):
    model, _ = load_model(tiny_dir, dtype="float32", quantization="fp4",
                          compute_dtype="bfloat16", tokenizer=False)
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.quant_state.quant_type == "fp4" and q.compute_dtype == torch.bfloat16


def test_int8(tiny_dir, ids):
    ref = tiny_llama()
    model = quantize_model(tiny_llama(), "int8")
    layers = quantized_layers(model)
    assert len(layers) == 14 and all(isinstance(m, bnb.nn.Linear8bitLt) for m in layers.values())
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.int8
    assert type(model.lm_head) is nn.Linear
    a = logits(ref, ids)
    assert (logits(model, ids) - a).abs().mean() < 0.05 * a.abs().mean()
    loaded, _ = load_model(tiny_dir, dtype="float32", quantization="int8", tokenizer=False)
    assert isinstance(loaded.model.layers[1].self_attn.v_proj, bnb.nn.Linear8bitLt)
    # dequantizing recovers the int8 values: rows scaled by absmax / 127
    plain = dequantize_model(quantize_model(tiny_llama(), "int8"))
    w, w0 = plain.model.layers[0].mlp.up_proj.weight, ref.model.layers[0].mlp.up_proj.weight
    assert type(plain.model.layers[0].mlp.up_proj) is nn.Linear
    assert (w - w0).abs().max() <= w0.abs().amax(dim=1).max() / 127


def test_int8_lora_export(tmp_path, ids):
    lm = _random_lora_on_nf4(base=quantize_model(tiny_llama(), "int8"))
    ref = logits(lm, ids)  # the first forward moves int8 row scales into the layer state
    exported = AutoModelForCausalLM.from_pretrained(export_merged(lm, tmp_path / "m", "float32"))
    # LLM.int8() also quantizes activations, so the int8 model itself is the approximate one
    assert (logits(exported, ids) - ref).abs().mean() < 0.05 * ref.abs().mean()


def test_unsupported_quantization_is_a_clear_error(tiny_dir, monkeypatch):
    with pytest.raises(ValueError, match="unknown quantization"):
        load_model(tiny_dir, quantization="int4")

    def no_kernel(*a, **k):
        raise NotImplementedError("no 4-bit kernel for this device")

    _probe_quantization.cache_clear()
    monkeypatch.setattr(bnb.functional, "quantize_4bit", no_kernel)
    try:
        with pytest.raises(QuantizationUnsupportedError, match="nf4.*not available on cpu.*kernel"):
            load_model(tiny_dir, quantization="nf4", tokenizer=False)
    finally:
        _probe_quantization.cache_clear()


# ---------------------------------------------------------------------------------- dense access

def test_dense_weight_and_requantize_roundtrip():
    layer = quantize_model(nn.Sequential(nn.Linear(64, 96)), "nf4", skip=())[0]
    w0 = dense_weight(layer)
    packed0 = layer.weight.data.clone()
    assert w0.dtype == torch.float32 and w0.shape == (96, 64)
    w0.zero_()  # a copy: the layer does not change
    assert dense_weight(layer).abs().sum() > 0
    write_dense_weight(layer, dense_weight(layer))  # quantizing NF4 values reproduces them
    assert torch.equal(layer.weight.data, packed0)
    qs = layer.weight.quant_state
    assert layer.quant_state is qs and (qs.quant_type, qs.blocksize, qs.nested) == ("nf4", 64, True)
    target = torch.randn(96, 64) * 0.1
    write_dense_weight(layer, target)
    # NF4 rounds to the nearest of 16 levels per block: at most half the widest gap (0.14) × absmax
    assert (dense_weight(layer) - target).abs().max() < 0.15 * target.abs().max()
    with pytest.raises(ValueError, match="shape"):
        write_dense_weight(layer, torch.zeros(64, 96))


# -------------------------------------------------------------------------------- k-bit training

def test_prepare_does_not_upcast(ids):
    model = quantize_model(tiny_llama(dtype=torch.bfloat16), "nf4")
    before = {n: p.dtype for n, p in model.named_parameters()}
    prepare_for_kbit_training(model)
    assert {n: p.dtype for n, p in model.named_parameters()} == before
    assert not any(p.requires_grad for p in model.parameters())
    # PEFT's prepare_model_for_kbit_training upcasts every non-quantized bf16 parameter to fp32
    peft = pytest.importorskip("peft")
    other = peft.prepare_model_for_kbit_training(
        quantize_model(tiny_llama(dtype=torch.bfloat16), "nf4"), use_gradient_checkpointing=False)
    assert other.model.embed_tokens.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_prepare_with_gradient_checkpointing_trains(ids):
    model = prepare_for_kbit_training(quantize_model(tiny_llama(), "nf4"),
                                      gradient_checkpointing=True)
    assert model.is_gradient_checkpointing and model.config.use_cache is False
    lm = get_lora_model(model, lora_cfg(init_lora_weights=False))
    lm.train()
    lm(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in lm.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for n, p in lm.named_parameters() if not p.requires_grad)


def _tiny_task(n: int = 4, length: int = 12) -> torch.Tensor:
    # each sequence counts upward from a random start: next token = previous + 1 (mod vocab)
    starts = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(3))
    return (starts + torch.arange(length)) % VOCAB


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_lora_on_nf4_base_learns(base_dtype):
    # initializer_range 0.2: with HF's default 0.02 a frozen random lm_head after the final
    # RMSNorm cannot produce confident logits, whatever the adapters learn
    base = tiny_llama(dtype=base_dtype, initializer_range=0.2)
    model = prepare_for_kbit_training(quantize_model(base, "nf4"))
    lm = get_lora_model(model, lora_cfg(r=8, lora_alpha=16))
    trainable = [p for p in lm.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # adapters stay fp32
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    data = _tiny_task()
    packed = {n: m.weight.data.clone() for n, m in quantized_layers(lm.model).items()}
    lm.train()
    losses = []
    for _ in range(12):
        loss = lm(input_ids=data, labels=data).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses
    # the 4-bit base did not move
    after = {n: m.weight.data for n, m in quantized_layers(lm.model).items()}
    assert after.keys() == packed.keys() and all(torch.equal(after[n], packed[n]) for n in packed)


# ----------------------------------------------------------------------------- merge and export

def _random_lora_on_nf4(seed=0, base=None):
    base = base if base is not None else quantize_model(tiny_llama(), "nf4")
    torch.manual_seed(seed)
    return get_lora_model(base, lora_cfg(init_lora_weights=False)).eval()


def test_merge_into_4bit_warns_and_stays_4bit(ids):
    lm = _random_lora_on_nf4()
    ref = logits(lm, ids)
    with pytest.warns(UserWarning, match="lossy"):
        lm.merge_adapter()
    merged = logits(lm, ids)
    q = lm.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q, bnb.nn.Linear4bit)
    qs = q.weight.quant_state
    assert (qs.quant_type, qs.blocksize, qs.nested) == ("nf4", 64, True) and q.quant_state is qs
    # re-quantizing W + ΔW rounds to the NF4 grid: close, not equal
    assert 0 < (merged - ref).abs().max() < 0.25 * ref.abs().max()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = lm.merge_and_unload()
    assert isinstance(plain.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 0.15)])
def test_export_merged_matches_unmerged_qlora(tmp_path, ids, dtype, tol):
    """Exported logits ≈ the 4-bit + LoRA model: exact up to fp32 rounding for float32 (the
    dequantized NF4 values plus ΔW are exactly what the 4-bit model computes with); bf16
    rounding of weights and activations for bfloat16."""
    lm = _random_lora_on_nf4()
    ref = logits(lm, ids)
    out = export_merged(lm, tmp_path / "merged", dtype=dtype)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == dtype
    assert not list(tmp_path.glob(".merged.*"))  # no temp dir left behind
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert exported.dtype == getattr(torch, dtype)
    assert not quantized_layers(exported)
    assert (logits(exported, ids) - ref).abs().max() < tol
    # the LoRA model itself is untouched
    assert torch.equal(logits(lm, ids), ref)


def test_export_merged_from_load_model_base_tied(tmp_path, ids):
    d = tmp_path / "tied"
    tiny_llama(tie_word_embeddings=True).save_pretrained(d)
    base, _ = load_model(d, dtype="float32", quantization="nf4", tokenizer=False)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    lm = _random_lora_on_nf4(base=base)
    ref = logits(lm, ids)
    out = export_merged(lm, tmp_path / "m", dtype="float32")
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert exported.lm_head.weight is exported.model.embed_tokens.weight
    assert (logits(exported, ids) - ref).abs().max() < 1e-4
    # exporting again over an existing directory replaces it
    export_merged(lm, out, dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_dequantize_model_is_exact(ids):
    model = quantize_model(tiny_llama(), "nf4")
    ref = logits(model, ids)
    dequantize_model(model)
    assert not quantized_layers(model)
    assert (logits(model, ids) - ref).abs().max() < 1e-5


# --------------------------------------------------------------------------------- PEFT interop

def test_peft_adapter_loads_on_our_nf4_base(tmp_path, tiny_dir, ids):
    peft = pytest.importorskip("peft")
    pbase, _ = load_model(tiny_dir, dtype="float32", quantization="nf4", tokenizer=False)
    torch.manual_seed(0)
    pm = peft.get_peft_model(pbase, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                     init_lora_weights=False))
    assert type(pm.base_model.model.model.layers[0].self_attn.q_proj).__module__ \
        == "peft.tuners.lora.bnb"
    pm.eval()
    ref = logits(pm, ids)
    pm.save_pretrained(tmp_path / "peft_adapter")
    ours = LoraModel.from_pretrained(quantize_model(tiny_llama(), "nf4"), tmp_path / "peft_adapter")
    assert (logits(ours.eval(), ids) - ref).abs().max() <= 1e-4


def test_our_adapter_loads_in_peft_on_bnb_nf4_base(tmp_path, tiny_dir, ids):
    peft = pytest.importorskip("peft")
    lm = _random_lora_on_nf4()
    ref = logits(lm, ids)
    lm.save_pretrained(tmp_path / "ours")
    pbase, _ = load_model(tiny_dir, dtype="float32", quantization="nf4", tokenizer=False)
    pm = peft.PeftModel.from_pretrained(pbase, tmp_path / "ours").eval()
    assert (logits(pm, ids) - ref).abs().max() <= 1e-4


def test_merging_into_int8_is_refused_not_garbled():
    bnb = pytest.importorskip("bitsandbytes")
    from lorakit import LoraConfig, get_lora_model
    model = get_lora_model(quantize_model(tiny_llama(), "int8"),
                           LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    layer = model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, bnb.nn.Linear8bitLt)
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(NotImplementedError, match="export_merged"):
        model.merge_adapter()
    assert torch.equal(layer.base_layer.weight, before)
