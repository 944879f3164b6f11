"""The lists of one round: sampled and rewarded (online), pre-sampled (offline), or the
ground truth (SFT); then made identical in shape on every host, cut to M3PO pairs where the
config asks (`select_round_pairs`) and given reference log-probs.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from perpo_jax.config import Config
from perpo_jax.data.batching import PromptTooLongError, bucketed
from perpo_jax.data.examples import prompt_batch_for, prompt_length, prompt_limit, text_of
from perpo_jax.m3po import confidence, mean_token_logps, pair_arrays, select_pairs
from perpo_jax.mas import mas_scorer
from perpo_jax.rewards import build_lists, get_reward
from perpo_jax.sampling import sample
from perpo_jax.train.hosts import global_max, local_rows, to_global
from perpo_jax.train.listset import (ListSet, lists_from_candidates,
                                     lists_from_ground_truth)


def uses_sampling(cfg: Config) -> bool:
    """Online rounds sample, except SFT on the ground truth, which needs no candidates."""
    return cfg.train.mode == "online" and not (
        cfg.loss.name == "sft" and cfg.loss.sft_target == "ground_truth")


def uses_ground_truth(cfg: Config) -> bool:
    """One-candidate lists of the ground-truth answer: SFT without sampled candidates."""
    return not uses_sampling(cfg) and not (cfg.train.mode == "offline" and cfg.loss.name != "sft")


def uses_pairs(cfg: Config) -> bool:
    """M3PO and its baselines: each sampled list is cut to one selected pair (K = 2)."""
    return cfg.m3po.pairs != "none" and uses_sampling(cfg)


def response_length(cfg: Config) -> int:
    """R of the round's lists: what the sampler generates, or the configured max answer."""
    return cfg.sampling.max_new_tokens if uses_sampling(cfg) else cfg.train.max_response_length


def ground_truth(task: str, examples) -> object:
    """What the task's reward compares against: boxes [N, 4] (grounding) or answer strings."""
    if task == "grounding":
        return np.stack([np.asarray(ex.box, np.float32) for ex in examples])
    return [ex.answer for ex in examples]


def repeat_target(gt, b: int, k: int):
    """The ground truth of prompt b repeated for its k candidates."""
    if isinstance(gt, np.ndarray):
        return np.repeat(gt[b:b + 1], k, axis=0)
    return [gt[b]] * k


def sample_round_lists(cfg: Config, processor, model, mesh, examples, round_index: int) -> ListSet:
    """Samples K candidates per prompt (prefill shared by the K), rewards them on this host,
    builds the round's lists. Prompts are padded to the longest of the round (rounded up to
    `PROMPT_BUCKET` tokens, the same on every host)."""
    tok = processor.tokenizer
    k = cfg.sampling.num_samples
    max_prompt = cfg.train.max_length - cfg.sampling.max_new_tokens
    # Padded to the batch's longest prompt (bucketed, the same on every host), not to
    # max_prompt: prefill and every decode step's attention scale with this width.
    prompts = prompt_batch_for(examples, processor, None)
    longest = prompts["prompt_ids"].shape[1]
    if longest > max_prompt:
        raise PromptTooLongError(
            f"a prompt of this round has {longest} tokens (image tokens included) > "
            f"train.max_length - sampling.max_new_tokens = {cfg.train.max_length} - "
            f"{cfg.sampling.max_new_tokens} = {max_prompt}: raise train.max_length")
    width = min(global_max({"p": bucketed(longest)})["p"], max_prompt)
    prompts = ListSet(prompts, {}).with_prompt_length(width, tok.pad_token_id or 0).arrays
    # The same key on every host (one jitted program); rows get their own streams inside.
    rng = jax.random.fold_in(jax.random.key(cfg.train.seed), round_index)
    t0 = time.perf_counter()
    out = sample(model, to_global(prompts, mesh) if jax.process_count() > 1 else prompts,
                 num_samples=k, max_new_tokens=cfg.sampling.max_new_tokens,
                 temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p, rng=rng,
                 eos_id=processor.stop_ids, pad_id=tok.pad_token_id or 0, mesh=mesh,
                 suppress_ids=(processor.image_token_id,))
    tokens, lengths = local_rows(out.tokens), local_rows(out.lengths)
    seconds = time.perf_counter() - t0
    ids = [[tokens[b, j, :lengths[b, j]].tolist() for j in range(k)] for b in range(len(examples))]
    texts = [[processor.decode_response(c) for c in row] for row in ids]
    reward_fn = get_reward(cfg.data.task)
    gt = ground_truth(cfg.data.task, examples)
    scorer = mas_scorer(cfg) if uses_pairs(cfg) else None
    if scorer is not None:  # M3PO with a MAS other than the task reward
        reward_fn = _mas_reward(scorer, examples)
    rewards = [np.asarray(reward_fn(texts[b], repeat_target(gt, b, k)), np.float32)
               for b in range(len(examples))]
    lists = lists_from_candidates(
        processor, examples, texts, ids, rewards, num_candidates=cfg.train.num_candidates,
        min_margin=cfg.data.min_margin, max_prompt=max_prompt,
        max_response=cfg.sampling.max_new_tokens)
    lists.stats["samples_per_s"] = len(examples) * k / max(seconds, 1e-9)
    return lists


def _mas_reward(scorer, examples):
    """A MAS scorer seen as a reward function: called once per prompt, in prompt order."""
    calls = iter(examples)
    return lambda texts, target: scorer(texts, next(calls), target)


def offline_round_lists(cfg: Config, processor, examples) -> ListSet:
    """Lists from pre-sampled candidates (official PerPO JSON: answers_gen + iou_scores)."""
    if not examples:
        return ListSet({}, {"prompts": 0.0, "lists_kept": 0.0})
    # a too-long prompt is an error naming the key to raise, before any list is built
    prompt_length(examples, processor, prompt_limit(cfg, "train.max_response_length"))
    missing = [i for i, ex in enumerate(examples) if ex.responses is None]
    if missing:
        raise ValueError(f"train.mode=offline needs pre-sampled candidates, but records {missing[:5]} "
                         f"of data.source={cfg.data.source!r} have none")
    return lists_from_candidates(
        processor, examples, [list(ex.responses) for ex in examples], None,
        [np.asarray(ex.rewards, np.float32) for ex in examples],
        num_candidates=cfg.train.num_candidates, min_margin=cfg.data.min_margin,
        max_prompt=cfg.train.max_length - cfg.train.max_response_length,
        max_response=cfg.train.max_response_length)


def ground_truth_lists(cfg: Config, processor, examples) -> ListSet:
    if not examples:
        return ListSet({}, {"prompts": 0.0, "lists_kept": 0.0})
    prompt_length(examples, processor, prompt_limit(cfg, "train.max_response_length"))
    return lists_from_ground_truth(
        processor, examples, max_prompt=cfg.train.max_length - cfg.train.max_response_length,
        max_response=cfg.train.max_response_length)


def align_across_hosts(lists: ListSet, cfg: Config, processor, image_rows: dict,
                       num_candidates: int | None = None) -> tuple[ListSet, int]:
    """Makes every host's ListSet the same width and returns (lists, the most lists any host
    kept). A host that kept none gets an empty ListSet of the right row shapes (K =
    `num_candidates`, default: what the config's lists hold; image arrays as `image_rows`
    {name: (row shape, dtype str)} of `processor.image_inputs`)."""
    width = lists.arrays["prompt_ids"].shape[1] if len(lists) else 0
    sync = global_max({"lists": len(lists), "width": width})
    if sync["lists"] == 0:
        return lists, 0
    if not len(lists):
        k = num_candidates or (1 if uses_ground_truth(cfg) else cfg.train.num_candidates)
        r = response_length(cfg)
        lists = ListSet.empty({
            **image_rows, "prompt_ids": ((sync["width"],), "<i4"),
            "prompt_mask": ((sync["width"],), "|b1"), "response_ids": ((k, r), "<i4"),
            "response_mask": ((k, r), "|b1"), "rewards": ((k,), "<f4"), "list_mask": ((k,), "|b1"),
            "target_ids": ((r,), "<i4"), "target_mask": ((r,), "|b1"), "source": ((), "<i4"),
        }, lists.stats)
    return lists.with_prompt_length(sync["width"], processor.tokenizer.pad_token_id or 0), sync["lists"]


# Round statistics that add up over hosts, and per-prompt means (weighted by "prompts").
SUMMED_STATS = ("prompts", "lists_kept", "duplicates_removed", "responses_truncated",
                "dropped_margin", "dropped_too_few", "dropped_nonfinite_reward",
                "dropped_no_pair", "pairs_kept", "samples_per_s")
MEAN_STATS = ("mean_reward", "max_reward")


def stats_across_hosts(stats: dict) -> dict:
    """A round's statistics over every host: `SUMMED_STATS` summed, `MEAN_STATS` averaged
    weighted by each host's prompts; any other key keeps this host's value. One process:
    unchanged."""
    if jax.process_count() == 1:
        return stats
    prompts = float(stats.get("prompts", 0.0))
    mine = np.asarray([float(stats.get(k, 0.0)) for k in SUMMED_STATS]
                      + [prompts * float(stats.get(k, 0.0)) for k in MEAN_STATS], np.float64)
    total = np.asarray(multihost_utils.process_allgather(mine)).sum(axis=0)
    out = dict(stats)
    for i, key in enumerate(SUMMED_STATS):
        if key in stats or total[i]:
            out[key] = float(total[i])
    all_prompts = out.get("prompts", 0.0)
    for j, key in enumerate(MEAN_STATS):
        if key in stats and all_prompts:
            out[key] = float(total[len(SUMMED_STATS) + j] / all_prompts)
    return out


def gather_round_lists(lists: ListSet, example_keys: np.ndarray) -> ListSet:
    """Every host's lists of the round, on every host, in the order one process would hold
    them: sorted by `example_keys[source]`, the global position of each list's prompt
    (`example_keys` [E] int64: of this host's E round examples), with the round's statistics
    over every host. One process: unchanged.

    This is what makes a step's batch independent of the number of hosts: every host builds
    the batch one process would, and feeds its own block of rows.
    """
    if jax.process_count() == 1 or not lists.arrays:
        return ListSet(lists.arrays, stats_across_hosts(lists.stats))
    counts = np.asarray(multihost_utils.process_allgather(np.int64(len(lists))))  # [H]
    most = int(counts.max())
    mine = lists.step_batch(range(len(lists)), most)  # zero rows up to `most`, no source
    mine["source"] = np.zeros(most, np.int32)  # from here on: the global position
    mine["source"][:len(lists)] = np.asarray(example_keys)[lists.arrays["source"]]
    every = multihost_utils.process_allgather(mine)  # {name: [H, most, ...]}
    arrays = {name: np.concatenate([np.asarray(v)[h, :counts[h]] for h in range(len(counts))])
              for name, v in every.items()}
    order = np.argsort(arrays["source"], kind="stable")
    return ListSet({name: v[order] for name, v in arrays.items()}, stats_across_hosts(lists.stats))


def select_round_pairs(lists, policy_fn, state, frozen, mesh, rows: int, most_lists: int,
                       m3po_cfg, seed: int, round_index: int):
    """Cuts a round's ListSet (K candidates per list, rewards = MAS) down to one pair per list
    with the configured pairing. The policy's mean token log-probs are computed in batches of
    `rows` lists (every host makes ceil(most_lists / rows) calls) by `policy_fn`
    (`step.build_policy_logps`). Returns a new ListSet."""
    n = len(lists)
    summed = np.zeros(lists.arrays["rewards"].shape, np.float32) if lists.arrays else None
    if m3po_cfg.pairs == "m3p" and most_lists:
        if policy_fn is None:
            raise ValueError("m3po.pairs=m3p needs the policy's log-probs (policy_fn)")
        for start in range(0, most_lists, rows):
            idx = list(range(start, min(start + rows, n)))
            batch = to_global(lists.step_batch(idx, rows), mesh)
            out = local_rows(policy_fn(state.params, frozen, batch))
            summed[start:start + len(idx)] = out[:len(idx)]
    stats = dict(lists.stats)
    if not n:
        stats.update(pairs_kept=0.0, dropped_no_pair=0.0)
        return ListSet(lists.arrays, stats)
    mean_logp = mean_token_logps(summed, lists.arrays["response_mask"])
    mas = np.clip(lists.arrays["rewards"], 0.0, 1.0)
    mask = lists.arrays["list_mask"]
    chosen, rejected, valid = select_pairs(
        m3po_cfg.pairs, mas, mean_logp, mask, alpha=m3po_cfg.alpha, lam=m3po_cfg.lam,
        delta=m3po_cfg.delta, rng=np.random.default_rng([seed, round_index, 15]))
    stats.update(pairs_kept=float(valid.sum()), dropped_no_pair=float((~valid).sum()),
                 lists_kept=float(valid.sum()))
    if valid.any():
        rows_ = np.flatnonzero(valid)
        conf = confidence(mean_logp)
        stats["negative_confidence"] = float(conf[rows_, rejected[rows_]].mean())
        stats["negative_mas"] = float(mas[rows_, rejected[rows_]].mean())
        stats["chosen_mas"] = float(mas[rows_, chosen[rows_]].mean())
        return ListSet(pair_arrays(lists.arrays, chosen, rejected, valid, mas), stats)
    return ListSet({}, stats)


def add_ref_logps(lists: ListSet, ref_fn, state, frozen, reference, mesh, rows: int,
                  most_lists: int) -> None:
    """ref_logps [L, K]: reference log-probs of every list, computed once (LoRA off / initial
    weights), in batches of `rows` lists; every host makes ceil(most_lists / rows) calls."""
    n = len(lists)
    out = np.zeros(lists.arrays["rewards"].shape, np.float32)
    for start in range(0, most_lists, rows):
        idx = list(range(start, min(start + rows, n)))
        batch = to_global(lists.step_batch(idx, rows), mesh)
        ref = local_rows(ref_fn(state.params, frozen, reference, batch))
        out[start:start + len(idx)] = ref[:len(idx)]
    lists.arrays["ref_logps"] = out


def offline_kept(cfg: Config, source) -> tuple[np.ndarray, dict]:
    """Which records of an offline source make a list: (indices [M] int64, counts).

    The same filter `offline_round_lists` applies (dedup, `data.min_margin`, thinning to
    `train.num_candidates`), run once over the texts and scores before training, so the plan
    knows how many updates an exact pass takes. Ground-truth SFT keeps every record. counts:
    {"records", "kept", "duplicates_removed", "dropped_<reason>"}.
    """
    n = len(source)
    if uses_ground_truth(cfg):
        return np.arange(n, dtype=np.int64), {"records": n, "kept": n}
    responses, scores = [], []
    for i in range(n):
        record = source[i]
        if "candidates" not in record:
            raise ValueError(f"train.mode=offline needs pre-sampled candidates, but record {i} of "
                             f"data.source={cfg.data.source!r} has none")
        responses.append([text_of(c) for c in record["candidates"]])
        scores.append(np.asarray(record["scores"], np.float64))
    built = build_lists(responses, scores, min_margin=cfg.data.min_margin,
                        max_size=cfg.train.num_candidates)
    kept = np.asarray([c.index for c in built.lists], np.int64)
    counts = {"records": n, "kept": len(kept), "duplicates_removed": built.duplicates_removed,
              **{f"dropped_{k}": v for k, v in built.dropped.items()}}
    return kept, counts


def describe_drops(counts: dict, min_margin: float) -> str:
    """'3 below data.min_margin=0.8, 1 with < 2 distinct candidates' from list counts."""
    parts = []
    if counts.get("dropped_margin"):
        parts.append(f"{int(counts['dropped_margin'])} with best - worst reward below "
                     f"data.min_margin={min_margin}")
    if counts.get("dropped_too_few"):
        parts.append(f"{int(counts['dropped_too_few'])} with fewer than 2 distinct candidates")
    if counts.get("dropped_nonfinite_reward"):
        parts.append(f"{int(counts['dropped_nonfinite_reward'])} with a non-finite reward")
    if counts.get("dropped_no_pair"):
        parts.append(f"{int(counts['dropped_no_pair'])} without a pair whose MAS differ by "
                     "m3po.delta")
    if counts.get("duplicates_removed"):
        parts.append(f"{int(counts['duplicates_removed'])} duplicate candidates removed")
    return ", ".join(parts) or "none dropped"
