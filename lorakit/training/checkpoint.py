"""Training checkpoints: everything needed to continue a run exactly, and nothing pickled.

A checkpoint directory `checkpoint-<step>/` holds
- the adapter(s) in PEFT format (`adapter_config.json`, `adapter_model.safetensors`): PEFT and
  `lorakit generate` load it as is;
- `optimizer.safetensors`: optimizer state tensors, flattened to "state.<param>.<name>" keys;
- `trainer_state.json`: HF Trainer's `global_step` and `log_history`, plus step, data position,
  scheduler and optimizer scalars (what resume reads);
- `rng.safetensors`: torch RNG states (dropout), so a resumed run draws the same numbers;
- `run_config.json`: the full configuration of the run.
It is written into a temporary sibling directory and renamed into place: a crash (even kill -9)
mid-write leaves the previous checkpoint untouched and no half checkpoint under the final name;
old checkpoints are pruned the same way (renamed away, then deleted).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lorakit.atomic import atomic_directory, remove_tree
from lorakit.errors import InputNotFoundError, UserError
from lorakit.lora.files import AdapterFileError, adapter_dir, load_adapter_weights

CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
OBJECTIVE_STATE = "objective.safetensors"
# adapter config keys that say nothing about the adapter's computation
_ADAPTER_METADATA = {"inference_mode", "base_model_name_or_path", "revision", "task_type"}


class CheckpointError(UserError, ValueError):
    """A checkpoint this run cannot continue from: unreadable, or written by a run with other
    adapters or another base model. The message names the checkpoint and the difference."""


@dataclass
class TrainState:
    """Where a run is: optimizer steps done and the next batch to read."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0  # next global batch of `epoch`
    global_batch: int = 0  # examples per global batch, the unit of batch_index (0: unknown)
    tokens_seen: int = 0
    skipped_steps: int = 0  # steps dropped for a NaN/inf loss (TrainConfig.nonfinite="skip")
    log_history: list[dict[str, Any]] = field(default_factory=list)
    max_steps: int = 0  # the run's total steps (set by train())
    # each experiment tracker's run (mlflow: run id, trackio: run name), continued by a resume
    trackers: dict[str, str] = field(default_factory=dict)
    # what HF's TrainerState also tells callbacks; per process, never saved
    is_world_process_zero: ClassVar[bool] = True
    best_metric: ClassVar[float | None] = None  # lorakit keeps no "best model"

    @property
    def global_step(self) -> int:
        """HF Trainer's name for `step` (optimizer steps done)."""
        return self.step


def save_checkpoint(
    output_dir: str | Path,
    lora_model,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: TrainState,
    run_config: dict[str, Any],
    save_total_limit: int | None = None,
    objective_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint-<step> atomically and prune older ones down to `save_total_limit`
    (`objective_state`: the objective's tensors, as objective.safetensors)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint-{state.step}"
    with atomic_directory(final) as tmp:  # re-saving a step (a signal right after a save) replaces
        lora_model.save_pretrained(tmp)
        opt = optimizer.state_dict()
        tensors, scalars = {}, {}
        for pid, pstate in opt["state"].items():
            for key, value in pstate.items():
                if torch.is_tensor(value):
                    tensors[f"state.{pid}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{pid}.{key}"] = value
        save_file(tensors, tmp / "optimizer.safetensors")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda.{i}"] = s
        save_file(rng, tmp / "rng.safetensors")
        if objective_state:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in objective_state.items()},
                tmp / OBJECTIVE_STATE,
            )
        trainer_state = {
            # the keys HF Trainer writes, for scripts and tools that read them
            "global_step": state.step,
            "max_steps": state.max_steps,
            "log_history": state.log_history,
            "best_metric": None,
            "best_model_checkpoint": None,
            # lorakit's own: everything resume needs
            "state": asdict(state),
            "optimizer_param_groups": opt["param_groups"],
            "optimizer_scalars": scalars,
            "scheduler": scheduler.state_dict(),
        }
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        (tmp / "run_config.json").write_text(json.dumps(run_config, indent=2, default=str))
    if save_total_limit:
        for old in list_checkpoints(output_dir)[:-save_total_limit]:
            remove_tree(old)  # a kill meanwhile leaves it whole or gone
    return final


def objective_state(path: str | Path | None) -> dict[str, torch.Tensor]:
    """The objective's tensors a checkpoint keeps ({} without any, or without a checkpoint)."""
    file = Path(path) / OBJECTIVE_STATE if path is not None else None
    return load_file(str(file)) if file is not None and file.is_file() else {}


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in step order (temporary directories are never listed, nor
    symbolic links: a checkpoint lives inside its run's directory)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in output_dir.iterdir()
        if (m := CHECKPOINT_RE.fullmatch(p.name))
        and not p.is_symlink()
        and (p / "trainer_state.json").is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def load_checkpoint(
    path: str | Path, lora_model, optimizer: torch.optim.Optimizer, scheduler
) -> TrainState:
    """Restore adapter weights, optimizer, scheduler and RNG; return where the run was."""
    path = Path(path)
    if not (path / "trainer_state.json").is_file():
        raise InputNotFoundError(f"{path} is not a lorakit checkpoint (no trainer_state.json)")
    try:
        return _load(path, lora_model, optimizer, scheduler)
    except AdapterFileError as e:
        raise CheckpointError(f"cannot resume from {path}: {e}") from e
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        if isinstance(e, UserError):
            raise
        raise CheckpointError(
            f"cannot resume from {path}: incomplete or corrupt ({type(e).__name__}: {e})"
        ) from e


def check_resumable(path: str | Path, run_config: dict[str, Any]) -> list[str]:
    """Raise CheckpointError if the checkpoint at `path` was written by a run with other
    adapters or another base architecture than `run_config` (this run's); else the training
    settings that differ (allowed: e.g. a lower learning rate after a divergence)."""
    path = Path(path)
    try:
        saved = json.loads((path / "run_config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"cannot resume from {path}: no readable run_config.json ({e})"
        ) from None
    _check_readable(path)

    def differ(kind: str, a: dict, b: dict, skip: set[str] = frozenset()) -> list[str]:
        keys = sorted((set(a) | set(b)) - skip)
        return [f"{kind}{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]

    mine, theirs = run_config.get("adapters", {}), saved.get("adapters", {})
    if sorted(mine) != sorted(theirs):
        raise CheckpointError(
            f"cannot resume from {path}: it holds adapters {sorted(theirs)}, this run "
            f"{sorted(mine)}; resume with the same settings, or train into a new --output"
        )
    for name in sorted(mine):
        changed = differ("lora.", theirs[name], mine[name], _ADAPTER_METADATA)
        if changed:
            raise CheckpointError(
                f"cannot resume from {path}: adapter '{name}' differs ({changed[0]}"
                f"{', ...' if len(changed) > 1 else ''}); resume with the same settings, or "
                "train into a new --output"
            )
    base, saved_base = run_config.get("base_architecture"), saved.get("base_architecture")
    if base and saved_base and base != saved_base:
        changed = differ("", saved_base, base)
        raise CheckpointError(
            f"cannot resume from {path}: it was trained on another base model "
            f"({saved.get('base_model')}; {changed[0]}); pass the same --model"
        )
    skip = {"output_dir"}
    return differ("training.", saved.get("train", {}), run_config.get("train", {}), skip)


def _check_readable(path: Path) -> None:
    """Every file a resume reads is there and whole (safetensors headers against the file
    sizes, JSON parsed); the tensors themselves are read later."""
    try:
        json.loads((path / "trainer_state.json").read_text())
        for name in ("optimizer.safetensors", "rng.safetensors"):
            with safe_open(str(path / name), "pt"):
                pass
    except (OSError, ValueError, SafetensorError) as e:
        raise CheckpointError(
            f"cannot resume from {path}: incomplete or corrupt ({type(e).__name__}: {e})"
        ) from e


def _load(path: Path, lora_model, optimizer: torch.optim.Optimizer, scheduler) -> TrainState:
    for name in lora_model.list_adapters():
        sub = adapter_dir(path, name)
        load_adapter_weights(lora_model, sub, name)
    saved = json.loads((path / "trainer_state.json").read_text())
    tensors = load_file(path / "optimizer.safetensors")
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        opt_state.setdefault(int(pid), {})[name] = value
    for key, value in saved["optimizer_scalars"].items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": saved["optimizer_param_groups"]})
    scheduler.load_state_dict(saved["scheduler"])
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
        if states:
            torch.cuda.set_rng_state_all(states)
    return TrainState(**saved["state"])
