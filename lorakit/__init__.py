"""lorakit: LoRA and QLoRA fine-tuning of causal language models, PEFT-format adapters."""

from lorakit.base import load_model
from lorakit.lora import LoraLayer, LoraModel, get_lora_model
from lorakit.lora.config import LoraConfig
from lorakit.training import (
    SFTTrainer,
    TrainConfig,
    TrainingDivergedError,
    TrainResult,
    create_loraplus_optimizer,
)

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "LoraLayer",
    "LoraModel",
    "SFTTrainer",
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "create_loraplus_optimizer",
    "get_lora_model",
    "load_model",
    "__version__",
]
