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
as the latest one; leftover tmp directories are removed when the next WRITING `Checkpointer`
opens. A reader (``read_only=True``: eval, export, sample) creates, cleans and deletes
nothing, so reading a run never removes a save in progress.

Damage: a step whose files are missing or unreadable (an interrupted copy, a zeroed file)
is one `CheckpointError` line naming the step and the newest earlier step that restores
(`unreadable_step_error`), not orbax's multi-kilobyte TensorStore spec; a failed write for
lack of space or permission is one `OutputWriteError` line naming the checkpoint dir.

Preemption: `PreemptionGuard` turns SIGTERM (and, in the loop, SIGINT: Ctrl-C) into a flag;
the loop checks ``guard.stop_now(step)`` after each step, calls ``maybe_save(..., force=True)``,
``wait()`` and exits. A second Ctrl-C raises KeyboardInterrupt at once (nothing saved).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from perpo_jax.hf.errors import CheckpointError
from perpo_jax.storage import is_url
from perpo_jax.write_checks import as_write_error, write_errno

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


# tensorstore's status words: the files of a step are missing or damaged (not a different run)
_STORAGE_STATUS = re.compile(r"\b(NOT_FOUND|DATA_LOSS|OUT_OF_RANGE|FAILED_PRECONDITION|INTERNAL|"
                             r"UNKNOWN|UNAVAILABLE|ABORTED|DEADLINE_EXCEEDED|INVALID_ARGUMENT): ")


def short_reason(err: BaseException, limit: int = 200) -> str:
    """The gist of an orbax / tensorstore error in one line: its status word and innermost
    clauses, without the TensorStore spec that follows them."""
    text = " ".join(str(err).split(" [tensorstore_spec")[0].split())
    match = _STORAGE_STATUS.search(text)
    if match:
        clauses = text[match.end():].split(": ")
        text = f"{match.group(1)}: {': '.join(clauses[-2:])}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def is_storage_error(err: BaseException) -> bool:
    """True when `err` says files are missing or damaged (tensorstore's status words)."""
    return isinstance(err, FileNotFoundError) or bool(_STORAGE_STATUS.search(str(err)))


def unreadable_step_error(root, step: int, err: BaseException, intact: int | None,
                          earlier: Sequence[int], *, action: str) -> CheckpointError:
    """One line: step `step` of checkpoint dir `root` cannot be read, why, and what to do.
    intact: the newest earlier step that restores (None: none does); earlier: every earlier
    step tried; action: "resume" (train) or "read" (eval / export / sample)."""
    step_dir = os.path.join(str(root), str(step))
    head = f"checkpoint step {step} in {root} is unreadable ({short_reason(err)})"
    if intact is not None:
        fix = (f"delete {step_dir} to resume from step {intact}" if action == "resume"
               else f"pass --checkpoint {os.path.join(str(root), str(intact))} to read it")
        return CheckpointError(f"{head}; step {intact} is intact: {fix}")
    if earlier:
        return CheckpointError(f"{head}; no earlier step restores either (tried "
                               f"{', '.join(map(str, earlier))})")
    return CheckpointError(f"{head}; there is no earlier step")


_QUIET = {"reads": False, "writes": False}  # which noise filters this process installed


class _QuietWriteFailures(logging.Filter):
    """orbax logs every failed background write of a save (absl ERROR + traceback, one per
    thread: hundreds of lines) before the main thread re-raises it; a write that failed for
    lack of space or permission is then said once, by `_WriteErrors`. Other records (and
    every warning) pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        return not (write_errno(Exception(record.getMessage())) or
                    (exc is not None and write_errno(exc)))


def quiet_failed_write_noise() -> None:
    """Installs `_QuietWriteFailures` on orbax's (absl's) logger and on asyncio's (whose
    "exception was never retrieved" reports the same failed writes at exit), once."""
    if not _QUIET["writes"]:
        for name in ("absl", "asyncio"):
            logging.getLogger(name).addFilter(_QuietWriteFailures())
        _QUIET["writes"] = True


def quiet_failed_read_noise() -> None:
    """Installed once per process (idempotent): when one read of an orbax restore fails,
    orbax closes its asyncio loop while TensorStore still completes the other reads, whose
    callbacks then raise "Event loop is closed" -- dozens of unraisable tracebacks after the
    one error that matters -- and orbax's abandoned read coroutines report their own
    failure too. Only those two are dropped; every other unraisable reaches the old hook."""
    if _QUIET["reads"]:
        return
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        exc, obj = unraisable.exc_value, unraisable.object
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        if inspect.iscoroutine(obj) and "orbax" in obj.cr_code.co_filename:
            return
        previous(unraisable)

    sys.unraisablehook = hook
    _QUIET["reads"] = True


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
      read_only: a reader (eval / export / sample): opens an existing dir without creating
        it, never removes leftover tmp dirs (a save may be in flight) and never saves.

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
        read_only: bool = False,
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
            enable_async_checkpointing=async_save and not read_only,
            # A step killed mid-save leaves an unfinalised tmp dir; a writer removes such
            # leftovers on open instead of letting them pile up (they are never read as
            # steps). A reader must not: the tmp dir may be a save of a run in progress.
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        self._manager = ocp.CheckpointManager(self.directory, item_names=_ITEMS, options=options)
        if not read_only:
            quiet_failed_write_noise()

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
        with self._write_errors():
            return bool(self._manager.save(step, args=args, force=force))

    def _write_errors(self):
        """A context turning a failed write for lack of space / permission into one line."""
        return _WriteErrors(f"checkpoint {self.directory}")

    def wait(self) -> None:
        """Blocks until every started save is finalised on disk."""
        with self._write_errors():
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's threads."""
        with self._write_errors():
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
        quiet_failed_read_noise()
        try:
            out = self._restore_step(step, abstract_train_state)
        except (ValueError, KeyError, TypeError, OSError) as err:
            raise self._why_unrestorable(step, abstract_train_state, err) from None
        return Restored(out[STATE_ITEM], dict(out[DATA_ITEM]), step)

    def _restore_step(self, step: int, abstract_train_state: Any):
        args = ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.StandardRestore(abstract_train_state),
                DATA_ITEM: ocp.args.JsonRestore(),
            }
        )
        return self._manager.restore(step, args=args)

    def _why_unrestorable(self, step: int, abstract_train_state: Any,
                          err: BaseException) -> CheckpointError:
        """Damaged files, or a different run? An earlier step that restores onto the same
        target proves step `step` damaged (a run's steps share one structure)."""
        earlier = [s for s in reversed(self.all_steps()) if s < step]
        intact = None
        for s in earlier:
            try:
                self._restore_step(s, abstract_train_state)
            except (ValueError, KeyError, TypeError, OSError):
                continue
            intact = s
            break
        if intact is not None or is_storage_error(err):
            return unreadable_step_error(self.directory, step, err, intact, earlier,
                                         action="resume")
        return CheckpointError(
            f"checkpoint step {step} in {self.directory} does not match the train state to "
            f"restore into (different model, LoRA or optimizer config?): {short_reason(err)}")

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
        try:
            return dict(self._manager.restore(step, args=args)[METADATA_ITEM])
        except (ValueError, KeyError, TypeError, OSError) as err:
            raise CheckpointError(f"checkpoint step {step} in {self.directory}: its "
                                  f"{METADATA_ITEM} item is unreadable ({short_reason(err)})"
                                  ) from None


class _WriteErrors:
    """`with _WriteErrors(what):` re-raises a failed write for lack of space or permission
    (an OSError, or tensorstore's ValueError carrying the OS text) as one OutputWriteError
    line about `what`; other errors pass unchanged."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False
        error = as_write_error(exc, self.what)
        if error is None or error is exc:
            return False
        raise error from None


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
        self.signal_name: str | None = None  # the first signal received, e.g. "SIGINT"

    @property
    def requested(self) -> bool:
        """True once one of `signals` arrived in this process."""
        return self._event.is_set()

    def request(self, signum: int = signal.SIGTERM, frame: Any = None) -> None:
        """The signal handler; also callable directly (single-process runs only). The
        first signal sets the flag and says so on stderr; a second SIGINT (Ctrl-C twice)
        raises KeyboardInterrupt: the user wants out now, unsaved."""
        del frame
        if self._event.is_set():
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signal_name = signal.Signals(signum).name
        self._event.set()
        # os.write, not print: a handler may run while the main thread is inside a print
        again = " (Ctrl-C again: stop at once, unsaved)" if signum == signal.SIGINT else ""
        os.write(2, f"\n[train] {self.signal_name}: stopping after this step with a "
                    f"checkpoint{again}\n".encode())

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
