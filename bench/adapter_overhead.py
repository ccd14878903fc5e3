"""Forward-pass cost of an unmerged adapter, lorakit vs PEFT, in one process run.

    .venv/bin/python bench/adapter_overhead.py [--batch 4 --seq 128 --repeats 15 --dtype float32]

Model: the embedded default (SmolLM2-135M-Instruct), LoRA r=16 alpha=32 on all linear layers.
Timings are interleaved (base, lorakit, peft, merged, base, ...) and the median is reported, so
machine noise hits every variant alike. Prints time ratios; absolute times are only context.
Targets: merged/base <= 1.01; lorakit overhead <= 0.5 x PEFT overhead.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM

from lorakit import LoraConfig, LoraModel, get_lora_model
from lorakit.base.default_model import default_model_dir
from lorakit.base.loading import machine_summary


def timed(model, ids, mode: str = "inference") -> float:
    ctx = torch.inference_mode() if mode == "inference" else torch.enable_grad()
    with ctx:
        t0 = time.perf_counter()
        out = model(input_ids=ids).logits
        if mode == "train":
            out.float().mean().backward()
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--mode", default="inference", choices=["inference", "train"])
    args = ap.parse_args()
    import peft

    print(f"adapter_overhead: {machine_summary()}", flush=True)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    path = default_model_dir()
    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    kw = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
              init_lora_weights=False)
    ours = get_lora_model(copy.deepcopy(base), LoraConfig(**kw)).eval()
    with tempfile.TemporaryDirectory() as tmp:  # the same adapter weights for every variant
        ours.save_pretrained(tmp)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp, is_trainable=True).eval()
        merged_model = LoraModel.from_pretrained(copy.deepcopy(base), tmp).merge_and_unload()
    if args.mode == "inference":
        for p in base.parameters():
            p.requires_grad_(False)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq))

    variants = {"base": base, "lorakit": ours, "peft": theirs, "merged": merged_model}
    with torch.inference_mode():  # same adapter math in both libraries
        torch.testing.assert_close(ours(input_ids=ids).logits.float(),
                                   theirs(input_ids=ids).logits.float(), atol=1e-3, rtol=1e-3)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(2):  # warm-up
        for m in variants.values():
            timed(m, ids, args.mode)
    for _ in range(args.repeats):
        for k, m in variants.items():
            times[k].append(timed(m, ids, args.mode))
    med = {k: statistics.median(v) for k, v in times.items()}
    over_ours = med["lorakit"] / med["base"] - 1
    over_peft = med["peft"] / med["base"] - 1
    print(f"adapter_overhead: SmolLM2-135M, {args.dtype}, {args.mode}, batch {args.batch}x{args.seq},"
          f" r=16 all-linear, median of {args.repeats} interleaved runs, "
          f"torch {torch.__version__}, peft {peft.__version__}, {torch.get_num_threads()} threads")
    for k, v in med.items():
        print(f"  {k:8s} {v * 1000:8.1f} ms   ({v / med['base']:.3f} x base)")
    print(f"  unmerged overhead: lorakit {over_ours * 100:+.1f}%  peft {over_peft * 100:+.1f}%  "
          f"ratio lorakit/peft {over_ours / over_peft if over_peft > 0 else float('nan'):.2f} "
          "(target <= 0.5)")
    print(f"  merged / base: {med['merged'] / med['base']:.3f} (target <= 1.01)")


if __name__ == "__main__":
    main()
