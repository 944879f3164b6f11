"""Prompt + image preprocessing for LLaVA-style models, token-identical to `LlavaProcessor`.

For one (image, question[, answer]):
- the LLaVA-v1 conversation prompt `"{SYSTEM} USER: <image>\\n{question} ASSISTANT:"`;
- `<image>` expanded to the vision tower's number of image features, computed exactly as
  transformers' `LlavaProcessor` does from the processed pixel grid:
      n = (H // patch) * (W // patch) + num_additional_image_tokens, minus 1 when
      vision_feature_select_strategy == "default" (the CLS feature is dropped);
  (CLIP: num_additional_image_tokens=1, "default"; SigLIP: 0, "full");
- prompt ids with BOS (the tokenizer's post-processor adds it), never truncated;
- response ids = tokens of `" " + answer` (the template's space after "ASSISTANT:") + EOS;
  decoded generations therefore start with a space: strip them before scoring;
- pixel values NCHW float32 straight from the transformers image processor
  (`CLIPImageProcessorPil` / `SiglipImageProcessorPil`, which need no torchvision).
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from perpo_jax.atomic import atomic_dir

LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's "
                   "questions.")
_CONFIG_NAME = "perpo_processor.json"


def llava_v1_prompt(question: str, image_token: str = "<image>") -> str:
    """The LLaVA-v1 single-turn prompt with one (unexpanded) image token."""
    return f"{LLAVA_V1_SYSTEM} USER: {image_token}\n{question} ASSISTANT:"


class LlavaPromptProcessor:
    """Tokenizer + image processor + the LlavaProcessor image-token rule.

    Args:
      tokenizer: a transformers tokenizer whose vocabulary has `image_token` and EOS.
      image_processor: a transformers image processor returning `pixel_values`.
      patch_size: the vision tower's patch size (pixels).
      vision_feature_select_strategy: "default" (drop CLS) or "full".
      num_additional_image_tokens: extra vision features besides patches (CLIP CLS: 1).
    """

    def __init__(self, tokenizer, image_processor, *, patch_size: int,
                 vision_feature_select_strategy: str = "default",
                 num_additional_image_tokens: int = 1, image_token: str = "<image>"):
        if vision_feature_select_strategy not in ("default", "full"):
            raise ValueError("vision_feature_select_strategy must be 'default' or 'full', got "
                             f"{vision_feature_select_strategy!r}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.patch_size = patch_size
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.num_additional_image_tokens = num_additional_image_tokens
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no token {image_token!r}")
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no eos_token")

    # ------------------------------------------------------------------ pieces

    def num_image_tokens(self, height: int, width: int) -> int:
        """Image features for a processed [.., H, W] image (LlavaProcessor's rule)."""
        n = (height // self.patch_size) * (width // self.patch_size)
        n += self.num_additional_image_tokens
        return n - 1 if self.vision_feature_select_strategy == "default" else n

    def pixel_values(self, images: list[Any]) -> np.ndarray:
        """[N, C, H, W] float32 from a list of PIL images / HWC uint8 arrays."""
        out = self.image_processor(images=list(images), return_tensors="np")["pixel_values"]
        return np.asarray(out, dtype=np.float32)

    def encode_prompt(self, question: str, height: int, width: int) -> np.ndarray:
        """[P] int32: BOS + LLaVA-v1 prompt with `<image>` expanded for an H x W input."""
        text = llava_v1_prompt(question, self.image_token)
        text = text.replace(self.image_token, self.image_token * self.num_image_tokens(height, width))
        return np.asarray(self.tokenizer(text)["input_ids"], dtype=np.int32)

    def encode_response(self, answer: str) -> np.ndarray:
        """[R] int32: tokens of `" " + answer` followed by EOS."""
        ids = self.tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
        return np.asarray(list(ids) + [self.tokenizer.eos_token_id], dtype=np.int32)

    def decode_response(self, ids) -> str:
        """Text of generated ids, up to the first EOS, special tokens and outer spaces removed."""
        ids = [int(i) for i in ids]
        if self.tokenizer.eos_token_id in ids:
            ids = ids[: ids.index(self.tokenizer.eos_token_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def __call__(self, image, question: str, answer: str | None = None) -> dict[str, np.ndarray]:
        """{"pixel_values": [C, H, W] f32, "prompt_ids": [P] i32, "response_ids": [R] i32?}."""
        pixels = self.pixel_values([image])[0]
        out = {"pixel_values": pixels,
               "prompt_ids": self.encode_prompt(question, pixels.shape[-2], pixels.shape[-1])}
        if answer is not None:
            out["response_ids"] = self.encode_response(answer)
        return out

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, out_dir: str) -> None:
        """Tokenizer, image processor and our settings in one directory (atomic)."""
        with atomic_dir(out_dir) as tmp:
            self.tokenizer.save_pretrained(tmp)
            self.image_processor.save_pretrained(tmp)
            with open(os.path.join(tmp, _CONFIG_NAME), "w") as f:
                json.dump({"patch_size": self.patch_size,
                           "vision_feature_select_strategy": self.vision_feature_select_strategy,
                           "num_additional_image_tokens": self.num_additional_image_tokens,
                           "image_token": self.image_token}, f, indent=2)

    @classmethod
    def from_pretrained(cls, path: str) -> "LlavaPromptProcessor":
        """Load what `save_pretrained` wrote (PIL-backend image processors, no torchvision)."""
        from transformers import AutoTokenizer, CLIPImageProcessorPil, SiglipImageProcessorPil

        config_file = os.path.join(path, _CONFIG_NAME)
        if not os.path.exists(config_file):
            raise FileNotFoundError(f"{config_file} not found: not a saved LlavaPromptProcessor")
        with open(config_file) as f:
            settings = json.load(f)
        with open(os.path.join(path, "preprocessor_config.json")) as f:
            kind = json.load(f).get("image_processor_type", "")
        image_cls = SiglipImageProcessorPil if "Siglip" in kind else CLIPImageProcessorPil
        return cls(AutoTokenizer.from_pretrained(path), image_cls.from_pretrained(path), **settings)
