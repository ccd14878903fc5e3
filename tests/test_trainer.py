"""SFT trainer on tiny models: learning, checkpoints PEFT can read, exact resume, signals, crashes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import peft
import pytest
import torch
from conftest import make_tiny_llama

from lorakit import LoraConfig, SFTTrainer, TrainConfig, TrainingDivergedError, get_lora_model
from lorakit.data import SFTData
from lorakit.training import latest_checkpoint, list_checkpoints

ROOT = Path(__file__).resolve().parents[1]


ANSWER = [10, 20, 30, 40, 50, 60, 70, 80]


def counting_data(n: int, seed: int = 0) -> SFTData:
    """Learnable toy task: a random prompt (masked) of varying length, then a fixed answer."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        prompt = torch.randint(0, 128, (int(torch.randint(2, 8, (1,), generator=g)),),
                               generator=g).tolist()
        examples.append({"input_ids": prompt + ANSWER,
                         "labels": [-100] * len(prompt) + ANSWER})
    return SFTData(examples)


def make_trainer(tmp_path: Path, lora: dict | None = None, **train) -> SFTTrainer:
    # initializer_range: the default 0.02 gives a frozen head too weak to express any confident
    # prediction, whatever the adapters learn
    model = get_lora_model(make_tiny_llama(initializer_range=0.3), LoraConfig(**({"r": 8, "lora_alpha": 16} | (lora or {}))))
    args = TrainConfig(**({"output_dir": str(tmp_path), "max_steps": 12, "learning_rate": 1e-2,
                           "per_device_train_batch_size": 4, "logging_steps": 1,
                           "save_steps": None, "bf16": False, "disable_tqdm": True} | train))
    return SFTTrainer(model, args, train_data=counting_data(24), eval_data=counting_data(8, seed=9))


def losses(output_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_loss_decreases_on_a_learnable_task(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=40, eval_steps=40)
    before = trainer.evaluate()["eval_loss"]
    result = trainer.train()
    assert result.global_step == 40 and not result.interrupted
    assert result.metrics["eval_loss"] < 0.4 * before
    assert result.metrics["eval_token_accuracy"] > 0.4
    assert result.tokens_per_second > 0 and result.peak_memory_mb > 0


def test_checkpoint_is_a_peft_adapter(tmp_path):
    trainer = make_trainer(tmp_path, save_steps=6)
    trainer.train()
    ckpt = tmp_path / "checkpoint-6"
    assert (ckpt / "adapter_config.json").is_file() and (ckpt / "optimizer.safetensors").is_file()
    ids = torch.randint(0, 128, (2, 9))
    theirs = peft.PeftModel.from_pretrained(make_tiny_llama(initializer_range=0.3), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits,
                                   trainer.model(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_resume_reproduces_every_later_loss(tmp_path):
    # dropout (RNG), accumulation and several epochs: all of it must resume exactly
    kw = dict(lora={"lora_dropout": 0.1}, gradient_accumulation_steps=2, max_steps=10,
              save_steps=4, save_total_limit=None, warmup_steps=2)
    full = make_trainer(tmp_path / "full", **kw)
    full.train()
    expected = losses(tmp_path / "full")
    shutil.copytree(tmp_path / "full" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    resumed = make_trainer(tmp_path / "resumed", **kw)
    result = resumed.train(resume_from_checkpoint=True)
    got = losses(tmp_path / "resumed")
    assert result.global_step == 10
    assert sorted(got) == list(range(1, 11))  # history up to step 4 comes from the checkpoint
    for step in range(5, 11):
        assert got[step] == expected[step], step
    for (n, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n


def test_accumulation_averages_over_all_tokens(tmp_path):
    one = make_trainer(tmp_path / "a", max_steps=1, per_device_train_batch_size=24)
    two = make_trainer(tmp_path / "b", max_steps=1, per_device_train_batch_size=12,
                       gradient_accumulation_steps=2, group_by_length=False)
    one.train()
    two.train()
    assert losses(tmp_path / "a")[1] == pytest.approx(losses(tmp_path / "b")[1], rel=1e-5)
    for a, b in zip(one.model.parameters(), two.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=4, save_steps=4)
    trainer.train()
    before = (tmp_path / "checkpoint-4" / "adapter_model.safetensors").read_bytes()
    layer = trainer.model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.adapters["default"].lora_A.fill_(float("nan"))
    again = SFTTrainer(trainer.model, TrainConfig(**(trainer.args.to_dict() | {"max_steps": 8})),
                       train_data=trainer.train_data)
    with pytest.raises(TrainingDivergedError, match="checkpoint-4"):
        again.train()
    assert (tmp_path / "checkpoint-4" / "adapter_model.safetensors").read_bytes() == before
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4"]


def test_keeps_only_the_last_k_checkpoints(tmp_path):
    make_trainer(tmp_path, max_steps=9, save_steps=2, save_total_limit=2).train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-8", "checkpoint-9"]


SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_trainer import make_trainer
    import lorakit.training.checkpoint as ck
    from pathlib import Path
    out, mode = Path(sys.argv[1]), sys.argv[2]
    trainer = make_trainer(out, max_steps=100000, save_steps=3, save_total_limit=None)
    if mode == "slow-save":
        real = ck.save_file
        def slow(tensors, path, *a, **k):  # the second checkpoint hangs half-written
            real(tensors, path, *a, **k)
            if "checkpoint-6." in str(path):  # its temporary directory, not yet renamed
                (out / "writing").write_text("x")
                time.sleep(120)
        ck.save_file = slow
    result = trainer.train()
    print("interrupted", result.interrupted, result.global_step, flush=True)
""")


def _spawn(tmp_path: Path, mode: str) -> subprocess.Popen:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(ROOT / "tests")))
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "out"), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early:\n{proc.stdout.read()}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the trainer")
        time.sleep(0.2)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    proc = _spawn(tmp_path, "plain")
    metrics = tmp_path / "out" / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 4, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "interrupted True" in out
    step = int(out.split("interrupted True")[1].split()[0])
    last = latest_checkpoint(tmp_path / "out")
    assert last is not None and last.name == f"checkpoint-{step}"
    peft.PeftModel.from_pretrained(make_tiny_llama(initializer_range=0.3), last)  # loadable as a PEFT adapter


def test_kill_9_during_checkpoint_write_leaves_previous_checkpoint(tmp_path):
    proc = _spawn(tmp_path, "slow-save")
    out_dir = tmp_path / "out"
    _wait_for(lambda: (out_dir / "writing").exists(), proc)
    proc.kill()
    proc.wait(timeout=30)
    assert [p.name for p in list_checkpoints(out_dir)] == ["checkpoint-3"]
    assert not (out_dir / "checkpoint-6").exists()
    peft.PeftModel.from_pretrained(make_tiny_llama(initializer_range=0.3), out_dir / "checkpoint-3")
    # and a new run resumes from it
    trainer = make_trainer(out_dir, max_steps=5)
    assert trainer.train(resume_from_checkpoint=True).global_step == 5


def test_packing_gives_the_same_loss_as_padding(tmp_path):
    # one step over all 24 examples: padded rows vs packed rows must see the same tokens and
    # the same (isolated) contexts, hence the same mean loss and the same update
    padded = make_trainer(tmp_path / "a", max_steps=1, per_device_train_batch_size=24)
    packed = make_trainer(tmp_path / "b", max_steps=1, per_device_train_batch_size=24,
                          packing=True, max_length=64)
    assert len(packed.train_data) < len(padded.train_data)  # rows were actually packed
    padded.train()
    packed.train()
    assert losses(tmp_path / "a")[1] == pytest.approx(losses(tmp_path / "b")[1], rel=1e-5)
    for a, b in zip(padded.model.parameters(), packed.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_report_counts_the_trained_parameters_after_a_merge(tmp_path):
    # the demo's order: train, merge_and_unload (to score the merged model), then the report
    from lorakit.training.report import write_report
    trainer = make_trainer(tmp_path, max_steps=1)
    trained = trainer.model.get_nb_trainable_parameters()[0]
    result = trainer.train()
    trainer.model.merge_and_unload()
    run_config = trainer.run_config(trainer.total_steps())
    assert run_config["trainable_parameters"] == trained > 0
    assert run_config["adapters"]["default"]["r"] == 8
    report = write_report(tmp_path, run_config, result).read_text()
    assert f"- trainable parameters: {trained:,}\n" in report
