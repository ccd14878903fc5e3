"""Render tests/RELIABILITY.md from what the fault suite recorded: `make reliability`.

    python tests/reliability/render.py build/reliability tests/RELIABILITY.md

Reads build/reliability/results.jsonl (one JSON record per fault or input tried, written by
harness.record) and build/reliability/junit.xml (pytest's per-test outcomes and times). Nothing
in the report is typed by hand: every number and line comes from those two files.

Adding a category: tests call `record(category, case, outcome, ok, lost=..., **details)`; a
category listed in CATEGORIES gets its own section (in that order), any other one a generic
section at the end. SERVER_CATEGORIES is the hook for `lorakit serve`'s faults and bad inputs:
they show as "not measured yet" until tests record under those names.
"""

from __future__ import annotations

import collections
import json
import re
import sys
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

CATEGORIES = {  # record category -> section title and what was done
    "kill -9": ("kill -9 at random moments of `lorakit train`",
                "Each trial kills the run (SIGKILL) at a seeded random moment of a chosen "
                "phase, some trials a second time during the resumed run; then `--resume` runs "
                "to the end. Expected: every checkpoint on disk complete, the adapter whole or "
                "absent, `--resume` starts, the final adapter bit-identical to the "
                "uninterrupted run's (CPU, fp32) with the same losses, no temporaries left."),
    "disk full": ("Disk full while writing",
                  "RLIMIT_FSIZE in the writing process (EFBIG) and a small tmpfs (ENOSPC). "
                  "Expected: one error line naming the path, non-zero exit, earlier "
                  "checkpoints byte for byte unchanged, no temporaries, `--resume` with room "
                  "again ends with the uninterrupted run's adapter."),
    "NaN / inf": ("NaN / inf loss",
                  "Expected: the run stops at the step, naming it (exit 2; "
                  "TrainingDivergedError from the API), before the weights change; or skips "
                  "the batch with `training.nonfinite=skip`; the checkpoint before it "
                  "resumes."),
    "bad input": ("Bad inputs (CLI and Python API)",
                  "Expected: exit status 2, one `lorakit: error` line naming the file / key / "
                  "value and what is expected, no traceback, nothing written; the API raises "
                  "the exception type of that kind of mistake, with the same message."),
    "security": ("Security", "Pickle, remote code, network and path escapes."),
}
SERVER_CATEGORIES = {  # hook: lorakit serve's fault suite records under these names
    "server faults": ("Server faults", "Disconnects mid-stream, bursts beyond the queue, "
                      "adapters that fail to load, SIGTERM under load."),
    "server bad input": ("Server bad inputs", "Malformed requests: the OpenAI error shape "
                         "with the right status."),
}


def read(results_dir: Path) -> tuple[list[dict], dict]:
    records = []
    path = results_dir / "results.jsonl"
    if path.is_file():
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    tests = {"passed": 0, "failed": 0, "skipped": 0, "seconds": 0.0, "failures": []}
    junit = results_dir / "junit.xml"
    if junit.is_file():
        root = ET.parse(junit).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        for suite in suites:
            tests["seconds"] += float(suite.get("time", 0))
            for case in suite.iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    tests["failed"] += 1
                    tests["failures"].append(f"{case.get('classname')}::{case.get('name')}")
                elif case.find("skipped") is not None:
                    tests["skipped"] += 1
                else:
                    tests["passed"] += 1
    return records, tests


# a test's temporary directory, e.g. /tmp/pytest-of-root/pytest-130/test_bad_input_x0/
_TMP = re.compile(r"/\S*?/pytest-\d+/[^/\s']+/")


def cell(text: object) -> str:
    """A table cell: one line, pipes escaped, pytest's temporary directories as '…/'."""
    return _TMP.sub("…/", str(text)).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[object]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]


def summary_rows(records: list[dict]) -> list[list[object]]:
    by = collections.defaultdict(list)
    for r in records:
        if r["case"] != "summary":
            by[r["category"]].append(r)
    rows = []
    for key in [*CATEGORIES, *SERVER_CATEGORIES, *sorted(set(by) - set(CATEGORIES)
                                                          - set(SERVER_CATEGORIES))]:
        rs = by.get(key, [])
        title = (CATEGORIES | SERVER_CATEGORIES).get(key, (key,))[0]
        if not rs:
            rows.append([title, "not measured yet", "", ""])
            continue
        ran = [r for r in rs if not r.get("skipped")]
        tried = sum(r.get("kills", 1) for r in ran) if key == "kill -9" else len(ran)
        unit = "kills" if key == "kill -9" else "cases"
        rows.append([title, f"{tried} {unit}" + (f" ({len(ran)} trials)" if key == "kill -9"
                                                 else ""),
                     f"{sum(r['ok'] for r in ran)} of {len(ran)}",
                     sum(int(r.get("lost", 0)) for r in ran)])
    return rows


def kill_section(rs: list[dict]) -> list[str]:
    trials = [r for r in rs if r["case"] != "summary"]
    targeted = collections.Counter(p for r in trials for p in r.get("targeted", []))
    landed = collections.Counter(p for r in trials for p in r.get("landed", []))
    out = [f"{len(trials)} trials, {sum(r.get('kills', 1) for r in trials)} kills aimed, "
           f"{sum(1 for r in trials for p in r.get('landed', []) if p != 'finished first')} "
           f"landed in a running process; adapters lost: "
           f"{sum(int(r.get('lost', 0)) for r in trials)}.", ""]
    phases = sorted(set(targeted) | set(landed), key=lambda p: (-landed[p], p))
    out += table(["phase", "kills aimed at it", "kills that landed in it (from what was left)"],
                 [[p, targeted[p], landed[p]] for p in phases])
    out += ["", *table(["trial", "outcome", "as expected"],
                       [[r["case"], r["outcome"], "yes" if r["ok"] else "**no**"]
                        for r in trials])]
    return out


def bad_input_section(rs: list[dict]) -> list[str]:
    kinds = collections.defaultdict(list)
    for r in rs:
        kinds[r.get("kind", "?")].append(r)
    out = table(["kind", "cases", "as expected", "API exception types"],
                [[k, len(v), sum(r["ok"] for r in v),
                  ", ".join(sorted({r["api"] for r in v if r.get("api") not in
                                    (None, "no error", "not applicable")}))]
                 for k, v in kinds.items()])
    out += ["", *table(["case", "kind", "expected", "CLI exit", "the error line", "outcome"],
                       [[r["case"], r.get("kind"), r.get("expected"), r.get("exit"),
                         f"`{r['message']}`" if r.get("message") else "",
                         "as expected" if r["ok"] else f"**{r['outcome']}**"]
                        for r in rs])]
    return out


def generic_section(rs: list[dict]) -> list[str]:
    return table(["case", "outcome", "as expected"],
                 [[r["case"], r["outcome"], "yes" if r["ok"] else "**no**"] for r in rs
                  if r["case"] != "summary"])


def render(records: list[dict], tests: dict, machine: str) -> str:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# lorakit reliability report", "",
             "Written by `make reliability` from the outcomes the fault suite (tests/reliability/)"
             " recorded; regenerate it, do not edit it.", "",
             f"- run: {now}; {tests['passed']} tests passed, {tests['failed']} failed, "
             f"{tests['skipped']} skipped, in {tests['seconds']:.0f} s",
             f"- machine: {machine}"]
    if tests["failures"]:
        lines.append(f"- failed tests: {', '.join(tests['failures'])}")
    lost = sum(int(r.get("lost", 0)) for r in records if r["case"] != "summary")
    lines += [f"- anything lost (adapters or checkpoints not recovered): **{lost}**", "",
              "## Summary", "",
              *table(["category", "tried", "as expected", "lost"], summary_rows(records)), ""]
    by = collections.defaultdict(list)
    for r in records:
        by[r["category"]].append(r)
    sections = [*CATEGORIES, *SERVER_CATEGORIES, *sorted(set(by) - set(CATEGORIES)
                                                          - set(SERVER_CATEGORIES))]
    for key in sections:
        title, what = (CATEGORIES | SERVER_CATEGORIES).get(key, (key, ""))
        lines += [f"## {title}", "", what, ""] if what else [f"## {title}", ""]
        rs = by.get(key, [])
        if not rs:
            lines += ["Not measured yet: no test recorded under "
                      f"`{key}`.", ""]
            continue
        if key == "kill -9":
            lines += kill_section(rs)
        elif key == "bad input":
            lines += bad_input_section(rs)
        else:
            lines += generic_section(rs)
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    results_dir, target = Path(argv[1]), Path(argv[2])
    records, tests = read(results_dir)
    try:
        from lorakit.base.loading import machine_summary
        machine = machine_summary()
    except Exception as e:  # the report still says what ran
        machine = f"unknown ({type(e).__name__})"
    target.write_text(render(records, tests, machine))
    print(f"wrote {target}: {len(records)} records, {tests['passed']} passed, "
          f"{tests['failed']} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
