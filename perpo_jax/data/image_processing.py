"""Image preprocessing as a LLaVA checkpoint names it, with transformers' PIL backends only.

- `load_image_processor(dir)`: the class in the checkpoint's image-processor settings
  (`image_processor_type` in `preprocessor_config.json` for hub/v4 layouts, or in the
  `image_processor` entry of `processor_config.json`, which transformers 5 writes instead and
  which wins when both exist, as in `AutoImageProcessor`), loaded by
  `AutoImageProcessor.from_pretrained(dir, backend="pil")`. Only the classes LLaVA checkpoints
  use are accepted: their PIL backends need no torchvision. The plain LLaVA classes return one
  [C, H, W] crop per image; `ANYRES` (LLaVA-NeXT / OneVision) return [N_tiles, C, H, W] tiles
  plus the original size, and are accepted only where the caller asks for them.
- `with_aspect_ratio(processor, mode)`: "checkpoint" keeps it; "pad" is LLaVA-1.5's
  `--image_aspect_ratio pad` (pad to square with the image mean, then the checkpoint's
  resize/crop); "crop" is CLIP's resize-shortest-edge + center crop.
- `to_rgb_image(image)`: any PIL mode or uint8 HW/HWC array -> PIL RGB, with transformers' own
  `convert_to_rgb` (alpha composited onto white), so pixels match a transformers processor.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from PIL import Image
from transformers import (AutoImageProcessor, CLIPImageProcessorPil, LlavaImageProcessorPil,
                          LlavaNextImageProcessorPil, LlavaOnevisionImageProcessorPil,
                          SiglipImageProcessorPil)
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_transforms import convert_to_rgb

# The checkpoint's class name (torchvision/legacy "Fast" suffix removed) -> the PIL class we get.
SUPPORTED = {"CLIPImageProcessor": CLIPImageProcessorPil,
             "LlavaImageProcessor": LlavaImageProcessorPil,
             "SiglipImageProcessor": SiglipImageProcessorPil}
# Tiling image processors of LLaVA-NeXT / OneVision checkpoints, by the model_type they serve.
ANYRES = {"llava_next": {"LlavaNextImageProcessor": LlavaNextImageProcessorPil},
          "llava_onevision": {"LlavaOnevisionImageProcessor": LlavaOnevisionImageProcessorPil}}
ASPECT_RATIOS = ("checkpoint", "pad", "crop")
# Settings carried over when "pad"/"crop" rebuild the processor as a LlavaImageProcessorPil.
_SETTINGS = ("do_convert_rgb", "do_resize", "size", "resample", "do_center_crop", "crop_size",
             "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")


def image_processor_type(path: str) -> tuple[str, str]:
    """(class name, file naming it) of the image processor saved in directory `path`."""
    processor_file = os.path.join(path, "processor_config.json")
    image_file = os.path.join(path, "preprocessor_config.json")
    settings, where = None, None
    if os.path.isfile(processor_file):
        settings, where = _read_json(processor_file).get("image_processor"), processor_file
    if settings is None and os.path.isfile(image_file):
        settings, where = _read_json(image_file), image_file
    if settings is None:
        raise FileNotFoundError(
            f"{path}: no image processor settings (neither preprocessor_config.json nor an "
            "'image_processor' entry in processor_config.json)")
    name = settings.get("image_processor_type")
    if name is None and settings.get("feature_extractor_type"):  # pre-2023 saves
        name = settings["feature_extractor_type"].replace("FeatureExtractor", "ImageProcessor")
    if not name:
        raise ValueError(f"{where}: no image_processor_type")
    return name.removesuffix("Fast"), where


def load_image_processor(path: str, model_type: str = "llava") -> BaseImageProcessor:
    """The PIL-backend image processor the checkpoint in `path` names, with its settings.

    model_type: "llava" accepts the single-crop classes (`SUPPORTED`), "llava_next" /
    "llava_onevision" their tiling class (`ANYRES`)."""
    supported = ANYRES.get(model_type, SUPPORTED)
    name, where = image_processor_type(path)
    if name not in supported:
        raise ValueError(f"{where}: image processor class {name!r} is not supported for a "
                         f"{model_type} model (supported: {', '.join(sorted(supported))})")
    processor = AutoImageProcessor.from_pretrained(path, backend="pil", trust_remote_code=False)
    if type(processor) is not supported[name]:  # e.g. a class remapped by a custom registration
        raise ValueError(f"{where}: {name} loaded as {type(processor).__name__}, expected "
                         f"{supported[name].__name__}")
    return processor


def with_aspect_ratio(processor: BaseImageProcessor, mode: str) -> BaseImageProcessor:
    """`processor` itself ("checkpoint"), or a LlavaImageProcessorPil with its settings that
    pads to square with the image mean first ("pad") or center-crops ("crop")."""
    if mode not in ASPECT_RATIOS:
        raise ValueError(f"image_aspect_ratio must be one of {ASPECT_RATIOS}, got {mode!r}")
    if mode == "checkpoint":
        return processor
    settings = {k: v for k, v in processor.to_dict().items() if k in _SETTINGS}
    if mode == "pad":
        return LlavaImageProcessorPil(**settings, do_pad=True)
    # "crop": the output size stays the checkpoint's; only the way there changes. A processor
    # that resizes to a fixed height x width (SigLIP) gets a shortest-edge resize to cover it.
    height, width = _output_size(settings)
    size = settings.get("size") or {}
    edge = size.get("shortest_edge") or max(height, width)
    return LlavaImageProcessorPil(**{**settings, "size": {"shortest_edge": edge},
                                     "crop_size": {"height": height, "width": width},
                                     "do_center_crop": True}, do_pad=False)


def to_rgb_image(image: Any) -> Image.Image:
    """RGB PIL image of a PIL image (any mode) or a uint8 array [H, W] / [H, W, C], C in 1, 3, 4.

    Converted with transformers' `convert_to_rgb` (PIL `convert("RGB")`, transparency
    composited onto white; 16-bit and float modes saturate at 255 as PIL converts them), so the
    result is what a transformers image processor sees. Arrays are converted here, channels
    last, because the processors guess the channel axis of small arrays (a 1 x 1 x 3 image
    reads as channels-first).
    """
    if isinstance(image, Image.Image):
        rgb = convert_to_rgb(image, return_numpy=True)
    elif isinstance(image, np.ndarray):
        array = image[..., None] if image.ndim == 2 else image
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
            raise ValueError(f"image {_describe(image)}: expected a uint8 array [H, W] or "
                             "[H, W, C] with C in (1, 3, 4)")
        rgb = convert_to_rgb(array, return_numpy=True, input_data_format="channels_last")
    else:
        raise ValueError(f"image {_describe(image)}: expected a PIL image or a numpy array")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"image {_describe(image)} is empty")
    return Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB")


def _output_size(settings: dict) -> tuple[int, int]:
    """(H, W) the processor with these settings produces."""
    crop, size = settings.get("crop_size") or {}, settings.get("size") or {}
    if settings.get("do_center_crop") and crop.get("height"):
        return crop["height"], crop["width"]
    if size.get("height"):
        return size["height"], size["width"]
    if size.get("shortest_edge"):  # resize only: a square input comes out edge x edge
        return size["shortest_edge"], size["shortest_edge"]
    raise ValueError(f"cannot tell the output size of image processor settings {settings}")


def _describe(image: Any) -> str:
    if isinstance(image, Image.Image):
        return f"(PIL mode {image.mode!r}, {image.width}x{image.height})"
    if isinstance(image, np.ndarray):
        return f"(array {image.dtype} {list(image.shape)})"
    return f"(of type {type(image).__name__})"


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read: {e}") from e


def anyres_max_tiles(processor: BaseImageProcessor) -> int:
    """Static tile count per image of a tiling (LLaVA-NeXT / OneVision) image processor: the
    base image plus the most tiles any of its `image_grid_pinpoints` is cut into (the tile side
    chosen as transformers' `_preprocess` does: crop height, else size height, else shortest
    edge)."""
    settings = processor.to_dict()
    crop, size = settings.get("crop_size") or {}, settings.get("size") or {}
    tile = crop.get("height") or size.get("height") or size.get("shortest_edge")
    if not tile:
        raise ValueError(f"cannot tell the tile size of image processor settings {settings}")
    pinpoints = settings.get("image_grid_pinpoints") or []
    if not pinpoints:
        raise ValueError(f"{type(processor).__name__} has no image_grid_pinpoints")
    return 1 + max(-(-int(h) // tile) * -(-int(w) // tile) for h, w in pinpoints)
