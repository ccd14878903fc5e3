"""The bad-input corpus: each mistake a user can make, through the CLI and the Python API.

One table (CASES), one row per input: how to build it, the command, the API call, the expected
exception type and the text the message must hold (the file, key or value, and what is
expected). CLI: exit status 2, exactly one `lorakit: error` line holding that text, no
traceback, and nothing written (the files under the case's directory are byte for byte as
before, no temporaries). API: that exception type (a UserError), with the same text. A few rows
are inputs that must work (rows longer than max_length are truncated, not refused).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import write_sum_rows
from harness import lorakit, one_line_error, record, temporaries
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lorakit import LoraConfig, LoraModel, SFTTrainer, TrainConfig, get_lora_model, load_model
from lorakit.base.loading import ModelFileError, ModelNotFoundError
from lorakit.data import DataError, load_records
from lorakit.data.errors import DataFileNotFoundError
from lorakit.errors import (
    ConfigError,
    InputNotFoundError,
    OutputExistsError,
    UserError,
    WriteError,
)
from lorakit.lora.files import AdapterFileError, AdapterMismatchError
from lorakit.recipes import SFTRecipe
from lorakit.training.checkpoint import CheckpointError
from lorakit.training.run_config import run_config

pytestmark = pytest.mark.default_model

TRAIN_SETS = ["--set", "output.samples=0", "--set", "training.bf16=false",
              "--set", "training.save_steps=1", "--set", "training.logging_steps=1"]


@dataclass
class World:
    """What every case may use: the tiny model, good data, a finished run, another base."""

    model: Path
    data: Path
    run: Path  # a finished 2-step run: run/adapter, run/checkpoint-{1,2}
    other_base: Path  # another architecture (hidden size 64), same tokenizer
    tokenizer: Any
    tmp: Path

    def train(self, data: Path | None = None, out: Path | None = None, *extra: Any) -> list:
        return ["train", "--model", self.model, "--data", data or self.data, "--output",
                out or self.tmp / "unused-out", "--max-steps", 2, "--batch-size", 4,
                "--lora-r", 4, "--lora-alpha", 8, *TRAIN_SETS, *extra]

    def config(self, data: Path | None = None, out: Path | None = None, **sections) -> Any:
        """The run config `train(...)` builds, for the API, with `sections` on top."""
        sets = [f"{s}.{k}={json.dumps(v)}" for s, kv in sections.items() for k, v in kv.items()]
        flags = {"--model": str(self.model), "--data": str(data or self.data),
                 "--output": str(out or self.tmp / "unused-out"), "--max-steps": 2,
                 "--batch-size": 4, "--lora-r": 4, "--lora-alpha": 8}
        base = ["output.samples=0", "training.bf16=false", "training.save_steps=1"]
        return run_config(None, flags, base + sets)

    def lora(self, base: Path | None = None) -> Any:
        return get_lora_model(AutoModelForCausalLM.from_pretrained(base or self.model),
                              LoraConfig(r=4, lora_alpha=8))

    def trainer(self, data: Any, **train) -> SFTTrainer:
        return SFTTrainer(self.lora(), TrainConfig(output_dir=str(self.tmp / "api-out"),
                                                   max_steps=1, **train),
                          train_data=data, tokenizer=self.tokenizer)


@dataclass
class Case:
    name: str
    kind: str  # what the mistake is about: data, config, paths, adapter/model files, resume
    error: type[Exception] | None  # what the API raises; None: the input must work
    needle: Callable[[Path, World], str] | str  # in the message (CLI and API)
    cli: Callable[[Path, World], list]
    api: Callable[[Path, World], Any] | None = None
    setup: Callable[[Path, World], Any] = lambda d, w: None
    notes: str = ""
    tags: list[str] = field(default_factory=list)


def text(name: str, content: str | bytes) -> Callable[[Path, World], None]:
    def make(d: Path, w: World) -> None:
        path = d / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return make


def rows(name: str, *items: Any) -> Callable[[Path, World], None]:
    return text(name, "".join(json.dumps(r) + "\n" for r in items))


def chat(user: str, answer: str | None = "4") -> dict:
    msgs = [{"role": "user", "content": user}]
    return {"messages": msgs + ([{"role": "assistant", "content": answer}] if answer else [])}


def yaml_file(content: Any) -> Callable[[Path, World], None]:
    return text("run.yaml", content if isinstance(content, str) else yaml.safe_dump(content))


def data_case(name: str, make, file: str, needle, error=DataError, **kw) -> Case:
    """A training-data mistake: `lorakit train --data FILE`, and load_records(FILE)."""
    return Case(name, "data", error, needle, setup=make,
                cli=lambda d, w: w.train(d / file, d / "out"),
                api=lambda d, w: load_records(d / file), **kw)


def config_case(name: str, needle, sets=None, yaml_content=None, api=None) -> Case:
    """A config mistake, by --set items or a YAML file; the API reads the same."""
    sets = sets or []

    def cli(d: Path, w: World) -> list:
        extra = ["--config", d / "run.yaml"] if yaml_content is not None else []
        return w.train(None, d / "out", *extra, *[a for s in sets for a in ("--set", s)])

    def via_api(d: Path, w: World) -> Any:
        return run_config(d / "run.yaml" if yaml_content is not None else None, {}, sets)

    return Case(name, "config", ConfigError, needle, cli=cli, api=api or via_api,
                setup=yaml_file(yaml_content) if yaml_content is not None else lambda d, w: None)


# ----------------------------------------------------------------------- adapter / run spoilers


def copy_adapter(d: Path, w: World) -> Path:
    shutil.copytree(w.run / "adapter", d / "adapter")
    return d / "adapter"


def spoil_adapter(how: Callable[[Path], None]) -> Callable[[Path, World], None]:
    def make(d: Path, w: World) -> None:
        how(copy_adapter(d, w))
    return make


def truncate(file: Path, keep: int | None = None) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: keep if keep is not None else len(data) - 100])


def corrupt_header(adapter: Path) -> None:
    data = bytearray((adapter / "adapter_model.safetensors").read_bytes())
    data[8:40] = b"\xff" * 32
    (adapter / "adapter_model.safetensors").write_bytes(bytes(data))


def to_pickle(adapter: Path) -> None:
    tensors = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(tensors, adapter / "adapter_model.bin")


class _Payload:
    """Unpickling this runs a command: a torch.load without weights_only would create `flag`."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __reduce__(self):
        return (os.system, (f"touch {self.flag}",))


def malicious_pickle(adapter: Path) -> None:
    (adapter / "adapter_model.safetensors").unlink()
    with open(adapter / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Payload(adapter.parent / "PWNED")}, f)


def edit_config(**changes: Any) -> Callable[[Path], None]:
    def how(adapter: Path) -> None:
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps(cfg | changes))
    return how


def nan_tensor(adapter: Path) -> None:
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})


def copy_run(d: Path, w: World) -> Path:
    shutil.copytree(w.run, d / "run")
    return d / "run"


def model_dir(how: Callable[[Path], None]) -> Callable[[Path, World], None]:
    def make(d: Path, w: World) -> None:
        shutil.copytree(w.model, d / "model")
        how(d / "model")
    return make


def generate(adapter: str = "adapter", *extra: Any) -> Callable[[Path, World], list]:
    return lambda d, w: ["generate", "--model", w.model, "--adapter", d / adapter, *extra, "hi"]


def from_pretrained(adapter: str = "adapter", **kw: Any) -> Callable[[Path, World], Any]:
    return lambda d, w: LoraModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(w.model), d / adapter, **kw)


def resume(d: Path, w: World, base: Path | None = None, **sections) -> Any:
    """The API's --resume: the recipe on the copied run."""
    cfg = w.config(out=d / "run", **sections)
    if base is not None:
        cfg.model.name_or_path = str(base)
    return SFTRecipe(cfg, echo_config=False, resume=True).setup().train()


def read_only_dir(d: Path, w: World) -> None:
    """A directory no one may write into: a read-only tmpfs where this test runs as root
    (root ignores permission bits), else mode 0555."""
    ro = d / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)],
                      capture_output=True).returncode != 0:
        pytest.skip("running as root without a read-only mount: permissions cannot be tested")


LONG = {"prompt": "a " * 200, "completion": "b"}

CASES: list[Case] = [
    # ---------------------------------------------------------------------------------- data
    data_case("malformed JSONL (line 3)", text("x.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": \n'),
              "x.jsonl", "x.jsonl line 3: malformed JSON"),
    data_case("empty file", text("x.jsonl", ""), "x.jsonl", "x.jsonl: empty, no records"),
    data_case("blank lines only", text("x.jsonl", "\n \n\n"), "x.jsonl", "empty, no records"),
    data_case("JSON list with extra data after it", text("x.json", '[{"text": "a"}] {"b": 1}'),
              "x.json", "x.json line 1: malformed JSON: extra data after the list"),
    data_case("text field is a number", rows("x.jsonl", {"text": "ok"}, {"text": 5}), "x.jsonl",
              "x.jsonl line 2: field 'text' must be a string, got int"),
    data_case("messages is a string", rows("x.jsonl", {"messages": "hello"}), "x.jsonl",
              "field 'messages' must be a list of {role, content} dicts, got str"),
    data_case("message without content", rows("x.jsonl", {"messages": [{"role": "user"}]}),
              "x.jsonl", "x.jsonl line 1: field 'messages': message 0 has no 'content'"),
    data_case("prompt a string, completion a list",
              rows("x.jsonl", {"prompt": "2+2?", "completion": [{"role": "assistant",
                                                                "content": "4"}]}),
              "x.jsonl", "must both be strings or both lists"),
    data_case("unknown format (question/answer)", rows("x.jsonl", {"question": "q", "answer": "a"}),
              "x.jsonl", "cannot tell the data format from the fields ['answer', 'question']"),
    data_case("unsupported file type .txt", text("x.txt", "hello\n"), "x.txt",
              "x.txt: unsupported file type '.txt'"),
    data_case("not UTF-8 (Latin-1 bytes)", text("x.jsonl", '{"text": "caf\xe9"}\n'.encode("latin-1")),
              "x.jsonl", "x.jsonl: not UTF-8 text"),
    data_case("a row that is a list", text("x.jsonl", '{"text": "a"}\n["text", "b"]\n'), "x.jsonl",
              "x.jsonl line 2: expected an object with named fields, got list"),
    data_case("CSV row with a missing field", text("x.csv", "prompt,completion\na,b\nc\n"), "x.csv",
              "x.csv line 3: 1 fields, but the header has 2"),
    data_case("CSV with duplicate column names", text("x.csv", "text,text\na,b\n"), "x.csv",
              "x.csv line 1: duplicate column names"),
    data_case("chat row without an assistant turn", rows("x.jsonl", chat("2+2?"), chat("1+1?", None)),
              "x.jsonl", "x.jsonl line 2: field 'messages' has no assistant message"),
    data_case("chat completion without an assistant turn",
              rows("x.jsonl", {"prompt": [{"role": "user", "content": "hi"}],
                               "completion": [{"role": "user", "content": "again"}]}),
              "x.jsonl", "field 'completion' has no assistant message"),
    data_case("a directory that is not a saved dataset", lambda d, w: (d / "dir").mkdir(), "dir",
              "a directory, but not one written by datasets' save_to_disk"),
    data_case("missing data file", lambda d, w: None, "missing.jsonl",
              "missing.jsonl: no such file", error=DataFileNotFoundError),
    Case("every row longer than max_length (nothing left to train)", "data", DataError,
         lambda d, w: f"train data ({d / 'x.jsonl'}) has no usable rows: every row is cut to "
         "its prompt at max_length=8", setup=rows("x.jsonl", LONG, LONG),
         cli=lambda d, w: w.train(d / "x.jsonl", d / "out", "--max-length", 8),
         api=lambda d, w: w.trainer(d / "x.jsonl", max_length=8)),
    Case("some rows longer than max_length: truncated, counted, trained", "data", None,
         "1 truncated", setup=lambda d, w: (d / "x.jsonl").write_text(
             w.data.read_text() + json.dumps(LONG) + "\n"),
         cli=lambda d, w: w.train(d / "x.jsonl", d / "out", "--max-length", 64),
         api=lambda d, w: w.trainer(d / "x.jsonl", max_length=64)),
    Case("forced format that the rows are not", "data", DataError,
         "missing field 'instruction'", setup=lambda d, w: None,
         cli=lambda d, w: w.train(None, d / "out", "--set", "training.dataset_format=alpaca"),
         api=lambda d, w: w.trainer(w.data, dataset_format="alpaca")),
    Case("malformed eval data", "data", DataError, "eval.jsonl line 1: malformed JSON",
         setup=text("eval.jsonl", "{oops\n"),
         cli=lambda d, w: w.train(None, d / "out", "--eval-data", d / "eval.jsonl"),
         api=lambda d, w: load_records(d / "eval.jsonl")),
    # -------------------------------------------------------------------------------- config
    config_case("unknown key (typo) in --set", "unknown key 'learning_rat' in section 'training' "
                "(did you mean 'learning_rate'?)", sets=["training.learning_rat=1e-4"]),
    config_case("unknown key in the YAML file", "run.yaml: lora.rank: unknown key 'rank'",
                yaml_content={"lora": {"rank": 8}}),
    config_case("unknown section", "unknown section 'trainer' (did you mean 'training'?)",
                yaml_content={"trainer": {"max_steps": 3}}),
    config_case("not YAML", "run.yaml: not valid YAML", yaml_content="training: [1, 2\n"),
    config_case("YAML that is a list", "run.yaml: expected sections",
                yaml_content="- training\n- lora\n"),
    config_case("a word where a number goes", "training.max_steps: expected an integer, "
                "got 'ten'", sets=["training.max_steps=ten"]),
    config_case("a fraction where an integer goes", "training.seed: expected an integer, got 4.5",
                sets=["training.seed=4.5"]),
    config_case("a word where true/false goes", "training.packing: expected true or false, "
                "got 'maybe'", sets=["training.packing=maybe"]),
    config_case("a number where a string goes", "training.lr_scheduler_type: expected a string, "
                "got 5", sets=["training.lr_scheduler_type=5"]),
    config_case("rank not an integer", "--set lora.r: expected an integer, got 4.5",
                sets=["lora.r=4.5"]),
    config_case("rank 0", "LoraConfig.r=0 is invalid: must be an integer >= 1",
                sets=["lora.r=0"]),
    config_case("dropout of 1.5", "LoraConfig.lora_dropout=1.5 is invalid: must be a number in "
                "[0, 1)", sets=["lora.lora_dropout=1.5"]),
    config_case("negative learning rate", "TrainConfig.learning_rate=-0.001 is invalid: must be "
                "> 0", sets=["training.learning_rate=-1e-3"]),
    config_case("warmup_ratio of 1", "TrainConfig.warmup_ratio=1.0 is invalid",
                sets=["training.warmup_ratio=1"]),
    config_case("batch size 0", "TrainConfig.per_device_train_batch_size=0 is invalid",
                sets=["training.per_device_train_batch_size=0"]),
    config_case("no length at all (0 steps, 0 epochs)", "set max_steps > 0 or num_train_epochs",
                sets=["training.max_steps=-1", "training.num_train_epochs=0"]),
    config_case("unknown schedule", "TrainConfig.lr_scheduler_type='cosin' is invalid: must be "
                "one of", sets=["training.lr_scheduler_type=cosin"]),
    config_case("unknown data format", "TrainConfig.dataset_format='sharegpt' is invalid",
                sets=["training.dataset_format=sharegpt"]),
    config_case("unknown nonfinite policy", "TrainConfig.nonfinite='ignore' is invalid",
                sets=["training.nonfinite=ignore"]),
    config_case("a regex that does not compile", "LoraConfig.target_modules: '(' is not a valid "
                "regex", sets=["lora.target_modules=("]),
    config_case("--set without '='", "expected SECTION.KEY=VALUE", sets=["training.max_steps"]),
    Case("config file missing", "config", InputNotFoundError,
         lambda d, w: f"config file not found: {d / 'nowhere.yaml'}",
         cli=lambda d, w: w.train(None, d / "out", "--config", d / "nowhere.yaml"),
         api=lambda d, w: run_config(d / "nowhere.yaml")),
    Case("target modules that match nothing", "config", ConfigError,
         "target_modules=['nonexistent_proj'] matches no module",
         cli=lambda d, w: w.train(None, d / "out", "--target-modules", "nonexistent_proj"),
         api=lambda d, w: get_lora_model(AutoModelForCausalLM.from_pretrained(w.model),
                                         LoraConfig(target_modules=["nonexistent_proj"]))),
    # --------------------------------------------------------------------------------- paths
    Case("--model names a missing directory", "paths", ModelNotFoundError,
         lambda d, w: f"no such directory: {d / 'nowhere'}",
         cli=lambda d, w: ["generate", "--model", d / "nowhere", "hi"],
         api=lambda d, w: load_model(d / "nowhere")),
    Case("--model names a file", "paths", ModelNotFoundError, "is a file, neither a model directory nor a GGUF file",
         setup=text("model.txt", "not a model\n"),
         cli=lambda d, w: ["generate", "--model", d / "model.txt", "hi"],
         api=lambda d, w: load_model(d / "model.txt")),
    Case("--model directory without config.json", "paths", ModelNotFoundError,
         "holds no config.json", setup=lambda d, w: (d / "empty").mkdir(),
         cli=lambda d, w: ["generate", "--model", d / "empty", "hi"],
         api=lambda d, w: load_model(d / "empty")),
    Case("--output is a file", "paths", OutputExistsError, "exists and is not a directory",
         setup=text("taken", "a file\n"), cli=lambda d, w: w.train(None, d / "taken"),
         api=lambda d, w: SFTRecipe(w.config(out=d / "taken")).setup()),
    Case("--output already holds a run (no --resume)", "paths", OutputExistsError,
         "already holds a run (checkpoint-1, checkpoint-2, adapter): pass --resume",
         setup=copy_run, cli=lambda d, w: w.train(None, d / "run"),
         api=lambda d, w: SFTRecipe(w.config(out=d / "run")).setup()),
    Case("merge --output is a non-empty directory", "paths", OutputExistsError,
         "exists and is not empty (pass --overwrite",
         setup=lambda d, w: (copy_adapter(d, w), (d / "x").mkdir(), text("x/f", "")(d, w)),
         cli=lambda d, w: ["merge", "--model", w.model, "--adapter", d / "adapter", "--output",
                           d / "x"], api=None, tags=["cli only: merge's check is the command's"]),
    Case("--output where nothing may be written", "paths", WriteError,
         lambda d, w: f"cannot write {d / 'ro' / 'out'}", setup=read_only_dir,
         cli=lambda d, w: w.train(None, d / "ro" / "out"),
         api=lambda d, w: SFTRecipe(w.config(out=d / "ro" / "out"), echo_config=False)
         .setup().train()),
    Case("--resume CHECKPOINT that is not one", "paths", InputNotFoundError,
         "is not a lorakit checkpoint (no trainer_state.json)",
         setup=lambda d, w: (copy_run(d, w), (d / "elsewhere").mkdir()),
         cli=lambda d, w: w.train(None, d / "run", "--resume", d / "elsewhere"),
         api=lambda d, w: SFTRecipe(w.config(out=d / "run"), resume=str(d / "elsewhere"))
         .setup().train()),
    Case("inspect a file, not an adapter directory", "paths", InputNotFoundError,
         "not an adapter directory", setup=text("f.json", "{}"),
         cli=lambda d, w: ["inspect", d / "f.json"], api=from_pretrained("f.json")),
    Case("adapter directory without weights", "paths", InputNotFoundError,
         "no adapter_model.safetensors (or adapter_model.bin)",
         setup=spoil_adapter(lambda a: (a / "adapter_model.safetensors").unlink()),
         cli=generate(), api=from_pretrained()),
    # ------------------------------------------------------------------- adapter/model files
    Case("truncated adapter safetensors", "adapter/model files", AdapterFileError,
         "adapter_model.safetensors: not a readable safetensors file (truncated or corrupt",
         setup=spoil_adapter(lambda a: truncate(a / "adapter_model.safetensors")),
         cli=generate(), api=from_pretrained()),
    Case("adapter safetensors cut to 5 bytes", "adapter/model files", AdapterFileError,
         "not a readable safetensors file",
         setup=spoil_adapter(lambda a: truncate(a / "adapter_model.safetensors", 5)),
         cli=lambda d, w: ["inspect", d / "adapter"], api=from_pretrained()),
    Case("corrupt safetensors header", "adapter/model files", AdapterFileError,
         "not a readable safetensors file", setup=spoil_adapter(corrupt_header),
         cli=generate(), api=from_pretrained()),
    Case("pickle-only .bin adapter (no opt-in)", "adapter/model files", AdapterFileError,
         "adapter_model.bin: a pickle, which lorakit does not load unless asked",
         setup=spoil_adapter(to_pickle), cli=generate(), api=from_pretrained()),
    Case("malicious .bin with --allow-pickle (weights_only refuses it)", "adapter/model files",
         AdapterFileError, "not a PyTorch checkpoint of tensors (torch.load with "
         "weights_only=True refused it)", setup=spoil_adapter(malicious_pickle),
         cli=generate("adapter", "--allow-pickle"),
         api=from_pretrained(allow_pickle=True), tags=["no-pwned"]),
    Case("adapter_config.json not JSON", "adapter/model files", AdapterFileError,
         "adapter_config.json: not valid JSON",
         setup=spoil_adapter(lambda a: (a / "adapter_config.json").write_text("{r: 4")),
         cli=generate(), api=from_pretrained()),
    Case("config r disagrees with the tensors", "adapter/model files", AdapterMismatchError,
         "adapter_config.json gives module", setup=spoil_adapter(edit_config(r=8)),
         cli=generate(), api=from_pretrained()),
    Case("adapter config with an unsupported PEFT feature", "adapter/model files", ConfigError,
         "adapter_config.json: adapter config sets lora_bias=True, a PEFT feature that lorakit "
         "does not implement",
         setup=spoil_adapter(edit_config(lora_bias=True)), cli=generate(),
         api=from_pretrained()),
    Case("adapter of another PEFT type", "adapter/model files", ConfigError,
         "adapter_config.json: LoraConfig.peft_type='IA3' is invalid", setup=spoil_adapter(edit_config(peft_type="IA3")),
         cli=generate(), api=from_pretrained()),
    Case("adapter for another base model", "adapter/model files", AdapterMismatchError,
         "was this adapter trained on another base model?", setup=copy_adapter,
         cli=lambda d, w: ["generate", "--model", w.other_base, "--adapter", d / "adapter", "hi"],
         api=lambda d, w: LoraModel.from_pretrained(
             AutoModelForCausalLM.from_pretrained(w.other_base), d / "adapter")),
    Case("adapter tensors with NaN", "adapter/model files", AdapterFileError,
         "holds NaN or inf values", setup=spoil_adapter(nan_tensor), cli=generate(),
         api=from_pretrained()),
    Case("model weights truncated", "adapter/model files", ModelFileError,
         "cannot load model", setup=model_dir(lambda m: truncate(m / "model.safetensors", 1000)),
         cli=lambda d, w: ["generate", "--model", d / "model", "hi"],
         api=lambda d, w: load_model(d / "model")),
    Case("model config.json not JSON", "adapter/model files", ModelFileError,
         "cannot load model", setup=model_dir(lambda m: (m / "config.json").write_text("{bad")),
         cli=lambda d, w: ["generate", "--model", d / "model", "hi"],
         api=lambda d, w: load_model(d / "model")),
    # -------------------------------------------------------------------------------- resume
    Case("resume with another rank", "resume", CheckpointError,
         "adapter 'default' differs (lora.r: 4 -> 8)", setup=copy_run,
         cli=lambda d, w: w.train(None, d / "run", "--resume", "--lora-r", 8),
         api=lambda d, w: resume(d, w, lora={"r": 8})),
    Case("resume with another alpha (same shapes)", "resume", CheckpointError,
         "adapter 'default' differs (lora.lora_alpha: 8.0 -> 32.0)", setup=copy_run,
         cli=lambda d, w: w.train(None, d / "run", "--resume", "--lora-alpha", 32),
         api=lambda d, w: resume(d, w, lora={"lora_alpha": 32})),
    Case("resume on another base model", "resume", CheckpointError,
         "it was trained on another base model", setup=copy_run,
         cli=lambda d, w: [*w.train(None, d / "run", "--resume")[:1], "--model", w.other_base,
                           *w.train(None, d / "run", "--resume")[3:]],
         api=lambda d, w: resume(d, w, base=w.other_base)),
    Case("resume from a checkpoint with a truncated optimizer state", "resume", CheckpointError,
         "incomplete or corrupt",
         setup=lambda d, w: truncate(copy_run(d, w) / "checkpoint-2" / "optimizer.safetensors"),
         cli=lambda d, w: w.train(None, d / "run", "--resume"),
         api=lambda d, w: resume(d, w)),
]


@pytest.fixture(scope="module")
def world(tiny_chat_dir, tmp_path_factory) -> World:
    tmp = tmp_path_factory.mktemp("bad-inputs")
    data = tmp / "train.jsonl"
    write_sum_rows(data, 30)
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir)
    other = tmp / "other-base"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=48,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    w = World(tiny_chat_dir, data, tmp / "run", other, tokenizer, tmp)
    res = lorakit(tmp, *w.train(None, w.run))
    assert res.status == 0, res.stderr[-2000:]
    return w


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "dir" for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, world: World, tmp_path: Path):
    d = tmp_path
    case.setup(d, world)
    try:
        needle = case.needle(d, world) if callable(case.needle) else case.needle
        before = snapshot(d)
        res = lorakit(world.tmp, *case.cli(d, world), cwd=d)
        problems = []
        if case.error is None:  # must work
            if res.status != 0 or needle not in res.stdout:
                problems.append(f"exit {res.status}, {needle!r} not in the output")
        else:
            if (why := one_line_error(res, needle)) is not None:
                problems.append(f"CLI: {why}")
            if snapshot(d) != before:
                problems.append("CLI: files changed under the case directory")
        if temporaries(d):
            problems.append(f"temporaries left: {temporaries(d)}")
        api_outcome = "not applicable"
        if case.api is not None:
            try:
                case.api(d, world)
                api_outcome = "no error"
                if case.error is not None:
                    problems.append(f"API: no {case.error.__name__}")
            except Exception as e:  # the table says which type; anything else is a finding
                api_outcome = type(e).__name__
                if case.error is None or not isinstance(e, case.error) or \
                        not isinstance(e, UserError):
                    problems.append(f"API: {type(e).__name__}: {e}")
                elif needle not in str(e):
                    problems.append(f"API: {needle!r} not in {str(e)!r}")
        if "no-pwned" in case.tags and (d / "PWNED").exists():
            problems.append("the pickle's payload ran")
        line = (res.error_lines() or [""])[0].removeprefix("lorakit: error: ")
        record("bad input", case.name, ("ok" if not problems else "; ".join(problems)),
               not problems, kind=case.kind, exit=res.status, message=line[:160],
               api=api_outcome, expected=case.error.__name__ if case.error else "works")
        assert not problems, "\n".join(problems) + "\n" + res.stderr[-2000:]
    finally:
        ro = d / "ro"
        if ro.is_dir() and os.path.ismount(ro):
            subprocess.run(["umount", "-l", str(ro)], check=False)
