"""LoRA training throughput, memory and quality: lorakit's trainer vs TRL SFTTrainer + PEFT.

    .venv/bin/python bench/train_vs_trl.py                     # fp32, short rows, A B A B
    .venv/bin/python bench/train_vs_trl.py --data long --batch 4 --steps 4 --eval-rows 16
    .venv/bin/python bench/train_vs_trl.py --dtypes bfloat16 --steps 4 --repeats 1
    .venv/bin/python bench/train_vs_trl.py --gradient-checkpointing off   # both sides off
    .venv/bin/python bench/train_vs_trl.py --no-share-prefix   # lorakit without prefix sharing

Same model (the embedded SmolLM2-135M-Instruct), LoRA r=16 alpha=32 on all linear layers,
dropout 0, same rows, batch size, steps, learning rate, schedule, max length and dtype. Each run
is a separate process (peak RSS is per process); runs alternate lorakit, TRL, lorakit, TRL.
Prints non-pad tokens/s and peak RSS (load + training, before the scoring) with ratios, eval
loss after the same steps (both models scored by the same evaluator on the same held-out rows),
and achieved FLOP/s against this machine's measured GEMM ceiling.

Gradient checkpointing is the same on both sides: on by default, as in TRL's SFTConfig.
Tokens/s counts the non-pad tokens of the rows each side trained on (TRL's num_tokens, lorakit's
tokens_seen), over the wall time of train().

Data: "short" = the demo's date-normalisation rows (chat prompt/completion, ~48 tokens,
completion-only loss); "long" = ~512-token plain-text rows (loss on every token).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

R, ALPHA = 16, 32
N_PARAMS = 134.5e6  # SmolLM2-135M, tied lm_head counted once (shared/measurements.md)
LAYERS, HIDDEN = 30, 576


# ------------------------------------------------------------------------------------- the data

def make_rows(kind: str, n: int, seed: int) -> list[dict]:
    from lorakit.demo.task import make_task
    if kind == "short":
        train, _ = make_task(n, 0, seed=seed)
        return train
    # ~512-token plain text: many date lines in a row, a different mix for each row
    per_row = 22  # ~23 tokens a line: ~510 tokens a row
    train, _ = make_task(n * per_row, 0, seed=seed)
    rows = []
    for i in range(n):
        chunk = train[i * per_row:(i + 1) * per_row]
        lines = [f"{r['prompt'][-1]['content']} is {r['completion'][0]['content']}." for r in chunk]
        rows.append({"text": " ".join(lines)})
    return rows


def token_stats(rows: list[dict], tokenizer, kind: str) -> tuple[float, float]:
    """(mean tokens per row, fraction of tokens whose next token is trained)."""
    from lorakit.data import IGNORE_INDEX, prepare_dataset
    data = prepare_dataset(rows, tokenizer, max_length=1024 if kind == "long" else 256)
    trained = sum(sum(1 for y in e["labels"][1:] if y != IGNORE_INDEX) for e in data.examples)
    return statistics.mean(data.lengths), trained / sum(data.lengths)


# ---------------------------------------------------------------------------------- the workers

def worker(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.base.default_model import default_model_dir
    path = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    rows = make_rows(args.data, args.rows, seed=1)
    eval_rows = make_rows(args.data, args.eval_rows, seed=2)
    max_length = 1024 if args.data == "long" else 256
    bf16 = args.dtype == "bfloat16"
    out = tempfile.mkdtemp()
    common = dict(max_steps=args.steps, per_device_train_batch_size=args.batch,
                  learning_rate=2e-4, lr_scheduler_type="linear", warmup_steps=0, seed=0,
                  gradient_checkpointing=args.gradient_checkpointing == "on")

    if args.worker == "lorakit":
        from lorakit import LoraConfig, SFTTrainer, TrainConfig, get_lora_model
        lora = get_lora_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                                target_modules="all-linear"))
        trainer = SFTTrainer(lora, TrainConfig(output_dir=out, max_length=max_length, bf16=bf16,
                                               save_steps=None, logging_steps=args.steps,
                                               disable_tqdm=True, max_grad_norm=1.0,
                                               share_prefix=args.share_prefix, **common),
                             train_data=rows, tokenizer=tokenizer)
        t0 = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - t0
        tokens = result.tokens_per_second * result.seconds
        scored = lora
    else:
        import peft
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer
        config = SFTConfig(output_dir=out, max_length=max_length, bf16=bf16, use_cpu=True,
                           save_strategy="no", report_to=[], logging_steps=args.steps,
                           disable_tqdm=True, max_grad_norm=1.0,
                           completion_only_loss=args.data == "short", **common)
        trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer,
                             peft_config=peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                                         target_modules="all-linear"))
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        tokens = max(r.get("num_tokens", 0) for r in trainer.state.log_history)
        from lorakit import LoraModel
        # PEFT's layers (injected in place), scored by lorakit's evaluator: wrapped without
        # adapters of lorakit's own, as `lorakit eval` wraps a bare base
        scored = LoraModel(trainer.model.get_base_model(), None)

    train_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the scoring
    from lorakit.training import SFTObjective, TrainConfig, evaluate, resolve_launch
    settings = TrainConfig(output_dir=out, max_length=max_length, bf16=bf16)
    objective = SFTObjective(scored, tokenizer, settings)
    metrics = evaluate(scored, objective, objective.prepare(eval_rows, "eval"),
                       resolve_launch(settings), batch_size=16)
    print("RESULT " + json.dumps({
        "seconds": seconds, "tokens": tokens, "eval_loss": metrics["eval_loss"],
        "peak_rss_mb": train_peak,
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}),
        flush=True)


# ------------------------------------------------------------------------------------- ceilings

def gemm_ceiling(dtype: torch.dtype, repeats: int = 10) -> float:
    """Best FLOP/s of a plain matmul on this machine: the best of several runs of the model's own
    projection shapes (1024 tokens) and of a square 2048³, so one slow moment does not set it."""
    best = 0.0
    for m, k, n in ((1024, 576, 1536), (1024, 1536, 576), (2048, 2048, 2048)):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * m * k * n / (time.perf_counter() - t))
    return best


def flops_per_token(seq: float, label_fraction: float) -> float:
    """4·N for the linear layers (forward + input gradients; frozen W needs no weight gradient),
    with the tied 28.3 M-parameter head counted only where lorakit computes it, plus causal
    attention (QKᵀ and AV: 2·2·s·d per layer forward, the same again backward, halved)."""
    head = 28.3e6
    linear = 4 * (N_PARAMS - head) + 4 * head * label_fraction
    attention = 4 * LAYERS * seq * HIDDEN
    return linear + attention


# ----------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", choices=["lorakit", "trl"])
    ap.add_argument("--dtypes", nargs="+", default=["float32"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--data", nargs="+", default=["short"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--eval-rows", dest="eval_rows", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", default="on",
                    choices=["on", "off"], help="both sides (TRL's default: on)")
    ap.add_argument("--no-share-prefix", dest="share_prefix", action="store_false",
                    help="lorakit computes shared prompt prefixes per row, as TRL does")
    args = ap.parse_args()
    if args.worker:
        args.data = args.data[0]
        return worker(args)

    from transformers import AutoTokenizer

    from lorakit.base.default_model import default_model_dir
    from lorakit.base.loading import machine_summary
    print(f"train_vs_trl: {machine_summary()}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    ceilings = {d: gemm_ceiling(getattr(torch, d)) for d in args.dtypes}
    print(f"train_vs_trl: {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()},"
          f" {os.cpu_count()} cores, torch {torch.__version__}; GEMM ceiling "
          + ", ".join(f"{d} {c / 1e9:.0f} GFLOP/s" for d, c in ceilings.items()))
    print(f"  SmolLM2-135M, LoRA r={R} alpha={ALPHA} all-linear, dropout 0, batch {args.batch}, "
          f"{args.steps} steps, lr 2e-4 linear, gradient checkpointing {args.gradient_checkpointing},"
          f" lorakit share_prefix={args.share_prefix}, {args.repeats} alternating runs each")
    for kind in args.data:
        rows = make_rows(kind, args.rows, seed=1)
        seq, label_fraction = token_stats(rows, tokenizer, kind)
        for dtype in args.dtypes:
            runs: dict[str, list[dict]] = {"lorakit": [], "trl": []}
            for _ in range(args.repeats):
                for who in ("lorakit", "trl"):
                    cmd = [sys.executable, __file__, "--worker", who, "--dtype", dtype, "--data",
                           kind, "--steps", str(args.steps), "--batch", str(args.batch),
                           "--rows", str(args.rows), "--eval-rows", str(args.eval_rows),
                           "--gradient-checkpointing", args.gradient_checkpointing]
                    cmd += [] if args.share_prefix else ["--no-share-prefix"]
                    res = subprocess.run(cmd, capture_output=True, text=True)
                    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
                    if res.returncode or not line:
                        sys.exit(f"{who} worker failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
                    runs[who].append(json.loads(line[0][7:]))
            med = {w: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                   for w, rs in runs.items()}
            tps = {w: statistics.median(r["tokens"] / r["seconds"] for r in rs)
                   for w, rs in runs.items()}
            achieved = tps["lorakit"] * flops_per_token(seq, label_fraction)
            print(f"\n  [{kind} rows, ~{seq:.0f} tokens/row, {dtype}]")
            for w in ("lorakit", "trl"):
                print(f"    {w:8s} {tps[w]:7.1f} tokens/s   peak RSS {med[w]['peak_rss_mb']:6.0f} MB"
                      f"   eval loss {med[w]['eval_loss']:.4f}")
            print(f"    throughput ratio lorakit/trl {tps['lorakit'] / tps['trl']:.2f} (target >= 2.0)")
            print(f"    peak RSS ratio   lorakit/trl "
                  f"{med['lorakit']['peak_rss_mb'] / med['trl']['peak_rss_mb']:.2f} (target <= 0.5)")
            print(f"    eval loss ratio  lorakit/trl "
                  f"{med['lorakit']['eval_loss'] / med['trl']['eval_loss']:.3f} (target <= 1.02)")
            print(f"    lorakit achieved {achieved / 1e9:.0f} GFLOP/s = "
                  f"{achieved / ceilings[dtype]:.0%} of the {dtype} GEMM ceiling (model FLOPs: "
                  "4·N per non-pad token; a shared prefix counts once per row, recompute never)")


if __name__ == "__main__":
    main()
