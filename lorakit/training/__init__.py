"""Training: config, the loop and its objectives (SFT, DPO, KTO, ORPO), checkpoints, processes.

Owns: turning a LoRA model and data into trained adapters. May import every layer below it
(compat, atomic, errors, log, base, lora, data, inference); imported by serving, recipes, demo
and cli.
"""

from lorakit.training.checkpoint import TrainState, latest_checkpoint, list_checkpoints
from lorakit.training.config import DPOConfig, KTOConfig, ORPOConfig, SFTConfig, TrainConfig
from lorakit.training.dpo import DPOObjective, DPOTrainer
from lorakit.training.evaluate import evaluate
from lorakit.training.kto import KTOObjective, KTOTrainer
from lorakit.training.launch import Launch, resolve_launch
from lorakit.training.loop import Trainer, TrainingDivergedError, TrainResult
from lorakit.training.objective import Objective, Terms
from lorakit.training.optim import create_loraplus_optimizer
from lorakit.training.orpo import ORPOObjective, ORPOTrainer
from lorakit.training.sft import SFTObjective
from lorakit.training.trainer import SFTTrainer

__all__ = [
    "DPOConfig",
    "DPOObjective",
    "DPOTrainer",
    "KTOConfig",
    "KTOObjective",
    "KTOTrainer",
    "Launch",
    "ORPOConfig",
    "ORPOObjective",
    "ORPOTrainer",
    "Objective",
    "SFTConfig",
    "SFTObjective",
    "SFTTrainer",
    "Terms",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "Trainer",
    "TrainingDivergedError",
    "create_loraplus_optimizer",
    "evaluate",
    "latest_checkpoint",
    "list_checkpoints",
    "resolve_launch",
]
