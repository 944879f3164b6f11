"""HF import/export: key layouts, export round trip through transformers, sharding, errors."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx
from safetensors.numpy import load_file, save_file

import tiny_hf
from perpo_jax.hf import AnyresNotSupportedError, CheckpointError, load_pretrained, save_pretrained

TOL = 1e-4


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    hf = tiny_hf.llava(tiny_hf.llama_config(), tiny_hf.clip_config())
    path = tmp_path_factory.mktemp("llava_clip")
    hf.save_pretrained(path)
    return hf, str(path)


def _rewrite(src: str, dst, rename) -> str:
    """Copies a single-file checkpoint with every key passed through `rename`."""
    os.makedirs(dst, exist_ok=True)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    save_file({rename(k): v for k, v in tensors.items()}, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = f.read()
    with open(os.path.join(dst, "config.json"), "w") as f:
        f.write(cfg)
    return str(dst)


def _hub_v4(k):
    return k.replace("vision_tower.", "vision_tower.vision_model.", 1)


def _in_memory(k):
    if k == "language_model.lm_head.weight":
        return "lm_head.weight"
    for old, new in (
        ("language_model.model.", "model.language_model."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    ):
        if k.startswith(old):
            return new + k[len(old):]
    return k


def test_saved_layout_is_the_v5_one(llava_dir):
    _, path = llava_dir
    keys = set(load_file(os.path.join(path, "model.safetensors")))
    assert "language_model.lm_head.weight" in keys
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in keys
    assert "vision_tower.encoder.layers.0.mlp.fc1.weight" in keys


@pytest.mark.parametrize("layout", ["v5", "hub_v4", "in_memory"])
def test_three_llava_key_layouts_load(llava_dir, layout, tmp_path):
    hf, path = llava_dir
    rename = {"v5": lambda k: k, "hub_v4": _hub_v4, "in_memory": _in_memory}[layout]
    src = _rewrite(path, tmp_path / layout, rename)
    keys = set(load_file(os.path.join(src, "model.safetensors")))
    if layout == "hub_v4":
        assert "vision_tower.vision_model.pre_layrnorm.weight" in keys
    if layout == "in_memory":
        assert "lm_head.weight" in keys and "model.language_model.norm.weight" in keys
    model = load_pretrained(src)
    ids, pixels = tiny_hf.llava_inputs(hf)
    diff = np.abs(
        np.asarray(model(jnp.asarray(ids), pixel_values=jnp.asarray(pixels)))
        - tiny_hf.hf_logits(hf, ids, pixel_values=pixels)
    ).max()
    assert diff <= TOL


EXPORT_CASES = {
    "llava_llama_clip": lambda: tiny_hf.llava(tiny_hf.llama_config(), tiny_hf.clip_config()),
    "llava_qwen2_siglip": lambda: tiny_hf.llava(
        tiny_hf.qwen2_config(), tiny_hf.siglip_config(vision_use_head=True),
        vision_feature_select_strategy="full", vision_feature_layer=-1,
    ),
    "llama_gqa": lambda: tiny_hf.causal_lm(tiny_hf.llama_config()),
    "qwen2_tied": lambda: tiny_hf.causal_lm(tiny_hf.qwen2_config()),
}


def _inputs(hf):
    if isinstance(hf, tf.LlavaForConditionalGeneration):
        return tiny_hf.llava_inputs(hf)
    return np.random.default_rng(0).integers(0, tiny_hf.VOCAB, size=(2, 9)), None


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
@pytest.mark.parametrize("max_shard_size", ["5GB", 20_000])
def test_export_round_trip_through_transformers(case, max_shard_size, tmp_path):
    hf = EXPORT_CASES[case]()
    hf.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    ours = load_pretrained(str(tmp_path / "src"))
    out = save_pretrained(
        ours, str(tmp_path / "out"), max_shard_size=max_shard_size, source_dir=str(tmp_path / "src")
    )
    files = sorted(os.listdir(out))
    assert "config.json" in files and "tokenizer_config.json" in files
    assert not any(f.startswith(".") for f in os.listdir(tmp_path)), "temp dir left behind"
    if max_shard_size == 20_000:
        assert "model.safetensors.index.json" in files
        assert sum(f.startswith("model-000") for f in files) > 1
    else:
        assert "model.safetensors" in files
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["architectures"] == hf.config.architectures
    cls = type(hf)
    back, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    ids, pixels = _inputs(hf)
    ref = tiny_hf.hf_logits(hf, ids, pixel_values=pixels)
    diff_hf = np.abs(tiny_hf.hf_logits(back.eval(), ids, pixel_values=pixels) - ref).max()
    reloaded = load_pretrained(out)
    kw = {} if pixels is None else {"pixel_values": jnp.asarray(pixels)}
    diff_ours = np.abs(np.asarray(reloaded(jnp.asarray(ids), **kw)) - ref).max()
    print(f"[parity] export {case} shard={max_shard_size}: transformers {diff_hf:.2e}, ours {diff_ours:.2e}")
    assert diff_hf <= TOL and diff_ours <= TOL


def test_export_replaces_existing_dir_and_refuses_unmerged_lora(llava_dir, tmp_path):
    _, path = llava_dir
    model = load_pretrained(path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    save_pretrained(model, str(out))
    assert not (out / "stale.txt").exists()

    class Adapter(nnx.Module):
        def __call__(self, x):
            return 0.0

    model.language_model.layers.self_attn.q_proj.lora = nnx.data(Adapter())
    with pytest.raises(CheckpointError, match="layers.self_attn.q_proj"):
        save_pretrained(model, str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()


# ----------------------------------------------------------------------------- errors


@pytest.fixture
def sharded_dir(llava_dir, tmp_path):
    """The LLaVA checkpoint re-exported as several shards + index."""
    _, path = llava_dir
    return save_pretrained(load_pretrained(path), str(tmp_path / "sharded"), max_shard_size=20_000)


def _index(path):
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        return json.load(f)


def test_truncated_shard_names_the_file(sharded_dir):
    shard = sorted(set(_index(sharded_dir)["weight_map"].values()))[1]
    full = os.path.join(sharded_dir, shard)
    data = open(full, "rb").read()
    with open(full, "wb") as f:
        f.write(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=shard):
        load_pretrained(sharded_dir)


def test_corrupt_header_names_the_file(sharded_dir):
    shard = sorted(set(_index(sharded_dir)["weight_map"].values()))[0]
    with open(os.path.join(sharded_dir, shard), "r+b") as f:
        f.write(b"\xff" * 16)
    with pytest.raises(CheckpointError, match=shard):
        load_pretrained(sharded_dir)


def test_index_pointing_to_missing_file(sharded_dir):
    idx = _index(sharded_dir)
    shard = sorted(set(idx["weight_map"].values()))[-1]
    os.remove(os.path.join(sharded_dir, shard))
    with pytest.raises(CheckpointError, match=shard):
        load_pretrained(sharded_dir)


def test_missing_tensor_names_the_tensor(llava_dir, tmp_path):
    _, path = llava_dir
    tensors = load_file(os.path.join(path, "model.safetensors"))
    del tensors["language_model.model.layers.1.mlp.up_proj.weight"]
    dst = _rewrite(path, tmp_path / "src", lambda k: k)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor language_model.model.layers.1.mlp.up_proj.weight"):
        load_pretrained(dst)


def test_unexpected_and_misshaped_tensors_are_listed_together(llava_dir, tmp_path):
    _, path = llava_dir
    tensors = load_file(os.path.join(path, "model.safetensors"))
    tensors["vision_tower.encoder.layers.0.self_attn.q_proj.weight"] = np.zeros((32, 31), np.float32)
    tensors["language_model.model.layers.9.extra.weight"] = np.zeros((2,), np.float32)
    dst = _rewrite(path, tmp_path / "src", lambda k: k)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_pretrained(dst)
    msg = str(err.value)
    assert "vision_tower.encoder.layers.0.self_attn.q_proj.weight in model.safetensors has shape [32, 31]" in msg
    assert "unexpected tensor language_model.model.layers.9.extra.weight" in msg


def _with_config(llava_dir, tmp_path, edit):
    _, path = llava_dir
    dst = _rewrite(path, tmp_path / "src", lambda k: k)
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    edit(cfg)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return dst


def test_llava_next_config_on_plain_llava_weights_names_the_missing_tensor(llava_dir, tmp_path):
    """A LLaVA-NeXT config.json over weights without image_newline (a half-converted dir)
    is refused naming the tensor; video models (not modelled) are refused as such."""
    def edit(cfg):
        cfg["model_type"] = "llava_next"
        cfg["image_grid_pinpoints"] = [[16, 32], [32, 16]]

    dst = _with_config(llava_dir, tmp_path, edit)
    with pytest.raises(CheckpointError, match="image_newline"):
        load_pretrained(dst)
    video = _with_config(llava_dir, tmp_path / "video",
                         lambda cfg: cfg.update(model_type="llava_next_video"))
    with pytest.raises(AnyresNotSupportedError, match="anyres|video"):
        load_pretrained(video)


def test_unsupported_architecture_is_a_clear_error(llava_dir, tmp_path):
    dst = _with_config(llava_dir, tmp_path, lambda cfg: cfg.update(model_type="mllama"))
    with pytest.raises(CheckpointError, match="mllama"):
        load_pretrained(dst)
    dst2 = _with_config(
        llava_dir, tmp_path / "b",
        lambda cfg: cfg["text_config"].update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
    )
    with pytest.raises(CheckpointError, match="yarn"):
        load_pretrained(dst2)


def test_bfloat16_load_and_export(llava_dir, tmp_path):
    """dtype=bfloat16 stores params in bf16, logits stay float32 and close to the f32 model;
    the bf16 export loads in transformers as bf16 with every key matched."""
    hf, path = llava_dir
    model = load_pretrained(path, dtype=jnp.bfloat16)
    assert model.language_model.layers.mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    assert model.vision_tower.layers.mlp.fc1.kernel[...].dtype == jnp.bfloat16
    ids, pixels = tiny_hf.llava_inputs(hf, batch=1)
    logits = model(jnp.asarray(ids), pixel_values=jnp.asarray(pixels))
    assert logits.dtype == jnp.float32
    ref = tiny_hf.hf_logits(hf, ids, pixel_values=pixels)
    assert np.abs(np.asarray(logits) - ref).max() < 0.05
    out = save_pretrained(model, str(tmp_path / "bf16"))
    back, info = tf.LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert back.dtype == torch.bfloat16
    # the BF16 tensors on disk read back (numpy knows bfloat16 through ml_dtypes) bit for bit
    again = load_pretrained(out, dtype=jnp.bfloat16)
    a = again.language_model.layers.mlp.up_proj.kernel[...]
    assert a.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a, np.float32),
                                  np.asarray(model.language_model.layers.mlp.up_proj.kernel[...],
                                             np.float32))


# ----------------------------------------------------------------------------- configs


def _check_against_transformers(ours_text, ours_vision, hf_cfg):
    t, v = hf_cfg.text_config, hf_cfg.vision_config
    assert (ours_text.vocab_size, ours_text.hidden_size, ours_text.intermediate_size) == (
        t.vocab_size, t.hidden_size, t.intermediate_size)
    assert (ours_text.num_layers, ours_text.num_heads, ours_text.num_kv_heads) == (
        t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads)
    assert ours_text.rms_norm_eps == t.rms_norm_eps
    assert ours_text.rope_theta == t.rope_parameters["rope_theta"]
    assert (ours_vision.hidden_size, ours_vision.intermediate_size, ours_vision.num_layers) == (
        v.hidden_size, v.intermediate_size, v.num_hidden_layers)
    assert (ours_vision.num_heads, ours_vision.image_size, ours_vision.patch_size) == (
        v.num_attention_heads, v.image_size, v.patch_size)
    assert (ours_vision.layer_norm_eps, ours_vision.hidden_act) == (v.layer_norm_eps, v.hidden_act)


def test_hub_v4_configs_with_omitted_defaults_read_like_transformers():
    """Hub configs (written by transformers 4) omit default-valued fields and use top-level
    rope_theta / rope_scaling; we must fill the same defaults transformers does."""
    from perpo_jax.hf.config_map import config_from_hf

    llava15 = {  # the shape of llava-hf/llava-1.5-7b-hf's config.json
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "ignore_index": -100, "image_token_index": 32000, "pad_token_id": 32001,
        "projector_hidden_act": "gelu", "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "text_config": {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096,
                        "model_type": "llama", "rms_norm_eps": 1e-05, "torch_dtype": "float16",
                        "vocab_size": 32064},
        "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                          "model_type": "clip_vision_model", "num_attention_heads": 16,
                          "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
                          "vocab_size": 32000},
    }
    ours = config_from_hf(llava15)
    _check_against_transformers(ours.text, ours.vision, tf.LlavaConfig(**json.loads(json.dumps(llava15))))
    assert ours.image_token_id == 32000 and ours.num_image_tokens == 576

    onevision_like = {  # Qwen2 + SigLIP, v4 style top-level rope_theta and a llama3 rope_scaling
        "model_type": "llava", "image_token_index": 151646, "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "text_config": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
                        "num_attention_heads": 14, "num_hidden_layers": 24,
                        "num_key_value_heads": 2, "rope_theta": 1000000.0,
                        "tie_word_embeddings": True, "vocab_size": 152000},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152,
                          "image_size": 384, "intermediate_size": 4304, "num_attention_heads": 16,
                          "num_hidden_layers": 26, "patch_size": 14, "vision_use_head": False},
    }
    ours = config_from_hf(onevision_like)
    _check_against_transformers(ours.text, ours.vision, tf.LlavaConfig(**json.loads(json.dumps(onevision_like))))
    assert ours.text.tie_word_embeddings and ours.text.qkv_bias and not ours.vision.use_head

    v4_llama3 = {"model_type": "llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
                 "num_hidden_layers": 1, "num_attention_heads": 4, "rope_theta": 500000.0,
                 "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    text = config_from_hf(v4_llama3)
    assert text.rope_theta == 500000.0 and text.rope_scaling.kind == "llama3"
    assert text.rope_scaling.factor == 8.0 and text.num_kv_heads == 4
