"""Run a user script twice, in fresh processes: as written for PEFT + TRL, and with lorakit's
imports.

A script is a template whose imports read `from {peft_lib} import ...` / `from {trl_lib} import
...` (or `{lib}`, for PEFT-only scripts); `{tests}` is this directory, for conftest's tiny models.
It gets its output directory and any further arguments on its command line, and prints one JSON
object as its last line of output; the lorakit run must not import peft or trl (unless allowed).
Used by test_peft_dropin.py and test_peft_scripts.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parent
LIBS = {
    "peft": {"lib": "peft", "peft_lib": "peft", "trl_lib": "trl"},
    "lorakit": {"lib": "lorakit", "peft_lib": "lorakit", "trl_lib": "lorakit"},
}
# one thread each: the two runs of a script share the machine's cores
ENV = {"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
TIMEOUT_S = 300
# appended to the lorakit run: it did all of that without importing these
NOT_IMPORTED = """
import sys as _sys
assert not {forbidden!r} & set(_sys.modules), "the lorakit run imported " + str({forbidden!r})
"""


def _start(template: str, lib: str, out: Path, argv: tuple,
           forbidden: frozenset = frozenset({"peft", "trl"})) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    script = out / f"script_{lib}.py"
    text = template.format(tests=str(TESTS), **LIBS[lib])
    if lib == "lorakit":
        text += NOT_IMPORTED.format(forbidden=set(forbidden))
    script.write_text(text)
    return subprocess.Popen([sys.executable, str(script), str(out), *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | ENV)


def _result(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def run_script(template: str, lib: str, out: Path, *argv) -> dict:
    """Run the script with `lib`'s imports ("peft" or "lorakit"); its JSON result."""
    return _result(_start(template, lib, out, argv))


def run_both(template: str, out: Path, *argv,
             forbidden: frozenset = frozenset({"peft", "trl"})) -> dict[str, dict]:
    """Run the script with PEFT/TRL imports in out/peft and lorakit's in out/lorakit, at the
    same time; {"peft": result, "lorakit": result}. The lorakit run must not have imported the
    `forbidden` modules."""
    procs = {lib: _start(template, lib, out / lib, argv, forbidden) for lib in LIBS}
    try:
        return {lib: _result(proc) for lib, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def max_abs_diff(dir_a: Path, dir_b: Path, name: str = "adapter_model.safetensors") -> float:
    """Largest |a - b| over the tensors of two safetensors files (the same keys, asserted)."""
    a, b = load_file(Path(dir_a) / name), load_file(Path(dir_b) / name)
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))[:5]
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def logits_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())
