"""`lorakit train` flags survive torchrun's own parser, which prefix-matches every argument (even
those after the script name): `--r` would be read as an abbreviation of `--rdzv-backend`, ..."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shlex
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from lorakit.cli import SINGLE_PROCESS_ALIASES, build_parser

ROOT = Path(__file__).resolve().parents[1]


def train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def train_options() -> dict[str, argparse.Action]:
    return {s: a for a in train_parser()._actions for s in a.option_strings}


def torchrun_passes(flag: str, value: str) -> bool:
    """Whether torchrun hands `train FLAG VALUE` to the script untouched."""
    argv = ["--nproc_per_node", "2", "-m", "lorakit", "train", flag, value]
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = get_args_parser().parse_args(argv)
    except SystemExit:  # argparse's error: "ambiguous option", "expected one argument", ...
        return False
    return args.training_script_args == ["train", flag, value]


def example_value(action: argparse.Action) -> str:
    return str(next(iter(action.choices))) if action.choices else "1"


def readme_train_flags() -> list[str]:
    """Every --flag given to `lorakit train` in the README's code blocks."""
    # the text between a fence line and the next one: the odd pieces of a split on fences
    blocks = re.split(r"^```.*$", (ROOT / "README.md").read_text(), flags=re.M)[1::2]
    flags = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0]
            if "lorakit train" not in line:
                continue
            words = shlex.split(line.split("lorakit train", 1)[1])
            flags += [w.split("=", 1)[0] for w in words if w.startswith("--")]
    return flags


def test_every_train_flag_but_the_listed_aliases_passes_torchrun():
    options = train_options()
    assert set(SINGLE_PROCESS_ALIASES) <= set(options)  # the list names real aliases...
    for alias, name in SINGLE_PROCESS_ALIASES.items():  # ...of a torchrun-safe spelling
        assert options[alias] is options[name], alias
    failing = [flag for flag, action in options.items()
               if flag not in SINGLE_PROCESS_ALIASES
               and not torchrun_passes(flag, example_value(action))]
    assert not failing, f"torchrun takes these `lorakit train` flags for its own: {failing}"
    assert not torchrun_passes("--r", "4")  # the reason for the list: still true of torchrun


def test_readme_shows_only_torchrun_safe_train_flags():
    flags = readme_train_flags()
    assert {"--lora-r", "--lora-alpha", "--config", "--output"} <= set(flags)
    options = train_options()
    for flag in flags:
        assert flag in options, f"README: `lorakit train {flag}` is not a train flag"
        assert flag not in SINGLE_PROCESS_ALIASES, f"README shows the alias {flag}"
        assert torchrun_passes(flag, example_value(options[flag])), flag


@pytest.mark.slow
@pytest.mark.default_model  # the tiny model borrows SmolLM2's tokenizer
def test_cli_under_torchrun_takes_lora_flags(tmp_path, tiny_chat_dir):
    from conftest import write_sum_rows
    from test_distributed import torchrun
    model_dir = tiny_chat_dir
    data = tmp_path / "train.jsonl"
    write_sum_rows(data, 16)
    out = tmp_path / "out"
    log = torchrun("-m", "lorakit", "train", "--model", model_dir, "--data", data, "--output", out,
                   "--lora-r", 4, "--lora-alpha", 8, "--lora-dropout", 0, "--max-steps", 2,
                   "--batch-size", 2, "--set", "output.samples=0", timeout=300)
    assert log.count("lorakit: finished step 2") == 1, log[-3000:]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0)
