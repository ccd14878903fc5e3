"""`SFTTrainer`: supervised fine-tuning of a LoraModel, lorakit's call and TRL's.

    trainer = SFTTrainer(model, TrainConfig(output_dir="out", max_steps=200), train_data=rows,
                         eval_data=held_out, tokenizer=tokenizer)
    result = trainer.train()            # or train(resume_from_checkpoint=True)
    metrics = trainer.evaluate()

The loop is lorakit.training.loop's `Trainer`; this class hands it the SFT objective
(lorakit.training.sft) and translates TRL's arguments (lorakit.training.trl_call).
"""

from __future__ import annotations

from typing import Any

from lorakit.errors import ConfigError
from lorakit.training import trl_call
from lorakit.training.config import TrainConfig
from lorakit.training.launch import Launch, resolve_launch
from lorakit.training.loop import Trainer
from lorakit.training.sft import SFTObjective


class SFTTrainer(Trainer):
    def __init__(
        self,
        model,
        args: TrainConfig | None = None,
        train_data: Any = None,
        eval_data: Any = None,
        tokenizer: Any = None,
        launch: Launch | None = None,
        *,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        peft_config: Any = None,
        formatting_func: Any = None,
        callbacks: list[Any] | None = None,
    ) -> None:
        """launch: the run's placement, when the caller (the SFT recipe) has resolved it;
        otherwise read from `args` and torchrun's environment (a group of one without it).

        TRL's call works too (lorakit.training.trl_call): `model` as an id or path,
        `args=SFTConfig(...)`, `train_dataset`, `eval_dataset`, `processing_class`,
        `peft_config` (adapters injected here, after seeding) and `formatting_func`.
        `callbacks`: HF TrainerCallback-style objects (lorakit.training.callbacks)."""
        args = args or TrainConfig()
        if train_data is not None and train_dataset is not None:
            raise ConfigError("pass train_data or train_dataset (TRL's name), not both")
        tokenizer = tokenizer if tokenizer is not None else processing_class
        model, tokenizer = trl_call.lora_model_for(model, args, peft_config, tokenizer)
        if train_dataset is not None or eval_dataset is not None:
            trl_call.report_differences(args, train_dataset)
            train_data = trl_call.rows_for(train_dataset, args, formatting_func)
            eval_data = trl_call.rows_for(eval_dataset, args, formatting_func)
        launch = launch if launch is not None else resolve_launch(args)
        objective = SFTObjective(model, tokenizer, args, sharded=launch.group.mode == "fsdp2")
        self.tokenizer = tokenizer
        super().__init__(model, objective, args, train_data, eval_data, launch, callbacks)

    @property
    def prefix_off(self) -> dict[str, str | None]:
        """Why shared-prompt-prefix forwards are off for "train" / "eval" (None: they are on)."""
        return self.objective.prefix_off
