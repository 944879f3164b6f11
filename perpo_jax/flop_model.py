"""Analytic FLOP model of our LLaVA programs: list scoring, the train step, the sampler.

Pure Python (no jax import), for reports beside XLA's own count (`bench/`). Why a
model at all: the towers run under `jax.lax.scan`, and XLA's `cost_analysis()` counts a
loop body ONCE (the 7B v4-8 train step reports 3.1e12 flops per chip scanned vs 7.7e13
unrolled), so compiled flops no longer stand for the work; nor do they for the sampler,
whose decode loop is a `while_loop`.

Counted: 2 FLOPs per multiply-add of every matrix product (linears, LoRA's A and B, the
attention scores and weighted values, lm_head, the vision patch conv). Not counted: the
elementwise work (norms, activations, softmax, RoPE, the optimizer update), which XLA's
count includes (measured 1-5 % more at toy width, less at real width).

Two counts of the same program (`executed=`):

- model FLOPs (`executed=False`, the default; what MFU divides): causal attention counts
  only the keys a query may see; every response token of a list goes through the decoder and
  has its logits computed (K·R positions per list), as tokens/s counts them; a reference
  forward in the step counts without LoRA (its adapters are zero) and without the frozen
  vision tower's pass, whose features are the policy's; remat's recomputed forward is NOT
  counted (MFU, not HFU: the PaLM paper's convention).
- executed FLOPs (`executed=True`): what this package's programs run, to compare with XLA:
  attention scores every key slot of a segment (our masked dense attention; a causal prefill
  of more than 2 · CAUSAL_BLOCK tokens runs query blocks that skip the keys past each block);
  the shared path runs K·(R-1) candidate tokens (the last one predicts nothing) and computes
  the first response token's logits once per list; a decode step scores the whole cache;
  remat's recompute of the decoder forward is added (an estimate, see `_remat_recompute`).

Dimensions are a dict (`model_dims` builds it from a config; `PAPER_DIMS` is LLaVA-1.5-7B):
d, q (= heads · head_dim), kv (= kv heads · head_dim), inter, layers, vocab of the decoder;
prompt P (image + text tokens), response R, candidates K; vision_d, vision_inter,
vision_tokens, patches, patch_in (= channels · patch²), vision_layers (those run, up to the
feature layer), tiles (images through the tower per prompt: 1, or anyres' N),
tile_features (projected features per tile), projector_in (default vision_d).
"""

from __future__ import annotations

CAUSAL_BLOCK = 128  # = perpo_jax.models.decoder.CAUSAL_BLOCK (tests check they agree)

# LLaVA-1.5-7B (Vicuna-7B + CLIP ViT-L/14-336, feature layer -2), the paper's list shape.
PAPER_DIMS = dict(d=4096, q=4096, kv=4096, inter=11008, layers=32, vocab=32000, prompt=616,
                  response=24, candidates=20, vision_d=1024, vision_inter=4096, vision_tokens=577,
                  patches=576, patch_in=3 * 14 * 14, vision_layers=23, tiles=1, tile_features=576)

TRAIN_MODES = ("full", "lora")


def model_dims(cfg, *, prompt: int, response: int, candidates: int, tiles: int = 1) -> dict:
    """The dimensions of a `LlavaConfig` (`perpo_jax.models.config`) at a list shape: prompt
    tokens P (image tokens included), R response tokens, K candidates, `tiles` per prompt.
    Vision layers are counted up to the deepest feature layer (the tower stops there)."""
    t, v = cfg.text, cfg.vision
    used_layers = max(i % (v.num_layers + 1) for i in cfg.feature_layers)
    return dict(
        d=t.hidden_size, q=t.num_heads * t.head_dim, kv=t.num_kv_heads * t.head_dim,
        inter=t.intermediate_size, layers=t.num_layers, vocab=t.vocab_size,
        prompt=prompt, response=response, candidates=candidates,
        vision_d=v.hidden_size, vision_inter=v.intermediate_size,
        vision_tokens=v.num_positions, patches=v.num_patches,
        patch_in=v.num_channels * v.patch_size ** 2, vision_layers=used_layers,
        tiles=tiles, tile_features=cfg.num_image_tokens,
        projector_in=v.hidden_size * len(cfg.feature_layers),
    )


# ----------------------------------------------------------------------------- pieces


def linear_flops_per_token(dims: dict, lora_rank: int = 0) -> dict:
    """One decoder layer's linears for one token: "base" (q, k, v, o, gate, up, down),
    "lora" (x·A then ·B on each, rank r), and "out_base" / "out_lora", the o and down part
    (their outputs only feed the residual: remat never recomputes them)."""
    d, q, kv, inter, r = dims["d"], dims["q"], dims["kv"], dims["inter"], lora_rank
    return {"base": 2 * (d * q + 2 * d * kv + q * d + 3 * d * inter),
            "lora": 2 * r * ((d + q) + 2 * (d + kv) + (q + d) + 3 * (d + inter)),
            "out_base": 2 * d * (q + inter), "out_lora": 2 * r * ((q + d) + (inter + d))}


def self_keys(n: int, *, executed: bool) -> float:
    """Keys scored by a causal run of n tokens over themselves (no prefix), summed over the
    queries: n(n+1)/2 seen; executed, n² (dense masked), or query blocks of CAUSAL_BLOCK
    each scoring the keys up to its end when n > 2 · CAUSAL_BLOCK (models/decoder.py)."""
    if not executed:
        return n * (n + 1) / 2
    if n <= 2 * CAUSAL_BLOCK:
        return n * n
    return sum((min(lo + CAUSAL_BLOCK, n) - lo) * min(lo + CAUSAL_BLOCK, n)
               for lo in range(0, n, CAUSAL_BLOCK))


def attention_flops(dims: dict, keys: float) -> float:
    """Scores (q·k) + weighted values (p·v) of every layer for `keys` query-key pairs."""
    return dims["layers"] * 4 * dims["q"] * keys


def vision_parts(dims: dict) -> dict:
    """Forward FLOPs of ONE prompt's images (all `tiles`): patch conv, the tower's layers up
    to the feature layer (linears + bidirectional attention over N tokens), the projector's
    two linears over the tile features."""
    dv, iv, nv, d = dims["vision_d"], dims["vision_inter"], dims["vision_tokens"], dims["d"]
    tiles, feats = dims["tiles"], dims["tile_features"]
    layer = nv * 2 * (4 * dv * dv + 2 * dv * iv) + 4 * nv * nv * dv
    return {"patch": tiles * 2 * dims["patches"] * dims["patch_in"] * dv,
            "vision_layers": tiles * dims["vision_layers"] * layer,
            "projector_1": tiles * 2 * feats * dims.get("projector_in", dv) * d,
            "projector_2": tiles * 2 * feats * d * d}


def _decoder_part(dims: dict, tokens: float, keys: float, lora_rank: int) -> dict:
    per = linear_flops_per_token(dims, lora_rank)
    return {"decoder_linear": tokens * dims["layers"] * per["base"],
            "decoder_lora": tokens * dims["layers"] * per["lora"],
            "decoder_attention": attention_flops(dims, keys), "tokens": tokens}


def _add(*parts: dict) -> dict:
    out: dict = {}
    for part in parts:
        for name, value in part.items():
            out[name] = out.get(name, 0) + value
    return out


def _scaled(part: dict, factor: float) -> dict:
    return {name: value * factor for name, value in part.items()}


def head_flops(dims: dict, rows: float) -> float:
    """lm_head over `rows` hidden states."""
    return rows * 2 * dims["d"] * dims["vocab"]


# ----------------------------------------------------------------------------- forward


def forward_parts(dims: dict, *, shared: bool, logits_everywhere: bool = False,
                  executed: bool = False, lora_rank: int = 0) -> dict:
    """Forward FLOPs of scoring ONE list of K candidates, by part (patch, vision_layers,
    projector_1, projector_2, decoder_linear, decoder_lora, decoder_attention, head) plus the
    decoder `tokens` run. See `forward_flops` for the formulas."""
    p, r, k = dims["prompt"], dims["response"], dims["candidates"]
    vision = vision_parts(dims)
    if not shared:  # K copies of image + prompt + response, logits at R (or every) position
        n = p + r
        part = _add(vision, _decoder_part(dims, n, self_keys(n, executed=executed), lora_rank),
                    {"head": head_flops(dims, n if logits_everywhere else r)})
        return _scaled(part, k)
    if executed:  # candidate tokens 0..R-2 after the prefix; token 0's logits once per list
        extend_n, head_rows = r - 1, 1 + k * (r - 1)
        extend_keys = extend_n * (p + extend_n)
    else:
        extend_n, head_rows = r, k * r
        extend_keys = extend_n * p + extend_n * (extend_n + 1) / 2
    prefill = _decoder_part(dims, p, self_keys(p, executed=executed), lora_rank)
    extend = _scaled(_decoder_part(dims, extend_n, extend_keys, lora_rank), k)
    return _add(vision, prefill, extend, {"head": head_flops(dims, head_rows)})


def forward_flops(dims: dict, *, shared: bool, logits_everywhere: bool = False,
                  executed: bool = False, lora_rank: int = 0) -> float:
    """Forward FLOPs (2 per multiply-add) of scoring ONE list of K candidates.

    Decoder, per token and layer: linears 2·(d·q + 2·d·kv + q·d + 3·d·I) (q, k, v, o, gate,
    up, down), with LoRA of rank r also 2·r·(in + out) on each, plus attention 4·q per key a
    query scores. A causal run of n tokens after c0 already-cached keys sees c0 + 1 .. c0 + n
    keys: attention 4·q·(n·c0 + n(n+1)/2). lm_head 2·d·V per scored position (R per
    candidate; with `logits_everywhere` at every position, as transformers' naive step does).
    Vision, per tile (`tiles` of them: 1 for LLaVA-1.5, the anyres base + grid tiles for
    NeXT): patch conv + the layers up to the feature layer over N tokens (linears +
    4·N²·dv attention) + the 2-layer projector per tile feature. With anyres the prompt P
    holds the packed image tokens (base + unpadded grid + newlines).

        naive  = K · (vision + decoder(P + R tokens from 0)        + head)
        shared =      vision + decoder(P tokens from 0) + K · decoder(R tokens after P) + K · head

    `executed=True` counts what our program runs instead (module docstring). The backward
    pass costs ~2x the forward of the same matmuls on both paths, so the ratio of these
    forward counts is the FLOP bound on the training-step speed-up. At the paper's shape
    (LLaVA-1.5-7B) attention and vision are small next to the linears and the ratio is
    ≈ token ratio K(P+R) / (P + K·R) = 20·640 / 1096 ≈ 11.7.
    """
    parts = forward_parts(dims, shared=shared, logits_everywhere=logits_everywhere,
                          executed=executed, lora_rank=lora_rank)
    return sum(v for name, v in parts.items() if name != "tokens")


def forward_report(dims: dict) -> dict:
    """Naive vs shared forward GFLOPs of one list and their ratios (the benchmarks' "flops")."""
    naive = forward_flops(dims, shared=False)
    shared = forward_flops(dims, shared=True)
    naive_impl = forward_flops(dims, shared=False, logits_everywhere=True)
    p, r, k = dims["prompt"], dims["response"], dims["candidates"]
    return {
        "naive_forward_gflop": round(naive / 1e9, 3),
        "shared_forward_gflop": round(shared / 1e9, 3),
        "ratio": round(naive / shared, 3),
        # the naive implementations compute logits at every position of every copy
        "ratio_with_naive_logits_everywhere": round(naive_impl / shared, 3),
        "token_ratio": round(k * (p + r) / (p + k * r), 3),
    }


# ----------------------------------------------------------------------------- train step


def _backward_parts(fwd: dict, *, train: str, train_projector: bool) -> dict:
    """Backward FLOPs by part. A product Y = X·W costs one forward again for dX when anything
    before X trains, and once more for dW when W trains; the attention products (no weights)
    cost two forwards (dQ, dK; dP, dV). Full fine-tune: every part ~2x (the patch conv only
    dW: no pixel gradient). LoRA (base frozen): decoder linears and lm_head dX only, adapters
    ~2x, the vision tower nothing, the projector dW (+ dX of linear_2) when it trains.
    Layer 0's input gradient counts like every layer's: the layer scan computes it (its
    carry's cotangent), needed or not."""
    if train == "full":
        return {"patch": fwd["patch"], **{name: 2 * fwd[name] for name in (
            "vision_layers", "projector_1", "projector_2", "decoder_linear", "decoder_lora",
            "decoder_attention", "head")}}
    return {"patch": 0, "vision_layers": 0,
            "projector_1": fwd["projector_1"] if train_projector else 0,
            "projector_2": 2 * fwd["projector_2"] if train_projector else 0,
            "decoder_linear": fwd["decoder_linear"], "decoder_lora": 2 * fwd["decoder_lora"],
            "decoder_attention": 2 * fwd["decoder_attention"], "head": fwd["head"]}


def _reference_forward(dims: dict, *, shared: bool, train: str, train_projector: bool,
                       executed: bool) -> float:
    """The reference pass of a step that runs it: the base model (its LoRA adapters are zero:
    no work, and XLA folds them away), without the parts whose weights and inputs equal the
    policy's (a frozen vision tower, a frozen projector: their features are the policy's,
    and XLA computes them once)."""
    parts = forward_parts(dims, shared=shared, executed=executed)
    shared_with_policy = set()
    if train == "lora":
        shared_with_policy |= {"patch", "vision_layers"}
        if not train_projector:
            shared_with_policy |= {"projector_1", "projector_2"}
    return sum(v for name, v in parts.items() if name not in shared_with_policy | {"tokens"})


def _remat_recompute(dims: dict, fwd: dict, lora_rank: int) -> float:
    """Remat's second decoder forward in the backward pass, less the o and down projections
    (the backward never reads their outputs, so JAX's remat leaves them out). An estimate:
    XLA may keep more (one layer, shared path: 7 % less, the prefix's k/v being kept)."""
    per = linear_flops_per_token(dims, lora_rank)
    kept = fwd["tokens"] * dims["layers"] * (per["out_base"] + per["out_lora"])
    return fwd["decoder_linear"] + fwd["decoder_lora"] + fwd["decoder_attention"] - kept


def train_step_flops(dims: dict, *, lists: int = 1, shared: bool = True, train: str = "lora",
                     lora_rank: int = 128, train_projector: bool = True,
                     reference_in_step: bool = False, remat: bool = False,
                     executed: bool = False) -> dict:
    """FLOPs of ONE training step over `lists` lists of the dims' shape: the policy forward
    (`forward_parts`), its backward (`_backward_parts`: ~2x the forward of what gets a
    gradient, so a full fine-tune totals the usual ~3x forward, LoRA ~2x + the adapters), the
    reference forward when the step runs it (`train.precompute_ref` off;
    `_reference_forward`), and, only when `executed`, remat's recomputed decoder forward
    (`_remat_recompute`; model FLOPs never count recompute).

    train: "full" (every parameter; lora_rank must be 0) or "lora" (adapters of `lora_rank`
    on every decoder linear, the projector too when `train_projector`, as the official
    recipe). Returns {"forward", "backward", "reference_forward", "remat_recompute",
    "total"} in FLOPs for the whole step.
    """
    if train not in TRAIN_MODES:
        raise ValueError(f"train must be one of {TRAIN_MODES}, got {train!r}")
    if train == "full" and lora_rank:
        raise ValueError("a full fine-tune has no LoRA: pass lora_rank=0")
    if train == "lora" and lora_rank <= 0:
        raise ValueError(f"train='lora' needs lora_rank > 0, got {lora_rank}")
    fwd = forward_parts(dims, shared=shared, executed=executed, lora_rank=lora_rank)
    bwd = _backward_parts(fwd, train=train, train_projector=train_projector)
    ref = 0.0
    if reference_in_step:
        ref = _reference_forward(dims, shared=shared, train=train,
                                 train_projector=train_projector, executed=executed)
    recompute = _remat_recompute(dims, fwd, lora_rank) if remat and executed else 0.0
    forward = sum(v for name, v in fwd.items() if name != "tokens")
    out = {"forward": forward, "backward": sum(bwd.values()), "reference_forward": ref,
           "remat_recompute": recompute}
    out = {name: lists * value for name, value in out.items()}
    out["total"] = sum(out.values())
    return out


# ----------------------------------------------------------------------------- sampler


def sampler_flops(dims: dict, *, prompts: int, samples: int, new_tokens: int,
                  lora_rank: int = 0, executed: bool = False) -> dict:
    """FLOPs of `perpo_jax.sampling.sample` for `prompts` prompts of the dims' P tokens
    (images included), `samples` K per prompt, `new_tokens` R each (no EOS: all run to R).

    prefill, once per prompt: vision + decoder(P) + one lm_head row (the first token of all
    K samples). decode: R − 1 steps of K tokens per prompt, each token through the linears
    (+ LoRA) and lm_head, its attention over the prompt's keys + the sample's own: the step
    feeding token s sees P + s + 1 keys (executed: all P + R cache slots are scored).
    Returns {"prefill", "decode", "total", "decode_per_token", "generated_tokens"}.
    """
    p = dims["prompt"]
    vision = sum(vision_parts(dims).values())
    prefill = _decoder_part(dims, p, self_keys(p, executed=executed), lora_rank)
    prefill = vision + sum(v for n, v in prefill.items() if n != "tokens") + head_flops(dims, 1)
    steps = new_tokens - 1
    keys = steps * (p + new_tokens) if executed else steps * p + steps * (steps + 1) / 2
    decode = _decoder_part(dims, steps, keys, lora_rank)
    decode = sum(v for n, v in decode.items() if n != "tokens") + head_flops(dims, steps)
    streams = prompts * samples  # every sample decodes on its own
    out = {"prefill": prompts * prefill, "decode": streams * decode}
    out["total"] = out["prefill"] + out["decode"]
    out["decode_per_token"] = decode / steps if steps else None
    out["generated_tokens"] = streams * new_tokens
    return out
