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
mid-write leaves the previous checkpoint untouched and no half checkpoint under the final name.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lorakit.atomic import atomic_directory
from lorakit.errors import InputNotFoundError
from lorakit.lora.files import adapter_dir, load_adapter_weights

CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")


@dataclass
class TrainState:
    """Where a run is: optimizer steps done and the next batch to read."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0  # next batch of `epoch`
    tokens_seen: int = 0
    log_history: list[dict[str, Any]] = field(default_factory=list)


def save_checkpoint(
    output_dir: str | Path,
    lora_model,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: TrainState,
    run_config: dict[str, Any],
    save_total_limit: int | None = None,
) -> Path:
    """Write checkpoint-<step> atomically and prune older ones down to `save_total_limit`."""
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
        trainer_state = {
            # the keys HF Trainer writes, for scripts and tools that read them
            "global_step": state.step,
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
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in step order (temporary directories are never listed)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in output_dir.iterdir()
        if (m := CHECKPOINT_RE.fullmatch(p.name)) and (p / "trainer_state.json").is_file()
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
