"""`LoraConfig`: what adapters to build, with PEFT's field names and meanings.

The dataclass serialises to PEFT's `adapter_config.json`, so an adapter written by lorakit is read
by PEFT (and vLLM, ...) and the other way round. Keys that newer PEFT versions add are dropped
with a warning on load, unless they switch on a feature lorakit lacks: then loading fails loudly
rather than silently computing something else.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Union

from lorakit.errors import ConfigError


class TaskType(str, enum.Enum):
    """PEFT's task types, so that `LoraConfig(task_type=TaskType.CAUSAL_LM)` reads the same;
    the config stores the plain string. lorakit trains causal LMs (CAUSAL_LM)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


BIAS_CHOICES = ("none", "all", "lora_only")
INIT_CHOICES = (True, False, "gaussian", "pissa")  # plus "pissa_niter_<n>" (randomized SVD)
ALL_LINEAR = "all-linear"

# PEFT config keys that carry no information for LoRA as lorakit computes it (metadata, or
# features that are off at their default value). If one of the feature keys is *on*, the
# adapter computes something lorakit does not implement, and loading refuses.
_PEFT_METADATA_KEYS = {
    "auto_mapping",
    "peft_version",
    "megatron_core",
    "qalora_group_size",
    "ensure_weight_tying",
}
_PEFT_FEATURE_KEYS = {
    "lora_bias",
    "use_qalora",
    "layer_replication",
    "loftq_config",
    "trainable_token_indices",
    "megatron_config",
    "eva_config",
    "corda_config",
    "alora_invocation_tokens",
    "arrow_config",
    "use_bdlora",
    "kasa_config",
    "lora_ga_config",
    "monteclora_config",
    "velora_config",
}

TargetSpec = Union[list[str], str, None]


@dataclass
class LoraConfig:
    """Adapter hyper-parameters. Field names and semantics follow `peft.LoraConfig`.

    target_modules: a list (a module matches if its full name equals an entry or ends with
    ".<entry>"), a string (a regex, full-matched against the full module name), or
    "all-linear" (every nn.Linear / Conv1D except the output embedding; on the Mixture-of-Experts
    models whose experts PEFT converts, also their expert weights and routers, as PEFT does).
    target_parameters: names of parameters that are not linear layers (fused 3-D expert weights,
    routers), matched like a target_modules list against "<module>.<parameter>".
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    bias: str = "none"
    target_modules: TargetSpec = ALL_LINEAR
    exclude_modules: TargetSpec = None
    target_parameters: list[str] | None = None
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False
    init_lora_weights: bool | str = True
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    task_type: str | None = "CAUSAL_LM"
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    peft_type: str = "LORA"

    def __post_init__(self) -> None:
        if isinstance(self.task_type, enum.Enum):  # stored and written as PEFT writes it
            self.task_type = self.task_type.value
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.target_parameters, (set, tuple)):
            self.target_parameters = sorted(self.target_parameters)
        self.validate()

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise one ValueError naming the bad field and what it accepts."""

        def bad(name: str, allowed: str) -> ConfigError:
            return ConfigError(f"LoraConfig.{name}={getattr(self, name)!r} is invalid: {allowed}")

        if self.peft_type != "LORA":
            raise bad("peft_type", "lorakit reads LoRA adapters only ('LORA')")
        if not _is_int(self.r) or self.r < 1:
            raise bad("r", "must be an integer >= 1")
        if not _is_number(self.lora_alpha) or self.lora_alpha <= 0:
            raise bad("lora_alpha", "must be a number > 0")
        if not _is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise bad("lora_dropout", "must be a number in [0, 1)")
        if self.bias not in BIAS_CHOICES:
            raise bad("bias", f"must be one of {BIAS_CHOICES}")
        for name in ("target_modules", "exclude_modules"):
            spec = getattr(self, name)
            if spec is None or isinstance(spec, str):
                if isinstance(spec, str) and spec != ALL_LINEAR:
                    _check_regex(name, spec)
                continue
            if not isinstance(spec, list) or not all(isinstance(s, str) and s for s in spec):
                raise bad(name, "must be a list of module names, a regex string or 'all-linear'")
        tp = self.target_parameters
        if tp is not None and (
            not isinstance(tp, list) or not all(isinstance(s, str) and s for s in tp)
        ):
            raise bad("target_parameters", "must be a list of parameter names")
        if (self.target_modules is None or self.target_modules == []) and not tp:
            raise bad(
                "target_modules",
                "name the layers to adapt, e.g. 'all-linear' or ['q_proj', 'v_proj'] "
                "(or the parameters, target_parameters=['gate_up_proj', 'down_proj'])",
            )
        if self.modules_to_save is not None and (
            not isinstance(self.modules_to_save, list)
            or not all(isinstance(s, str) and s for s in self.modules_to_save)
        ):
            raise bad("modules_to_save", "must be a list of module names")
        ok_init = self.init_lora_weights in INIT_CHOICES or (
            isinstance(self.init_lora_weights, str)
            and re.fullmatch(r"pissa_niter_\d+", self.init_lora_weights)
        )
        if not ok_init:
            raise bad(
                "init_lora_weights", "must be True, False, 'gaussian', 'pissa' or 'pissa_niter_<n>'"
            )
        for name in ("fan_in_fan_out", "use_rslora", "use_dora", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        for name, check in (("rank_pattern", _is_int), ("alpha_pattern", _is_number)):
            pattern = getattr(self, name)
            if not isinstance(pattern, dict) or not all(
                isinstance(k, str) and check(v) and v > 0 for k, v in pattern.items()
            ):
                raise bad(name, "must map module-name patterns to positive numbers")
            for key in pattern:
                _check_regex(name, key)
        ltt = self.layers_to_transform
        if ltt is not None and not (
            _is_int(ltt) or (isinstance(ltt, list) and all(_is_int(i) for i in ltt))
        ):
            raise bad("layers_to_transform", "must be a layer index or a list of indices")
        if self.layers_pattern is not None and ltt is None:
            raise bad("layers_pattern", "only has a meaning together with layers_to_transform")

    # -- derived values -----------------------------------------------------------------------
    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """r and alpha for one module, after rank_pattern / alpha_pattern (PEFT's matching)."""
        r = _pattern_value(self.rank_pattern, module_name, self.r)
        alpha = _pattern_value(self.alpha_pattern, module_name, self.lora_alpha)
        return r, alpha

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        """Build from an adapter_config.json dict (ours or PEFT's, any version)."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs, unknown = {}, []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in _PEFT_FEATURE_KEYS:
                if value not in (None, False, {}, [], ""):
                    raise ConfigError(
                        f"adapter config sets {key}={value!r}, a PEFT feature that "
                        "lorakit does not implement; refusing to load it as plain LoRA"
                    )
            elif key not in _PEFT_METADATA_KEYS:
                unknown.append(key)
        if unknown:
            warnings.warn(
                f"adapter config: ignoring keys lorakit does not know: {sorted(unknown)}",
                stacklevel=2,
            )
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str) -> "LoraConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def _pattern_value(pattern: dict[str, Any], module_name: str, default: Any) -> Any:
    # Same rule as PEFT: the first key that matches a dotted suffix of the module name wins.
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_regex(field_name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(
            f"LoraConfig.{field_name}: {pattern!r} is not a valid regex ({e})"
        ) from None
