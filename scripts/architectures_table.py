"""Print a markdown table of what target_modules="all-linear" adapts on every causal-LM
architecture the installed transformers ships: PEFT's counts and whether lorakit matches them.

Usage: .venv/bin/python scripts/architectures_table.py [> scripts/architectures_table.md]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from every_architecture import MODEL_TYPES, Row, run  # noqa: E402


def short(text: str, width: int = 90) -> str:
    """One table cell: a single line, pipes escaped, at most `width` characters."""
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def lorakit_cell(row: Row) -> str:
    if row.crash:
        return "CRASH: " + short(row.crash.strip().splitlines()[-1])
    if row.refused:
        return "refused (" + short(row.refused.removeprefix("ConfigError: ")) + ")"
    if row.peft_error:
        return "adapts; PEFT refuses"
    same = row.lorakit_keys == row.peft_keys
    return "same as PEFT" if same else "DIFFERENT from PEFT"


def status(row: Row) -> str:
    """`not built` / `refused` / `same` / `failure`, for the summary line."""
    if not row.built:
        return "not built"
    if row.refused:
        return "refused"
    if not row.crash and not row.peft_error and row.lorakit_keys == row.peft_keys:
        return "same"
    return "failure"


def table(rows: list[Row]) -> str:
    """The markdown table and its summary line."""
    lines = [
        "| model type | built? | PEFT adapts (linear modules, expert parameters, routers) "
        "| lorakit |",
        "|---|---|---|---|",
    ]
    for row in rows:
        if not row.built:
            lines.append(f"| {row.model_type} | not built: {short(row.reason)} | | |")
            continue
        linear, experts, routers = row.peft_counts
        peft_cell = (
            f"PEFT raises: {short(row.peft_error)}"
            if row.peft_error
            else f"{linear}, {experts}, {routers}"
        )
        lines.append(f"| {row.model_type} | yes | {peft_cell} | {lorakit_cell(row)} |")
    counts = {
        s: sum(status(r) == s for r in rows) for s in ("not built", "same", "refused", "failure")
    }
    built = len(rows) - counts["not built"]
    lines.append("")
    lines.append(
        f"{len(rows)} model types, {built} built (2 layers, tiny sizes, random weights); "
        f"lorakit: {counts['same']} same as PEFT, {counts['refused']} refused, "
        f"{counts['failure']} differ or crash."
    )
    return "\n".join(lines)


def main() -> None:
    print(table([run(t) for t in sorted(MODEL_TYPES)]))


if __name__ == "__main__":
    main()
