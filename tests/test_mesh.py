"""Logical → mesh sharding rules, incl. the replicate-on-non-divisible fallback."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from perpo_jax.mesh import LOGICAL_RULES, logical_to_spec, make_mesh, state_shardings


def test_make_mesh_resolves_minus_one():
    mesh = make_mesh((-1, 2, 1))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    with pytest.raises(ValueError, match="mesh.shape"):
        make_mesh((3, -1, 1))
    with pytest.raises(ValueError, match="mesh.shape"):
        make_mesh((2, 2, 1))


def test_rules_and_fallback():
    mesh = make_mesh((2, 2, 2))
    assert logical_to_spec(("embed", "mlp"), (64, 128), mesh) == P("fsdp", "tensor")
    # 9 query heads do not divide tensor=2: replicated, not an error.
    assert logical_to_spec(("embed", "heads", "head_dim"), (64, 9, 8), mesh) == P("fsdp", None, None)
    assert logical_to_spec(("batch", "length"), (8, 5), mesh) == P(("data", "fsdp"), None)
    # a mesh axis is used once per array
    assert logical_to_spec(("embed", "vision_embed"), (8, 8), mesh) == P("fsdp", None)
    with pytest.raises(KeyError, match="nonsense"):
        logical_to_spec(("nonsense",), (4,), mesh)


def test_state_shardings_place_params():
    class Tiny(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((8, 6)), out_sharding=("embed", "mlp"), eager_sharding=False)
            self.counter = nnx.BatchStat(jnp.zeros(()))

    mesh = make_mesh((2, 2, 2))
    state = nnx.state(Tiny())
    placed = jax.device_put(state, state_shardings(state, mesh))
    assert placed["w"].get_value().sharding.spec == P("fsdp", "tensor")
    assert placed["counter"].get_value().sharding.spec == P()
    assert set(LOGICAL_RULES) >= {"embed", "mlp", "heads", "kv_heads", "vocab"}
