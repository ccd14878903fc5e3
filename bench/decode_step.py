"""One decoding step of 16 rows: the base model alone vs 8 adapters mixed vs 1 adapter.

    .venv/bin/python bench/decode_step.py [--dtype bfloat16 --repeats 5 --rows 16 --adapters 8]

Model: the embedded SmolLM2-135M-Instruct; adapters r=16, alpha=32 on all linear layers (small
random B). Each variant prefills the same random prompts (150 tokens), then times 16 greedy
decoding steps (median, the first two dropped); variants are interleaved, --repeats times.
- base:   a second copy of the model, never wrapped (what a server without adapters runs);
- mixed:  row i uses adapter i mod K (`mixed_adapter_batch`, the path `lorakit serve` decodes
          with);
- single: every row uses adapter a0 through the same path;
- mixed-torch: as mixed, with the compiled kernel switched off (LORAKIT_DECODE_KERNEL=0: the
          torch path a machine without a C++ compiler decodes with).
This isolates the adapter cost per step from HTTP, prefill and scheduling (bench/serve_load.py
measures those); the target ratio base/mixed is the issue's 0.8.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch

from lorakit import LoraConfig, get_lora_model
from lorakit.base import load_model
from lorakit.base.loading import machine_summary
from lorakit.compat import new_kv_cache
from lorakit.lora.decode_kernel import ENV, decode_kernel


def step_ms(model, ctx, ids: torch.Tensor, steps: int) -> float:
    times = []
    with torch.inference_mode(), ctx():
        cache = new_kv_cache()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps):
            start = time.perf_counter()
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1000


@contextlib.contextmanager
def without_kernel(inner):
    old = os.environ.get(ENV)
    os.environ[ENV] = "0"
    try:
        with inner():
            yield
    finally:
        if old is None:
            del os.environ[ENV]
        else:
            os.environ[ENV] = old


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=150)
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()
    print(machine_summary())
    print("compiled decoding kernel:", "yes" if decode_kernel() else "no (torch path only)")
    torch.manual_seed(0)
    plain, _ = load_model(None, dtype=args.dtype)
    wrapped, _ = load_model(None, dtype=args.dtype)
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    lora = get_lora_model(wrapped, cfg, adapter_name="a0")
    for i in range(1, args.adapters):
        lora.add_adapter(f"a{i}", cfg)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.002)
    lora.eval()
    ids = torch.randint(0, 1000, (args.rows, args.prompt))
    mixed = [f"a{i % args.adapters}" for i in range(args.rows)]
    def batch(names: list[str]):
        return lambda: lora.mixed_adapter_batch(names, args.rows, keep_slots=True)

    variants = {
        "base": (plain, contextlib.nullcontext),
        "mixed": (lora, batch(mixed)),
        "single": (lora, batch(["a0"] * args.rows)),
        "mixed-torch": (lora, lambda: without_kernel(batch(mixed))),
    }
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (model, ctx) in variants.items():
            runs[name].append(step_ms(model, ctx, ids, args.steps))
    base = statistics.median(runs["base"])
    for name, values in runs.items():
        med = statistics.median(values)
        print(
            f"{name:11s} {med:7.1f} ms/step  base/this {base / med:.3f}  "
            f"runs {[round(v, 1) for v in values]}"
        )


if __name__ == "__main__":
    main()
