"""bench/device_check.py, run as a user runs it, on the CPU with the tiny model: it keeps working
between the (rare) runs on a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("trl")
pytest.importorskip("bitsandbytes")

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "device_check.py"


def test_device_check_cpu_passes():
    args = ["--device", "cpu", "--dtype", "float32", "--train-steps", "2", "--bench-steps", "2",
            "--new-tokens", "4", "--repeats", "1"]
    res = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                         timeout=300)
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-3000:]
    verdicts = [line.split()[-1] for line in out.splitlines() if line.endswith(("PASS", "FAIL"))]
    # PEFT parity (6 fp32 + 4 bf16), DEVICE vs CPU (3 LoRA + 3 QLoRA)
    assert verdicts == ["PASS"] * 16, out
    assert "device_check: 0 of 16 checks failed" in out
    for figure in ("train fp32 ratio lorakit/TRL+PEFT", "decode fp32 ratio lorakit/PEFT"):
        assert figure in out, out
