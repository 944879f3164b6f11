"""Discriminative rewards (host side, pure numpy — this package never imports jax).

- ``parse_box`` / ``iou_rewards``: grounding, IoU of the first normalised box in a response.
- ``ocr_rewards``: dense OCR, 1 - normalised Levenshtein distance on Unicode characters.
- ``pope_rewards``: POPE yes/no questions, 1 when the official parser (``pope_answer``) reads
  the response as the label.
- ``build_lists``: dedup, margin filtering, sorting and thinning of candidate lists.
- ``REWARDS`` / ``register_reward`` / ``get_reward``: the name -> reward registry.
"""
from perpo_jax.rewards.boxes import box_iou, iou_rewards, parse_box
from perpo_jax.rewards.lists import (DROP_REASONS, BuiltLists, CandidateList, build_lists,
                                     spread_indices)
from perpo_jax.rewards.ocr import edit_similarity, levenshtein, ocr_rewards
from perpo_jax.rewards.pope import pope_answer, pope_rewards
from perpo_jax.rewards.registry import REWARDS, get_reward, register_reward

__all__ = [
    "BuiltLists", "CandidateList", "DROP_REASONS", "REWARDS", "box_iou", "build_lists",
    "edit_similarity", "get_reward", "iou_rewards", "levenshtein", "ocr_rewards", "parse_box",
    "pope_answer", "pope_rewards", "register_reward", "spread_indices",
]
