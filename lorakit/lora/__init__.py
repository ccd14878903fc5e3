"""LoRA layers, injection, variants and the LoraModel wrapper."""

from lorakit.lora.layer import LoraAdapter, LoraLayer, ModulesToSave
from lorakit.lora.model import BASE_ADAPTER, LoraModel, get_lora_model
from lorakit.lora.variants import DoraVariant, LoraVariant, variant_for

__all__ = ["BASE_ADAPTER", "DoraVariant", "LoraAdapter", "LoraLayer", "LoraModel", "LoraVariant",
           "ModulesToSave", "get_lora_model", "variant_for"]
