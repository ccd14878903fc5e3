"""The training loop, apart from SFT: a step is one global batch whatever its split, and a second
objective (a toy regression on the adapters) trains through the same loop with checkpoints,
resume, callbacks and two processes, without any change to the loop."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, write_sum_rows
from safetensors.torch import load_file
from test_distributed import torchrun
from test_trainer import make_trainer

from lorakit import LoraConfig, LoraModel, TrainConfig, get_lora_model
from lorakit.training import Objective, Terms, Trainer
from lorakit.training.checkpoint import CheckpointError
from lorakit.training.launch import split_global_batch

TESTS = str(Path(__file__).resolve().parent)


# ------------------------------------------------------------------ a step is one global batch

def test_split_global_batch_gives_every_rank_the_same_number_of_micro_batches():
    idx = list(range(10))  # a short last global batch of 10 for 2 per rank x 2 ranks x 3 steps
    assert split_global_batch(idx, 2, 2, 0) == [[0, 2], [4, 6], [8]]
    assert split_global_batch(idx, 2, 2, 1) == [[1, 3], [5, 7], [9]]
    assert split_global_batch(idx[:9], 2, 2, 1) == [[1, 3], [5, 7], []]
    assert split_global_batch(idx[:4], 4, 1, 0) == [[0, 1, 2, 3]]


class FirstGradients:
    """The adapters' gradients as the optimizer sees them at the first step."""

    def __init__(self) -> None:
        self.grads: list[torch.Tensor] | None = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        def keep(opt, *_):
            if self.grads is None:
                self.grads = [p.grad.clone() for g in opt.param_groups for p in g["params"]]

        optimizer.register_step_pre_hook(keep)


@pytest.mark.parametrize("batch, accumulation", [(2, 4), (4, 2), (1, 8)])
def test_accumulated_micro_batches_give_the_gradient_of_the_whole_batch(tmp_path, batch,
                                                                         accumulation):
    # 24 examples of varying length; the first step draws 8 of them in either run
    grads = []
    for out, b, a in ((tmp_path / "one", 8, 1), (tmp_path / "split", batch, accumulation)):
        trainer = make_trainer(out, max_steps=1, per_device_train_batch_size=b,
                               gradient_accumulation_steps=a, max_grad_norm=None)
        recorder = FirstGradients()
        trainer.add_callback(recorder)
        trainer.train()
        grads.append(recorder.grads)
    scale = max(float(g.abs().max()) for g in grads[0])  # lora_A's are 0 while B is 0
    assert scale > 0
    for whole, split in zip(*grads):
        torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.slow
@pytest.mark.default_model  # the tiny model borrows SmolLM2's tokenizer
def test_the_cli_trains_one_adapter_for_every_split_of_the_global_batch(tmp_path, tiny_chat_dir):
    """Issue 30's report, as a user types it: batch 4 on one process, 2 per process on two,
    and 2 x 2 accumulation steps on one train the same adapter (fp32, 8 steps)."""
    data = tmp_path / "train.jsonl"
    write_sum_rows(data, 36)
    common = ["--model", tiny_chat_dir, "--data", data, "--max-steps", 8, "--lr", "1e-3",
              "--dtype", "float32", "--set", "training.bf16=false", "--set", "output.samples=0"]
    runs = {"4x1": ["--batch-size", 4], "2x2": ["--batch-size", 2, "--grad-accum", 2]}
    for name, flags in runs.items():
        torchrun_free = [sys.executable, "-m", "lorakit", "train", "--output", tmp_path / name]
        _run([*torchrun_free, *common, *flags])
    torchrun("-m", "lorakit", "train", "--output", tmp_path / "2ranks", *common, "--batch-size", 2)
    base = make_tiny_llama_like(tiny_chat_dir)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (3, 12), generator=g)
    with torch.no_grad():
        before = base(input_ids=ids).logits
        logits = {name: adapted_logits(tiny_chat_dir, tmp_path / name, ids)
                  for name in ("4x1", "2x2", "2ranks")}
    change = (logits["4x1"] - before).norm()
    assert change > 0
    apart = {name: float((logits[name] - logits["4x1"]).norm() / change)
             for name in ("2x2", "2ranks")}
    assert all(x < 0.01 for x in apart.values()), apart


def _run(cmd: list) -> None:
    import subprocess

    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def make_tiny_llama_like(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def adapted_logits(model_dir: Path, out: Path, ids: torch.Tensor) -> torch.Tensor:
    model = LoraModel.from_pretrained(make_tiny_llama_like(model_dir), out / "adapter")
    return model(input_ids=ids).logits


# --------------------------------------------------------------- a second objective, unchanged loop

TARGET = 0.5


class ConstantTarget(Objective):
    """Regress the mean last-position logit of each row onto a constant: rows are lists of
    token ids of one length, the loss is the summed squared error, normalised by rows."""

    def prepare(self, data, split):
        return Rows([list(r) for r in data])

    def collate(self, examples):
        n = len(examples)
        return {"input_ids": torch.tensor(examples), "weight": torch.ones(n)}

    def filler(self, data):
        return {"input_ids": torch.tensor([data[0]]), "weight": torch.zeros(1)}

    def count(self, batch):
        return int(batch["weight"].sum()), int(batch["weight"].sum()) * batch["input_ids"].shape[1]

    def loss(self, model, batch, training):
        pred = model(input_ids=batch["input_ids"]).logits[:, -1].float().mean(-1)
        error = (pred - TARGET) * batch["weight"]
        return Terms((error**2).sum(), {"abs_error": float(error.abs().sum())})


class Rows(list):
    @property
    def lengths(self) -> list[int]:
        return [len(r) for r in self]


def toy_rows(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (n, 6), generator=g).tolist()


def toy_trainer(out: Path, callbacks=None, **train) -> Trainer:
    model = get_lora_model(make_tiny_llama(initializer_range=0.3), LoraConfig(r=4, lora_alpha=8))
    args = TrainConfig(**({"output_dir": str(out), "max_steps": 6, "learning_rate": 1e-2,
                           "per_device_train_batch_size": 4, "logging_steps": 1,
                           "save_steps": 3, "save_total_limit": None, "bf16": False,
                           "disable_tqdm": True, "adam_epsilon": 1e-4} | train))
    # evaluated on the first training rows: 12 steps fit those, not a rule for random rows
    return Trainer(model, ConstantTarget(), args, train_data=toy_rows(17),
                   eval_data=toy_rows(5), callbacks=callbacks)


class Logs:
    def __init__(self) -> None:
        self.seen: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(logs)


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_second_objective_learns_checkpoints_and_logs_through_the_loop(tmp_path):
    logs = Logs()
    trainer = toy_trainer(tmp_path / "full", callbacks=[logs], max_steps=12, eval_steps=6,
                          learning_rate=3e-2)
    first = trainer.evaluate()["eval_loss"]
    result = trainer.train()
    assert result.global_step == 12 and result.metrics["eval_loss"] < 0.1 * first
    steps = [r for r in records(tmp_path / "full") if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert all(r["abs_error"] > 0 for r in steps)  # the objective's own metric, logged
    assert [x["step"] for x in logs.seen if "eval_loss" in x] == [6, 12]
    assert (tmp_path / "full" / "checkpoint-6" / "adapter_model.safetensors").is_file()
    LoraModel.from_pretrained(make_tiny_llama(initializer_range=0.3), tmp_path / "full" / "adapter")


def test_a_second_objective_resumes_exactly(tmp_path):
    toy_trainer(tmp_path / "full").train()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    toy_trainer(tmp_path / "resumed").train(resume_from_checkpoint=True)
    want = {r["step"]: r["loss"] for r in records(tmp_path / "full") if "loss" in r}
    got = {r["step"]: r["loss"] for r in records(tmp_path / "resumed") if "loss" in r}
    assert got == want
    a = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


TWO_PROCESSES = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from test_loop import toy_trainer
    from lorakit.training.distributed import shutdown
    toy_trainer(Path(sys.argv[1]), per_device_train_batch_size=2).train()
    shutdown()
""")


@pytest.mark.slow
def test_a_second_objective_trains_on_two_processes_as_on_one(tmp_path):
    # 17 rows in global batches of 4: every epoch ends with a batch of one, and rank 1 idles
    script = tmp_path / "run.py"
    script.write_text(TWO_PROCESSES.format(tests=TESTS))
    torchrun(script, tmp_path / "two")
    toy_trainer(tmp_path / "one").train()
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-5)
    want = [r["loss"] for r in records(tmp_path / "one") if "loss" in r]
    assert [r["loss"] for r in records(tmp_path / "two") if "loss" in r] == pytest.approx(want,
                                                                                          rel=1e-5)


def test_a_checkpoint_resumes_only_with_the_global_batch_it_counts(tmp_path):
    # the data position counts global batches: 2 x 2 accumulation resumes as 4 x 1 (the same
    # global batch), not as 2 x 1; a checkpoint of an earlier lorakit (no global batch) refuses
    toy_trainer(tmp_path / "run", per_device_train_batch_size=2,
                gradient_accumulation_steps=2).train()
    toy_trainer(tmp_path / "run", max_steps=9).train(resume_from_checkpoint=True)
    with pytest.raises(CheckpointError, match="global batches of 4, this run draws 2"):
        toy_trainer(tmp_path / "run", max_steps=12,
                    per_device_train_batch_size=2).train(resume_from_checkpoint=True)
    state_file = tmp_path / "run" / "checkpoint-9" / "trainer_state.json"
    saved = json.loads(state_file.read_text())
    del saved["state"]["global_batch"]
    state_file.write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match="micro-batches"):
        toy_trainer(tmp_path / "run", max_steps=12).train(resume_from_checkpoint=True)
