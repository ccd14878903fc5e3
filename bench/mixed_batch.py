"""Mixed-adapter generation throughput: 8 rows with 8 different adapters vs one adapter vs PEFT.

    .venv/bin/python bench/mixed_batch.py [--new-tokens 32 --repeats 5 --adapters 8]

Model: the embedded default (SmolLM2-135M-Instruct), fp32, eight r=16 LoRA adapters on all
linear layers, a batch of short chat prompts (left-padded), greedy decoding of exactly
--new-tokens tokens. Variants, timed interleaved (median of --repeats):
  lorakit-mixed   generate(adapter_names=[a0..a7]): one grouped computation per layer
  lorakit-single  the same batch through one active adapter (the usual path)
  peft-mixed      PEFT's generate(adapter_names=[a0..a7]) (a loop over sub-batches per layer)
  peft-single     PEFT, one active adapter (context)
Targets: lorakit-mixed / lorakit-single >= 0.8 in tokens/s; lorakit-mixed faster than peft-mixed.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit import LoraConfig, get_lora_model
from lorakit.base.default_model import default_model_dir
from lorakit.base.loading import machine_summary

PROMPTS = ["What is the capital of France?", "Write a haiku about rain.",
           "Name three prime numbers.", "How do I boil an egg?",
           "Translate 'good morning' to Spanish.", "Why is the sky blue?",
           "Give me a synonym for happy.", "What does CPU stand for?"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (1 is steadier on a CPU shared with other jobs: a "
                         "descheduled OpenMP thread stalls every parallel region)")
    args = ap.parse_args()
    import peft

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"mixed_batch: {machine_summary()}", flush=True)

    torch.manual_seed(0)
    path = default_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    n = args.adapters
    texts = [tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                     tokenize=False, add_generation_prompt=True) for i in range(n)]
    enc = tok(texts, return_tensors="pt", padding=True)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    names = [f"a{i}" for i in range(n)]
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    ours = get_lora_model(copy.deepcopy(base), cfg, adapter_name=names[0])
    for name in names[1:]:
        ours.add_adapter(name, cfg)
    with torch.no_grad():  # trained-looking adapters: small nonzero B, so every adapter matters
        for pname, p in ours.named_parameters():
            if pname.endswith("lora_B"):
                p.normal_(0, 0.01)
    ours.eval()
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)  # a0 is not "default": every adapter in its own folder
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), f"{tmp}/{names[0]}",
                                                adapter_name=names[0])
        for name in names[1:]:
            theirs.load_adapter(f"{tmp}/{name}", name)
    theirs.eval()

    gen = dict(**enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
               do_sample=False, pad_token_id=tok.pad_token_id)

    def ours_mixed():
        return ours.generate(adapter_names=names, **gen)

    def ours_single():
        return ours.generate(**gen)

    def peft_mixed():
        return theirs.generate(adapter_names=names, **gen)

    def peft_single():
        return theirs.generate(**gen)

    variants = {"lorakit-mixed": ours_mixed, "lorakit-single": ours_single,
                "peft-mixed": peft_mixed, "peft-single": peft_single}
    ours.set_adapter(names[0])
    theirs.set_adapter(names[0])
    with torch.inference_mode():
        same = torch.equal(ours_mixed(), peft_mixed())
        # each row of the mixed batch decodes as its adapter alone would
        row = n - 1
        ours.set_adapter(names[row])
        alone = ours.generate(**{k: v[row:row + 1] for k, v in enc.items()},
                              **{k: v for k, v in gen.items() if k not in enc})
        ours.set_adapter(names[0])
        row_ok = torch.equal(ours_mixed()[row:row + 1, -args.new_tokens:],
                             alone[:, -args.new_tokens:])
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for fn in variants.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for k, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    load_after = os.getloadavg()
    med = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: n * args.new_tokens / v for k, v in med.items()}
    print(f"mixed_batch: SmolLM2-135M fp32, {n} rows x {args.new_tokens} new tokens (greedy), "
          f"prompt {enc['input_ids'].shape[1]} tokens, {n} adapters r=16 all-linear; median of "
          f"{args.repeats} interleaved runs; torch {torch.__version__}, peft {peft.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load avg "
          f"{load_before[0]:.2f} before / {load_after[0]:.2f} after")
    for k in variants:
        spread = f"min {min(times[k]):.2f} s, max {max(times[k]):.2f} s"
        print(f"  {k:15s} {tps[k]:8.1f} tokens/s   ({med[k]:.2f} s median, {spread})")
    best = {k: min(v) for k, v in times.items()}
    for a, b, target in (("lorakit-mixed", "lorakit-single", ">= 0.8"),
                         ("lorakit-mixed", "peft-mixed", "> 1")):
        print(f"  {a} / {b} tokens/s: {med[b] / med[a]:.3f} on medians, "
              f"{best[b] / best[a]:.3f} on best runs  (target {target})")
    print(f"  same tokens as PEFT's mixed batch: {same}; row {row} equals its adapter alone: "
          f"{row_ok}")


if __name__ == "__main__":
    main()
