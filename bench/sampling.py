"""Benchmark: sampling K candidates per prompt at the PerPO shape, ours vs transformers.

Default shape (the paper's list shape, narrow model): a LLaVA whose prompt is 576 image tokens
(CLIP at 336 px / patch 14) + 40 text tokens, K = 20 samples of 24 new tokens each, a 4-layer
Llama decoder of hidden 256 (the model of `bench/list_step.py`), float32. Compared in ONE run,
calls interleaved so load from other processes hits all alike, for greedy decoding and for
temperature 1:

- `ours_shared`: `perpo_jax.sampling.sample(num_samples=K)` — image + prompt prefilled ONCE per
  prompt, the K samples attend to its K/V;
- `ours_repeated`: the same sampler with the prompt (and image) repeated K times and
  `num_samples=1`: the same decode work, the prefill done K times (isolates prefill sharing);
- `transformers`: `LlavaForConditionalGeneration.generate` on the SAME weights (our
  `save_pretrained` export), `num_return_sequences=K` when sampling; greedy decoding cannot
  return K sequences there, so its input is repeated K times (what generate does internally).

Every sample runs exactly `--new-tokens` tokens (ours: no EOS; HF: min_new_tokens), so
tokens/s = batch · K · new_tokens / seconds. Prefill and decode are split by timing a call
with ONE new token (prefill + the first token) beside the full call: decode = full − prefill.
`flop_bound` is the forward-FLOP ratio of the repeated work to the shared one (vision +
prefill K times vs once, same decode), the most prefill sharing can give. Prints ONE JSON
object to stdout; progress on stderr.

    python bench/sampling.py                 # the PerPO shape (a few minutes on 2 cores)
    python bench/sampling.py --tiny          # toy size, seconds
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

BENCH = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))  # run from a checkout
sys.path.insert(0, str(BENCH))
import list_step  # noqa: E402  (the model config is shared)
from timing import cpu_cores, machine_info, time_interleaved  # noqa: E402

from perpo_jax.flop_model import PAPER_DIMS, forward_report  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="toy shape (seconds)")
    p.add_argument("--batch", type=int, default=2, help="prompts per call")
    p.add_argument("--samples", type=int, default=20, help="K samples per prompt")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--prompt-text", type=int, default=40, help="text tokens after the image")
    p.add_argument("--image-size", type=int, default=336)
    p.add_argument("--patch-size", type=int, default=14)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--vision-hidden", type=int, default=128)
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=["greedy", "temperature_1"],
                   choices=["greedy", "temperature_1"])
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tiny:
        args.image_size, args.patch_size, args.prompt_text = 28, 14, 6
        args.samples, args.new_tokens, args.batch = 4, 5, 2
        args.hidden, args.layers, args.heads, args.vocab = 32, 1, 2, 128
        args.vision_hidden, args.vision_layers, args.repeats = 32, 2, 1
    args.candidates, args.response_len = args.samples, args.new_tokens  # list_step's names
    return args


def make_prompts(cfg, args):
    """[B, P] prompts: BOS, the image tokens, text; and [B, 3, H, W] pixels (numpy)."""
    import numpy as np

    rng = np.random.default_rng(args.seed)
    text = rng.integers(2, args.vocab - 1, size=(args.batch, args.prompt_text - 1))
    ids = np.concatenate([np.ones((args.batch, 1), np.int64),
                          np.full((args.batch, cfg.num_image_tokens), cfg.image_token_id), text], 1)
    size = cfg.vision.image_size
    pixels = rng.normal(size=(args.batch, 3, size, size)).astype(np.float32)
    return ids.astype(np.int32), pixels


def ours_runner(model, ids, pixels, args, *, repeated: bool, greedy: bool, new_tokens: int):
    import jax
    import numpy as np

    from perpo_jax.sampling import sample

    k = args.samples
    if repeated:  # every sample gets its own copy of the prompt and image
        ids, pixels = np.repeat(ids, k, axis=0), np.repeat(pixels, k, axis=0)
    batch = {"prompt_ids": ids, "prompt_mask": np.ones_like(ids, bool), "pixel_values": pixels}
    calls = iter(range(10**6))

    def once():
        out = sample(model, batch, num_samples=1 if repeated else k, max_new_tokens=new_tokens,
                     temperature=0.0 if greedy else 1.0, top_p=1.0,
                     rng=jax.random.key(next(calls)), eos_id=None,
                     suppress_ids=(args.vocab - 1,))
        out.tokens.block_until_ready()
        assert int(out.lengths.min()) == new_tokens, "every sample must run to the end"
        once.tokens = np.asarray(out.tokens).reshape(args.batch, k, new_tokens)

    return once


def hf_runner(hf, ids, pixels, args, *, greedy: bool, new_tokens: int):
    import numpy as np
    import torch

    k = args.samples
    if greedy:  # generate returns one greedy sequence per input: repeat the input K times
        ids, pixels, per_input = np.repeat(ids, k, axis=0), np.repeat(pixels, k, axis=0), 1
    else:
        per_input = k
    ids_t, pixels_t = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(pixels)
    sampling = {} if greedy else {"top_p": 1.0, "top_k": 0, "temperature": 1.0}

    def once():
        with torch.no_grad():
            out = hf.generate(input_ids=ids_t, attention_mask=torch.ones_like(ids_t),
                              pixel_values=pixels_t, num_return_sequences=per_input,
                              do_sample=not greedy, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, pad_token_id=0, **sampling)
        assert out.shape == (args.batch * k, ids.shape[1] + new_tokens), out.shape
        once.tokens = out[:, ids.shape[1]:].numpy().reshape(args.batch, k, new_tokens)

    return once


def split_report(full: dict, prefill: dict, tokens: int, tokens_per_sample: int) -> dict:
    total, pre = full["median_s"], prefill["median_s"]
    return {"total_s": round(total, 4), "prefill_s": round(pre, 4),
            "decode_s": round(max(total - pre, 0.0), 4),
            "tokens_per_s": round(tokens / total, 1),
            # decode = all tokens but the first of each sample, over the decode seconds
            "decode_tokens_per_s": (round(tokens * (1 - 1 / max(1, tokens_per_sample))
                                          / (total - pre), 1) if total > pre else None),
            "first_call_s": round(full["first_s"], 3), "min_total_s": round(full["min_s"], 4)}


def main(argv=None):
    import numpy as np
    import torch
    import transformers
    from flax import nnx

    from perpo_jax.hf import save_pretrained
    from perpo_jax.host_memory import keep_host_memory
    from perpo_jax.models import LlavaModel

    args = parse_args(argv)
    kept = keep_host_memory()  # as `perpo-jax` runs; transformers shares it (one process)
    torch.set_num_threads(cpu_cores())
    cfg = list_step.model_config(args)
    ids, pixels = make_prompts(cfg, args)
    model = LlavaModel(cfg, rngs=nnx.Rngs(args.seed))
    hf = None
    if not args.no_hf:
        with tempfile.TemporaryDirectory() as model_dir:
            save_pretrained(model, model_dir)
            hf = transformers.LlavaForConditionalGeneration.from_pretrained(
                model_dir, dtype=torch.float32).eval()
    tokens = args.batch * args.samples * args.new_tokens
    flops = forward_report(list_step.flop_dims(cfg, args))
    paper = forward_report(PAPER_DIMS)
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("candidates", "response_len")},
              "prompt_tokens": int(ids.shape[1]), "generated_tokens_per_call": tokens,
              "flop_bound": flops["ratio"], "flop_bound_paper_llava_1_5_7b": paper["ratio"],
              "modes": {}}
    for mode in args.modes:
        greedy = mode == "greedy"
        runners = {}
        for name, repeated in (("ours_shared", False), ("ours_repeated", True)):
            for n_new, tag in ((args.new_tokens, ""), (1, "_prefill")):
                runners[name + tag] = ours_runner(model, ids, pixels, args, repeated=repeated,
                                                  greedy=greedy, new_tokens=n_new)
        if hf is not None:
            runners["transformers"] = hf_runner(hf, ids, pixels, args, greedy=greedy,
                                                new_tokens=args.new_tokens)
            runners["transformers_prefill"] = hf_runner(hf, ids, pixels, args, greedy=greedy,
                                                        new_tokens=1)
        times = time_interleaved(runners, args.repeats)
        names = ["ours_shared", "ours_repeated"] + (["transformers"] if hf is not None else [])
        rep = {name: split_report(times[name], times[name + "_prefill"], tokens, args.new_tokens)
               for name in names}
        rep["ours_compile_s_estimate"] = round(
            times["ours_shared"]["first_s"] - times["ours_shared"]["median_s"], 3)
        shared_t = times["ours_shared"]["median_s"]
        rep["speedup_vs_ours_repeated"] = round(times["ours_repeated"]["median_s"] / shared_t, 3)
        if greedy:  # same weights, same argmax: ours and transformers should agree
            a, b = runners["ours_shared"].tokens, runners["ours_repeated"].tokens
            rep["greedy_tokens_equal_shared_vs_repeated"] = bool(np.array_equal(a, b))
        if hf is not None:
            speed = times["transformers"]["median_s"] / shared_t
            rep["speedup_vs_transformers"] = round(speed, 3)
            rep["speedup_vs_transformers_min"] = round(
                times["transformers"]["min_s"] / times["ours_shared"]["min_s"], 3)
            rep["fraction_of_flop_bound"] = round(speed / flops["ratio"], 3)
            if greedy:
                agree = runners["ours_shared"].tokens == runners["transformers"].tokens
                rep["greedy_token_agreement_vs_transformers"] = round(float(agree.mean()), 4)
        result["modes"][mode] = rep
    result["machine"] = dict(machine_info(), host_memory_kept=kept)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
