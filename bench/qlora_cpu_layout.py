"""bitsandbytes' CPU tiled 4-bit layout against the regular one, on the default model (NF4).

On CPUs with AVX512-BF16, bitsandbytes repacks a `Linear4bit` at its first no-grad eval forward
into a tiled layout with a bf16 inference kernel. lorakit keeps its 4-bit layers on the regular
layout (lorakit.compat); this measures what that choice costs or saves, in one process, both
layouts on the same weights and inputs:
- prefill: one forward of a batch of prompts (the shape of evaluation and of generate's first
  step), best of `--repeats`;
- decode: greedy generation of `--new-tokens` tokens, best of `--repeats`;
- accuracy: max |logit difference| from the same model held in float64 (the exact values the
  4-bit weights stand for, dequantized once).

    .venv/bin/python bench/qlora_cpu_layout.py [--dtypes float32 bfloat16] [--batch 16]

On a CPU without AVX512-BF16 the tiled kernel does not exist: the script says so and stops.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from lorakit import compat
    from lorakit.base import load_model
    from lorakit.lora import dequantize_model
    from lorakit.base.loading import machine_summary
    print(machine_summary(), flush=True)
    bnb = compat.bitsandbytes()
    import bitsandbytes.functional as bnbf
    if not bnbf.has_avx512bf16():
        print("this CPU has no AVX512-BF16: bitsandbytes never tiles here; nothing to compare")
        return

    prompt = "Normalise the date to YYYY-MM-DD: 5th of March '21"
    for dtype in args.dtypes:
        model, tok = load_model(dtype=dtype, quantization="nf4")
        ids = tok([prompt] * args.batch, return_tensors="pt")
        exact = dequantize_model(copy.deepcopy(model), torch.float64)
        # transformers refuses .to(dtype) on a model it loaded quantized; torch's own .to does it
        torch.nn.Module.to(exact, torch.float64)
        with torch.no_grad():
            ref = exact(**ids).logits
        del exact
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        row = {}
        for layout in ("regular", "tiled"):
            for m in layers:  # tiled: let bitsandbytes repack at the next no-grad eval forward
                m.support_avx512bf16_for_cpu = layout == "tiled"
            with torch.no_grad():
                logits = model(**ids).logits  # repacks, for "tiled"
                tiled = sum(compat.is_cpu_tiled(m) for m in layers)
                prefill = best_time(lambda: model(**ids), args.repeats)
                decode = best_time(lambda: model.generate(
                    **ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                    do_sample=False), args.repeats)
            err = (logits.double() - ref).abs().max().item()
            row[layout] = (prefill, decode, err)
            print(f"{dtype:9s} {layout:8s} ({tiled:3d} tiled layers): prefill {prefill * 1e3:7.0f} "
                  f"ms  decode {args.batch}x{args.new_tokens} {decode:6.2f} s  "
                  f"max|logit - fp64| {err:.4f}", flush=True)
            if layout == "tiled":
                compat.keep_regular_layouts(model)  # back to regular for the next dtype's run
        (pr, dr, _), (pt, dt, _) = row["regular"], row["tiled"]
        print(f"{dtype:9s} tiled / regular time: prefill {pt / pr:.2f}x, decode {dt / dr:.2f}x",
              flush=True)


if __name__ == "__main__":
    main()
