"""The mixed-adapter kernel alone (lorakit/lora/decode_kernel.cpp) against torch's products.

    .venv/bin/python bench/mixed_kernel.py [--rows 2 16 128] [--reps 300]

One layer's LoRA update for `rows` rows of one adapter (r=16, stacked with 7 others), for the
default model's layer shapes (in → out): the AVX2/AVX-512 kernel (fp32 and bf16 weights), its
AMX tile variant (bf16, where the CPU has it), and what torch does without the kernel (two
products, fp32 or bf16, plus the add). Weights and activations are warm (the same layer every
call), so this measures the arithmetic and the fixed cost per call, not memory streaming;
bench/decode_step.py and bench/serve_load.py measure the kernel in a model.
"""

from __future__ import annotations

import argparse
import time

import torch

from lorakit.base.loading import machine_summary
from lorakit.lora.decode_kernel import decode_kernel, tile_kernel
from lorakit.lora.mixed import AdapterStack

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]  # q/o, k/v, gate/up, down


def micros(fn, reps: int) -> float:
    for _ in range(10):
        fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e6


def update_times(kernel, tiles, stack: AdapterStack, n: int, reps: int) -> list[float]:
    """µs per update of `n` rows of the fourth adapter: kernel fp32 / bf16, tiles, torch."""
    r, c0 = 16, 48
    (_, n_in), n_out = stack.a.shape, stack.b_t.shape[1]
    a32, b32 = stack.in_dtype(torch.float32)
    a16, b16 = stack.in_dtype(torch.bfloat16)
    x32, out32 = torch.randn(n, n_in), torch.zeros(n, n_out)
    x16, out16 = x32.bfloat16(), out32.bfloat16()
    rows, cols = torch.arange(n), torch.tensor([[c0, c0 + r]] * n)
    a_t32, bt32 = a32[c0 : c0 + r].t(), b32[c0 : c0 + r]
    a_t16, bt16 = a16[c0 : c0 + r].t(), b16[c0 : c0 + r]
    layout = stack.tiles if tiles else None
    return [
        micros(lambda: kernel(out32, x32, a32, b32, rows, cols), reps),
        micros(lambda: kernel(out16, x16, a16, b16, rows, cols), reps),
        micros(lambda: tiles(out16, x16, *layout, rows, cols), reps) if layout else float("nan"),
        micros(lambda: out16.add_(torch.mm(torch.mm(x16.float(), a_t32), bt32).bfloat16()), reps),
        micros(lambda: out16.addmm_(torch.mm(x16, a_t16), bt16), reps),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[2, 16, 128])
    ap.add_argument("--reps", type=int, default=300)
    args = ap.parse_args()
    print(machine_summary())
    kernel, tiles = decode_kernel(), tile_kernel()
    if kernel is None:
        raise SystemExit("the kernel did not build here")
    print("AMX tiles:", "yes" if tiles else "no")
    torch.manual_seed(0)
    print("in → out  rows | kernel fp32 | kernel bf16 | tiles bf16 | torch fp32 | torch bf16"
          "   (µs per update)")
    for n_in, n_out in SHAPES:
        offsets = {f"a{i}": (i * 16, (i + 1) * 16) for i in range(8)}
        stack = AdapterStack(tuple(offsets), torch.randn(128, n_in) / 30,
                             torch.randn(128, n_out) / 30, offsets, {})
        for n in args.rows:
            times = update_times(kernel, tiles, stack, n, args.reps)
            print(f"{n_in:4d} → {n_out:4d} {n:4d} | " + " | ".join(f"{t:11.1f}" for t in times))


if __name__ == "__main__":
    main()
