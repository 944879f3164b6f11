"""LlavaModel (Llama+CLIP, Qwen2+SigLIP) vs transformers' LlavaForConditionalGeneration."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny_hf
from perpo_jax.hf import load_pretrained
from perpo_jax.models import LlavaModel, build_model, tiny_llava_config

TOL = 1e-4

CASES = {
    # LLaVA-1.5 shape: CLIP, layer -2, CLS dropped
    "llama_clip_default": lambda: tiny_hf.llava(tiny_hf.llama_config(), tiny_hf.clip_config()),
    # CLIP "full" (CLS kept) with two feature layers concatenated, gelu CLIP, no projector bias
    "llama_clip_full_multilayer": lambda: tiny_hf.llava(
        tiny_hf.llama_config(), tiny_hf.clip_config(hidden_act="gelu"),
        vision_feature_select_strategy="full", vision_feature_layer=[-2, -1],
        multimodal_projector_bias=False,
    ),
    # OneVision-like: Qwen2 (bias, tied) + SigLIP (with its pooling head), full, last layer;
    # 20 px / patch 8 drops edge pixels like SigLIP-384 / patch 14 does
    "qwen2_siglip_full": lambda: tiny_hf.llava(
        tiny_hf.qwen2_config(), tiny_hf.siglip_config(vision_use_head=True, image_size=20),
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        projector_hidden_act="gelu",
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    hf = CASES[request.param]()
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, load_pretrained(str(path))


def test_logits_with_image_match_transformers(pair):
    name, hf, ours = pair
    assert isinstance(ours, LlavaModel)
    ids, pixels = tiny_hf.llava_inputs(hf)
    ref = tiny_hf.hf_logits(hf, ids, pixel_values=pixels)
    got = np.asarray(ours(jnp.asarray(ids), pixel_values=jnp.asarray(pixels)))
    diff = np.abs(got - ref).max()
    print(f"[parity] llava {name} max|diff| = {diff:.2e}")
    assert diff <= TOL


def test_padded_batch_with_image_matches_transformers(pair):
    name, hf, ours = pair
    ids, pixels = tiny_hf.llava_inputs(hf, batch=2, after=5, seed=1)
    mask = np.ones(ids.shape, np.int64)
    mask[1, -3:] = 0
    ref = tiny_hf.hf_logits(hf, ids, attention_mask=mask, pixel_values=pixels)
    got = np.asarray(
        ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask), pixel_values=jnp.asarray(pixels))
    )
    diff = np.abs(got - ref)[mask.astype(bool)].max()
    print(f"[parity] llava {name} padded batch max|diff| = {diff:.2e}")
    assert diff <= TOL


def test_image_rows_are_not_mixed(pair):
    """Row b's image tokens take image b's features: swapping the images changes row 0 only as
    much as swapping its own image does (masked_scatter order)."""
    _, hf, ours = pair
    ids, pixels = tiny_hf.llava_inputs(hf, batch=2, seed=2)
    swapped = np.asarray(ours(jnp.asarray(ids), pixel_values=jnp.asarray(pixels[::-1].copy())))
    ref = tiny_hf.hf_logits(hf, ids, pixel_values=pixels[::-1].copy())
    assert np.abs(swapped - ref).max() <= TOL


def test_image_token_count_mismatch_is_an_error(pair):
    _, hf, ours = pair
    ids, pixels = tiny_hf.llava_inputs(hf)
    with pytest.raises(ValueError, match="image tokens"):
        ours(jnp.asarray(ids[:, 1:]), pixel_values=jnp.asarray(pixels[:1]))


def test_tiny_llava_config_builds_and_runs():
    cfg = tiny_llava_config(vocab_size=300)
    assert cfg.text.hidden_size == 64 and cfg.text.num_layers == 2
    assert cfg.vision.image_size == 32 and cfg.vision.patch_size == 8
    model = build_model(cfg, rngs=nnx.Rngs(0))
    n = cfg.num_image_tokens
    ids = jnp.concatenate(
        [jnp.array([[1, 2]]), jnp.full((1, n), cfg.image_token_id), jnp.array([[3]])], axis=1
    )
    logits = model(ids, pixel_values=jnp.zeros((1, 3, 32, 32)))
    assert logits.shape == (1, n + 3, 300) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
