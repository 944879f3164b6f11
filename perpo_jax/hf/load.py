"""Import a Hugging Face checkpoint (config.json + safetensors) into our NNX models, no torch.

The module is built abstractly (`nnx.eval_shape`: shapes only, no memory), every key and shape
is validated from the file headers, and only then are tensors read one at a time, converted,
and placed straight onto their `NamedSharding` (or the default device): the host holds at
most one tensor at a time, never the model twice, and a bad checkpoint never half-loads.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from perpo_jax import mesh as mesh_lib
from perpo_jax import storage
from perpo_jax.hf.config_map import config_from_hf
from perpo_jax.hf.errors import CheckpointError
from perpo_jax.hf.mapping import (
    IGNORED_SUFFIXES,
    Entry,
    canonical_key,
    entries_for,
    hf_shape,
    layer_shape,
    to_ours,
)
from perpo_jax.hf.safetensors_io import ShardReader, TensorInfo, checkpoint_index
from perpo_jax.models.clip_text import ClipConfig, build_clip
from perpo_jax.models.config import LlavaConfig, dtype_name
from perpo_jax.models.layers import ShapeOnlyKeys
from perpo_jax.models.llava import build_model


def read_config(path: str, dtype=jnp.float32):
    """config.json of a checkpoint dir -> our TextConfig / LlavaConfig (dtype for params+compute)."""
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: cannot read config: {e}") from e
    return config_from_hf(raw, dtype_name(dtype), cfg_path)


def _match_keys(entries: list[Entry], infos: dict[str, TensorInfo], config, our_shapes, path):
    """Maps each entry to its checkpoint key; ONE CheckpointError listing every problem."""
    is_llava = isinstance(config, LlavaConfig)
    by_canon: dict[str, str] = {}
    for key in infos:
        by_canon.setdefault(canonical_key(key, is_llava), key)
    wanted = {e.key for e in entries}
    tied = (config.text if is_llava else config).tie_word_embeddings
    head_key = "language_model.lm_head.weight" if is_llava else "lm_head.weight"
    problems = []
    found: dict[Entry, str] = {}
    for e in entries:
        raw = by_canon.get(e.key)
        if raw is None:
            problems.append(f"missing tensor {e.key}")
            continue
        want = hf_shape(e, layer_shape(e, our_shapes[e.path]))
        if tuple(infos[raw].shape) != want:
            problems.append(
                f"tensor {raw} in {infos[raw].file} has shape {list(infos[raw].shape)}, expected {list(want)}"
            )
        found[e] = raw
    for canon, raw in sorted(by_canon.items()):
        if canon in wanted or canon.endswith(IGNORED_SUFFIXES):
            continue
        if tied and canon == head_key:  # redundant copy of the tied embedding
            continue
        problems.append(f"unexpected tensor {raw} in {infos[raw].file}")
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not match its config ({len(problems)} problem(s)):\n  "
            + "\n  ".join(problems)
        )
    return found


def load_pretrained(path: str, dtype=jnp.float32, mesh=None):
    """Loads a HF LlavaForConditionalGeneration / LlamaForCausalLM / Qwen2ForCausalLM dir
    (or a CLIPModel dir, as `models.clip_text.ClipModel`).

    dtype: parameter and compute dtype. mesh: optional `Mesh(data, fsdp, tensor)`; each
    parameter is placed on the sharding its logical names give (perpo_jax.mesh rules).
    Raises CheckpointError (a ValueError) naming the tensors/files when anything is off.
    A gs:// dir (our export) is read only when committed, from a local download of it.
    """
    if storage.is_url(path):
        with storage.local_copy(path, "checkpoint") as local:
            return load_pretrained(local, dtype, mesh)
    config = read_config(path, dtype)
    infos = checkpoint_index(path)
    abstract = nnx.eval_shape(lambda: _builder(config)(config, rngs=ShapeOnlyKeys(0)))
    graphdef, abs_state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(abs_state))
    our_shapes = {p: tuple(v.get_value().shape) for p, v in flat}
    entries = entries_for(config)
    uncovered = set(our_shapes) - {e.path for e in entries}
    if uncovered:  # a bug in the mapping table, not in the user's checkpoint
        raise RuntimeError(f"mapping table misses model parameters {sorted(map(str, uncovered))}")
    found = _match_keys(entries, infos, config, our_shapes, path)
    values = {}
    var_by_path = dict(flat)
    # file order: each shard is opened once; a stacked parameter [L, ...] is allocated on its
    # sharding and filled one layer at a time
    with ShardReader(path) as reader:
        for e in sorted(entries, key=lambda e: (infos[found[e]].file, found[e])):
            raw = found[e]
            shape = layer_shape(e, our_shapes[e.path])
            array = to_ours(e, reader.read(raw, infos[raw]), shape).astype(jnp.dtype(dtype), copy=False)
            if e.layer is None:
                values[e.path] = _place(array, var_by_path[e.path], mesh)
            else:
                if e.path not in values:
                    values[e.path] = _zeros(our_shapes[e.path], array.dtype,
                                            _sharding(var_by_path[e.path], our_shapes[e.path], mesh))
                values[e.path] = _set_layer(values[e.path], _place_layer(array, values[e.path]),
                                            e.layer)
            del array
    new_flat = [(p, v.replace(values[p])) for p, v in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(new_flat))


def _builder(config):
    """The module builder of a config: CLIPModel (`models.clip_text`) or our LLaVA / LM."""
    return build_clip if isinstance(config, ClipConfig) else build_model


def _sharding(variable, shape, mesh):
    """The NamedSharding of a parameter of `shape` on `mesh` (None: the default device)."""
    if mesh is None:
        return None
    axes = mesh_lib.variable_axes(variable)
    if axes is None or len(axes) != len(shape):
        axes = [None] * len(shape)
    return mesh_lib.logical_sharding(axes, shape, mesh)


def _place(array: np.ndarray, variable, mesh):
    """Puts one host array on its device(s): its NamedSharding on `mesh`, else the default device."""
    sharding = _sharding(variable, array.shape, mesh)
    return jax.device_put(array) if sharding is None else jax.device_put(array, sharding)


def _zeros(shape, dtype, sharding):
    """A zero [L, ...] buffer made directly on its devices (never on the host)."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


def _place_layer(array: np.ndarray, stacked: jax.Array):
    """One layer's host array onto the devices of its stack, sharded as a slice of it
    (without a mesh: uncommitted on the default device, as `_place` puts the others)."""
    sharding = stacked.sharding
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return jax.device_put(array)
    spec = tuple(sharding.spec) + (None,) * (stacked.ndim - len(sharding.spec))
    layer_spec = jax.sharding.PartitionSpec(*spec[1:])
    return jax.device_put(array, jax.sharding.NamedSharding(sharding.mesh, layer_spec))


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked: jax.Array, layer: jax.Array, index) -> jax.Array:
    """stacked[index] = layer, in place (the stack is donated)."""
    return jax.lax.dynamic_update_index_in_dim(stacked, layer.astype(stacked.dtype), index, 0)
