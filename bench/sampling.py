"""Benchmark: tokens/s of `perpo_jax.sampling.sample` (K samples, shared prefill) versus
transformers `generate(num_return_sequences=K, do_sample=True)` on the same tiny random Llama.

Both generate exactly `--new-tokens` tokens per sample (ours: no EOS; HF: min_new_tokens), so
tokens/s = batch * K * new_tokens / seconds. Our first call (trace + compile + run) is reported
apart from the steady-state median. Prints ONE JSON object.

    python bench/sampling.py [--batch 4 --samples 8 --prompt-len 64 --new-tokens 32 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def build_hf_model(args, out_dir):
    """Random tiny LlamaForCausalLM saved to `out_dir`; returns the torch model (eval)."""
    import torch
    import transformers

    torch.manual_seed(args.seed)
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=4 * (args.prompt_len + args.new_tokens),
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(out_dir)
    return model


def timed_pair(fn_a, fn_b, repeats):
    """Times two callables with INTERLEAVED calls (a shared, busy machine slows both alike).

    Returns for each: first call seconds, median and minimum of `repeats` further calls.
    """
    stats = []
    for fn in (fn_a, fn_b):
        start = time.perf_counter()
        fn()
        stats.append({"first": time.perf_counter() - start, "times": []})
    for _ in range(repeats):
        for fn, st in zip((fn_a, fn_b), stats):
            start = time.perf_counter()
            fn()
            st["times"].append(time.perf_counter() - start)
    return [(st["first"], statistics.median(st["times"]), min(st["times"])) for st in stats]


def bench_ours(args, model_dir, prompt_ids):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from perpo_jax.hf import load_pretrained
    from perpo_jax.sampling import sample

    model = load_pretrained(model_dir, dtype=jnp.float32)
    batch = {"prompt_ids": prompt_ids, "prompt_mask": np.ones_like(prompt_ids, bool)}
    calls = iter(range(10**6))

    def once():
        out = sample(model, batch, num_samples=args.samples, max_new_tokens=args.new_tokens,
                     temperature=1.0, top_p=1.0, rng=jax.random.key(next(calls)), eos_id=None)
        out.tokens.block_until_ready()
        assert int(out.lengths.min()) == args.new_tokens, "every sample must run to the end"

    return once


def bench_hf(args, hf_model, prompt_ids):
    import torch

    ids = torch.as_tensor(prompt_ids, dtype=torch.long)

    def once():
        with torch.no_grad():
            out = hf_model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=True, top_p=1.0, top_k=0,
                temperature=1.0, num_return_sequences=args.samples,
                max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0,
            )
        assert out.shape == (ids.shape[0] * args.samples, ids.shape[1] + args.new_tokens)

    return once


def machine_info():
    import jax
    import torch
    import transformers

    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
    }


def main():
    import numpy as np

    args = parse_args()
    rs = np.random.RandomState(args.seed)
    prompt_ids = rs.randint(3, args.vocab, (args.batch, args.prompt_len)).astype(np.int32)
    tokens = args.batch * args.samples * args.new_tokens
    with tempfile.TemporaryDirectory() as model_dir:
        hf_model = build_hf_model(args, model_dir)
        ours_fn = bench_ours(args, model_dir, prompt_ids)  # loads the weights; dir may go after
    ours, hf = timed_pair(ours_fn, bench_hf(args, hf_model, prompt_ids), args.repeats)

    def report(first, median, best, compile_estimate=False):
        out = {"first_call_s": round(first, 4), "median_call_s": round(median, 4),
               "min_call_s": round(best, 4), "tokens_per_s_median": round(tokens / median, 1),
               "tokens_per_s_best": round(tokens / best, 1)}
        if compile_estimate:  # trace + XLA compile ≈ first call minus a steady call
            out["compile_s_estimate"] = round(first - median, 4)
        return out

    result = {
        "config": vars(args),
        "generated_tokens_per_call": tokens,
        "perpo_jax": report(*ours, compile_estimate=True),
        "transformers_generate": report(*hf),
        "speedup_median": round(hf[1] / ours[1], 2),
        "speedup_best": round(hf[2] / ours[2], 2),
        "machine": machine_info(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
