"""Benchmark: one online round's sampling with prompts padded to the MAXIMUM prompt length
(`train.max_length - sampling.max_new_tokens`, what the loop did before) versus to the round's
longest prompt rounded up to `PROMPT_BUCKET` (what it does now), same model, same prompts.

A LLaVA-1.5-shaped prompt: 576 image tokens (336 px / 14 px patches) + a question of 30–60
tokens, on a small random LLaVA (widths are small so it runs on CPU; the prompt geometry is
the paper's). Each "round" draws new question lengths, as real rounds do, so compile counts
show how many shapes bucketing creates. Both variants run in the same process, interleaved.
Prints ONE JSON object.

    python bench/sample_padding.py [--rounds 4 --batch 2 --samples 8 --new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from perpo_jax.data.batching import PROMPT_BUCKET, bucketed
from perpo_jax.models import build_model, tiny_llava_config
from perpo_jax.sampling import sample

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ modules, however run
from timing import machine_info  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--max-length", type=int, default=2048, help="train.max_length")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring events) while active."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_) -> None:
        if event == self.EVENT:
            self.count += 1


def round_prompts(rng, args, image_token_id: int, image_tokens: int):
    """prompt ids [B, P_longest] (right-padded) and mask: BOS, image tokens, question."""
    lengths = rng.integers(30, 61, size=args.batch)
    rows = [np.concatenate([[1], np.full(image_tokens, image_token_id),
                            rng.integers(3, image_token_id, size=n)]) for n in lengths]
    longest = max(len(r) for r in rows)
    ids = np.zeros((args.batch, longest), np.int32)
    mask = np.zeros((args.batch, longest), bool)
    for b, r in enumerate(rows):
        ids[b, :len(r)], mask[b, :len(r)] = r, True
    return ids, mask


def padded_to(ids, mask, width: int):
    extra = width - ids.shape[1]
    return np.pad(ids, ((0, 0), (0, extra))), np.pad(mask, ((0, 0), (0, extra)))


def main():
    args = parse_args()
    config = tiny_llava_config(args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                               image_size=336, patch_size=14)
    config = config.replace(text=config.text.replace(max_position_embeddings=args.max_length + 64))
    model = build_model(config, rngs=nnx.Rngs(args.seed))
    image_tokens = (336 // 14) ** 2
    max_prompt = args.max_length - args.new_tokens
    rng = np.random.default_rng(args.seed)
    pixels = rng.normal(size=(args.batch, 3, 336, 336)).astype(np.float32)
    # Warm-up at another width, uncounted: what does not depend on the prompt width (the
    # vision tower, small helpers) compiles here, so neither variant pays for it below.
    ids, mask = round_prompts(rng, args, config.image_token_id, image_tokens)
    warm_ids, warm_mask = padded_to(ids, mask, ids.shape[1] + 1)
    sample(model, {"prompt_ids": warm_ids, "prompt_mask": warm_mask, "pixel_values": pixels},
           num_samples=args.samples, max_new_tokens=args.new_tokens, temperature=1.0,
           rng=jax.random.key(0), eos_id=None).tokens.block_until_ready()
    counter = CompileCounter()
    variants = {"pad_to_max_prompt": lambda longest: max_prompt,
                "pad_to_bucketed_longest": lambda longest: min(bucketed(longest), max_prompt)}
    stats = {name: {"seconds": [], "widths": [], "compiles": 0} for name in variants}
    for r in range(args.rounds):
        ids, mask = round_prompts(rng, args, config.image_token_id, image_tokens)
        for name, width_of in variants.items():
            width = width_of(ids.shape[1])
            p_ids, p_mask = padded_to(ids, mask, width)
            batch = {"prompt_ids": p_ids, "prompt_mask": p_mask, "pixel_values": pixels}
            before = counter.count
            t0 = time.perf_counter()
            out = sample(model, batch, num_samples=args.samples, max_new_tokens=args.new_tokens,
                         temperature=1.0, rng=jax.random.key(r), eos_id=None)
            out.tokens.block_until_ready()
            stats[name]["seconds"].append(time.perf_counter() - t0)
            stats[name]["widths"].append(width)
            stats[name]["compiles"] += counter.count - before
    result = {"config": {**vars(args), "image_tokens": image_tokens, "max_prompt": max_prompt,
                         "prompt_bucket": PROMPT_BUCKET}}
    for name, st in stats.items():
        later = st["seconds"][1:] or st["seconds"]
        result[name] = {"round_seconds": [round(s, 3) for s in st["seconds"]],
                        "median_round_s_after_first": round(statistics.median(later), 3),
                        "prompt_widths": st["widths"], "compilations": st["compiles"]}
    old, new = (result[n]["median_round_s_after_first"] for n in variants)
    result["speedup_median_after_first"] = round(old / new, 2)
    result["total_speedup_incl_compiles"] = round(
        sum(stats["pad_to_max_prompt"]["seconds"]) / sum(stats["pad_to_bucketed_longest"]["seconds"]), 2)
    result["machine"] = machine_info()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
