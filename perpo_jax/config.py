"""One typed config: the schema's dataclasses (`config_schema.py`, every name re-exported
here) loaded from YAML, with dotted command-line overrides, and validated.

    cfg = load_config("configs/demo_shapes.yaml", ["optim.lr=1e-5", "mesh.shape=[2,2,2]"])

Unknown keys and values of the wrong type are errors naming the dotted key. No jax import:
the config is read on the host before any device is touched.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from perpo_jax.config_schema import (  # noqa: F401  (the schema is imported from here)
    ConfigError, SHAPE_SIDES, OCR_MAX_LINES, OCR_MAX_WORDS, OCR_PLACEMENTS, check_shape_sides,
    check_ocr_text, LLM_LINEARS, ModelConfig, LoraConfig, LossConfig, OptimConfig, TrainConfig,
    MeshConfig, CheckpointConfig, SamplingConfig, DataConfig, M3poConfig, EvalConfig,
    DemoConfig, Config, _CHOICES, DEMO_METHODS, LOGGERS,
)


class _StrictBoolLoader(yaml.SafeLoader):
    """YAML as `yaml.safe_load` reads it, except that only true/false (any case) are booleans:
    YAML 1.1's yes/no/on/off/y/n stay strings, so a boolean key given one of them is an
    error naming the key instead of a silent True/False."""


_StrictBoolLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictBoolLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_YAML11_BOOLS = frozenset({"yes", "no", "on", "off", "y", "n"})


def _read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_StrictBoolLoader)  # noqa: S506 (a SafeLoader subclass)




def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks/converts `value` to annotation `tp`; raises ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _YAML11_BOOLS:
            raise ConfigError(f"{key}: expected true or false, got {value!r} (YAML 1.1 "
                              "yes/no/on/off are not accepted for boolean keys)")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-6" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is Any:
        return value
    raise ConfigError(f"{key}: unsupported type {tp!r}")


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key(s): {', '.join(where + k for k in unknown)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def _validate_loss(loss: LossConfig) -> None:
    """The loss-specific keys (beta, gamma, label smoothing are in `_check_ranges`)."""
    if loss.simpo_gamma_beta_ratio < 0:
        raise ConfigError(f"loss.simpo_gamma_beta_ratio: must be >= 0, got "
                          f"{loss.simpo_gamma_beta_ratio}")
    if loss.orpo_lambda < 0:
        raise ConfigError(f"loss.orpo_lambda: must be >= 0, got {loss.orpo_lambda}")


def _check_ranges(cfg: Config) -> None:
    """Values that would run and mislead (a negative beta reverses the preference) or fail
    deep inside a step with a traceback: one ConfigError naming the key and the rule."""
    ranges = (
        ("sampling.num_samples", cfg.sampling.num_samples, cfg.sampling.num_samples >= 2,
         ">= 2 (a list ranks at least two candidates)"),
        ("train.num_candidates", cfg.train.num_candidates, cfg.train.num_candidates >= 2,
         ">= 2 (a list ranks at least two candidates)"),
        ("sampling.prompts_per_round", cfg.sampling.prompts_per_round,
         cfg.sampling.prompts_per_round >= 1, ">= 1"),
        ("eval.max_new_tokens", cfg.eval.max_new_tokens, cfg.eval.max_new_tokens >= 1, ">= 1"),
        ("eval.num_examples", cfg.eval.num_examples, cfg.eval.num_examples >= 1, ">= 1"),
        ("eval.batch_size", cfg.eval.batch_size, cfg.eval.batch_size >= 1, ">= 1"),
        ("eval.num_images", cfg.eval.num_images, cfg.eval.num_images >= 0, ">= 0"),
        ("loss.beta", cfg.loss.beta, cfg.loss.beta > 0,
         "> 0 (beta <= 0 removes or reverses the preference)"),
        ("loss.gamma", cfg.loss.gamma, cfg.loss.gamma >= 0, ">= 0 (0 = uniform pair weights)"),
        ("loss.label_smoothing", cfg.loss.label_smoothing, 0 <= cfg.loss.label_smoothing < 0.5,
         "in [0, 0.5)"),
        ("optim.grad_clip", cfg.optim.grad_clip, cfg.optim.grad_clip > 0,
         "> 0 (the global-norm clip; set a large value for effectively none)"),
        ("optim.weight_decay", cfg.optim.weight_decay, cfg.optim.weight_decay >= 0, ">= 0"),
        ("optim.b1", cfg.optim.b1, 0 <= cfg.optim.b1 < 1, "in [0, 1)"),
        ("optim.b2", cfg.optim.b2, 0 <= cfg.optim.b2 < 1, "in [0, 1)"),
        ("optim.eps", cfg.optim.eps, cfg.optim.eps > 0, "> 0"),
        ("data.min_margin", cfg.data.min_margin, cfg.data.min_margin >= 0,
         ">= 0 (the least best - worst reward gap of a kept list)"),
        ("data.num_train", cfg.data.num_train, cfg.data.num_train >= 1, ">= 1"),
        ("data.num_val", cfg.data.num_val, cfg.data.num_val >= 0, ">= 0"),
        ("data.image_size", cfg.data.image_size, cfg.data.image_size >= 1, ">= 1"),
    )
    for key, value, ok, rule in ranges:
        if not ok or value != value:  # value != value: NaN passes no rule
            raise ConfigError(f"{key}: must be {rule}, got {value}")


def validate(cfg: Config) -> Config:
    """Checks value ranges and choices; raises ConfigError naming the key."""
    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    positive = {
        "train.lists_per_step": cfg.train.lists_per_step,
        "train.num_candidates": cfg.train.num_candidates,
        "train.max_length": cfg.train.max_length,
        "train.max_response_length": cfg.train.max_response_length,
        "train.epochs": cfg.train.epochs,
        "optim.grad_accum": cfg.optim.grad_accum,
        "sampling.num_samples": cfg.sampling.num_samples,
        "sampling.max_new_tokens": cfg.sampling.max_new_tokens,
        "checkpoint.save_every": cfg.checkpoint.save_every,
        "checkpoint.keep": cfg.checkpoint.keep,
        "lora.rank": cfg.lora.rank,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    _check_ranges(cfg)
    for key in ("rounds", "steps"):
        if getattr(cfg.train, key) < 0:
            raise ConfigError(f"train.{key}: must be >= 0, got {getattr(cfg.train, key)}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr: must be > 0, got {cfg.optim.lr}")
    _validate_loss(cfg.loss)
    if cfg.optim.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps: must be >= 0, got {cfg.optim.warmup_steps}")
    if not 0.0 <= cfg.optim.warmup_ratio < 1.0:
        raise ConfigError(f"optim.warmup_ratio: must be in [0, 1), got {cfg.optim.warmup_ratio}")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout: must be in [0, 1), got {cfg.lora.dropout}")
    if cfg.lora.init_from is not None:
        _validate_init_from(cfg.lora)
    if cfg.sampling.temperature < 0:
        raise ConfigError(f"sampling.temperature: must be >= 0, got {cfg.sampling.temperature}")
    if not 0.0 < cfg.sampling.top_p <= 1.0:
        raise ConfigError(f"sampling.top_p: must be in (0, 1], got {cfg.sampling.top_p}")
    if len(cfg.mesh.shape) != 3:
        raise ConfigError(f"mesh.shape: needs 3 entries (data, fsdp, tensor), got {cfg.mesh.shape}")
    for key in ("sft_rounds", "sft_steps", "sft_lists_per_step", "sft_prompts_per_round",
                "base_warmup_rounds"):
        if getattr(cfg.demo, key) < 0:
            raise ConfigError(f"demo.{key}: must be >= 0, got {getattr(cfg.demo, key)}")
    bad = [m for m in cfg.demo.methods if m not in DEMO_METHODS]
    if bad:
        raise ConfigError(f"demo.methods: {bad} not among {', '.join(DEMO_METHODS)}")
    _validate_loggers(cfg.train)
    if cfg.demo.pope_images < 0:
        raise ConfigError(f"demo.pope_images: must be >= 0, got {cfg.demo.pope_images}")
    if cfg.demo.bootstrap_samples < 1:
        raise ConfigError(f"demo.bootstrap_samples: must be >= 1, got {cfg.demo.bootstrap_samples}")
    if cfg.demo.base_path is not None and not cfg.demo.base_path.strip():
        raise ConfigError("demo.base_path: empty; give a base dir, auto or null")
    if not 1 <= cfg.data.min_objects <= cfg.data.max_objects:
        raise ConfigError(f"data.min_objects / data.max_objects: need 1 <= min <= max, got "
                          f"{cfg.data.min_objects} / {cfg.data.max_objects}")
    try:
        check_shape_sides(cfg.data.shape_sides)
    except ValueError as e:
        raise ConfigError(f"data.shape_sides: {e}") from None
    try:
        check_ocr_text(cfg.data.ocr_font_size, cfg.data.ocr_max_lines,
                       cfg.data.ocr_max_words, cfg.data.ocr_pitch, cfg.data.ocr_placement)
    except ValueError as e:
        raise ConfigError(f"data.ocr_{e}") from None  # e names the parameter: font_size: ...
    if not 0.0 <= cfg.m3po.alpha <= 1.0:
        raise ConfigError(f"m3po.alpha: must be in [0, 1], got {cfg.m3po.alpha}")
    if cfg.m3po.pairs != "none" and cfg.m3po.delta <= 0:
        raise ConfigError(f"m3po.delta: must be > 0 (a pair needs a MAS gap), got {cfg.m3po.delta}")
    if cfg.m3po.pairs != "none" and cfg.train.mode != "online":
        raise ConfigError(f"m3po.pairs={cfg.m3po.pairs!r} selects pairs among the policy's own "
                          "samples: it needs train.mode=online")
    if cfg.data.source in ("refcoco_style", "refer", "official_json", "page_ocr",
                           "hf_preference") and not cfg.data.path:
        raise ConfigError(f"data.path: required for data.source={cfg.data.source!r}")
    if cfg.data.source == "hf_preference":
        _validate_pref_columns(cfg)
    if cfg.data.source == "page_ocr" and cfg.data.task != "ocr":
        raise ConfigError(f"data.task: data.source='page_ocr' holds OCR pages, needs "
                          f"data.task=ocr, got {cfg.data.task!r}")
    return cfg


def _validate_loggers(train: TrainConfig) -> None:
    unknown = [name for name in train.loggers if name not in LOGGERS]
    if unknown:
        raise ConfigError(f"train.loggers: {unknown} not among {', '.join(LOGGERS)}")
    twice = sorted({name for name in train.loggers if train.loggers.count(name) > 1})
    if twice:
        raise ConfigError(f"train.loggers: {twice} listed more than once")
    for key in ("wandb_project", "wandb_entity", "wandb_name"):
        value = getattr(train, key)
        if value is not None and not value.strip():
            raise ConfigError(f"train.{key}: empty; give a name or null (W&B's default)")


def _validate_init_from(lora: LoraConfig) -> None:
    """lora.init_from: a local PEFT adapter dir. Its files are checked where it is read
    (`perpo_jax.hf.peft_adapter.read_adapter_config`, at the start of `train`), not here: a
    config saved with a run must stay loadable after the adapter dir is gone."""
    path = lora.init_from
    if not lora.enabled:
        raise ConfigError("lora.init_from: set, but lora.enabled=false (an adapter needs LoRA on)")
    if not path.strip():
        raise ConfigError("lora.init_from: empty; give a PEFT adapter dir or null")
    if "://" in path:
        raise ConfigError(f"lora.init_from: {path}: needs a local directory (copy the adapter)")


def _validate_pref_columns(cfg: Config) -> None:
    d = cfg.data
    if cfg.train.mode != "offline":
        raise ConfigError("train.mode: data.source='hf_preference' holds pre-scored lists (the "
                          "file's rewards, no task reward applies): needs train.mode=offline")
    names = {f"data.{k}": getattr(d, k) for k in (
        "pref_image_column", "pref_prompt_column", "pref_chosen_column", "pref_rejected_column",
        "pref_responses_column", "pref_scores_column", "pref_split")}
    for key, value in names.items():
        if value is not None and not value.strip():
            raise ConfigError(f"{key}: empty; give a column name (or null for the default)")
    if d.pref_chosen_column == d.pref_rejected_column:
        raise ConfigError(f"data.pref_rejected_column: the same column as "
                          f"data.pref_chosen_column ({d.pref_chosen_column!r})")
    if d.pref_responses_column == d.pref_scores_column:
        raise ConfigError(f"data.pref_scores_column: the same column as "
                          f"data.pref_responses_column ({d.pref_responses_column!r})")


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`"optim.lr=1e-5"` → ("optim.lr", 1e-05); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = _read_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from None
    return key, value


def config_from_dict(data: dict | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    tree = _deepcopy_dict(data or {})
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return validate(_build(Config, tree, ""))


def read_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Reads a config YAML; a top-level `base: other.yaml` (relative to this file) is read
    first and this file's sections are merged over it, so recipe variants state only what
    differs."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: circular `base:` chain")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = _read_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: must be a file name, got {base!r}")
    return _merge(read_yaml_tree(path.parent / base, _seen + (path,)), data)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Reads a YAML file (or the defaults when `path` is None) and applies dotted overrides."""
    data = read_yaml_tree(path) if path is not None else {}
    return config_from_dict(data, overrides)


def _merge(base: dict, top: dict) -> dict:
    out = _deepcopy_dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _deepcopy_dict(d: dict) -> dict:
    return {k: _deepcopy_dict(v) if isinstance(v, dict) else v for k, v in d.items()}
