"""The PerPO loop, end to end (`perpo-jax train --config ...`).

One round (online mode):

    prompts ──sample (device, KV cache, shared prefill)──► K candidates per prompt
            ──decode + reward (host numpy, each host its own samples)──► rewards [B, K]
            ──build_lists (dedup, min_margin, sort, thin to K)──► ListSet (saved to disk)
            ──reference log-probs (LoRA off, once per list; none for simpo/orpo)──► ref_logps [L, K]
            ──S jitted sharded updates over the round's lists──► checkpoint ──► next round

Offline mode replaces sampling by the pre-sampled candidates of the official PerPO JSON
(`answers_gen` + `iou_scores`); `loss.name=sft` with `loss.sft_target=ground_truth` trains on
the ground-truth answers (no sampling).

Online: `train.rounds` rounds (0: one pass over the data) of `sampling.prompts_per_round`
prompts from the resumable loader; a round runs `train.steps` updates (0:
ceil(prompts_per_round / lists_per_step) × epochs), each on `train.lists_per_step` of the
round's kept lists (cycled), so every method gets the same number of updates whatever its
lists. Offline: the filters run over the whole file first; each of `train.epochs` epochs
visits every kept list exactly once, `lists_per_step` per update, in rounds of
OFFLINE_ROUND_STEPS updates. Either way the schedule's length is the number of planned
updates, and a skipped update or a round that kept no list still advances it.

Resume is exact: the checkpoint holds the train state and the position (round, step in round,
loader), and each round's lists are on disk, so a run killed mid-round continues with the same
lists at the same step.

One process per run dir (`run_lock.RunLock`, taken first: also the writability check);
SIGTERM and Ctrl-C (SIGINT) stop after the current step with a checkpoint. The result counts
the updates really applied (`steps - skipped`) and why the others were skipped.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from perpo_jax import storage
from perpo_jax.checkpoint import Checkpointer, PreemptionGuard
from perpo_jax.config import Config, ConfigError, config_to_dict
from perpo_jax.data import prepare
from perpo_jax.data.loader import ShardedLoader, Subset
from perpo_jax.distributed import process_zero_first
from perpo_jax.hf.peft_adapter import load_adapter, read_adapter_config, resolve_lora
from perpo_jax import assemble
from perpo_jax.models.config import as_jnp_dtype
from perpo_jax.models.lora import LoRAParam, apply_lora
from perpo_jax.train import rounds
from perpo_jax.train.hosts import global_max, to_global
from perpo_jax.train.listset import ListSet
from perpo_jax.train.loggers import require_loggers
from perpo_jax.train.optim import make_optimizer
from perpo_jax.train.progress import advance, progress_bar, say
from perpo_jax.train.run_lock import RunLock
from perpo_jax.train.run_log import RunLog, plot_curves
from perpo_jax.train.state import (create_train_state, partition_model, reference_state,
                                   trained_model, with_storage_dtypes)
from perpo_jax.train.step import (build_policy_logps, build_ref_logps, build_train_step,
                                  uses_reference)
from perpo_jax.write_checks import check_writable


@dataclasses.dataclass
class TrainResult:
    model: Any  # the trained policy as one NNX module (LoRA still attached when on)
    history: list[dict]  # per-step metrics of this process's run (resumed steps included)
    rounds: list[dict]  # per-round list statistics
    out_dir: str
    steps: int  # global steps done
    preempted: bool  # stopped early by SIGTERM / SIGINT / stop_at_step, with a checkpoint
    skipped: int = 0  # of `steps`, updates not applied (resumed steps included)
    skip_reasons: dict = dataclasses.field(default_factory=dict)  # {why: count}, see SKIP_*


# Why an update was not applied, worded to follow a count ("4 had no list ...")
SKIP_NO_GAP = ("had no list with a reward gap (every candidate of each list got the same "
               "reward)")
SKIP_NONFINITE = "had a non-finite loss or gradient"
SKIP_EMPTY_ROUND = "fell in rounds that kept no list (see data.min_margin)"
SKIP_EARLIER = "were skipped before this resume"


# Offline: updates per round. A round's lists are held in host memory and saved for resume,
# so a round is a bounded chunk of the data, not the whole file.
OFFLINE_ROUND_STEPS = 32


@dataclasses.dataclass
class _Plan:
    round_steps: tuple[int, ...]  # updates in each round
    local_lists: int  # this host's rows of a step batch (real lists + empty padding)
    real_local: int  # real lists per step on this host (train.lists_per_step / hosts)
    # offline: update i of a round trains lists [i·real, (i+1)·real) of the round's order, so
    # an epoch visits every kept list exactly once; online: the round's lists are cycled
    exact_pass: bool

    @property
    def rounds(self) -> int:
        return len(self.round_steps)

    @property
    def total_steps(self) -> int:
        return sum(self.round_steps)

    def steps_before(self, round_index: int) -> int:
        return sum(self.round_steps[:round_index])


def step_batch_lists(cfg: Config, data: int, fsdp: int) -> int:
    """Rows of a global step batch: `train.lists_per_step` padded with empty lists to a
    multiple of (data · fsdp · grad_accum), so the batch shards and splits into micro-batches
    (`perpo-jax plan` compiles the step at this shape too)."""
    unit = data * fsdp * cfg.optim.grad_accum
    return -(-cfg.train.lists_per_step // unit) * unit


def _batch_layout(cfg: Config, mesh) -> tuple[int, int]:
    """(this host's step-batch rows, real lists per step on this host): exactly
    `train.lists_per_step` real lists per update, padded (`step_batch_lists`)."""
    hosts = jax.process_count()
    if cfg.train.lists_per_step % hosts:
        raise ConfigError(f"train.lists_per_step={cfg.train.lists_per_step} must be a multiple "
                          f"of the {hosts} hosts (each host trains on its own lists)")
    batch_lists = step_batch_lists(cfg, mesh.shape["data"], mesh.shape["fsdp"])
    return batch_lists // hosts, cfg.train.lists_per_step // hosts


def online_plan(cfg: Config, mesh, num_train: int) -> _Plan:
    """`train.rounds` rounds (0: one pass over the data, ceil(prompts / prompts_per_round)) of
    `train.steps` updates (0: ceil(prompts_per_round / lists_per_step) × epochs), each on
    `lists_per_step` of the round's kept lists, cycled. `sampling.prompts_per_round` counts
    every host's prompts (the loader gives each host its contiguous block of them)."""
    local_lists, real_local = _batch_layout(cfg, mesh)
    per_round, hosts = cfg.sampling.prompts_per_round, jax.process_count()
    if per_round % hosts:
        raise ConfigError(f"sampling.prompts_per_round={per_round} must be a multiple of the "
                          f"{hosts} hosts (each host samples its own block of the round)")
    if num_train < per_round:
        raise ConfigError(f"sampling.prompts_per_round={per_round} exceeds the {num_train} "
                          "training prompts: lower it")
    rounds = cfg.train.rounds or math.ceil(num_train / per_round)
    steps = cfg.train.steps or math.ceil(per_round / cfg.train.lists_per_step) * cfg.train.epochs
    return _Plan((steps,) * rounds, local_lists, real_local, exact_pass=False)


def offline_plan(cfg: Config, mesh, num_kept: int) -> _Plan:
    """`train.epochs` exact passes over the `num_kept` lists that survive the filters: rounds
    of OFFLINE_ROUND_STEPS updates (the last one of an epoch shorter), one update per
    `lists_per_step` lists, the last update of a round taking the rest. The schedule's
    length is therefore the number of updates that really happen."""
    if cfg.train.steps:
        raise ConfigError(f"train.steps={cfg.train.steps}: offline runs make one update per "
                          "train.lists_per_step kept lists (each list once per epoch); set it to 0")
    local_lists, real_local = _batch_layout(cfg, mesh)
    # one update = one global loader batch (host h takes its h-th contiguous block of
    # real_local lists), so an update's lists do not depend on the number of hosts
    updates = math.ceil(num_kept / (real_local * jax.process_count()))
    epoch = tuple(min(OFFLINE_ROUND_STEPS, updates - start)
                  for start in range(0, updates, OFFLINE_ROUND_STEPS))
    return _Plan(epoch * cfg.train.epochs, local_lists, real_local, exact_pass=True)


# Paths are stored absolute (the CLI resolves them); older runs saved them as typed.
_PATH_KEYS = {"data.data_dir", "data.path", "data.image_dir", "data.tokenizer", "model.hf_path"}


def _same_value(dotted: str, saved, now) -> bool:
    if dotted in _PATH_KEYS and isinstance(saved, str) and isinstance(now, str):
        return os.path.abspath(os.path.expanduser(saved)) == os.path.abspath(now)
    return saved == now


# Sections whose change makes an existing checkpoint a different run.
_RUN_DEFINING = ("model", "lora", "loss", "optim", "train", "data", "sampling", "m3po")
_NOT_RUN_DEFINING = {"train.out_dir", "train.log_every", "train.loggers", "train.wandb_project",
                     "train.wandb_entity", "train.wandb_name"}


def config_differences(saved: dict, cfg: Config) -> list[str]:
    """Dotted keys whose value differs between a checkpoint's saved config and `cfg`."""
    now = config_to_dict(cfg)
    diffs = []
    for section in _RUN_DEFINING:
        if section == "m3po" and section not in saved:  # saved before the section existed
            saved = dict(saved, m3po=config_to_dict(Config())["m3po"])
        for key, value in now[section].items():
            dotted = f"{section}.{key}"
            if dotted not in _NOT_RUN_DEFINING and not _same_value(
                    dotted, saved.get(section, {}).get(key), value):
                diffs.append(dotted)
    return diffs


class _Trainer:
    """Everything live during a run; `train` drives it."""

    def __init__(self, cfg: Config, data, model, mesh, plan: _Plan):
        self.cfg, self.data, self.mesh, self.plan = cfg, data, mesh, plan
        lora_cfg = cfg.lora if cfg.lora.enabled else None
        base_reference = None
        if lora_cfg is not None:
            if jax.tree.leaves(nnx.state(model, LoRAParam)):
                raise ValueError("train(model=...) got a model that already has LoRA adapters: merge "
                                 "them (models.lora.merge_lora) so the reference is that model")
            lora_apply = resolve_lora(cfg.lora, model)  # lora.init_from: the adapter's r, alpha...
            # the official trainer runs with disable_dropout=True: LoRA's dropout is 0 too
            if cfg.train.disable_dropout:
                lora_apply = dataclasses.replace(lora_apply, dropout=0.0)
            apply_lora(model, lora_apply, nnx.Rngs(cfg.train.seed),
                       param_dtype=as_jnp_dtype(cfg.model.param_dtype))
            if cfg.lora.init_from is not None:
                # the reference stays the base model (PEFT's adapter disabled): the trainable
                # modules' own values, taken before the adapter's modules_to_save replace them
                base_reference = partition_model(model, lora_cfg).reference
                load_adapter(model, cfg.lora.init_from, trainable=cfg.lora.trainable)
        parts = partition_model(model, lora_cfg)
        if base_reference is not None:
            parts = parts._replace(reference=base_reference)
        self.parts = with_storage_dtypes(parts,
                                         frozen_dtype=as_jnp_dtype(cfg.model.dtype),
                                         trainable_dtype=as_jnp_dtype(cfg.model.param_dtype))
        optimizer, schedule = make_optimizer(cfg.optim, self.plan.total_steps)
        self.state, self.frozen, self.reference = create_train_state(
            self.parts, optimizer, mesh, cfg.train.seed)
        self.step_fn = build_train_step(
            self.parts.graphdef, self.state, self.frozen, self.reference, loss_cfg=cfg.loss,
            optimizer=optimizer, schedule=schedule, mesh=mesh, grad_accum=cfg.optim.grad_accum,
            shared_prefix=cfg.train.shared_prefix)
        self.ref_fn = None
        if uses_reference(cfg.loss.name) and cfg.train.precompute_ref:  # not sft/simpo/orpo
            self.ref_fn = build_ref_logps(self.parts.graphdef, self.state.params, self.frozen,
                                          self.reference, mesh=mesh,
                                          shared_prefix=cfg.train.shared_prefix)
        self.policy_fn = None  # M3PO: the policy's log-probs of a round's candidates
        if cfg.m3po.pairs == "m3p" and rounds.uses_sampling(cfg):
            self.policy_fn = build_policy_logps(self.parts.graphdef, self.state.params,
                                                self.frozen, mesh=mesh,
                                                shared_prefix=cfg.train.shared_prefix)
        self.most_lists = 0  # the most lists any host kept this round

    def model(self, *, reference: bool = False):
        """The policy (or the frozen reference) as one NNX module."""
        if reference:
            params = reference_state(self.state.params, self.reference)
            return nnx.merge(self.parts.graphdef, params, self.frozen)
        return trained_model(self.parts.graphdef, self.state, self.frozen)

    def abstract_state(self):
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)

    def round_lists(self, examples, round_index: int) -> ListSet:
        cfg, proc = self.cfg, self.data.processor
        if rounds.uses_sampling(cfg):
            model = self.model(reference=cfg.sampling.from_reference)
            lists = rounds.sample_round_lists(cfg, proc, model, self.mesh, examples, round_index)
        elif rounds.uses_ground_truth(cfg):
            lists = rounds.ground_truth_lists(cfg, proc, examples)
        else:
            lists = rounds.offline_round_lists(cfg, proc, examples)
        # a host whose share of an exact pass ran out has no example this round
        image = examples[0].image if examples else np.zeros((8, 8, 3), np.uint8)
        image_rows = {k: (v.shape[1:], v.dtype.str) for k, v in proc.image_inputs([image]).items()}
        lists, self.most_lists = rounds.align_across_hosts(lists, cfg, proc, image_rows)
        if rounds.uses_pairs(cfg):  # M3PO & baselines: each list cut to its selected pair
            lists = rounds.select_round_pairs(lists, self.policy_fn, self.state, self.frozen,
                                              self.mesh, self.plan.local_lists, self.most_lists,
                                              cfg.m3po, cfg.train.seed, round_index)
            lists, self.most_lists = rounds.align_across_hosts(lists, cfg, proc, image_rows,
                                                               num_candidates=2)
        if self.most_lists and self.ref_fn is not None:
            rounds.add_ref_logps(lists, self.ref_fn, self.state, self.frozen, self.reference,
                                 self.mesh, self.plan.local_lists, self.most_lists)
        return lists

    def step(self, lists: ListSet, round_index: int, step_in_round: int) -> dict | None:
        """One update on `plan.real_local` lists of a per-round permutation (the next ones of an
        exact pass, or cycled online), padded with empty lists; None when no host kept a list
        this round (nothing to learn)."""
        if not self.most_lists:
            return None
        # `lists` holds every host's lists in one global order (rounds.gather_round_lists):
        # an update takes the next `real · hosts` of them, padded with empty lists at the end,
        # and this host its block of those rows -- the very batch one process would build, so
        # every list sits on the same device whatever the number of hosts
        n, real_all = len(lists), self.plan.real_local * jax.process_count()
        if self.plan.exact_pass:  # the loader's batch of this update (already shuffled)
            rows = [q for q in range(step_in_round * real_all, (step_in_round + 1) * real_all)
                    if q < n]
        else:
            order = np.random.default_rng([self.cfg.train.seed, round_index]).permutation(n)
            rows = [int(order[(step_in_round * real_all + q) % n])
                    for q in range(min(real_all, n))]
        first = self.plan.local_lists * jax.process_index()
        idx = rows[first:first + self.plan.local_lists]
        batch = to_global(lists.step_batch(idx, self.plan.local_lists), self.mesh)
        t0 = time.perf_counter()
        self.state, metrics = self.step_fn(self.state, self.frozen, self.reference, batch)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        seconds = time.perf_counter() - t0
        metrics["step_seconds"] = seconds
        metrics["tokens_per_s"] = metrics.get("tokens", 0.0) / max(seconds, 1e-9)
        return metrics

    def skip_updates(self, count: int) -> None:
        """Counts `count` planned updates as taken and skipped (a round that kept no list), so
        the learning-rate schedule stays aligned with the plan and still reaches its end."""
        self.state = self.state.replace(step=self.state.step + count,
                                        skipped=self.state.skipped + count)


def _plan_and_loader(cfg: Config, mesh, data) -> tuple[_Plan, ShardedLoader]:
    """The run's plan and its prompt loader. Offline: the filters run over the texts and
    scores first, the loader visits only the kept records (each once per epoch), and a run
    that would keep nothing is an error before anything is built."""
    hosts = dict(process_index=jax.process_index(), process_count=jax.process_count())
    if cfg.train.mode == "online":
        plan = online_plan(cfg, mesh, len(data.train))
        loader = ShardedLoader(data.train, cfg.sampling.prompts_per_round // jax.process_count(),
                               seed=cfg.data.seed, **hosts)
        return plan, loader
    kept, counts = rounds.offline_kept(cfg, data.train_text or data.train)
    drops = rounds.describe_drops(counts, cfg.data.min_margin)
    if not len(kept):
        raise ConfigError(f"train.mode=offline: none of the {counts['records']} lists of "
                          f"data.path is kept ({drops}): the run would train 0 steps")
    plan = offline_plan(cfg, mesh, len(kept))
    loader = ShardedLoader(Subset(data.train, kept), plan.real_local, seed=cfg.data.seed,
                           drop_remainder=False, **hosts)  # one batch per update
    if jax.process_index() == 0:
        print(f"[train] offline: {len(kept)} of {counts['records']} lists kept ({drops}); "
              f"{plan.total_steps} updates over {cfg.train.epochs} epoch(s)", flush=True)
    return plan, loader


def _lists_path(out_dir: str, round_index: int) -> str:
    return os.path.join(out_dir, "lists", f"host{jax.process_index():03d}",
                        f"round_{round_index:05d}.npz")


def _open_checkpoints(cfg: Config, trainer: _Trainer, loader: ShardedLoader):
    """(Checkpointer, restored position or None). Refuses to resume a different run, and to
    start over in a folder that already holds one (its steps would never be overwritten)."""
    ckpt = Checkpointer(cfg.checkpoint.dir or os.path.join(cfg.train.out_dir, "checkpoints"),
                        save_every=cfg.checkpoint.save_every, keep=cfg.checkpoint.keep,
                        async_save=cfg.checkpoint.async_save, metadata=config_to_dict(cfg))
    if ckpt.latest_step() is None:
        return ckpt, None
    if not cfg.checkpoint.resume:
        raise ConfigError(f"checkpoint.resume=false but {ckpt.directory} already holds steps "
                          f"{ckpt.all_steps()}: choose a new train.out_dir / checkpoint.dir")
    diffs = config_differences(ckpt.read_metadata(), cfg)
    if diffs:
        raise ConfigError(f"cannot resume from {ckpt.directory}: it was trained with different "
                          f"{', '.join(diffs)}; use a new train.out_dir or the same settings")
    restored = ckpt.restore_latest(trainer.abstract_state())
    trainer.state = restored.train_state
    loader.restore(restored.data_state["loader"])
    if jax.process_index() == 0:
        print(f"[train] resuming from step {int(trainer.state.step)} of "
              f"{trainer.plan.total_steps} (checkpoint {ckpt.directory})", flush=True)
    return ckpt, restored.data_state


def train(cfg: Config, *, data=None, model=None, mesh=None, progress: bool = True,
          stop_at_step: int | None = None) -> TrainResult:
    """Runs (or resumes) the configured training; see the module docstring.

    data / model / mesh: pre-built objects (`data.prepare.prepare_data`,
    `assemble.build_run_model` / `build_mesh`), e.g. an SFT model to align (LoRA is
    attached to it in place when enabled: pass a clone to keep the original); built from
    `cfg` when None. stop_at_step: stop after this global step with a checkpoint, exactly as
    a SIGTERM would (for tests and time-boxed jobs).

    Raises run_lock.RunDirInUse when another live process trains into train.out_dir, and
    write_checks.OutputWriteError when it (or checkpoint.dir) cannot be written -- both
    before any work.
    """
    require_loggers(cfg.train.loggers)  # a missing wandb fails now, not after the data is built
    if cfg.lora.enabled and cfg.lora.init_from is not None:
        read_adapter_config(cfg.lora.init_from)  # a bad adapter dir fails before any data work
    with RunLock(cfg.train.out_dir, process_index=jax.process_index()) as lock:
        if lock.stale_pid and jax.process_index() == 0:
            print(f"[train] {lock.path}: took over the lock of a run that is gone "
                  f"({lock.stale_pid})", flush=True)
        if cfg.checkpoint.dir:
            check_writable(cfg.checkpoint.dir, "checkpoint.dir")
        return _train_locked(cfg, data=data, model=model, mesh=mesh, progress=progress,
                             stop_at_step=stop_at_step)


def _train_locked(cfg: Config, *, data, model, mesh, progress: bool,
                  stop_at_step: int | None) -> TrainResult:
    mesh = mesh if mesh is not None else assemble.build_mesh(cfg)
    if data is None:
        # on a pod: process 0 builds, the others reuse its files (shared dir) or build the
        # same ones (per-host local dirs)
        data = process_zero_first(lambda: prepare.prepare_data(cfg, progress=progress),
                                  "prepare_data")
    plan, loader = _plan_and_loader(cfg, mesh, data)
    model = model if model is not None else assemble.build_run_model(cfg, mesh, data.processor)
    trainer = _Trainer(cfg, data, model, mesh, plan)
    ckpt, position = _open_checkpoints(cfg, trainer, loader)
    try:
        return _run_rounds(cfg, trainer, loader, ckpt, position, progress, stop_at_step)
    except BaseException:
        _close_quietly(ckpt)  # orbax's threads; the error that stopped the run is the news
        raise


def _close_quietly(ckpt: Checkpointer) -> None:
    try:
        ckpt.close()
    except Exception:  # noqa: BLE001  (a failed pending save: the caller's error says why)
        pass


def _skip_reasons(history: list[dict], empty_rounds: int, skipped: int) -> dict[str, int]:
    """{why: count} of the updates of this run that were not applied (`SKIP_*`)."""
    reasons: dict[str, int] = {}
    for row in history:
        if row.get("applied", 1):
            continue
        finite = math.isfinite(row.get("loss", 0.0)) and math.isfinite(row.get("grad_norm", 0.0))
        why = SKIP_NONFINITE if not finite else SKIP_NO_GAP
        reasons[why] = reasons.get(why, 0) + 1
    if empty_rounds:
        reasons[SKIP_EMPTY_ROUND] = empty_rounds
    earlier = skipped - sum(reasons.values())
    if earlier > 0:
        reasons[SKIP_EARLIER] = earlier
    return reasons


def _run_rounds(cfg: Config, trainer: _Trainer, loader: ShardedLoader, ckpt: Checkpointer,
                position: dict | None, progress: bool, stop_at_step: int | None) -> TrainResult:
    log = RunLog(cfg.train.out_dir, enabled=jax.process_index() == 0,
                 loggers=cfg.train.loggers, run_config=config_to_dict(cfg))
    if position is None:
        position = {"round": 0, "step_in_round": 0, "loader": loader.state()}
    log.truncate_after(int(trainer.state.step))  # rows a killed run wrote after its checkpoint
    run = _Run(cfg, trainer, loader, ckpt, log, stop_at_step,
               progress_bar(progress, trainer.plan.total_steps, int(trainer.state.step)))
    try:
        with PreemptionGuard(signals=(signal.SIGTERM, signal.SIGINT)) as guard:
            for r in range(position["round"], trainer.plan.rounds):
                if guard.requested and jax.process_count() == 1:  # came between steps (a
                    # round that kept no list checks no step): stop here, at the round start
                    ckpt.maybe_save(int(trainer.state.step), trainer.state, position, force=True)
                    run.preempted = True
                    break
                position = run.round(r, position, guard)
                if run.preempted:
                    break
    except BaseException:
        if run.bar is not None:  # erase the bar: the error that stopped the run is the news
            run.bar.leave = False
            run.bar.close()
        raise
    final_step = int(trainer.state.step)
    if not run.preempted and not run.history and run.rounds:
        ckpt.close()  # nothing was trained: no checkpoint that would lock this run's config
        raise ConfigError(f"0 updates: every list of the {len(run.rounds)} round(s) was dropped "
                          f"({rounds.describe_drops(run.dropped, cfg.data.min_margin)}); lower "
                          "data.min_margin or check the rewards")
    if not run.preempted:
        ckpt.maybe_save(final_step, trainer.state, position, force=True)
    ckpt.wait()
    ckpt.close()
    if run.bar is not None:
        run.bar.close()
    if jax.process_index() == 0:
        plot_curves(log.records("step"), os.path.join(cfg.train.out_dir, "curves.png"),
                    title=f"{cfg.loss.name} ({cfg.train.mode})")
    log.close()
    skipped = int(trainer.state.skipped)
    return TrainResult(trainer.model(), run.history, run.rounds, cfg.train.out_dir, final_step,
                       run.preempted, skipped,
                       _skip_reasons(run.history, run.empty_round_updates, skipped))


@dataclasses.dataclass
class _Run:
    """One call of `train`: the per-round body and what it accumulates."""

    cfg: Config
    trainer: _Trainer
    loader: ShardedLoader
    ckpt: Checkpointer
    log: RunLog
    stop_at_step: int | None
    bar: Any
    history: list = dataclasses.field(default_factory=list)
    rounds: list = dataclasses.field(default_factory=list)
    preempted: bool = False
    dropped: dict = dataclasses.field(default_factory=dict)  # list drop counts over rounds
    empty_round_updates: int = 0  # updates skipped because their round kept no list

    def _report_round(self, r: int, stats: dict) -> None:
        """One line per round: lists kept of prompts, and why the others were dropped."""
        for key, value in stats.items():
            if key.startswith("dropped_") or key == "duplicates_removed":
                self.dropped[key] = self.dropped.get(key, 0) + value
        if jax.process_index() != 0:
            return
        kept, prompts = int(stats.get("lists_kept", 0)), int(stats.get("prompts", 0))
        drops = rounds.describe_drops(stats, self.cfg.data.min_margin)
        note = "" if kept else f": its {self.trainer.plan.round_steps[r]} updates are skipped"
        say(self.bar, f"[round {r}] {kept}/{prompts} lists kept ({drops}){note}")

    def round(self, r: int, position: dict, guard) -> dict:
        """Runs round r from `position` (maybe mid-round); returns the position after it."""
        cfg, trainer = self.cfg, self.trainer
        inside = position["step_in_round"] > 0
        if inside:  # the round's prompts and lists are reused, never re-sampled
            self.loader.restore(position["loader_at_round_start"])
        start_state = self.loader.state()
        # offline: one loader batch per update of the round; online: one per round
        draws = trainer.plan.round_steps[r] if trainer.plan.exact_pass else 1
        examples, keys = [], []  # keys: each example's position in the round's global order
        for d in range(draws):
            drawn = [prepare.record_example(rec) for rec in next(self.loader)]
            start = d * self.loader.global_batch + jax.process_index() * self.loader.batch_size
            examples += drawn
            keys += range(start, start + len(drawn))
        path = _lists_path(cfg.train.out_dir, r)
        if inside:
            if not storage.exists(path):  # a local path or gs://
                raise FileNotFoundError(f"resuming inside round {r} needs its lists {path}; "
                                        f"they are written under train.out_dir={cfg.train.out_dir}")
            lists = ListSet.load(path)
            trainer.most_lists = global_max({"lists": len(lists)})["lists"]
        else:
            lists = trainer.round_lists(examples, r)
            lists.save(path)  # this host's lists: a resume re-gathers them
        lists = rounds.gather_round_lists(lists, np.asarray(keys, np.int64))
        if not inside:
            self.rounds.append({"round": r, **lists.stats})
            self.log.write(lists.stats, step=int(trainer.state.step), kind="round")
            self._report_round(r, lists.stats)
        planned = trainer.plan.round_steps[r]
        for i in range(position["step_in_round"], planned):
            metrics = trainer.step(lists, r, i)
            if metrics is None:  # no host kept a list: the round's updates are skipped
                trainer.skip_updates(planned - i)
                self.empty_round_updates += planned - i
                if self.bar is not None:
                    self.bar.update(planned - i)
                break
            step = int(trainer.state.step)
            metrics.update(round=r, mean_reward=lists.stats.get("mean_reward", float("nan")))
            self.history.append({"step": step, **metrics})
            if step % cfg.train.log_every == 0:
                self.log.write(metrics, step=step)
            advance(self.bar, metrics)
            last = i + 1 == planned
            position = {"round": r + 1 if last else r, "step_in_round": 0 if last else i + 1,
                        "loader": self.loader.state(), "loader_at_round_start": start_state}
            self.ckpt.maybe_save(step, trainer.state, position)
            if guard.stop_now(step) or (self.stop_at_step is not None and step >= self.stop_at_step):
                self.ckpt.maybe_save(step, trainer.state, position, force=True)
                self.preempted = True
                return position
        return {"round": r + 1, "step_in_round": 0, "loader": self.loader.state(),
                "loader_at_round_start": start_state}
