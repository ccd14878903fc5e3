"""A full disk while a checkpoint, the final adapter or a merged export is written.

Simulated for real, in the writing process: RLIMIT_FSIZE in the forked `lorakit` run (writes
past the limit fail with EFBIG; SIGXFSZ is ignored), and, where the test may mount one, a small
tmpfs (ENOSPC). Expected: a one-line error naming the path, a non-zero exit, the previous
checkpoints byte for byte as they were, no temporaries, and `--resume` (with room again) ending
with the uninterrupted run's adapter.
"""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import write_sum_rows
import harness
from harness import checkpoint_problems, lorakit, one_line_error, record, temporaries, zygote

from lorakit.atomic import TMP_PREFIX

pytestmark = pytest.mark.default_model

STEPS = 6
ADAPTER = Path("adapter") / "adapter_model.safetensors"
# above what a run writes before its first checkpoint (config.yaml, run_config.json, metrics,
# its own stdout: ~3 KiB each), below an r=16 adapter file of the tiny model (~60 KiB)
LIMIT = 24 * 1024


def train_args(model: Path, data: Path, out: Path, *extra) -> list:
    return harness.train_args(model, data, out, STEPS, 3, *extra, r=16, alpha=16)


def digests(out: Path) -> dict[str, str]:
    """Every file of every checkpoint, hashed."""
    return {str(f.relative_to(out)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(out.glob("checkpoint-*/*"))}


@pytest.fixture(scope="module")
def setup(tiny_chat_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("disk-full")
    data = tmp / "train.jsonl"
    write_sum_rows(data, 30)
    ref = tmp / "reference"
    res = lorakit(tmp, *train_args(tiny_chat_dir, data, ref))
    assert res.status == 0, res.stderr[-2000:]
    assert (ref / ADAPTER).stat().st_size > LIMIT
    return {"model": tiny_chat_dir, "data": data, "tmp": tmp, "reference": ref,
            "adapter": (ref / ADAPTER).read_bytes()}


def check_full_disk(setup, out: Path, res, needle: str, before: dict[str, str], case: str,
                    fault: str) -> None:
    """The failed run's outcome, then a resume with room again; recorded, then asserted."""
    problems = []
    if (why := one_line_error(res, needle)) is not None:
        problems.append(f"{why}: {res.stderr[-1500:]}")
    if digests(out) != before:
        problems.append("the previous checkpoints changed")
    if (left := temporaries(out)):
        problems.append(f"temporaries left: {left}")
    problems += checkpoint_problems(out)
    again = lorakit(setup["tmp"], *train_args(setup["model"], setup["data"], out), "--resume")
    same = again.status == 0 and (out / ADAPTER).read_bytes() == setup["adapter"]
    if not same:
        problems.append(f"resume: exit {again.status}, adapter differs\n{again.stderr[-1500:]}")
    line = (res.error_lines() or ["(no error line)"])[0]
    record("disk full", case, f"exit {res.status}: {line!r}; resumed to the same adapter"
           if not problems else "; ".join(problems), not problems, fault=fault, lost=int(not same))
    assert not problems, "\n".join(problems)


def killed_after_checkpoint(setup, out: Path, step: int) -> None:
    """A run killed (-9) once checkpoint-`step` is written: a previous checkpoint to keep."""
    run = zygote(setup["tmp"]).spawn(train_args(setup["model"], setup["data"], out), setup["tmp"])
    while not (out / f"checkpoint-{step}").exists():
        assert run.poll() is None, "the run ended before the kill"
    run.kill(signal.SIGKILL)
    run.wait()


def test_file_size_limit_during_a_checkpoint(setup, tmp_path):
    out = tmp_path / "out"
    killed_after_checkpoint(setup, out, 2)
    before = digests(out)
    res = lorakit(setup["tmp"], *train_args(setup["model"], setup["data"], out), "--resume",
                  fsize=LIMIT)
    check_full_disk(setup, out, res, "cannot write", before,
                    "EFBIG (RLIMIT_FSIZE) while a checkpoint is written", "EFBIG")
    assert "checkpoint-" in res.error_lines()[0] and "File too large" in res.error_lines()[0]


def test_file_size_limit_during_the_final_adapter(setup, tmp_path):
    """The run had written its last checkpoint when it stopped; resuming writes the adapter."""
    out = tmp_path / "out"
    shutil.copytree(setup["reference"], out)
    for name in ("adapter", "report.md", "loss.png"):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    before = digests(out)
    res = lorakit(setup["tmp"], *train_args(setup["model"], setup["data"], out), "--resume",
                  fsize=LIMIT)
    assert not (out / "adapter").exists()
    check_full_disk(setup, out, res, f"cannot write {out / 'adapter'}", before,
                    "EFBIG (RLIMIT_FSIZE) while the final adapter is written", "EFBIG")


def test_file_size_limit_during_a_merged_export(setup, tmp_path):
    out = tmp_path / "merged"
    res = lorakit(setup["tmp"], "merge", "--model", setup["model"], "--adapter",
                  setup["reference"] / "adapter", "--output", out, "--dtype", "float32",
                  fsize=LIMIT)
    problems = [why] if (why := one_line_error(res, f"cannot write {out}")) else []
    if out.exists() or any(p.name.startswith(TMP_PREFIX) for p in tmp_path.iterdir()):
        problems.append(f"left behind: {sorted(p.name for p in tmp_path.iterdir())}")
    line = (res.error_lines() or ["(no error line)"])[0]
    record("disk full", "EFBIG (RLIMIT_FSIZE) while a merged model is exported",
           f"exit {res.status}: {line!r}; nothing written" if not problems else
           "; ".join(problems), not problems, fault="EFBIG", lost=0)
    assert not problems, "\n".join(problems) + res.stderr[-1500:]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 600 KiB tmpfs (room for two checkpoints of ~200 KiB), or a skip where none can be mounted."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)],
            capture_output=True).returncode != 0:
        record("disk full", "ENOSPC on a small tmpfs", "not run: no tmpfs can be mounted here",
               True, fault="ENOSPC", skipped=True)
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_no_space_left_on_a_small_tmpfs(setup, small_tmpfs):
    out = small_tmpfs / "out"
    res = lorakit(setup["tmp"], *train_args(setup["model"], setup["data"], out))
    assert res.status != 0, "the run fit into the tmpfs"
    before = digests(out)
    assert before, "the disk filled before the first checkpoint"
    # the user makes room, then continues the run
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_tmpfs)], check=True)
    check_full_disk(setup, out, res, "No space left on device", before,
                    "ENOSPC on a 600 KiB tmpfs, mid-run", "ENOSPC")
