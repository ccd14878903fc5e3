"""`lorakit demo`: the whole story on the embedded default model, in a few minutes on a CPU.

1. build the date-normalisation task (train rows, held-out eval rows on other dates);
2. exact match of the base model on the held-out rows;
3. LoRA fine-tuning with progress and checkpoints;
4. exact match again with the adapter, and after merging it into the weights (same answers);
5. a before/after table, and where the adapter, plot and report are.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lorakit.base.config import ModelConfig
from lorakit.data.config import DataConfig
from lorakit.demo.task import DEMO_DEFAULTS, INSTRUCTION, make_task
from lorakit.inference.generate import (
    completion_examples,
    exact_match,
    generate_texts,
    render_prompt,
)
from lorakit.lora import LoraConfig
from lorakit.recipes import SFTRecipe
from lorakit.training import TrainConfig
from lorakit.training.report import OutputConfig, plot_losses, write_report
from lorakit.training.run_config import RunConfig


def _say(msg: str) -> None:
    print(f"lorakit demo: {msg}", flush=True)


def run_demo(
    output_dir: str = "lorakit-demo",
    max_steps: int | None = None,
    n_eval: int | None = None,
    seed: int = 0,
) -> int:
    d = DEMO_DEFAULTS
    max_steps = max_steps or d["max_steps"]
    n_eval = n_eval or d["n_eval"]
    out = Path(output_dir)
    t0 = time.perf_counter()

    # 1. the task
    train_rows, eval_rows = make_task(d["n_train"], n_eval, seed=seed)
    (out / "data").mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        (out / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = completion_examples(eval_rows)
    _say(
        f"task: normalise dates to YYYY-MM-DD; {len(train_rows)} training rows, "
        f"{len(eval_rows)} held-out rows on other dates -> {out / 'data'}"
    )
    _say(f"example: {examples[0].prompt[-1]['content']!r} -> {examples[0].reference!r}")

    # 2. the run, assembled by the same recipe as `lorakit train`: base model, adapters, data
    data = out / "data"
    cfg = RunConfig(
        model=ModelConfig(),
        data=DataConfig(train=str(data / "train.jsonl"), eval=str(data / "eval.jsonl")),
        lora=LoraConfig(
            r=d["r"], lora_alpha=d["alpha"], lora_dropout=0.0, target_modules="all-linear"
        ),
        training=TrainConfig(
            output_dir=str(out),
            max_steps=max_steps,
            learning_rate=d["lr"],
            per_device_train_batch_size=d["batch_size"],
            max_length=d["max_length"],
            warmup_steps=d["warmup_steps"],
            lr_scheduler_type=d["lr_scheduler_type"],
            max_grad_norm=d["max_grad_norm"],
            logging_steps=5,
            save_steps=max(1, max_steps // 2),
            save_total_limit=2,
            seed=seed,
            per_device_eval_batch_size=d["eval_batch_size"],
        ),
        output=OutputConfig(dir=str(out), samples=0, overwrite=True),
    )  # the demo reports its own samples; a second demo replaces the first
    recipe = SFTRecipe(cfg, echo_config=False).setup()
    recipe.prepare_output()
    lora, tokenizer, trainer = recipe.model, recipe.tokenizer, recipe.trainer
    prompts = [e.prompt for e in examples]
    refs = [e.reference for e in examples]

    def score(m) -> tuple[float, list[str]]:
        preds = generate_texts(
            m, tokenizer, prompts, d["max_new_tokens"], batch_size=d["eval_batch_size"]
        )
        return sum(exact_match(p, r) for p, r in zip(preds, refs)) / len(refs), preds

    t = time.perf_counter()
    with lora.disable_adapters():
        base_em, base_preds = score(lora)
    _say(f"base model exact match: {base_em:.0%} ({time.perf_counter() - t:.0f} s)")

    # 3. LoRA fine-tuning
    _say(
        f"fine-tuning: {max_steps} steps of {d['batch_size']} rows, lr {d['lr']}, "
        f"r={d['r']} alpha={d['alpha']} on all linear layers"
    )
    result = trainer.train()

    # 4. after, with the adapter and merged
    t = time.perf_counter()
    tuned_em, tuned_preds = score(lora)
    _say(f"with adapter exact match: {tuned_em:.0%} ({time.perf_counter() - t:.0f} s)")
    merged = lora.merge_and_unload()
    merged_em, merged_preds = score(merged)
    same = sum(a == b for a, b in zip(tuned_preds, merged_preds))
    _say(
        f"merged model exact match: {merged_em:.0%} "
        f"(answers identical to the unmerged adapter's on {same}/{len(refs)} rows)"
    )

    # 5. the table, the report
    samples = [
        {"prompt": render_prompt(p, tokenizer)[0], "before": b, "after": a, "reference": r}
        for p, b, a, r in list(zip(prompts, base_preds, tuned_preds, refs))[:3]
    ]
    plot_losses(out)
    extra = {
        "exact match, base": f"{base_em:.1%}",
        "exact match, adapter": f"{tuned_em:.1%}",
        "exact match, merged": f"{merged_em:.1%}",
    }
    report = write_report(out, trainer.run_config(trainer.total_steps()), result, samples, extra)
    rows = [
        ("base SmolLM2-135M-Instruct", base_em),
        ("+ LoRA adapter", tuned_em),
        ("merged into the weights", merged_em),
    ]
    print()
    print(f"  held-out exact match ({len(refs)} rows)")
    print("  " + "-" * 40)
    for name, em in rows:
        print(f"  {name:30s} {em:7.1%}")
    print("  " + "-" * 40)
    for p, b, a, r in list(zip(prompts, base_preds, tuned_preds, refs))[:3]:
        print(
            f"  {p[-1]['content']!r}: base {b.strip()[:30]!r} -> tuned {a.strip()!r} (want {r!r})"
        )
    print()
    _say(
        f"train {result.seconds:.0f} s at {result.tokens_per_second:.0f} tokens/s, "
        f"eval loss {result.metrics.get('eval_loss', float('nan')):.3f}; "
        f"total {time.perf_counter() - t0:.0f} s"
    )
    _say(f"adapter     -> {out / 'adapter'}  (PEFT format)")
    _say(f"loss plot   -> {out / 'loss.png'}")
    _say(f"report      -> {report}")
    _say(
        f"try it: lorakit generate --adapter {out / 'adapter'} --chat --system "
        f'"{INSTRUCTION}" --max-new-tokens 16 "{examples[1].prompt[-1]["content"]}"'
    )
    return 0
