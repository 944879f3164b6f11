"""Config schema: YAML + dotted overrides, errors name the key."""

from pathlib import Path

import pytest

from perpo_jax.config import Config, ConfigError, config_from_dict, load_config, parse_override


def test_defaults_are_the_official_recipe():
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout) == (128, 256.0, 0.05)
    assert (cfg.optim.lr, cfg.optim.warmup_ratio, cfg.optim.grad_clip) == (5e-6, 0.03, 1.0)
    assert (cfg.loss.beta, cfg.loss.gamma) == (0.1, 0.5)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 5e-6\nmesh:\n  shape: [-1, 1, 1]\nloss:\n  name: dpo\n")
    cfg = load_config(path, ["optim.lr=1e-5", "mesh.shape=[2,2,2]", "lora.enabled=false"])
    assert cfg.optim.lr == pytest.approx(1e-5)
    assert cfg.mesh.shape == [2, 2, 2]
    assert cfg.loss.name == "dpo"
    assert cfg.lora.enabled is False


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.lrr=1", "optim.lrr"),
        ("optim.lr=abc", "optim.lr"),
        ("mesh.shape=3", "mesh.shape"),
        ("loss.name=foo", "loss.name"),
        ("train.steps=1.5", "train.steps"),
        ("lora.enabled=maybe", "lora.enabled"),
        ("nosection.x=1", "nosection"),
        ("optim.lr", "optim.lr"),
        ("train.lists_per_step=0", "train.lists_per_step"),
        ("sampling.top_p=0", "sampling.top_p"),
        ("data.min_objects=0", "data.min_objects"),
        ("data.max_objects=1", "data.max_objects"),
        ("data.relations=maybe", "data.relations"),
        ("demo.sft_lists_per_step=-1", "demo.sft_lists_per_step"),
        ("loss.beta=0", "loss.beta"),
        ("loss.label_smoothing=0.5", "loss.label_smoothing"),
        ("loss.label_smoothing=-0.1", "loss.label_smoothing"),
        ("loss.simpo_gamma_beta_ratio=-0.5", "loss.simpo_gamma_beta_ratio"),
        ("loss.orpo_lambda=-1", "loss.orpo_lambda"),
        ("loss.name=cdpo", "loss.name"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("raw", ["yes", "no", "on", "Off", "y"])
def test_yaml11_booleans_are_refused_naming_the_key(tmp_path, raw):
    path = tmp_path / "c.yaml"
    path.write_text(f"lora:\n  enabled: {raw}\n")
    with pytest.raises(ConfigError, match=rf"lora\.enabled: expected true or false, got '{raw}'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"data\.relations: expected true or false"):
        load_config(None, [f"data.relations={raw}"])
    assert load_config(None, ["lora.enabled=False", "data.relations=TRUE"]).data.relations is True


def test_bad_yaml_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_nested_unknown_key_in_yaml():
    with pytest.raises(ConfigError, match=r"train\.lisst_per_step"):
        config_from_dict({"train": {"lisst_per_step": 2}})


def test_required_path_for_file_sources():
    with pytest.raises(ConfigError, match=r"data\.path"):
        config_from_dict({"data": {"source": "official_json"}})


def test_parse_override_yaml_values():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a.b=null") == ("a.b", None)
    assert parse_override("a.b=x=y") == ("a.b", "x=y")


def test_shipped_configs_load_and_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    cfgs = {p.stem: load_config(p) for p in sorted(root.glob("*.yaml"))}
    assert {"demo_shapes", "llava15_7b_refcoco_perpo", "llava15_7b_refcoco_dpo",
            "llava15_7b_refcoco_lipo", "qwen2_siglip_ocr_perpo"} <= set(cfgs)
    perpo, dpo, lipo = (cfgs[f"llava15_7b_refcoco_{n}"] for n in ("perpo", "dpo", "lipo"))
    assert (perpo.lora.rank, perpo.lora.alpha, perpo.lora.dropout) == (128, 256.0, 0.05)
    assert (perpo.optim.lr, perpo.optim.warmup_ratio, perpo.optim.weight_decay) == (5e-6, 0.03, 0.0)
    assert (perpo.train.lists_per_step, perpo.train.num_candidates, perpo.train.max_length) == (2, 20, 2048)
    assert (perpo.data.min_margin, perpo.model.dtype) == (0.8, "bfloat16")
    # the official run: projector trained too, dropout off, bf16 base sharded (ZeRO-3 / fsdp),
    # the LLaVA-v1 conversation over pad-to-square images, boxes in the original frame
    assert perpo.lora.trainable == ["multi_modal_projector"]
    assert perpo.train.disable_dropout and perpo.model.param_dtype == "float32"
    assert perpo.mesh.shape == [1, -1, 1]
    assert (perpo.data.template, perpo.data.image_aspect_ratio, perpo.data.box_frame) == (
        "llava_v1", "pad", "original")
    # baselines differ from the recipe only in the loss (and where they write)
    for variant in (dpo, lipo):
        for section in ("model", "lora", "optim", "mesh", "sampling", "data"):
            assert getattr(variant, section) == getattr(perpo, section)
    assert (dpo.loss.name, lipo.loss.name, lipo.loss.gamma) == ("dpo", "lipo", 0.0)
    ocr = cfgs["qwen2_siglip_ocr_perpo"]
    assert (ocr.train.num_candidates, ocr.data.min_margin, ocr.lora.trainable) == (5, 0.04, ["multi_modal_projector"])
    assert ocr.mesh.shape == [1, -1, 1] and ocr.train.rounds == 0  # one pass over the data


def test_ocr_recipe_matches_the_official_llava_next_run():
    """N = 5, projector trained, min_margin 0.04, 100 warmup steps, max length 4096, one
    epoch over every page of the page-OCR reader, the qwen_1_5 conversation."""
    ocr = load_config(Path(__file__).resolve().parents[1] / "configs" / "qwen2_siglip_ocr_perpo.yaml")
    assert (ocr.sampling.num_samples, ocr.train.num_candidates) == (5, 5)
    assert ocr.lora.trainable == ["multi_modal_projector"] and ocr.lora.enabled
    assert ocr.data.min_margin == 0.04
    assert ocr.optim.warmup_steps == 100
    assert ocr.train.max_length == 4096
    # one epoch over the whole dataset: rounds and steps derived from the data, no cap
    assert (ocr.train.mode, ocr.train.rounds, ocr.train.steps, ocr.train.epochs) == (
        "online", 0, 0, 1)
    assert (ocr.data.task, ocr.data.source, ocr.data.ocr_format, ocr.data.template) == (
        "ocr", "page_ocr", "jsonl", "qwen_1_5")
    assert (ocr.loss.name, ocr.loss.beta, ocr.loss.gamma) == ("perpo", 0.1, 0.5)


def test_warmup_steps_override_the_ratio_as_hf_does():
    from perpo_jax.train.optim import make_schedule

    cfg = load_config(None, ["optim.warmup_steps=100", "optim.warmup_ratio=0.03",
                             "optim.schedule=constant", "optim.lr=1.0"])
    schedule = make_schedule(cfg.optim, total_steps=1000)
    assert float(schedule(50)) == pytest.approx(0.5)  # ratio would have ended warmup at 30
    assert float(schedule(100)) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="optim.warmup_steps"):
        load_config(None, ["optim.warmup_steps=-1"])


def test_page_ocr_source_and_qwen_template_are_accepted():
    cfg = load_config(None, ["data.task=ocr", "data.source=page_ocr", "data.path=x.json",
                             "data.ocr_format=fox", "data.template=qwen_1_5"])
    assert (cfg.data.source, cfg.data.ocr_format, cfg.data.template) == ("page_ocr", "fox",
                                                                         "qwen_1_5")
    with pytest.raises(ConfigError, match="data.ocr_format"):
        load_config(None, ["data.ocr_format=xml"])
    with pytest.raises(ConfigError, match="data.path"):
        load_config(None, ["data.task=ocr", "data.source=page_ocr"])
    with pytest.raises(ConfigError, match="data.task"):
        load_config(None, ["data.source=page_ocr", "data.path=x.jsonl"])


def test_base_chain_is_checked(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")


def test_demo_sft_batch_and_round_size():
    from perpo_jax.demo.recipes import sft_config

    cfg = load_config(None, ["train.lists_per_step=8", "sampling.prompts_per_round=128"])
    same = sft_config(cfg, "out")
    assert (same.train.lists_per_step, same.sampling.prompts_per_round) == (8, 128)
    cfg = load_config(None, ["train.lists_per_step=8", "sampling.prompts_per_round=128",
                             "demo.sft_lists_per_step=32", "demo.sft_prompts_per_round=512"])
    sft = sft_config(cfg, "out")
    assert (sft.train.lists_per_step, sft.sampling.prompts_per_round) == (32, 512)
    assert (sft.loss.name, sft.loss.sft_target) == ("sft", "ground_truth")
    assert (cfg.train.lists_per_step, cfg.sampling.prompts_per_round) == (8, 128)  # untouched


def test_loss_names_and_their_keys():
    from perpo_jax.config import _CHOICES, DEMO_METHODS
    from perpo_jax.losses import LOSSES

    for name in ("perpo", "lipo", "lipo_lambda", "dpo", "ipo", "simpo", "orpo", "sft"):
        assert load_config(None, [f"loss.name={name}"]).loss.name == name
    assert {*LOSSES, "sft"} == set(_CHOICES["loss.name"])
    cfg = load_config(None, ["loss.name=simpo", "loss.beta=2.5", "loss.simpo_gamma_beta_ratio=0.55"])
    assert (cfg.loss.beta, cfg.loss.simpo_gamma_beta_ratio, cfg.loss.gamma) == (2.5, 0.55, 0.5)
    cfg = load_config(None, ["loss.name=dpo", "loss.label_smoothing=0.1"])
    assert cfg.loss.label_smoothing == 0.1
    defaults = load_config(None).loss
    assert (defaults.simpo_gamma_beta_ratio, defaults.orpo_lambda, defaults.label_smoothing) == (
        0.5, 0.1, 0.0)
    # the new losses are demo methods one can ask for, not ones the demo runs by default
    assert {"ipo", "simpo", "orpo"} <= set(DEMO_METHODS)
    assert load_config(None).demo.methods == ["perpo", "dpo", "lipo", "sft", "rft"]
