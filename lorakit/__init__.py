"""lorakit: LoRA and QLoRA fine-tuning of causal language models, PEFT-format adapters."""

from lorakit.config import LoraConfig
from lorakit.lora import LoraLayer, LoraModel, get_lora_model

__version__ = "0.1.0"

__all__ = ["LoraConfig", "LoraLayer", "LoraModel", "get_lora_model", "__version__"]
