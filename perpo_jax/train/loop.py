"""The PerPO loop, end to end (`perpo-jax train --config ...`).

One round (online mode):

    prompts ──sample (device, KV cache, shared prefill)──► K candidates per prompt
            ──decode + reward (host numpy, each host its own samples)──► rewards [B, K]
            ──build_lists (dedup, min_margin, sort, thin to K)──► ListSet (saved to disk)
            ──reference log-probs (LoRA off, once per list)──► ref_logps [L, K]
            ──S jitted sharded updates over the round's lists──► checkpoint ──► next round

Offline mode replaces sampling by the pre-sampled candidates of the official PerPO JSON
(`answers_gen` + `iou_scores`); `loss.name=sft` with `loss.sft_target=ground_truth` trains on
the ground-truth answers (no sampling). Rounds take `sampling.prompts_per_round` prompts each
from the resumable loader; online: `train.rounds` rounds; offline: `train.epochs` passes over
the data. A round runs `train.steps` updates (0: `epochs` passes over its lists for online,
one pass for offline), so every method gets the same number of updates.

Resume is exact: the checkpoint holds the train state and the position (round, step in round,
loader), and each round's lists are on disk, so a run killed mid-round continues with the same
lists at the same step.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from perpo_jax.checkpoint import Checkpointer, PreemptionGuard
from perpo_jax.config import Config, config_to_dict
from perpo_jax.data.loader import ShardedLoader
from perpo_jax.mesh import batch_sharding
from perpo_jax.rewards import get_reward
from perpo_jax.train.listset import ListSet, lists_from_candidates, lists_from_ground_truth
from perpo_jax.train.lora import LoRAParam, apply_lora
from perpo_jax.train.optim import make_optimizer
from perpo_jax.train.run_log import RunLog, plot_curves
from perpo_jax.train.state import create_train_state, partition_model, reference_state
from perpo_jax.train.step import build_ref_logps, build_train_step


@dataclasses.dataclass
class TrainResult:
    model: Any  # the trained policy as one NNX module (LoRA still attached when on)
    history: list[dict]  # per-step metrics of this process's run (resumed steps included)
    rounds: list[dict]  # per-round list statistics
    out_dir: str
    steps: int  # global steps done
    preempted: bool  # stopped early by SIGTERM / stop_at_step, with a checkpoint


@dataclasses.dataclass
class _Plan:
    rounds: int
    steps_per_round: int
    batch_lists: int  # global lists per step (lists_per_step rounded up to the batch shards)
    local_lists: int  # this host's rows of a step batch

    @property
    def total_steps(self) -> int:
        return self.rounds * self.steps_per_round


def uses_sampling(cfg: Config) -> bool:
    return cfg.train.mode == "online" and not (
        cfg.loss.name == "sft" and cfg.loss.sft_target == "ground_truth")


def make_plan(cfg: Config, mesh, num_train: int) -> _Plan:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_lists = -(-cfg.train.lists_per_step // shards) * shards
    per_round = cfg.sampling.prompts_per_round
    per_host = num_train // jax.process_count()
    if per_host < per_round:
        raise ValueError(f"sampling.prompts_per_round={per_round} exceeds the {per_host} "
                         f"training prompts of this host")
    if cfg.train.mode == "online":
        rounds = cfg.train.rounds
        default_steps = math.ceil(per_round / cfg.train.lists_per_step) * cfg.train.epochs
    else:
        rounds = cfg.train.epochs * (per_host // per_round)
        default_steps = math.ceil(per_round / cfg.train.lists_per_step)
    steps = cfg.train.steps or default_steps
    return _Plan(rounds, steps, batch_lists, batch_lists // jax.process_count())


# ----------------------------------------------------------------------------- host ⇄ device


def to_global(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """This host's rows → global arrays sharded over (data, fsdp) (multi-host safe)."""
    sharding = batch_sharding(mesh, 1)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def local_rows(x: jax.Array, local_n: int) -> np.ndarray:
    """This host's rows of a global array whose rows were laid out by `to_global`."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    full = np.asarray(multihost_utils.process_allgather(x, tiled=True))
    start = jax.process_index() * local_n
    return full[start:start + local_n]


# ----------------------------------------------------------------------------- lists of a round


def _ground_truth(task: str, examples) -> Any:
    if task == "grounding":
        return np.stack([np.asarray(ex.box, np.float32) for ex in examples])
    return [ex.answer for ex in examples]


def sample_round_lists(cfg: Config, data, model, mesh, examples, round_index: int) -> ListSet:
    """Samples K candidates per prompt, rewards them on the host, builds the round's lists."""
    from perpo_jax.build import prompt_batch_for
    from perpo_jax.sampling import sample

    proc = data.processor
    k = cfg.sampling.num_samples
    max_prompt = cfg.train.max_length - cfg.sampling.max_new_tokens
    prompts = prompt_batch_for(examples, proc, max_prompt)
    rng = jax.random.fold_in(jax.random.key(cfg.train.seed), 1_000_003 * round_index
                             + jax.process_index())
    t0 = time.perf_counter()
    out = sample(model, to_global(prompts, mesh) if jax.process_count() > 1 else prompts,
                 num_samples=k, max_new_tokens=cfg.sampling.max_new_tokens,
                 temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p, rng=rng,
                 eos_id=proc.tokenizer.eos_token_id, pad_id=proc.tokenizer.pad_token_id, mesh=mesh)
    tokens = local_rows(out.tokens, len(examples))
    lengths = local_rows(out.lengths, len(examples))
    seconds = time.perf_counter() - t0
    ids = [[tokens[b, j, :lengths[b, j]].tolist() for j in range(k)] for b in range(len(examples))]
    texts = [[proc.decode_response(c) for c in row] for row in ids]
    reward_fn = get_reward(cfg.data.task)
    gt = _ground_truth(cfg.data.task, examples)
    rewards = [np.asarray(reward_fn(texts[b], _repeat(gt, b, k)), np.float32)
               for b in range(len(examples))]
    lists = lists_from_candidates(
        proc, examples, texts, ids, rewards, num_candidates=cfg.train.num_candidates,
        min_margin=cfg.data.min_margin, max_prompt=max_prompt,
        max_response=cfg.sampling.max_new_tokens)
    lists.stats["samples_per_s"] = len(examples) * k / max(seconds, 1e-9)
    return lists


def _repeat(gt, b: int, k: int):
    if isinstance(gt, np.ndarray):
        return np.repeat(gt[b:b + 1], k, axis=0)
    return [gt[b]] * k


def offline_round_lists(cfg: Config, data, examples) -> ListSet:
    """Lists from pre-sampled candidates (official PerPO JSON: answers_gen + iou_scores)."""
    missing = [i for i, ex in enumerate(examples) if ex.responses is None]
    if missing:
        raise ValueError(f"train.mode=offline needs pre-sampled candidates, but records {missing[:5]} "
                         f"of data.source={cfg.data.source!r} have none")
    return lists_from_candidates(
        data.processor, examples, [list(ex.responses) for ex in examples], None,
        [np.asarray(ex.rewards, np.float32) for ex in examples],
        num_candidates=cfg.train.num_candidates, min_margin=cfg.data.min_margin,
        max_prompt=cfg.train.max_length - cfg.train.max_response_length,
        max_response=cfg.train.max_response_length)


def add_ref_logps(lists: ListSet, ref_fn, state, frozen, reference, mesh, plan: _Plan) -> None:
    """Reference log-probs of every list, computed once (LoRA off / initial weights)."""
    n = len(lists)
    out = np.zeros(lists.arrays["rewards"].shape, np.float32)
    for start in range(0, n, plan.local_lists):
        idx = list(range(start, min(start + plan.local_lists, n)))
        batch = to_global(lists.step_batch(idx, plan.local_lists), mesh)
        ref = local_rows(ref_fn(state.params, frozen, reference, batch), plan.local_lists)
        out[start:start + len(idx)] = ref[:len(idx)]
    lists.arrays["ref_logps"] = out


# ----------------------------------------------------------------------------- the loop


class _Trainer:
    """Everything live during a run; `train` drives it."""

    def __init__(self, cfg: Config, data, model, mesh):
        self.cfg, self.data, self.mesh = cfg, data, mesh
        lora_cfg = cfg.lora if cfg.lora.enabled else None
        if lora_cfg is not None and not jax.tree.leaves(nnx.state(model, LoRAParam)):
            apply_lora(model, cfg.lora, nnx.Rngs(cfg.train.seed))
        self.parts = partition_model(model, lora_cfg)
        self.plan = make_plan(cfg, mesh, len(data.train))
        optimizer, schedule = make_optimizer(cfg.optim, self.plan.total_steps)
        self.state, self.frozen, self.reference = create_train_state(
            self.parts, optimizer, mesh, cfg.train.seed)
        self.step_fn = build_train_step(
            self.parts.graphdef, self.state, self.frozen, self.reference, loss_cfg=cfg.loss,
            optimizer=optimizer, schedule=schedule, mesh=mesh, grad_accum=cfg.optim.grad_accum,
            shared_prefix=cfg.train.shared_prefix)
        self.ref_fn = None
        if cfg.loss.name != "sft" and cfg.train.precompute_ref:
            self.ref_fn = build_ref_logps(self.parts.graphdef, self.state.params, self.frozen,
                                          self.reference, mesh=mesh,
                                          shared_prefix=cfg.train.shared_prefix)

    def model(self, *, reference: bool = False):
        params = self.state.params
        if reference:
            params = reference_state(params, self.reference)
        return nnx.merge(self.parts.graphdef, params, self.frozen)

    def abstract_state(self):
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)

    def round_lists(self, examples, round_index: int) -> ListSet:
        cfg = self.cfg
        if uses_sampling(cfg):
            model = self.model(reference=cfg.sampling.from_reference)
            lists = sample_round_lists(cfg, self.data, model, self.mesh, examples, round_index)
        elif cfg.train.mode == "offline" and cfg.loss.name != "sft":
            lists = offline_round_lists(cfg, self.data, examples)
        else:
            lists = lists_from_ground_truth(
                self.data.processor, examples,
                max_prompt=cfg.train.max_length - cfg.train.max_response_length,
                max_response=cfg.train.max_response_length)
        if len(lists) and self.ref_fn is not None:
            add_ref_logps(lists, self.ref_fn, self.state, self.frozen, self.reference, self.mesh,
                          self.plan)
        return lists

    def step(self, lists: ListSet, round_index: int, step_in_round: int):
        """One update on lists chosen by a per-round permutation, cycled as needed."""
        n, b = len(lists), self.plan.local_lists
        if n == 0:
            batch_np = _empty_batch_like(self._last_batch_np) if self._last_batch_np else None
            if batch_np is None:
                return None
        else:
            order = np.random.default_rng([self.cfg.train.seed, round_index]).permutation(n)
            idx = [int(order[(step_in_round * b + j) % n]) for j in range(min(b, n))]
            batch_np = lists.step_batch(idx, b)
            self._last_batch_np = batch_np
        t0 = time.perf_counter()
        self.state, metrics = self.step_fn(self.state, self.frozen, self.reference,
                                           to_global(batch_np, self.mesh))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        seconds = time.perf_counter() - t0
        metrics["step_seconds"] = seconds
        metrics["tokens_per_s"] = metrics.get("tokens", 0.0) / max(seconds, 1e-9)
        return metrics

    _last_batch_np: dict | None = None


def _empty_batch_like(batch: dict) -> dict:
    """A batch of the same shapes with no valid list: keeps hosts in lock-step when one host
    kept no list this round (loss 0, zero gradient)."""
    out = {k: np.zeros_like(v) for k, v in batch.items()}
    return out


def _lists_path(out_dir: str, round_index: int) -> str:
    return os.path.join(out_dir, "lists", f"host{jax.process_index():03d}",
                        f"round_{round_index:05d}.npz")


def train(cfg: Config, *, data=None, model=None, mesh=None, progress: bool = True,
          stop_at_step: int | None = None) -> TrainResult:
    """Runs (or resumes) the configured training; see the module docstring.

    data / model / mesh: pre-built objects (`perpo_jax.build`), e.g. an SFT model to align;
    built from `cfg` when None. stop_at_step: stop after this global step with a checkpoint,
    exactly as a SIGTERM would (for tests and time-boxed jobs).
    """
    from perpo_jax import build

    mesh = mesh if mesh is not None else build.build_mesh(cfg)
    data = data if data is not None else build.prepare_data(cfg, progress=progress)
    model = model if model is not None else build.build_model(cfg, mesh, data.processor)
    trainer = _Trainer(cfg, data, model, mesh)
    plan = trainer.plan
    out_dir = cfg.train.out_dir
    ckpt = Checkpointer(cfg.checkpoint.dir or os.path.join(out_dir, "checkpoints"),
                        save_every=cfg.checkpoint.save_every, keep=cfg.checkpoint.keep,
                        async_save=cfg.checkpoint.async_save, metadata=config_to_dict(cfg))
    log = RunLog(out_dir, enabled=jax.process_index() == 0)
    loader = ShardedLoader(data.train, cfg.sampling.prompts_per_round, seed=cfg.data.seed,
                           process_index=jax.process_index(), process_count=jax.process_count())
    position = {"round": 0, "step_in_round": 0, "loader": loader.state()}
    if cfg.checkpoint.resume:
        restored = ckpt.restore_latest(trainer.abstract_state())
        if restored is not None:
            trainer.state, position = restored.train_state, restored.data_state
            loader.restore(position["loader"])
    history: list[dict] = []
    rounds: list[dict] = []
    preempted = False
    bar = _progress(progress, plan.total_steps, int(trainer.state.step))
    with PreemptionGuard() as guard:
        for r in range(position["round"], plan.rounds):
            resuming_inside = position["step_in_round"] > 0
            if resuming_inside:  # the round's prompts (and lists on disk) are reused
                loader.restore(position["loader_at_round_start"])
            start_state = loader.state()
            examples = [build.record_example(rec) for rec in next(loader)]
            path = _lists_path(out_dir, r)
            if resuming_inside and os.path.exists(path):
                lists = ListSet.load(path)
            else:
                lists = trainer.round_lists(examples, r)
                lists.save(path)
                rounds.append({"round": r, **lists.stats})
                log.write(lists.stats, step=int(trainer.state.step), kind="round")
            mean_reward = lists.stats.get("mean_reward", float("nan"))
            first = position["step_in_round"]
            for i in range(first, plan.steps_per_round):
                metrics = trainer.step(lists, r, i)
                if metrics is None:
                    continue
                step = int(trainer.state.step)
                metrics.update(round=r, mean_reward=mean_reward)
                history.append({"step": step, **metrics})
                if step % cfg.train.log_every == 0:
                    log.write(metrics, step=step)
                _advance(bar, metrics)
                last = i + 1 == plan.steps_per_round
                position = {"round": r + 1 if last else r, "step_in_round": 0 if last else i + 1,
                            "loader": loader.state(), "loader_at_round_start": start_state}
                ckpt.maybe_save(step, trainer.state, position)
                if guard.stop_now(step) or (stop_at_step is not None and step >= stop_at_step):
                    ckpt.maybe_save(step, trainer.state, position, force=True)
                    preempted = True
                    break
            if preempted:
                break
            position = {"round": r + 1, "step_in_round": 0, "loader": loader.state(),
                        "loader_at_round_start": start_state}
    final_step = int(trainer.state.step)
    if not preempted:
        ckpt.maybe_save(final_step, trainer.state, position, force=True)
    ckpt.wait()
    ckpt.close()
    if bar is not None:
        bar.close()
    if jax.process_index() == 0:
        plot_curves(log.records("step"), os.path.join(out_dir, "curves.png"),
                    title=f"{cfg.loss.name} ({cfg.train.mode})")
    log.close()
    return TrainResult(trainer.model(), history, rounds, out_dir, final_step, preempted)


def _progress(enabled: bool, total: int, initial: int):
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def _advance(bar, metrics: dict) -> None:
    if bar is None:
        return
    bar.update(1)
    bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics.get('pair_accuracy', 0.0):.2f}",
                    tok_s=f"{metrics['tokens_per_s']:.0f}")
