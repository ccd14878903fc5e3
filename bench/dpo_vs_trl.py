"""Preference tuning on adapters: lorakit's DPOTrainer (or KTOTrainer, ORPOTrainer) against TRL's
+ PEFT, and lorakit's own SFT.

    .venv/bin/python bench/dpo_vs_trl.py                      # DPO, fp32, 10 steps, batch 8
    .venv/bin/python bench/dpo_vs_trl.py --steps 4 --repeats 2
    .venv/bin/python bench/dpo_vs_trl.py --objective kto --sides lorakit trl

Model: the embedded SmolLM2-135M-Instruct, fp32; LoRA r=16 alpha=32 on all linear layers,
dropout 0; AdamW lr 5e-5, linear schedule, no warm-up, gradient checkpointing off on every side;
beta 0.1, the sigmoid loss; max_length 128. Pairs: the demo's date task (lorakit.demo.task): the
prompt asks for a date in ISO form, chosen = the right answer, rejected = day and month swapped
(or, where that is the same date, the input echoed back). Each run is its own process (peak RSS
per process), in the order lorakit DPO, TRL DPO, lorakit SFT (prompt + chosen as a completion:
the same rows and batches without the rejected answers and the reference).

Prints examples/s (pairs; KTO: rows, both trainers unpairing the same pairs as TRL does) over
the wall time of train(), peak RSS, and the eval reward accuracy on 32 held-out pairs (each side's
own evaluate(); KTO has none), then the ratios the issue's targets are about. ORPO's TRL side is
trl.experimental.orpo.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

R, ALPHA = 16, 32


def make_pairs(n: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Date-task preference pairs (chat), training and held-out."""
    from lorakit.demo.task import make_task

    train, held = make_task(n, n_eval, seed=seed)

    def pair(row: dict) -> dict:
        right = row["completion"][0]["content"]
        year, month, day = right.split("-")
        wrong = f"{year}-{day}-{month}"
        if wrong == right or int(day) > 12:
            wrong = row["prompt"][-1]["content"]
        return {"prompt": row["prompt"], "chosen": row["completion"],
                "rejected": [{"role": "assistant", "content": wrong}]}

    return [pair(r) for r in train], [pair(r) for r in held]


def worker(args: argparse.Namespace) -> None:
    import torch
    from datasets import Dataset

    from lorakit.base.default_model import default_model_dir

    torch.manual_seed(0)
    model_dir = str(default_model_dir())
    # KTO: each pair is two rows, so as many pairs as rows are drawn over the run
    train, held = make_pairs(args.batch * args.steps, 32)
    common = dict(output_dir=args.out, per_device_train_batch_size=args.batch,
                  per_device_eval_batch_size=8, max_steps=args.steps, learning_rate=5e-5,
                  logging_steps=1, gradient_checkpointing=False, max_length=128, seed=0,
                  use_cpu=True, report_to="none", bf16=False, save_strategy="no")
    if args.side == "trl":
        import peft
        import trl
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if args.objective == "orpo":  # experimental: imported only when asked for
            from trl.experimental.orpo import ORPOConfig as config_class
            from trl.experimental.orpo import ORPOTrainer as trainer_class
        else:
            trainer_class, config_class = {
                "dpo": (trl.DPOTrainer, trl.DPOConfig),
                "kto": (trl.KTOTrainer, trl.KTOConfig),
            }[args.objective]
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        trainer = trainer_class(
            model=model, args=config_class(**common, beta=0.1),
            train_dataset=Dataset.from_list(train), eval_dataset=Dataset.from_list(held),
            processing_class=tokenizer,
            peft_config=peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear"))
    else:
        import lorakit

        peft_config = lorakit.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear")
        if args.side == "lorakit":
            trainer_class, config_class = {
                "dpo": (lorakit.DPOTrainer, lorakit.DPOConfig),
                "kto": (lorakit.KTOTrainer, lorakit.KTOConfig),
                "orpo": (lorakit.ORPOTrainer, lorakit.ORPOConfig),
            }[args.objective]
            trainer = trainer_class(
                model=model_dir, args=config_class(**common, beta=0.1),
                train_dataset=train, eval_dataset=held, peft_config=peft_config)
        else:  # lorakit SFT on prompt + chosen
            rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in train]
            trainer = lorakit.SFTTrainer(
                model=model_dir, args=lorakit.SFTConfig(**common), train_dataset=rows,
                peft_config=peft_config)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    metrics = trainer.evaluate() if args.side != "sft" else {}
    print(json.dumps({"side": args.side, "seconds": seconds, "peak_rss_mib": peak,
                      "pairs_per_s": args.batch * args.steps / seconds,
                      "eval_accuracy": metrics.get("eval_rewards/accuracies")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objective", default="dpo", choices=["dpo", "kto", "orpo"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--sides", nargs="+", default=["lorakit", "trl", "sft"],
                        choices=["lorakit", "trl", "sft"])
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return worker(args)
    results: dict[str, list[dict]] = {side: [] for side in args.sides}
    for _ in range(args.repeats):
        for side in results:
            with tempfile.TemporaryDirectory() as out:
                proc = subprocess.run(
                    [sys.executable, __file__, "--side", side, "--out", out, "--steps",
                     str(args.steps), "--batch", str(args.batch), "--objective", args.objective],
                    capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{side} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
            results[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(results[side][-1], flush=True)
    best = {side: min(rs, key=lambda r: r["seconds"]) for side, rs in results.items()}
    unit = "rows" if args.objective == "kto" else "pairs"
    print(f"\n| {args.objective} side | {unit}/s | peak RSS MiB | eval reward accuracy |")
    print("|---|---|---|---|")
    for side, r in best.items():
        acc = "" if r["eval_accuracy"] is None else f"{r['eval_accuracy']:.3f}"
        print(f"| {side} | {r['pairs_per_s']:.2f} | {r['peak_rss_mib']:.0f} | {acc} |")
    ours, theirs, sft = (best.get(side) for side in ("lorakit", "trl", "sft"))
    if ours and theirs:
        print(f"\nlorakit / TRL {unit}/s: {ours['pairs_per_s'] / theirs['pairs_per_s']:.2f}x "
              "(target >= 2)")
        print(f"peak RSS lorakit / TRL: {ours['peak_rss_mib'] / theirs['peak_rss_mib']:.2f}x "
              "(target <= 0.6)")
    if ours and sft:
        print(f"peak RSS lorakit {args.objective} / lorakit SFT: "
              f"{ours['peak_rss_mib'] / sft['peak_rss_mib']:.2f}x (target <= 1.15)")


if __name__ == "__main__":
    main()
