"""Benchmark: where the seconds of ONE online PerPO round go, phase by phase.

Builds the run exactly as `perpo_jax.train.loop.train` does (`_plan_and_loader`, `_Trainer`)
and runs rounds with the same calls as `_Trainer.round_lists` / `rounds.sample_round_lists` /
`_Run.round`, timing each phase apart (device work is waited for inside its phase):

    sampling        `perpo_jax.sampling.sample` (prefill once per prompt, K samples)
    decode_text     token ids → texts (`processor.decode_response`)
    rewards         the task's host reward (`rewards.get_reward`), per prompt as the loop calls it
    list_building   `listset.lists_from_candidates` + `rounds.align_across_hosts`
    reference       `rounds.add_ref_logps` (reference log-probs of every kept list, once)
    update_steps    the round's `_Trainer.step` calls
    checkpoint      `Checkpointer.maybe_save(force=True)` + `wait()` (one save per round here)

Round 0 pays the compiles (XLA compile counts per phase are reported, from jax.monitoring's
compile events); later rounds are the steady state. Two shapes:

    demo   the demo's config (`configs/demo_shapes.yaml`: 64 px, 64 image tokens, K = 8,
           26 new tokens, 8 lists per update) with fewer prompts per round;
    paper  a paper-like round: 336 px / patch 14 (576 image tokens), a 4-layer decoder of
           hidden 256, K = 20 samples of 26 tokens, 2 lists per update.

Prints ONE JSON object (seconds and fractions per phase per round). The data is built once
under --work-dir (default: a temp dir). Nothing here edits the loop: the phases are the loop's
own functions called in the loop's order.

    python bench/round.py [--shapes demo paper] [--rounds 2] [--prompts 16]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # bench/ modules, however run

from timing import machine_info  # noqa: E402

from perpo_jax.host_memory import keep_host_memory  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
PHASES = ("sampling", "decode_text", "rewards", "list_building", "reference", "update_steps",
          "checkpoint")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["demo", "paper"], choices=["demo", "paper"])
    p.add_argument("--rounds", type=int, default=2, help="rounds per shape (round 0 compiles)")
    p.add_argument("--prompts", type=int, default=16, help="prompts per round")
    p.add_argument("--steps", type=int, default=2, help="updates per round")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--tiny", action="store_true", help="toy sizes (tests)")
    return p.parse_args(argv)


def shape_overrides(shape: str, args, work: str) -> list[str]:
    common = [f"train.out_dir={work}/{shape}/run", f"data.data_dir={work}/data",
              f"sampling.prompts_per_round={args.prompts}", f"train.steps={args.steps}",
              f"train.rounds={args.rounds}", "data.num_train=256", "data.num_val=16",
              "data.min_margin=0.0"]
    if shape == "demo":
        return common + (["model.tiny.hidden_size=32", "model.tiny.num_layers=1"] if args.tiny else [])
    if args.tiny:
        return common + ["model.tiny.image_size=28", "model.tiny.patch_size=14",
                         "sampling.num_samples=4", "train.num_candidates=4", "train.lists_per_step=2"]
    return common + ["model.tiny.image_size=336", "model.tiny.patch_size=14",
                     "model.tiny.hidden_size=256", "model.tiny.num_layers=4",
                     "sampling.num_samples=20", "train.num_candidates=20",
                     "train.lists_per_step=2", "train.max_length=1024"]


class CompileCounter:
    """Counts XLA backend compiles (jax.monitoring events) inside `with counter.phase(name)`."""

    def __init__(self):
        import jax

        self.counts, self.current = Counter(), None
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, _seconds: float, **_kw) -> None:
        if event == "/jax/core/compile/backend_compile_duration" and self.current:
            self.counts[self.current] += 1


class Timer:
    def __init__(self, counter: CompileCounter):
        self.seconds, self.counter = {}, counter

    def __call__(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                timer.counter.current = name
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - self.start
                timer.counter.current = None

        return _Phase()


def one_round(trainer, loader, ckpt, r: int, timer: Timer) -> dict:
    """Round r with the loop's calls, phase by phase (online sampling, no M3PO)."""
    import jax
    import numpy as np

    from perpo_jax.data.batching import bucketed
    from perpo_jax.data.examples import prompt_batch_for, record_example
    from perpo_jax.rewards import get_reward
    from perpo_jax.sampling import sample
    from perpo_jax.train import rounds
    from perpo_jax.train.hosts import global_max, local_rows
    from perpo_jax.train.listset import ListSet, lists_from_candidates

    cfg, proc = trainer.cfg, trainer.data.processor
    examples = [record_example(rec) for rec in next(loader)]
    tok, k = proc.tokenizer, cfg.sampling.num_samples
    max_prompt = cfg.train.max_length - cfg.sampling.max_new_tokens
    with timer("sampling"):
        model = trainer.model(reference=cfg.sampling.from_reference)
        prompts = prompt_batch_for(examples, proc, None)
        width = min(global_max({"p": bucketed(prompts["prompt_ids"].shape[1])})["p"], max_prompt)
        prompts = ListSet(prompts, {}).with_prompt_length(width, tok.pad_token_id or 0).arrays
        rng = jax.random.fold_in(jax.random.key(cfg.train.seed), r)
        out = sample(model, prompts, num_samples=k, max_new_tokens=cfg.sampling.max_new_tokens,
                     temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p, rng=rng,
                     eos_id=tok.eos_token_id, pad_id=tok.pad_token_id or 0, mesh=trainer.mesh,
                     suppress_ids=(proc.image_token_id,))
        tokens, lengths = local_rows(out.tokens), local_rows(out.lengths)
    with timer("decode_text"):
        ids = [[tokens[b, j, :lengths[b, j]].tolist() for j in range(k)] for b in range(len(examples))]
        texts = [[proc.decode_response(c) for c in row] for row in ids]
    with timer("rewards"):
        reward_fn = get_reward(cfg.data.task)
        gt = rounds.ground_truth(cfg.data.task, examples)
        rewards = [np.asarray(reward_fn(texts[b], rounds.repeat_target(gt, b, k)), np.float32)
                   for b in range(len(examples))]
    with timer("list_building"):
        lists = lists_from_candidates(
            proc, examples, texts, ids, rewards, num_candidates=cfg.train.num_candidates,
            min_margin=cfg.data.min_margin, max_prompt=max_prompt,
            max_response=cfg.sampling.max_new_tokens)
        pixel_shape = proc.pixel_values([examples[0].image]).shape[1:]
        lists, trainer.most_lists = rounds.align_across_hosts(lists, cfg, proc, pixel_shape)
    with timer("reference"):
        if trainer.most_lists and trainer.ref_fn is not None:
            rounds.add_ref_logps(lists, trainer.ref_fn, trainer.state, trainer.frozen,
                                 trainer.reference, trainer.mesh, trainer.plan.local_lists,
                                 trainer.most_lists)
    updates = 0
    with timer("update_steps"):
        for i in range(trainer.plan.round_steps[r]):
            if trainer.step(lists, r, i) is None:
                break
            updates += 1
    with timer("checkpoint"):
        step = int(trainer.state.step)
        ckpt.maybe_save(step, trainer.state, {"round": r + 1, "step_in_round": 0,
                                              "loader": loader.state()}, force=True)
        ckpt.wait()
    return {"prompts": len(examples), "samples": len(examples) * k, "lists": len(lists),
            "updates": updates, "prompt_width": int(width)}


def bench_shape(shape: str, args, work: str) -> dict:
    from perpo_jax.checkpoint import Checkpointer
    from perpo_jax.config import load_config
    from perpo_jax.data import prepare
    from perpo_jax import assemble
    from perpo_jax.train import loop

    cfg = load_config(REPO / "configs" / "demo_shapes.yaml", shape_overrides(shape, args, work))
    counter = CompileCounter()
    setup = Timer(counter)
    with setup("setup"):
        mesh = assemble.build_mesh(cfg)
        data = prepare.prepare_data(cfg, progress=False)
        plan, loader = loop._plan_and_loader(cfg, mesh, data)
        model = assemble.build_run_model(cfg, mesh, data.processor)
        trainer = loop._Trainer(cfg, data, model, mesh, plan)
        ckpt = Checkpointer(os.path.join(cfg.train.out_dir, "checkpoints"), save_every=1,
                            keep=1, async_save=cfg.checkpoint.async_save)
    out = {"setup_s": round(setup.seconds["setup"], 3), "setup_compiles": counter.counts["setup"],
           "config": {"image_tokens": model.config.num_image_tokens,
                      "hidden": model.config.text.hidden_size,
                      "layers": model.config.text.num_layers,
                      "samples_K": cfg.sampling.num_samples,
                      "new_tokens": cfg.sampling.max_new_tokens,
                      "num_candidates": cfg.train.num_candidates,
                      "lists_per_step": cfg.train.lists_per_step,
                      "prompts_per_round": cfg.sampling.prompts_per_round,
                      "updates_per_round": plan.round_steps[0]},
           "rounds": []}
    for r in range(args.rounds):
        counter.counts.clear()
        timer = Timer(counter)
        info = one_round(trainer, loader, ckpt, r, timer)
        total = sum(timer.seconds.values())
        slowest = max(PHASES, key=lambda p: timer.seconds.get(p, 0.0))
        out["rounds"].append({
            "round": r, **info, "total_s": round(total, 3), "slowest_phase": slowest,
            "seconds": {p: round(timer.seconds.get(p, 0.0), 4) for p in PHASES},
            "fractions": {p: round(timer.seconds.get(p, 0.0) / total, 4) for p in PHASES},
            "compiles": {p: counter.counts[p] for p in PHASES},
        })
    ckpt.close()
    return out


def main(argv=None):
    args = parse_args(argv)
    kept = keep_host_memory()  # as the `perpo-jax` command runs the loop
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or tmp
        result = {"args": vars(args), "shapes": {s: bench_shape(s, args, work) for s in args.shapes}}
    result["machine"] = dict(machine_info(), host_memory_kept=kept)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
