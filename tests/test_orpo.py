"""ORPO on adapters against TRL's experimental ORPOTrainer + PEFT (tiny model, SmolLM2's
tokenizer), as test_dpo.py does for DPO: same call, TRL's adapter copied into lorakit's, one
batch of all pairs; the loss, TRL's metrics and the adapter gradients equal TRL's in fp32, and
ten steps of train() follow TRL's losses.

The rows are chat turns rendered as text and end with EOS: TRL's ORPO adds a BOS id before each
prompt and an EOS id after each answer unless they are there, lorakit tokenizes as TRL's stable
preference trainers do; on these rows both give the same tokens (checked).
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
import trl  # noqa: F401  (trl.experimental needs trl imported first)
from conftest import tiny_chat_model
from datasets import Dataset
from test_dpo import (
    assert_grads_equal,
    copy_peft_adapter,
    first_step,
    run_cli,
    train_both,
    trl_first_step,
)
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

import lorakit

pytestmark = [
    pytest.mark.default_model,  # SmolLM2's tokenizer
    pytest.mark.filterwarnings("ignore::UserWarning"),  # TRL's experimental-API warning
]


def turn(role: str, text: str) -> str:
    return f"<|im_start|>{role}\n{text}<|im_end|>"


ROWS = [
    {
        "prompt": turn("system", "Answer with a number.") + "\n" + turn("user", f"{a} minus {b}?")
        + "\n<|im_start|>assistant\n",
        "chosen": f"{a - b}<|im_end|>",
        "rejected": f"{a - b + 2} I think<|im_end|>",
    }
    for a, b in [(5, 2), (7, 3), (9, 9), (4, 1), (8, 6)]
]
METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"]


def trainers(tokenizer, tmp_path, **common):
    common = dict(use_cpu=True, max_length=64, gradient_checkpointing=False, beta=0.3,
                  per_device_train_batch_size=len(ROWS)) | common
    torch.manual_seed(0)
    theirs = ORPOTrainer(
        model=tiny_chat_model(tokenizer),
        args=ORPOConfig(output_dir=str(tmp_path / "trl"), bf16=False, report_to="none",
                        save_strategy="no", **common),
        train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer,
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                    init_lora_weights=False),
    )
    ours = lorakit.ORPOTrainer(
        model=tiny_chat_model(tokenizer),
        args=lorakit.ORPOConfig(output_dir=str(tmp_path / "ours"), bf16=False, **common),
        train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer,
        peft_config=lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    copy_peft_adapter(theirs.model, ours.model)
    return theirs, ours


@pytest.mark.parametrize("packed", [True, False])
def test_first_step_equals_trl(smol_tokenizer, tmp_path, packed):
    theirs, ours = trainers(smol_tokenizer, tmp_path)
    for mine, row in zip(ours.train_data.examples, theirs.train_dataset):  # the same tokens
        assert mine["prompt_ids"] + mine["chosen_ids"] == row["chosen_input_ids"]
        assert mine["prompt_ids"] + mine["rejected_ids"] == row["rejected_input_ids"]
    loss, metrics, grads = trl_first_step(theirs, "_stored_metrics")

    terms, pairs = first_step(ours, packed)
    assert pairs == len(ROWS)
    assert float(terms.loss.detach()) / pairs == pytest.approx(float(loss), rel=1e-5, abs=1e-6)
    for name in METRICS:
        assert terms.sums[name] / pairs == pytest.approx(metrics[name], rel=1e-4, abs=1e-5), name
    assert abs(metrics["rewards/margins"]) > 1e-3
    assert_grads_equal(ours.model, grads)


def test_ten_steps_follow_trls_losses(smol_tokenizer, tmp_path):
    theirs, ours = trainers(smol_tokenizer, tmp_path, max_steps=10, learning_rate=1e-3,
                            logging_steps=1)
    our_losses = train_both(theirs, ours, steps=10)
    assert our_losses[-1] < our_losses[0]


def test_cli_trains_orpo(tmp_path, tiny_chat_dir):
    """`lorakit train --objective orpo` in a fresh process; a --loss-type (DPO's, KTO's) is
    refused in one line."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    common = ("train", "--objective", "orpo", "--model", tiny_chat_dir, "--data", data,
              "--max-steps", 2, "--batch-size", 5, "--lr", "1e-3", "--beta", "0.2")
    res = run_cli(*common, "--eval-data", data, "--output", tmp_path / "out",
                  "--set", "training.logging_steps=1")
    assert res.returncode == 0, res.stdout + res.stderr
    logged = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()]
    assert {"nll_loss", "log_odds_ratio", "rewards/accuracies"} <= set(logged[0])
    assert "eval_log_odds_chosen" in logged[-1]
    res = run_cli(*common, "--output", tmp_path / "bad", "--loss-type", "ipo")
    assert res.returncode == 2 and "unknown key 'loss_type' in section 'orpo'" in res.stderr
