"""Benchmark (ahead of time, no TPU needed): one decoder layer's attention, forward + backward,
compiled by libtpu for ONE TPU chip, splash kernel vs the XLA custom-VJP core.

The two attention calls of one list's scoring at LLaVA-1.5-7B widths (32 query = 32 kv heads,
head dim 128, bf16): the prompt's prefill (causal, P tokens, right-padded) and the K candidates'
extend over the shared prefix (G = K groups of R - 1 tokens). Reported per variant:
- residual_bytes: what the forward keeps for the backward (the VJP's residual arrays, from
  `jax.eval_shape`; a model keeps them for EVERY layer until its backward, unless remat);
- temp_bytes / peak_bytes: XLA's `memory_analysis()` of the compiled forward + backward;
- xla_flops: `cost_analysis()` flops (XLA counts nothing inside a Mosaic call, so for splash
  this is only the layout copies around the kernel);
- mosaic_calls: `tpu_custom_call`s in the compiled HLO.
Only compile-time figures: no kernel runs here (timings need a TPU).

    JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 python bench/attention_aot.py
    JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 python bench/attention_aot.py --prompt 2048 --response 512 --candidates 5

Prints ONE JSON object.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from perpo_jax.mesh import make_mesh  # noqa: E402
from perpo_jax.models.attention_kernels import CausalOwnMask  # noqa: E402
from perpo_jax.models.decoder import grouped_attention  # noqa: E402
from perpo_jax.train.step import traced_under_mesh  # noqa: E402

TOPOLOGIES = {"v5e": ("v5e:2x4", "default"), "v4": ("v4:2x2x1", "megacore"),
              "v5p": ("v5:2x2x1", "megacore"), "v6e": ("v6e:2x4", "default")}


def one_layer(impl: str):
    """f(q, k, v, qc, kc, vc, valid_p, valid_c) -> scalar: prefill + candidate attention, whose
    gradient wrt every q / k / v is what the backward of one layer's attention computes."""

    def f(q, k, v, qc, kc, vc, valid_p, valid_c):
        out_p = grouped_attention(q, k, v, CausalOwnMask(valid_p[:, None], impl))
        prefix = (k[:, 0], v[:, 0], valid_p)
        out_c = grouped_attention(qc, kc, vc, CausalOwnMask(valid_c, impl), prefix)
        return out_p.astype(jnp.float32).sum() + out_c.astype(jnp.float32).sum()

    return f


def measure(impl: str, args, device) -> dict:
    f = one_layer(impl)
    bf16, sds = jnp.bfloat16, jax.ShapeDtypeStruct
    b, p, g, t, n, h = 1, args.prompt, args.candidates, args.response - 1, args.heads, args.head_dim
    shapes = (sds((b, 1, p, n, h), bf16), sds((b, 1, p, n, h), bf16), sds((b, 1, p, n, h), bf16),
              sds((b, g, t, n, h), bf16), sds((b, g, t, n, h), bf16), sds((b, g, t, n, h), bf16),
              sds((b, p), jnp.bool_), sds((b, g, t), jnp.bool_))
    mesh = make_mesh((1, 1, 1), devices=[device])
    grad = traced_under_mesh(jax.grad(f, argnums=tuple(range(6))), mesh)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    compiled = jax.jit(grad, in_shardings=sharding, out_shardings=sharding).lower(*shapes)
    compiled = compiled.compile()
    # what a model keeps from this layer's forward for its backward (every layer's stays alive
    # until the backward reaches it, unless remat): the VJP's residual arrays
    residuals = jax.eval_shape(
        lambda *a: jax.tree.leaves(jax.vjp(traced_under_mesh(f, mesh), *a)[1]), *shapes)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {"temp_bytes": int(mem.temp_size_in_bytes),
            "peak_bytes": int(getattr(mem, "peak_memory_in_bytes", 0)),
            "residual_bytes": int(sum(r.size * r.dtype.itemsize for r in residuals)),
            "xla_flops": float(cost.get("flops", 0.0)),
            "mosaic_calls": compiled.as_text().count('custom_call_target="tpu_custom_call"')}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tpu", default="v5e", choices=sorted(TOPOLOGIES))
    ap.add_argument("--prompt", type=int, default=640, help="prompt tokens P (image + text)")
    ap.add_argument("--candidates", type=int, default=20, help="candidates K per list")
    ap.add_argument("--response", type=int, default=64, help="tokens R per candidate")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    args = ap.parse_args(argv)
    name, chip_config = TOPOLOGIES[args.tpu]
    topology = topologies.get_topology_desc(
        platform="tpu", topology_name=name, chip_config_name=chip_config,
        chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=(False, False, False))
    device = topology.devices[0]
    out = {"tpu": args.tpu, "device_kind": device.device_kind, "prompt": args.prompt,
           "candidates": args.candidates, "response": args.response, "heads": args.heads,
           "head_dim": args.head_dim, "dtype": "bfloat16"}
    for impl in ("xla", "splash"):
        out[impl] = measure(impl, args, device)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
