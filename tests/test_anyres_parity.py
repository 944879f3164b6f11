"""LlavaNextModel (LLaVA-NeXT: Llama + CLIP; OneVision: Qwen2 + SigLIP) vs transformers.

Tiny random models saved by transformers (`tiny_hf.llava_next` / `llava_onevision`: 16 px
tiles, patch 4, grids up to 3 tiles a side; OneVision with anyres_max_2 so its bilinear
reduction runs). Batches mix non-square images of different sizes (different token counts),
image_sizes are traced under jit, and the unused tiles hold noise that must not matter.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers.image_processing_utils import select_best_resolution

import tiny_hf
from perpo_jax import mesh as mesh_lib
from perpo_jax.hf import load_pretrained, save_pretrained
from perpo_jax.models import LlavaNextConfig, LlavaNextModel, anyres

TOL = 1e-4
# (height, width): wide, tall, square (OneVision reduces it), very wide, near-square
SIZES = [[20, 45], [37, 22], [40, 40], [9, 50], [47, 31], [30, 17], [16, 79], [48, 47]]
BUILDERS = {"next": tiny_hf.llava_next, "onevision": tiny_hf.llava_onevision}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def pair(request, tmp_path_factory):
    hf = BUILDERS[request.param]()
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, str(path), load_pretrained(str(path))


@nnx.jit
def _forward(model, ids, mask, pixels, sizes):
    return model(ids, mask, pixels, sizes)


def _check(name, ours, hf, sizes, seed=0, what="", forward=_forward, place=None):
    ids, mask, pixels, image_sizes = tiny_hf.anyres_inputs(hf, sizes, ours.config.max_tiles,
                                                           seed=seed)
    ref = tiny_hf.hf_anyres_logits(hf, ids, mask, pixels, image_sizes)
    args = [jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels), jnp.asarray(image_sizes)]
    if place is not None:
        args = [place(a) for a in args]
    got = np.asarray(forward(ours, *args))
    diff = np.abs(got - ref)[mask.astype(bool)].max()
    print(f"[parity] anyres {name} {what} max|diff| = {diff:.2e}")
    assert diff <= TOL
    return got


def test_logits_match_transformers_single_device(pair):
    name, hf, _, ours = pair
    assert isinstance(ours, LlavaNextModel) and isinstance(ours.config, LlavaNextConfig)
    _check(name, ours, hf, SIZES, what=f"batch of {len(SIZES)} sizes")


def test_features_and_counts_match_transformers(pair):
    """Packed features per image equal transformers' `get_image_features` (outside jit too)."""
    name, hf, _, ours = pair
    rng = np.random.default_rng(3)
    sizes = np.asarray(SIZES, np.int64)
    pixels = rng.standard_normal((len(sizes), ours.config.max_tiles, 3, 16, 16)).astype(np.float32)
    import torch

    with torch.no_grad():
        want = hf.model.get_image_features(torch.tensor(pixels), torch.tensor(sizes)).pooler_output
    packed, valid = nnx.jit(lambda m, p, s: m.packed_image_features(p, s))(
        ours, jnp.asarray(pixels), jnp.asarray(sizes))
    lengths = np.asarray(valid.sum(1))
    assert lengths.tolist() == [int(w.shape[0]) for w in want]
    assert lengths.tolist() == [ours.config.image_tokens(h, w) for h, w in SIZES]
    assert len(set(lengths.tolist())) > 3 and packed.shape[1] == ours.config.max_image_tokens
    diff = max(np.abs(np.asarray(packed[i, :n]) - w.numpy()).max()
               for i, (n, w) in enumerate(zip(lengths, want)))
    print(f"[parity] anyres {name} packed features max|diff| = {diff:.2e}")
    assert diff <= 1e-5


def test_logits_match_transformers_on_a_2x2x2_mesh(pair):
    name, hf, path, _ = pair
    assert len(jax.devices()) == 8
    mesh = mesh_lib.make_mesh((2, 2, 2))
    sharded = load_pretrained(path, mesh=mesh)

    def place(a):
        return jax.device_put(a, mesh_lib.batch_sharding(mesh, a.ndim))

    _check(name, sharded, hf, SIZES[:4], seed=4, what="mesh (2,2,2)", place=place)


def test_export_reloads_in_transformers(pair, tmp_path):
    name, hf, path, ours = pair
    out = save_pretrained(ours, str(tmp_path / "out"), max_shard_size=40_000, source_dir=path)
    with open(os.path.join(out, "config.json")) as f:
        exported = json.load(f)
    assert exported["architectures"] == hf.config.architectures
    assert exported["image_grid_pinpoints"] == hf.config.image_grid_pinpoints
    back, info = type(hf).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    if name == "onevision":
        assert back.config.vision_aspect_ratio == hf.config.vision_aspect_ratio
    ids, mask, pixels, sizes = tiny_hf.anyres_inputs(hf, SIZES[:2], ours.config.max_tiles)
    ref = tiny_hf.hf_anyres_logits(hf, ids, mask, pixels, sizes)
    diff = np.abs(tiny_hf.hf_anyres_logits(back.eval(), ids, mask, pixels, sizes) - ref)
    print(f"[parity] anyres {name} export -> transformers max|diff| = {diff.max():.2e}")
    assert diff.max() <= TOL


def _hub_v4(key):
    return key.replace("vision_tower.", "vision_tower.vision_model.", 1)


def _in_memory(key):
    for old, new in (("language_model.model.", "model.language_model."),
                     ("vision_tower.", "model.vision_tower."),
                     ("multi_modal_projector.", "model.multi_modal_projector."),
                     ("image_newline", "model.image_newline")):
        if key.startswith(old):
            return new + key[len(old):]
    return "lm_head.weight" if key == "language_model.lm_head.weight" else key


@pytest.mark.parametrize("layout", ["hub_v4", "in_memory"])
def test_other_key_layouts_load(pair, layout, tmp_path):
    name, hf, path, ours = pair
    rename = {"hub_v4": _hub_v4, "in_memory": _in_memory}[layout]
    tensors = load_file(os.path.join(path, "model.safetensors"))
    assert "image_newline" in tensors
    save_file({rename(k): v for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    with open(os.path.join(path, "config.json")) as f:
        (tmp_path / "config.json").write_text(f.read())
    model = load_pretrained(str(tmp_path))
    np.testing.assert_array_equal(np.asarray(model.image_newline[...]),
                                  np.asarray(ours.image_newline[...]))


def test_token_count_mismatch_is_an_error(pair):
    _, hf, _, ours = pair
    ids, mask, pixels, sizes = tiny_hf.anyres_inputs(hf, SIZES[:2], ours.config.max_tiles)
    short = ids.copy()
    short[0, 3] = 1  # the first image token of row 0 (after 3 text tokens)
    with pytest.raises(ValueError, match="image tokens do not match"):
        ours(jnp.asarray(short), pixel_values=jnp.asarray(pixels), image_sizes=jnp.asarray(sizes))
    with pytest.raises(ValueError, match="tiles per image"):
        ours(jnp.asarray(ids), pixel_values=jnp.asarray(pixels[:, :2]),
             image_sizes=jnp.asarray(sizes))
    with pytest.raises(ValueError, match="needs image_sizes"):
        ours.embed(jnp.asarray(ids), jnp.asarray(pixels))


def test_best_resolution_matches_transformers_with_float_edge_cases():
    """Traced select_best_resolution == transformers' (Python doubles), including sizes where
    int(w * (W / w)) == W - 1 (e.g. w = 79 with W = 336) and exact-multiple heights."""
    pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    ov = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    rng = np.random.default_rng(0)
    edge = [79, 158, 165, 47, 94, 147, 13, 26, 45]
    sizes = np.concatenate([
        rng.integers(1, 4000, (1000, 2)), rng.integers(1, 60, (200, 2)),
        np.array([[h, w] for w in edge for h in (w, 2 * w, 3 * w, 100, 333)]),
        np.array([[w, h] for w in edge for h in (w, 2 * w, 3 * w, 100, 333)])]).astype(np.int32)
    for table in (pins, ov, tiny_hf.NEXT_PINPOINTS):
        got = np.asarray(jax.jit(lambda s, t=table: anyres.best_resolution(s, t))(sizes))
        want = np.array([select_best_resolution([int(h), int(w)], table) for h, w in sizes])
        np.testing.assert_array_equal(got, want)


def test_floor_mul_div_is_the_double_result():
    rng = np.random.default_rng(1)
    d = rng.integers(1, 32768, 20000).astype(np.int32)
    n = rng.choice([336, 384, 672, 1008, 2304, 16, 48], 20000).astype(np.int32)
    c = np.where(rng.random(20000) < 0.5, d, (d // np.gcd(n, d)) * rng.integers(1, 8, 20000))
    c = np.clip(c, 1, 32767).astype(np.int32)
    got = np.asarray(jax.jit(anyres.floor_mul_div)(c, n, d))
    want = np.array([int(int(ci) * (int(ni) / int(di))) for ci, ni, di in zip(c, n, d)])
    np.testing.assert_array_equal(got, want)
    assert (want != (c.astype(np.int64) * n) // d).any()  # the double result really differs


def test_plain_llava_accepts_image_sizes_none():
    """Uniform call: model.embed(ids, pixels, image_sizes) works for plain LLaVA too."""
    from perpo_jax.models import build_model, tiny_llava_config

    cfg = tiny_llava_config(vocab_size=64, hidden_size=16, num_layers=1, image_size=8,
                            patch_size=4)
    model = build_model(cfg, rngs=nnx.Rngs(0))
    ids = jnp.concatenate([jnp.array([[1]]), jnp.full((1, cfg.num_image_tokens),
                                                      cfg.image_token_id)], axis=1)
    pixels = jnp.ones((1, 3, 8, 8))
    uniform, plain, logits = nnx.jit(
        lambda m, i, p: (m.embed(i, p, None), m.embed(i, p), m(i, None, p, None)))(model, ids, pixels)
    np.testing.assert_array_equal(np.asarray(uniform), np.asarray(plain))
    assert logits.shape == (1, ids.shape[1], 64)


def test_bad_anyres_configs_are_clear_errors():
    base = tiny_hf.llava_next().config.to_dict()
    from perpo_jax.hf.config_map import config_from_hf
    from perpo_jax.hf.errors import AnyresNotSupportedError, CheckpointError

    with pytest.raises(CheckpointError, match="multiple of the vision tower's image_size 16"):
        config_from_hf({**base, "image_grid_pinpoints": [[16, 30]]})
    with pytest.raises(CheckpointError, match="features per tile"):
        config_from_hf({**base, "vision_feature_select_strategy": "full"})
    with pytest.raises(AnyresNotSupportedError, match="llava_next_video"):
        config_from_hf({**base, "model_type": "llava_next_video"})
    ov = tiny_hf.llava_onevision().config.to_dict()
    with pytest.raises(CheckpointError, match="anyres_max_N"):
        config_from_hf({**ov, "vision_aspect_ratio": "anyres"})
