"""A longer kill -9 soak than the fault suite's 20 trials: the same trials (tests/reliability/
test_kill.py: kill `lorakit train` at a seeded random moment of a chosen phase, sometimes twice,
then `--resume`, and compare with the uninterrupted run), as many as asked, with another seed.

    .venv/bin/python bench/soak.py --trials 200 --seed 1      # about 10 s per trial here

Prints trials, kills and adapters lost (the target: 0) from the records the trials write.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "results.jsonl"
        env = {**os.environ, "LORAKIT_KILL_TRIALS": str(args.trials),
               "LORAKIT_KILL_SEED": str(args.seed), "LORAKIT_RELIABILITY_RESULTS": str(results)}
        test = "tests/reliability/test_kill.py::test_kill_9_at_random_moments_then_resume"
        status = subprocess.run([sys.executable, "-m", "pytest", test, "-q"], cwd=REPO,
                                env=env).returncode
        rows = [json.loads(line) for line in results.read_text().splitlines()] \
            if results.is_file() else []
    summary = next((r for r in rows if r["case"] == "summary"), None)
    failed = [r["case"] for r in rows if r["case"] != "summary" and not r["ok"]]
    if summary:
        print(f"soak: seed {args.seed}: {summary['trials']} trials, {summary['kills']} kills, "
              f"{summary['lost']} adapters lost, {len(failed)} trials not as expected")
    for case in failed:
        print(f"  not as expected: {case}")
    return status


if __name__ == "__main__":
    sys.exit(main())
