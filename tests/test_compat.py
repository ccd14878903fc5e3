"""lorakit.compat relies on parts of other libraries that are private or may change: each test
here fails loudly, naming what moved, when an installed version no longer has it."""

from __future__ import annotations

import inspect

import pytest
import torch

from lorakit import compat

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402


def test_bitsandbytes_version_noted():
    if bnb.__version__ != compat.BNB_CHECKED:
        pytest.fail(f"bitsandbytes {bnb.__version__} is installed; lorakit.compat was checked "
                    f"against {compat.BNB_CHECKED}: re-check its entries and update BNB_CHECKED")


def test_bitsandbytes_cpu_tiling_api():
    assert callable(getattr(bnbf, "_convert_weight_packed_for_cpu", None))
    assert callable(getattr(bnbf, "_convert_weight_packed_for_cpu_inverse", None))
    layer = bnb.nn.Linear4bit(64, 64)
    assert hasattr(layer, "support_avx512bf16_for_cpu"), \
        "Linear4bit no longer decides CPU repacking with support_avx512bf16_for_cpu"
    src = inspect.getsource(bnb.nn.Linear4bit.forward)
    assert "support_avx512bf16_for_cpu" in src and "_convert_weight_packed_for_cpu" in src


def test_untile_round_trip_restores_regular_layout():
    from lorakit.base import quantize_model
    torch.manual_seed(0)
    layer = quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 96)), "nf4", skip=())[0]
    codes = layer.weight.data.clone()
    w = layer.weight
    w.data, w.quant_state = bnbf._convert_weight_packed_for_cpu(w.data, w.quant_state)
    layer.quant_state = w.quant_state
    assert compat.is_cpu_tiled(layer)
    compat.keep_regular_layout(layer)
    assert not compat.is_cpu_tiled(layer) and not layer.support_avx512bf16_for_cpu
    assert torch.equal(layer.weight.data, codes)  # the 4-bit codes are exactly the old ones
    assert layer.quant_state is layer.weight.quant_state
    assert compat.double_quant(layer.weight.quant_state)


def test_params4bit_quantize():
    p = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4")
    q = compat.quantize_params4bit(p, "cpu")
    assert q.dtype == torch.uint8 and q.quant_state is not None and q.bnb_quantized


def test_torch_private_attributes():
    from torch import nn
    assert torch.__version__.split("+")[0] == compat.TORCH_CHECKED, \
        f"torch {torch.__version__}: re-check lorakit.compat's torch entries"
    m = nn.Module()
    m.register_buffer("kept", torch.ones(1))
    m.register_buffer("scratch", torch.ones(1), persistent=False)
    assert dict(compat.own_state(m)).keys() == {"kept"} == m.state_dict().keys()
    assert not compat.has_forward_hooks(m)
    handle = m.register_forward_pre_hook(lambda mod, args: None)
    assert compat.has_forward_hooks(m)
    handle.remove()
    assert hasattr(torch.cpu, "_is_avx512_bf16_supported"), "torch.cpu's bf16 probe moved"
    assert hasattr(torch.cpu, "_is_amx_tile_supported"), "torch.cpu's AMX probe moved"


def test_transformers_private_attributes():
    import transformers
    from conftest import make_tiny_llama
    assert transformers.__version__ == compat.TRANSFORMERS_CHECKED, \
        f"transformers {transformers.__version__}: re-check lorakit.compat's entries"
    model = make_tiny_llama()
    assert compat.attn_implementation(model.config) in ("sdpa", "eager")
    assert compat.no_split_modules(model) == ("LlamaDecoderLayer",)
    config = model.config
    config.quantization_config = {"load_in_4bit": True}
    config._pre_quantization_dtype = torch.bfloat16
    plain = compat.unquantized_config(config)
    assert not hasattr(plain, "quantization_config") and not hasattr(plain,
                                                                     "_pre_quantization_dtype")
