"""Base models: loading (default model, local dirs, hub ids), dtype choice, 4/8-bit quantization.

Owns: getting a frozen transformers causal LM ready (loading, quantizing, k-bit preparation),
what it can do (capabilities: packing, custom masks) and how its modules are named. May import
compat, atomic and errors; never lora/ or anything above it.
"""

from lorakit.base.default_model import (
    DefaultModelMissing,
    default_model_dir,
    lorakit_home,
)
from lorakit.base.loading import (
    ModelNotFoundError,
    QuantizationUnsupportedError,
    bf16_is_fast,
    cpu_has_fast_bf16,
    load_model,
    resolve_dtype,
)
from lorakit.base.quantize import prepare_for_kbit_training, quantize_model

__all__ = [
    "DefaultModelMissing",
    "ModelNotFoundError",
    "QuantizationUnsupportedError",
    "bf16_is_fast",
    "cpu_has_fast_bf16",
    "default_model_dir",
    "load_model",
    "lorakit_home",
    "prepare_for_kbit_training",
    "quantize_model",
    "resolve_dtype",
]
