"""A tiny online/offline training run's config, shared by the loop tests (`tiny_cfg`)."""

import numpy as np

from perpo_jax.config import config_from_dict
from perpo_jax.rewards import REWARDS, register_reward

TINY_MODEL = "model.tiny={hidden_size: 32, num_layers: 1, image_size: 16, patch_size: 8, vocab_size: 320}"


def _digit_share(texts, targets):
    """A reward a random model's samples spread over (so lists have valid pairs)."""
    del targets
    return np.asarray([sum(c.isdigit() for c in t) / max(len(t), 1) for t in texts], np.float32)


if "test_digits" not in REWARDS:
    register_reward("test_digits", _digit_share)


def tiny_cfg(tmp, *overrides):
    base = [
        f"data.data_dir={tmp}/data", "data.num_train=32", "data.num_val=8", "data.image_size=32",
        "data.min_margin=0.0", TINY_MODEL, "lora.enabled=false",
        "sampling.prompts_per_round=8", "sampling.num_samples=4", "sampling.max_new_tokens=8",
        "train.num_candidates=4", "train.lists_per_step=8", "train.max_length=192",
        "train.max_response_length=12", "train.rounds=2", "train.steps=2",
        f"train.out_dir={tmp}/run", "optim.lr=1e-3", "optim.warmup_ratio=0.0",
        "checkpoint.save_every=1", "checkpoint.keep=10", "checkpoint.async_save=false",
        "eval.num_examples=8", "eval.batch_size=8", "eval.max_new_tokens=8",
    ]
    return config_from_dict({}, base + list(overrides))
