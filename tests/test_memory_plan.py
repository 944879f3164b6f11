"""`perpo-jax plan` on CPU devices: parameter counts equal transformers' (tiny configs, and
LLaVA-1.5-7B from its config.json alone), exact per-device bytes, the compiled round, `fits`.
TPU targets (`--tpu`): tests/test_tpu_plan.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny_hf
import torch
import transformers as tf

from perpo_jax.cli import main
from perpo_jax.config import load_config
from perpo_jax.memory_plan import GIB, memory_plan

LLAVA_7B = Path(__file__).parent / "data" / "llava15_7b_hf"


def _config_only(tmp_path, hf_config) -> str:
    """A model dir holding config.json and nothing else (no weights)."""
    hf_config.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    return str(tmp_path)


def _hf_count(path) -> int:
    config = tf.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return tf.LlavaForConditionalGeneration(config).num_parameters()


def _cfg(path, *extra):
    return load_config(None, [f"model.hf_path={path}", "train.mode=offline", "lora.rank=4",
                              "train.num_candidates=3", "train.max_response_length=8",
                              "train.lists_per_step=8", "mesh.shape=[2,2,2]", *extra])


# The programs compile the same way for both families: compile one (CI time), count both.
@pytest.mark.parametrize("make, compile_programs", [
    (lambda: tf.LlavaConfig(text_config=tiny_hf.llama_config(), vision_config=tiny_hf.clip_config(),
                            image_token_index=tiny_hf.IMAGE_TOKEN), True),
    (lambda: tf.LlavaConfig(text_config=tiny_hf.qwen2_config(),
                            vision_config=tiny_hf.siglip_config(vision_use_head=True),
                            image_token_index=tiny_hf.IMAGE_TOKEN,
                            vision_feature_select_strategy="full"), False),
], ids=["llama_clip", "qwen2_tied_siglip"])
def test_counts_equal_transformers_and_round_compiles(make, compile_programs, tmp_path):
    path = _config_only(tmp_path, make())
    plan = memory_plan(_cfg(path), devices=8, hbm_gib=1.0, compile_programs=compile_programs)
    assert plan["params_total"] == _hf_count(path)
    assert 0 < plan["params_lora"] <= plan["params_trainable"] < plan["params_total"]
    per = plan["per_device_bytes"]
    assert set(per) == {"base_params", "trainable_params", "optimizer_state", "gradients"}
    # AdamW mu + nu, float32, sharded like the params (+ a few replicated counters)
    assert 0 <= per["optimizer_state"] - 2 * per["trainable_params"] < 64
    if not compile_programs:
        # no activation estimate: the floor fits in 1 GiB, so only a compile can say
        assert plan["peak_source"] == "analytic_lower_bound" and plan["fits"] is None
        assert plan["peak_bytes_per_device"] == sum(per.values()) and plan["programs"] == {}
        return
    # offline round with precomputed reference log-probs: the step and the reference program
    assert set(plan["programs"]) == {"train_step", "ref_logps"}
    step, ref = plan["programs"]["train_step"], plan["programs"]["ref_logps"]
    # the step's arguments are the (sharded) weights, optimizer state and batch
    assert step["argument_bytes"] >= per["base_params"] + per["trainable_params"]
    # beside the reference program the optimizer state (and counters) stay on the chip
    assert step["beside_bytes"] == 0 and per["optimizer_state"] <= ref["beside_bytes"]
    assert ref["beside_bytes"] < per["optimizer_state"] + 64
    assert plan["peak_source"] == "compiled" and plan["fits"] and plan["target"] == "cpu"
    # CPU's peak field leaves temporaries out: arguments + outputs - aliased + temporaries
    assert step["peak_bytes"] == (step["argument_bytes"] + step["output_bytes"]
                                  - step["alias_bytes"] + step["temp_bytes"])
    assert plan["peak_bytes_per_device"] == max(p["peak_bytes"] + p["beside_bytes"]
                                                for p in plan["programs"].values())


def test_llava15_7b_from_config_json_alone():
    cfg = load_config("configs/llava15_7b_refcoco_perpo.yaml", [f"model.hf_path={LLAVA_7B}"])
    plan = memory_plan(cfg, devices=8, hbm_gib=16.0, compile_programs=False)
    assert plan["params_total"] == 7_063_427_072 == _hf_count(LLAVA_7B)
    assert plan["params_lora"] == 319_815_680
    assert plan["params_trainable"] == 319_815_680 + 20_979_712  # + the projector
    # bf16 base over fsdp=8: 7.06e9 * 2 B / 8 (+ the float32 projector reference copy)
    assert abs(plan["per_device_bytes"]["base_params"] - 7_063_427_072 * 2 / 8) < 0.05 * GIB
    assert plan["peak_source"] == "analytic_lower_bound" and plan["fits"] is None
    # 2 lists padded with empty ones to one per fsdp device, as train.loop pads them
    assert plan["list_shape"] == {"lists_per_step": 8, "candidates": 20, "response_tokens": 64,
                                  "prompt_tokens": 640}


def test_cli_json_and_fits(tmp_path, capsys):
    path = _config_only(tmp_path, tf.LlavaConfig(
        text_config=tiny_hf.llama_config(), vision_config=tiny_hf.clip_config(),
        image_token_index=tiny_hf.IMAGE_TOKEN))
    args = ["plan", f"model.hf_path={path}", "lora.rank=4", "train.num_candidates=3",
            "train.lists_per_step=4", "mesh.shape=[1,-1,1]", "--devices", "4", "--json",
            "--no-compile"]
    assert main([*args, "--hbm-gib", "16"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {"params_total", "params_trainable", "per_device_bytes", "peak_bytes_per_device",
            "peak_source", "fits", "target", "device_kind", "compile_seconds",
            "compiler_error", "programs"} <= set(plan)
    assert plan["fits"] is None and plan["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert main([*args, "--hbm-gib", "0.00001"]) == 0  # the weights alone exceed it
    assert json.loads(capsys.readouterr().out)["fits"] is False
    assert main(["plan", f"model.hf_path={path}", "train.precompute_ref=false", "--devices",
                 "4", "--hbm-gib", "16"]) == 0
    said = capsys.readouterr().out
    assert "train_step: peak" in said and "fits in 16.0 GiB" in said


def test_more_devices_than_the_process_has_is_one_line_naming_the_ways_out(tmp_path, capsys):
    path = _config_only(tmp_path, tf.LlavaConfig(
        text_config=tiny_hf.llama_config(), vision_config=tiny_hf.clip_config(),
        image_token_index=tiny_hf.IMAGE_TOKEN))
    assert main(["plan", f"model.hf_path={path}", "--devices", "16", "--hbm-gib", "16"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in captured.err + captured.out
    assert "--devices 16" in err and "has 8" in err
    assert "--no-compile" in err and "--tpu NAME" in err
