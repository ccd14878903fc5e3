"""LoRA: the config, the layer and its variants, injection, the LoraModel wrapper, mixed-adapter
batches (each row its own adapter), the adapter files (PEFT format) and every read and write of
base weights (dense, Conv1D, 4-bit, 8-bit) for merges, PiSSA and exports.

Owns: everything about adapters. May import compat, atomic, errors and base.
"""

from lorakit.lora.config import LoraConfig
from lorakit.lora.export import dequantize_model, export_merged
from lorakit.lora.layer import LoraAdapter, LoraLayer, ModulesToSave
from lorakit.lora.mixed import BASE_ADAPTER, AdapterMapping
from lorakit.lora.model import LoraModel, get_lora_model
from lorakit.lora.variants import DoraVariant, LoraVariant, variant_for

__all__ = [
    "BASE_ADAPTER",
    "AdapterMapping",
    "DoraVariant",
    "LoraAdapter",
    "LoraConfig",
    "LoraLayer",
    "LoraModel",
    "LoraVariant",
    "ModulesToSave",
    "dequantize_model",
    "export_merged",
    "get_lora_model",
    "variant_for",
]
