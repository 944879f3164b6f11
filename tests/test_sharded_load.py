"""load_pretrained onto a (2, 2, 2) mesh: same logits as unsharded, params sharded as the rules say."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import tiny_hf
from perpo_jax import mesh as mesh_lib
from perpo_jax.hf import load_pretrained, save_pretrained


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # 6 query / 3 kv heads: kv heads do not divide tensor=2 and must fall back to replication
    text = tiny_hf.llama_config(hidden_size=48, num_attention_heads=6, num_key_value_heads=3)
    hf = tiny_hf.llava(text, tiny_hf.clip_config())
    path = tmp_path_factory.mktemp("llava")
    hf.save_pretrained(path)
    assert len(jax.devices()) == 8
    mesh = mesh_lib.make_mesh((2, 2, 2))
    return hf, str(path), mesh, load_pretrained(str(path), mesh=mesh)


def test_params_are_sharded_as_the_rules_say(setup):
    _, _, mesh, model = setup
    lm = model.language_model
    attn = lm.layers.self_attn  # stacked blocks: a leading [L] axis, never sharded
    expect = {
        "q_proj [L,D,N,H]": (attn.q_proj.kernel, P(None, "fsdp", "tensor", None)),
        "k_proj [L,D,3,H] (3 kv heads: replicated)": (attn.k_proj.kernel, P(None, "fsdp", None, None)),
        "o_proj [L,N,H,D]": (attn.o_proj.kernel, P(None, "tensor", None, "fsdp")),
        "gate [L,D,F]": (lm.layers.mlp.gate_proj.kernel, P(None, "fsdp", "tensor")),
        "down [L,F,D]": (lm.layers.mlp.down_proj.kernel, P(None, "tensor", "fsdp")),
        "embedding [V,D]": (lm.embed_tokens.embedding, P("tensor", "fsdp")),
        "lm_head [D,V]": (lm.lm_head.kernel, P("fsdp", "tensor")),
        "norm": (lm.norm.scale, P(None)),
        "vision fc1": (model.vision_tower.layers.mlp.fc1.kernel, P(None, "fsdp", "tensor")),
        "vision q [L,Dv,N,H]": (model.vision_tower.layers.self_attn.q_proj.kernel,
                                P(None, "fsdp", "tensor", None)),
        "projector linear_1": (model.multi_modal_projector.linear_1.kernel, P("fsdp", "tensor")),
    }
    for name, (var, spec) in expect.items():
        value = var[...]
        assert value.sharding.mesh.shape == mesh.shape, name
        assert value.sharding.spec == spec, (name, value.sharding.spec)
    # a really sharded weight: each device holds a quarter of q_proj (fsdp x tensor)
    q = attn.q_proj.kernel[...]
    assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 2, q.shape[2] // 2,
                                                  q.shape[3])


def test_sharded_logits_equal_unsharded_and_transformers(setup):
    hf, path, mesh, sharded = setup
    plain = load_pretrained(path)
    ids, pixels = tiny_hf.llava_inputs(hf, batch=4)
    ids, pixels = jnp.asarray(ids), jnp.asarray(pixels)

    @nnx.jit
    def forward(model, ids, pixels):
        return model(ids, pixel_values=pixels)

    ids = jax.device_put(ids, mesh_lib.batch_sharding(mesh, 2))
    pixels = jax.device_put(pixels, mesh_lib.batch_sharding(mesh, 4))
    got = np.asarray(forward(sharded, ids, pixels))
    ref = np.asarray(plain(ids, pixel_values=pixels))
    diff = np.abs(got - ref).max()
    diff_hf = np.abs(got - tiny_hf.hf_logits(hf, np.asarray(ids), pixel_values=np.asarray(pixels))).max()
    print(f"[parity] sharded (2,2,2) vs unsharded {diff:.2e}, vs transformers {diff_hf:.2e}")
    assert diff <= 1e-5 and diff_hf <= 1e-4


def test_sharded_model_exports(setup, tmp_path):
    """save_pretrained gathers sharded params; the export reloads identically."""
    hf, _, _, sharded = setup
    out = save_pretrained(sharded, str(tmp_path / "out"), max_shard_size=30_000)
    again = load_pretrained(out)
    ids, pixels = tiny_hf.llava_inputs(hf, batch=1)
    ref = tiny_hf.hf_logits(hf, ids, pixel_values=pixels)
    got = np.asarray(again(jnp.asarray(ids), pixel_values=jnp.asarray(pixels)))
    assert np.abs(got - ref).max() <= 1e-4
