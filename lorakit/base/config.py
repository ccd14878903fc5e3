"""`ModelConfig`: which base model a run loads, and how (the run config's `model` section)."""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.base.loading import DTYPES
from lorakit.base.quantize import QUANT_TYPES
from lorakit.errors import ConfigError

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # what the CLI offers


@dataclass
class ModelConfig:
    name_or_path: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    dtype: str = "auto"  # "auto": bf16 where the device computes it fast, else fp32
    quantization: str | None = None  # "nf4" | "fp4" | "int8"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(
                f"ModelConfig.dtype={self.dtype!r} is invalid: must be one of {DTYPE_CHOICES}"
            )
        if self.quantization is not None and self.quantization not in QUANT_TYPES:
            raise ConfigError(
                f"ModelConfig.quantization={self.quantization!r} is invalid: must "
                f"be None or one of {QUANT_TYPES}"
            )
