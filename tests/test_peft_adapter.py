"""PEFT adapters out and in, against peft itself (tiny random transformers models, float32).

Out: our LoRA + a changed projector -> `save_pretrained(adapter=True)` -> `PeftModel.
from_pretrained(<transformers base>, DIR)` gives our logits and our merged export's logits,
`merge_and_unload()` equals our merged export, and PEFT wraps exactly the adapted modules.
In: adapters made BY peft (`init_lora_weights=False`, changed modules_to_save) -> `resolve_lora`
+ `apply_lora` + `load_adapter` give PeftModel's logits; `lora.init_from` trains from one.
"""
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from safetensors.numpy import load_file, save_file

import tiny_hf
from tiny_run import tiny_cfg

from perpo_jax.config import ConfigError, LoraConfig, config_from_dict
from perpo_jax.hf import (AdapterError, load_adapter, load_pretrained, read_config, resolve_lora,
                         save_pretrained)
from perpo_jax.hf.mapping import canonical_key
from perpo_jax.hf.peft_adapter import HfNames, adapter_sites, in_memory_key
from perpo_jax.models import LlavaNextConfig
from perpo_jax.models.lora import apply_lora, lora_slots, merge_lora
from perpo_jax.train.loop import train

TOL = 1e-4
PROJECTOR = ["multi_modal_projector"]
LLM_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ANYRES_SIZES = [[20, 45], [37, 22], [40, 40]]


def _build(kind):
    if kind == "llava":
        return tiny_hf.llava(tiny_hf.llama_config(), tiny_hf.clip_config())
    return {"next": tiny_hf.llava_next, "onevision": tiny_hf.llava_onevision}[kind]()


_BASES: dict[str, str] = {}


def _base_dir(kind, tmp_path_factory) -> str:
    """A tiny random transformers model of `kind` saved once per session."""
    if kind not in _BASES:
        path = tmp_path_factory.mktemp(kind) / "base"
        _build(kind).save_pretrained(path)
        _BASES[kind] = str(path)
    return _BASES[kind]


@pytest.fixture(params=["llava", "next", "onevision"])
def base(request, tmp_path_factory):
    """(kind, base dir saved by transformers); tests narrow the kinds with indirect=True."""
    return request.param, _base_dir(request.param, tmp_path_factory)


@pytest.fixture
def llava_base(tmp_path_factory) -> str:
    return _base_dir("llava", tmp_path_factory)


def _hf(path) -> torch.nn.Module:
    return tf.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()


def _inputs(hf, ours):
    """(our forward args, transformers kwargs) for one batch; LLaVA-1.5 or anyres."""
    if not isinstance(ours.config, LlavaNextConfig):
        ids, pixels = tiny_hf.llava_inputs(hf, batch=2)
        return ((jnp.asarray(ids), None, jnp.asarray(pixels)),
                dict(ids=ids, pixel_values=pixels), None)
    ids, mask, pixels, sizes = tiny_hf.anyres_inputs(hf, ANYRES_SIZES, ours.config.max_tiles)
    args = tuple(jnp.asarray(a) for a in (ids, mask, pixels, sizes))
    return args, dict(ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes), mask


def _hf_logits(model, kw):
    if "image_sizes" in kw:
        return tiny_hf.hf_anyres_logits(model, kw["ids"], kw["attention_mask"],
                                        kw["pixel_values"], kw["image_sizes"])
    return tiny_hf.hf_logits(model, kw["ids"], pixel_values=kw["pixel_values"])


@nnx.jit
def _forward(model, *args):
    return model(*args)


def _max_diff(a, b, mask):
    diff = np.abs(np.asarray(a) - np.asarray(b))
    return float((diff[mask.astype(bool)] if mask is not None else diff).max())


def _randomize(model, seed):
    """Nonzero A and B everywhere, and a changed projector (the trained modules_to_save)."""
    keys = iter(jax.random.split(jax.random.key(seed), 1000))
    for _, linear in lora_slots(model):
        if linear.lora is not None:
            for var in (linear.lora.a, linear.lora.b):
                var.set_value(0.1 * jax.random.normal(next(keys), var[...].shape))
    for linear in (model.multi_modal_projector.linear_1, model.multi_modal_projector.linear_2):
        k = linear.kernel
        k.set_value(k[...] + 0.05 * jax.random.normal(next(keys), k[...].shape))


def _lora_names(peft_model) -> set[str]:
    inner = peft_model.base_model.model
    return {n for n, m in inner.named_modules() if isinstance(m, LoraLayer)}


def _saved_names(peft_model) -> set[str]:
    inner = peft_model.base_model.model
    return {n for n, m in inner.named_modules() if isinstance(m, ModulesToSaveWrapper)}


def _num_layers(hf) -> int:
    return hf.config.text_config.num_hidden_layers


# ----------------------------------------------------------------------------- names


def test_in_memory_names_are_transformers_own_and_invert_canonical_key(base):
    """Every parameter of our table has its transformers in-memory name (tied lm_head aside),
    and `canonical_key` maps each back."""
    _, path = base
    hf = _hf(path)
    names = HfNames(read_config(path))
    live = set(hf.state_dict())
    if hf.config.tie_word_embeddings:
        live.discard("lm_head.weight")
    assert set(names.params) == live
    for key, entry in names.params.items():
        assert canonical_key(key, True) == entry.key and in_memory_key(entry.key, True) == key
    linears = {n for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear)}
    linears.discard("lm_head" if hf.config.tie_word_embeddings else "")
    assert set(names.sites) == linears


@pytest.mark.parametrize("peft_kwargs", [
    dict(target_modules=["q_proj", "v_proj"]),  # a plain list hits the vision tower too
    dict(target_modules=["q_proj", "fc1"], layers_to_transform=[1]),
    dict(target_modules=["k_proj", "o_proj"], layers_to_transform=0, layers_pattern="layers"),
    dict(target_modules=r".*language_model.*\.(up_proj|down_proj)"),
    dict(target_modules="all-linear", modules_to_save=PROJECTOR),
    dict(target_modules=["q_proj", "out_proj", "linear_1"], exclude_modules=["linear_1"]),
])
def test_we_adapt_exactly_the_modules_peft_wraps(base, peft_kwargs):
    _, path = base
    hf = _hf(path)
    names = HfNames(read_config(path))
    cfg = PeftLoraConfig(r=2, lora_alpha=4, **peft_kwargs).to_dict()
    ours = {s.name for s in adapter_sites(cfg, names, "test")}
    assert ours == _lora_names(get_peft_model(hf, PeftLoraConfig(r=2, lora_alpha=4, **peft_kwargs)))


# ----------------------------------------------------------------------------- out


@pytest.mark.parametrize("base", ["llava", "onevision"], indirect=True)
def test_exported_adapter_loads_in_peft_with_our_logits(base, tmp_path):
    kind, path = base
    ours = load_pretrained(path)
    apply_lora(ours, LoraConfig(rank=4, alpha=8.0, dropout=0.0), nnx.Rngs(1))
    _randomize(ours, seed=2)
    adapter = save_pretrained(ours, str(tmp_path / "adapter"), adapter=True, trainable=PROJECTOR,
                              base_model_name_or_path=path, source_dir=path)
    args, kw, mask = _inputs(_hf(path), ours)
    want = _forward(ours, *args)

    peft_model = PeftModel.from_pretrained(_hf(path), adapter).eval()
    n = _num_layers(peft_model.base_model.model)
    assert _lora_names(peft_model) == {f"model.language_model.layers.{i}.{m}"
                                       for i in range(n) for m in LLM_NAMES}
    assert _saved_names(peft_model) == {"model.multi_modal_projector"}
    diff = _max_diff(_hf_logits(peft_model, kw), want, mask)
    print(f"[peft] {kind}: PeftModel vs ours max|diff| = {diff:.2e}")
    assert diff <= TOL

    merged_dir = save_pretrained(merge_lora(nnx.clone(ours)), str(tmp_path / "merged"))
    merged_hf = _hf(merged_dir)
    assert _max_diff(_hf_logits(merged_hf, kw), want, mask) <= TOL
    unloaded = peft_model.merge_and_unload().state_dict()
    exported = merged_hf.state_dict()
    assert sorted(unloaded) == sorted(exported)
    for key, value in exported.items():
        np.testing.assert_allclose(unloaded[key].numpy(), value.numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=key)
    # the projector really changed (else modules_to_save would prove nothing)
    assert not torch.equal(exported["model.multi_modal_projector.linear_1.weight"],
                           _hf(path).state_dict()["model.multi_modal_projector.linear_1.weight"])


@pytest.mark.parametrize("base", ["llava"], indirect=True)
def test_adapter_files_are_the_ones_peft_writes(base, tmp_path):
    """peft saving the same adapter (our target regex + modules_to_save) writes the same
    adapter_config.json and the same keys, shapes and dtypes; the side files travel along."""
    _, path = base
    ours = load_pretrained(path)
    apply_lora(ours, LoraConfig(rank=4, alpha=8.0, dropout=0.0), nnx.Rngs(1))
    adapter = save_pretrained(ours, str(tmp_path / "ours"), adapter=True, trainable=PROJECTOR,
                              base_model_name_or_path=path, source_dir=path)
    mine = json.load(open(os.path.join(adapter, "adapter_config.json")))
    peft_model = get_peft_model(_hf(path), PeftLoraConfig(
        r=4, lora_alpha=8, target_modules=mine["target_modules"],
        modules_to_save=mine["modules_to_save"]))
    peft_model.save_pretrained(tmp_path / "peft")
    theirs = json.load(open(tmp_path / "peft" / "adapter_config.json"))
    assert theirs["base_model_name_or_path"] == path
    assert mine == theirs
    a = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    b = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype)
                                                             for k, v in b.items()}
    assert "config.json" not in os.listdir(adapter)
    assert "config.json" in os.listdir(path) and "generation_config.json" in os.listdir(adapter)


# ----------------------------------------------------------------------------- in


def _peft_adapter(path, out, seed=0, **kwargs):
    """An adapter made by peft on the transformers base: random B (init_lora_weights=False)
    and, for modules_to_save, a changed copy of the module. Returns (dir, PeftModel)."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(_hf(path), PeftLoraConfig(init_lora_weights=False, **kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(out)
    return str(out), peft_model.eval()


def _ours_from(path, adapter, **lora):
    model = load_pretrained(path)
    cfg = resolve_lora(LoraConfig(init_from=adapter, **lora), model)
    apply_lora(model, cfg, nnx.Rngs(5))
    return load_adapter(model, adapter, trainable=lora.get("trainable", PROJECTOR)), cfg


@pytest.mark.parametrize("base, peft_kwargs", [
    ("llava", dict(r=4, lora_alpha=16, lora_dropout=0.1, use_rslora=True,
                   target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=PROJECTOR)),
    ("onevision", dict(r=2, lora_alpha=3, target_modules=["q_proj", "k_proj", "gate_proj", "fc2"],
                       layers_to_transform=[1], modules_to_save=PROJECTOR)),
], indirect=["base"])
def test_peft_made_adapter_gives_peft_logits(base, tmp_path, peft_kwargs):
    kind, path = base
    adapter, peft_model = _peft_adapter(path, tmp_path / "adapter", **peft_kwargs)
    ours, cfg = _ours_from(path, adapter)
    r, alpha = peft_kwargs["r"], peft_kwargs["lora_alpha"]
    assert cfg.rank == r and cfg.dropout == peft_kwargs.get("lora_dropout", 0.0)
    scale = alpha / math.sqrt(r) if peft_kwargs.get("use_rslora") else alpha / r
    scales = {m.lora.scale for _, m in lora_slots(ours) if m.lora is not None}
    assert len(scales) == 1 and scales.pop() == pytest.approx(scale)
    args, kw, mask = _inputs(peft_model.base_model.model, ours)
    diff = _max_diff(_forward(ours, *args), _hf_logits(peft_model, kw), mask)
    print(f"[peft] in {peft_kwargs['target_modules']}: max|diff| = {diff:.2e}")
    assert diff <= TOL
    if kind == "llava":  # the same adapter keyed as transformers 4 wrote LLaVA, and in bf16
        _check_v4_layout_and_bf16(path, adapter, ours, args, tmp_path)
    if "layers_to_transform" in peft_kwargs:  # a left-out layer: exactly zero A and B
        q = ours.language_model.layers.self_attn.q_proj.lora
        assert not np.any(np.asarray(q.a[0])) and not np.any(np.asarray(q.b[0]))
        assert np.any(np.asarray(q.b[1]))


_V4_LLAVA = (("model.language_model.", "language_model.model."),
             ("lm_head.", "language_model.lm_head."),
             ("model.vision_tower.", "vision_tower.vision_model."),
             ("model.multi_modal_projector.", "multi_modal_projector."))


def _check_v4_layout_and_bf16(path, adapter, ours, args, tmp_path):
    """Adapters trained with transformers 4 key LLaVA as `language_model.model.…`,
    `vision_tower.vision_model.…`: read as the same adapter; bfloat16 files are read too."""
    tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    prefix = "base_model.model."
    v4 = {}
    for key, value in tensors.items():
        name = key[len(prefix):]
        for new, old in _V4_LLAVA:
            if name.startswith(new):
                name = old + name[len(new):]
                break
        v4[prefix + name] = value
    assert set(v4) != set(tensors)
    for name, store in (("v4", v4), ("bf16", {k: v.astype(ml_dtypes.bfloat16)
                                              for k, v in tensors.items()})):
        out = tmp_path / name
        out.mkdir()
        shutil.copy(os.path.join(adapter, "adapter_config.json"), out)
        save_file(store, out / "adapter_model.safetensors", metadata={"format": "pt"})
        again, _ = _ours_from(path, str(out))
        if name == "v4":
            assert _max_diff(_forward(again, *args), _forward(ours, *args), None) <= 1e-6
        else:
            a = again.language_model.layers.self_attn.q_proj.lora.a[...]
            want = ours.language_model.layers.self_attn.q_proj.lora.a[...]
            np.testing.assert_array_equal(np.asarray(a), np.asarray(
                want.astype(jnp.bfloat16).astype(jnp.float32)))


# ----------------------------------------------------------------------------- refusals


def test_mismatched_config_and_unsupported_adapters_are_clear_errors(llava_base, tmp_path):
    path = llava_base
    adapter, _ = _peft_adapter(path, tmp_path / "plain", r=4, lora_alpha=8,
                               target_modules=["q_proj", "v_proj"], modules_to_save=PROJECTOR)
    model = load_pretrained(path)
    with pytest.raises(ConfigError, match=r"lora\.rank=8 .* has r=4"):
        resolve_lora(LoraConfig(init_from=adapter, rank=8), model)
    with pytest.raises(ConfigError, match=r"lora\.alpha=32\.0 .* lora_alpha=8"):
        resolve_lora(LoraConfig(init_from=adapter, alpha=32.0), model)
    with pytest.raises(ConfigError, match=r"lora\.targets \['q_proj\$'\] select"):
        resolve_lora(LoraConfig(init_from=adapter, targets=["q_proj$"]), model)
    same = resolve_lora(LoraConfig(init_from=adapter, rank=4, alpha=8.0), model)  # agreeing: fine
    assert same.rank == 4 and len(same.targets) == 4  # q, v of the LLM and of CLIP
    apply_lora(model, same, nnx.Rngs(0))
    with pytest.raises(AdapterError, match=r"modules_to_save=\['multi_modal_projector'\].*"
                                           r"lora.trainable \[\] leaves frozen"):
        load_adapter(model, adapter, trainable=[])

    for name, kwargs, field in [
        ("dora", dict(target_modules=["q_proj"], use_dora=True), "use_dora=True"),
        ("embed", dict(target_modules=["q_proj", "embed_tokens"]), "target_modules="),
        ("bias", dict(target_modules=["q_proj"], bias="all"), "bias='all'"),
    ]:
        bad, _ = _peft_adapter(path, tmp_path / name, r=2, lora_alpha=2, **kwargs)
        with pytest.raises(AdapterError, match=field) as err:
            resolve_lora(LoraConfig(init_from=bad), load_pretrained(path))
        assert "adapter_config.json" in str(err.value)
    assert "model.language_model.embed_tokens" in str(
        pytest.raises(AdapterError, resolve_lora, LoraConfig(init_from=str(tmp_path / "embed")),
                      model).value)

    bin_only = tmp_path / "bin_only"
    bin_only.mkdir()
    (bin_only / "adapter_config.json").write_text("{}")
    (bin_only / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(AdapterError, match=r"adapter_model\.bin, and only safetensors"):
        resolve_lora(config_from_dict({"lora": {"init_from": str(bin_only)}}).lora, model)
    with pytest.raises(AdapterError, match=r"no_dir \(lora\.init_from\): no such directory"):
        resolve_lora(LoraConfig(init_from=str(tmp_path / "no_dir")), model)
    with pytest.raises(ConfigError, match=r"lora\.init_from: .*lora\.enabled=false"):
        config_from_dict({"lora": {"init_from": adapter, "enabled": False}})
    cfg = tiny_cfg(tmp_path, "lora.enabled=true", f"lora.init_from={tmp_path / 'no_dir'}")
    with pytest.raises(AdapterError, match="no such directory"):  # before any data is built
        train(cfg, progress=False)
    assert not os.path.exists(tmp_path / "data")


@pytest.mark.parametrize("base", ["next"], indirect=True)
def test_export_refuses_what_peft_cannot_hold(base, tmp_path):
    _, path = base
    model = load_pretrained(path)
    with pytest.raises(AdapterError, match="no LoRA adapter"):
        save_pretrained(model, str(tmp_path / "none"), adapter=True)
    apply_lora(model, LoraConfig(rank=2, alpha=2.0), nnx.Rngs(0))
    with pytest.raises(AdapterError, match=r"model\.image_newline is trained fully .* bare"):
        save_pretrained(model, str(tmp_path / "nl"), adapter=True, trainable=["image_newline"])
    assert not os.path.exists(tmp_path / "nl")  # nothing half-written


# ----------------------------------------------------------------------------- train and CLI


@pytest.fixture(scope="module")
def run_base(shared, tmp_path_factory) -> str:
    """Our tiny 2-layer LLaVA over the shared dataset's processor, saved as a transformers
    base with the processor files (a model.hf_path to train from)."""
    from perpo_jax.assemble import build_run_model

    _, data = shared
    tmp = tmp_path_factory.mktemp("run_base")
    cfg = tiny_cfg(tmp, "model.tiny={hidden_size: 32, num_layers: 2, image_size: 16, "
                   "patch_size: 8, vocab_size: 320}")
    model = build_run_model(cfg, None, data.processor)
    return save_pretrained(model, str(tmp / "base"), source_dir=data.processor_dir)


def _official_lists(tmp) -> list[str]:
    """Overrides for 8 pre-sampled PerPO lists (offline: one update of 8 lists, no sampling)."""
    from PIL import Image

    (tmp / "img").mkdir()
    entries = []
    for i in range(8):
        Image.new("RGB", (40, 30), (20 * i, 200, 10)).save(tmp / "img" / f"{i}.jpg")
        entries.append({"image_id": i, "image_path": f"{i}.jpg", "question": f"Where is thing {i}?",
                        "answer": "[0.1, 0.2, 0.5, 0.6]",
                        "answers_gen": ["[0.1, 0.2, 0.5, 0.6]", "[0.12, 0.2, 0.5, 0.6]",
                                        "[0.6, 0.6, 0.9, 0.9]"],
                        "iou_scores": [1.0, 0.95, 0.0]})
    (tmp / "lists.json").write_text(json.dumps(entries))
    return ["data.source=official_json", f"data.path={tmp / 'lists.json'}",
            f"data.image_dir={tmp / 'img'}", f"data.data_dir={tmp / 'data'}", "train.mode=offline",
            "train.epochs=1", "train.steps=0", "data.min_margin=0.8"]


def _image_inputs(config, seed=0):
    """input_ids [2, T] around one image's tokens, pixel_values [2, 3, S, S]."""
    rng = np.random.default_rng(seed)
    n, size, image = config.num_image_tokens, config.vision.image_size, config.image_token_id
    text = [t for t in range(1, 200) if t != image]
    row = lambda: np.concatenate([rng.choice(text, 3), np.full(n, image), rng.choice(text, 4)])
    ids = np.stack([row(), row()]).astype(np.int64)
    return ids, rng.standard_normal((2, 3, size, size)).astype(np.float32)


def test_train_from_a_peft_adapter_and_export_it_back(run_base, tmp_path, capsys):
    """lora.init_from: the trainer's policy is PeftModel's, its reference the base; a train
    step starts from the adapter (left-out layer stays exactly 0); `perpo-jax export
    --adapter` of the run loads in peft with the trained model's logits."""
    from perpo_jax import cli
    from perpo_jax.data.prepare import prepare_data
    from perpo_jax import assemble
    from perpo_jax.train import loop

    path = run_base
    adapter, peft_model = _peft_adapter(path, tmp_path / "adapter", seed=3, r=4, lora_alpha=8,
                                        target_modules=["q_proj", "v_proj"],
                                        layers_to_transform=[1], modules_to_save=PROJECTOR)
    cfg = tiny_cfg(tmp_path, *_official_lists(tmp_path), f"model.hf_path={path}",
                   "lora.enabled=true", f"lora.init_from={adapter}",
                   "lora.trainable=[multi_modal_projector]", "optim.lr=1e-6")
    data = prepare_data(cfg, progress=False)
    ids, pixels = _image_inputs(read_config(path))
    peft_logits = tiny_hf.hf_logits(peft_model, ids, pixel_values=pixels)
    base_logits = tiny_hf.hf_logits(_hf(path), ids, pixel_values=pixels)

    mesh = assemble.build_mesh(cfg)
    plan, _ = loop._plan_and_loader(cfg, mesh, data)
    trainer = loop._Trainer(cfg, data, assemble.build_run_model(cfg, mesh, data.processor), mesh,
                            plan)
    args = (jnp.asarray(ids), None, jnp.asarray(pixels))
    assert _max_diff(_forward(trainer.model(), *args), peft_logits, None) <= TOL
    assert _max_diff(_forward(trainer.model(reference=True), *args), base_logits, None) <= TOL

    result = train(cfg, data=data, progress=False)
    (row,) = result.history
    # a fresh adapter's first step is exactly log 2 (policy = reference); the loaded one's not
    assert row["num_valid_lists"] > 0 and abs(row["loss"] - math.log(2)) > 1e-3
    start = dict(nnx.to_flat_state(nnx.state(_ours_from(path, adapter)[0])))
    trained = dict(nnx.to_flat_state(nnx.state(result.model)))
    q_a = ("language_model", "layers", "self_attn", "q_proj", "lora", "a")
    assert not np.any(np.asarray(trained[q_a].get_value()[0]))  # layer 0: not in the adapter
    for key in (q_a, ("multi_modal_projector", "linear_1", "kernel")):
        moved = np.abs(np.asarray(trained[key].get_value()) - np.asarray(start[key].get_value()))
        assert moved.max() < 3e-6, key  # one AdamW step of lr 1e-6 from the adapter's values

    out = str(tmp_path / "exported")
    argv = ["export", "--adapter", "--checkpoint", os.path.join(cfg.train.out_dir, "checkpoints"),
            "--out"]
    assert cli.main(argv + [adapter, "--overwrite"]) == 1  # the adapter we trained from
    assert "PEFT adapter (lora.init_from)" in capsys.readouterr().err
    assert cli.main(argv + [out]) == 0
    assert "perpo_processor.json" in os.listdir(out)
    exported = PeftModel.from_pretrained(_hf(path), out).eval()
    want = _forward(result.model, *args)
    assert _max_diff(tiny_hf.hf_logits(exported, ids, pixel_values=pixels), want, None) <= TOL
    assert json.load(open(os.path.join(out, "adapter_config.json")))["base_model_name_or_path"] \
        == path
    assert cli.main(argv + [out]) == 1 and "pass --overwrite" in capsys.readouterr().err


def test_export_adapter_needs_a_base_on_disk(tmp_path, monkeypatch, capsys):
    from perpo_jax import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "run" / "checkpoints" / "5" / "train_state").mkdir(parents=True)
    (tmp_path / "c.yaml").write_text("train: {out_dir: run}\n")
    assert cli.main(["export", "--adapter", "--checkpoint", "run/checkpoints", "--out", "a",
                     "--config", "c.yaml"]) == 1
    assert "model.hf_path: null" in capsys.readouterr().err and not os.path.exists("a")
