"""`lorakit demo`: the whole story on the embedded default model, in a few minutes on a CPU.

1. build the date-normalisation task (train rows, held-out eval rows on other dates);
2. exact match of the base model on the held-out rows;
3. LoRA fine-tuning with progress and checkpoints (the same recipe as `lorakit train`);
4. exact match again with the adapter, and after merging it into the weights (same answers);
5. a before/after table, and where the adapter, plot and report are.

With objective="dpo" (`lorakit demo --objective dpo`) the SFT rows carry an annotator's habit and
a DPO step after SFT removes it (lorakit.demo.preference).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from lorakit.base.config import ModelConfig
from lorakit.data.config import DataConfig
from lorakit.demo import preference
from lorakit.demo.task import DEMO_DEFAULTS, INSTRUCTION, make_examples, to_row
from lorakit.inference.generate import (
    completion_examples,
    exact_match,
    generate_texts,
    render_prompt,
)
from lorakit.log import get_logger
from lorakit.lora import LoraConfig
from lorakit.recipes import SFTRecipe
from lorakit.training import TrainConfig
from lorakit.training.report import OutputConfig
from lorakit.training.run_config import RunConfig

log = get_logger(__name__)  # "lorakit demo: ..." lines


def run_demo(
    output_dir: str = "lorakit-demo",
    max_steps: int | None = None,
    n_eval: int | None = None,
    seed: int = 0,
    objective: str = "sft",
) -> int:
    d, dpo = DEMO_DEFAULTS, objective == "dpo"
    max_steps = max_steps or d["max_steps"]
    out, t0 = Path(output_dir), time.perf_counter()
    examples, pairs = _write_task(out, n_eval or d["n_eval"], seed, dpo)
    recipe = SFTRecipe(_run_config(out, max_steps, seed), echo_config=False).setup()
    scores = _Scores(recipe, examples)
    with recipe.model.disable_adapters():
        scores.add("base model", recipe.model)
    log.info(
        f"fine-tuning: {max_steps} steps of {d['batch_size']} rows, lr {d['lr']}, "
        f"r={d['r']} alpha={d['alpha']} on all linear layers"
    )
    outcome = recipe.train(report=False)
    scores.add("with adapter", recipe.model)
    if dpo:
        _dpo_step(recipe, scores, pairs, out, seed)
    scores.add("merged model", recipe.model.merge_and_unload())
    outcome.samples = scores.samples(3)
    shown = {
        "base": "base model",
        "adapter": "with adapter",
        "after DPO": "after DPO",
        "merged": "merged model",
    }
    recipe.write_report(
        outcome,
        {f"exact match, {k}": f"{scores.em[v]:.1%}" for k, v in shown.items() if v in scores.em},
    )
    scores.print_table()
    r = outcome.result
    log.info(
        f"train {r.seconds:.0f} s at {r.tokens_per_second:.0f} tokens/s, "
        f"eval loss {r.metrics.get('eval_loss', float('nan')):.3f}; "
        f"total {time.perf_counter() - t0:.0f} s"
    )
    adapter = out / "dpo" / "adapter" if dpo else out / "adapter"  # the last one trained
    log.info(f"adapter     -> {adapter}  (PEFT format)")
    log.info(f"loss plot   -> {outcome.plot}")
    log.info(f"report      -> {outcome.report}")
    log.info(
        f"try it: lorakit generate --adapter {adapter} --chat --system "
        f'"{INSTRUCTION}" --max-new-tokens 16 "{examples[1].prompt[-1]["content"]}"'
    )
    log.info(
        f"for llama.cpp / Ollama: lorakit export --adapter {adapter} --format gguf "
        f"--outtype q8_0 --output {out / 'model.gguf'}"
    )
    return 0


def _write_task(out: Path, n_eval: int, seed: int, dpo: bool) -> tuple[list, list[dict]]:
    """The task's rows in out/data (with dpo: SFT rows with the annotator's habit, and the DPO
    step's pairs on rows of further dates); the held-out rows as prompt / reference examples."""
    n_train = DEMO_DEFAULTS["n_train"]
    n_pairs = preference.DPO_DEFAULTS["max_steps"] * preference.DPO_DEFAULTS["batch_size"]
    train, held_out = make_examples(n_train + (n_pairs if dpo else 0), n_eval, seed=seed)
    train_rows = preference.habit_rows(train[:n_train]) if dpo else [to_row(e) for e in train]
    pairs = preference.preference_pairs(train[n_train:]) if dpo else []
    eval_rows = [to_row(e) for e in held_out]
    (out / "data").mkdir(parents=True, exist_ok=True)
    files = {"train": train_rows, "eval": eval_rows} | ({"pairs": pairs} if dpo else {})
    for name, rows in files.items():
        (out / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = completion_examples(eval_rows)
    log.info(
        f"task: normalise dates to YYYY-MM-DD; {len(train_rows)} training rows, "
        f"{len(eval_rows)} held-out rows on other dates -> {out / 'data'}"
    )
    if dpo:
        log.info(
            f"the training rows of {', '.join(preference.HABIT_STYLES)} dates answer "
            f"{preference.habit('YYYY-MM-DD')!r} (an annotator's habit); {len(pairs)} "
            "preference pairs prefer the bare date"
        )
    log.info(f"example: {examples[0].prompt[-1]['content']!r} -> {examples[0].reference!r}")
    return examples, pairs


def _dpo_step(recipe: SFTRecipe, scores: _Scores, pairs: list[dict], out: Path, seed: int):
    """DPO from the SFT adapter (its own reference), then the held-out score again."""
    d = preference.DPO_DEFAULTS
    log.info(
        f"preference tuning (DPO): {d['max_steps']} steps of {d['batch_size']} pairs, "
        f"lr {d['lr']}, beta {d['beta']}, from the SFT adapter"
    )
    result = preference.dpo_step(
        recipe.model, recipe.tokenizer, pairs, str(out / "dpo"), recipe.launch, seed
    )
    log.info(f"DPO {result.seconds:.0f} s; adapter -> {out / 'dpo' / 'adapter'}")
    scores.add("after DPO", recipe.model)


def _run_config(out: Path, max_steps: int, seed: int) -> RunConfig:
    """The demo's run, as `lorakit train` would take it from a config file."""
    d, data = DEMO_DEFAULTS, out / "data"
    return RunConfig(
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
        # the demo reports its own samples; a second demo replaces the first
        output=OutputConfig(dir=str(out), samples=0, overwrite=True),
    )


class _Scores:
    """Held-out exact match of the base, the adapter and the merged model, and their answers."""

    def __init__(self, recipe: SFTRecipe, examples: list) -> None:
        self.tokenizer = recipe.tokenizer
        self.prompts = [e.prompt for e in examples]
        self.refs = [e.reference for e in examples]
        self.em: dict[str, float] = {}
        self.answers: dict[str, list[str]] = {}

    def add(self, name: str, model: Any) -> None:
        t, d = time.perf_counter(), DEMO_DEFAULTS
        answers = generate_texts(
            model,
            self.tokenizer,
            self.prompts,
            d["max_new_tokens"],
            batch_size=d["eval_batch_size"],
        )
        self.answers[name] = answers
        self.em[name] = sum(exact_match(a, r) for a, r in zip(answers, self.refs)) / len(self.refs)
        said = f"{name} exact match: {self.em[name]:.0%}"
        if name == "merged model":
            same = sum(a == b for a, b in zip(self.answers[self.tuned], answers))
            said += f" (answers identical to the unmerged adapter's on {same}/{len(answers)} rows)"
        else:
            said += f" ({time.perf_counter() - t:.0f} s)"
        log.info(said)

    @property
    def tuned(self) -> str:
        """The adapter's last score: after the DPO step where there was one."""
        return "after DPO" if "after DPO" in self.answers else "with adapter"

    def samples(self, n: int) -> list[dict[str, str]]:
        rows = zip(self.prompts, self.answers["base model"], self.answers[self.tuned], self.refs)
        return [
            {"prompt": render_prompt(p, self.tokenizer)[0], "before": b, "after": a, "reference": r}
            for p, b, a, r in list(rows)[:n]
        ]

    def print_table(self) -> None:
        names = {
            "base model": "base SmolLM2-135M-Instruct",
            "with adapter": "+ LoRA adapter (SFT)",
            "after DPO": "+ DPO step",
            "merged model": "merged into the weights",
        }
        print()
        print(f"  held-out exact match ({len(self.refs)} rows)")
        print("  " + "-" * 40)
        for key, name in names.items():
            if key in self.em:
                print(f"  {name:30s} {self.em[key]:7.1%}")
        print("  " + "-" * 40)
        rows = zip(self.prompts, self.answers["base model"], self.answers[self.tuned], self.refs)
        for p, b, a, r in list(rows)[:3]:
            said = f"{p[-1]['content']!r}: base {b.strip()[:30]!r} -> tuned {a.strip()!r}"
            print(f"  {said} (want {r!r})")
        print()
