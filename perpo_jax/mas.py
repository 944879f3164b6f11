"""M3PO's multimodal alignment scores (MAS): the CLIP scorer and the registry of scorers.

A MAS scorer maps (texts [K], example, target) -> [K] float in [0, 1]; `example` has .image
(HWC uint8) and .question. `m3po.mas` in the config names one: "reward" (the task reward is the
MAS, no scorer), "clip" (`ClipScorer` over the local HF CLIPModel dir `m3po.clip_path`) or a
name given to `register_mas_scorer`. The pair selection that uses the scores is `m3po.py`.

CLIP calibration of this project: MAS = min(1, 2.5 · max(cos, 0)), i.e. CLIPScore (Hessel et
al. 2021, w = 2.5) clipped to [0, 1]. The model itself is `models.clip_text.ClipModel`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx
from transformers import AutoTokenizer, CLIPImageProcessorPil

from perpo_jax.hf import load_pretrained
from perpo_jax.models.clip_text import ClipModel

CLIPSCORE_W = 2.5


def clip_mas(cosine) -> np.ndarray:
    """This project's calibration of CLIP similarity to a MAS in [0, 1]:
    min(1, 2.5 · max(cos, 0)) (CLIPScore, w = 2.5, clipped)."""
    return np.clip(CLIPSCORE_W * np.maximum(np.asarray(cosine, np.float64), 0.0), 0.0, 1.0)


class ClipScorer:
    """A loaded CLIP with its tokenizer and image processor: `mas(image, texts) -> [K]`."""

    def __init__(self, model: ClipModel, tokenizer, image_processor):
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self._cosine = nnx.jit(lambda m, p, i, a: m.cosine(p, i, a))

    @classmethod
    def from_hf(cls, path: str) -> "ClipScorer":
        """A local HF CLIPModel dir (config.json, safetensors, tokenizer, image processor)."""
        model = load_pretrained(path)
        if not isinstance(model, ClipModel):
            raise ValueError(f"{path} is not a CLIPModel checkpoint")
        return cls(model, AutoTokenizer.from_pretrained(path),
                   CLIPImageProcessorPil.from_pretrained(path))

    def mas(self, image, texts) -> np.ndarray:
        """[K] float in [0, 1]: `clip_mas` of image (HWC uint8) vs each text."""
        pixels = np.asarray(self.image_processor(images=[image], return_tensors="np")["pixel_values"],
                            np.float32)
        max_len = self.model.config.text.max_position_embeddings
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_len,
                             return_tensors="np")
        cos = self._cosine(self.model, jnp.asarray(pixels), jnp.asarray(tok["input_ids"]),
                           jnp.asarray(tok["attention_mask"]))
        return clip_mas(np.asarray(cos)[0]).astype(np.float32)


MasScorer = Callable[[Sequence[str], Any, Any], np.ndarray]
# name -> factory(cfg) -> scorer, built lazily from the config
MAS_SCORERS: dict[str, Callable[[Any], MasScorer]] = {}


def register_mas_scorer(name: str, factory: Callable[[Any], MasScorer], *,
                        overwrite: bool = False) -> None:
    """Registers `factory(cfg) -> scorer` under `name` (the config's `m3po.mas`)."""
    if name in ("reward", "clip") or (name in MAS_SCORERS and not overwrite):
        raise ValueError(f"MAS scorer {name!r} is already defined")
    MAS_SCORERS[name] = factory


@functools.lru_cache(maxsize=2)
def _clip_scorer(path: str) -> ClipScorer:
    return ClipScorer.from_hf(path)


def mas_scorer(cfg) -> MasScorer | None:
    """The scorer of `cfg.m3po.mas`; None for "reward" (the task reward is the MAS)."""
    name = cfg.m3po.mas
    if name == "reward":
        return None
    if name == "clip":
        if not cfg.m3po.clip_path:
            raise ValueError("m3po.mas=clip needs m3po.clip_path (a local HF CLIPModel dir)")
        scorer = _clip_scorer(cfg.m3po.clip_path)
        return lambda texts, example, target: scorer.mas(example.image, list(texts))
    if name not in MAS_SCORERS:
        raise ValueError(f"m3po.mas={name!r}: not reward, clip or a registered scorer "
                         f"({sorted(MAS_SCORERS)})")
    return MAS_SCORERS[name](cfg)
