"""SFT training: config, the loop, loss, checkpoints, optimisers, several processes.

Owns: turning a LoRA model and data into trained adapters. May import every layer below it
(compat, atomic, errors, base, lora, data); imported by serving, demo and cli.
"""

from lorakit.training.checkpoint import TrainState, latest_checkpoint, list_checkpoints
from lorakit.training.config import SFTConfig, TrainConfig
from lorakit.training.optim import create_loraplus_optimizer
from lorakit.training.trainer import SFTTrainer, TrainingDivergedError, TrainResult

__all__ = [
    "SFTConfig",
    "SFTTrainer",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "TrainingDivergedError",
    "create_loraplus_optimizer",
    "latest_checkpoint",
    "list_checkpoints",
]
