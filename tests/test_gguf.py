"""GGUF export and import, checked by independent readers: transformers' GGUF loader (the
merged model's logits, the tokenizer), `gguf.GGUFReader` (the adapter's tensors in the layout
llama.cpp's loader checks), the GGUF that llama.cpp's own converter made of the default model
(the tokenizer arrays), closed-form quantization error bounds and W + (alpha/r)·B·A in llama.cpp's
layout. bench/gguf_llama_cpp.py runs the files in llama.cpp itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit import LoraConfig, get_lora_model
from lorakit.errors import ConfigError
from lorakit.lora.export import export_merged
from lorakit.lora.gguf_export import export_gguf, export_gguf_lora
from lorakit.lora.gguf_meta import permute_rows, pre_tokenizer_name, write_tokenizer
from lorakit.lora.modelfile import modelfile_text, ollama_template

pytestmark = pytest.mark.default_model  # every export writes SmolLM2's real tokenizer

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
# transformers' GGUF reader takes Qwen3's head_dim and Qwen3-MoE's expert width from the config
# class defaults (128, 768), so those tiny models use them; lorakit writes both keys anyway
ARCHS = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(head_dim=16)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=128)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, moe_intermediate_size=768, num_experts=4,
                                         num_experts_per_tok=2, norm_topk_prob=True)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
}
READABLE = [a for a in ARCHS if a != "mixtral"]  # transformers' GGUF reader has no Mixtral


def tiny(arch: str, vocab_size: int, seed: int = 0, **kw):
    cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    config = getattr(transformers, cls)(vocab_size=vocab_size, **{**COMMON, **extra, **kw})
    return AutoModelForCausalLM.from_config(config).float().eval()


def adapted(model, **config):
    config = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **config}
    return get_lora_model(model, LoraConfig(init_lora_weights=False, **config))


def read_gguf_model(path: Path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", READABLE)
def test_merged_f32_gguf_gives_the_merged_models_logits(arch, tmp_path, smol_tokenizer):
    lora = adapted(tiny(arch, len(smol_tokenizer)))
    export_merged(lora, tmp_path / "merged", "float32", smol_tokenizer)
    path = export_gguf(lora, tmp_path / "m.gguf", smol_tokenizer, "f32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    ids = torch.randint(0, len(smol_tokenizer), (2, 13), generator=torch.Generator().manual_seed(0))
    diff = (logits(read_gguf_model(path), ids) - logits(merged, ids)).abs().max().item()
    assert diff <= 1e-5, diff


def test_a_bare_base_exports_whole(tmp_path, smol_tokenizer):
    """Without an adapter (`lorakit export` with no --adapter): the causal LM with its head,
    not the decoder stack a transformers model keeps under `.model`."""
    model = tiny("llama", len(smol_tokenizer), tie_word_embeddings=False)
    path = export_gguf(model, tmp_path / "m.gguf", smol_tokenizer, "f32")
    assert "output.weight" in {t.name for t in gguf.GGUFReader(path).tensors}
    ids = torch.randint(0, len(smol_tokenizer), (1, 9), generator=torch.Generator().manual_seed(0))
    assert (logits(read_gguf_model(path), ids) - logits(model, ids)).abs().max() <= 1e-5


def test_mixtral_is_llama_cpps_llama_graph_with_experts(tmp_path, smol_tokenizer):
    """No transformers reader for Mixtral GGUF: the tensors against the merged checkpoint
    (experts split into gate, up and down, q/k rows permuted), and the MoE keys llama.cpp reads.
    bench/gguf_architectures.py runs it in llama.cpp."""
    lora = adapted(tiny("mixtral", len(smol_tokenizer)))
    export_merged(lora, tmp_path / "merged", "float32")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    reader = gguf.GGUFReader(export_gguf(lora, tmp_path / "m.gguf", smol_tokenizer, "f32"))
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("llama.")}
    assert fields["llama.expert_count"] == 4 and fields["llama.expert_used_count"] == 2
    assert fields["llama.feed_forward_length"] == 96
    got = {t.name: np.array(t.data) for t in reader.tensors}
    # transformers saves Mixtral in its original per-expert layout: w1 gate, w3 up, w2 down
    moe = "model.layers.1.block_sparse_moe."
    for kind, w in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
        for e in range(4):
            np.testing.assert_array_equal(got[f"blk.1.ffn_{kind}_exps.weight"][e],
                                          merged[f"{moe}experts.{e}.{w}.weight"].numpy())
    np.testing.assert_array_equal(got["blk.1.ffn_gate_inp.weight"],
                                  merged[moe + "gate.weight"].numpy())
    np.testing.assert_array_equal(got["blk.1.attn_k.weight"], permute_rows(
        merged["model.layers.1.self_attn.k_proj.weight"].numpy(), 2))


@pytest.mark.parametrize("outtype, dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_f16_bf16_are_the_merged_weights_rounded_once(outtype, dtype, tmp_path, smol_tokenizer):
    """llama.cpp's convention: matrices in the 16-bit type, 1-D tensors (norms) in F32."""
    lora = adapted(tiny("qwen2", len(smol_tokenizer), attention_bias=True))
    export_merged(lora, tmp_path / "merged", "float32")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    read = read_gguf_model(export_gguf(lora, tmp_path / "m.gguf", smol_tokenizer, outtype))
    for key, got in read.state_dict().items():
        want = merged.get(key, merged["model.embed_tokens.weight"])  # tied head
        if want.dim() == 2:
            want = want.to(dtype).float()
        assert torch.equal(got, want), key


@pytest.mark.parametrize("outtype", ["q8_0", "q4_0"])
def test_quantized_weights_within_the_block_bound(outtype, tmp_path, smol_tokenizer):
    """Each 32-value block keeps a scale d = amax/127 (q8_0) or amax/8 (q4_0, 16 levels):
    every weight is within d/2 of its value, d at the clipped edge of q4_0."""
    lora = adapted(tiny("llama", len(smol_tokenizer), tie_word_embeddings=False,
                        intermediate_size=80))
    export_merged(lora, tmp_path / "merged", "float32")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    path = export_gguf(lora, tmp_path / "m.gguf", smol_tokenizer, outtype)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.ffn_down.weight"] == "F16"  # rows of 80: not whole blocks of 32
    big = "Q8_0"  # q4_0 keeps the embeddings and the output head in Q8_0
    assert types["token_embd.weight"] == types["output.weight"] == big
    assert types["blk.1.attn_q.weight"] == outtype.upper()
    for key, got in read_gguf_model(path).state_dict().items():
        want = merged[key]
        if want.dim() == 1 or want.shape[-1] % 32:
            continue
        blocks = want.reshape(-1, 32)
        amax = blocks.abs().amax(dim=1, keepdim=True)
        quant = outtype if key not in ("model.embed_tokens.weight", "lm_head.weight") else "q8_0"
        bound = amax / 254 if quant == "q8_0" else amax / 8
        err = (got.reshape(-1, 32) - blocks).abs()
        assert (err <= bound * 1.01 + amax * 2**-10).all(), key  # + the scale's f16 rounding


def test_tokenizer_arrays_equal_llama_cpps_converter(smol_tokenizer):
    """The default model's GGUF was written by llama.cpp's convert_hf_to_gguf.py: lorakit's
    arrays from the HF tokenizer are the same."""
    from lorakit.base.default_model import find_default_gguf

    reference = gguf.GGUFReader(find_default_gguf())
    writer = gguf.GGUFWriter(None, "llama")
    write_tokenizer(writer, smol_tokenizer, 49152)
    ours = {k: v.value for k, v in writer.kv_data[0].items()}
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.ggml.model", "tokenizer.chat_template"):
        assert list(np.atleast_1d(reference.fields[key].contents())) == list(
            np.atleast_1d(ours[key])), key
    # transformers' GGUF reader builds the default tokenizer without SmolLM's digit split, so
    # lorakit trains with GPT-2's splitting and says so to llama.cpp
    assert ours["tokenizer.ggml.pre"] == "gpt-2"


def test_exported_tokenizer_reads_back_the_same(tmp_path, smol_tokenizer):
    path = export_gguf(tiny("llama", len(smol_tokenizer)), tmp_path / "m.gguf", smol_tokenizer)
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    texts = ["Hello world", "The date is 2024-03-05.", "  spaces\tand\nnewlines  ", "12345 + 678"]
    for text in texts:
        assert back(text)["input_ids"] == smol_tokenizer(text)["input_ids"], text
    chat = [{"role": "user", "content": "What is 2+2?"}]
    assert back.apply_chat_template(chat, tokenize=False) == smol_tokenizer.apply_chat_template(
        chat, tokenize=False)


LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
          r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.mark.parametrize("pre, name", [
    ({"type": "ByteLevel", "use_regex": True}, "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                            {"type": "ByteLevel", "use_regex": True}]}, "smollm"),
    ({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3}, "behavior": "Isolated"},
        {"type": "ByteLevel", "use_regex": False}]}, "llama-bpe"),
])
def test_pre_tokenizer_names(pre, name):
    assert pre_tokenizer_name({"pre_tokenizer": pre}) == name


def test_unknown_pre_tokenizer_is_refused():
    with pytest.raises(ConfigError, match="does not know a llama.cpp pre-tokenizer"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}})


def llama_cpp_layout(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """What llama.cpp adds to a weight for one lora_a / lora_b pair (numpy order [out, in])."""
    return b.astype(np.float64) @ a.astype(np.float64)


@pytest.mark.parametrize("variant", ["plain", "rslora+patterns"])
def test_adapter_gguf_is_pefts_tensors_in_llama_cpps_layout(variant, tmp_path, smol_tokenizer):
    """The adapter GGUF holds PEFT's A and B (B's q/k rows in llama.cpp's order, a per-layer
    scale folded in where one alpha/r per file cannot express it), and base + alpha/r · B·A in
    llama.cpp's layout is the merged GGUF, tensor by tensor."""
    extra = {} if variant == "plain" else dict(
        use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3})
    base = tiny("llama", len(smol_tokenizer), tie_word_embeddings=False)
    export_gguf(base, tmp_path / "base.gguf", smol_tokenizer, "f32")
    lora = adapted(base, **extra)
    lora.save_pretrained(tmp_path / "adapter")
    export_gguf(lora, tmp_path / "merged.gguf", smol_tokenizer, "f32")
    export_gguf_lora(lora, tmp_path / "adapter.gguf")

    reader = gguf.GGUFReader(tmp_path / "adapter.gguf")
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["general.architecture"].contents() == "llama"
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    assert alpha == 8.0
    tensors = {t.name: t for t in reader.tensors}
    base_t = {t.name: t for t in gguf.GGUFReader(tmp_path / "base.gguf").tensors}
    merged_t = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "merged.gguf").tensors}
    peft = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert len(tensors) == len(peft) == 2 * 7 * 2
    for key, a_peft in peft.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        layer, kind = module.split(".")[2], module.split(".")[-1]
        name = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj":
                "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
                "down_proj": "ffn_down"}[kind]
        weight = f"blk.{layer}.{name}.weight"
        a, b = tensors[weight + ".lora_a"], tensors[weight + ".lora_b"]
        # llama.cpp's loader: a.ne[0] = w.ne[0] (in), b.ne[1] = w.ne[1] (out), a.ne[1] = b.ne[0]
        w_ne = list(base_t[weight].shape)
        assert a.shape[0] == w_ne[0] and b.shape[1] == w_ne[1] and a.shape[1] == b.shape[0]
        r = int(a.shape[1])
        b_peft = peft[key.replace("lora_A", "lora_B")].numpy()
        heads = {"q_proj": 4, "k_proj": 2}.get(kind)
        if heads:
            b_peft = permute_rows(b_peft, heads)
        np.testing.assert_array_equal(np.array(a.data), a_peft.numpy())
        scale = config["alpha_pattern"].get(kind, config["lora_alpha"])
        scale = scale / (r ** 0.5 if config["use_rslora"] else r)
        np.testing.assert_allclose(np.array(b.data) * (alpha / r), b_peft * scale, rtol=1e-6,
                                   atol=1e-7)
        applied = np.array(base_t[weight].data) + (alpha / r) * llama_cpp_layout(
            np.array(a.data), np.array(b.data))
        np.testing.assert_allclose(applied, merged_t[weight], rtol=0, atol=1e-5)


@pytest.mark.parametrize("case, config, match", [
    ("modules_to_save", dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
     "modules_to_save"),
    ("dora", dict(target_modules=["q_proj"], use_dora=True), "DoRA"),
    ("tied head", dict(target_modules=["lm_head"]), "ties to its embeddings"),
    ("bias", dict(target_modules=["q_proj"], bias="all"), "biases"),
])
def test_adapter_llama_cpp_cannot_load_is_refused(case, config, match, tmp_path, smol_tokenizer):
    lora = adapted(tiny("llama", len(smol_tokenizer), attention_bias=True), **config)
    with pytest.raises(ConfigError, match=match):
        export_gguf_lora(lora, tmp_path / "a.gguf")
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_expert_parameters_adapter_is_refused(tmp_path, smol_tokenizer):
    lora = adapted(tiny("qwen3_moe", len(smol_tokenizer)), target_modules=["q_proj"],
                   target_parameters=["mlp.experts.down_proj"])
    with pytest.raises(ConfigError, match="fused expert parameters"):
        export_gguf_lora(lora, tmp_path / "a.gguf")


@pytest.mark.parametrize("model, match", [
    (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1,
                                                                   n_head=2)), "supports"),
    (lambda: tiny("llama", 64, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4,
                                                "factor": 4.0,
                                                "original_max_position_embeddings": 32}),
     "RoPE types default, linear, llama3"),
    (lambda: tiny("qwen2", 64, rope_parameters={"rope_type": "linear", "rope_theta": 1e4,
                                                "factor": 2.0}), "RoPE types default;"),
    (lambda: tiny("qwen3_moe", 64, norm_topk_prob=False), "norm_topk_prob"),
])
def test_models_llama_cpp_would_compute_otherwise_are_refused(model, match, tmp_path,
                                                              smol_tokenizer):
    with pytest.raises(ConfigError, match=match):
        export_gguf(model(), tmp_path / "m.gguf", smol_tokenizer)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("outtype, adapter, match", [
    ("q4_k_m", False, "llama-quantize"), ("q8_0", True, "f32, f16, bf16"), ("int3", False, "q4_0"),
])
def test_unknown_outtypes_are_refused(outtype, adapter, match, tmp_path, smol_tokenizer):
    model = tiny("llama", len(smol_tokenizer))
    with pytest.raises(ConfigError, match=match):
        if adapter:
            export_gguf_lora(adapted(model), tmp_path / "a.gguf", outtype=outtype)
        else:
            export_gguf(model, tmp_path / "m.gguf", smol_tokenizer, outtype)


def test_a_failed_write_leaves_nothing(tmp_path, smol_tokenizer, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(b"the previous export")

    def disk_full(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(OSError, match="m.gguf"):
        export_gguf(tiny("llama", len(smol_tokenizer)), tmp_path / "m.gguf", smol_tokenizer)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    assert (tmp_path / "m.gguf").read_bytes() == b"the previous export"


def test_modelfile_template_renders_as_the_chat_template(smol_tokenizer):
    template, end = ollama_template(smol_tokenizer)
    # Ollama's one-turn variables, filled by hand as Ollama's Go template would
    fill = {"{{ .System }}": "Be brief.", "{{ .Prompt }}": "Hi", "{{ .Response }}": "Hello"}
    with_system = template.split("{{ if .System }}")[1].split("{{ else }}")[0]
    for k, v in fill.items():
        with_system = with_system.replace(k, v)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert with_system == smol_tokenizer.apply_chat_template(chat, tokenize=False,
                                                             add_generation_prompt=True)
    assert end.strip() == "<|im_end|>"
    text = modelfile_text(smol_tokenizer, "./base.gguf", "./a.gguf")
    assert text.startswith("FROM ./base.gguf\nADAPTER ./a.gguf\nTEMPLATE \"\"\"{{ if .System }}")
    assert 'PARAMETER stop "<|im_end|>"' in text


def test_modelfile_without_chat_template(smol_tokenizer):
    import copy

    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = None
    assert ollama_template(tok) is None
    assert "no TEMPLATE" in modelfile_text(tok, "./m.gguf")


def lorakit(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorakit", *map(str, args)], text=True,
                          capture_output=True, env={**os.environ, **env}, timeout=300)


@pytest.mark.slow
def test_cli_export_then_gguf_as_base_generates_as_the_merged_model(tmp_path, smol_tokenizer):
    """As a user types it: export the merged model, then give the .gguf as --model; greedy
    output equals the base + adapter's."""
    from conftest import save_tiny_chat_model, tiny_chat_model

    model_dir = save_tiny_chat_model(tmp_path / "base", smol_tokenizer,
                                     tiny_chat_model(smol_tokenizer).float())
    lora = adapted(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    lora.save_pretrained(tmp_path / "adapter")
    env = {"LORAKIT_HOME": str(tmp_path / "home")}
    out = tmp_path / "export" / "model.gguf"
    done = lorakit("export", "--model", model_dir, "--adapter", tmp_path / "adapter",
                   "--output", out, "--outtype", "f32", env=env)
    assert done.returncode == 0, done.stderr
    assert "ollama create" in done.stdout and (out.parent / "model.Modelfile").is_file()
    assert (out.parent / "model.Modelfile").read_text().startswith("FROM ./model.gguf\n")
    args = ("--max-new-tokens", "12", "--dtype", "float32", "--chat", "What is 2+2?")
    ref = lorakit("generate", "--model", model_dir, "--adapter", tmp_path / "adapter", *args,
                  env=env)
    got = lorakit("generate", "--model", out, *args, env=env)
    assert ref.returncode == 0 and got.returncode == 0, ref.stderr + got.stderr
    assert got.stdout == ref.stdout and ref.stdout.strip()
    assert "converting the GGUF model" in got.stderr
    again = lorakit("generate", "--model", out, *args, env=env)
    assert again.stdout == ref.stdout and "converting" not in again.stderr  # cached

    lora_out = tmp_path / "export" / "adapter.gguf"
    done = lorakit("export", "--model", model_dir, "--adapter", tmp_path / "adapter",
                   "--format", "gguf-lora", "--output", lora_out, env=env)
    assert done.returncode == 0, done.stderr
    assert "base.gguf" in done.stdout  # the base is not a GGUF: the Modelfile says where
    modelfile = (lora_out.parent / "adapter.Modelfile").read_text()
    assert modelfile.startswith("FROM ./base.gguf\nADAPTER ./adapter.gguf\n")


@pytest.mark.parametrize("args, message", [
    (["--outtype", "q4_k_m"], "llama-quantize"),
    (["--format", "gguf-lora"], "needs --adapter|pass --adapter"),
    (["--output-exists"], "exists"),
])
def test_cli_export_errors_are_one_line(args, message, tmp_path):
    out = tmp_path / "m.gguf"
    if args == ["--output-exists"]:
        out.write_bytes(b"x")
        args = []
    done = lorakit("export", "--output", out, *args, env={})
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert any(m in done.stderr for m in message.split("|")), done.stderr


def test_qlora_base_is_dequantized_exactly_before_merging(tmp_path, smol_tokenizer):
    """A LoRA model on a 4-bit base: the GGUF holds the NF4 values plus the adapters, as
    `export_merged` (the merge lorakit recommends for QLoRA) writes them."""
    from lorakit.base import quantize_model

    base = quantize_model(tiny("llama", len(smol_tokenizer), tie_word_embeddings=False), "nf4")
    lora = adapted(base)
    export_merged(lora, tmp_path / "merged", "float32")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    read = read_gguf_model(export_gguf(lora, tmp_path / "m.gguf", smol_tokenizer, "f32"))
    for key, got in read.state_dict().items():
        assert torch.equal(got, merged[key]), key


def llama3_factors(theta: float, dim: int, factor: float, low: float, high: float, old: int):
    """Meta's Llama 3.1 RoPE scaling in float64: what each pair's frequency is divided by."""
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * np.pi * theta ** (i / dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out)


@pytest.mark.parametrize("rope", ["linear", "llama3"])
def test_scaled_rope_is_written_as_llama_cpps_rope_freqs(rope, tmp_path, smol_tokenizer):
    """llama.cpp's llama graph divides each pair's frequency by `rope_freqs`; the closed form
    (head_dim 16: pairs in all three llama3 regimes with a 64-token original context)."""
    params = {"rope_type": rope, "rope_theta": 1e4, "factor": 8.0}
    if rope == "llama3":
        params.update(low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=64)
    model = tiny("llama", len(smol_tokenizer), rope_parameters=params)
    path = export_gguf(model, tmp_path / "m.gguf", smol_tokenizer, "f32")
    [freqs] = [t for t in gguf.GGUFReader(path).tensors if t.name == "rope_freqs.weight"]
    want = (llama3_factors(1e4, 16, 8.0, 1.0, 4.0, 64) if rope == "llama3"
            else np.full(8, 8.0))
    assert len(set(np.round(want, 6))) == (4 if rope == "llama3" else 1)
    np.testing.assert_allclose(np.array(freqs.data), want, rtol=1e-6)


def test_a_sliding_window_llama_cpp_lacks_is_said(tmp_path, smol_tokenizer, caplog):
    """Mistral v0.1 looks back 4096 tokens; llama.cpp's llama graph (as its own converter
    writes Mistral) attends to everything: exported, with one warning line."""
    model = tiny("mistral", len(smol_tokenizer), sliding_window=4096)
    with caplog.at_level("WARNING"):
        export_gguf(model, tmp_path / "m.gguf", smol_tokenizer, "f32")
    assert "past 4096 tokens" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        export_gguf(tiny("qwen2", len(smol_tokenizer)), tmp_path / "q.gguf", smol_tokenizer)
    assert "past" not in caplog.text  # Qwen2's window is off unless use_sliding_window
