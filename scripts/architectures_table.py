"""Print a markdown table of what target_modules="all-linear" adapts on every causal-LM
architecture the installed transformers ships: PEFT's counts and whether lorakit matches them.

Usage: .venv/bin/python scripts/architectures_table.py [> scripts/architectures_table.md]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from every_architecture import (  # noqa: E402
    EXPERT_TYPES,
    MODEL_TYPES,
    ExpertRow,
    Row,
    explicit_status,
    run,
    run_explicit,
)


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


def explicit_cell(row: ExpertRow) -> str:
    state = explicit_status(row)
    if state == "not run":
        return "not run: " + short(row.not_run)
    if state == "PEFT refuses":
        return "PEFT refuses: " + short(row.peft_error)
    if state == "crashes":
        return "lorakit raises: " + short(row.crash.strip().splitlines()[-1])
    if state == "differs":
        return (
            f"DIFFERS (max logit diff {row.logit_diff:.2g}, "
            f"{len(row.grad_mismatch)} gradients differ)"
        )
    return f"same as PEFT (max logit diff {row.logit_diff:.1g})"


def explicit_table(rows: list[ExpertRow]) -> str:
    """Explicit target_parameters on the types with transformers-described experts."""
    lines = [
        "## Explicit target_parameters (transformers-described experts)",
        "",
        "target_modules = one attention projection (q_proj) where there is one, "
        "target_parameters = the leaf names of the experts' 3-D weights; PEFT's random adapter "
        "(init_lora_weights=False) copied into lorakit; logits and gradients compared.",
        "",
        "| model type | experts class | target_modules | target_parameters "
        "| explicit target_parameters |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.model_type} | {row.experts_class} | {', '.join(row.target_modules)} "
            f"| {', '.join(row.target_parameters)} | {explicit_cell(row)} |"
        )
    states = ("same as PEFT", "differs", "crashes", "PEFT refuses", "not run")
    counts = {s: sum(explicit_status(r) == s for r in rows) for s in states}
    lines.append("")
    lines.append(
        f"{len(rows)} types with described experts: "
        + ", ".join(f"{n} {s}" for s, n in counts.items())
        + "."
    )
    return "\n".join(lines)


def main() -> None:
    print(table([run(t) for t in sorted(MODEL_TYPES)]))
    print()
    print(explicit_table([run_explicit(t) for t in EXPERT_TYPES]))


if __name__ == "__main__":
    main()
