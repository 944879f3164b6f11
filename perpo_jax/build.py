"""Config → live objects: the mesh, the prepared data + processor, the model, prompt batches.

The training loop, the evaluator and the CLI all go through these functions, so a run, its
evaluation and its export see the same dataset, tokenizer and model geometry:

    cfg = load_config("configs/demo_shapes.yaml")
    mesh = build_mesh(cfg)
    data = prepare_data(cfg)                    # builds under cfg.data.data_dir once, then reuses
    model = build_model(cfg, mesh, data.processor)
    batch = prompt_batch_for([record_example(data.val[i]) for i in range(4)], data.processor, None)

Where things live under `cfg.data.data_dir`:
    <builder name>/<config name>/<version>/...      TFDS array_record files
    processors/<dataset>-img<S>-p<patch>-v<vocab>/   LlavaPromptProcessor (tokenizer + image
                                                    processor) for a model without hf_path
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
import re
import tempfile
from typing import Any

import numpy as np

from perpo_jax.config import Config, ConfigError

SYNTHETIC_SOURCES = ("shapes_grounding", "shapes_ocr")
DEFAULT_VOCAB_SIZE = 512  # BPE target for a tokenizer trained on the dataset (model.tiny.vocab_size)
# tiny_llava_config arguments that build_model sets itself, never from model.tiny
_TINY_RESERVED = ("image_token_id", "dtype", "param_dtype")


class ModelProcessorMismatch(ValueError):
    """The model's image token / vocabulary disagree with the processor's tokenizer."""


@dataclasses.dataclass(frozen=True)
class DataHandle:
    """A prepared dataset.

    train / val: random-access sources (`len()`, `__getitem__(i)` → TFDS record dict);
      `val` is None for sources without a val split (official_json lists).
    processor: the `LlavaPromptProcessor` the model is trained and evaluated with.
    task: "grounding" | "ocr" (a key of `perpo_jax.rewards.REWARDS`).
    data_dir: where the dataset lives; processor_dir: the processor's files (copied into HF
      exports), None when they come from `model.hf_path`.
    skipped: entries left out under `data.skip_invalid` (`refcoco_style.Skipped`).
    """

    train: Any
    val: Any | None
    processor: Any
    task: str
    data_dir: str
    processor_dir: str | None = None
    skipped: tuple = ()


@dataclasses.dataclass(frozen=True)
class Example:
    """One decoded record. image HWC uint8; box [4] float32 normalised or None (OCR);
    responses / rewards [N]: pre-sampled candidate list (official lists) or None."""

    image: np.ndarray
    question: str
    answer: str
    box: np.ndarray | None = None
    responses: list[str] | None = None
    rewards: np.ndarray | None = None


# ----------------------------------------------------------------------------- mesh


def build_mesh(cfg: Config):
    """`Mesh(data, fsdp, tensor)` of `cfg.mesh.shape` over every device."""
    from perpo_jax.mesh import make_mesh

    try:
        return make_mesh(cfg.mesh.shape)
    except ValueError as e:
        raise ConfigError(f"mesh.shape: {e}") from None


# ----------------------------------------------------------------------------- records


def _text(value) -> str:
    """TFDS Text features come back as bytes; the one place they become str."""
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return _text(value.item())
    return str(value)


def record_example(record: dict) -> Example:
    """Decodes one TFDS record (any of this package's builders) into an `Example`.

    Official lists carry no `box` feature; their box is read from the answer text.
    """
    from perpo_jax.rewards import parse_box

    image = np.asarray(record["image"])
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f"record image must be HWC uint8, got {image.shape} {image.dtype}")
    answer = _text(record["answer"])
    box = record.get("box")
    box = None if box is None else np.asarray(box, np.float32).reshape(4)
    responses = rewards = None
    if "candidates" in record:
        responses = [_text(c) for c in record["candidates"]]
        rewards = np.asarray(record["scores"], np.float32)
        if box is None:
            box = parse_box(answer)
    return Example(image=image, question=_text(record["question"]), answer=answer, box=box,
                   responses=responses, rewards=rewards)


def prompt_batch_for(examples: list[Example], processor, max_length: int | None) -> dict:
    """The sampler's prompts batch: prompt_ids [B, P] int32, prompt_mask [B, P] bool,
    pixel_values [B, C, H, W] f32. P = `max_length` (None: the longest prompt)."""
    from perpo_jax.data.batching import prompt_batch

    if not examples:
        raise ValueError("prompt_batch_for needs at least one example")
    return prompt_batch(processor, [e.image for e in examples], [e.question for e in examples],
                        max_length)


# ----------------------------------------------------------------------------- data


def _tiny_kwargs(cfg: Config) -> dict:
    """`model.tiny` checked against tiny_llava_config's arguments (errors name the key)."""
    from perpo_jax.models import tiny_llava_config

    allowed = set(inspect.signature(tiny_llava_config).parameters) - set(_TINY_RESERVED)
    for key in cfg.model.tiny:
        if key in _TINY_RESERVED:
            raise ConfigError(f"model.tiny.{key}: set by perpo_jax (tokenizer / model.dtype), "
                              "remove it")
        if key not in allowed:
            raise ConfigError(f"model.tiny.{key}: unknown; allowed: {', '.join(sorted(allowed))}")
    return dict(cfg.model.tiny)


def tiny_geometry(cfg: Config) -> tuple[int, int]:
    """(image_size, patch_size) in pixels of the tiny model `model.tiny` describes."""
    from perpo_jax.models import tiny_llava_config

    kwargs = {k: v for k, v in _tiny_kwargs(cfg).items() if k != "vocab_size"}
    try:
        vision = tiny_llava_config(**kwargs).vision
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.tiny: {e}") from None
    return vision.image_size, vision.patch_size


def _slug(text: str) -> str:
    """A TFDS-config-safe name for a file path: readable stem + hash of the absolute path."""
    digest = hashlib.sha1(os.path.abspath(text).encode()).hexdigest()[:10]
    stem = re.sub(r"[^a-z0-9]+", "_", os.path.splitext(os.path.basename(text))[0].lower())
    return f"{stem.strip('_') or 'data'}_{digest}"


def _build_dataset(cfg: Config):
    """Prepares (or reuses) the TFDS dataset → (builder, skipped entries)."""
    d = cfg.data
    os.makedirs(d.data_dir, exist_ok=True)
    if d.source == "shapes_grounding":
        from perpo_jax.data import shapes_grounding
        return shapes_grounding.build(d.data_dir, num_train=d.num_train, num_val=d.num_val,
                                      image_size=d.image_size, seed=d.seed,
                                      min_objects=d.min_objects, max_objects=d.max_objects,
                                      relations=d.relations), ()
    if d.source == "shapes_ocr":
        from perpo_jax.data import shapes_ocr
        return shapes_ocr.build(d.data_dir, num_train=d.num_train, num_val=d.num_val,
                                image_size=d.image_size, seed=d.seed), ()
    from perpo_jax.data import refcoco_builders

    if d.image_dir is None:
        raise ConfigError(f"data.image_dir: required for data.source={d.source!r}")
    for key, path in (("data.path", d.path), ("data.image_dir", d.image_dir)):
        if not os.path.exists(path):
            raise ConfigError(f"{key}: {path} does not exist")
    build = (refcoco_builders.build_refcoco_style if d.source == "refcoco_style"
             else refcoco_builders.build_official_lists)
    builder, skipped = build(d.data_dir, d.path, d.image_dir, name=_slug(d.path),
                             skip_invalid=d.skip_invalid)
    return builder, tuple(skipped)


def _splits(builder, source: str):
    """(train, val) random-access sources; val None where the data has no val split."""
    sources = builder.as_data_source()
    if "train" not in sources:
        raise ConfigError(f"data.source={source!r}: dataset {builder.name} has no 'train' split "
                          f"(splits: {sorted(sources)})")
    return sources["train"], sources.get("val")


def _train_tokenizer(train, vocab_size: int, out_dir: str, progress: bool):
    """A BPE tokenizer trained on the train questions + answers, saved to `out_dir`."""
    from tqdm.auto import tqdm

    from perpo_jax.data.tokenizer import tokenizer_corpus, train_tokenizer

    questions, answers = [], []
    for i in tqdm(range(len(train)), desc="tokenizer corpus", unit="ex", disable=not progress):
        record = train[i]
        questions.append(_text(record["question"]))
        answers.append(_text(record["answer"]))
    return train_tokenizer(tokenizer_corpus(questions, answers), vocab_size, out_dir)


def _clip_image_processor(image_size: int):
    """CLIP preprocessing (PIL backend, no torchvision) producing image_size² crops."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                 crop_size={"height": image_size, "width": image_size})


def _local_processor(cfg: Config, builder, train, progress: bool):
    """Processor for a model without hf_path: saved next to the data, reused when present."""
    from transformers import AutoTokenizer

    from perpo_jax.data.processor import LlavaPromptProcessor

    image_size, patch = tiny_geometry(cfg)
    vocab = int(_tiny_kwargs(cfg).get("vocab_size", DEFAULT_VOCAB_SIZE))
    name = f"{builder.name}-{builder.builder_config.name}-img{image_size}-p{patch}-v{vocab}"
    if cfg.data.tokenizer is not None:
        name += f"-tok_{_slug(cfg.data.tokenizer)}"
    out_dir = os.path.join(os.path.abspath(cfg.data.data_dir), "processors", name)
    if os.path.exists(os.path.join(out_dir, "perpo_processor.json")):
        return LlavaPromptProcessor.from_pretrained(out_dir), out_dir
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(out_dir)) as scratch:
        if cfg.data.tokenizer is not None:
            tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer)
        else:  # trained into scratch; the processor dir keeps the one copy
            tokenizer = _train_tokenizer(train, vocab, os.path.join(scratch, "tok"), progress)
        processor = LlavaPromptProcessor(tokenizer, _clip_image_processor(image_size),
                                         patch_size=patch, vision_feature_select_strategy="default",
                                         num_additional_image_tokens=1)
        processor.save_pretrained(out_dir)
    return LlavaPromptProcessor.from_pretrained(out_dir), out_dir


def _hf_processor(cfg: Config):
    """Processor of `model.hf_path` (tokenizer from `data.tokenizer` when set)."""
    import json

    from transformers import AutoTokenizer, CLIPImageProcessorPil, SiglipImageProcessorPil

    from perpo_jax.data.processor import LlavaPromptProcessor
    from perpo_jax.hf import read_config
    from perpo_jax.models import LlavaConfig

    path = cfg.model.hf_path
    if cfg.data.tokenizer is None and os.path.exists(os.path.join(path, "perpo_processor.json")):
        return LlavaPromptProcessor.from_pretrained(path)  # our own export
    model_cfg = read_config(path)
    if not isinstance(model_cfg, LlavaConfig):
        raise ConfigError(f"model.hf_path: {path} is not a LLaVA checkpoint")
    pre = os.path.join(path, "preprocessor_config.json")
    if not os.path.exists(pre):
        raise ConfigError(f"model.hf_path: {path} has no preprocessor_config.json")
    with open(pre) as f:
        kind = json.load(f).get("image_processor_type", "")
    image_cls = SiglipImageProcessorPil if "Siglip" in kind else CLIPImageProcessorPil
    tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer or path)
    return LlavaPromptProcessor(
        tokenizer, image_cls.from_pretrained(path), patch_size=model_cfg.vision.patch_size,
        vision_feature_select_strategy=model_cfg.vision_feature_select_strategy,
        num_additional_image_tokens=1 if model_cfg.vision.family == "clip" else 0,
        image_token=getattr(tokenizer, "image_token", None) or "<image>")


def prepare_data(cfg: Config, *, progress: bool = True) -> DataHandle:
    """Builds (once) and opens the dataset and processor `cfg.data` / `cfg.model` describe.

    Idempotent: the dataset's TFDS config name and the processor dir name encode every
    setting, so a second call (or another run with the same settings) reuses the files.
    TFDS shows its own per-split generation progress bar.
    """
    from perpo_jax.rewards import REWARDS

    if cfg.data.task not in REWARDS:
        raise ConfigError(f"data.task: {cfg.data.task!r} is not a registered reward "
                          f"({', '.join(sorted(REWARDS))})")
    builder, skipped = _build_dataset(cfg)
    train, val = _splits(builder, cfg.data.source)
    if cfg.model.hf_path is not None:
        processor, processor_dir = _hf_processor(cfg), None
    else:
        processor, processor_dir = _local_processor(cfg, builder, train, progress)
    return DataHandle(train=train, val=val, processor=processor, task=cfg.data.task,
                      data_dir=os.path.abspath(cfg.data.data_dir), processor_dir=processor_dir,
                      skipped=skipped)


# ----------------------------------------------------------------------------- model


def check_model_processor(model_config, processor) -> None:
    """The model must know the processor's `<image>` id and every token id it can emit."""
    tokenizer = processor.tokenizer
    vocab = model_config.text.vocab_size
    if model_config.image_token_id != processor.image_token_id:
        raise ModelProcessorMismatch(
            f"model image_token_id={model_config.image_token_id} but the processor's tokenizer "
            f"maps {processor.image_token!r} to {processor.image_token_id}")
    if vocab < len(tokenizer):
        raise ModelProcessorMismatch(
            f"model vocab_size={vocab} is smaller than the processor's tokenizer "
            f"({len(tokenizer)} tokens)")


def _remat_config(cfg: Config, model_config):
    """A LlavaConfig with `model.remat` applied to its decoder."""
    return model_config.replace(text=model_config.text.replace(remat=cfg.model.remat))


def tiny_model_config(cfg: Config, processor):
    """The random tiny LLaVA config for `processor`'s tokenizer and image geometry."""
    from perpo_jax.models import tiny_llava_config

    kwargs = _tiny_kwargs(cfg)
    kwargs.pop("vocab_size", None)  # the tokenizer's target size; the model gets its real size
    image_size, _ = tiny_geometry(cfg)
    kwargs["image_size"] = image_size
    config = tiny_llava_config(len(processor.tokenizer), image_token_id=processor.image_token_id,
                               dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                               **kwargs)
    return _remat_config(cfg, config)


def place_on_mesh(model, mesh):
    """Puts every variable of `model` on its logical sharding over `mesh` (in place)."""
    import jax
    from flax import nnx

    from perpo_jax.mesh import state_shardings

    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, state_shardings(state, mesh)))
    return model


def build_model(cfg: Config, mesh, processor):
    """`model.hf_path` loaded onto `mesh`, else a random tiny LLaVA seeded by `train.seed`.

    Raises ModelProcessorMismatch when the model's image token / vocabulary do not fit
    `processor`'s tokenizer.
    """
    from flax import nnx

    from perpo_jax.models import build_model as new_model
    from perpo_jax.models.config import as_jnp_dtype

    if cfg.model.hf_path is not None:
        from perpo_jax.hf import load_pretrained

        model = load_pretrained(cfg.model.hf_path, dtype=as_jnp_dtype(cfg.model.dtype), mesh=mesh)
        if cfg.model.remat:  # the decoder reads config.remat at call time; HF configs say False
            model.config = _remat_config(cfg, model.config)
            model.language_model.config = model.config.text
        check_model_processor(model.config, processor)
        return model
    config = tiny_model_config(cfg, processor)
    check_model_processor(config, processor)
    model = new_model(config, rngs=nnx.Rngs(cfg.train.seed))
    return place_on_mesh(model, mesh) if mesh is not None else model


# ----------------------------------------------------------------------------- checkpoints
# Two layouts are read:
#  * a training checkpoint (`perpo_jax.checkpoint.Checkpointer` root or one step dir): item
#    `train_state` whose `params` are the trainable variables (LoRA adapters, or every Param);
#    the rest of the model is rebuilt from the config (tiny init / model.hf_path);
#  * a converted params checkpoint (`save_params_checkpoint`): `params/` (orbax, every Param)
#    next to an HF `config.json` and the tokenizer/processor files.

PARAMS_ITEM = "params"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".ckpt")


def is_params_checkpoint(path: str) -> bool:
    """True for a directory written by `save_params_checkpoint`."""
    return (os.path.isdir(os.path.join(path, PARAMS_ITEM))
            and os.path.isfile(os.path.join(path, "config.json")))


def _train_state_dir(path: str) -> str:
    """The `train_state` item of a step dir, or of the latest finalised step of a root."""
    from perpo_jax.checkpoint import STATE_ITEM, Checkpointer

    if os.path.isdir(os.path.join(path, STATE_ITEM)):
        return os.path.join(path, STATE_ITEM)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with Checkpointer(path, save_every=1, async_save=False) as ckpt:
        step = ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"checkpoint {path} holds no finalised step and is not a "
                                "converted params checkpoint")
    return os.path.join(path, str(step), STATE_ITEM)


def _restore_params(item_dir: str, abstract_params, mesh):
    """Restores the `params` entry of an orbax pytree item onto `abstract_params`' shapes and
    dtypes, sharded over `mesh` (the other entries, e.g. optimizer moments, are not read)."""
    import orbax.checkpoint as ocp

    from perpo_jax.checkpoint import restore_target
    from perpo_jax.hf import CheckpointError
    from perpo_jax.mesh import state_shardings

    target = {"params": restore_target(abstract_params, state_shardings(abstract_params, mesh))}
    args = ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            return checkpointer.restore(item_dir, args=args)["params"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"params in {item_dir} do not match the model built from the "
                              f"config (model.tiny / model.hf_path / lora settings?): {e}") from e


def _default_mesh(mesh):
    """`mesh`, or a one-device mesh (restores need a sharding to land on)."""
    import jax

    from perpo_jax.mesh import make_mesh

    return mesh if mesh is not None else make_mesh((1, 1, 1), devices=jax.devices()[:1])


def model_from_checkpoint(cfg: Config, path: str, mesh, processor, *, merge_lora: bool = True):
    """The model saved at `path` (either layout above), on `mesh`.

    Training checkpoints rebuild the model with `build_model(cfg, ...)` (+ LoRA adapters when
    `lora.enabled`) and overwrite its trainable variables; `merge_lora` folds the adapters in.
    `processor` may be None for a converted checkpoint (no agreement check then).
    """
    from flax import nnx

    mesh = _default_mesh(mesh)
    if is_params_checkpoint(path):
        model = _restore_converted(cfg, path, mesh)
    else:
        from perpo_jax.train.lora import apply_lora, merge_lora as merge, trainable_filter

        model = build_model(cfg, mesh, processor)
        if cfg.lora.enabled:
            place_on_mesh(apply_lora(model, cfg.lora, nnx.Rngs(cfg.train.seed)), mesh)
        trainable = nnx.state(model, trainable_filter(cfg.lora))
        nnx.update(model, _restore_params(_train_state_dir(path), trainable, mesh))
        if merge_lora and cfg.lora.enabled:
            merge(model)
    if processor is not None:
        check_model_processor(model.config, processor)
    return model


def _restore_converted(cfg: Config, path: str, mesh):
    from flax import nnx

    from perpo_jax.hf import read_config
    from perpo_jax.models import build_model as new_model
    from perpo_jax.models.config import as_jnp_dtype

    config = read_config(path, as_jnp_dtype(cfg.model.dtype))
    abstract = nnx.eval_shape(lambda: new_model(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    params = _restore_params(os.path.join(path, PARAMS_ITEM), abstract_params, mesh)
    return nnx.merge(graphdef, params)


def save_params_checkpoint(model, out_dir: str, *, source_dir: str | None = None) -> str:
    """Every `nnx.Param` of `model` (orbax, `params/`) + its HF `config.json` + the
    tokenizer/processor files of `source_dir`, written to a temp dir renamed to `out_dir`."""
    import json

    import orbax.checkpoint as ocp
    from flax import nnx

    from perpo_jax.atomic import atomic_dir
    from perpo_jax.hf.config_map import config_to_hf
    from perpo_jax.hf.save import copy_side_files

    out_dir = os.path.abspath(out_dir)
    with atomic_dir(out_dir) as tmp:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(os.path.join(tmp, PARAMS_ITEM), {"params": nnx.state(model, nnx.Param)})
            checkpointer.wait_until_finished()
        if source_dir:
            copy_side_files(source_dir, tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config_to_hf(model.config), f, indent=2, sort_keys=True)
    return out_dir
