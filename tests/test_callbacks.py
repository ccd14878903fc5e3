"""`SFTTrainer(callbacks=[...])` with transformers' own TrainerCallback: the hook points HF Trainer
calls, in its order and with its arguments, and `control` steering the loop (early stopping)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from transformers import TrainerCallback

from lorakit import LoraConfig, SFTTrainer, TrainConfig, get_lora_model
from lorakit.data import SFTData


def rows(n: int, seed: int) -> SFTData:
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, 128, (10,), generator=g).tolist() for _ in range(n)]
    return SFTData([{"input_ids": x, "labels": x} for x in ids])


def trainer_with(tmp_path, callbacks, **train) -> SFTTrainer:
    model = get_lora_model(make_tiny_llama(), LoraConfig(r=4, lora_alpha=8))
    args = TrainConfig(**({"output_dir": str(tmp_path), "max_steps": 6, "learning_rate": 1e-2,
                           "per_device_train_batch_size": 4, "logging_steps": 2, "eval_steps": 3,
                           "save_steps": 4, "save_total_limit": None, "bf16": False,
                           "disable_tqdm": True} | train))
    return SFTTrainer(model, args, train_data=rows(16, 0), eval_data=rows(4, 1),
                      callbacks=callbacks)


class Recorder(TrainerCallback):
    """Every call, as (event, global_step, what it got)."""

    def __init__(self):
        self.calls = []

    def _add(self, event, state, **got):
        self.calls.append((event, state.global_step, got))

    def on_train_begin(self, args, state, control, **kwargs):
        self._add("train_begin", state, keys=sorted(kwargs), args=args, state_obj=state)

    def on_step_end(self, args, state, control, **kwargs):
        self._add("step_end", state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._add("log", state, logs=dict(logs))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self._add("evaluate", state, metrics=dict(metrics),
                  last_log=dict(state.log_history[-1]))

    def on_save(self, args, state, control, **kwargs):
        self._add("save", state)

    def on_train_end(self, args, state, control, **kwargs):
        self._add("train_end", state)

    def steps(self, event):
        return [step for e, step, _ in self.calls if e == event]


def test_hook_points_order_and_arguments(tmp_path):
    rec = Recorder()
    trainer = trainer_with(tmp_path, [rec])
    trainer.train()
    first, last = rec.calls[0], rec.calls[-1]
    assert first[0] == "train_begin" and last == ("train_end", 6, {})
    assert first[2]["keys"] == ["lr_scheduler", "model", "optimizer", "processing_class"]
    assert first[2]["args"] is trainer.args and first[2]["state_obj"] is trainer.state
    assert trainer.state.max_steps == 6 and trainer.state.is_world_process_zero
    assert rec.steps("step_end") == [1, 2, 3, 4, 5, 6]
    train_logs = [(s, got["logs"]) for e, s, got in rec.calls if e == "log" and "loss" in
                  got["logs"]]
    assert [s for s, _ in train_logs] == [2, 4, 6]
    assert [logs for _, logs in train_logs] == [r for r in trainer.state.log_history if "loss" in r]
    evals = [got for e, _, got in rec.calls if e == "evaluate"]
    assert rec.steps("evaluate") == [3, 6]
    for got in evals:  # as in HF: the metrics are logged (on_log) before on_evaluate
        assert got["metrics"]["eval_loss"] > 0 and got["last_log"]["eval_loss"] == \
            pytest.approx(got["metrics"]["eval_loss"], rel=1e-5)
    assert rec.steps("save") == [4, 6]
    # a step's hooks come in HF's order: step end, log, evaluate, save
    at6 = [e for e, s, _ in rec.calls if s == 6][:5]
    assert at6 == ["step_end", "log", "log", "evaluate", "save"]


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control  # HF lets a callback return the control it changed


def test_early_stopping_through_control_ends_the_run_cleanly(tmp_path):
    rec = Recorder()
    trainer = trainer_with(tmp_path, [StopAt(2), rec], max_steps=20)
    result = trainer.train()
    assert result.global_step == 2 and not result.interrupted
    assert rec.steps("step_end") == [1, 2]
    # what max_steps would have done at the end: evaluation, checkpoint, adapter
    assert rec.steps("evaluate") == [2] and rec.steps("save") == [2]
    assert (tmp_path / "checkpoint-2" / "trainer_state.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert rec.calls[-1][0] == "train_end"


class StopOnEval(TrainerCallback):
    """Early stopping on the evaluation metric (here: at the first one)."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.seen = metrics["eval_loss"]
        control.should_training_stop = True


def test_stop_asked_in_on_evaluate_stops_at_that_step(tmp_path):
    stop = StopOnEval()
    result = trainer_with(tmp_path, [stop], max_steps=20).train()
    assert result.global_step == 3 and stop.seen == pytest.approx(result.metrics["eval_loss"])
    assert (tmp_path / "checkpoint-3").is_dir()


class SaveEvalLogAt1(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            control.should_save = control.should_evaluate = control.should_log = True


def test_control_asks_for_a_save_an_evaluation_and_a_log_at_one_step(tmp_path):
    rec = Recorder()
    trainer_with(tmp_path, [SaveEvalLogAt1(), rec], max_steps=2, eval_steps=None,
                 save_steps=None, logging_steps=5).train()
    assert rec.steps("save") == [1, 2] and rec.steps("evaluate") == [1, 2]
    assert [s for e, s, got in rec.calls if e == "log" and "loss" in got["logs"]] == [1, 2]
    assert (tmp_path / "checkpoint-1").is_dir()  # only because the callback asked


def test_callback_classes_duck_typed_objects_and_add_callback(tmp_path):
    class OnlyLogs:  # not a TrainerCallback: any object with some of the hook methods
        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(logs)

    duck = OnlyLogs()
    trainer = trainer_with(tmp_path, [Recorder], max_steps=2, eval_steps=None)  # a class
    trainer.add_callback(duck)
    trainer.train()
    recorder = trainer.callback_handler.callbacks[0]
    assert isinstance(recorder, Recorder) and recorder.steps("step_end") == [1, 2]
    assert [(r["step"], "loss" in r, "eval_loss" in r) for r in duck.logs] == [
        (2, True, False), (2, False, True)]  # the training log, then the final evaluation
    with pytest.raises(TypeError, match="not a callback"):
        trainer.add_callback(object())
