"""The `lorakit` command, run as a user runs it (subprocesses), on a tiny model directory."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import yaml
from conftest import write_sum_rows
from transformers import AutoModelForCausalLM

from lorakit import LoraConfig, LoraModel, get_lora_model

pytestmark = pytest.mark.default_model  # the tiny model borrows SmolLM2's tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tiny_chat_dir) -> Path:
    return tiny_chat_dir


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data")
    write_sum_rows(path / "train.jsonl", 30)
    write_sum_rows(path / "eval.jsonl", 6, start=30)
    return path


def lorakit(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "lorakit", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tiny_dir, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    config = tmp_path_factory.mktemp("cfg") / "run.yaml"
    config.write_text(yaml.safe_dump({
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
        "training": {"learning_rate": "1e-3", "logging_steps": 1, "save_steps": 2},
        "output": {"samples": 2, "sample_max_new_tokens": 4}}))
    res = lorakit("train", "--config", config, "--model", tiny_dir, "--data", data / "train.jsonl",
                  "--eval-data", data / "eval.jsonl", "--output", out, "--max-steps", 4,
                  "--batch-size", 8, "--lora-r", 6)
    assert res.returncode == 0, res.stdout + res.stderr
    (out.parent / "stdout.txt").write_text(res.stdout)
    return out


def test_train_writes_everything(trained, tiny_dir):
    for name in ("config.yaml", "run_config.json", "metrics.jsonl", "loss.png", "report.md",
                 "adapter/adapter_config.json", "checkpoint-4/optimizer.safetensors"):
        assert (trained / name).exists(), name
    resolved = yaml.safe_load((trained / "config.yaml").read_text())
    assert resolved["lora"]["r"] == 6  # the flag beats the file
    assert resolved["training"]["learning_rate"] == 1e-3  # "1e-3" (a YAML string) coerced
    assert json.loads((trained / "adapter/adapter_config.json").read_text())["r"] == 6
    report = (trained / "report.md").read_text()
    assert "Before training" in report and "eval_loss" in report
    peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir),
                                   trained / "adapter")


def test_report_counts_the_printed_trainable_parameters(trained, tiny_dir):
    printed = re.search(r"^trainable params: ([\d,]+) \|\|", (trained.parent / "stdout.txt")
                        .read_text(), flags=re.M).group(1)
    actual = get_lora_model(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraConfig(
        r=6, lora_alpha=8, target_modules="all-linear")).get_nb_trainable_parameters()[0]
    assert printed == f"{actual:,}"
    assert f"- trainable parameters: {printed}\n" in (trained / "report.md").read_text()


def significant_digits(number: str) -> int:
    mantissa = number.lstrip("-").split("e")[0].replace(".", "")
    return len(mantissa.lstrip("0")) or 1


def test_console_shows_4_significant_digits_and_metrics_keep_all(trained):
    printed = {int(m[0]): m[1] for m in re.findall(r"^lorakit: step=(\d+) .*\blr=(\S+)",
                                                     (trained.parent / "stdout.txt").read_text(),
                                                     flags=re.M)}
    full = {r["step"]: r["lr"] for r in map(json.loads, (trained / "metrics.jsonl").read_text()
                                            .splitlines()) if "lr" in r}
    assert sorted(printed) == sorted(full) == [1, 2, 3, 4]
    assert any(significant_digits(repr(lr)) > 4 for lr in full.values())  # cosine: 0.00085355...
    for step, lr in full.items():
        assert significant_digits(printed[step]) <= 4 and float(printed[step]) == float(f"{lr:.4g}")


def test_resume_continues_the_run(trained, tiny_dir, data, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    res = lorakit("train", "--model", tiny_dir, "--data", data / "train.jsonl", "--output", out,
                  "--max-steps", 6, "--batch-size", 8, "--r", 6, "--alpha", 8, "--lr", "1e-3",
                  "--set", "training.logging_steps=1", "--set", "output.samples=0", "--resume")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resumed from" in res.stdout
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 6


def test_eval_generate_merge_and_inspect(trained, tiny_dir, data, tmp_path):
    res = lorakit("eval", "--model", tiny_dir, "--adapter", trained / "adapter", "--data",
                  data / "eval.jsonl", "--max-new-tokens", 4, "--json")
    assert res.returncode == 0, res.stderr
    metrics = json.loads(res.stdout)
    assert {"eval_loss", "eval_perplexity", "eval_token_accuracy", "exact_match"} <= set(metrics)

    # fp32: "auto" is bf16 on AVX-512-BF16/AMX CPUs, where a merge rounds the weights to bf16
    # and a near-tie in this random model's greedy choice can flip
    args = ["generate", "--model", tiny_dir, "--adapter", trained / "adapter", "--chat",
            "--max-new-tokens", 6, "--dtype", "float32", "2 plus 3?"]
    unmerged, merged = lorakit(*args), lorakit(*args, "--merged")
    assert unmerged.returncode == 0 and merged.returncode == 0, unmerged.stderr + merged.stderr
    assert unmerged.stdout == merged.stdout  # greedy: merging changes nothing

    res = lorakit("merge", "--model", tiny_dir, "--adapter", trained / "adapter", "--output",
                  tmp_path / "merged", "--dtype", "float32")
    assert res.returncode == 0, res.stderr
    merged_model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    lora = LoraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir),
                                     trained / "adapter")
    ids = torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(merged_model(input_ids=ids).logits, lora(input_ids=ids).logits,
                                   atol=1e-4, rtol=0)

    res = lorakit("inspect", trained / "adapter", "--json")
    info = json.loads(res.stdout)
    assert info["r"] == 6 and info["variant"] == "LoRA" and info["written_by"] == "lorakit"
    assert info["parameters"] > 0 and info["adapted_layers"] == 14


def test_inspect_reads_a_peft_adapter(tiny_dir, tmp_path):
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                                peft.LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj"],
                                                use_rslora=True))
    model.save_pretrained(tmp_path / "p")
    res = lorakit("inspect", tmp_path / "p")
    assert res.returncode == 0, res.stderr
    assert "LoRA + rsLoRA" in res.stdout and "peft" in res.stdout and "q_proj" in res.stdout


@pytest.mark.parametrize("args,needle", [
    (["train", "--data", "missing.jsonl", "--max-steps", "1"], "missing.jsonl"),
    (["train", "--data", "x.jsonl", "--set", "training.learning_rat=1"], "did you mean 'learning_rate'"),
    (["train", "--data", "x.jsonl", "--r", "0"], "r=0"),
    (["train", "--data", "x.jsonl", "--beta", "0.2"], "the objective is 'sft'"),
    (["train", "--data", "x.jsonl", "--objective", "kto", "--loss-type", "ipo"], "apo_zero"),
    (["inspect", "nowhere"], "not an adapter directory"),
])
def test_user_errors_are_one_line_and_exit_2(args, needle, tmp_path, tiny_dir):
    res = lorakit(*args, "--model", tiny_dir, cwd=tmp_path) if args[0] == "train" \
        else lorakit(*args, cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("lorakit: error:")]
    assert len(errors) == 1 and needle in errors[0], res.stderr
    assert "Traceback" not in res.stderr


def test_adapter_for_another_base_is_a_clear_error(trained, tiny_dir, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    other = tmp_path / "other"
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=48,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    res = lorakit("generate", "--model", other, "--adapter", trained / "adapter", "hi")
    assert res.returncode == 2
    assert "another base model" in res.stderr and "_proj" in res.stderr
    debug = lorakit("--debug", "generate", "--model", other, "--adapter", trained / "adapter", "hi")
    assert "Traceback" in debug.stderr


def truncated(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:-100])


def corrupt_header(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[8:40] = b"\xff" * 32  # the JSON header starts after its 8-byte length
    file.write_bytes(bytes(data))


def not_a_checkpoint(file: Path) -> None:
    file.unlink()
    (file.parent / "adapter_model.bin").write_bytes(b"not a pickle\n")


@pytest.mark.parametrize("spoil,command,needle", [
    (truncated, "generate", "adapter_model.safetensors: not a readable safetensors file"),
    (truncated, "inspect", "adapter_model.safetensors: not a readable safetensors file"),
    (truncated, "eval", "adapter_model.safetensors: not a readable safetensors file"),
    (truncated, "merge", "adapter_model.safetensors: not a readable safetensors file"),
    (corrupt_header, "generate", "adapter_model.safetensors: not a readable safetensors file"),
    (corrupt_header, "inspect", "adapter_model.safetensors: not a readable safetensors file"),
    (not_a_checkpoint, "generate", "adapter_model.bin: a pickle, which lorakit does not load"),
    (not_a_checkpoint, "inspect", "adapter_model.bin: a pickle, which lorakit does not load"),
])
def test_unreadable_adapter_files_are_one_line_errors(spoil, command, needle, trained, tiny_dir,
                                                      data, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(trained / "adapter", adapter)
    spoil(adapter / "adapter_model.safetensors")
    args = {"generate": ["generate", "--model", tiny_dir, "--adapter", adapter, "hi"],
            "inspect": ["inspect", adapter],
            "eval": ["eval", "--model", tiny_dir, "--adapter", adapter, "--data",
                     data / "eval.jsonl", "--no-generate"],
            "merge": ["merge", "--model", tiny_dir, "--adapter", adapter, "--output",
                      tmp_path / "merged"]}[command]
    assert_one_line_error(lorakit(*args), needle)


def test_output_naming_an_existing_file_is_a_one_line_error(tiny_dir, data, tmp_path):
    (tmp_path / "taken").write_text("a file, not a directory\n")
    res = lorakit("train", "--model", tiny_dir, "--data", data / "train.jsonl", "--output",
                  tmp_path / "taken", "--max-steps", 1)
    assert_one_line_error(res, "taken exists and is not a directory")


def assert_one_line_error(res: subprocess.CompletedProcess, needle: str) -> None:
    assert res.returncode == 2, res.stdout + res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("lorakit: error")]
    assert len(errors) == 1 and needle in errors[0], res.stderr
    assert "Traceback" not in res.stderr
