"""What the fault suite shares: `lorakit` CLI runs forked from a preloaded process (zygote.py),
checks of what a run left on disk, and the records tests/RELIABILITY.md is rendered from.

Records: every test appends what it tried and what happened (`record`) to the JSON-lines file
named by $LORAKIT_RELIABILITY_RESULTS (`make reliability` sets it; otherwise nothing is kept).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from lorakit.atomic import TMP_PREFIX

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RESULTS_ENV = "LORAKIT_RELIABILITY_RESULTS"
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
             "TOKENIZERS_PARALLELISM": "false"}
CHECKPOINT_FILES = ("adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors",
                    "rng.safetensors", "trainer_state.json", "run_config.json")


def record(category: str, case: str, outcome: str, ok: bool, **details: Any) -> None:
    """One tried fault or input and what came of it (`ok`: the expected outcome)."""
    path = os.environ.get(RESULTS_ENV)
    if not path:
        return
    row = {"category": category, "case": case, "outcome": outcome, "ok": bool(ok)} | details
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=str) + "\n")


# ------------------------------------------------------------------------------- CLI processes


@dataclass
class Finished:
    status: int  # exit status; negative: killed by that signal
    stdout: str
    stderr: str

    def error_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.startswith("lorakit: error")]


class Run:
    """One forked `lorakit ARGS` process."""

    def __init__(self, zygote: "Zygote", pid: int, stdout: Path, stderr: Path) -> None:
        self.zygote, self.pid, self.stdout, self.stderr = zygote, pid, stdout, stderr
        self.status: int | None = None
        self.started = time.monotonic()

    def poll(self) -> int | None:
        if self.status is None:
            self.status = self.zygote.ask(op="poll", pid=self.pid)["status"]
        return self.status

    def kill(self, sig: int = signal.SIGKILL) -> bool:
        """Send `sig` unless the run has ended; whether it was sent."""
        if self.poll() is not None:
            return False
        os.kill(self.pid, sig)
        return True

    def wait(self, timeout: float = 240) -> Finished:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                self.status = self.zygote.ask(op="wait", pid=self.pid)["status"]
                raise TimeoutError(f"lorakit run {self.pid} still running after {timeout} s")
            time.sleep(0.01)
        return Finished(self.status, self.stdout.read_text(errors="replace"),
                        self.stderr.read_text(errors="replace"))


class Zygote:
    """The preloaded process; `spawn` forks a CLI run from it."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self.proc = subprocess.Popen([sys.executable, str(HERE / "zygote.py")], cwd=REPO,
                                     env=os.environ | CHILD_ENV, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def ask(self, **request: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the zygote died (exit status {self.proc.wait()})")
        return json.loads(line)

    def spawn(self, args: list[Any], cwd: Path, env: dict[str, str] | None = None,
              fsize: int | None = None) -> Run:
        """Start `lorakit ARGS` in `cwd`; `fsize`: RLIMIT_FSIZE in bytes (a full disk)."""
        self.count += 1
        out, err = (self.logs / f"{self.count}.{s}" for s in ("out", "err"))
        pid = self.ask(op="spawn", argv=[str(a) for a in args], cwd=str(cwd), stdout=str(out),
                       stderr=str(err), env=env or {}, fsize=fsize)["pid"]
        return Run(self, pid, out, err)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


_zygote: Zygote | None = None


def zygote(tmp: Path) -> Zygote:
    """The session's zygote (started on first use, closed at exit); its logs under `tmp`."""
    global _zygote
    if _zygote is None:
        _zygote = Zygote(tmp)
        atexit.register(_zygote.close)
    return _zygote


def lorakit(tmp: Path, *args: Any, cwd: Path | None = None, env: dict[str, str] | None = None,
            fsize: int | None = None, timeout: float = 240) -> Finished:
    """Run `lorakit ARGS` to the end."""
    return zygote(tmp).spawn(list(args), cwd or tmp, env, fsize).wait(timeout)


# ---------------------------------------------------------------------------- what a run left


def train_args(model: Path, data: Path, out: Path, steps: int, keep: int | str, *extra: Any,
               r: int = 4, alpha: int = 8) -> list:
    """`lorakit train` as the fault suite runs it: fp32, batch 4, a log line and a checkpoint
    every step (`keep` of them at most; "null" keeps all), no samples."""
    return ["train", "--model", model, "--data", data, "--output", out, "--max-steps", steps,
            "--batch-size", 4, "--lr", "5e-3", "--lora-r", r, "--lora-alpha", alpha,
            "--set", "training.logging_steps=1", "--set", "training.save_steps=1",
            "--set", f"training.save_total_limit={keep}", "--set", "training.bf16=false",
            "--set", "output.samples=0", *extra]


def checkpoint_problems(out: Path) -> list[str]:
    """Checkpoints under `out` that are not complete (every file there and readable)."""
    problems = []
    for ckpt in sorted(out.glob("checkpoint-*")):
        for name in CHECKPOINT_FILES:
            file = ckpt / name
            try:
                if name.endswith(".safetensors"):
                    load_file(file)
                else:
                    json.loads(file.read_text())
            except Exception as e:  # anything unreadable is a finding, not a test crash
                problems.append(f"{file}: {type(e).__name__}: {e}")
    return problems


def adapter_problems(out: Path) -> list[str]:
    """The final adapter directory, when there is one, must be complete."""
    adapter = out / "adapter"
    if not adapter.exists():
        return []
    try:
        load_file(adapter / "adapter_model.safetensors")
        json.loads((adapter / "adapter_config.json").read_text())
    except Exception as e:
        return [f"{adapter}: {type(e).__name__}: {e}"]
    return []


def temporaries(root: Path) -> list[Path]:
    """lorakit's temporary files and directories anywhere under `root`."""
    return sorted(p for p in root.rglob(f"{TMP_PREFIX}*"))


def one_line_error(res: Finished, needle: str) -> str | None:
    """What is wrong with `res` as a user error (exit 2, one line naming `needle`); None: ok."""
    if res.status != 2:
        return f"exit status {res.status}, expected 2"
    if "Traceback" in res.stderr:
        return "a traceback on stderr"
    lines = res.error_lines()
    if len(lines) != 1:
        return f"{len(lines)} error lines"
    if needle not in lines[0]:
        return f"{needle!r} not in {lines[0]!r}"
    return None
