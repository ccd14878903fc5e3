"""A LoRA training step on a Mixture-of-Experts model: lorakit against PEFT, and against adapting
the attention alone.

    .venv/bin/python bench/moe_step.py                       # fp32, 3 rounds of 4 steps
    .venv/bin/python bench/moe_step.py --dtype bfloat16 --rounds 5

Model: a random Qwen3-MoE built from transformers' config class, shaped like Qwen3-30B-A3B
scaled down (hidden 512, 4 layers, 64 experts of which 4 per token, expert width 256, vocab
8192). Batch: 4 rows of 256 random tokens, labels = inputs.

Variants, each in a fresh process (so each has its own peak RSS), run round-robin A B C A B C:
- lorakit-experts: `target_modules="all-linear"` (attention, experts and routers: PEFT's set);
  the experts' update is computed for the tokens routed to each expert only;
- peft-experts: PEFT 0.21 with the same config, whose parameter wrapper adds scaling·B·A to every
  expert's weight before the model's own expert forward (all experts, every step);
- lorakit-attention: target_modules=[q_proj, k_proj, v_proj, o_proj] (what adapting the
  attention alone costs).
r=16, alpha=32, AdamW lr 1e-4; `--dtype bfloat16`: a bf16 model under bf16 autocast (as lorakit's
trainer and TRL's bf16=True run it). Each process: 2 warm-up steps, then `--steps` timed steps of
forward + backward + optimizer step; it reports the median seconds per step and its peak RSS.
Prints one row per variant (median over rounds) and the ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("lorakit-experts", "peft-experts", "lorakit-attention")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build_model(dtype: str):
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=8192, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
        num_experts=64, num_experts_per_tok=4, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, max_position_embeddings=512,
    )
    return Qwen3MoeForCausalLM(config).to(getattr(torch, dtype))


def adapt(model, variant: str):
    if variant == "peft-experts":
        import peft

        return peft.get_peft_model(
            model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
        )
    from lorakit import LoraConfig, get_lora_model

    targets = "all-linear" if variant == "lorakit-experts" else ATTENTION
    return get_lora_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))


def run_variant(variant: str, dtype: str, steps: int) -> dict:
    """One process's measurement: median step time and peak RSS."""
    import torch

    model = adapt(build_model(dtype), variant)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randint(0, 8192, (4, 256), generator=torch.Generator().manual_seed(1))
    times = []
    for i in range(2 + steps):
        start = time.perf_counter()
        # bf16: under autocast, as lorakit's trainer and TRL's bf16=True run it
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return {
        "variant": variant,
        "step_s": statistics.median(times),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable": sum(p.numel() for p in params),
        "loss": loss.item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # a child process's one variant
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.dtype, args.steps)))
        return
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for variant in VARIANTS:
            out = subprocess.run(
                [sys.executable, __file__, "--variant", variant, "--dtype", args.dtype,
                 "--steps", str(args.steps)],
                capture_output=True, text=True, check=True,
            ).stdout.strip().splitlines()[-1]
            results[variant].append(json.loads(out))
            print(f"round {r + 1}: {results[variant][-1]}", flush=True)
    med = {
        v: {k: statistics.median(x[k] for x in rs) for k in ("step_s", "peak_rss_mib")}
        | {"trainable": rs[0]["trainable"]}
        for v, rs in results.items()
    }
    print(f"\n| variant ({args.dtype}) | s / step | peak RSS MiB | trainable |")
    print("|---|---|---|---|")
    for v, m in med.items():
        print(f"| {v} | {m['step_s']:.3f} | {m['peak_rss_mib']:.0f} | {m['trainable']:,} |")
    ours, peft_, attn = (med[v] for v in VARIANTS)
    print(f"\nPEFT / lorakit, experts adapted: time {peft_['step_s'] / ours['step_s']:.2f}x, "
          f"peak RSS {peft_['peak_rss_mib'] / ours['peak_rss_mib']:.2f}x")
    print(f"lorakit experts / attention only: time {ours['step_s'] / attn['step_s']:.2f}x, "
          f"peak RSS {ours['peak_rss_mib'] / attn['peak_rss_mib']:.2f}x")


if __name__ == "__main__":
    main()
