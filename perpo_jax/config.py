"""One typed config schema: dataclasses loaded from YAML, with dotted command-line overrides.

    cfg = load_config("configs/demo_shapes.yaml", ["optim.lr=1e-5", "mesh.shape=[2,2,2]"])

Unknown keys and values of the wrong type are errors naming the dotted key. No jax import:
the config is read on the host before any device is touched.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the dotted key."""


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


# Limits of the synthetic scenes, checked here when a config loads and again by the data
# builders that draw them (data/shapes_scene.py and data/ocr_text.py take them from here:
# config.py imports nothing of the project).
# shapes_grounding box side as a fraction of the image side: (small min, small max, large min,
# large max); larger shapes need less pixel precision for IoU >= 0.5
SHAPE_SIDES = (0.14, 0.20, 0.30, 0.42)
OCR_MAX_LINES, OCR_MAX_WORDS = 3, 2  # shapes_ocr defaults: 1-3 lines of 1-2 words
# where the text block goes. A tiny model learns to read text at a fixed place far sooner
# than anywhere (one word, 1,600 SFT updates: NED 0.83 at `left` vs 0.98 at `random`)
OCR_PLACEMENTS = ("random", "left")


def check_shape_sides(sides) -> tuple[float, ...]:
    """`sides` as a 4-tuple of floats (see SHAPE_SIDES), else a ValueError saying what is wrong."""
    sides = tuple(float(x) for x in sides)
    if len(sides) != 4 or not 0 < sides[0] <= sides[1] < sides[2] <= sides[3] <= 1:
        raise ValueError("shape sides: need 4 fractions of the image side, 0 < small min <= "
                         f"small max < large min <= large max <= 1, got {list(sides)}")
    return sides


def check_ocr_text(font_size: int, max_lines: int, max_words: int, pitch: int = 0,
                   placement: str = "random") -> None:
    """ValueError starting with the parameter's name when a text setting cannot render."""
    if placement not in OCR_PLACEMENTS:
        raise ValueError(f"placement: one of {', '.join(OCR_PLACEMENTS)}, got {placement!r}")
    if pitch < 0:
        raise ValueError(f"pitch: need 0 (proportional) or a cell width in pixels, got {pitch}")
    if font_size < 6:
        raise ValueError(f"font_size: need >= 6 pixels for legible characters, got {font_size}")
    if max_lines < 1:
        raise ValueError(f"max_lines: need >= 1 line, got {max_lines}")
    if max_words < 1:
        raise ValueError(f"max_words: need >= 1 word per line, got {max_words}")


LLM_LINEARS = r"language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


@dataclass
class ModelConfig:
    hf_path: str | None = None  # local HF checkpoint dir; None = tiny random LLaVA (demo/tests)
    tiny: dict[str, Any] = field(default_factory=dict)  # overrides for models.tiny_llava_config
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    param_dtype: str = "float32"  # master params (and optimizer state) dtype
    remat: bool = False  # rematerialise each decoder block in the backward pass
    # prefill / candidate-scoring attention: auto (TPU splash, GPU cudnn where it fits, else
    # xla; by the platform the program compiles for) | xla | splash | cudnn (docs/attention.md)
    attention: str = "auto"


@dataclass
class LoraConfig:
    enabled: bool = True
    rank: int = 128
    alpha: float = 256.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: [LLM_LINEARS])  # regexes over module paths
    trainable: list[str] = field(default_factory=list)  # module-path regexes trained fully
    # a PEFT LoRA adapter dir (adapter_config.json + adapter_model.safetensors) to start from:
    # rank / alpha / dropout / targets come from it (docs/peft.md)
    init_from: str | None = None


@dataclass
class LossConfig:
    # perpo | lipo | lipo_lambda | dpo | ipo | simpo | orpo | sft (docs/losses.md)
    name: str = "perpo"
    beta: float = 0.1  # reward scale (ipo: tau; simpo: its beta, 2.0-2.5 in the paper)
    gamma: float = 0.5  # perpo: exponent of the reward-gap pair weights
    label_smoothing: float = 0.0  # dpo: conservative-DPO eps in [0, 0.5)
    simpo_gamma_beta_ratio: float = 0.5  # simpo: target margin gamma = this * beta
    orpo_lambda: float = 0.1  # orpo: weight of the odds-ratio term next to the SFT NLL
    sft_target: str = "best"  # best | ground_truth


@dataclass
class OptimConfig:
    lr: float = 5e-6
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_ratio: float = 0.03
    warmup_steps: int = 0  # > 0: this many warmup updates, overriding warmup_ratio (as HF's Trainer)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_accum: int = 1


@dataclass
class TrainConfig:
    mode: str = "online"  # online (sample → reward → train rounds) | offline (pre-sampled lists)
    rounds: int = 0  # online rounds; 0 = one pass over the data (ceil(prompts / prompts_per_round))
    steps: int = 0  # online updates per round; 0 = ceil(prompts_per_round / lists_per_step) × epochs
    epochs: int = 1  # online: passes over each round's lists; offline: exact passes over the kept lists
    lists_per_step: int = 2  # real lists per update (padded with empty lists to shard evenly)
    num_candidates: int = 20  # K, list size after filtering/padding
    max_length: int = 2048  # prompt (image tokens included) + response
    max_response_length: int = 64
    shared_prefix: bool = True  # image + prompt run once per list
    precompute_ref: bool = True  # reference log-probs computed once when lists are built
    disable_dropout: bool = True  # every dropout (LoRA's too) off, as the official trainer runs
    seed: int = 0
    log_every: int = 1
    out_dir: str = "runs/default"
    # where records go besides metrics.jsonl (always written): tensorboard | wandb (needs
    # `pip install wandb==0.31.0`; WANDB_MODE, WANDB_API_KEY, ... as W&B reads them);
    # docs/logging.md
    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])
    wandb_project: str | None = None  # None: WANDB_PROJECT, else W&B's default
    wandb_entity: str | None = None  # None: WANDB_ENTITY, else the account's default
    wandb_name: str | None = None  # the run's display name; None: WANDB_NAME, else W&B's


@dataclass
class MeshConfig:
    shape: list[int] = field(default_factory=lambda: [-1, 1, 1])  # (data, fsdp, tensor)


@dataclass
class CheckpointConfig:
    dir: str | None = None  # default: <train.out_dir>/checkpoints
    save_every: int = 100
    keep: int = 3
    async_save: bool = True
    resume: bool = True


@dataclass
class SamplingConfig:
    num_samples: int = 20
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    from_reference: bool = False  # sample from the frozen reference instead of the policy
    prompts_per_round: int = 64


@dataclass
class DataConfig:
    task: str = "grounding"  # grounding | ocr (a key of rewards.REWARDS)
    # shapes_grounding | shapes_ocr | shapes_pope (yes/no object questions, data.task=pope) |
    # refcoco_style (JSONL) | refer (refer-toolkit refs(*).p +
    # instances.json) | official_json (pre-sampled PerPO lists) | page_ocr (page image + its
    # full text, data.task=ocr; layout in data.ocr_format) | hf_preference (preference pairs
    # or scored lists in parquet / arrow / datasets save_to_disk dirs, train.mode=offline;
    # docs/preference_data.md)
    source: str = "shapes_grounding"
    data_dir: str = "runs/data"
    # annotation file (refcoco_style / official_json) or refer dataset dir (refer: holds
    # refs(<split_by>).p and instances.json); hf_preference: a parquet / arrow file, a glob
    # of them, or a folder of shards / a datasets save_to_disk folder
    path: str | None = None
    # hf_preference columns; image / prompt null = the first present of image, images,
    # image_path, img_path / question, prompt, messages, conversations. A file with the
    # chosen + rejected columns holds pairs (rewards 1 / 0), else responses + scores lists
    pref_image_column: str | None = None
    pref_prompt_column: str | None = None
    pref_chosen_column: str = "chosen"
    pref_rejected_column: str = "rejected"
    pref_responses_column: str = "responses"
    pref_scores_column: str = "scores"
    # hf_preference split: of a DatasetDict dir (default train, or its only split), or the
    # shards of a folder named <split>-* / in its <split>/ subfolder (default: all shards)
    pref_split: str | None = None
    # page_ocr layout: jsonl ({"image", "text"} per line) | fox (the Fox benchmark's page-OCR
    # JSON); see perpo_jax.data.page_ocr. Images are relative to data.image_dir (page_ocr
    # without image_dir: the annotation file's directory)
    ocr_format: str = "jsonl"
    refer_split_by: str = "unc"  # refer: which refs(<split_by>).p to read (unc | umd | google)
    image_dir: str | None = None
    tokenizer: str | None = None  # tokenizer dir; default: the HF checkpoint's or the dataset's
    num_train: int = 2000
    num_val: int = 200
    image_size: int = 64
    # prompt template: chat_template (the checkpoint's own) | llava_v1 (the official PerPO
    # conversation) | qwen_1_5 (LLaVA-NeXT's ChatML conversation, perpo_jax.data.chat_templates)
    # | auto (chat_template when the checkpoint has one, else llava_v1)
    template: str = "auto"
    # pad (LLaVA-1.5 pad-to-square with the image mean, the official run) | crop (CLIP resize +
    # center crop) | checkpoint (whatever the checkpoint's image processor does)
    image_aspect_ratio: str = "checkpoint"
    # frame of normalised boxes in answers and rewards: original (official PerPO data) | padded
    box_frame: str = "original"
    min_margin: float = 0.8  # lists whose best − worst reward is below this are dropped
    skip_invalid: bool = False  # skip (and report) malformed lines / missing images instead of failing
    seed: int = 0
    # shapes_grounding scenes: objects per image and whether expressions may use spatial
    # relations ("the red circle left of the blue square"); other sources ignore these
    min_objects: int = 2
    max_objects: int = 5
    relations: bool = True
    # shapes_grounding box sides as fractions of image_size: [small min, small max, large min,
    # large max]; larger shapes need less pixel precision for IoU >= 0.5
    shape_sides: list[float] = field(default_factory=lambda: list(SHAPE_SIDES))
    # shapes_ocr text: font size (pixels), at most ocr_max_lines lines of ocr_max_words words
    # (2-6 characters each), and ocr_pitch: 0 = the font's proportional spacing, > 0 = each
    # character centred in a cell this many pixels wide (monospace: character k sits at a
    # fixed offset from the first, an easier reading task, like less text)
    ocr_font_size: int = 12
    ocr_max_lines: int = OCR_MAX_LINES
    ocr_max_words: int = OCR_MAX_WORDS
    ocr_pitch: int = 0
    ocr_placement: str = "random"  # random (anywhere) | left (a word crop: left edge, centred)


@dataclass
class M3poConfig:
    """M3PO pair selection (perpo_jax/m3po.py). pairs: none (train on the full lists, PerPO &
    co.) | m3p (M3P-Score hard negatives) | random (vanilla DPO: a random pair whose MAS differ
    by >= delta) | rm (RM-DPO: best vs worst MAS). mas: reward (the task reward) | clip (CLIP
    image-text similarity of m3po.clip_path) | a name given to perpo_jax.mas.register_mas_scorer."""

    pairs: str = "none"
    mas: str = "reward"
    alpha: float = 0.5  # weight of the policy's confidence in the hard-negative score
    lam: float = 0.1  # confidence bonus in the preferred-answer score
    delta: float = 0.3  # a negative's MAS must be at least this far below the preferred one's
    clip_path: str | None = None  # local HF CLIPModel dir for mas=clip


@dataclass
class EvalConfig:
    num_examples: int = 200
    batch_size: int = 16
    max_new_tokens: int = 32
    num_images: int = 8  # val images drawn into the report PNG


@dataclass
class DemoConfig:
    """`perpo-jax demo`: the base model (shipped or an in-process SFT warm-up), the methods
    compared from it, and the report's checks."""

    sft_rounds: int = 6  # rounds of ground-truth SFT from random init
    sft_lr: float = 1e-3
    sft_steps: int = 0  # updates per SFT round; 0 = one pass over the round's prompts
    # SFT batch and round size; 0 = the methods' train.lists_per_step / sampling.prompts_per_round.
    # A tiny model learns grounding far faster per second from 32-example batches than from 8.
    sft_lists_per_step: int = 0
    sft_prompts_per_round: int = 0
    # --train-base only: SFT rounds on ONE-shape scenes (attribute expressions, same
    # image_size and shape_sides, the task's tokenizer) before the SFT on the task itself. A
    # tiny model learns to localise one shape far faster than among 2-5 (at 1,008 updates:
    # Acc@0.5 0.59 vs 0.06 with data.shape_sides [0.22, 0.28, 0.36, 0.46]); 0 = none
    base_warmup_rounds: int = 0
    # rft: rejection-sampling fine-tuning (SFT on each list's best sampled candidate, the same
    # sample budget as perpo / dpo / lipo); sft: continued SFT on the ground truth
    methods: list[str] = field(default_factory=lambda: ["perpo", "dpo", "lipo", "sft", "rft"])
    # The model every method starts from: an HF dir made by `perpo-jax demo --train-base`
    # (loaded like model.hf_path, its processor included); "auto" = the shipped
    # assets/demo_base when it exists and was made for this config's data.* task, else the
    # SFT warm-up above is trained in-process; null = always train it in-process
    base_path: str | None = "auto"
    # evaluate every model a second time with the val images permuted among the examples
    # (a fixed derangement): a model that reads the image falls to near chance
    image_shuffle_check: bool = True
    bootstrap_samples: int = 2000  # resamples of the paired bootstrap interval of each gain
    # shapes-POPE images (val; up to 6 questions each, 3 splits) every model is also scored
    # on (yes/no object hallucination, mean F1 over random / popular / adversarial); 0 = skip
    pope_images: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    m3po: M3poConfig = field(default_factory=M3poConfig)


_CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.attention": ("auto", "xla", "splash", "cudnn"),
    "loss.name": ("perpo", "lipo", "lipo_lambda", "dpo", "ipo", "simpo", "orpo", "sft"),
    "loss.sft_target": ("best", "ground_truth"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "train.mode": ("online", "offline"),
    "data.source": ("shapes_grounding", "shapes_ocr", "shapes_pope", "refcoco_style", "refer",
                    "official_json", "page_ocr", "hf_preference"),
    "data.template": ("auto", "chat_template", "llava_v1", "qwen_1_5"),
    "data.ocr_format": ("jsonl", "fox"),
    "data.image_aspect_ratio": ("pad", "crop", "checkpoint"),
    "data.box_frame": ("original", "padded"),
    "data.refer_split_by": ("unc", "umd", "google"),
    "m3po.pairs": ("none", "m3p", "random", "rm"),
}


# Demo methods: the losses on full lists, rft (SFT on the best sampled candidate), M3PO and
# its pair baselines (DPO on one pair per list: M3P-Score hard negative, best vs worst MAS, a
# random qualifying pair) and the M3PO alpha ablation (alpha = 0: hardest by MAS only; 1: by
# the policy's confidence only).
DEMO_METHODS = (*_CHOICES["loss.name"], "rft", "m3po", "rm_dpo", "vanilla_dpo", "m3po_alpha0",
                "m3po_alpha1")
LOGGERS = ("tensorboard", "wandb")  # train.loggers (perpo_jax/train/loggers.py)


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
