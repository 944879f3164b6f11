"""`perpo-jax plan`: parameter counts equal transformers' (tiny configs, and LLaVA-1.5-7B from
its config.json alone), per-device bytes from the compiled step and analytically, `fits`."""

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


# The step compiles the same way for both families: compile one (CI time), count both.
@pytest.mark.parametrize("make, compile_step", [
    (lambda: tf.LlavaConfig(text_config=tiny_hf.llama_config(), vision_config=tiny_hf.clip_config(),
                            image_token_index=tiny_hf.IMAGE_TOKEN), True),
    (lambda: tf.LlavaConfig(text_config=tiny_hf.qwen2_config(),
                            vision_config=tiny_hf.siglip_config(vision_use_head=True),
                            image_token_index=tiny_hf.IMAGE_TOKEN,
                            vision_feature_select_strategy="full"), False),
], ids=["llama_clip", "qwen2_tied_siglip"])
def test_counts_equal_transformers_and_step_compiles(make, compile_step, tmp_path):
    path = _config_only(tmp_path, make())
    plan = memory_plan(_cfg(path), devices=8, hbm_gib=1.0, compile_step=compile_step)
    assert plan["params_total"] == _hf_count(path)
    assert 0 < plan["params_lora"] <= plan["params_trainable"] < plan["params_total"]
    per = plan["per_device_bytes"]
    assert set(per) == {"base_params", "trainable_params", "optimizer_state", "gradients",
                        "activations"}
    # AdamW mu + nu, float32, sharded like the params (+ a few replicated counters)
    assert 0 <= per["optimizer_state"] - 2 * per["trainable_params"] < 64
    # prefix sharing runs the prompt once per list, not K times
    modes = plan["modes"]
    assert (modes["prefix_shared"]["activations_analytic"]["decoder"]
            < modes["naive"]["activations_analytic"]["decoder"])
    if compile_step:
        compiled = modes["prefix_shared"]["compiled"]
        # the step's arguments are the (sharded) weights, optimizer state and batch
        assert compiled["argument"] >= per["base_params"] + per["trainable_params"]
        assert plan["peak_source"] == "compiled" and plan["fits"]


def test_llava15_7b_from_config_json_alone():
    cfg = load_config("configs/llava15_7b_refcoco_perpo.yaml", [f"model.hf_path={LLAVA_7B}"])
    plan = memory_plan(cfg, devices=8, hbm_gib=16.0, compile_step=False)
    assert plan["params_total"] == 7_063_427_072 == _hf_count(LLAVA_7B)
    assert plan["params_lora"] == 319_815_680
    assert plan["params_trainable"] == 319_815_680 + 20_979_712  # + the projector
    # bf16 base over fsdp=8: 7.06e9 * 2 B / 8 (+ the float32 projector reference copy)
    assert abs(plan["per_device_bytes"]["base_params"] - 7_063_427_072 * 2 / 8) < 0.05 * GIB
    assert plan["peak_source"] == "analytic"


def test_cli_json_and_fits(tmp_path, capsys):
    path = _config_only(tmp_path, tf.LlavaConfig(
        text_config=tiny_hf.llama_config(), vision_config=tiny_hf.clip_config(),
        image_token_index=tiny_hf.IMAGE_TOKEN))
    args = ["plan", f"model.hf_path={path}", "lora.rank=4", "train.num_candidates=3",
            "train.lists_per_step=4", "mesh.shape=[1,-1,1]", "--devices", "4", "--json",
            "--no-compile"]
    assert main([*args, "--hbm-gib", "16"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {"params_total", "params_trainable", "per_device_bytes", "fits"} <= set(plan)
    assert plan["fits"] is True and plan["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert main([*args, "--hbm-gib", "0.00001"]) == 0
    assert json.loads(capsys.readouterr().out)["fits"] is False
    assert main(["plan", f"model.hf_path={path}", "--devices", "4", "--hbm-gib", "16"]) == 0
    assert "fits in 16.0 GiB" in capsys.readouterr().out
