"""Architecture hyper-parameters of the ported models, in OUR names.

The Hugging Face ↔ ours conversion of these fields lives only in `perpo_jax/hf/config_map.py`.
All dataclasses are frozen (hashable) so a config can be a static jit argument.
`dtype` is the compute dtype, `param_dtype` the storage dtype of parameters; both are strings
("float32", "bfloat16") so configs serialise as plain YAML/JSON.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax.numpy as jnp

from perpo_jax.models import anyres

# the choices of TextConfig.attention (models/attention_kernels.py implements them)
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_jnp_dtype(name: str):
    """Maps a dtype string of a config to the jnp dtype; a clear error for anything else."""
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def dtype_name(dtype) -> str:
    """Inverse of `as_jnp_dtype`: jnp dtype (or string) -> config string."""
    name = jnp.dtype(dtype).name
    as_jnp_dtype(name)
    return name


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (HF `rope_scaling` / `rope_parameters`).

    kind: "linear" (positions divided by `factor`) or "llama3" (Llama-3.1 wavelength-dependent
    scaling with `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings`).
    """

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class TextConfig:
    """Decoder-only LM (Llama / Qwen2 family).

    family: "llama" or "qwen2" (decides the HF class and key names on export).
    qkv_bias: q/k/v projections have a bias (Qwen2; Llama with attention_bias).
    o_bias: the output projection has a bias (Llama attention_bias only).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    family: str = "llama"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    remat: bool = False
    # attention kernel for prefill / candidate scoring (models/attention_kernels.py):
    # "auto" (by the target devices' platform), "xla", "splash" (Pallas TPU), "cudnn"
    attention: str = "auto"
    dtype: str = "float32"
    param_dtype: str = "float32"
    # Token ids copied through to config.json on export (not used by the model itself).
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.family not in ("llama", "qwen2"):
            raise ValueError(f"TextConfig.family must be 'llama' or 'qwen2', got {self.family!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"TextConfig.attention must be one of {ATTENTION_IMPLEMENTATIONS}, "
                             f"got {self.attention!r}")
        as_jnp_dtype(self.dtype)
        as_jnp_dtype(self.param_dtype)

    def replace(self, **kw) -> "TextConfig":
        return dataclasses.replace(self, **kw)


@dataclass(frozen=True)
class VisionConfig:
    """ViT image encoder: CLIP (class token, pre-LN) or SigLIP (no class token).

    family: "clip" or "siglip". use_head: SigLIP attention-pooling head present (kept for
    exact import/export; LLaVA features never use it).
    """

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    family: str = "clip"
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    use_head: bool = False
    projection_dim: int | None = None  # CLIP only; carried through config.json untouched
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.family not in ("clip", "siglip"):
            raise ValueError(f"VisionConfig.family must be 'clip' or 'siglip', got {self.family!r}")
        if self.patch_size > self.image_size:
            raise ValueError(f"patch_size={self.patch_size} exceeds image_size={self.image_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"vision hidden_size={self.hidden_size} not divisible by num_heads={self.num_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        """Patches per image; like the stride-p conv, edge pixels beyond a whole patch are dropped
        (e.g. SigLIP 384 px / patch 14 -> 27 x 27)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        """Length of the token sequence: patches (+1 class token for CLIP)."""
        return self.num_patches + (1 if self.family == "clip" else 0)

    def replace(self, **kw) -> "VisionConfig":
        return dataclasses.replace(self, **kw)


@dataclass(frozen=True)
class LlavaConfig:
    """LLaVA: vision tower -> projector (linear, act, linear) -> image tokens of a decoder LM.

    vision_feature_layer: index (or tuple of indices, features concatenated) into the vision
    tower's hidden states, where index 0 is the embedding output (after CLIP's pre-LN) and
    index i the output of layer i; negative indices count from the end as in Python.
    vision_feature_select_strategy: "default" drops the first token, "full" keeps all.
    """

    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                "vision_feature_select_strategy must be 'default' or 'full', got "
                f"{self.vision_feature_select_strategy!r}"
            )
        if isinstance(self.vision_feature_layer, list):
            object.__setattr__(self, "vision_feature_layer", tuple(self.vision_feature_layer))

    @property
    def feature_layers(self) -> tuple[int, ...]:
        layers = self.vision_feature_layer
        return (layers,) if isinstance(layers, int) else tuple(layers)

    @property
    def num_image_tokens(self) -> int:
        """Image-token count one image expands to in the prompt."""
        drop = 1 if self.vision_feature_select_strategy == "default" else 0
        return self.vision.num_positions - drop

    def replace(self, **kw) -> "LlavaConfig":
        return dataclasses.replace(self, **kw)


ANYRES_TYPES = ("llava_next", "llava_onevision")


@dataclass(frozen=True)
class LlavaNextConfig(LlavaConfig):
    """LLaVA with anyres tiling: LLaVA-NeXT (`model_type="llava_next"`, Llama/Mistral + CLIP)
    or LLaVA-OneVision (`"llava_onevision"`, Qwen2 + SigLIP); see `models/anyres.py`.

    image_grid_pinpoints: ((H, W), ...) candidate resolutions, multiples of the tile size
    (the vision tower's image_size). vision_aspect_ratio: OneVision's "anyres_max_N" (grids
    of more than ~N tiles' features are shrunk bilinearly); None for NeXT.
    video_token_id: OneVision's video token, carried through export (videos are not modelled).
    """

    model_type: str = "llava_next"
    image_grid_pinpoints: tuple = ()
    vision_aspect_ratio: str | None = None
    video_token_id: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.model_type not in ANYRES_TYPES:
            raise ValueError(f"LlavaNextConfig.model_type must be one of {ANYRES_TYPES}, "
                             f"got {self.model_type!r}")
        pins = anyres.check_pinpoints(self.image_grid_pinpoints, self.vision.image_size)
        object.__setattr__(self, "image_grid_pinpoints", pins)
        if self.model_type == "llava_onevision":
            if self.vision_aspect_ratio is None:
                object.__setattr__(self, "vision_aspect_ratio", "anyres_max_9")
            anyres.parse_max_tiles(self.vision_aspect_ratio)
        if self.num_image_tokens != self.tile_patches ** 2:
            raise ValueError(
                f"anyres tiling needs {self.tile_patches ** 2} features per tile (one per patch) "
                f"but a {self.vision.family} tower with vision_feature_select_strategy="
                f"{self.vision_feature_select_strategy!r} gives {self.num_image_tokens}")

    @property
    def tile_patches(self) -> int:
        """Patches along one side of a tile (pp): a tile gives pp*pp features."""
        return self.vision.image_size // self.vision.patch_size

    @property
    def max_tiles_kept(self) -> int | None:
        """OneVision's N of "anyres_max_N"; None for NeXT (no reduction)."""
        if self.model_type != "llava_onevision":
            return None
        return anyres.parse_max_tiles(self.vision_aspect_ratio)

    @property
    def max_tiles(self) -> int:
        """Static tile count of pixel_values [B, N, C, H, W]: base + the largest grid."""
        return anyres.max_tiles(self.image_grid_pinpoints, self.vision.image_size)

    @property
    def max_image_tokens(self) -> int:
        """The most image tokens one image can expand to."""
        return anyres.max_packed_length(self.image_grid_pinpoints, self.vision.image_size,
                                 self.tile_patches)

    def image_tokens(self, height: int, width: int) -> int:
        """Image tokens of one original height x width image (host, exact)."""
        return anyres.image_token_count(height, width, self.image_grid_pinpoints,
                                 self.vision.image_size, self.tile_patches, self.max_tiles_kept)


def tiny_llava_config(
    vocab_size: int = 512,
    *,
    image_token_id: int | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    dtype: str = "float32",
    param_dtype: str = "float32",
) -> LlavaConfig:
    """A small Llama + CLIP LLaVA-1.5-shaped config for demos and tests.

    The image token defaults to the last vocabulary id.
    """
    text = TextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_layers=num_layers,
        num_heads=4,
        num_kv_heads=2,
        head_dim=hidden_size // 4,
        family="llama",
        rms_norm_eps=1e-5,
        max_position_embeddings=2048,
        dtype=dtype,
        param_dtype=param_dtype,
    )
    vision = VisionConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_layers=num_layers,
        num_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        family="clip",
        hidden_act="quick_gelu",
        dtype=dtype,
        param_dtype=param_dtype,
    )
    return LlavaConfig(
        text=text,
        vision=vision,
        image_token_id=vocab_size - 1 if image_token_id is None else image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        dtype=dtype,
        param_dtype=param_dtype,
    )
