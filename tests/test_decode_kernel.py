"""The compiled decoding kernel (lorakit/lora/decode_kernel.cpp): against a float64 closed form,
inside a model's decoding step against each row's adapter alone and against the torch path it
replaces, and its fallback when it cannot be built."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import VOCAB, make_tiny_llama

from lorakit import LoraConfig, get_lora_model
from lorakit.compat import new_kv_cache
from lorakit.lora import decode_kernel as dk
from lorakit.lora import mixed as mixed_mod
from lorakit.lora.layer import LoraLayer

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="no C++ compiler: the kernel cannot be built here (the torch path decodes)",
)


@pytest.fixture(scope="module")
def kernel():
    k = dk.decode_kernel()
    assert k is not None, "the decoding kernel did not build on a machine with a compiler"
    return k


def reference(out, x, a, b_t, rows, cols) -> torch.Tensor:
    """out[row] + x[row] · A[c0:c1]ᵀ · B_t[c0:c1] in float64, row by row."""
    ref = out.double().clone()
    for row, (c0, c1) in zip(rows.tolist(), cols.tolist()):
        ref[row] += (x[row].double() @ a[c0:c1].double().t()) @ b_t[c0:c1].double()
    return ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_out", [64, 70, 5])  # whole blocks of 32 columns, a tail, tail only
def test_kernel_equals_float64_closed_form(kernel, dtype, n_out):
    check_closed_form(kernel, dtype, n_out)


def avx2_only() -> bool:
    flags = dk._cpu_flags().split()
    return platform.machine() in ("x86_64", "AMD64") and "avx2" in flags and "fma" in flags


@pytest.mark.slow
@pytest.mark.skipif(not avx2_only(), reason="needs an x86-64 CPU with AVX2")
def test_the_avx2_build_equals_float64_closed_form_too():
    """The kernel is compiled for the machine's CPU, and its register blocks differ with the
    vector width: on an AVX-512 machine, also build and check what an AVX2-only CPU runs."""
    module = dk.build("x86-64-v3")
    assert module is not None and not module.tiles_available()
    kernel = module.lora_decode_
    for dtype in (torch.float32, torch.bfloat16):
        for n_out in (64, 70, 5):
            check_closed_form(kernel, dtype, n_out)


def check_closed_form(kernel, dtype: torch.dtype, n_out: int) -> None:
    g = torch.Generator().manual_seed(0)
    ranks = [4, 1, 5, 16]  # a multiple of the 4- and 2-wide blocks of A's rows, and remainders
    offsets = torch.tensor([0] + ranks).cumsum(0).tolist()
    n_in = 37  # not a multiple of the vector width (8 or 16)
    # adapter 3 on 19 rows (as a prefill's tokens: chunks of 8, 8 and 3 rows), adapter 0 on 5,
    # 1 and 2 on one each; rows 3 and 7 without an adapter; rows not sorted by adapter
    use = {0: 3, 1: 0, 2: 3, 4: 1, 5: 3, 6: 3, 8: 3, 9: 0, 10: 2, 11: 0, 12: 0, 13: 0}
    use |= {row: 3 for row in range(14, 29)}
    n_rows = 29
    # the weights in x's dtype, as MixedUpdate passes them
    a = torch.randn(offsets[-1], n_in, generator=g).to(dtype)
    b_t = torch.randn(offsets[-1], n_out, generator=g).to(dtype)
    x = torch.randn(n_rows, n_in, generator=g).to(dtype)
    out = torch.randn(n_rows, n_out, generator=g).to(dtype)
    rows = torch.tensor(list(use), dtype=torch.long)
    cols = torch.tensor([[offsets[s], offsets[s + 1]] for s in use.values()], dtype=torch.long)
    expected = reference(out, x, a, b_t, rows, cols)
    order = torch.argsort(cols[:, 0], stable=True)  # as KernelRows passes them
    # and every size of a chunk (1 to 8 rows of one adapter: the blocks of 4, 2 and 1 rows)
    sizes = [(rows[order][:k], cols[order][:k]) for k in range(1, 9)]
    for rows_in, cols_in in [(rows, cols), (rows[order], cols[order])] + sizes:
        result = out.clone()
        kernel(result, x, a, b_t, rows_in, cols_in)
        want = out.double().clone()
        want[rows_in] = expected[rows_in]
        if dtype == torch.float32:
            torch.testing.assert_close(result.double(), want, atol=1e-4, rtol=1e-5)
        else:  # products of the bf16 values summed in fp32, one bf16 rounding at the end
            torch.testing.assert_close(result.double(), want, atol=0, rtol=2**-8)
        assert torch.equal(result[[3, 7]], out[[3, 7]])  # rows without an adapter: untouched
    kernel(out, x, a, b_t, rows[:0], cols[:0])  # no rows: nothing to do
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernel(out.half(), x.half(), a.half(), b_t.half(), rows, cols)
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    with pytest.raises(RuntimeError, match="x's dtype"):
        kernel(out, x, a.to(other), b_t.to(other), rows, cols)
    with pytest.raises(RuntimeError, match="contiguous"):
        kernel(out, x.t().contiguous().t(), a, b_t, rows, cols)


needs_tiles = pytest.mark.skipif(dk.tile_kernel() is None,
                                 reason="no AMX tiles on this CPU (or not granted by the OS)")


@needs_tiles
def test_tile_kernel_equals_float64_with_h_in_bf16():
    """The AMX path: adapters of ranks 16 and 32 (one of them at columns 32..64), one of them on
    37 rows (tile chunks of 16, 16 and 5), rows not sorted; the reference rounds x·Aᵀ to bf16
    before the second product, as the tiles do."""
    g = torch.Generator().manual_seed(3)
    n_in, n_out, offsets = 64, 48, [0, 16, 32, 64]
    a = torch.randn(64, n_in, generator=g).bfloat16()
    b_t = torch.randn(64, n_out, generator=g).bfloat16()
    x = torch.randn(45, n_in, generator=g).bfloat16()
    out = torch.randn(45, n_out, generator=g).bfloat16()
    use = {row: (2 if row % 5 else row % 3) for row in range(45) if row != 7}
    rows = torch.tensor(list(use), dtype=torch.long)
    cols = torch.tensor([[offsets[s], offsets[s + 1]] for s in use.values()], dtype=torch.long)
    order = torch.argsort(cols[:, 0], stable=True)
    rows, cols = rows[order], cols[order]
    stack = mixed_mod.AdapterStack(("p", "q", "s"), a.float(), b_t.float(),
                                   {"p": (0, 16), "q": (16, 32), "s": (32, 64)}, {})
    tiles = stack.tiles
    assert tiles is not None
    want = out.double().clone()
    for row, (c0, c1) in zip(rows.tolist(), cols.tolist()):
        h = (x[row].double() @ a[c0:c1].double().t()).float().bfloat16().double()
        want[row] += h @ b_t[c0:c1].double()
    result = out.clone()
    dk.tile_kernel()(result, x, *tiles, rows, cols)
    torch.testing.assert_close(result.double(), want, atol=0, rtol=2**-8)
    assert torch.equal(result[7], out[7])
    with pytest.raises(RuntimeError, match="multiples of 16"):
        dk.tile_kernel()(result, x, *tiles, rows, cols - 8)


@needs_tiles
def test_decoding_step_through_tiles(monkeypatch):
    """A bf16 model with adapters of ranks 16 and 32: the layers whose sizes the tiles take go
    through them (down_proj, in 48, does not), and each row still equals its adapter alone."""
    model = get_lora_model(make_tiny_llama().to(torch.bfloat16),
                           LoraConfig(r=16, lora_alpha=16, init_lora_weights=False), "a")
    model.add_adapter("b", LoraConfig(r=32, lora_alpha=8, init_lora_weights=False))
    model.eval()
    rows = ["b", "a", "__base__", "b", "a", "a"]
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(3, VOCAB, (len(rows), 20), generator=g)
    step = torch.randint(3, VOCAB, (len(rows), 1), generator=g)
    calls = []
    tile = dk.tile_kernel()
    monkeypatch.setattr(mixed_mod, "tile_kernel",
                        lambda: (lambda *a: (calls.append(a[1].shape[0]), tile(*a))[1]))
    mixed = decode_step(model, ids, step, adapter_names=rows)
    per_forward = sum(1 for m in model.modules() if isinstance(m, LoraLayer)
                      and m.in_features % 32 == 0)
    assert calls.count(len(rows) * 20) == per_forward and calls.count(len(rows)) == per_forward
    assert_rows_equal_alone(model, rows, ids, step, mixed, atol=0.05, rtol=0.02)


def decode_step(model, ids: torch.Tensor, step: torch.Tensor, **kw) -> torch.Tensor:
    """The logits of one decoding step after prefilling `ids`."""
    with torch.no_grad():
        cache = new_kv_cache()
        model(input_ids=ids, past_key_values=cache, use_cache=True, **kw)
        return model(input_ids=step, past_key_values=cache, use_cache=True, **kw).logits


def assert_rows_equal_alone(model, rows, ids, step, mixed, **tol) -> None:
    """Row i of the mixed step's logits equals adapter rows[i] (or the base) run alone."""
    for i, name in enumerate(rows):
        if name == "__base__":
            with model.disable_adapters():
                alone = decode_step(model, ids[i:i + 1], step[i:i + 1])
        else:
            model.set_adapter(name)
            alone = decode_step(model, ids[i:i + 1], step[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1].float(), alone.float(), **tol)


ROWS = ["b", "__base__", "a", "c", "a", "b", "a"]


def three_adapter_model(dtype: torch.dtype):
    model = get_lora_model(make_tiny_llama().to(dtype),
                           LoraConfig(r=4, lora_alpha=8, init_lora_weights=False), "a")
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=3, init_lora_weights=False,
                                      target_modules=["q_proj", "down_proj"]))
    model.add_adapter("c", LoraConfig(r=6, lora_alpha=6, use_rslora=True,
                                      init_lora_weights=False, target_modules="all-linear"))
    return model.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_step_with_and_without_the_kernel(kernel, dtype, monkeypatch):
    """A prefill and a decoding step over adapters of three ranks (and a base row): each row
    equals its adapter alone, and the kernel is what computed it, one row per prefill token (the
    torch path, forced, agrees)."""
    model = three_adapter_model(dtype)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, VOCAB, (len(ROWS), 6), generator=g)
    step = torch.randint(3, VOCAB, (len(ROWS), 1), generator=g)
    calls = []
    monkeypatch.setattr(mixed_mod, "decode_kernel",
                        lambda: (lambda *a: (calls.append(1), kernel(*a))[1]))
    mixed = decode_step(model, ids, step, adapter_names=ROWS)
    n_layers = sum(isinstance(m, LoraLayer) for m in model.modules())
    assert len(calls) == n_layers * 2  # one call per layer for the prefill, one for the step
    monkeypatch.setenv(dk.ENV, "0")
    monkeypatch.setattr(mixed_mod, "decode_kernel", dk.decode_kernel)
    by_torch = decode_step(model, ids, step, adapter_names=ROWS)
    tol = dict(atol=1e-5, rtol=0) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    torch.testing.assert_close(mixed.float(), by_torch.float(), **tol)
    assert_rows_equal_alone(model, ROWS, ids, step, mixed, **tol)


def test_greedy_generation_is_the_same_with_and_without_the_kernel(kernel, monkeypatch):
    model = three_adapter_model(torch.float32)
    ids = torch.randint(3, VOCAB, (len(ROWS), 5), generator=torch.Generator().manual_seed(6))
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, adapter_names=ROWS)
    with_kernel = model.generate(input_ids=ids, **kw)
    monkeypatch.setenv(dk.ENV, "0")
    assert torch.equal(model.generate(input_ids=ids, **kw), with_kernel)


def test_a_kernel_that_does_not_build_falls_back_with_a_message(monkeypatch, capsys, tmp_path):
    from torch.utils import cpp_extension

    def fail(**kw):
        raise RuntimeError("Error building extension 'x'\nc++: fatal error: simulated")

    monkeypatch.setattr(dk, "_kernel", dk._UNSET)
    monkeypatch.setattr(dk, "lorakit_home", lambda: tmp_path)
    monkeypatch.setattr(dk, "_build_key", lambda arch: "test-fails-to-build")
    monkeypatch.setattr(cpp_extension, "load", fail)
    assert dk.decode_kernel() is None
    assert dk.decode_kernel() is None  # tried once per process
    err = capsys.readouterr().err
    assert err.count("did not build") == 1 and "simulated" in err
    # decoding still works, through the torch path
    model = three_adapter_model(torch.float32)
    ids = torch.randint(3, VOCAB, (len(ROWS), 4), generator=torch.Generator().manual_seed(1))
    step = ids[:, -1:]
    assert decode_step(model, ids, step, adapter_names=ROWS).shape == (len(ROWS), 1, VOCAB)


@pytest.mark.slow
def test_a_fresh_machine_builds_the_kernel_once_and_says_so(tmp_path):
    """As a user meets it: the first process on a machine (an empty lorakit cache) builds the
    kernel and says so on stderr; the next one loads it silently."""
    env = {**os.environ, "LORAKIT_HOME": str(tmp_path)}
    env.pop(dk.ENV, None)
    code = "from lorakit.lora.decode_kernel import decode_kernel; assert decode_kernel()"
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr
    assert "building the CPU decoding kernel" in first.stderr and "kernel built" in first.stderr
    assert list((tmp_path / "kernels").glob("lorakit_decode_*/lorakit_decode_*.so"))
    again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and "building" not in again.stderr, again.stderr
