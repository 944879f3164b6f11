"""Export our models as transformers-loadable checkpoints (config.json + safetensors).

Everything is written into a temp dir next to `out_dir` and renamed into place at the end,
so a failed export never leaves a half-written checkpoint. Parameters are fetched to the host
one tensor at a time, shard by shard.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
from flax import nnx

from perpo_jax.atomic import atomic_dir
from perpo_jax.hf.config_map import config_to_hf
from perpo_jax.hf.errors import CheckpointError
from perpo_jax.hf.mapping import entries_for, hf_shape, layer_shape, to_hf
from perpo_jax.hf.peft_adapter import write_adapter
from perpo_jax.hf.safetensors_io import (
    INDEX_FILE,
    nbytes,
    parse_size,
    plan_shards,
    shard_names,
    write_index,
    write_shard,
)
from perpo_jax.models.layers import Linear
from perpo_jax.storage import is_url

# Files of a source checkpoint that are NOT copied (weights and the config we rewrite).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".ckpt", ".index.json")


def _check_no_lora(model):
    """A Linear with an attached, unmerged adapter cannot be exported faithfully."""
    for path, module in nnx.iter_modules(model):
        if isinstance(module, Linear) and module.lora is not None:
            if not getattr(module.lora, "merged", False):
                name = ".".join(str(p) for p in path)
                raise CheckpointError(
                    f"Linear {name} still has an unmerged LoRA adapter attached; merge it into "
                    "the base kernel (and detach it or mark it merged) before save_pretrained"
                )


def copy_side_files(source_dir: str, dest: str):
    """Tokenizer / processor / generation files from `source_dir` (not weights, not config)."""
    for name in sorted(os.listdir(source_dir)):
        src = os.path.join(source_dir, name)
        if (not os.path.isfile(src) or name == "config.json" or name.endswith(_WEIGHT_SUFFIXES)
                or name == INDEX_FILE):
            continue
        shutil.copy2(src, os.path.join(dest, name))


def save_pretrained(model, out_dir: str, *, max_shard_size: int | str = "5GB", source_dir: str | None = None,
                    adapter: bool = False, trainable=(),
                    base_model_name_or_path: str | None = None):
    """Writes `model` (DecoderLM or LlavaModel) to `out_dir` in transformers-5 format.

    Writes config.json (with `architectures`), model.safetensors or shards of at most
    `max_shard_size` (bytes or "5GB"/"200MB") plus model.safetensors.index.json, and copies
    tokenizer/processor files from `source_dir` when given. LoRA parameters are never
    written; a Linear with an unmerged adapter raises CheckpointError.

    adapter=True writes the LoRA adapters instead, as a PEFT adapter dir (adapter_config.json +
    adapter_model.safetensors, `perpo_jax.hf.peft_adapter`): `trainable` (lora.trainable
    regexes) picks the fully trained modules saved as `modules_to_save`, and
    `base_model_name_or_path` is what PEFT records as the base; side files as above.
    """
    if adapter:
        out_dir = out_dir if is_url(out_dir) else os.path.abspath(out_dir)
        with atomic_dir(out_dir) as tmp:
            write_adapter(model, tmp, trainable=trainable,
                          base_model_name_or_path=base_model_name_or_path)
            if source_dir is not None:
                copy_side_files(source_dir, tmp)
        return out_dir
    _check_no_lora(model)
    config = model.config
    hf_config = config_to_hf(config)
    entries = entries_for(config)
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    missing = [e.path for e in entries if e.path not in state]
    if missing:
        raise CheckpointError(f"model has no parameter(s) {missing[:5]} required by its config")
    by_key = {e.key: e for e in entries}
    sizes = []
    for e in entries:
        value = state[e.path].get_value()
        sizes.append((e.key, nbytes(hf_shape(e, layer_shape(e, value.shape)), value.dtype)))
    shards = plan_shards(sizes, parse_size(max_shard_size))
    names = shard_names(len(shards))

    out_dir = out_dir if is_url(out_dir) else os.path.abspath(out_dir)
    with atomic_dir(out_dir) as tmp:  # gs://: uploaded, commit marker last (perpo_jax.storage)
        weight_map = {}
        for name, keys in zip(names, shards):
            tensors = {}
            for key in keys:
                e = by_key[key]
                value = state[e.path].get_value()
                # one layer's slice of a stacked parameter at a time
                host = np.asarray(jax.device_get(value if e.layer is None else value[e.layer]))
                tensors[key] = to_hf(e, host)
                weight_map[key] = name
            write_shard(os.path.join(tmp, name), tensors)
            del tensors
        if len(names) > 1:
            write_index(os.path.join(tmp, INDEX_FILE), weight_map, sum(n for _, n in sizes))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
        if source_dir is not None:
            copy_side_files(source_dir, tmp)
    return out_dir
