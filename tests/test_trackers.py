"""report_to: what a run writes to metrics.jsonl reaches TensorBoard, MLflow and trackio under HF
Trainer's names, read back with each tool's own reader (TensorBoard's event accumulator, an
MlflowClient on the run's sqlite store, trackio's local database); the run config goes as
hyperparameters, and a run killed and resumed continues the same tracker run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
from conftest import make_tiny_llama, write_sum_rows
from test_loop import ConstantTarget, records, toy_rows, toy_trainer

from lorakit import LoraConfig, SFTConfig, TrainConfig, get_lora_model
from lorakit.cli import build_parser, main
from lorakit.errors import ConfigError, UserError
from lorakit.training import Trainer
from lorakit.training.distributed import ProcessGroup
from lorakit.training.launch import resolve_launch
from lorakit.training.run_config import run_config
from lorakit.training.trackers import (TRACKERS, TrackerNotInstalledError, Trackers,
                                       resolve_report_to)

# trackio reads TRACKIO_DIR once, when first imported: a directory of this session's own
os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="lorakit-tests-trackio-")
TRACKER_ENV = ("TENSORBOARD_LOGGING_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID",
               "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")
PROJECT = "lorakit-tests"


def hf_name(key: str) -> str:
    """HF Trainer's name for a metrics.jsonl key (its `rewrite_logs`, `lr` as learning_rate)."""
    if key == "lr":
        return "train/learning_rate"
    return "eval/" + key[len("eval_"):] if key.startswith("eval_") else "train/" + key


def expected(out: Path) -> dict[tuple[str, int], float]:
    """Every number metrics.jsonl holds, by (tracker key, step)."""
    return {(hf_name(k), r["step"]): v for r in records(out) for k, v in r.items()
            if k != "step" and isinstance(v, (int, float))}


class KillAt3:
    """SIGTERM at step 3, as a scheduler would send: the run saves checkpoint-3 and stops."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A run reporting to all three, killed at step 3 and resumed to step 6 (eval at 3 and 6);
    the trackers' runs as saved in checkpoint-3, and MLflow's status after the kill."""
    import mlflow

    out = tmp_path_factory.mktemp("tracked") / "run"
    settings = {"report_to": list(TRACKERS), "eval_steps": 3, "project": PROJECT}
    with pytest.MonkeyPatch.context() as mp:
        for name in TRACKER_ENV:
            mp.delenv(name, raising=False)
        assert toy_trainer(out, callbacks=[KillAt3()], **settings).train().interrupted
        saved = json.loads((out / "checkpoint-3/trainer_state.json").read_text())["state"]
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
        killed = client.get_run(saved["trackers"]["mlflow"]).info.status
        toy_trainer(out, **settings).train(resume_from_checkpoint=True)
    return out, saved["trackers"], killed


def test_metrics_jsonl_holds_what_the_trackers_are_checked_against(tracked):
    out, _, _ = tracked
    want = expected(out)
    assert {s for (k, s) in want if k == "train/loss"} == set(range(1, 7))
    assert {s for (k, s) in want if k == "eval/loss"} == {3, 6}
    for key in ("train/learning_rate", "train/grad_norm", "train/tokens_per_s", "train/epoch",
                "train/abs_error"):  # abs_error: the objective's own metric (log_metrics)
        assert (key, 6) in want, key


def test_tensorboard_has_every_step_once_and_the_run_config(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out, _, _ = tracked
    events = EventAccumulator(str(out / "runs"))
    events.Reload()  # purges what came after checkpoint-3 before the kill, as TensorBoard does
    tags = events.Tags()["scalars"]
    got = {(tag, e.step): e.value for tag in tags for e in events.Scalars(tag)}
    assert sum(len(events.Scalars(tag)) for tag in tags) == len(got)  # no step twice
    assert got == pytest.approx(expected(out), rel=1e-6)  # stored as float32
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["train.learning_rate"].number_value == pytest.approx(1e-2)
    assert hparams["adapters.default.r"].number_value == 4
    assert hparams["train.report_to"].string_value == json.dumps(list(TRACKERS))


def test_mlflow_has_every_step_in_the_one_resumed_run(tracked):
    import mlflow

    out, saved, killed = tracked
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs(["0"])
    assert [r.info.run_id for r in runs] == [saved["mlflow"]]  # the resume continued it
    assert (killed, runs[0].info.status) == ("KILLED", "FINISHED")
    run_id = saved["mlflow"]
    got = {(key, m.step): m.value for key in runs[0].data.metrics
           for m in client.get_metric_history(run_id, key)}
    assert got == pytest.approx(expected(out), rel=1e-12)
    params = runs[0].data.params
    assert params["train.learning_rate"] == "0.01" and params["adapters.default.r"] == "4"
    assert params["train.project"] == PROJECT


def test_trackio_has_every_step_in_the_one_resumed_run(tracked):
    from trackio.sqlite_storage import SQLiteStorage

    out, saved, _ = tracked
    assert SQLiteStorage.get_runs(PROJECT) == [saved["trackio"]]  # the resume continued it
    rows = SQLiteStorage.get_logs(PROJECT, saved["trackio"])
    got = {(k, row["step"]): v for row in rows for k, v in row.items()
           if k not in ("step", "timestamp")}
    assert len(got) == sum(len(row) - 2 for row in rows)  # no step twice
    assert got == pytest.approx(expected(out), rel=1e-12)
    config = SQLiteStorage.get_run_config(PROJECT, saved["trackio"])
    assert config["train.learning_rate"] == 1e-2 and config["adapters.default.r"] == 4


class CrashAt5:
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 5:
            raise RuntimeError("crash")


def test_a_crash_after_the_checkpoint_leaves_each_step_once_in_tensorboard(tmp_path, monkeypatch):
    """Killed at step 5 with steps 4 logged after checkpoint-3: TensorBoard purges them on the
    resume; MLflow keeps its points, so step 4 is there twice (and the crashed run FAILED)."""
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name in TRACKER_ENV:
        monkeypatch.delenv(name, raising=False)
    out, settings = tmp_path / "run", {"report_to": ["tensorboard", "mlflow"]}
    with pytest.raises(RuntimeError, match="crash"):
        toy_trainer(out, callbacks=[CrashAt5()], **settings).train()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs(["0"])
    assert run.info.status == "FAILED"
    toy_trainer(out, **settings).train(resume_from_checkpoint=True)
    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    got = {(tag, e.step): e.value for tag in events.Tags()["scalars"]
           for e in events.Scalars(tag)}
    assert got == pytest.approx(expected(out), rel=1e-6)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == [1, 2, 3, 4, 4, 5, 6]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_report_to_reads_as_in_hf(tmp_path):
    for nothing in (None, "none", [], ["none"]):
        assert resolve_report_to(nothing) == []
    assert resolve_report_to("all") == list(TRACKERS)  # the test extra installs all three
    assert resolve_report_to("tensorboard, mlflow") == ["tensorboard", "mlflow"]
    assert resolve_report_to(["trackio", "mlflow,trackio"]) == ["trackio", "mlflow"]
    for bad in ("wandb", ["all", "mlflow"], [3]):
        with pytest.raises(ConfigError, match="report_to"):
            resolve_report_to(bad)
    assert TrainConfig(report_to="tensorboard").report_to == ["tensorboard"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SFTConfig(report_to="mlflow", run_name="x")  # used now: not reported as unused
    assert not [w for w in caught if "report_to" in str(w.message)]
    for argv, want in ((["--report-to", "tensorboard", "mlflow"], ["tensorboard", "mlflow"]),
                       (["--report-to", "trackio,mlflow"], ["trackio", "mlflow"]), ([], [])):
        args = build_parser().parse_args(["train", *argv])
        cfg = run_config(None, {"--report-to": args.report_to})
        assert cfg.training.report_to == want
    (tmp_path / "run.yaml").write_text("training:\n  report_to: [mlflow, tensorboard]\n")
    assert run_config(tmp_path / "run.yaml").training.report_to == ["mlflow", "tensorboard"]


IMPORTS = """
import sys
from lorakit import TrainConfig
from lorakit.training.trackers import Trackers
libraries = {"mlflow", "trackio", "tensorboard"}
assert not libraries & set(sys.modules)
Trackers(TrainConfig(report_to="tensorboard").report_to)
print(sorted(libraries & set(sys.modules)))
"""


def test_a_library_is_imported_only_when_named():
    res = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "['tensorboard']"


def test_a_missing_library_is_one_line_naming_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(TrackerNotInstalledError) as caught:
        TrainConfig(report_to=["tensorboard", "mlflow"])
    assert str(caught.value) == ("report_to names mlflow, which is not installed: "
                                 "pip install 'lorakit[mlflow]'")
    assert isinstance(caught.value, UserError) and isinstance(caught.value, ImportError)
    assert resolve_report_to("all") == ["tensorboard", "trackio"]  # all: the installed ones
    with pytest.raises(TrackerNotInstalledError, match=r"^report_to names mlflow, which does "
                       r"not import \(.*\): pip install 'lorakit\[mlflow\]'$"):
        Trackers(["mlflow"])  # a config made before the library went: the trainer says so
    code = main(["train", "--report-to", "mlflow", "--data", str(tmp_path / "none.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and err == ("lorakit: error: report_to names mlflow, which is not "
                                 "installed: pip install 'lorakit[mlflow]'\n")


def trackio_files() -> set[Path]:
    return set(Path(os.environ["TRACKIO_DIR"]).rglob("*"))


class NotRank0(ProcessGroup):
    """One process that believes it is rank 1: its collectives are identities."""

    rank, is_main = 1, False


@pytest.mark.parametrize("report_to, rank", [("none", 0), ("all", 1)])
def test_none_and_other_ranks_write_nothing(tmp_path, report_to, rank):
    before = trackio_files()
    if rank == 0:
        toy_trainer(tmp_path / "run", max_steps=2, report_to=report_to).train()
    else:
        args = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, logging_steps=1,
                           per_device_train_batch_size=4, bf16=False, disable_tqdm=True,
                           report_to=report_to)
        model = get_lora_model(make_tiny_llama(), LoraConfig(r=4))
        trainer = Trainer(model, ConstantTarget(), args, train_data=toy_rows(8),
                          launch=resolve_launch(args, NotRank0()))
        assert trainer.train().global_step == 2 and trainer.state.log_history
    assert not (tmp_path / "run" / "runs").exists()
    assert not (tmp_path / "run" / "mlflow.db").exists()
    assert trackio_files() == before


@pytest.mark.default_model  # the tiny model borrows SmolLM2's tokenizer
def test_cli_reports_to_tensorboard(tmp_path, tiny_chat_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_sum_rows(tmp_path / "train.jsonl", 16)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in TRACKER_ENV}
    res = subprocess.run(
        [sys.executable, "-m", "lorakit", "train", "--model", tiny_chat_dir, "--data",
         tmp_path / "train.jsonl", "--output", out, "--max-steps", "3", "--batch-size", "8",
         "--report-to", "tensorboard", "--set", "training.logging_steps=1"],
        env=env | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}, capture_output=True,
        text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"tensorboard: logging to {out / 'runs'}" in res.stdout
    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    got = {(tag, e.step): e.value for tag in events.Tags()["scalars"]
           for e in events.Scalars(tag)}
    assert got == pytest.approx(expected(out), rel=1e-6)
    assert {s for (k, s) in got if k == "train/loss"} == {1, 2, 3}
    assert not (out / "mlflow.db").exists()


@pytest.mark.default_model  # SmolLM2's tokenizer and chat template
def test_a_preference_objectives_own_metrics_reach_the_trackers(tmp_path, smol_tokenizer):
    from conftest import tiny_chat_model
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import lorakit

    rows = [{"prompt": [{"role": "user", "content": f"{a} plus {b}?"}],
             "chosen": [{"role": "assistant", "content": str(a + b)}],
             "rejected": [{"role": "assistant", "content": f"{a + b + 1} maybe"}]}
            for a, b in [(1, 2), (3, 4), (5, 0), (2, 2)]]
    out = tmp_path / "dpo"
    lorakit.DPOTrainer(
        model=tiny_chat_model(smol_tokenizer),
        args=lorakit.DPOConfig(output_dir=str(out), use_cpu=True, max_steps=2, logging_steps=1,
                               per_device_train_batch_size=2, max_length=64, learning_rate=1e-3,
                               gradient_checkpointing=False, report_to="tensorboard",
                               eval_strategy="steps", eval_steps=2),
        train_dataset=rows, eval_dataset=rows[:2], processing_class=smol_tokenizer,
        peft_config=lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    ).train()
    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    got = {(tag, e.step): e.value for tag in events.Tags()["scalars"]
           for e in events.Scalars(tag)}
    assert got == pytest.approx(expected(out), rel=1e-6)
    for key in ("train/rewards/margins", "train/logps/chosen", "eval/rewards/margins"):
        assert (key, 2) in got, key
