"""End-of-run reports in the output directory: loss.png and report.md (metrics.jsonl is the
trainer's own log)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from lorakit.atomic import atomic_write_bytes
from lorakit.training.loop import TrainResult


@dataclass
class OutputConfig:
    """Where a run writes and what its report shows (the run config's `output` section)."""

    dir: str = "lorakit-out"
    samples: int = 3  # sample generations before/after training in report.md
    sample_max_new_tokens: int = 48
    # a fresh run into a directory holding another run's checkpoints / adapter: delete them
    # first (True), or refuse (False: `lorakit train` says to --resume or pick another --output)
    overwrite: bool = False


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(output_dir: str | Path) -> Path | None:
    """loss.png: train loss per logged step (line) and eval loss (marked points)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = read_metrics(output_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        ax.plot(*zip(*train), color="tab:blue", linewidth=1.5, label="train loss")
    if evals:
        ax.plot(
            *zip(*evals),
            color="tab:orange",
            marker="o",
            markersize=6,
            linestyle="--",
            label="eval loss",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean token cross-entropy)")
    ax.set_title("lorakit training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(output_dir) / "loss.png"
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())
    return path


def write_report(
    output_dir: str | Path,
    run_config: dict[str, Any],
    result: TrainResult,
    samples: Sequence[dict[str, str]] = (),
    extra: dict[str, Any] | None = None,
) -> Path:
    """report.md: config, data counts, time, speed, memory, metrics, samples before/after."""
    out = Path(output_dir)
    train, adapters = run_config.get("train", {}), run_config.get("adapters", {})
    lines = ["# lorakit training report", ""]
    lines += [
        "## Run",
        "",
        f"- base model: `{run_config.get('base_model')}`",
        f"- device: {run_config.get('device')}, bf16 autocast: {run_config.get('bf16')}",
        f"- steps: {result.global_step} of {run_config.get('total_steps')}"
        + (" (interrupted)" if result.interrupted else ""),
        f"- time: {result.seconds:.1f} s, {result.tokens_per_second:.1f} tokens/s (non-pad)",
        f"- peak memory: {result.peak_memory_mb:.0f} MB",
        f"- trainable parameters: {run_config.get('trainable_parameters'):,}",
        f"- final train loss: {result.train_loss:.4f}",
    ]
    if experts := run_config.get("trainable_experts"):
        lines.insert(-1, f"  ({experts})")
    for k, v in (result.metrics or {}).items():
        lines.append(f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}")
    for k, v in (extra or {}).items():
        lines.append(f"- {k}: {v}")
    lines += ["", "## Data", ""]
    for split in ("train_data", "eval_data"):
        if run_config.get(split):
            stats = ", ".join(f"{k} {v}" for k, v in run_config[split].items())
            lines.append(f"- {split.split('_')[0]}: {stats}")
    if (out / "loss.png").is_file():
        lines += ["", "## Loss", "", "![loss curve](loss.png)"]
    if samples:
        lines += ["", "## Sample generations", ""]
        for i, s in enumerate(samples, 1):
            lines += [
                f"### Sample {i}",
                "",
                "Prompt:",
                "",
                _quote(s["prompt"]),
                "",
                "Before training:",
                "",
                _quote(s["before"]),
                "",
                "After training:",
                "",
                _quote(s["after"]),
            ]
            if s.get("reference") is not None:
                lines += ["", "Reference:", "", _quote(s["reference"])]
            lines.append("")
    lines += [
        "",
        "## Configuration",
        "",
        "```json",
        json.dumps({"train": train, "adapters": adapters}, indent=2, default=str),
        "```",
        "",
    ]
    path = out / "report.md"
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in (text or "(empty)").splitlines() or ["(empty)"])
