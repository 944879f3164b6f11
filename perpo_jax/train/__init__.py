"""Training: LoRA adapters, optimizer, train state and the jitted sharded step."""

from perpo_jax.models.lora import LoRA, LoRAParam, apply_lora, merge_lora, trainable_filter
from perpo_jax.train.optim import make_optimizer, make_schedule
from perpo_jax.train.state import (
    ModelParts,
    TrainState,
    create_train_state,
    partition_model,
    train_state_shardings,
)
from perpo_jax.train.step import build_ref_logps, build_train_step, microbatched

__all__ = [
    "LoRA", "LoRAParam", "ModelParts", "TrainState", "apply_lora", "build_ref_logps",
    "build_train_step", "create_train_state", "make_optimizer", "make_schedule", "merge_lora",
    "microbatched", "partition_model", "train_state_shardings", "trainable_filter",
]
