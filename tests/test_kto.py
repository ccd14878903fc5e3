"""KTO on adapters against TRL's KTOTrainer + PEFT, on a tiny model with SmolLM2's tokenizer.

As in test_dpo.py: the same call, TRL's adapter (non-zero A and B) copied into lorakit's, one
batch of all rows; the loss, TRL's metrics (the KL estimate included) and every adapter gradient
equal TRL's in fp32, and ten steps of train() follow TRL's losses.
"""

from __future__ import annotations

import json

import peft
import pytest
import trl
from conftest import tiny_chat_model
from datasets import Dataset
from test_dpo import ROWS as PAIRS
from test_dpo import (
    assert_grads_equal,
    copy_peft_adapter,
    first_step,
    run_cli,
    train_both,
    trl_first_step,
)

import lorakit
from lorakit.data import DataError
from lorakit.data.preference import prepare_unpaired

pytestmark = pytest.mark.default_model  # SmolLM2's tokenizer and chat template

ROWS = [
    {
        "prompt": [{"role": "user", "content": f"{a} times {b}?"}],
        "completion": [{"role": "assistant", "content": str(a * b if good else a * b + 2)}],
        "label": good,
    }
    for a, b, good in [(2, 3, True), (4, 1, False), (3, 3, True), (5, 2, False), (1, 7, True),
                       (2, 2, True), (6, 1, False)]
]
SEED = 2  # a base and adapter whose mismatched rows' KL estimate is > 0 (not clamped)
METRICS = ["kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
           "logps/rejected"]


def configs(tmp_path, loss_type="kto", batch=None, **common):
    common = dict(per_device_train_batch_size=batch or len(ROWS), use_cpu=True, max_length=64,
                  gradient_checkpointing=False, loss_type=loss_type, desirable_weight=1.0,
                  undesirable_weight=1.5, seed=SEED, **common)
    return (trl.KTOConfig(output_dir=str(tmp_path / "trl"), bf16=False, report_to="none",
                          save_strategy="no", **common),
            lorakit.KTOConfig(output_dir=str(tmp_path / "ours"), bf16=False, **common))


def trainers(tokenizer, tmp_path, rows=ROWS, loss_type="kto", **common):
    """TRL's trainer and lorakit's, lorakit's adapter a copy of TRL's (not the reference)."""
    theirs_args, ours_args = configs(tmp_path, loss_type, **common)
    theirs = trl.KTOTrainer(
        model=tiny_chat_model(tokenizer, seed=SEED), args=theirs_args,
        train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                    init_lora_weights=False),
    )
    ours = lorakit.KTOTrainer(
        model=tiny_chat_model(tokenizer, seed=SEED), args=ours_args,
        train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        peft_config=lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    copy_peft_adapter(theirs.model, ours.model)
    return theirs, ours


@pytest.mark.parametrize("loss_type, packed", [
    ("kto", True), ("kto", False), ("apo_zero_unpaired", True),
])
def test_first_step_equals_trl(smol_tokenizer, tmp_path, loss_type, packed):
    theirs, ours = trainers(smol_tokenizer, tmp_path, loss_type=loss_type)
    loss, metrics, grads = trl_first_step(theirs)

    terms, rows = first_step(ours, packed)
    assert rows == len(ROWS)
    assert float(terms.loss.detach()) / rows == pytest.approx(float(loss), rel=1e-5, abs=1e-6)
    logged = ours.objective.log_metrics({k: v / rows for k, v in terms.sums.items()})
    for name in METRICS:
        assert logged[name] == pytest.approx(metrics[name], rel=1e-4, abs=1e-5), name
    if loss_type == "kto":
        assert metrics["kl"] > 1e-3  # the mismatched rows' estimate is in play
    assert_grads_equal(ours.model, grads)


def test_ten_steps_follow_trls_losses(smol_tokenizer, tmp_path):
    """Batches of 3 of the 7 rows in the data's order (TRL's sequential sampling; the last
    batch is short), AdamW at lr 1e-3 on a linear schedule: the losses agree to 1e-4."""
    theirs, ours = trainers(smol_tokenizer, tmp_path, batch=3, max_steps=10,
                            learning_rate=1e-3, logging_steps=1)
    train_both(theirs, ours, steps=10)


def test_pairs_are_unpaired_and_tokenized_as_trl(smol_tokenizer, tmp_path):
    """Preference pairs given to KTO: TRL's rows (chosen answers, then rejected ones), its
    token ids, and its KL answers (rotated within each batch)."""
    theirs, ours = trainers(smol_tokenizer, tmp_path, rows=PAIRS)
    assert len(ours.train_data) == len(theirs.train_dataset) == 2 * len(PAIRS)
    for mine, row in zip(ours.train_data.examples, theirs.train_dataset):
        assert mine["prompt_ids"] == row["prompt_ids"]
        assert mine["completion_ids"] == row["completion_ids"]
        assert mine["kl_ids"] == row["KL_completion_ids"]
        assert mine["label"] == row["label"]


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "q", "completion": "a", "label": True}] * 2, "every row has label=True"),
    ([{"prompt": "q", "completion": "a"}], "no 'label'"),
    ([{"prompt": "q", "completion": "a", "label": "yes"}], "'label' is 'yes'"),
])
def test_bad_rows_are_named(smol_tokenizer, rows, message):
    with pytest.raises(DataError, match=message):
        prepare_unpaired(rows, smol_tokenizer, max_length=64)


def test_batch_of_one_is_refused(smol_tokenizer, tmp_path):
    with pytest.raises(lorakit.errors.ConfigError, match="per_device_train_batch_size must be"):
        lorakit.KTOTrainer(
            model=tiny_chat_model(smol_tokenizer),
            args=lorakit.KTOConfig(output_dir=str(tmp_path), use_cpu=True,
                                   per_device_train_batch_size=1),
            train_dataset=ROWS, processing_class=smol_tokenizer,
            peft_config=lorakit.LoraConfig(r=2))


def test_cli_trains_kto(tmp_path, tiny_chat_dir):
    """`lorakit train --objective kto` in a fresh process: TRL's KTO metrics in metrics.jsonl,
    the per-class eval rewards at the end."""
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    res = run_cli("train", "--objective", "kto", "--model", tiny_chat_dir, "--data", data,
                  "--eval-data", data, "--output", tmp_path / "out", "--max-steps", 2,
                  "--batch-size", 4, "--lr", "1e-3", "--beta", "0.2",
                  "--set", "training.logging_steps=1", "--set", "kto.undesirable_weight=1.3")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "7 rows (4 desirable, 3 undesirable" in res.stdout
    logged = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()]
    assert logged[0]["kl"] == 0.0  # B = 0: the policy is the reference
    assert "eval_rewards/margins" in logged[-1] and "eval_kl" in logged[-1]
