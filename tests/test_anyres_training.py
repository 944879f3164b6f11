"""Anyres (LLaVA-OneVision) through the training path: prompts of different lengths in one
batch (each image gives its own number of image tokens), prefix-shared == naive scoring
(value and gradient), the sampler, and the dense-OCR recipe end to end in miniature: the
shipped config with a tiny random OneVision checkpoint saved by transformers, generated page
images in the page-OCR JSONL layout, online PerPO with the OCR reward, eval with the
dense-OCR table's metrics, and an HF export that transformers loads."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx
from PIL import Image, ImageDraw
from transformers import AutoTokenizer

import tiny_hf
from perpo_jax import cli
from perpo_jax.data.batching import prompt_batch
from perpo_jax.data.processor import LlavaPromptProcessor
from perpo_jax.data.tokenizer import tokenizer_corpus, train_tokenizer
from perpo_jax.hf import load_pretrained
from perpo_jax.sampling import sample
from perpo_jax.scoring import list_logprobs

PAGES = ["cat 12", "red box", "ok 7", "sun up", "go 45", "blue", "map 3", "hi 88"]
QUESTION = "Read all the text in the image."
# (width, height): a wide and a tall page give different tile grids and token counts
SIZES = [(40, 18), (20, 36)]


def _page(text: str, size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text((2, 2), text, fill="black")
    return image


@pytest.fixture(scope="module")
def onevision_dir(tmp_path_factory):
    """A OneVision checkpoint as the hub lays it out (preprocessor_config.json,
    processor_config.json, tokenizer with the ChatML tokens, tiny random weights)."""
    out = str(tmp_path_factory.mktemp("ov") / "ckpt")
    tok_dir = str(tmp_path_factory.mktemp("ov_tok"))
    train_tokenizer(list(tokenizer_corpus([QUESTION] * 5, PAGES * 5)), 300, tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tiny_hf.save_onevision_dir(out, tokenizer)


@pytest.fixture(scope="module")
def processor(onevision_dir):
    return LlavaPromptProcessor.from_hf(onevision_dir, template="qwen_1_5")


def _list_batch(processor, k=3, r=4, seed=0):
    images = [_page(PAGES[i], SIZES[i]) for i in range(2)]
    batch = prompt_batch(processor, images, [QUESTION, QUESTION], None)
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, len(processor.tokenizer) - 3, size=(2, k, r))
    mask = np.arange(r)[None, None] < rng.integers(1, r + 1, size=(2, k))[..., None]
    return {**{key: jnp.asarray(v) for key, v in batch.items()},
            "response_ids": jnp.asarray(np.where(mask, ids, 0), jnp.int32),
            "response_mask": jnp.asarray(mask)}


def test_qwen_1_5_prompts_of_anyres_images_differ_in_length(processor):
    batch = _list_batch(processor)
    lengths = np.asarray(batch["prompt_mask"]).sum(axis=1)
    image_tokens = (np.asarray(batch["prompt_ids"]) == processor.image_token_id).sum(axis=1)
    assert image_tokens[0] != image_tokens[1] and lengths[0] != lengths[1]
    assert batch["pixel_values"].ndim == 5 and batch["image_sizes"].tolist() == [[18, 40], [36, 20]]
    text = processor.tokenizer.decode(np.asarray(batch["prompt_ids"][0])[:lengths[0]])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert text.endswith(f"\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert processor.encode_response("ok 7")[-1] == end and processor.stop_ids[0] == end
    assert processor.decode_response([*processor.encode_response("ok 7"), 9, 9]) == "ok 7"


def test_shared_prefix_equals_naive_with_anyres_prompts(onevision_dir, processor):
    model = load_pretrained(onevision_dir, dtype=jnp.float32)
    batch = _list_batch(processor, seed=1)
    graphdef, params = nnx.split(model)
    weights = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3)), jnp.float32)

    def objective(p, shared):
        return jnp.sum(weights * list_logprobs(nnx.merge(graphdef, p), batch, shared_prefix=shared))

    v_shared, g_shared = jax.jit(jax.value_and_grad(lambda p: objective(p, True)))(params)
    v_naive, g_naive = jax.jit(jax.value_and_grad(lambda p: objective(p, False)))(params)
    assert abs(float(v_shared) - float(v_naive)) <= 1e-5 * max(1.0, abs(float(v_naive)))
    leaves_s = jax.tree_util.tree_leaves_with_path(g_shared)
    for (path, gs), gn in zip(leaves_s, jax.tree.leaves(g_naive)):
        np.testing.assert_allclose(np.asarray(gs), np.asarray(gn), atol=1e-5, rtol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))
    newline = [g for p, g in leaves_s if "image_newline" in jax.tree_util.keystr(p)]
    assert newline and float(jnp.abs(newline[0]).max()) > 0  # the image path is trained


def test_sampler_takes_each_rows_own_image(onevision_dir, processor):
    """Greedy samples of a 2-image batch equal each image sampled alone (image_sizes are
    per row; the shorter prompt's padding never leaks)."""
    model = load_pretrained(onevision_dir, dtype=jnp.float32)
    batch = _list_batch(processor)
    prompts = {k: batch[k] for k in ("prompt_ids", "prompt_mask", "pixel_values", "image_sizes")}
    kw = dict(num_samples=2, max_new_tokens=4, temperature=0.0, rng=None,
              eos_id=processor.stop_ids, pad_id=0)
    both = np.asarray(sample(model, prompts, **kw).tokens)
    for row in range(2):
        width = int(np.asarray(prompts["prompt_mask"][row]).sum())
        alone = {k: v[row:row + 1] for k, v in prompts.items()}
        alone["prompt_ids"] = alone["prompt_ids"][:, :width]
        alone["prompt_mask"] = alone["prompt_mask"][:, :width]
        np.testing.assert_array_equal(np.asarray(sample(model, alone, **kw).tokens)[0], both[row])


def test_dense_ocr_recipe_end_to_end(onevision_dir, tmp_path):
    pages = tmp_path / "pages"
    pages.mkdir()
    with open(pages / "ocr.jsonl", "w") as f:
        for i, text in enumerate(PAGES):
            _page(text, SIZES[i % 2]).save(pages / f"p{i}.png")
            split = "val" if i >= 6 else "train"
            f.write(json.dumps({"image": f"p{i}.png", "text": text, "split": split}) + "\n")
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "qwen2_siglip_ocr_perpo.yaml")
    run = tmp_path / "run"
    overrides = [
        f"model.hf_path={onevision_dir}", "model.dtype=float32", "model.remat=false",
        f"data.path={pages / 'ocr.jsonl'}", f"data.image_dir={pages}",
        f"data.data_dir={tmp_path / 'data'}", f"train.out_dir={run}", "lora.rank=4",
        "lora.alpha=8.0", "sampling.prompts_per_round=4", "sampling.max_new_tokens=6",
        "train.max_response_length=6", "train.rounds=1", "optim.lr=1e-3",
        "optim.warmup_steps=0", "data.min_margin=0.0", "checkpoint.async_save=false",
        "eval.num_examples=2", "eval.batch_size=2", "eval.max_new_tokens=6"]
    assert cli.main(["train", "--config", config, *overrides]) == 0
    rounds = [json.loads(line) for line in open(run / "metrics.jsonl") if '"round"' in line]
    assert rounds and rounds[0]["prompts"] == 4  # every list of the round sampled K = 5
    assert cli.main(["eval", "--config", config, *overrides, "--checkpoint", str(run / "checkpoints"),
                     "--split", "val", "--out", str(tmp_path / "eval")]) == 0
    report = json.load(open(tmp_path / "eval" / "report.json"))
    table = report["metrics"]
    assert {"edit_distance", "f1", "precision", "recall", "bleu", "meteor", "ned"} <= set(table)
    assert table["count"] == 2 and 0.0 <= table["edit_distance"] <= 1.0
    hf_out = tmp_path / "hf"
    assert cli.main(["export", "--checkpoint", str(run / "checkpoints"), "--out", str(hf_out)]) == 0
    loaded, info = tf.LlavaOnevisionForConditionalGeneration.from_pretrained(
        str(hf_out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ours = load_pretrained(str(hf_out), dtype=jnp.float32)
    processor = LlavaPromptProcessor.from_hf(onevision_dir, template="qwen_1_5")
    batch = prompt_batch(processor, [_page("ok 7", (40, 18))], [QUESTION], None)
    logits = np.asarray(ours(jnp.asarray(batch["prompt_ids"]), jnp.asarray(batch["prompt_mask"]),
                             jnp.asarray(batch["pixel_values"]), jnp.asarray(batch["image_sizes"])))
    with torch.no_grad():
        ref = loaded.eval().float()(
            input_ids=torch.tensor(batch["prompt_ids"], dtype=torch.long),
            attention_mask=torch.tensor(batch["prompt_mask"], dtype=torch.long),
            pixel_values=torch.tensor(batch["pixel_values"]),
            image_sizes=torch.tensor(batch["image_sizes"], dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(logits, ref, atol=1e-4)
