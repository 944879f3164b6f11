"""The config schema: one typed dataclass per section, the allowed choices, and the limits of
the synthetic scenes. Imports nothing of the project; `perpo_jax.config` loads YAML and dotted
overrides into these classes and validates them (import them from there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the dotted key."""


# Limits of the synthetic scenes, checked here when a config loads and again by the data
# builders that draw them (data/shapes_scene.py and data/ocr_text.py take them from here:
# this module imports nothing of the project).
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
