"""NaN / inf loss: a poisoned batch, an absurd learning rate.

The poisoned batch is real data: one row uses a word whose token embeddings are NaN in the base
model, so the step that draws it has a NaN loss. The run stops at that step with a one-line
error naming it (exit 2; `TrainingDivergedError` from the API), before the weights change, the
checkpoints before it intact; or, with `training.nonfinite=skip`, it drops the batch and goes on.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import write_sum_rows
import harness
from harness import checkpoint_problems, lorakit, one_line_error, record, temporaries, zygote
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit import LoraConfig, SFTTrainer, TrainConfig, TrainingDivergedError, get_lora_model
from lorakit.errors import ConfigError, UserError

pytestmark = pytest.mark.default_model

STEPS = 8
ADAPTER = Path("adapter") / "adapter_model.safetensors"
POISON = "zebra"


def train_args(model: Path, data: Path, out: Path, *extra) -> list:
    return harness.train_args(model, data, out, STEPS, "null", *extra)


def poisoned_row() -> dict:
    return {"prompt": [{"role": "user", "content": f"{POISON} plus {POISON}?"}],
            "completion": [{"role": "assistant", "content": POISON}]}


@pytest.fixture(scope="module")
def setup(tiny_chat_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nonfinite")
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir)
    with torch.no_grad():  # only this word's tokens: the other rows never see a NaN
        for token in tokenizer(f" {POISON}", add_special_tokens=False)["input_ids"] + \
                tokenizer(POISON, add_special_tokens=False)["input_ids"]:
            model.get_input_embeddings().weight[token] = float("nan")
    poisoned = tmp / "poisoned-model"
    model.save_pretrained(poisoned)
    tokenizer.save_pretrained(poisoned)
    clean, dirty = tmp / "clean.jsonl", tmp / "dirty.jsonl"
    write_sum_rows(clean, 30)
    dirty.write_text(clean.read_text() + json.dumps(poisoned_row()) + "\n")
    return {"tmp": tmp, "model": tiny_chat_dir, "poisoned": poisoned, "clean": clean,
            "dirty": dirty, "tokenizer": tokenizer}


def stopped_at(res) -> int:
    found = re.search(r"at step (\d+)", res.error_lines()[0]) if res.error_lines() else None
    assert found, res.stderr[-2000:]
    return int(found.group(1))


def finite_adapter(out: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(out / ADAPTER).values())


def test_poisoned_batch_stops_then_resumes_skipping_it(setup, tmp_path):
    out = tmp_path / "out"
    args = train_args(setup["poisoned"], setup["dirty"], out)
    res = lorakit(setup["tmp"], *args)
    problems = [why] if (why := one_line_error(res, "loss is nan at step")) else []
    step = stopped_at(res)
    saved = sorted(p.name for p in out.glob("checkpoint-*"))
    if saved != [f"checkpoint-{s}" for s in range(1, step)]:
        problems.append(f"checkpoints {saved}, expected those before step {step}")
    if step > 1 and f"Latest checkpoint: {out / f'checkpoint-{step - 1}'}" not in res.stderr:
        problems.append("the error does not name the checkpoint before the step")
    problems += checkpoint_problems(out) + [f"temporary {p}" for p in temporaries(out)]
    if (out / "adapter").exists():
        problems.append("an adapter was written")
    # continue from the checkpoint before the NaN step, dropping that batch
    again = lorakit(setup["tmp"], *args, "--resume", "--set", "training.nonfinite=skip")
    skipped = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
               if "skipped" in r]
    # (the row comes round again in the next epoch: skipped again)
    if again.status != 0 or not skipped or skipped[0]["step"] != step or not finite_adapter(out):
        problems.append(f"resume with nonfinite=skip: exit {again.status}, skipped {skipped}"
                        f"\n{again.stderr[-1500:]}")
    # the same as skipping from the start
    fresh = tmp_path / "fresh"
    res_skip = lorakit(setup["tmp"], *train_args(setup["poisoned"], setup["dirty"], fresh),
                       "--set", "training.nonfinite=skip")
    if res_skip.status != 0 or (fresh / ADAPTER).read_bytes() != (out / ADAPTER).read_bytes():
        problems.append(f"skip from the start: exit {res_skip.status}, or another adapter")
    record("NaN / inf", "poisoned batch (NaN embeddings of one row's word), CLI",
           f"exit {res.status} at step {step}: {res.error_lines()[0][:90]!r}...; resumed with "
           "nonfinite=skip (= skipping from the start)" if not problems else "; ".join(problems),
           not problems, lost=0)
    assert not problems, "\n".join(problems)


def test_absurd_learning_rate_stops_and_the_checkpoint_before_resumes(setup, tmp_path):
    """A run continued with lr=1e30: its first step is finite (and ruins the weights), the next
    is NaN and stops; the checkpoint from before the change continues the original run."""
    out, z = tmp_path / "out", zygote(setup["tmp"])
    args = train_args(setup["model"], setup["clean"], out)
    reference = tmp_path / "reference"
    assert lorakit(setup["tmp"], *train_args(setup["model"], setup["clean"], reference)) \
        .status == 0
    run = z.spawn(args, setup["tmp"])
    while not (out / "checkpoint-3").exists():
        assert run.poll() is None
    run.kill(signal.SIGKILL)
    run.wait()
    good = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    good_bytes = (good / "adapter_model.safetensors").read_bytes()
    res = lorakit(setup["tmp"], *args, "--resume", "--lr", "1e30")
    problems = [why] if (why := one_line_error(res, "loss is nan at step")) else []
    step = stopped_at(res)
    if (good / "adapter_model.safetensors").read_bytes() != good_bytes:
        problems.append(f"{good.name} changed")
    problems += checkpoint_problems(out) + [f"temporary {p}" for p in temporaries(out)]
    again = lorakit(setup["tmp"], *args, "--resume", good)
    same = again.status == 0 and (out / ADAPTER).read_bytes() == \
        (reference / ADAPTER).read_bytes()
    if not same:
        problems.append(f"resume from {good.name}: exit {again.status}, or another adapter\n"
                        f"{again.stderr[-1500:]}")
    record("NaN / inf", "absurd learning rate (1e30) in a resumed run, CLI",
           f"exit {res.status} at step {step} ({int(good.name.split('-')[1]) + 1} was finite); "
           f"resumed from {good.name}: the uninterrupted run's adapter" if not problems
           else "; ".join(problems), not problems, lost=int(not same))
    assert not problems, "\n".join(problems)


def api_trainer(setup, out: Path, **kw) -> SFTTrainer:
    model = AutoModelForCausalLM.from_pretrained(setup["poisoned"])
    lora = get_lora_model(model, LoraConfig(r=4, lora_alpha=8))
    rows = [json.loads(line) for line in setup["dirty"].read_text().splitlines()]
    return SFTTrainer(lora, TrainConfig(output_dir=str(out), max_steps=STEPS, logging_steps=1,
                                        per_device_train_batch_size=4, bf16=False,
                                        learning_rate=5e-3, save_steps=None, **kw),
                      train_data=rows, tokenizer=setup["tokenizer"])


def test_api_raises_one_type_or_skips(setup, tmp_path):
    trainer = api_trainer(setup, tmp_path / "stop")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
              if p.requires_grad}
    with pytest.raises(TrainingDivergedError, match=r"loss is nan at step \d+") as err:
        trainer.train()
    assert isinstance(err.value, UserError)
    step = int(re.search(r"at step (\d+)", str(err.value)).group(1))
    assert trainer.state.step == step - 1  # stopped before updating the weights
    skipping = api_trainer(setup, tmp_path / "skip", nonfinite="skip")
    result = skipping.train()
    # 8 steps over 31 rows: the poisoned row is drawn in both epochs, skipped both times
    assert result.global_step == STEPS and skipping.state.skipped_steps == 2
    assert all(torch.isfinite(p).all() for p in skipping.model.parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="nonfinite"):
        TrainConfig(nonfinite="ignore")
    record("NaN / inf", "poisoned batch, Python API",
           f"TrainingDivergedError at step {step} (weights of step {step - 1} kept); "
           "nonfinite='skip' finished, the row's batch skipped in both epochs", True, lost=0)
    assert before  # the adapters were trainable
