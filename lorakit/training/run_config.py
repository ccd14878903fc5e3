"""A run's config: one section per layer, each defined next to the code it configures.

    model:    lorakit.base.config.ModelConfig
    data:     lorakit.data.config.DataConfig
    lora:     lorakit.lora.config.LoraConfig (PEFT's field names)
    training: lorakit.training.config.TrainConfig (TRL's names where the concept is the same)
    dpo:      lorakit.training.config.DPOOptions (with training.objective: dpo)
    kto:      lorakit.training.config.KTOOptions (with training.objective: kto)
    orpo:     lorakit.training.config.ORPOOptions (with training.objective: orpo)
    output:   lorakit.training.report.OutputConfig

A YAML file holds any of the sections; `lorakit train` flags (`TRAIN_FLAGS`) and `--set
section.key=value` override single fields. Unknown sections or keys are errors that suggest the
nearest name. The resolved config is written with every run (config.yaml).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorakit.base.config import DTYPE_CHOICES, ModelConfig
from lorakit.base.quantize import QUANT_TYPES
from lorakit.data.config import DataConfig
from lorakit.errors import ConfigError, InputNotFoundError
from lorakit.lora.config import LoraConfig
from lorakit.training.config import (
    OBJECTIVES,
    PREFERENCE_OBJECTIVES,
    DPOOptions,
    KTOOptions,
    ORPOOptions,
    TrainConfig,
)
from lorakit.training.report import OutputConfig

SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "lora": LoraConfig,
    "training": TrainConfig,
    "dpo": DPOOptions,
    "kto": KTOOptions,
    "orpo": ORPOOptions,
    "output": OutputConfig,
}
OBJECTIVE = "objective"  # a flag's section: the options section of the run's objective
# fields that belong to the run, not to the section: the adapter files record them themselves,
# and the training output directory is output.dir
_HIDDEN = {
    "lora": {"peft_type", "base_model_name_or_path", "revision", "inference_mode", "task_type"},
    "training": {"output_dir"},
}


@dataclass(frozen=True)
class Flag:
    """A `lorakit train` flag for one config field."""

    section: str  # or OBJECTIVE
    key: str
    help: str = ""
    choices: tuple[str, ...] | None = None
    # single-process spellings: torchrun's parser prefix-matches every argument, even after the
    # script name, so `--r` reads as an ambiguous abbreviation of its --rdzv-*, --role, ...
    # options; every other spelling must pass torchrun (tests/test_torchrun_flags.py)
    aliases: tuple[str, ...] = field(default=())
    nargs: str | None = None  # argparse's: "+" takes several values (a list)


TRAIN_FLAGS: dict[str, Flag] = {
    "--model": Flag(
        "model",
        "name_or_path",
        "base model: local directory or hub id (default: the embedded SmolLM2-135M)",
    ),
    "--dtype": Flag("model", "dtype", choices=DTYPE_CHOICES),
    "--quantization": Flag("model", "quantization", choices=QUANT_TYPES),
    "--data": Flag("data", "train", "training data (.jsonl/.json/.csv/.parquet or datasets dir)"),
    "--eval-data": Flag("data", "eval", "held-out data for eval loss"),
    "--output": Flag("output", "dir", "output directory"),
    "--max-steps": Flag("training", "max_steps"),
    "--epochs": Flag("training", "num_train_epochs"),
    "--batch-size": Flag("training", "per_device_train_batch_size", "examples per process"),
    "--grad-accum": Flag("training", "gradient_accumulation_steps"),
    "--lr": Flag("training", "learning_rate"),
    "--max-length": Flag("training", "max_length"),
    "--lora-r": Flag("lora", "r", "LoRA rank", aliases=("--r",)),
    "--lora-alpha": Flag(
        "lora", "lora_alpha", "LoRA scaling numerator (scale = alpha / r)", aliases=("--alpha",)
    ),
    "--lora-dropout": Flag("lora", "lora_dropout", aliases=("--dropout",)),
    "--target-modules": Flag("lora", "target_modules", "all-linear | q_proj,v_proj | a regex"),
    "--objective": Flag(
        "training",
        "objective",
        "sft: next-token loss | dpo, orpo: preference pairs | kto: answers marked good or bad",
        choices=OBJECTIVES,
    ),
    "--beta": Flag(OBJECTIVE, "beta", "dpo / kto / orpo: the objective's beta"),
    "--loss-type": Flag(
        OBJECTIVE,
        "loss_type",
        "dpo: sigmoid | ipo | hinge | robust | sft (or a,b); kto: kto | apo_zero_unpaired",
    ),
    "--report-to": Flag(
        "training",
        "report_to",
        "experiment trackers: tensorboard, mlflow, trackio (several, or a,b), all, none",
        nargs="+",
    ),
}
SINGLE_PROCESS_ALIASES: dict[str, str] = {
    a: name for name, f in TRAIN_FLAGS.items() for a in f.aliases
}


@dataclass
class RunConfig:
    model: ModelConfig
    data: DataConfig
    lora: LoraConfig
    training: TrainConfig
    output: OutputConfig
    # the preference objectives' options: their defaults unless the run sets them
    dpo: DPOOptions = field(default_factory=DPOOptions)
    kto: KTOOptions = field(default_factory=KTOOptions)
    orpo: ORPOOptions = field(default_factory=ORPOOptions)

    def sections(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SECTIONS}

    def to_yaml(self) -> str:
        out = {}
        for section, obj in self.sections().items():
            keys = section_fields(section)
            out[section] = {k: v for k, v in dataclasses.asdict(obj).items() if k in keys}
        return yaml.safe_dump(out, sort_keys=False)


def section_fields(section: str) -> dict[str, dataclasses.Field]:
    hidden = _HIDDEN.get(section, set())
    return {f.name: f for f in dataclasses.fields(SECTIONS[section]) if f.name not in hidden}


def field_type(section: str, key: str) -> type | None:
    """int / float / str for a field whose annotation names one (for argparse), else None."""
    section = "dpo" if section == OBJECTIVE else section  # the objectives' fields share types
    hint = str(section_fields(section)[key].type)
    for name, t in (("int", int), ("float", float), ("str", str)):
        if hint.startswith(name):
            return t
    return None


def _did_you_mean(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value: Any, f: dataclasses.Field, where: str) -> Any:
    """The value for a field of one scalar type (`int`, `float`, `bool`, `str`, optionally
    `| None`): YAML 1.1 reads '2e-4' as a string and users write '10' for ints, so numbers in
    strings are converted; anything else of the wrong type is a ConfigError naming the key (a
    string "maybe" must not switch a bool field on). Other fields are left to their section."""
    parts = [p.strip() for p in str(f.type).split("|")]
    optional = "None" in parts
    kinds = [p for p in parts if p != "None"]
    if len(kinds) != 1 or kinds[0] not in ("int", "float", "bool", "str"):
        return value
    kind = kinds[0]
    if value is None and optional:
        return None
    expected = {"int": "an integer", "float": "a number", "bool": "true or false"}.get(
        kind, "a string"
    ) + (" or null" if optional else "")
    if kind == "str":
        if isinstance(value, str):
            return value
    elif kind == "bool":
        if isinstance(value, bool):
            return value
    elif isinstance(value, str):
        try:
            return float(value) if kind == "float" else int(value)
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if kind == "float":
            return float(value)
        if float(value).is_integer():
            return int(value)
    raise ConfigError(f"{where}: expected {expected}, got {value!r}")


def parse_target_modules(text: str) -> str | list[str]:
    """'all-linear' stays; 'q_proj,v_proj' is a list; anything with regex characters a regex."""
    if text == "all-linear" or any(c in text for c in "*()[]|\\^$+?"):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


class RunConfigBuilder:
    """Collects a run's values (file, flags, --set), then builds the sections once."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        # flags for the objective's section: set once the objective is known (at build)
        self.objective_flags: list[tuple[str, Any, str]] = []

    def set(self, section: str, key: str, value: Any, where: str) -> None:
        fields = section_fields(section)
        if key not in fields:
            raise ConfigError(
                f"{where}: unknown key '{key}' in section '{section}'{_did_you_mean(key, fields)}"
            )
        self.values[section][key] = _coerce(value, fields[key], where)

    def read_yaml(self, path: str | Path) -> None:
        p = Path(path)
        if not p.is_file():
            raise InputNotFoundError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected sections {list(SECTIONS)} at the top level")
        for section, values in data.items():
            if section not in SECTIONS:
                raise ConfigError(
                    f"{path}: unknown section '{section}'"
                    f"{_did_you_mean(section, SECTIONS)}; sections are "
                    f"{list(SECTIONS)}"
                )
            if values is None:
                continue
            if not isinstance(values, dict):
                raise ConfigError(
                    f"{path}: section '{section}' must be a mapping of keys to values"
                )
            for key, value in values.items():
                self.set(section, key, value, where=f"{path}: {section}.{key}")

    def set_dotted(self, item: str) -> None:
        """One `--set section.key=value` (the value read as YAML: numbers, null, lists...)."""
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(
                f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. training.warmup_ratio=0.1"
            )
        dotted, raw = item.split("=", 1)
        section, key = dotted.split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(
                f"--set {item!r}: unknown section '{section}'{_did_you_mean(section, SECTIONS)}"
            )
        self.set(section, key, yaml.safe_load(raw), where=f"--set {dotted}")

    def build(self) -> RunConfig:
        """Instantiate each section; invalid values are ConfigErrors naming the section."""
        objective = self.values["training"].get("objective", TrainConfig.objective)
        for key, value, where in self.objective_flags:
            if objective not in PREFERENCE_OBJECTIVES:
                raise ConfigError(
                    f"{where} sets an option of {', '.join(PREFERENCE_OBJECTIVES)}; the "
                    f"objective is {objective!r} (pass --objective)"
                )
            self.set(objective, key, value, where=f"{where} (--objective {objective})")
        built = {}
        for section, cls in SECTIONS.items():
            values = dict(self.values[section])
            if section == "training":
                values["output_dir"] = self.values["output"].get("dir", OutputConfig.dir)
            try:
                built[section] = cls(**values)
            except (ValueError, TypeError) as e:  # the section's own validation
                raise ConfigError(f"{section}: {e}") from None
        return RunConfig(**built)


def run_config(
    path: str | Path | None = None, flags: dict[str, Any] | None = None, sets: Iterable[str] = ()
) -> RunConfig:
    """The run config from a YAML file, then `lorakit train` flag values (spelling -> value;
    None means not given), then `--set` items, later ones winning."""
    builder = RunConfigBuilder()
    if path is not None:
        builder.read_yaml(path)
    for spelling, value in (flags or {}).items():
        if value is not None:
            flag = TRAIN_FLAGS[spelling]
            if spelling == "--target-modules":  # a YAML string stays PEFT's regex
                value = parse_target_modules(value)
            if flag.section == OBJECTIVE:
                builder.objective_flags.append((flag.key, value, spelling))
            else:
                builder.set(flag.section, flag.key, value, where=spelling)
    for item in sets:
        builder.set_dotted(item)
    return builder.build()
