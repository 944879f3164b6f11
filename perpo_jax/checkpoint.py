"""Training checkpoints (orbax) and SIGTERM-safe preemption.

One checkpoint step directory holds three items:

- ``train_state`` — the train-state pytree (params, optimizer state, step, RNG key, skipped
  counter, ...), written with ``StandardSave``: sharded arrays, each host writes its shards.
  With LoRA on, the caller passes only the trainable (LoRA / unfrozen) params; the frozen
  base weights come from the HF checkpoint, never from here.
- ``data_state`` — the data iterator position, a JSON dict (e.g. ``{"epoch": 0, "index": 96}``).
- ``metadata`` — run metadata, a JSON dict (the resolved config), fixed per `Checkpointer`.

Restores go ONTO the shardings of an abstract target (a pytree of ``jax.ShapeDtypeStruct``
with ``.sharding``, e.g. ``jax.eval_shape`` of the init plus the mesh shardings), so a run
sharded over a (data, fsdp, tensor) mesh resumes sharded without materialising a replica.

RNG keys: typed keys (``jax.random.key``) are stored natively by orbax (key data plus the
PRNG implementation name in the array metadata) and come back as typed keys of the same
implementation; raw ``uint32`` keys (``jax.random.PRNGKey``) are plain arrays. Both round-trip
bitwise; give the abstract target the same kind of key that was saved.

Atomicity: orbax writes a step into ``<step>.orbax-checkpoint-tmp*`` and renames
it to ``<step>`` only when every item is written, so a kill mid-save leaves the previous step
as the latest one; leftover tmp directories are removed when the next `Checkpointer` opens.

Preemption: `PreemptionGuard` turns SIGTERM into a flag; the loop checks
``guard.stop_now(step)`` after each step, calls ``maybe_save(..., force=True)``, ``wait()``
and exits.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from perpo_jax.atomic import is_url

STATE_ITEM = "train_state"
DATA_ITEM = "data_state"
METADATA_ITEM = "metadata"
_ITEMS = (STATE_ITEM, DATA_ITEM, METADATA_ITEM)


class Restored(NamedTuple):
    """What `Checkpointer.restore` returns; unpacks as ``state, data_state, step``."""

    train_state: Any
    data_state: dict
    step: int


def _json_dict(value: Any, what: str) -> dict:
    """Checks `value` is a JSON-serialisable dict now, not later in orbax's writer thread."""
    if not isinstance(value, Mapping):
        raise TypeError(f"checkpoint {what} must be a dict, got {type(value).__name__}")
    try:
        json.dumps(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"checkpoint {what} is not JSON-serialisable: {err}") from err
    return dict(value)


def _check_abstract_target(abstract_state: Any) -> None:
    """Every array leaf of the restore target must say where its shards go."""
    leaves = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
    for path, leaf in leaves:
        if hasattr(leaf, "shape") and getattr(leaf, "sharding", None) is None:
            raise ValueError(
                f"restore target leaf {jax.tree_util.keystr(path)} has no sharding; build the "
                "target as jax.ShapeDtypeStruct(shape, dtype, sharding=...) (e.g. from "
                "mesh.state_shardings) so the state is restored onto the mesh"
            )


def restore_target(abstract_state: Any, shardings: Any) -> Any:
    """The pytree to restore onto: `abstract_state`'s leaves with their sharding attached.

    abstract_state: e.g. ``jax.eval_shape(init_fn, ...)`` (leaves ``ShapeDtypeStruct``).
    shardings: a pytree PREFIX of `abstract_state` with a ``jax.sharding.Sharding`` where
      each sub-tree goes (as ``mesh.state_shardings`` gives one per ``nnx.Variable`` and
      ``train.state.train_state_shardings`` one per optimizer moment tree); every leaf under
      that position gets it.
    """

    def attach(sharding, subtree):
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), subtree
        )

    is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)  # noqa: E731
    return jax.tree.map(attach, shardings, abstract_state, is_leaf=is_sharding)


class Checkpointer:
    """Periodic, asynchronous, keep-last-k checkpoints of a training run.

    Args:
      directory: root folder; step ``s`` lives in ``directory/<s>``. Created if missing.
      save_every: `maybe_save` writes when ``step % save_every == 0`` (or when forced).
      keep: number of most recent steps kept on disk; None keeps all.
      async_save: write in a background thread; `maybe_save` returns once the arrays are
        copied to host, so the caller may donate/overwrite the device buffers right away.
      metadata: JSON dict saved with every step (the run's config).

    Every process of a multi-host run must make the same calls in the same order.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        save_every: int,
        keep: int | None = 3,
        async_save: bool = True,
        metadata: Mapping[str, Any] | None = None,
    ):
        if int(save_every) < 1:
            raise ValueError(f"checkpoint save_every must be >= 1, got {save_every}")
        if keep is not None and int(keep) < 1:
            raise ValueError(f"checkpoint keep must be >= 1 or None, got {keep}")
        # gs:// (every host of a pod writes the same place): orbax/tensorstore handle it
        self.directory = (epath.Path(str(directory)) if is_url(directory)
                          else Path(directory).absolute())
        self.metadata = _json_dict(metadata or {}, "metadata")
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.FixedIntervalPolicy(int(save_every)),
            preservation_policy=policies.LatestN(None if keep is None else int(keep)),
            enable_async_checkpointing=async_save,
            # A step killed mid-save leaves an unfinalised tmp dir; remove such leftovers on
            # open instead of letting them pile up (they are never read as steps).
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, item_names=_ITEMS, options=options)

    # ---- saving -------------------------------------------------------------------------
    def maybe_save(
        self, step: int, train_state: Any, data_state: Mapping[str, Any], *, force: bool = False
    ) -> bool:
        """Saves `train_state` and `data_state` as step `step` if the cadence (or `force`) says so.

        A step that is already on disk is never rewritten (a forced save at the end right
        after a periodic save of the same step is a no-op). Returns True when a save started.
        """
        step = int(step)
        data_state = _json_dict(data_state, "data_state")
        if step in self._manager.all_steps():
            return False
        if not force and not self._manager.should_save(step):
            return False
        args = ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.StandardSave(train_state),
                DATA_ITEM: ocp.args.JsonSave(data_state),
                METADATA_ITEM: ocp.args.JsonSave(self.metadata),
            }
        )
        return bool(self._manager.save(step, args=args, force=force))

    def wait(self) -> None:
        """Blocks until every started save is finalised on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's threads."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---- restoring ----------------------------------------------------------------------
    def all_steps(self) -> Sequence[int]:
        """Finalised steps on disk, ascending (unfinished tmp saves are not steps)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, step: int, abstract_train_state: Any) -> Restored:
        """Restores step `step` onto the shapes, dtypes and shardings of `abstract_train_state`.

        `abstract_train_state` has the saved pytree structure, leaves ``jax.ShapeDtypeStruct``
        (or arrays) carrying ``.sharding``.
        """
        _check_abstract_target(abstract_train_state)
        if step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no finalised checkpoint step {step} in {self.directory}; "
                f"steps there: {self.all_steps()}"
            )
        args = ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.StandardRestore(abstract_train_state),
                DATA_ITEM: ocp.args.JsonRestore(),
            }
        )
        try:
            out = self._manager.restore(step, args=args)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"checkpoint step {step} in {self.directory} does not match the train state "
                f"to restore into (different model, LoRA or optimizer config?): {err}"
            ) from err
        return Restored(out[STATE_ITEM], dict(out[DATA_ITEM]), step)

    def restore_latest(self, abstract_train_state: Any) -> Restored | None:
        """`restore` of the newest finalised step, or None when the directory has none."""
        step = self._manager.latest_step()
        if step is None:
            return None
        return self.restore(step, abstract_train_state)

    def read_metadata(self, step: int | None = None) -> dict:
        """The run metadata saved with `step` (default: the latest step)."""
        step = self._manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no finalised checkpoint in {self.directory}")
        args = ocp.args.Composite(**{METADATA_ITEM: ocp.args.JsonRestore()})
        return dict(self._manager.restore(step, args=args)[METADATA_ITEM])


class PreemptionGuard:
    """Context manager turning SIGTERM (TPU/VM preemption) into a flag the loop polls.

    The handler only sets a flag — saving from inside a signal handler could run while a
    jitted step or an orbax write is half done. Usage::

        with PreemptionGuard() as guard:
            for step in ...:
                state = train_step(state, batch)
                ckpt.maybe_save(step, state, data_state)
                if guard.stop_now(step):
                    ckpt.maybe_save(step, state, data_state, force=True)
                    ckpt.wait()
                    break

    In a multi-process run JAX's coordination service already listens for SIGTERM and
    makes all processes agree on the step to stop at; there the guard leaves the handler to
    JAX and `stop_now` asks JAX's preemption sync point.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
        self.signals = tuple(signals)
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """True once one of `signals` arrived in this process."""
        return self._event.is_set()

    def request(self, signum: int = signal.SIGTERM, frame: Any = None) -> None:
        """The signal handler; also callable directly (single-process runs only)."""
        del signum, frame
        self._event.set()

    def stop_now(self, step: int) -> bool:
        """True when the loop should save `step` and exit (same answer on every process)."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            try:
                return bool(multihost_utils.reached_preemption_sync_point(int(step)))
            except RuntimeError as err:  # jax.distributed started without its preemption service
                raise RuntimeError(
                    "PreemptionGuard in a multi-process run needs JAX's preemption service "
                    "(jax.distributed.initialize with jax_enable_preemption_service)"
                ) from err
        return self.requested

    def __enter__(self) -> PreemptionGuard:
        if jax.process_count() > 1:
            return self
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionGuard must be entered in the main thread (signal rule)")
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self.request)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
