"""lorakit: LoRA and QLoRA fine-tuning of causal language models, PEFT-format adapters.

PEFT's names are aliases of lorakit's (the same objects, not copies), so a PEFT script runs with
its `from peft import ...` changed to `from lorakit import ...`; `SFTTrainer` also takes TRL's
call (`args=SFTConfig(...)`, `train_dataset`, `processing_class`, `peft_config`), and
`DPOTrainer`, `KTOTrainer` and `ORPOTrainer` TRL's preference calls (`args=DPOConfig(...)`, ...).
"""

from lorakit.base import load_model, prepare_for_kbit_training
from lorakit.base.quantize import prepare_model_for_kbit_training
from lorakit.lora import LoraLayer, LoraModel, get_lora_model
from lorakit.lora.config import LoraConfig, TaskType
from lorakit.training import (
    DPOConfig,
    DPOTrainer,
    KTOConfig,
    KTOTrainer,
    ORPOConfig,
    ORPOTrainer,
    SFTConfig,
    SFTTrainer,
    TrainConfig,
    TrainingDivergedError,
    TrainResult,
    create_loraplus_optimizer,
)

# PEFT's names for the same things
PeftModel = LoraModel
get_peft_model = get_lora_model

__version__ = "0.1.0"

__all__ = [
    "DPOConfig",
    "DPOTrainer",
    "KTOConfig",
    "KTOTrainer",
    "LoraConfig",
    "LoraLayer",
    "LoraModel",
    "ORPOConfig",
    "ORPOTrainer",
    "PeftModel",
    "SFTConfig",
    "SFTTrainer",
    "TaskType",
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "create_loraplus_optimizer",
    "get_lora_model",
    "get_peft_model",
    "load_model",
    "prepare_for_kbit_training",
    "prepare_model_for_kbit_training",
    "__version__",
]
