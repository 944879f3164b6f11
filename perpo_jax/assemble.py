"""Config → a live model on the mesh: the tiny random LLaVA of the demo and tests, or
`model.hf_path` loaded onto its shardings; and the check that it fits the processor.

    mesh = build_mesh(cfg)
    model = build_run_model(cfg, mesh, data.processor)
"""
from __future__ import annotations

import inspect

from flax import nnx

from perpo_jax.config import Config, ConfigError
from perpo_jax.hf import load_pretrained
from perpo_jax.mesh import device_put_global, make_mesh, state_shardings
from perpo_jax.models import build_model as new_model
from perpo_jax.models import tiny_llava_config
from perpo_jax.models.config import as_jnp_dtype

DEFAULT_VOCAB_SIZE = 512  # BPE target for a tokenizer trained on the dataset (model.tiny.vocab_size)
# tiny_llava_config arguments that build_run_model sets itself, never from model.tiny
_TINY_RESERVED = ("image_token_id", "dtype", "param_dtype")


def build_mesh(cfg: Config):
    """`Mesh(data, fsdp, tensor)` of `cfg.mesh.shape` over every device."""
    try:
        return make_mesh(cfg.mesh.shape)
    except ValueError as e:
        raise ConfigError(f"mesh.shape: {e}") from None


def tiny_kwargs(cfg: Config) -> dict:
    """`model.tiny` checked against tiny_llava_config's arguments (errors name the key)."""
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
    kwargs = {k: v for k, v in tiny_kwargs(cfg).items() if k != "vocab_size"}
    try:
        vision = tiny_llava_config(**kwargs).vision
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.tiny: {e}") from None
    return vision.image_size, vision.patch_size


class ModelProcessorMismatch(ValueError):
    """The model's image token / vocabulary disagree with the processor's tokenizer."""



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


def with_model_settings(cfg: Config, model_config):
    """A LlavaConfig with `model.remat` and `model.attention` applied to its decoder (the run's
    settings over what config.json or the tiny spec says)."""
    return model_config.replace(text=model_config.text.replace(
        remat=cfg.model.remat, attention=cfg.model.attention))


def tiny_model_config(cfg: Config, processor):
    """The random tiny LLaVA config for `processor`'s tokenizer and image geometry."""
    kwargs = tiny_kwargs(cfg)
    kwargs.pop("vocab_size", None)  # the tokenizer's target size; the model gets its real size
    image_size, _ = tiny_geometry(cfg)
    kwargs["image_size"] = image_size
    config = tiny_llava_config(len(processor.tokenizer), image_token_id=processor.image_token_id,
                               dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                               **kwargs)
    return with_model_settings(cfg, config)


def place_on_mesh(model, mesh):
    """Puts every variable of `model` on its logical sharding over `mesh` (in place)."""
    state = nnx.state(model)
    nnx.update(model, device_put_global(state, state_shardings(state, mesh)))
    return model


def build_run_model(cfg: Config, mesh, processor):
    """`model.hf_path` loaded onto `mesh`, else a random tiny LLaVA seeded by `train.seed`.

    Raises ModelProcessorMismatch when the model's image token / vocabulary do not fit
    `processor`'s tokenizer.
    """
    if cfg.model.hf_path is not None:
        model = load_pretrained(cfg.model.hf_path, dtype=as_jnp_dtype(cfg.model.dtype), mesh=mesh)
        # the decoder reads config.remat / .attention at call time; HF configs give defaults
        model.config = with_model_settings(cfg, model.config)
        model.language_model.config = model.config.text
        check_model_processor(model.config, processor)
        return model
    config = tiny_model_config(cfg, processor)
    check_model_processor(config, processor)
    model = new_model(config, rngs=nnx.Rngs(cfg.train.seed))
    return place_on_mesh(model, mesh) if mesh is not None else model
