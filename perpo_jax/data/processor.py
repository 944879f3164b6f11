"""Prompt + image preprocessing for LLaVA-style models, token-identical to `LlavaProcessor`.

For one (image, question[, answer]):
- the prompt text, from one of two templates:
  "llava_v1": the LLaVA-v1 conversation `"{SYSTEM} USER: <image>\\n{question} ASSISTANT:"`
  (what the official PerPO run trains with);
  "chat_template": the checkpoint's own chat template, rendered by transformers'
  `LlavaProcessor.apply_chat_template` for one user turn `[{"type": "image"},
  {"type": "text", "text": question}]` with `add_generation_prompt=True`;
- `<image>` expanded to the vision tower's number of image features, computed exactly as
  transformers' `LlavaProcessor` does from the processed pixel grid:
      n = (H // patch) * (W // patch) + num_additional_image_tokens, minus 1 when
      vision_feature_select_strategy == "default" (the CLS feature is dropped);
  (CLIP: num_additional_image_tokens=1, "default"; SigLIP: 0, "full");
- prompt ids with BOS (the tokenizer's post-processor adds it, unless the rendered template
  already starts with the BOS text, as `apply_chat_template(tokenize=True)` does), never
  truncated;
- response ids = tokens of `answer_prefix + answer` + EOS, where answer_prefix is what the
  template puts between its generation prompt and the assistant's words: " " for llava_v1
  (the space after "ASSISTANT:") and for llava-1.5's chat template, "" for ChatML-style
  templates whose generation prompt ends with a newline. Decoded generations may therefore
  start with a space: `decode_response` strips it;
- pixel values [C, H, W] float32 from the checkpoint's transformers image processor
  (PIL backends, no torchvision; see `image_processing`), after converting the image to RGB.

`LlavaPromptProcessor.from_hf(dir)` builds all of this from a transformers checkpoint
directory (hub/v4 or transformers-5 layout) or from this project's own export.

Anyres checkpoints (LLaVA-NeXT, LLaVA-OneVision; `is_anyres`): the image processor tiles each
image (base image + best-fit grid, `LlavaNextImageProcessorPil` /
`LlavaOnevisionImageProcessorPil`), pixel values are [N_max, C, H, W] per image (zero tiles
after the used ones, N_max static from the pinpoints) with the original `image_size` (h, w),
and `<image>` expands to transformers' `LlavaNextProcessor` / `LlavaOnevisionProcessor`
`_get_number_of_features` count for that original size. OneVision's transformers processor
needs a video processor (torchvision), so it is built here from the image processor,
tokenizer and chat template instead.

Uniform entry points for every kind: `image_inputs(images)` (model keyword arguments) and
`encode_prompts(questions, image_inputs)`.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
from jinja2 import TemplateError
from PIL import Image
from transformers import AutoTokenizer, LlavaProcessor

from perpo_jax.atomic import atomic_dir
from perpo_jax.data.chat_templates import QWEN_1_5_RESPONSE_END, qwen_1_5_prompt
from perpo_jax.data.image_processing import (ANYRES, ASPECT_RATIOS, anyres_max_tiles,
                                             load_image_processor, to_rgb_image,
                                             with_aspect_ratio)
from perpo_jax.hf import read_config
from perpo_jax.models import LlavaConfig, LlavaNextConfig, anyres

LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's "
                   "questions.")
TEMPLATES = ("auto", "chat_template", "llava_v1", "qwen_1_5")
_CONFIG_NAME = "perpo_processor.json"
_ANSWER_MARK = "<<perpo-answer>>"


def llava_v1_prompt(question: str, image_token: str = "<image>") -> str:
    """The LLaVA-v1 single-turn prompt with one (unexpanded) image token."""
    return f"{LLAVA_V1_SYSTEM} USER: {image_token}\n{question} ASSISTANT:"


def _user_turn(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def _single_template(template) -> str | None:
    """A chat template string from transformers' str | {name: str} | None forms."""
    return template.get("default") if isinstance(template, dict) else template


class LlavaPromptProcessor:
    """Tokenizer + image processor + prompt template + the LlavaProcessor image-token rule.

    Args:
      tokenizer: a transformers tokenizer whose vocabulary has `image_token` and EOS.
      image_processor: a transformers image processor returning `pixel_values`.
      patch_size: the vision tower's patch size (pixels).
      vision_feature_select_strategy: "default" (drop CLS) or "full".
      num_additional_image_tokens: extra vision features besides patches (CLIP CLS: 1).
      template: "llava_v1", "chat_template", "qwen_1_5" (LLaVA-NeXT's ChatML conversation,
        responses ending in <|im_end|>), or "auto" (chat_template when there is one).
      chat_template: the Jinja chat template; defaults to the tokenizer's.
      image_aspect_ratio: "checkpoint" (use `image_processor` as is), "pad" or "crop"
        (see `image_processing.with_aspect_ratio`); anyres processors take "checkpoint" only.
      anyres: None (plain LLaVA), "llava_next" or "llava_onevision": `image_processor` tiles
        (its `image_grid_pinpoints`) and `<image>` expands per image size.
      vision_aspect_ratio: OneVision's "anyres_max_N" (feature reduction; default N = 9).
      num_image_tokens: OneVision's features per tile (processor_config.json); default
        (tile // patch_size)^2.
    """

    def __init__(self, tokenizer, image_processor, *, patch_size: int,
                 vision_feature_select_strategy: str = "default",
                 num_additional_image_tokens: int = 1, image_token: str = "<image>",
                 template: str = "llava_v1", chat_template: str | None = None,
                 image_aspect_ratio: str = "checkpoint", anyres: str | None = None,
                 vision_aspect_ratio: str | None = None, num_image_tokens: int | None = None):
        if anyres is not None and anyres not in ANYRES:
            raise ValueError(f"anyres must be None or one of {sorted(ANYRES)}, got {anyres!r}")
        if anyres is not None and image_aspect_ratio != "checkpoint":
            raise ValueError(f"image_aspect_ratio={image_aspect_ratio!r} does not apply to an "
                             f"anyres ({anyres}) processor; use 'checkpoint'")
        if vision_feature_select_strategy not in ("default", "full"):
            raise ValueError("vision_feature_select_strategy must be 'default' or 'full', got "
                             f"{vision_feature_select_strategy!r}")
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
        self.tokenizer = tokenizer
        self.image_processor = with_aspect_ratio(image_processor, image_aspect_ratio)
        self.image_aspect_ratio = image_aspect_ratio
        self.patch_size = patch_size
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.num_additional_image_tokens = num_additional_image_tokens
        self.image_token = image_token
        self.anyres = anyres
        self.vision_aspect_ratio = None
        self.anyres_num_image_tokens = None
        if anyres is not None:
            self._init_anyres(vision_aspect_ratio, num_image_tokens)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no token {image_token!r}")
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no eos_token")
        chat_template = chat_template or _single_template(getattr(tokenizer, "chat_template", None))
        if template == "auto":
            template = "chat_template" if chat_template else "llava_v1"
        if template == "chat_template" and not chat_template:
            raise ValueError("template='chat_template' but neither the checkpoint nor its "
                             "tokenizer has a chat template")
        self.template = template
        self.chat_template = chat_template if template == "chat_template" else None
        # transformers' own renderer, so prompts are exactly what LlavaProcessor users get.
        self._chat = None if self.chat_template is None else LlavaProcessor(
            image_processor=self.image_processor, tokenizer=tokenizer, patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            num_additional_image_tokens=num_additional_image_tokens,
            chat_template=self.chat_template, image_token=image_token)
        if template == "qwen_1_5":  # the prompt ends with "assistant\n": the answer follows
            self.answer_prefix = ""
        else:
            self.answer_prefix = " " if self._chat is None else self._chat_answer_prefix()
        self.stop_token_id = self._stop_token_id()

    def _stop_token_id(self) -> int:
        """The token that ends a response: <|im_end|> for qwen_1_5 (a base Qwen2 tokenizer's
        EOS is <|endoftext|>, which the official run never trains on), else EOS."""
        if self.template != "qwen_1_5":
            return int(self.tokenizer.eos_token_id)
        end = self.tokenizer.convert_tokens_to_ids(QWEN_1_5_RESPONSE_END)
        if end is None or end == self.tokenizer.unk_token_id:
            raise ValueError(f"template='qwen_1_5' needs {QWEN_1_5_RESPONSE_END!r} in the "
                             "tokenizer's vocabulary (a Qwen2 tokenizer)")
        return int(end)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Token ids that end generation: the response end, and EOS when different."""
        return tuple(dict.fromkeys((self.stop_token_id, int(self.tokenizer.eos_token_id))))

    # ------------------------------------------------------------------ pieces

    def _init_anyres(self, vision_aspect_ratio: str | None, num_image_tokens: int | None):
        """Tile geometry of an anyres image processor: tile size, static tile count."""
        if self.anyres == "llava_onevision":
            self.vision_aspect_ratio = vision_aspect_ratio or "anyres_max_9"
            anyres.parse_max_tiles(self.vision_aspect_ratio)
        self.pinpoints = [tuple(int(v) for v in p)
                          for p in self.image_processor.image_grid_pinpoints]
        self.max_tiles = anyres_max_tiles(self.image_processor)
        probe = self.image_processor(images=[Image.new("RGB", (4, 3))], return_tensors="np")
        self.tile_height, self.tile_width = np.asarray(probe["pixel_values"]).shape[-2:]
        if self.anyres == "llava_onevision":
            self.anyres_num_image_tokens = (num_image_tokens
                                            or (self.tile_height // self.patch_size) ** 2)

    @property
    def is_anyres(self) -> bool:
        """True for LLaVA-NeXT / OneVision tiling (pixel_values [N, C, H, W] + image_size)."""
        return self.anyres is not None

    def num_image_tokens(self, height: int, width: int) -> int:
        """Image tokens of one image: for plain LLaVA, of a processed [.., H, W] image
        (LlavaProcessor's rule); for anyres, of an ORIGINAL height x width image
        (LlavaNextProcessor / LlavaOnevisionProcessor `_get_number_of_features`)."""
        if self.is_anyres:
            return self._anyres_tokens(int(height), int(width))
        n = (height // self.patch_size) * (width // self.patch_size)
        n += self.num_additional_image_tokens
        return n - 1 if self.vision_feature_select_strategy == "default" else n

    def _anyres_tokens(self, height: int, width: int) -> int:
        """transformers' count: base + unpadded grid + one newline per row (OneVision: grid
        reduced to ~anyres_max_N tiles), minus the CLS for the "default" strategy."""
        best_h, best_w = anyres.select_best_resolution(height, width, self.pinpoints)
        if self.anyres == "llava_onevision":
            side = int(math.sqrt(self.anyres_num_image_tokens))
            patches_h = patches_w = side
            base = self.anyres_num_image_tokens
        else:
            patches_h = self.tile_height // self.patch_size
            patches_w = self.tile_width // self.patch_size
            base = patches_h * patches_w + self.num_additional_image_tokens
        rows, cols = anyres.unpadded_grid(height, width, patches_h * (best_h // self.tile_height),
                                          patches_w * (best_w // self.tile_width))
        if self.anyres == "llava_onevision":
            rows, cols = anyres.reduced_grid(rows, cols, anyres.parse_max_tiles(
                self.vision_aspect_ratio), patches_h)
        n = base + rows * cols + rows
        return n - 1 if self.vision_feature_select_strategy == "default" else n

    def pixel_values(self, images: list[Any]) -> np.ndarray:
        """float32 pixel values of a list of PIL images (any mode) / uint8 [H, W(, C)] arrays:
        [B, C, H, W], or for anyres [B, N_max, C, H, W] (unused tiles zero)."""
        return self.image_inputs(images)["pixel_values"]

    def image_inputs(self, images: list[Any]) -> dict[str, np.ndarray]:
        """Model keyword arguments for a list of images: {"pixel_values": [B, C, H, W] f32}, or
        for anyres {"pixel_values": [B, N_max, C, H, W] f32 (rows zero-padded to the static
        tile count), "image_sizes": [B, 2] int32 (original height, width)}."""
        rgb = [to_rgb_image(image) for image in images]
        out = self.image_processor(images=rgb, return_tensors="np")
        pixels = np.asarray(out["pixel_values"], dtype=np.float32)
        if not self.is_anyres:
            return {"pixel_values": pixels}
        padded = np.zeros((len(rgb), self.max_tiles) + pixels.shape[2:], np.float32)
        padded[:, : pixels.shape[1]] = pixels
        return {"pixel_values": padded,
                "image_sizes": np.asarray(out["image_sizes"], dtype=np.int32).reshape(-1, 2)}

    def prompt_sizes(self, images: list[Any]) -> list[tuple[int, int]]:
        """(height, width) per image as `encode_prompt` takes it, without processing every
        image: anyres, the original size; plain LLaVA, the processed size (the same for all
        images, so one image is processed)."""
        if not images:
            return []
        if self.is_anyres:
            return [to_rgb_image(image).size[::-1] for image in images]
        h, w = self.pixel_values(images[:1]).shape[-2:]
        return [(int(h), int(w))] * len(images)

    def encode_prompts(self, questions: list[str], image_inputs: dict[str, np.ndarray]
                       ) -> list[np.ndarray]:
        """[P_i] int32 prompt ids per question, `<image>` expanded to what the model makes of
        image i of `image_inputs` (as `image_inputs` returned it)."""
        if self.is_anyres:
            sizes = np.asarray(image_inputs["image_sizes"]).reshape(-1, 2)
        else:
            h, w = np.asarray(image_inputs["pixel_values"]).shape[-2:]
            sizes = np.tile([h, w], (len(questions), 1))
        if len(sizes) != len(questions):
            raise ValueError(f"{len(questions)} questions but {len(sizes)} images")
        return [self.encode_prompt(q, int(h), int(w)) for q, (h, w) in zip(questions, sizes)]

    def prompt_text(self, question: str) -> str:
        """The template's prompt for `question`, with one unexpanded image token."""
        if self.template == "qwen_1_5":
            return qwen_1_5_prompt(question, self.image_token)
        if self._chat is None:
            return llava_v1_prompt(question, self.image_token)
        return self._chat.apply_chat_template(_user_turn(question), add_generation_prompt=True)

    def encode_prompt(self, question: str, height: int, width: int) -> np.ndarray:
        """[P] int32: BOS + prompt with `<image>` expanded for an H x W image (processed size
        for plain LLaVA, original size for anyres: see `num_image_tokens`)."""
        text = self.prompt_text(question)
        expanded = self.image_token * self.num_image_tokens(height, width)
        text = text.replace(self.image_token, expanded)
        # A template that writes the BOS text itself must not get a second one (transformers'
        # apply_chat_template(tokenize=True) rule); llava_v1 never does.
        # qwen_1_5 is the whole conversation as LLaVA-NeXT tokenises it: no BOS, ever.
        bos = self.tokenizer.bos_token
        add_bos = self.template != "qwen_1_5" and not (bos and text.startswith(bos))
        return np.asarray(self.tokenizer(text, add_special_tokens=add_bos)["input_ids"],
                          dtype=np.int32)

    def encode_response(self, answer: str) -> np.ndarray:
        """[R] int32: tokens of `answer_prefix + answer` followed by the stop token (EOS;
        <|im_end|> for qwen_1_5)."""
        ids = self.tokenizer(self.answer_prefix + answer, add_special_tokens=False)["input_ids"]
        return np.asarray(list(ids) + [self.stop_token_id], dtype=np.int32)

    def decode_response(self, ids) -> str:
        """Text of generated ids, up to the first stop token (`stop_ids`), special tokens and
        outer spaces removed."""
        ids = [int(i) for i in ids]
        stops = [ids.index(s) for s in self.stop_ids if s in ids]
        if stops:
            ids = ids[: min(stops)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def __call__(self, image, question: str, answer: str | None = None) -> dict[str, np.ndarray]:
        """{"pixel_values": [C, H, W] f32, "prompt_ids": [P] i32, "response_ids": [R] i32?};
        anyres: pixel_values [N_max, C, H, W] and "image_size" [2] i32 (original h, w)."""
        inputs = self.image_inputs([image])
        out = {"pixel_values": inputs["pixel_values"][0],
               "prompt_ids": self.encode_prompts([question], inputs)[0]}
        if self.is_anyres:
            out["image_size"] = inputs["image_sizes"][0]
        if answer is not None:
            out["response_ids"] = self.encode_response(answer)
        return out

    def _chat_answer_prefix(self) -> str:
        """What the chat template writes between its generation prompt and the assistant's
        words, read off a rendered two-turn conversation ("" when the assistant turn does not
        continue the generation prompt, or the template cannot render one)."""
        user = _user_turn("?")
        prompt = self._chat.apply_chat_template(user, add_generation_prompt=True)
        answer = [{"role": "assistant", "content": [{"type": "text", "text": _ANSWER_MARK}]}]
        try:
            full = self._chat.apply_chat_template(user + answer)
        except (TemplateError, ValueError, TypeError):
            return ""
        if not full.startswith(prompt) or _ANSWER_MARK not in full[len(prompt):]:
            return ""
        return full[len(prompt): full.index(_ANSWER_MARK, len(prompt))]

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_hf(cls, hf_dir: str, template: str = "auto", image_aspect_ratio: str = "checkpoint",
                tokenizer_path: str | None = None) -> "LlavaPromptProcessor":
        """The processor of a LLaVA checkpoint directory, as transformers builds it.

        Reads the image processor the checkpoint names (`image_processing.load_image_processor`),
        the tokenizer (from `tokenizer_path` when given), the chat template (chat_template.jinja,
        chat_template.json or processor_config.json, else the tokenizer's) and the image-token
        settings (processor_config.json, falling back to config.json: patch size, feature
        strategy, +1 CLS feature for CLIP). This project's exports (with perpo_processor.json)
        load as saved; a template / image_aspect_ratio other than "auto" / "checkpoint"
        overrides what they saved.

        Args:
          template: "auto" | "chat_template" | "llava_v1".
          image_aspect_ratio: "pad" | "crop" | "checkpoint".
        Raises FileNotFoundError / ValueError naming the file at fault.
        """
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
        if image_aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(f"image_aspect_ratio must be one of {ASPECT_RATIOS}, "
                             f"got {image_aspect_ratio!r}")
        if not os.path.isdir(hf_dir):
            raise FileNotFoundError(f"{hf_dir}: no such checkpoint directory")
        tokenizer = _load_tokenizer(tokenizer_path) if tokenizer_path else None
        if os.path.isfile(os.path.join(hf_dir, _CONFIG_NAME)):
            saved = cls.from_pretrained(hf_dir)
            tokenizer = tokenizer or saved.tokenizer
            return cls(tokenizer, saved.image_processor, patch_size=saved.patch_size,
                       vision_feature_select_strategy=saved.vision_feature_select_strategy,
                       num_additional_image_tokens=saved.num_additional_image_tokens,
                       image_token=saved.image_token,
                       template=saved.template if template == "auto" else template,
                       chat_template=saved.chat_template,
                       image_aspect_ratio=(saved.image_aspect_ratio
                                           if image_aspect_ratio == "checkpoint"
                                           else image_aspect_ratio),
                       **saved._anyres_settings())
        model = read_config(hf_dir)
        if not isinstance(model, LlavaConfig):
            raise ValueError(f"{hf_dir}/config.json: not a LLaVA checkpoint")
        kind = model.model_type if isinstance(model, LlavaNextConfig) else None
        # processor_config.json and chat template files, exactly as LlavaProcessor reads them.
        try:
            settings, _ = LlavaProcessor.get_processor_dict(hf_dir, local_files_only=True)
        except OSError as e:  # e.g. a processor_config.json that is not JSON
            raise ValueError(f"{hf_dir}: {e}") from e
        tokenizer = tokenizer or _load_tokenizer(hf_dir)
        chat_template = (_single_template(settings.get("chat_template"))
                         or _single_template(getattr(tokenizer, "chat_template", None)))
        if template == "chat_template" and not chat_template:
            raise ValueError(
                f"{hf_dir}: template='chat_template' but the checkpoint has no chat template "
                "(no chat_template.jinja, chat_template.json, 'chat_template' in "
                "processor_config.json, or tokenizer chat_template)")
        extra = settings.get("num_additional_image_tokens")
        if extra is None:  # older processor configs omit it; the CLIP CLS feature is one
            extra = 1 if model.vision.family == "clip" else 0
        anyres_kw = {}
        if kind is not None:
            anyres_kw = dict(anyres=kind, vision_aspect_ratio=(settings.get("vision_aspect_ratio")
                                                                or model.vision_aspect_ratio),
                             num_image_tokens=settings.get("num_image_tokens"))
        processor = cls(
            tokenizer, load_image_processor(hf_dir, kind or "llava"),
            patch_size=settings.get("patch_size") or model.vision.patch_size,
            vision_feature_select_strategy=(settings.get("vision_feature_select_strategy")
                                            or model.vision_feature_select_strategy),
            num_additional_image_tokens=extra,
            image_token=(getattr(tokenizer, "image_token", None) or settings.get("image_token")
                         or "<image>"),
            template=template, chat_template=chat_template,
            image_aspect_ratio=image_aspect_ratio, **anyres_kw)
        _check_geometry(processor, model, hf_dir)
        return processor

    def _anyres_settings(self) -> dict:
        """The constructor arguments of the anyres kind (empty for plain LLaVA)."""
        if not self.is_anyres:
            return {}
        return {"anyres": self.anyres, "vision_aspect_ratio": self.vision_aspect_ratio,
                "num_image_tokens": self.anyres_num_image_tokens}

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
                           "image_token": self.image_token,
                           "template": self.template,
                           "chat_template": self.chat_template,
                           "image_aspect_ratio": self.image_aspect_ratio,
                           **self._anyres_settings()}, f, indent=2)

    @classmethod
    def from_pretrained(cls, path: str) -> "LlavaPromptProcessor":
        """Load what `save_pretrained` wrote (PIL-backend image processors, no torchvision).

        Directories saved before templates existed load with the llava_v1 template."""
        config_file = os.path.join(path, _CONFIG_NAME)
        if not os.path.exists(config_file):
            raise FileNotFoundError(f"{config_file} not found: not a saved LlavaPromptProcessor")
        with open(config_file) as f:
            settings = json.load(f)
        # The saved image processor already has its aspect-ratio mode applied; re-applying it
        # is a no-op, so the mode is kept only as a label.
        return cls(_load_tokenizer(path), load_image_processor(path, settings.get("anyres") or "llava"),
                   **settings)


def _load_tokenizer(path: str):
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot load a tokenizer: {e}") from e


# Original image sizes (h, w) on which an anyres processor and its model must agree.
_PROBE_SIZES = ((3, 4), (4, 3), (5, 5), (1, 97), (97, 1), (480, 640), (1000, 333), (2048, 1536))


def _check_geometry(processor: LlavaPromptProcessor, model: LlavaConfig, hf_dir: str) -> None:
    """The prompt must hold exactly as many image tokens as the vision tower gives features."""
    if isinstance(model, LlavaNextConfig) or processor.is_anyres:
        _check_anyres_geometry(processor, model, hf_dir)
        return
    height, width = processor.pixel_values([Image.new("RGB", (4, 3))]).shape[-2:]
    got = processor.num_image_tokens(height, width)
    if got != model.num_image_tokens:
        raise ValueError(
            f"{hf_dir}: the processor gives {got} image tokens per image ({height}x{width} "
            f"pixels, patch {processor.patch_size}, strategy "
            f"{processor.vision_feature_select_strategy!r}, "
            f"+{processor.num_additional_image_tokens} extra) but config.json's vision tower "
            f"gives {model.num_image_tokens} features")


def _check_anyres_geometry(processor: LlavaPromptProcessor, model: LlavaConfig, hf_dir: str):
    """Same tiling kind, tile count and per-image token counts as config.json's model."""
    kind = model.model_type if isinstance(model, LlavaNextConfig) else "llava"
    if processor.anyres != kind:
        raise ValueError(f"{hf_dir}: the image processor tiles for {processor.anyres} but "
                         f"config.json is a {kind} model")
    if processor.max_tiles != model.max_tiles:
        raise ValueError(f"{hf_dir}: the image processor gives up to {processor.max_tiles} tiles "
                         f"per image but config.json's pinpoints give {model.max_tiles}")
    for height, width in _PROBE_SIZES:
        got, want = processor.num_image_tokens(height, width), model.image_tokens(height, width)
        if got != want:
            raise ValueError(
                f"{hf_dir}: for a {height}x{width} image the processor gives {got} image tokens "
                f"but config.json's model gives {want} features")
