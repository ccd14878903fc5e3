"""kill -9 at random moments of `lorakit train`, each followed by `--resume`.

Every trial kills the run at a seeded random moment of a chosen phase: start-up, a training step,
a checkpoint write (or the pruning of an old one), an evaluation, the final adapter write, or
the report after it. Some trials kill the resumed run too. After every kill each checkpoint on
disk must be complete (all files there and readable) and the adapter whole or absent; the
resumed run must start and end with the adapter bytes and the per-step losses of the
uninterrupted run (CPU, fp32), leaving no temporaries.

The moment is found by watching the output directory (a temporary checkpoint directory
appearing, a step logged) plus a random delay: the package has no test hooks.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import logged_steps, write_sum_rows
import harness
from harness import (
    CHILD_ENV,
    Run,
    adapter_problems,
    checkpoint_problems,
    record,
    temporaries,
    zygote,
)

from lorakit.atomic import TMP_PREFIX

pytestmark = pytest.mark.default_model  # the tiny model borrows SmolLM2's tokenizer

STEPS, EVAL_STEPS = 8, 3
# bench/soak.py runs the same trials longer, with other seeds
TRIALS = int(os.environ.get("LORAKIT_KILL_TRIALS", "20"))
SEED = int(os.environ.get("LORAKIT_KILL_SEED", "17"))
ADAPTER = Path("adapter") / "adapter_model.safetensors"
PHASES = ("start-up", "training step", "checkpoint write", "eval", "final adapter write",
          "report")


def train_args(model: Path, data: Path, out: Path) -> list:
    # a checkpoint every step (pruned to 2: pruning is killed too), eval every 3 steps
    return harness.train_args(
        model, data / "train.jsonl", out, STEPS, 2, "--eval-data", data / "eval.jsonl",
        "--lora-dropout", 0, "--set", f"training.eval_steps={EVAL_STEPS}",
        "--set", "training.per_device_eval_batch_size=4")


def metrics(out: Path) -> list[dict]:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.endswith("}")]


def comparable(rows: list[dict]) -> list[dict]:
    """What two runs must agree on, step by step (throughput is the clock's)."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


@pytest.fixture(scope="module")
def setup(tiny_chat_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("kill-data")
    write_sum_rows(data / "train.jsonl", 30)
    write_sum_rows(data / "eval.jsonl", 24)
    tmp = tmp_path_factory.mktemp("kill")
    z = zygote(tmp_path_factory.mktemp("zygote-logs"))
    out = tmp / "reference"
    run = z.spawn(train_args(tiny_chat_dir, data, out), tmp)
    first_log = wait_for(run, lambda: (out / "metrics.jsonl").exists(), timeout=120)
    res = run.wait()
    assert res.status == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return {"model": tiny_chat_dir, "data": data, "tmp": tmp, "zygote": z, "reference": out,
            "startup_s": first_log, "adapter": (out / ADAPTER).read_bytes(),
            "metrics": comparable(metrics(out))}


def wait_for(run: Run, predicate, timeout: float = 60.0) -> float | None:
    """Seconds since the run started when `predicate()` became true; None if the run ended
    first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if run.poll() is not None:
            return None
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.0005)
    return time.monotonic() - run.started


def listing(out: Path) -> list[str]:
    try:
        return os.listdir(out)
    except FileNotFoundError:
        return []


def kill_in(run: Run, out: Path, phase: str, rng: random.Random, startup_s: float) -> bool:
    """Kill the run at a random moment of `phase`; whether it was still running."""
    step = rng.randint(1, STEPS)
    if phase == "start-up":
        time.sleep(rng.uniform(0, startup_s))
    elif phase == "training step":  # once the previous step's checkpoint is written
        wait_for(run, lambda: logged_steps(out) >= step - 1 and (
            step == 1 or (out / f"checkpoint-{step - 1}").exists()) and not any(
            n.startswith(TMP_PREFIX) for n in listing(out)))
        time.sleep(rng.uniform(0, 0.015))
    elif phase == "checkpoint write":
        wait_for(run, lambda: logged_steps(out) >= step and any(
            n.startswith(f"{TMP_PREFIX}checkpoint-") for n in listing(out)))
        time.sleep(rng.uniform(0, 0.004))
    elif phase == "eval":
        at = rng.choice([s for s in range(EVAL_STEPS, STEPS + 1, EVAL_STEPS)])
        wait_for(run, lambda: logged_steps(out) >= at)
        time.sleep(rng.uniform(0, 0.03))
    elif phase == "final adapter write":
        wait_for(run, lambda: any(n.startswith(f"{TMP_PREFIX}adapter.") for n in listing(out)))
        time.sleep(rng.uniform(0, 0.002))
    elif phase == "report":
        wait_for(run, lambda: "adapter" in listing(out))
        time.sleep(rng.uniform(0, 0.2))
    return run.kill(signal.SIGKILL)


def landed(out: Path, since: float) -> str:
    """Where the kill of a run started at `since` (time.time()) fell, read from what it left."""
    names = listing(out)
    if "adapter" in names and (out / "adapter").stat().st_mtime < since:
        names.remove("adapter")  # an earlier run's
    temps = [n[len(TMP_PREFIX):] for n in names if n.startswith(TMP_PREFIX)]
    for t in temps:
        if t.startswith("checkpoint-"):
            inner = listing(out / (TMP_PREFIX + t))
            return "checkpoint pruning" if any(n.startswith("checkpoint-") for n in inner) \
                else "checkpoint write"
        if t.startswith("adapter."):
            return "final adapter write"
        if t.startswith(("loss.png", "report.md")):
            return "report"
    if "adapter" in names:
        return "report"
    rows = metrics(out)
    steps = [r["step"] for r in rows if "loss" in r]
    if not steps:
        return "start-up"
    last, evals = max(steps), {r["step"] for r in rows if "eval_loss" in r}
    eval_due = last % EVAL_STEPS == 0 or last == STEPS
    if eval_due and last not in evals and (last == STEPS or not (out / f"checkpoint-{last}")
                                           .exists()):
        return "eval"
    return "training step"


def test_forked_runs_are_the_cli_runs(setup, tmp_path):
    """The trials fork `lorakit.cli.main` from a preloaded process; `python -m lorakit` with
    the same arguments writes the same adapter bytes and metrics."""
    out = tmp_path / "out"
    env = os.environ | CHILD_ENV
    res = subprocess.run([sys.executable, "-m", "lorakit",
                          *map(str, train_args(setup["model"], setup["data"], out))],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / ADAPTER).read_bytes() == setup["adapter"]
    assert comparable(metrics(out)) == setup["metrics"]


def test_kill_9_at_random_moments_then_resume(setup):
    z, tmp = setup["zygote"], setup["tmp"]
    rng = random.Random(SEED)
    lost, kills, failures = 0, 0, []
    for trial in range(TRIALS):
        out = tmp / f"trial-{trial}"
        args = train_args(setup["model"], setup["data"], out)
        targets = [PHASES[trial % len(PHASES)]]
        if trial % 3 == 2:  # a second kill, in the resumed run
            targets.append(rng.choice(PHASES[:5]))
        fell, problems = [], []
        for n, phase in enumerate(targets):
            since = time.time()
            run = z.spawn(args + (["--resume"] if n else []), tmp)
            if not kill_in(run, out, phase, rng, setup["startup_s"]):
                fell.append("finished first")
                continue
            run.wait()
            kills += 1
            fell.append(landed(out, since))
            problems += checkpoint_problems(out) + adapter_problems(out)
        res = z.spawn(args + ["--resume"], tmp).wait()
        started = "resumed from" in res.stdout or "starting at step 0" in res.stdout
        same = (out / ADAPTER).exists() and (out / ADAPTER).read_bytes() == setup["adapter"]
        rows = comparable(metrics(out))
        left = [str(p.relative_to(out)) for p in temporaries(out)]
        ok = (res.status == 0 and started and same and rows == setup["metrics"] and not problems
              and not left)
        lost += not same
        record("kill -9", f"trial {trial}: kill in {' then '.join(targets)}",
               f"landed in {' then '.join(fell)}; resume "
               + ("identical adapter and losses" if ok else "FAILED"), ok,
               targeted=targets, landed=fell, lost=int(not same), kills=len(targets))
        if not ok:
            failures.append(f"trial {trial} ({targets} -> {fell}): exit {res.status}, started "
                            f"{started}, same adapter {same}, same metrics "
                            f"{rows == setup['metrics']}, incomplete {problems}, temporaries "
                            f"{left}\n{res.stderr[-1500:]}")
    record("kill -9", "summary", f"{TRIALS} trials, {kills} kills, {lost} adapters lost",
           not failures and lost == 0, trials=TRIALS, kills=kills, lost=lost)
    assert not failures, "\n".join(failures)
