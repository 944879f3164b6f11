"""`perpo-jax plan --tpu NAME`: the round's programs compiled by XLA's TPU compiler (libtpu) on
this CPU host for v5e and v4 slices of tiny models; an out-of-memory is `fits: false` with the
compiler's message; the largest buffers; the topology table; libtpu missing is one line.

Outside references: the arguments XLA counts per chip equal the bytes of each device's shards
computed here from the shapes and the sharding rules; the decode step's arguments hold the KV
cache of the configured shape; the out-of-memory buffer is the attention-probability tensor of
the configured shape, inside the compiler's own total."""

from __future__ import annotations

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_hf
import transformers as tf
from flax import nnx

from perpo_jax import sampling, tpu_topology
from perpo_jax.cli import main
from perpo_jax.config import load_config
from perpo_jax.memory_plan import format_plan, memory_plan, model_config
from perpo_jax.models import build_model
from perpo_jax.tpu_topology import TPU_SLICES, TopologyError, slice_devices, tpu_slice

needs_libtpu = pytest.mark.skipif(not tpu_topology.libtpu_installed(),
                                  reason="libtpu is not installed (requirements-test.txt)")

TINY = ["lora.rank=4", "train.num_candidates=3", "train.max_response_length=8",
        "train.lists_per_step=2", "mesh.shape=[1,-1,1]"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A model dir holding only the config.json of a 1-layer LLaVA (Llama + CLIP)."""
    path = tmp_path_factory.mktemp("tiny_llava")
    tf.LlavaConfig(text_config=tiny_hf.llama_config(num_hidden_layers=1),
                   vision_config=tiny_hf.clip_config(num_hidden_layers=1),
                   image_token_index=tiny_hf.IMAGE_TOKEN).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def v5e8(tiny_dir):
    """`perpo-jax plan --tpu v5e-8 --json` of an offline round, reference log-probs in the
    step (one program: the reference program compiles on CPU in test_memory_plan)."""
    capture = {}

    def run(capsys):
        if not capture:
            assert main(["plan", f"model.hf_path={tiny_dir}", "train.mode=offline", *TINY,
                         "train.precompute_ref=false", "--tpu", "v5e-8", "--json"]) == 0
            capture["plan"] = json.loads(capsys.readouterr().out)
        return capture["plan"]

    return run


def _shard_bytes(shape, dtype, spec_axes) -> int:
    """numpy: bytes of one device's shard of a [shape] array split `spec_axes` ways per dim."""
    return math.prod(s // n for s, n in zip(shape, spec_axes)) * np.dtype(dtype).itemsize


@needs_libtpu
def test_v5e_8_round_compiles_and_fits_with_the_json_keys(v5e8, capsys):
    plan = v5e8(capsys)
    assert {"params_total", "per_device_bytes", "peak_bytes_per_device", "peak_source",
            "fits", "target", "device_kind", "compile_seconds", "compiler_error",
            "programs"} <= set(plan)
    assert plan["target"] == "v5e-8" and plan["device_kind"] == "TPU v5 lite"
    assert plan["devices"] == 8 and plan["hbm_gib"] == 15.75
    assert plan["peak_source"] == "compiled" and plan["fits"] is True
    assert plan["compiler_error"] is None and plan["compile_seconds"] > 0
    assert set(plan["programs"]) == {"train_step"}
    for program in plan["programs"].values():
        assert {"fits", "compiler_error", "compile_seconds", "peak_bytes", "argument_bytes",
                "output_bytes", "alias_bytes", "temp_bytes", "xla_flops", "host_peak_rss_bytes",
                "beside_bytes", "largest_buffers"} <= set(program)
        assert program["fits"] and program["xla_flops"] > 0 and program["peak_bytes"] > 0
        assert program["model_flops_per_chip"] > 0
    # the 2 lists are padded with empty ones to one per fsdp device, as the trainer pads them
    assert plan["list_shape"]["lists_per_step"] == 8
    # donated train state: its outputs reuse its arguments' buffers
    step = plan["programs"]["train_step"]
    assert 0 < step["alias_bytes"] <= step["argument_bytes"]


@needs_libtpu
def test_step_arguments_hold_each_devices_shards(v5e8, capsys):
    """The step's arguments per chip (XLA) hold at least this device's shards of the weights,
    AdamW state and the batch, computed here from the shapes (lists over the 8 fsdp devices;
    XLA pads small arrays to its tiles, so it counts more)."""
    plan = v5e8(capsys)
    step = plan["programs"]["train_step"]
    state = sum(plan["per_device_bytes"][k] for k in ("base_params", "trainable_params",
                                                       "optimizer_state"))
    shape = plan["list_shape"]
    lists, k, r, p = (shape["lists_per_step"], shape["candidates"], shape["response_tokens"],
                      shape["prompt_tokens"])
    batch = sum(_shard_bytes(dims, dtype, (8,) + (1,) * (len(dims) - 1)) for dims, dtype in [
        ((lists, 3, 16, 16), np.float32), ((lists, p), np.int32), ((lists, p), np.bool_),
        ((lists, k, r), np.int32), ((lists, k, r), np.bool_), ((lists, k), np.float32),
        ((lists, k), np.bool_), ((lists, r), np.int32), ((lists, r), np.bool_)])
    assert state + batch <= step["argument_bytes"] < 8 * (state + batch)


@needs_libtpu
def test_largest_buffers_name_the_source_and_text_output_lists_them(v5e8, capsys):
    plan = v5e8(capsys)
    buffers = plan["programs"]["train_step"]["largest_buffers"]
    assert 0 < len(buffers) <= 8
    sizes = [b["bytes"] for b in buffers]
    assert sizes == sorted(sizes, reverse=True)
    for b in buffers:
        dtype, dims = re.fullmatch(r"(\w+)\[([\d,]*)\]", b["shape"]).groups()
        itemsize = {"f32": 4, "bf16": 2, "s32": 4, "pred": 1, "u32": 4, "f16": 2}[dtype]
        elements = math.prod(int(d) for d in dims.split(",") if d)
        assert b["bytes"] >= elements * itemsize  # the buffer holds its (padded) array
        assert b["kind"] in ("argument", "output", "temp", "constant") and b["count"] >= 1
    assert any(b["source"].startswith("perpo_jax/") for b in buffers)
    text = format_plan(plan)
    assert "largest buffers:" in text and buffers[0]["shape"] in text
    assert "fits in 15.75 GiB" in text


@needs_libtpu
def test_v4_8_online_round_compiles_prefill_and_one_decode_step(tiny_dir):
    cfg = load_config(None, [f"model.hf_path={tiny_dir}", *TINY, "train.mode=online",
                             "train.precompute_ref=false", "sampling.num_samples=3",
                             "sampling.max_new_tokens=8", "sampling.prompts_per_round=8"])
    plan = memory_plan(cfg, tpu="v4-8")
    assert plan["target"] == "v4-8" and plan["device_kind"] == "TPU v4" and plan["devices"] == 4
    assert set(plan["programs"]) == {"train_step", "prefill", "decode_step"} and plan["fits"]
    prefill, decode = plan["programs"]["prefill"], plan["programs"]["decode_step"]
    # one decode step computes one token per sample; prefill the whole [B, P] prompt
    assert 0 < decode["model_flops_per_chip"] < prefill["model_flops_per_chip"]
    # the decode step reads the weights and the KV caches of the 1 layer: the samples' k and v
    # [B, K, R, kv_heads, head_dim] float32 and the prompt's [B, P, kv_heads, head_dim], the
    # batch of 8 prompts over fsdp = 4 (plain LoRA: no reference copy in base_params)
    p = plan["list_shape"]["prompt_tokens"]
    cache = 2 * _shard_bytes((8, 3, 8, 2, 8), np.float32, (4, 1, 1, 1, 1))
    prefix = 2 * _shard_bytes((8, p, 2, 8), np.float32, (4, 1, 1, 1))
    weights = plan["per_device_bytes"]["base_params"] + plan["per_device_bytes"]["trainable_params"]
    assert decode["argument_bytes"] >= weights + cache + prefix
    # beside the sampler the optimizer state stays resident
    assert decode["beside_bytes"] >= plan["per_device_bytes"]["optimizer_state"]


@needs_libtpu
def test_out_of_memory_on_v5e_1_is_fits_false_with_the_compilers_message(tmp_path, capsys):
    # a 40M-token vocabulary: embedding and lm_head [40M, 32] float32 are 4.77 GiB each, and
    # the response logits [3, 7, 40M] float32 3.58 GiB each: over a v5e chip's 15.75 GiB
    tf.LlavaConfig(text_config=tiny_hf.llama_config(num_hidden_layers=1, vocab_size=40_000_000),
                   vision_config=tiny_hf.clip_config(num_hidden_layers=1),
                   image_token_index=tiny_hf.IMAGE_TOKEN).save_pretrained(tmp_path)
    args = ["plan", f"model.hf_path={tmp_path}", "train.mode=offline", *TINY,
            "train.lists_per_step=1", "train.precompute_ref=false", "--tpu", "v5e-1"]
    assert main([*args, "--json"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    # each program is reported on stderr as it is done (JSON stays alone on stdout)
    assert captured.err.startswith("perpo-jax plan: train_step: does NOT fit (")
    plan = json.loads(captured.out)
    step = plan["programs"]["train_step"]
    assert plan["fits"] is False and step["fits"] is False
    error = step["compiler_error"]
    assert error.startswith("RESOURCE_EXHAUSTED") and "exceeds available HBM (15.75G)" in error
    assert plan["compiler_error"] == f"train_step: {error}"
    assert "peak_bytes" not in step  # nothing compiled to measure
    # the buffers are listed anyway: the two vocabulary tables, then the logits
    buffers = step["largest_buffers"]
    table = 40_000_000 * 32 * 4
    assert [b["bytes"] for b in buffers[:2]] == [table, table]
    assert {b["kind"] for b in buffers[:2]} == {"argument"}
    assert {b["op_name"] for b in buffers[:2]} == {
        "frozen['language_model']['embed_tokens']['embedding'].value",
        "frozen['language_model']['lm_head']['kernel'].value"}
    logits = [b for b in buffers if b["shape"] == "f32[3,7,40000000]"]
    # XLA's tiles pad the 7 response positions to 8 rows
    assert logits and 3 * 7 * 40_000_000 * 4 <= logits[0]["bytes"] <= 3 * 8 * 40_000_000 * 4
    assert any("perpo_jax/models/decoder.py" in b["source"] for b in logits)
    # the text output (what `plan` prints without --json) says it, and a verdict
    text = format_plan(plan)
    assert "train_step: does NOT fit" in text and "RESOURCE_EXHAUSTED" in text
    assert text.strip().endswith("does NOT fit in 15.75 GiB: the compiler ran out of memory "
                                 "for train_step")


def test_topology_table_follows_maxtext():
    assert tpu_slice("v5e-8").topology == "v5e:2x4" and tpu_slice("v5e-8").chip_config == "default"
    assert tpu_slice("v4-8").topology == "v4:2x2x1" and tpu_slice("v4-8").chips == 4
    assert tpu_slice("v5p-8").topology == "v5:2x2x1"
    assert tpu_slice("v5p-8").chip_config == "megacore"
    assert tpu_slice("v6e-256").wrap == (True, True, False)
    assert tpu_slice("v5e-8").accelerator_type == "v5litepod-8"
    for name, spec in TPU_SLICES.items():
        family, count = name.split("-")
        cores = 2 if family in ("v4", "v5p") else 1
        assert spec.chips * cores == int(count), name
    with pytest.raises(TopologyError, match=r"'v5e-3' is not a known TPU slice: v5e-\{1,4,8"):
        tpu_slice("v5e-3")


@needs_libtpu
@pytest.mark.parametrize("name, kind", [("v5e-1", "TPU v5 lite"), ("v5e-16", "TPU v5 lite"),
                                        ("v4-16", "TPU v4"), ("v5p-8", "TPU v5"),
                                        ("v6e-8", "TPU v6 lite")])
def test_slice_devices_multi_host_included(name, kind):
    devices = slice_devices(tpu_slice(name))
    assert len(devices) == tpu_slice(name).chips
    assert {d.device_kind for d in devices} == {kind} and {d.platform for d in devices} == {"tpu"}
    hosts = {d.process_index for d in devices}
    assert len(hosts) == max(1, len(devices) // 4)  # maxtext's 2x2 chips per host


def test_missing_libtpu_is_one_line_naming_the_package(tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr(tpu_topology, "_DEVICES", {})
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    real = tpu_topology.importlib.util.find_spec
    monkeypatch.setattr(tpu_topology.importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else real(name, *a))
    assert main(["plan", f"model.hf_path={tiny_dir}", "--tpu", "v5e-8"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "libtpu" in err and tpu_topology.LIBTPU_PIN in err
    # without a compile the slice's table is enough: exact bytes, its HBM, fits unknown
    assert main(["plan", f"model.hf_path={tiny_dir}", "--tpu", "v5e-8", "--no-compile",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["target"], plan["device_kind"], plan["devices"]) == ("v5e-8", "TPU v5 lite", 8)
    assert plan["hbm_gib"] == 15.75 and plan["fits"] is None and plan["programs"] == {}


def test_unknown_slice_and_mixed_flags_are_one_line(tiny_dir, capsys):
    assert main(["plan", f"model.hf_path={tiny_dir}", "--tpu", "v5e-3"]) == 1
    assert "not a known TPU slice" in capsys.readouterr().err
    assert main(["plan", f"model.hf_path={tiny_dir}", "--tpu", "v5e-8", "--devices", "8"]) == 2
    assert "drop --devices/--hbm-gib" in capsys.readouterr().err


def test_prefill_and_decode_step_programs_chain_to_what_sample_draws(tiny_dir):
    """The two programs `plan` compiles for the sampler are the sampler's own pieces: prefill,
    then R - 1 decode steps, give the tokens `sampling.sample` draws (same keys, top-p 0.9)."""
    cfg = load_config(None, [f"model.hf_path={tiny_dir}"])
    model = build_model(model_config(cfg), rngs=nnx.Rngs(3))
    b, k, r = 2, 3, 5
    ids = np.random.RandomState(0).randint(1, 200, (b, 6)).astype(np.int32)
    mask = np.ones((b, 6), bool)
    mask[1, 4:] = False
    rng = jax.random.key(7)
    want = sampling.sample(model, {"prompt_ids": ids, "prompt_mask": mask}, num_samples=k,
                           max_new_tokens=r, temperature=0.8, top_p=0.9, rng=rng, eos_id=None)
    graphdef, state = nnx.split(model)
    spec = sampling.SamplerSpec(k, r, False, (), 0, None, False)
    keys = sampling.sample_keys(rng, b, k)
    t, p = jnp.float32(0.8), jnp.float32(0.9)
    prefix, prompt_len, carry = sampling.prefill_program(graphdef, spec)(state, ids, mask, {},
                                                                          keys, t, p)
    step = sampling.decode_step_program(graphdef, spec)
    for _ in range(r - 1):
        carry = step(state, prefix, prompt_len, keys, t, p, carry)
    np.testing.assert_array_equal(np.asarray(carry[2]), np.asarray(want.tokens))
    np.testing.assert_array_equal(np.asarray(carry[5]), np.asarray(want.lengths))
