"""Models from checkpoints, and converted params checkpoints.

Two layouts are read:
 * a training checkpoint (`perpo_jax.checkpoint.Checkpointer` root or one step dir): item
   `train_state` whose `params` are the trainable variables (LoRA adapters, or every Param);
   the rest of the model is rebuilt from the config (tiny init / model.hf_path);
 * a converted params checkpoint (`save_params_checkpoint`): `params/` (orbax, every Param)
   next to an HF `config.json` and the tokenizer/processor files.

Both may be gs:// URLs: orbax reads them there; a converted checkpoint on gs:// is read only
when committed (`storage.COMMIT_MARKER`, written last by `save_params_checkpoint`).

Reading never writes: the checkpoint dir is opened read-only (no tmp-dir cleanup, nothing
created), so an eval or export beside a running training cannot remove its save in flight.
A step whose files are damaged is one line naming it and the newest earlier step that reads.
"""
from __future__ import annotations

import json
import os
import tempfile

import jax
import orbax.checkpoint as ocp
from flax import nnx

from perpo_jax import storage
from perpo_jax.atomic import atomic_dir
from perpo_jax.checkpoint import (STATE_ITEM, Checkpointer, is_storage_error,
                                  quiet_failed_read_noise, restore_target, short_reason,
                                  unreadable_step_error)
from perpo_jax.config import Config
from perpo_jax.hf import CheckpointError, read_config
from perpo_jax.hf.config_map import config_to_hf
from perpo_jax.hf.peft_adapter import resolve_lora
from perpo_jax.hf.save import copy_side_files
from perpo_jax.mesh import make_mesh, state_shardings
from perpo_jax.models import build_model as new_model
from perpo_jax.models.config import as_jnp_dtype
from perpo_jax.models.layers import ShapeOnlyKeys
from perpo_jax.assemble import build_run_model, check_model_processor, place_on_mesh
from perpo_jax.models.lora import apply_lora, trainable_filter
from perpo_jax.models.lora import merge_lora as merge_adapters
from perpo_jax.storage import is_url


PARAMS_ITEM = "params"
ORBAX_COMMIT = "commit_success.txt"  # orbax's mark of a finalised step on gs:// (no rename there)


def is_params_checkpoint(path: str) -> bool:
    """True for a directory written by `save_params_checkpoint` (gs://: maybe uncommitted)."""
    return (storage.isdir(os.path.join(path, PARAMS_ITEM))
            and storage.isfile(os.path.join(path, "config.json")))


def _train_state_dir(path: str) -> str:
    """The `train_state` item of a step dir, or of the latest finalised step of a root."""
    if storage.isdir(os.path.join(path, STATE_ITEM)):
        if is_url(path) and not storage.exists(os.path.join(path, ORBAX_COMMIT)):
            raise FileNotFoundError(f"checkpoint step {path} is incomplete: no {ORBAX_COMMIT} "
                                    "(its save was interrupted or is still running)")
        return os.path.join(path, STATE_ITEM)
    if not storage.isdir(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with Checkpointer(path, save_every=1, async_save=False, read_only=True) as ckpt:
        step = ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"checkpoint {path} holds no finalised step and is not a "
                                "converted params checkpoint")
    return os.path.join(path, str(step), STATE_ITEM)


_READ_ERRORS = (ValueError, KeyError, TypeError, OSError)


def _read_params(item_dir: str, abstract_params, mesh):
    """The `params` entry of an orbax pytree item, restored onto `abstract_params`' shapes and
    dtypes, sharded over `mesh` (the other entries, e.g. optimizer moments, are not read);
    raises orbax's own error."""
    target = {"params": restore_target(abstract_params, state_shardings(abstract_params, mesh))}
    args = ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    quiet_failed_read_noise()
    with ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.restore(item_dir, args=args)["params"]


def _mismatch(item_dir: str, err: BaseException) -> CheckpointError:
    return CheckpointError(f"params in {item_dir} do not match the model built from the "
                           f"config (model.tiny / model.hf_path / lora settings?): "
                           f"{short_reason(err)}")


def _restore_params(item_dir: str, abstract_params, mesh):
    """`_read_params` with its failure as one line: damaged files or another model."""
    try:
        return _read_params(item_dir, abstract_params, mesh)
    except _READ_ERRORS as err:
        if is_storage_error(err):
            raise CheckpointError(f"checkpoint {os.path.dirname(item_dir)} is unreadable "
                                  f"({short_reason(err)})") from None
        raise _mismatch(item_dir, err) from None


def _restore_trained(path: str, abstract_params, mesh):
    """The trainable params of a training checkpoint (root: its latest step). A step that
    does not read is one line: damaged (an earlier step of the same dir reads onto the same
    model, or the error names missing / damaged files) with the newest intact step, or a
    different model."""
    item_dir = _train_state_dir(path)
    step_dir = os.path.dirname(item_dir)
    root, name = os.path.dirname(step_dir), os.path.basename(step_dir)
    try:
        return _read_params(item_dir, abstract_params, mesh)
    except _READ_ERRORS as err:
        if not name.isdigit():
            raise _mismatch(item_dir, err) from None
        earlier = sorted((int(n) for n in storage.listdir(root) if n.isdigit() and
                          int(n) < int(name) and storage.isdir(os.path.join(root, n, STATE_ITEM))),
                         reverse=True)
        intact = None
        for step in earlier:
            try:
                _read_params(os.path.join(root, str(step), STATE_ITEM), abstract_params, mesh)
            except _READ_ERRORS:
                continue
            intact = step
            break
        if intact is not None or is_storage_error(err):
            raise unreadable_step_error(root, int(name), err, intact, earlier,
                                        action="read") from None
        raise _mismatch(item_dir, err) from None


def _default_mesh(mesh):
    """`mesh`, or a one-device mesh (restores need a sharding to land on)."""
    return mesh if mesh is not None else make_mesh((1, 1, 1), devices=jax.devices()[:1])


def model_from_checkpoint(cfg: Config, path: str, mesh, processor, *, merge_lora: bool = True):
    """The model saved at `path` (either layout above), on `mesh`.

    Training checkpoints rebuild the model with `build_run_model(cfg, ...)` (+ LoRA adapters when
    `lora.enabled`) and overwrite its trainable variables; `merge_lora` folds the adapters in.
    `processor` may be None for a converted checkpoint (no agreement check then).
    """
    mesh = _default_mesh(mesh)
    if is_params_checkpoint(path):
        model = _restore_converted(cfg, path, mesh)
    else:
        model = build_run_model(cfg, mesh, processor)
        if cfg.lora.enabled:  # lora.init_from: the adapter's rank / targets (values: below)
            lora = resolve_lora(cfg.lora, model)
            place_on_mesh(apply_lora(model, lora, nnx.Rngs(cfg.train.seed)), mesh)
        trainable = nnx.state(model, trainable_filter(cfg.lora))
        nnx.update(model, _restore_trained(path, trainable, mesh))
        if merge_lora and cfg.lora.enabled:
            merge_adapters(model)
    if processor is not None:
        check_model_processor(model.config, processor)
    return model


def _restore_converted(cfg: Config, path: str, mesh):
    if is_url(path):
        storage.require_committed(path, "params checkpoint")
        with tempfile.TemporaryDirectory() as tmp:  # read_config reads a local dir
            with open(os.path.join(tmp, "config.json"), "wb") as f:
                f.write(storage.read_bytes(os.path.join(path, "config.json")))
            config = read_config(tmp, as_jnp_dtype(cfg.model.dtype))
    else:
        config = read_config(path, as_jnp_dtype(cfg.model.dtype))
    abstract = nnx.eval_shape(lambda: new_model(config, rngs=ShapeOnlyKeys(0)))
    graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    params = _restore_params(os.path.join(path, PARAMS_ITEM), abstract_params, mesh)
    return nnx.merge(graphdef, params)


def save_params_checkpoint(model, out_dir: str, *, source_dir: str | None = None) -> str:
    """Every `nnx.Param` of `model` (orbax, `params/`) + its HF `config.json` + the
    tokenizer/processor files of `source_dir`, written to a temp dir renamed to `out_dir`
    (gs://: uploaded, commit marker last)."""
    out_dir = out_dir if is_url(out_dir) else os.path.abspath(out_dir)
    with atomic_dir(out_dir) as tmp:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(os.path.join(tmp, PARAMS_ITEM), {"params": nnx.state(model, nnx.Param)})
            checkpointer.wait_until_finished()
        if source_dir:
            copy_side_files(source_dir, tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config_to_hf(model.config), f, indent=2, sort_keys=True)
    return out_dir
