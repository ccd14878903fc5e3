"""Experiment trackers: what a run logs, sent to TensorBoard, MLflow or Trackio as well.

    TrainConfig(report_to=["tensorboard", "mlflow"])   # or "all", "none", "tensorboard,mlflow"
    lorakit train --report-to tensorboard mlflow ...

Every record the loop writes to metrics.jsonl (train and eval metrics, the objective's own
metrics, learning rate, gradient norm, tokens per second) goes to each tracker at its step, under
HF Trainer's names: `eval_x` as `eval/x`, anything else as `train/x`, lorakit's `lr` as
`train/learning_rate`. Text (a skipped step's reason) is not sent. The run config
(run_config.json) goes as hyperparameters, flattened (`train.learning_rate`,
`adapters.default.r`). Rank 0 alone writes. Each library is an extra (`pip install
'lorakit[mlflow]'`), imported only when named.

Where each writes (HF's environment variables work), and how a resumed run continues:
- tensorboard: `<output_dir>/runs`, or TENSORBOARD_LOGGING_DIR. A resume writes into it with
  `purge_step`: what a killed run logged after the checkpoint drops out of view.
- mlflow: MLFLOW_TRACKING_URI, else `sqlite:///<output_dir>/mlflow.db`; experiment
  MLFLOW_EXPERIMENT_NAME (else Default); into MLFLOW_RUN_ID, or the script's active
  `mlflow.start_run()`, else a new run named `run_name`. The run id is kept in each checkpoint
  (TrainState.trackers) and a resume logs into that run again.
- trackio: its local database (TRACKIO_DIR, default under HF_HOME), project
  `TrainConfig.project`, run `run_name` (else trackio names it). The name is kept in each
  checkpoint and a resume continues that run.
MLflow and trackio keep every point logged: steps that a killed run logged after its last
checkpoint are there twice once it resumes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from lorakit.errors import ConfigError, UserError
from lorakit.log import get_logger

log = get_logger(__name__)

TRACKERS = ("tensorboard", "mlflow", "trackio")
# metrics.jsonl keys that HF Trainer names otherwise in its logs
_HF_NAMES = {"lr": "learning_rate"}
# how a run ended, in MLflow's words
FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"

Hyperparameters = dict[str, bool | int | float | str]


class TrackerNotInstalledError(UserError, ImportError):
    """`report_to` names a tracker whose library does not import; the message names the extra
    that installs it."""


def _not_installed(name: str, why: str = "is not installed") -> TrackerNotInstalledError:
    return TrackerNotInstalledError(
        f"report_to names {name}, which {why}: pip install 'lorakit[{name}]'"
    )


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a module whose spec is unset, or a broken parent
        return False


def resolve_report_to(report_to: str | Iterable[str] | None) -> list[str]:
    """The trackers `report_to` asks for, read as HF's TrainingArguments reads it: None, "none"
    or [] is none, "all" every installed one, else names (a list, or comma-separated). An
    unknown name is a ConfigError, one not installed a TrackerNotInstalledError. Imports
    nothing."""
    if report_to is None:
        return []
    items = [report_to] if isinstance(report_to, str) else list(report_to)
    if not all(isinstance(item, str) for item in items):
        raise ConfigError(f"report_to={report_to!r}: expected tracker names")
    names = list(dict.fromkeys(n.strip() for item in items for n in item.split(",") if n.strip()))
    if names in ([], ["none"]):
        return []
    if names == ["all"]:
        return [name for name in TRACKERS if _installed(name)]
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise ConfigError(
            f"report_to={report_to!r}: lorakit reports to {', '.join(TRACKERS)}, or 'all' or "
            f"'none' alone; not {', '.join(unknown)}"
        )
    for name in names:
        if not _installed(name):
            raise _not_installed(name)
    return names


def tracker_key(key: str) -> str:
    """The name HF Trainer gives a metrics.jsonl key in trackers (`eval_loss` -> `eval/loss`,
    `loss` -> `train/loss`, `lr` -> `train/learning_rate`)."""
    key = _HF_NAMES.get(key, key)
    return f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"


def tracker_metrics(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record's numbers under the trackers' names, its step aside."""
    return {
        tracker_key(k): float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def hyperparameters(config: dict[str, Any], prefix: str = "") -> Hyperparameters:
    """The run config flattened to dotted keys; values other than numbers, booleans and
    strings (None, lists, empty mappings) as JSON text."""
    flat: Hyperparameters = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat |= hyperparameters(value, f"{name}.")
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


@dataclass
class TrackedRun:
    """What a tracker is told when training starts."""

    output_dir: Path
    hyperparameters: Hyperparameters
    step: int  # the step training starts from: a resumed run's checkpoint's, else 0
    saved: dict[str, str]  # TrainState.trackers: each tracker's run, kept in every checkpoint
    run_name: str | None = None
    project: str = "lorakit"


class Tracker:
    """One experiment tracker: opened when training starts, given each record's numbers at its
    step, closed when training ends (FINISHED, FAILED or KILLED)."""

    name: ClassVar[str]

    def open(self, run: TrackedRun) -> None:
        raise NotImplementedError

    def log(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self, status: str) -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    """Scalars through torch's SummaryWriter (which needs the tensorboard package), the run
    config in the HPARAMS tab."""

    name = "tensorboard"

    def __init__(self) -> None:
        import tensorboard  # noqa: F401  (torch's writer needs it: fail here, by its name)
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self._writer_class, self._hparams, self.writer = SummaryWriter, hparams, None

    def open(self, run: TrackedRun) -> None:
        log_dir = Path(os.environ.get("TENSORBOARD_LOGGING_DIR") or run.output_dir / "runs")
        # events from this run's first step on are a killed run's (or an older run's): hidden
        self.writer = self._writer_class(str(log_dir.expanduser()), purge_step=run.step + 1)
        for summary in self._hparams(run.hyperparameters, {}):
            self.writer.file_writer.add_summary(summary, run.step)
        log.info(f"tensorboard: logging to {log_dir}")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # on disk at once: a killed run keeps what it logged

    def close(self, status: str) -> None:
        self.writer.close()


class MLflowTracker(Tracker):
    """Metrics and params through an MlflowClient; the global fluent run is left alone unless
    the script started one."""

    name = "mlflow"

    def __init__(self) -> None:
        import mlflow

        self._mlflow, self.client, self.run_id, self._own = mlflow, None, None, True

    def open(self, run: TrackedRun) -> None:
        mlflow = self._mlflow
        active = mlflow.active_run()
        default = f"sqlite:///{(run.output_dir / 'mlflow.db').resolve()}"
        uri = None if os.environ.get("MLFLOW_TRACKING_URI") or active else default
        self.client, self._own = mlflow.MlflowClient(tracking_uri=uri), True
        run_id = self._find(run.saved.get("mlflow")) or self._find(os.environ.get("MLFLOW_RUN_ID"))
        if run_id is None and active is not None:
            run_id, self._own = active.info.run_id, False  # the script's run: it ends it
        if run_id is None:
            created = self.client.create_run(self._experiment_id(), run_name=run.run_name)
            run_id = created.info.run_id
        elif self._own:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run.saved["mlflow"] = run_id
        self._log_params(run.hyperparameters)
        log.info(f"mlflow: logging to run {run_id} in {self.client.tracking_uri}")

    def _find(self, run_id: str | None) -> str | None:
        if not run_id:
            return None
        try:
            return self.client.get_run(run_id).info.run_id
        except self._mlflow.exceptions.MlflowException:
            log.info(f"mlflow: no run {run_id} in {self.client.tracking_uri}; not continuing it")
            return None

    def _experiment_id(self) -> str:
        from mlflow.tracking.default_experiment import DEFAULT_EXPERIMENT_ID

        name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
        if not name:
            return os.environ.get("MLFLOW_EXPERIMENT_ID") or DEFAULT_EXPERIMENT_ID
        found = self.client.get_experiment_by_name(name)
        return found.experiment_id if found else self.client.create_experiment(name)

    def _log_params(self, params: Hyperparameters) -> None:
        """The params the run lacks: MLflow does not change a param once logged, so a resume
        with other settings keeps the first values (and says which)."""
        from mlflow.entities import Param

        values = {k[:250]: str(v)[:6000] for k, v in params.items()}  # MLflow's size limits
        logged = self.client.get_run(self.run_id).data.params
        if changed := sorted(k for k, v in values.items() if logged.get(k, v) != v):
            log.info(f"mlflow: params keep their first values: {', '.join(changed)}")
        new = [Param(k, v) for k, v in values.items() if k not in logged]
        for i in range(0, len(new), 100):  # MLflow takes 100 params a call
            self.client.log_batch(self.run_id, params=new[i : i + 100])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, value, now, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def close(self, status: str) -> None:
        if self._own:
            self.client.set_terminated(self.run_id, status)


class TrackioTracker(Tracker):
    """Metrics at the run's steps into trackio's local database, the run config as its
    config."""

    name = "trackio"

    def __init__(self) -> None:
        import trackio

        self._trackio, self.run = trackio, None

    def open(self, run: TrackedRun) -> None:
        saved = run.saved.get("trackio")
        self.run = self._trackio.init(
            project=run.project,
            name=saved or run.run_name,
            config=dict(run.hyperparameters),
            resume="allow" if saved else "never",
        )
        run.saved["trackio"] = self.run.name
        log.info(f"trackio: logging to run {self.run.name} of project {run.project}")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self, status: str) -> None:
        if self._trackio.context_vars.current_run.get() is self.run:
            self._trackio.finish()  # also forgets it as trackio's current run
        else:
            self.run.finish()


_CLASSES: dict[str, type[Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "mlflow": MLflowTracker,
    "trackio": TrackioTracker,
}


class Trackers:
    """A run's trackers, by name (their libraries imported here); none: every call is a no-op.
    The loop opens them on rank 0 alone."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self.trackers = [_create(name) for name in names]
        self.opened: list[Tracker] = []

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def open(self, run: TrackedRun) -> None:
        for tracker in self.trackers:
            try:
                tracker.open(run)
            except BaseException:
                self.close(FAILED)
                raise
            self.opened.append(tracker)

    def log(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record, at its step."""
        if self.opened and (metrics := tracker_metrics(record)):
            for tracker in self.opened:
                tracker.log(record["step"], metrics)

    def close(self, status: str) -> None:
        """Close every opened tracker; one that fails to close is reported, not raised (it
        would hide the error that ends a failed run)."""
        opened, self.opened = self.opened, []
        for tracker in opened:
            try:
                tracker.close(status)
            except Exception as e:
                log.warning(f"{tracker.name}: could not close the run: {type(e).__name__}: {e}")


def _create(name: str) -> Tracker:
    if name not in _CLASSES:
        raise ConfigError(f"report_to: unknown tracker {name!r}; lorakit has {TRACKERS}")
    try:
        return _CLASSES[name]()
    except ImportError as e:
        raise _not_installed(name, f"does not import ({e})") from e
