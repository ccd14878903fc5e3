"""DPO on adapters against TRL's DPOTrainer + PEFT, on a tiny model with SmolLM2's tokenizer.

Both trainers take the same call (model, DPOConfig, chat preference rows, processing_class,
peft_config); TRL's adapter (non-zero A and B, so the policy is not the reference) is copied
into lorakit's. On one batch of all rows, the loss, TRL's metrics and every adapter gradient
equal TRL's in fp32.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import peft
import pytest
import torch
import trl
from conftest import tiny_chat_model
from datasets import Dataset
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.data import DataError
from lorakit.data.preference import prepare_preferences
from lorakit.lora.files import peft_parameters

pytestmark = pytest.mark.default_model  # SmolLM2's tokenizer and chat template

ROWS = [
    {
        "prompt": [{"role": "user", "content": f"{a} plus {b}?"}],
        "chosen": [{"role": "assistant", "content": str(a + b)}],
        "rejected": [{"role": "assistant", "content": str(a + b + 1 + a % 3) + " maybe"}],
    }
    for a, b in [(1, 2), (3, 4), (5, 0), (2, 2), (4, 1), (0, 3)]
]
METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected"]


def trl_step(tokenizer, loss_type, tmp_path):
    """TRL's trainer, its first batch (all rows), loss, metrics and adapter gradients."""
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(ROWS), use_cpu=True,
        bf16=False, gradient_checkpointing=False, report_to="none", loss_type=loss_type,
        label_smoothing=0.2 if "robust" in loss_type else 0.0, max_length=64,
    )
    torch.manual_seed(0)
    trainer = trl.DPOTrainer(
        model=tiny_chat_model(tokenizer), args=args, train_dataset=Dataset.from_list(ROWS),
        processing_class=tokenizer,
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                    init_lora_weights=False),
    )
    return trainer, *trl_first_step(trainer)


def trl_first_step(trainer, store: str = "_metrics"):
    """A TRL trainer's loss on its first batch, with backward: (loss, the metrics it stored in
    `store`, its adapter gradients)."""
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    metrics = {k: v[-1] for k, v in getattr(trainer, store)["train"].items()}
    return float(loss), metrics, peft_grads(trainer.model)


def peft_grads(model) -> dict[str, torch.Tensor]:
    """A PEFT model's adapter gradients under their file keys."""
    return {
        "base_model.model." + n.removeprefix("base_model.model.").replace(".default", ""):
        p.grad for n, p in model.named_parameters() if p.requires_grad
    }


def copy_peft_adapter(theirs, ours) -> None:
    """PEFT's adapter weights (non-zero A and B) into lorakit's "default" adapter."""
    mine = peft_parameters(ours, "default")
    assert set(mine) == set(peft.get_peft_model_state_dict(theirs))
    with torch.no_grad():
        for key, p in peft.get_peft_model_state_dict(theirs).items():
            mine[key].copy_(p)


def first_step(trainer, packed: bool):
    """lorakit's loss on one batch of all the trainer's examples, packed on their prompts or as
    padded rows, and its backward: (the terms, the units the loss is normalised by)."""
    objective = trainer.objective
    if not packed:
        objective.pack_off = "test: padded rows"
    batch = objective.collate(list(trainer.train_data.examples))
    assert ("seen" in batch) == packed
    trainer.model.train()
    terms = objective.loss(trainer.model, batch, training=True)
    units = objective.count(batch)[0]
    (terms.loss / units).backward()
    return terms, units


def train_both(theirs, ours, steps: int) -> list[float]:
    """Train TRL's trainer and lorakit's; each logs `steps` losses, and lorakit's follow TRL's
    to 1e-4. Returns lorakit's."""
    theirs.train()
    ours.train()
    trl_losses = [r["loss"] for r in theirs.state.log_history if "loss" in r]
    our_losses = [r["loss"] for r in ours.state.log_history if "loss" in r]
    assert len(our_losses) == len(trl_losses) == steps
    assert our_losses == pytest.approx(trl_losses, abs=1e-4)
    return our_losses


def assert_grads_equal(ours, grads: dict[str, torch.Tensor]) -> None:
    """lorakit's adapter gradients equal PEFT's to fp32 rounding of each tensor's scale (sums
    run in another order)."""
    mine = peft_parameters(ours, "default")
    for key, g in grads.items():
        assert (mine[key].grad - g).abs().max() <= 1e-4 * g.abs().max() + 1e-8, key


@pytest.mark.parametrize("loss_type, packed", [
    ("sigmoid", True), ("sigmoid", False), ("ipo", True), ("hinge", True), ("robust", True),
    (["sigmoid", "hinge"], False), (["sigmoid", "sft"], True),
])
def test_first_step_equals_trl(smol_tokenizer, tmp_path, loss_type, packed):
    """packed: the pairs packed on their prompts (lorakit.training.pairs); else padded rows."""
    theirs, loss, metrics, grads = trl_step(smol_tokenizer, loss_type, tmp_path)
    ours = lorakit.DPOTrainer(
        model=tiny_chat_model(smol_tokenizer),
        args=lorakit.DPOConfig(output_dir=str(tmp_path / "ours"), use_cpu=True,
                               gradient_checkpointing=False, loss_type=loss_type,
                               label_smoothing=0.2 if "robust" in loss_type else 0.0,
                               max_length=64, share_prefix=packed),
        train_dataset=Dataset.from_list(ROWS), processing_class=smol_tokenizer,
        peft_config=lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    copy_peft_adapter(theirs.model, ours.model)
    terms, pairs = first_step(ours, packed)
    assert pairs == len(ROWS)
    assert float(terms.loss) / pairs == pytest.approx(loss, rel=1e-5, abs=1e-6)
    for name in METRICS:
        assert terms.sums[name] / pairs == pytest.approx(metrics[name], rel=1e-4, abs=1e-5), name
    assert abs(metrics["rewards/margins"]) > 1e-3  # the policy is not the reference
    assert_grads_equal(ours.model, grads)


def test_tokenized_pairs_equal_trls(smol_tokenizer, tmp_path):
    theirs, *_ = trl_step(smol_tokenizer, "sigmoid", tmp_path)
    ours = prepare_preferences(ROWS, smol_tokenizer, max_length=64)
    for mine, row in zip(ours.examples, theirs.train_dataset):
        assert mine == {k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}


def text_rows(implicit: bool):
    rows = [{"prompt": f"{a} plus {b} is", "chosen": f" {a + b}.", "rejected": f" {a + b + 1}."}
            for a, b in [(1, 2), (3, 4)]]
    if implicit:
        rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                for r in rows]
    return rows


@pytest.mark.parametrize("implicit", [False, True])
def test_text_rows_and_implicit_prompts_tokenize_as_trl(smol_tokenizer, tmp_path, implicit):
    """Text rows get the EOS text, as TRL adds it; without 'prompt', the shared start is the
    prompt (TRL's extract_prompt)."""
    rows = text_rows(implicit)
    args = trl.DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    theirs = trl.DPOTrainer(model=tiny_chat_model(smol_tokenizer), args=args,
                            train_dataset=Dataset.from_list(copy.deepcopy(rows)),
                            processing_class=smol_tokenizer,
                            peft_config=peft.LoraConfig(r=2, target_modules=["q_proj"]))
    ours = prepare_preferences(rows, smol_tokenizer, max_length=1024)
    for mine, row in zip(ours.examples, theirs.train_dataset):
        assert mine == {k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
        assert mine["chosen_ids"][-1] == smol_tokenizer.eos_token_id


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "chosen": "a"}, "no 'rejected'"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "'chosen' equals 'rejected'"),
    ({"chosen": "yes", "rejected": "no"}, "share no start"),
])
def test_bad_rows_are_named(smol_tokenizer, row, message):
    with pytest.raises(DataError, match=rf"row 1.*{message}|{message}"):
        prepare_preferences([row], smol_tokenizer, max_length=64)


def test_a_reference_model_is_refused(smol_tokenizer, tmp_path):
    with pytest.raises(lorakit.errors.ConfigError, match="adapters switched off"):
        lorakit.DPOTrainer(model=tiny_chat_model(smol_tokenizer),
                           ref_model=tiny_chat_model(smol_tokenizer),
                           args=lorakit.DPOConfig(output_dir=str(tmp_path), use_cpu=True),
                           train_dataset=ROWS, processing_class=smol_tokenizer,
                           peft_config=lorakit.LoraConfig(r=2))


def test_ten_steps_follow_trls_losses(smol_tokenizer, tmp_path):
    """train(): 10 steps, each on all rows (so both trainers see the same batches), AdamW at
    lr 1e-3 on a linear schedule: the logged losses equal TRL's to 1e-4, and fall."""
    common = dict(per_device_train_batch_size=len(ROWS), use_cpu=True, max_steps=10,
                  learning_rate=1e-3, logging_steps=1, gradient_checkpointing=False,
                  max_length=64, save_steps=100)
    torch.manual_seed(0)
    theirs = trl.DPOTrainer(
        model=tiny_chat_model(smol_tokenizer),
        args=trl.DPOConfig(output_dir=str(tmp_path / "trl"), bf16=False, report_to="none",
                           save_strategy="no", **common),
        train_dataset=Dataset.from_list(ROWS), processing_class=smol_tokenizer,
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                    init_lora_weights=False),
    )
    ours = lorakit.DPOTrainer(
        model=tiny_chat_model(smol_tokenizer),
        args=lorakit.DPOConfig(output_dir=str(tmp_path / "ours"), bf16=False, **common),
        train_dataset=Dataset.from_list(ROWS), processing_class=smol_tokenizer,
        peft_config=lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    copy_peft_adapter(theirs.model, ours.model)
    our_losses = train_both(theirs, ours, steps=10)
    assert our_losses[-1] < our_losses[0] - 0.05
    rewards = [r["rewards/accuracies"] for r in ours.state.log_history if "loss" in r]
    assert rewards[-1] == 1.0


def sft_adapter(tokenizer, path):
    """A 'trained' SFT adapter on the tiny model (random non-zero A and B), saved at `path`."""
    torch.manual_seed(3)
    model = peft.get_peft_model(tiny_chat_model(tokenizer), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(path)
    return path


def test_from_an_sft_adapter_the_reference_is_that_adapter_as_trl(smol_tokenizer, tmp_path):
    """A model that arrives with its adapter (no peft_config): TRL copies it as a frozen "ref"
    adapter; lorakit computes that reference's log-probs once, before the first step. The logged
    losses agree, and the first is log 2 (the policy starts at the reference)."""
    adapter = sft_adapter(smol_tokenizer, tmp_path / "sft")
    common = dict(per_device_train_batch_size=len(ROWS), use_cpu=True, max_steps=4,
                  learning_rate=1e-3, logging_steps=1, gradient_checkpointing=False,
                  max_length=64)
    theirs = trl.DPOTrainer(
        model=peft.PeftModel.from_pretrained(tiny_chat_model(smol_tokenizer), adapter,
                                             is_trainable=True),
        args=trl.DPOConfig(output_dir=str(tmp_path / "trl"), bf16=False, report_to="none",
                           save_strategy="no", **common),
        train_dataset=Dataset.from_list(ROWS), processing_class=smol_tokenizer)
    ours = lorakit.DPOTrainer(
        model=lorakit.LoraModel.from_pretrained(tiny_chat_model(smol_tokenizer), adapter,
                                                is_trainable=True),
        args=lorakit.DPOConfig(output_dir=str(tmp_path / "ours"), bf16=False, save_steps=2,
                               **common),
        train_dataset=Dataset.from_list(ROWS), processing_class=smol_tokenizer)
    our_losses = train_both(theirs, ours, steps=4)
    assert our_losses[0] == pytest.approx(0.693147, abs=1e-5)
    saved = (tmp_path / "ours" / "checkpoint-2" / "objective.safetensors")
    assert saved.is_file()


def test_a_resumed_run_keeps_its_precomputed_reference(smol_tokenizer, tmp_path, monkeypatch):
    """From an SFT adapter the reference is the adapter at the start: a resumed run must take
    it from the checkpoint (recomputing it from the resumed adapter would be wrong)."""
    adapter = sft_adapter(smol_tokenizer, tmp_path / "sft")

    class StopAt2:
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

    def trainer(out, callbacks=None):
        return lorakit.DPOTrainer(
            model=lorakit.LoraModel.from_pretrained(tiny_chat_model(smol_tokenizer), adapter,
                                                    is_trainable=True),
            args=lorakit.DPOConfig(output_dir=str(out), use_cpu=True, max_steps=4,
                                   per_device_train_batch_size=3, learning_rate=1e-3,
                                   logging_steps=1, save_steps=2, max_length=64,
                                   gradient_checkpointing=False),
            train_dataset=ROWS, processing_class=smol_tokenizer, callbacks=callbacks)

    whole = trainer(tmp_path / "whole")
    whole.train()
    trainer(tmp_path / "cut", [StopAt2()]).train()
    resumed = trainer(tmp_path / "cut")
    monkeypatch.setattr(lorakit.training.DPOObjective, "_reference_logps",
                        lambda *a: pytest.fail("the reference was computed again"))
    resumed.train(resume_from_checkpoint=True)
    losses = [[r["loss"] for r in t.state.log_history if "loss" in r] for t in (whole, resumed)]
    assert losses[1][-2:] == pytest.approx(losses[0][-2:], abs=1e-6)


def run_cli(*args):
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "lorakit", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_trains_dpo_and_peft_loads_the_adapter(tmp_path, tiny_chat_dir):
    """`lorakit train --objective dpo` in a fresh process, as a user types it: TRL's metrics on
    the console and in metrics.jsonl, eval rewards at the end, an adapter PEFT loads."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    res = run_cli("train", "--objective", "dpo", "--model", tiny_chat_dir, "--data", pairs,
                  "--eval-data", pairs, "--output", tmp_path / "out", "--max-steps", 3,
                  "--batch-size", 3, "--lr", "1e-3", "--beta", "0.2", "--loss-type",
                  "sigmoid,hinge", "--set", "training.logging_steps=1")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "6 rows -> 6 pairs" in res.stdout and "rewards/accuracies=" in res.stdout
    logged = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()]
    assert logged[0]["loss"] == pytest.approx(0.693147 + 1.0, abs=1e-5)  # B = 0: log 2 + hinge 1
    assert "eval_rewards/margins" in logged[-1]
    model = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_chat_dir), tmp_path / "out" / "adapter")
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "chosen": "a"}, "no 'rejected'"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "'chosen' equals 'rejected'"),
])
def test_cli_bad_pairs_fail_in_one_line(tmp_path, tiny_chat_dir, row, message):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(row) + "\n")
    res = run_cli("train", "--objective", "dpo", "--model", tiny_chat_dir, "--data", pairs,
                  "--output", tmp_path / "out")
    assert res.returncode == 2, res.stdout + res.stderr
    errors = [ln for ln in (res.stdout + res.stderr).splitlines() if "error" in ln]
    assert len(errors) == 1 and message in errors[0] and "line 1" in errors[0], errors


def test_chunked_head_log_probs_equal_the_plain_head():
    """The chunked frozen head (no logits kept for backward) gives the plain head's token
    log-probs and hidden-state gradients, in float64 and across chunk boundaries."""
    from lorakit.training.loss import _ChunkedTokenLogProbs

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 16, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=True).double().requires_grad_(False)
    targets = torch.randint(0, 50, (7,), generator=g)
    weights = torch.randn(7, generator=g, dtype=torch.float64)
    plain = torch.log_softmax(head(hidden), -1).gather(1, targets[:, None]).squeeze(1)
    (want,) = torch.autograd.grad((plain * weights).sum(), hidden)
    for rows in (1, 3, 7):
        ours = _ChunkedTokenLogProbs.apply(hidden, head.weight, head.bias, targets, rows)
        (grad,) = torch.autograd.grad((ours * weights).sum(), hidden)
        torch.testing.assert_close(ours.double(), plain, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(grad, want, atol=1e-12, rtol=1e-12)
