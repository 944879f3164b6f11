"""LLaVA-NeXT / OneVision processor: prompt ids and tiles equal to transformers' processors,
and the whole path (our processor -> our model) equal to transformers' (processor -> model).

Checkpoint directories are saved by transformers: a LlavaNextProcessor (tiny tiles, 16 px,
patch 4) with a tiny random LlavaNextForConditionalGeneration, and a OneVision dir written by
hand from its image processor + tokenizer + processor_config.json (transformers'
LlavaOnevisionProcessor needs a video processor, i.e. torchvision, to save or load). The
reference OneVision prompts come from transformers' own `LlavaOnevisionProcessor` class,
built without a video processor (its video-processor class check skipped; only its image and
text paths run).
"""
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tf
from flax import nnx
from PIL import Image
from transformers import (AutoTokenizer, LlavaNextImageProcessorPil,
                          LlavaOnevisionImageProcessorPil, LlavaNextProcessor)

import tiny_hf
from perpo_jax.data.processor import LlavaPromptProcessor
from perpo_jax.data.tokenizer import tokenizer_corpus, train_tokenizer
from perpo_jax.hf import load_pretrained

QUESTIONS = ["What is the text in the image?", "Where is the small red circle?"]
# (width, height) of non-square test images: several tiles, and two sizes in one batch
IMAGE_SIZES = [(45, 20), (22, 37)]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% endfor %}{% for part in message['content'] if part['type'] == 'text' %}"
    "{{ part['text'] }}{% endfor %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
MEAN, STD = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]
TOL = 1e-4


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(list(tokenizer_corpus(QUESTIONS * 10, ["hello world 42"] * 10)), 300, str(out))
    return AutoTokenizer.from_pretrained(str(out))


def _images(seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for w, h in IMAGE_SIZES]


def _conversation(question):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def _text_config(kind, tok):
    config = tiny_hf.llama_config if kind == "next" else tiny_hf.qwen2_config
    return config(vocab_size=len(tok))


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory, tokenizer):
    """transformers-5 save of a LlavaNextProcessor + a tiny random LLaVA-NeXT model."""
    out = str(tmp_path_factory.mktemp("next") / "ckpt")
    image_proc = LlavaNextImageProcessorPil(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
        image_grid_pinpoints=tiny_hf.NEXT_PINPOINTS, image_mean=MEAN, image_std=STD)
    LlavaNextProcessor(image_processor=image_proc, tokenizer=tokenizer, patch_size=4,
                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                       chat_template=CHAT_TEMPLATE).save_pretrained(out)
    tiny_hf.llava_next(_text_config("next", tokenizer),
                       image_token_index=tokenizer.convert_tokens_to_ids("<image>")
                       ).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def onevision_dir(tmp_path_factory, tokenizer):
    """A OneVision checkpoint as the hub has them: preprocessor_config.json (image processor),
    processor_config.json (num_image_tokens, strategy, vision_aspect_ratio), the tokenizer,
    chat_template.jinja, and a tiny random LlavaOnevisionForConditionalGeneration."""
    out = str(tmp_path_factory.mktemp("onevision") / "ckpt")
    tiny_hf.save_onevision_dir(out, tokenizer, CHAT_TEMPLATE)
    return out


class _OnevisionWithoutVideo(tf.LlavaOnevisionProcessor):
    """transformers' LlavaOnevisionProcessor, its video-processor class check skipped (that
    class needs torchvision); every image and text path is transformers' own code."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def _reference(kind, path, tokenizer):
    """transformers' own processor for the checkpoint (OneVision: without video processor)."""
    if kind == "next":
        return tf.LlavaNextProcessor.from_pretrained(path)
    return _OnevisionWithoutVideo(
        image_processor=LlavaOnevisionImageProcessorPil.from_pretrained(path),
        tokenizer=tokenizer, video_processor=None, num_image_tokens=16,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_2",
        chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module", params=["next", "onevision"])
def case(request, next_dir, onevision_dir, tokenizer):
    path = next_dir if request.param == "next" else onevision_dir
    return request.param, path, _reference(request.param, path, tokenizer)


def test_prompt_ids_tiles_and_sizes_match_transformers(case):
    kind, path, ref = case
    ours = LlavaPromptProcessor.from_hf(path)
    assert ours.is_anyres and ours.anyres == ("llava_next" if kind == "next" else "llava_onevision")
    assert ours.template == "chat_template"
    images = _images()
    inputs = ours.image_inputs(images)
    prompts = ours.encode_prompts(QUESTIONS, inputs)
    texts = [ref.apply_chat_template(_conversation(q), add_generation_prompt=True)
             for q in QUESTIONS]
    want = ref(images=images, text=texts, return_tensors="np", padding=True)
    max_tiles = 5 if kind == "next" else 10
    assert inputs["pixel_values"].shape == (2, max_tiles, 3, 16, 16)
    assert inputs["pixel_values"].dtype == np.float32 and inputs["image_sizes"].dtype == np.int32
    np.testing.assert_array_equal(inputs["image_sizes"], [[h, w] for w, h in IMAGE_SIZES])
    np.testing.assert_array_equal(inputs["image_sizes"], want["image_sizes"])
    got_px, want_px = inputs["pixel_values"], np.asarray(want["pixel_values"])
    np.testing.assert_allclose(got_px[:, : want_px.shape[1]], want_px, rtol=0, atol=1e-6)
    assert not got_px[:, want_px.shape[1]:].any()
    counts = []
    for i, prompt in enumerate(prompts):
        ref_ids = want["input_ids"][i][want["attention_mask"][i].astype(bool)]
        np.testing.assert_array_equal(prompt, ref_ids)
        counts.append(int((prompt == ours.image_token_id).sum()))
    assert counts[0] != counts[1]  # two sizes, two token counts
    assert counts == [ours.num_image_tokens(h, w) for w, h in IMAGE_SIZES]
    # one image: pixel values [N, C, H, W] and its original size
    single = ours(images[0], QUESTIONS[0], answer="hello")
    np.testing.assert_array_equal(single["prompt_ids"], prompts[0])
    np.testing.assert_array_equal(single["pixel_values"], got_px[0])
    np.testing.assert_array_equal(single["image_size"], [20, 45])


def test_processor_to_model_logits_match_transformers(case):
    """Our processor + our model (jit) == transformers' processor + model, two image sizes."""
    kind, path, ref = case
    ours = LlavaPromptProcessor.from_hf(path)
    model = load_pretrained(path)
    images = _images(seed=1)
    inputs = ours.image_inputs(images)
    prompts = ours.encode_prompts(QUESTIONS, inputs)
    width = max(len(p) for p in prompts)
    ids = np.zeros((2, width), np.int32)
    mask = np.zeros((2, width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)], mask[i, : len(p)] = p, 1
    forward = nnx.jit(lambda m, a, b, c, d: m(a, b, c, d))
    got = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask),
                             jnp.asarray(inputs["pixel_values"]), jnp.asarray(inputs["image_sizes"])))
    hf = _hf_model(kind, path)
    texts = [ref.apply_chat_template(_conversation(q), add_generation_prompt=True)
             for q in QUESTIONS]
    want = ref(images=images, text=texts, return_tensors="np", padding=True,
               padding_side="right")
    np.testing.assert_array_equal(want["input_ids"] * want["attention_mask"], ids * mask)
    expect = tiny_hf.hf_anyres_logits(hf, want["input_ids"], want["attention_mask"],
                                      want["pixel_values"], want["image_sizes"])
    diff = np.abs(got - expect)[mask.astype(bool)].max()
    print(f"[parity] anyres {kind} processor+model max|diff| = {diff:.2e}")
    assert diff <= TOL


def _hf_model(kind, path):
    cls = (tf.LlavaNextForConditionalGeneration if kind == "next"
           else tf.LlavaOnevisionForConditionalGeneration)
    return cls.from_pretrained(path).eval()


def test_save_and_load_keep_the_anyres_processor(case, tmp_path):
    _, path, _ = case
    ours = LlavaPromptProcessor.from_hf(path)
    ours.save_pretrained(str(tmp_path / "proc"))
    image = _images(seed=2)[1]
    for back in (LlavaPromptProcessor.from_pretrained(str(tmp_path / "proc")),
                 LlavaPromptProcessor.from_hf(str(tmp_path / "proc"))):
        assert (back.anyres, back.vision_aspect_ratio, back.max_tiles) == \
            (ours.anyres, ours.vision_aspect_ratio, ours.max_tiles)
        a, b = ours(image, QUESTIONS[1], "x"), back(image, QUESTIONS[1], "x")
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_token_counts_follow_the_model_for_many_sizes(case):
    """The processor's count equals the model config's for sizes that hit float edge cases."""
    _, path, _ = case
    ours = LlavaPromptProcessor.from_hf(path)
    model = load_pretrained(path).config
    for h, w in [(1, 1), (16, 79), (79, 16), (49, 98), (333, 1000), (47, 48), (64, 64)]:
        assert ours.num_image_tokens(h, w) == model.image_tokens(h, w), (h, w)


def test_plain_llava_processor_gives_uniform_inputs(tokenizer):
    """image_inputs / encode_prompts work for plain LLaVA too ([B, C, H, W], no image_sizes)."""
    image_proc = tf.CLIPImageProcessorPil(size={"shortest_edge": 16},
                                          crop_size={"height": 16, "width": 16})
    ours = LlavaPromptProcessor(tokenizer, image_proc, patch_size=4)
    assert not ours.is_anyres
    inputs = ours.image_inputs(_images())
    assert set(inputs) == {"pixel_values"} and inputs["pixel_values"].shape == (2, 3, 16, 16)
    prompts = ours.encode_prompts(QUESTIONS, inputs)
    for prompt, question in zip(prompts, QUESTIONS):
        np.testing.assert_array_equal(prompt, ours.encode_prompt(question, 16, 16))
        assert int((prompt == ours.image_token_id).sum()) == 16


def test_anyres_processor_rejects_aspect_ratio_modes(next_dir):
    with pytest.raises(ValueError, match="does not apply to an anyres"):
        LlavaPromptProcessor.from_hf(next_dir, image_aspect_ratio="pad")
