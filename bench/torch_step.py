"""The PyTorch side of bench/list_step.py: the same list step done the naive way with
transformers (K copies of the prompt, logits at every position, trl-style labels), as a
PyTorch user would run it; AdamW and clipping as ours.

`python torch_step.py --serve ...` runs it as a child process driven by
`torch_process.TorchStepProcess`.
"""
from __future__ import annotations

import argparse
import json
import sys
import types

import numpy as np
import torch
import transformers
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

from perpo_jax.host_memory import keep_host_memory


def perpo_loss_torch(s, rewards, beta: float, gamma: float):
    """PerPO loss of one list: −Σ_{R_i>R_j} w_ij log σ(β(s_i − s_j)), w ∝ (R_i − R_j)^γ."""
    gap = rewards[:, None] - rewards[None, :]
    ordered = gap > 0
    weight = torch.where(ordered, gap.clamp(min=0) ** gamma, torch.zeros_like(gap))
    weight = weight / weight.sum()
    pair = torch.nn.functional.logsigmoid(beta * (s[:, None] - s[None, :]))
    return -(weight * pair).sum()


def build_torch(model_dir: str, batch_np: dict, *, seed: int, beta: float, gamma: float):
    """transformers LLaVA (LLaVA-NeXT when the batch has image_sizes) loaded from our export
    in `model_dir` + the naive list step on `batch_np` (bench/list_step.py's batch of one
    list); returns (step fn, initial summed log-probs [K])."""
    torch.manual_seed(seed)
    anyres = "image_sizes" in batch_np
    cls = (transformers.LlavaNextForConditionalGeneration if anyres
           else transformers.LlavaForConditionalGeneration)
    hf = cls.from_pretrained(model_dir, dtype=torch.float32)
    hf.train()  # all dropouts are 0 in these configs; train mode as a trainer would run it
    k, r = batch_np["response_ids"].shape[1:]
    prompt = np.repeat(batch_np["prompt_ids"], k, axis=0)  # [K, P]: image + prompt per copy
    ids = torch.as_tensor(np.concatenate([prompt, batch_np["response_ids"][0]], axis=1), dtype=torch.long)
    pixels = torch.as_tensor(np.repeat(batch_np["pixel_values"], k, axis=0))
    images = {"pixel_values": pixels}
    if anyres:  # [K, N, C, H, W] + [K, 2] (original height, width) per copy
        images["image_sizes"] = torch.as_tensor(np.repeat(batch_np["image_sizes"], k, axis=0),
                                                dtype=torch.long)
    attention = torch.ones_like(ids)
    # trl-style labels: log-softmax over every position, prompt labels masked out
    labels = ids[:, 1:]
    scored = torch.zeros_like(labels, dtype=torch.bool)
    scored[:, -r:] = torch.as_tensor(batch_np["response_mask"][0])
    rewards = torch.as_tensor(batch_np["rewards"][0])
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def summed_logps():
        logits = hf(input_ids=ids, attention_mask=attention, **images).logits
        token = logits[:, :-1].log_softmax(-1).gather(-1, labels[..., None])[..., 0]
        return (token * scored).sum(-1)  # [K]

    with torch.no_grad():
        initial = summed_logps().numpy()
    ref = torch.as_tensor(initial)  # reference = initial weights, precomputed like ours

    def once():
        opt.zero_grad(set_to_none=True)
        loss = perpo_loss_torch(summed_logps() - ref, rewards, beta, gamma)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        once.last_loss = float(loss.detach())

    return once, initial


def transformers_image_tokens(cfg, height: int, width: int):
    """transformers' `LlavaNextProcessor` image-token count of a (height, width) image (its
    `_get_number_of_features`, no tokenizer needed; CLS counted then dropped for "default"),
    or an error string."""
    try:
        proc = types.SimpleNamespace(
            image_processor=types.SimpleNamespace(
                image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints]),
            patch_size=cfg.vision.patch_size,
            num_additional_image_tokens=1 if cfg.vision.family == "clip" else 0)
        proc._get_unpadded_features = types.MethodType(
            LlavaNextProcessor._get_unpadded_features, proc)
        tile = cfg.vision.image_size
        count = LlavaNextProcessor._get_number_of_features(proc, height, width, tile, tile)
        return count - (1 if cfg.vision_feature_select_strategy == "default" else 0)
    except Exception as err:  # a transformers without these internals: say so
        return f"{type(err).__name__}: {err}"


def in_process_step(model_dir: str, batch_np: dict, *, threads: int, host_memory_kept,
                    seed: int, beta: float, gamma: float):
    """The step in this process (bench/list_step.py --torch-in-process): callable, with
    .initial summed log-probs [K] and .versions like the child's reply."""
    torch.set_num_threads(threads)  # XLA's CPU client uses every usable core too
    step, initial = build_torch(model_dir, batch_np, seed=seed, beta=beta, gamma=gamma)
    step.initial = initial
    step.versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                     "torch_threads": torch.get_num_threads(),
                     "torch_host_memory_kept": host_memory_kept}  # one process: shared
    return step


def serve(argv=None):
    """The child's side: build the step, print {"initial", "versions"}, then one JSON line
    {"loss"} per "step" line read from stdin, until "quit" or end of input."""
    p = argparse.ArgumentParser()
    p.add_argument("--serve", nargs=2, metavar=("MODEL_DIR", "BATCH_NPZ"), required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--beta", type=float, required=True)
    p.add_argument("--gamma", type=float, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--keep-host-memory", action="store_true")
    args = p.parse_args(argv)
    out, sys.stdout = sys.stdout, sys.stderr  # stdout carries the replies only
    kept = keep_host_memory() if args.keep_host_memory else False
    torch.set_num_threads(args.threads)
    model_dir, batch_path = args.serve
    with np.load(batch_path) as npz:
        batch_np = {name: npz[name] for name in npz.files}
    step, initial = build_torch(model_dir, batch_np, seed=args.seed, beta=args.beta,
                                gamma=args.gamma)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "torch_threads": torch.get_num_threads(), "torch_host_memory_kept": kept}
    out.write(json.dumps({"initial": initial.tolist(), "versions": versions}) + "\n")
    out.flush()
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        step()
        out.write(json.dumps({"loss": step.last_loss}) + "\n")
        out.flush()


if __name__ == "__main__":
    serve()
