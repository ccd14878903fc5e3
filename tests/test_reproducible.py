"""The same `lorakit train` command gives the same adapter, and an interrupted run (SIGTERM, or
SIGKILL at any point) continued with --resume ends where the uninterrupted one does.

Driven as a user types it: fresh processes, files compared byte for byte.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import logged_steps
from safetensors.torch import load_file

pytestmark = pytest.mark.default_model  # the tiny model borrows SmolLM2's tokenizer

ADAPTER = Path("adapter") / "adapter_model.safetensors"


@pytest.fixture(scope="module")
def tiny_dir(tiny_chat_dir) -> Path:
    return tiny_chat_dir


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} times {b}?"}],
             "completion": [{"role": "assistant", "content": f"{a} times {b} is {a * b}."}]}
            for a in range(8) for b in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_cmd(tiny_dir: Path, data: Path, out: Path, *extra: str, steps: int = 12) -> list[str]:
    return [sys.executable, "-m", "lorakit", "train", "--model", str(tiny_dir),
            "--data", str(data), "--output", str(out), "--max-steps", str(steps),
            "--batch-size", "4", "--lr", "5e-3", "--lora-r", "4", "--lora-alpha", "8",
            "--lora-dropout", "0", "--set", "training.logging_steps=1",
            "--set", "training.save_steps=3", "--set", "training.save_total_limit=null",
            "--set", "output.samples=1", "--set", "output.sample_max_new_tokens=2", *extra]


ENV = os.environ | {"PYTHONWARNINGS": "ignore"}


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def start_and_signal(cmd: list[str], out: Path, sig: int, after_step: int) -> int:
    """Start the command, send `sig` once it has logged `after_step`; its exit status."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 240
    while logged_steps(out) < after_step:
        assert proc.poll() is None, "the run ended before it could be signalled:\n" + \
            proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.005)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    assert logged_steps(out) < 12, "the run finished before the signal reached it:\n" + output
    return proc.returncode


def tensors(path: Path) -> dict:
    return load_file(str(path))


@pytest.mark.slow
@pytest.mark.parametrize("bf16", ["false", "true"])
def test_same_command_twice_gives_the_same_adapter(tiny_dir, data, tmp_path, bf16):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        run(train_cmd(tiny_dir, data, out, "--set", f"training.bf16={bf16}"))
    a, b = (o / ADAPTER for o in outs)
    assert a.read_bytes() == b.read_bytes()  # bit-identical adapter files
    lines = [[json.loads(x) for x in (o / "metrics.jsonl").read_text().splitlines()]
             for o in outs]
    for ra, rb in zip(*lines):  # the same losses and grad norms, step by step
        assert {k: v for k, v in ra.items() if k != "tokens_per_s"} == \
            {k: v for k, v in rb.items() if k != "tokens_per_s"}
    config = yaml.safe_load((outs[0] / "config.yaml").read_text())
    assert config["training"]["seed"] == 42  # the seed used is written with the run
    assert json.loads((outs[0] / "run_config.json").read_text())["train"]["seed"] == 42


@pytest.mark.slow
def test_seed_changes_the_adapter(tiny_dir, data, tmp_path):
    """The seed is what fixes the run: another seed, another adapter initialisation."""
    run(train_cmd(tiny_dir, data, tmp_path / "a", steps=1))
    run(train_cmd(tiny_dir, data, tmp_path / "b", "--set", "training.seed=7", steps=1))
    a, b = (tensors(tmp_path / o / ADAPTER) for o in ("a", "b"))
    assert any(not (a[k] == b[k]).all() for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, data, tmp_path_factory):
    """The uninterrupted run's output directory, per bf16 setting (run once each)."""
    done: dict[str, Path] = {}

    def get(bf16: str) -> Path:
        if bf16 not in done:
            out = tmp_path_factory.mktemp(f"full-bf16-{bf16}") / "out"
            run(train_cmd(tiny_dir, data, out, "--set", f"training.bf16={bf16}"))
            done[bf16] = out
        return done[bf16]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("bf16", ["false", "true"])
def test_sigterm_then_resume_equals_uninterrupted(tiny_dir, data, tmp_path, uninterrupted, bf16):
    """Bit-identical under bf16 autocast too: the resumed process computes the same ops on the
    same inputs (fp32 adapters and optimizer state, restored exactly)."""
    out = tmp_path / "out"
    cmd = train_cmd(tiny_dir, data, out, "--set", f"training.bf16={bf16}")
    assert start_and_signal(cmd, out, signal.SIGTERM, after_step=4) == 0  # a clean stop
    assert not (out / ADAPTER).exists() and list(out.glob("checkpoint-*"))
    run(cmd + ["--resume"])
    assert (out / ADAPTER).read_bytes() == (uninterrupted(bf16) / ADAPTER).read_bytes()
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(1, 13))  # each step logged once, in order


@pytest.mark.slow
def test_sigkill_twice_then_resume_equals_uninterrupted(tiny_dir, data, tmp_path, uninterrupted):
    """kill -9 at two moments of the run (between or inside steps and checkpoint writes)."""
    out = tmp_path / "out"
    cmd = train_cmd(tiny_dir, data, out, "--set", "training.bf16=false")
    assert start_and_signal(cmd, out, signal.SIGKILL, after_step=4) == -signal.SIGKILL
    assert start_and_signal(cmd + ["--resume"], out, signal.SIGKILL,
                            after_step=8) == -signal.SIGKILL
    run(cmd + ["--resume"])
    assert (out / ADAPTER).read_bytes() == (uninterrupted("false") / ADAPTER).read_bytes()
