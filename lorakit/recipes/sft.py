"""The SFT recipe: one LoRA / QLoRA fine-tuning run, assembled once.

`lorakit train`, `lorakit demo` and scripts run this; each step is a method, in the order it
happens, and the loop itself is `Trainer.train` (lorakit.training.loop) with the SFT objective:

    recipe = SFTRecipe(run_config(path, flags, sets))
    recipe.setup()                       # launch, output, base model, adapters, data, trainer
    outcome = recipe.train()             # samples before, the loop, samples after, report

Under torchrun every process runs the same recipe; the process group decides who writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.atomic import atomic_write_bytes, remove_tree, writing
from lorakit.base import load_model, prepare_for_kbit_training
from lorakit.base.loading import resolve_dtype
from lorakit.data import load_records
from lorakit.data.preference import prompts_and_chosen, read_any
from lorakit.data.sources import read_records
from lorakit.errors import OutputExistsError, UserError
from lorakit.inference.generate import (
    Example,
    completion_examples,
    generate_texts,
    render_prompt,
)
from lorakit.log import get_logger
from lorakit.lora import LoraModel, get_lora_model
from lorakit.training import (
    DPOTrainer,
    KTOTrainer,
    ORPOTrainer,
    SFTTrainer,
    TrainResult,
    list_checkpoints,
)
from lorakit.training.config import PREFERENCE_OBJECTIVES, set_seed
from lorakit.training.distributed import ProcessGroup
from lorakit.training.launch import Launch, resolve_launch
from lorakit.training.report import plot_losses, write_report
from lorakit.training.run_config import RunConfig

log = get_logger(__name__)


@dataclass
class Outcome:
    """What a run produced (files are written by the main process only)."""

    result: TrainResult
    output_dir: Path
    report: Path | None = None
    plot: Path | None = None
    samples: list[dict[str, str]] = field(default_factory=list)


class SFTRecipe:
    def __init__(
        self, cfg: RunConfig, echo_config: bool = True, resume: str | bool | None = None
    ) -> None:
        self.cfg = cfg
        self.echo_config = echo_config  # print the resolved config (config.yaml) when starting
        # continue the run in the output directory (True: its latest checkpoint) or from a
        # checkpoint path; known at setup, so that a clash with a previous run fails first
        self.resume = resume
        self.launch: Launch | None = None
        self.dtype: torch.dtype | None = None
        self.model: LoraModel | None = None
        self.tokenizer: Any = None
        self.trainer: SFTTrainer | DPOTrainer | None = None
        self._previous: list[Path] = []  # a previous run's files this run replaces

    @property
    def group(self) -> ProcessGroup | None:
        return self.launch.group if self.launch is not None else None

    @property
    def is_main(self) -> bool:
        return self.launch is None or self.launch.is_main

    def say(self, msg: str) -> None:
        if self.is_main:
            log.info(msg)

    # -- setup, in order ----------------------------------------------------------------------
    def setup(self) -> SFTRecipe:
        self._setup_launch()
        self._setup_output()
        self._check_data()
        self._setup_model()
        self._setup_trainer()
        return self

    def _setup_launch(self) -> None:
        """The process group (a group of one without torchrun), this rank's device, the batch
        split and the base dtype: resolved here once, and handed to the trainer."""
        train = self.cfg.training
        if not self.cfg.data.train:
            raise UserError("no training data: pass --data FILE or set data.train in the config")
        # a broken torchrun environment, or a batch the ranks cannot split, fails on every rank
        self.launch = resolve_launch(train)
        self.dtype = resolve_dtype(self.cfg.model.dtype, self.launch.device)

    def _check_data(self) -> None:
        """Read and check the data files before the model loads: a bad row fails in a second,
        not after minutes of loading (the trainer reads them again to tokenize; parsing is
        cheap next to loading a model)."""
        d, fmt = self.cfg.data, self.cfg.training.dataset_format
        for source in (d.train, d.eval):
            if source is not None and self.preference:
                read_any(source, self.cfg.training.objective)
            elif source is not None:
                read_records(source, fmt)

    def _setup_output(self) -> None:
        if self.is_main and self.echo_config:
            text = self.cfg.to_yaml()
            self.say("resolved config\n" + "\n".join("  " + ln for ln in text.splitlines()))
        self._previous = self.check_output()  # before the model loads: a clash fails at once

    def previous_run(self) -> list[Path]:
        """What a run already in the output directory left: checkpoints and the adapter."""
        out = Path(self.cfg.output.dir)
        adapter = out / "adapter"
        return list_checkpoints(out) + ([adapter] if adapter.exists() else [])

    def check_output(self) -> list[Path]:
        """What this run would replace in the output directory (with `output.overwrite`); an
        OutputExistsError if that is not allowed. A fresh run (no `resume`) into a directory
        holding another run's checkpoints refuses: they would mix (pruning and --resume pick
        by step number)."""
        out = Path(self.cfg.output.dir)
        if out.exists() and not out.is_dir():  # every rank: under torchrun all of them stop here
            raise OutputExistsError(f"output directory {out} exists and is not a directory")
        previous = [] if self.resume else self.previous_run()
        if previous and not self.cfg.output.overwrite:
            raise OutputExistsError(
                f"{out} already holds a run ({', '.join(p.name for p in previous[:3])}"
                f"{', ...' if len(previous) > 3 else ''}): pass --resume to continue it, "
                "--set output.overwrite=true to replace it, or another --output"
            )
        return previous

    def _prepare_output(self) -> None:
        """The output directory for this run, and its config.yaml, when the run starts (a run
        that fails to set up leaves nothing); the previous run that `check_output` allowed to
        be replaced is deleted."""
        out = Path(self.cfg.output.dir)
        if self.is_main:
            for p in self._previous:
                remove_tree(p)
            with writing(out):
                out.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(out / "config.yaml", self.cfg.to_yaml().encode())

    @property
    def fsdp2(self) -> bool:
        return self.group.world_size > 1 and self.group.mode == "fsdp2"

    def _setup_model(self) -> None:
        m, train = self.cfg.model, self.cfg.training
        # fsdp2 shards from the CPU: each rank moves only its part; quantized weights are
        # placed while loading
        device = "cpu" if self.fsdp2 and not m.quantization else self.launch.device
        model, self.tokenizer = load_model(
            m.name_or_path,
            dtype=self.dtype,
            quantization=m.quantization,
            device=device,
            trust_remote_code=m.trust_remote_code,
        )
        if m.quantization:
            prepare_for_kbit_training(model, gradient_checkpointing=train.gradient_checkpointing)
        set_seed(train.seed)  # `seed` fixes the whole run (HF Trainer / TRL): adapters included
        self.model = get_lora_model(model, self.cfg.lora)
        if self.is_main:
            self.model.print_trainable_parameters()

    @property
    def preference(self) -> bool:
        return self.cfg.training.objective in PREFERENCE_OBJECTIVES

    def _setup_trainer(self) -> None:
        d, objective = self.cfg.data, self.cfg.training.objective
        if self.preference:  # fresh adapters: a reference is the base, the adapters switched off
            trainer, extra = {
                "dpo": (DPOTrainer, {"reference": "base"}),
                "kto": (KTOTrainer, {"reference": "base"}),
                "orpo": (ORPOTrainer, {}),
            }[objective]
            self.trainer = trainer(
                self.model,
                args=self.cfg.training,
                train_dataset=d.train,
                eval_dataset=d.eval,
                processing_class=self.tokenizer,
                launch=self.launch,
                options=getattr(self.cfg, objective),
                **extra,
            )
            data = self.trainer.train_data.describe()
        else:
            self.trainer = SFTTrainer(
                self.model,
                self.cfg.training,
                train_data=d.train,
                eval_data=d.eval,
                tokenizer=self.tokenizer,
                launch=self.launch,
            )
            stats = self.trainer.train_data.stats
            data = (
                f"{stats.rows} rows -> {stats.examples} examples "
                f"({stats.truncated} truncated, {stats.dropped} dropped)"
            )
        self.say(f"train data {data}, {self.trainer.total_steps()} steps")
        if self.resume:  # a checkpoint that cannot continue this run fails before any write
            self.trainer.checkpoint_to_resume(self.resume)

    # -- the run ------------------------------------------------------------------------------
    def train(self, report: bool = True) -> Outcome:
        """Samples before, the loop, samples after; the loss plot and report.md unless
        `report=False` (the demo writes its own with `write_report`)."""
        if self.trainer is None:
            self.setup()
        self._prepare_output()
        picked = self._sample_prompts()
        samples = []
        if picked:
            with self.model.disable_adapters():
                before = self._generate([e.prompt for e in picked])
            samples = [
                {
                    "prompt": render_prompt(e.prompt, self.tokenizer)[0],
                    "before": b,
                    "reference": e.reference,
                }
                for e, b in zip(picked, before)
            ]
        result = self.trainer.train(resume_from_checkpoint=self.resume)
        outcome = Outcome(result, Path(self.cfg.output.dir), samples=samples)
        if not self.is_main:
            return outcome
        if samples:
            for s, a in zip(samples, self._generate([e.prompt for e in picked])):
                s["after"] = a
        if report:
            self.write_report(outcome)
        return outcome

    def write_report(self, outcome: Outcome, extra: dict[str, str] | None = None) -> None:
        """loss.png and report.md of a finished run (main process)."""
        trainer = self.trainer
        outcome.plot = plot_losses(outcome.output_dir)
        config = trainer.run_config(trainer.total_steps())
        outcome.report = write_report(
            outcome.output_dir, config, outcome.result, outcome.samples, extra
        )

    def _sample_prompts(self) -> list:
        """The report's before/after prompts: the first `output.samples` of the eval rows (or the
        training rows), main process only; none when the base is sharded."""
        n = self.cfg.output.samples
        if not n or not self.is_main:
            return []
        if self.fsdp2:
            self.say("no sample generations in fsdp2 mode (the base is sharded)")
            return []
        source = self.cfg.data.eval or self.cfg.data.train
        if self.preference:  # a preferred answer is what a generation is compared to
            return [Example(p, chosen) for p, chosen in prompts_and_chosen(source)[:n]]
        return completion_examples(load_records(source))[:n]

    def _generate(self, prompts: list) -> list[str]:
        return generate_texts(
            self.model, self.tokenizer, prompts, self.cfg.output.sample_max_new_tokens
        )


def summary_lines(outcome: Outcome) -> list[str]:
    """What a finished (or interrupted) run reports on the console."""
    r, out = outcome.result, outcome.output_dir
    status = "interrupted at" if r.interrupted else "finished"
    lines = [
        f"{status} step {r.global_step} in {r.seconds:.0f} s "
        f"({r.tokens_per_second:.0f} tokens/s, peak {r.peak_memory_mb:.0f} MB)"
    ]
    lines += [
        f"{k} = {v:.4f}" if isinstance(v, float) else f"{k} = {v}"
        for k, v in (r.metrics or {}).items()
    ]
    if not r.interrupted:
        lines.append(f"adapter  -> {out / 'adapter'}")
    lines.append(f"checkpoint -> {r.checkpoint}")
    if outcome.plot:
        lines.append(f"loss plot -> {outcome.plot}")
    lines.append(f"report -> {outcome.report}")
    return lines
