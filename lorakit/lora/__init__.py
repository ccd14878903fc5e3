"""LoRA layers, injection and the LoraModel wrapper."""

from lorakit.lora.layer import LoraAdapter, LoraLayer, ModulesToSave
from lorakit.lora.model import LoraModel, get_lora_model

__all__ = ["LoraAdapter", "LoraLayer", "LoraModel", "ModulesToSave", "get_lora_model"]
