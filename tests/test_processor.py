"""Tokenizer + processor: parity with transformers' LlavaProcessor, padding rules.

Checkpoint directories are built here with transformers (tiny: 28 px images, patch 14, so
4 image tokens): a transformers-5 `LlavaProcessor.save_pretrained` (processor_config.json +
chat_template.jinja) and a hub/v4 layout (preprocessor_config.json, v4 config.json).
"""
import json
import os
import shutil

import numpy as np
import pytest
import transformers as tf
from PIL import Image
from transformers import (AutoTokenizer, CLIPImageProcessorPil, LlavaImageProcessorPil,
                          LlavaProcessor, SiglipImageProcessorPil)

from perpo_jax.data import batching
from perpo_jax.data.processor import LlavaPromptProcessor, llava_v1_prompt
from perpo_jax.data.shapes_grounding import grounding_question
from perpo_jax.data.tokenizer import tokenizer_corpus, train_tokenizer

CORPUS = list(tokenizer_corpus(
    [grounding_question("the small red circle left of the blue square"),
     grounding_question("the large green triangle above the yellow shape"),
     "What is the text in the image?"] * 10,
    ["[0.12, 0.34, 0.56, 0.78]", "[0.05, 0.61, 0.99, 1.00]", "hello world 42"] * 10))
QUESTIONS = [grounding_question("the blue square"),
             grounding_question("the small purple shape right of the large orange circle"),
             "What is the text in the image?"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(CORPUS, 320, str(out))
    return str(out)


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(40, 56), (64, 64), (50, 30)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % 3], 3), dtype=np.uint8))
            for i in range(n)]


def _clip():
    return CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                 image_mean=[0.48, 0.46, 0.41], image_std=[0.27, 0.26, 0.28])


def _siglip():
    return SiglipImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                                   image_std=[0.5] * 3)


def test_tokenizer_loads_roundtrips_and_boxes_are_compact(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert [tok.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<unk>", "<pad>", "<image>")] \
        == [0, 1, 2, 3, 4]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    for text in ["[0.12, 0.34, 0.56, 0.78]", "unseen Wörter ✓ 1234567890", "a\nb  c"]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
    pieces = tok.tokenize("[0.12, 0.34, 0.56, 0.78]")
    assert len(pieces) == 24  # every char one token; the 3 spaces are 'Ġ'
    assert all(len(p) == 1 for p in pieces)
    assert tok.tokenize("<image><image>") == ["<image>", "<image>"]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_prompt_ids_and_pixels_match_llava_processor(tokenizer_dir, kind):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    image_proc = _clip() if kind == "clip" else _siglip()
    strategy, extra = ("default", 1) if kind == "clip" else ("full", 0)
    ours = LlavaPromptProcessor(tok, image_proc, patch_size=8,
                                vision_feature_select_strategy=strategy,
                                num_additional_image_tokens=extra)
    ref = LlavaProcessor(image_processor=image_proc, tokenizer=tok, patch_size=8,
                         vision_feature_select_strategy=strategy,
                         num_additional_image_tokens=extra)
    images = _images(3)
    for image, question in zip(images, QUESTIONS):
        got = ours(image, question, answer="[0.10, 0.20, 0.30, 0.40]")
        want = ref(images=[image], text=[llava_v1_prompt(question)], return_tensors="np")
        np.testing.assert_array_equal(got["prompt_ids"], want["input_ids"][0])
        np.testing.assert_array_equal(got["pixel_values"], want["pixel_values"][0])
        assert got["pixel_values"].dtype == np.float32 and got["pixel_values"].shape == (3, 32, 32)
        assert int((got["prompt_ids"] == tok.convert_tokens_to_ids("<image>")).sum()) == 16
        # The answer continues the prompt exactly as the whole conversation would tokenise.
        full = tok(llava_v1_prompt(question).replace("<image>", "<image>" * 16)
                   + " [0.10, 0.20, 0.30, 0.40]</s>")["input_ids"]
        np.testing.assert_array_equal(
            np.concatenate([got["prompt_ids"], got["response_ids"]]), full)
        assert ours.decode_response(got["response_ids"]) == "[0.10, 0.20, 0.30, 0.40]"


def test_pixel_values_hand_checked(tokenizer_dir):
    """A uniform image normalises to (v/255 - mean)/std in every pixel (outside reference)."""
    proc = LlavaPromptProcessor(AutoTokenizer.from_pretrained(tokenizer_dir), _clip(), patch_size=8)
    image = Image.new("RGB", (48, 40), (255, 128, 0))
    px = proc.pixel_values([image])[0]
    want = (np.array([255, 128, 0]) / 255 - np.array([0.48, 0.46, 0.41])) / np.array([0.27, 0.26, 0.28])
    np.testing.assert_allclose(px, np.broadcast_to(want[:, None, None], px.shape), atol=1e-5)


def test_save_and_load_processor(tokenizer_dir, tmp_path):
    proc = LlavaPromptProcessor(AutoTokenizer.from_pretrained(tokenizer_dir), _siglip(),
                                patch_size=4, vision_feature_select_strategy="full",
                                num_additional_image_tokens=0)
    proc.save_pretrained(str(tmp_path / "proc"))
    back = LlavaPromptProcessor.from_pretrained(str(tmp_path / "proc"))
    image = _images(1)[0]
    a, b = proc(image, QUESTIONS[0], "x"), back(image, QUESTIONS[0], "x")
    assert back.num_image_tokens(32, 32) == 64
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_batching_pads_errors_and_counts_truncation(tokenizer_dir):
    proc = LlavaPromptProcessor(AutoTokenizer.from_pretrained(tokenizer_dir), _clip(), patch_size=8)
    batch = batching.prompt_batch(proc, _images(2), QUESTIONS[:2], length=None)
    lengths = [len(proc.encode_prompt(q, 32, 32)) for q in QUESTIONS[:2]]
    assert batch["prompt_ids"].shape == (2, max(lengths))
    assert batch["prompt_mask"].sum(1).tolist() == lengths
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    short = min(lengths)
    assert (batch["prompt_ids"][lengths.index(short), short:] == proc.tokenizer.pad_token_id).all()
    assert lengths[1] > lengths[0]  # the second question is the longer one
    with pytest.raises(batching.PromptTooLongError, match="ex-1 has .* > max prompt length"):
        batching.prompt_batch(proc, _images(2), QUESTIONS[:2], length=short, names=["ex-0", "ex-1"])

    padded = batching.pad_responses([[[5, 6, 1], [7, 1]], [[8, 9, 10, 11, 1]]], length=4, pad_id=3)
    assert padded.ids.shape == (2, 2, 4) and padded.num_truncated == 1
    np.testing.assert_array_equal(padded.ids[0], [[5, 6, 1, 3], [7, 1, 3, 3]])
    np.testing.assert_array_equal(padded.ids[1], [[8, 9, 10, 11], [3, 3, 3, 3]])
    np.testing.assert_array_equal(padded.mask.sum(-1), [[3, 2], [4, 0]])
    np.testing.assert_array_equal(padded.present, [[True, True], [True, False]])


# ---------------------------------------------------------------- checkpoints made by transformers

# A LLaVA-1.5-style chat template (images first, then text; "ASSISTANT:" generation prompt).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] + ' ' }}"
    "{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
MEAN, STD = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]
V4_PREPROCESSOR = {  # the fields transformers 4 wrote for llava-hf checkpoints, tiny sizes
    "crop_size": {"height": 28, "width": 28}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": MEAN,
    "image_processor_type": "CLIPImageProcessor", "image_std": STD,
    "processor_class": "LlavaProcessor", "resample": 3, "rescale_factor": 1 / 255,
    "size": {"shortest_edge": 28}}


def _v4_config(image_token_id):
    """config.json as transformers 4 wrote it (defaults omitted, top-level rope_theta)."""
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
            "image_token_index": image_token_id, "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default",
            "text_config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                            "num_attention_heads": 4, "num_hidden_layers": 1,
                            "rope_theta": 10000.0, "vocab_size": 320},
            "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32,
                              "image_size": 28, "intermediate_size": 64,
                              "num_attention_heads": 4, "num_hidden_layers": 1,
                              "patch_size": 14}}


@pytest.fixture(scope="module")
def v5_dir(tmp_path_factory, tokenizer_dir):
    """transformers-5 save: processor_config.json (LlavaImageProcessor, do_pad) + chat template."""
    out = str(tmp_path_factory.mktemp("v5") / "ckpt")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    image_proc = LlavaImageProcessorPil(size={"shortest_edge": 28},
                                        crop_size={"height": 28, "width": 28}, do_pad=True,
                                        image_mean=MEAN, image_std=STD)
    LlavaProcessor(image_processor=image_proc, tokenizer=tok, patch_size=14,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=CHAT_TEMPLATE).save_pretrained(out)
    image_token = tok.convert_tokens_to_ids("<image>")
    tf.LlavaConfig(text_config=tf.LlamaConfig(vocab_size=len(tok), hidden_size=32,
                                              intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=4),
                   vision_config=tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=1, num_attention_heads=4,
                                                     image_size=28, patch_size=14),
                   image_token_index=image_token).save_pretrained(out)
    assert sorted(os.listdir(out)) == ["chat_template.jinja", "config.json",
                                       "processor_config.json", "tokenizer.json",
                                       "tokenizer_config.json"]
    return out


@pytest.fixture(scope="module")
def v4_dir(tmp_path_factory, tokenizer_dir):
    """Hub/v4 layout: preprocessor_config.json (CLIPImageProcessor), v4 config.json, no chat
    template and no processor_config.json (image-token settings come from config.json)."""
    out = str(tmp_path_factory.mktemp("v4") / "ckpt")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.save_pretrained(out)
    _write_json(os.path.join(out, "preprocessor_config.json"), V4_PREPROCESSOR)
    _write_json(os.path.join(out, "config.json"), _v4_config(tok.convert_tokens_to_ids("<image>")))
    return out


def _write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def _copy(src, tmp_path, name="copy"):
    return shutil.copytree(src, str(tmp_path / name))


def _conversation(question, answer=None):
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        conv.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return conv


def _mode_images():
    """A non-square RGB image and the same pixels as L and RGBA (with real transparency)."""
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 44, 3), dtype=np.uint8))
    alpha = Image.fromarray(rng.integers(0, 256, (24, 44), dtype=np.uint8), "L")
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    return {"RGB": rgb, "L": rgb.convert("L"), "RGBA": rgba}


def _check_against(ours, ref, text_of, images):
    """prompt_ids == ref(images, text) input_ids exactly; pixels to 1e-6; 4 image tokens."""
    for (mode, image), question in zip(images.items(), QUESTIONS):
        got = ours(image, question)
        want = ref(images=[image], text=[text_of(question)], return_tensors="np")
        np.testing.assert_array_equal(got["prompt_ids"], want["input_ids"][0], err_msg=mode)
        np.testing.assert_allclose(got["pixel_values"], want["pixel_values"][0], rtol=0,
                                   atol=1e-6, err_msg=mode)
        assert got["pixel_values"].shape == (3, 28, 28) and got["pixel_values"].dtype == np.float32
        assert got["prompt_ids"].dtype == np.int32
        assert int((got["prompt_ids"] == ours.image_token_id).sum()) == 4


def test_transformers5_save_matches_llava_processor(v5_dir):
    """processor_config.json layout: LlavaImageProcessor (pad) + the saved chat template."""
    ours = LlavaPromptProcessor.from_hf(v5_dir)
    assert (ours.template, ours.image_aspect_ratio) == ("chat_template", "checkpoint")
    assert type(ours.image_processor) is LlavaImageProcessorPil and ours.image_processor.do_pad
    ref = LlavaProcessor.from_pretrained(v5_dir)  # as a transformers user loads it
    assert ref.chat_template == CHAT_TEMPLATE

    def text_of(question):
        return ref.apply_chat_template(_conversation(question), add_generation_prompt=True)

    assert text_of("q") == "USER: <image>\nq ASSISTANT:"
    _check_against(ours, ref, text_of, _mode_images())

    # The answer continues the prompt as the whole rendered conversation tokenises.
    image, question, answer = _mode_images()["RGB"], QUESTIONS[0], "[0.10, 0.20, 0.30, 0.40]"
    got = ours(image, question, answer=answer)
    assert ours.answer_prefix == " "
    full = ref.apply_chat_template(_conversation(question, answer))
    assert full == text_of(question) + " " + answer + " "
    want = ref(images=[image], text=[full[:-1]], return_tensors="np")["input_ids"][0]
    np.testing.assert_array_equal(np.concatenate([got["prompt_ids"], got["response_ids"]]),
                                  list(want) + [ref.tokenizer.eos_token_id])
    assert ours.decode_response(got["response_ids"]) == answer


def test_hub_v4_layout_matches_llava_processor(v4_dir):
    """preprocessor_config.json layout: CLIP crop; patch / strategy / +1 CLS from config.json."""
    ours = LlavaPromptProcessor.from_hf(v4_dir)
    assert ours.template == "llava_v1" and type(ours.image_processor) is CLIPImageProcessorPil
    assert (ours.patch_size, ours.vision_feature_select_strategy,
            ours.num_additional_image_tokens) == (14, "default", 1)
    ref = LlavaProcessor.from_pretrained(v4_dir, patch_size=14, num_additional_image_tokens=1,
                                         vision_feature_select_strategy="default")
    _check_against(ours, ref, llava_v1_prompt, _mode_images())


def test_llava_v1_template_on_a_chat_checkpoint(v5_dir):
    ours = LlavaPromptProcessor.from_hf(v5_dir, template="llava_v1")
    assert ours.template == "llava_v1" and ours.answer_prefix == " "
    ref = LlavaProcessor.from_pretrained(v5_dir)
    _check_against(ours, ref, llava_v1_prompt, _mode_images())


def test_legacy_chat_template_json_and_processor_config(v4_dir, tmp_path):
    """v4 llava-hf dirs keep the template in chat_template.json; "auto" must find it."""
    path = _copy(v4_dir, tmp_path)
    _write_json(os.path.join(path, "chat_template.json"), {"chat_template": CHAT_TEMPLATE})
    _write_json(os.path.join(path, "processor_config.json"), {
        "image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": 14,
        "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default"})
    ours = LlavaPromptProcessor.from_hf(path, template="auto")
    assert ours.template == "chat_template" and ours.chat_template == CHAT_TEMPLATE
    ref = LlavaProcessor.from_pretrained(path)
    _check_against(ours, ref, lambda q: ref.apply_chat_template(
        _conversation(q), add_generation_prompt=True), _mode_images())


def test_template_written_bos_is_not_doubled(tokenizer_dir):
    """A template that writes BOS itself: ids equal apply_chat_template(tokenize=True)."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    template = "{{ bos_token }}" + CHAT_TEMPLATE
    image_proc = CLIPImageProcessorPil(size={"shortest_edge": 28},
                                       crop_size={"height": 28, "width": 28})
    ours = LlavaPromptProcessor(tok, image_proc, patch_size=14, template="chat_template",
                                chat_template=template)
    ref = LlavaProcessor(image_processor=image_proc, tokenizer=tok, patch_size=14,
                         vision_feature_select_strategy="default",
                         num_additional_image_tokens=1, chat_template=template)
    image = _mode_images()["RGB"]
    conv = _conversation(QUESTIONS[1])
    conv[0]["content"][0]["image"] = image
    want = ref.apply_chat_template(conv, add_generation_prompt=True, tokenize=True,
                                   return_dict=True, return_tensors="np")
    got = ours(image, QUESTIONS[1])
    np.testing.assert_array_equal(got["prompt_ids"], want["input_ids"][0])
    assert int((got["prompt_ids"] == tok.bos_token_id).sum()) == 1


def test_image_aspect_ratio_pad_and_crop(v4_dir, v5_dir):
    """pad = LlavaImageProcessorPil(do_pad=True) with the checkpoint's settings (padding with
    the image mean); crop = CLIP resize + center crop; they differ on a non-square image."""
    wide = Image.fromarray(np.random.default_rng(5).integers(0, 256, (16, 64, 3), dtype=np.uint8))
    pad = LlavaPromptProcessor.from_hf(v4_dir, image_aspect_ratio="pad")
    crop = LlavaPromptProcessor.from_hf(v4_dir, image_aspect_ratio="crop")
    assert (pad.image_aspect_ratio, crop.image_aspect_ratio) == ("pad", "crop")
    settings = {k: v for k, v in V4_PREPROCESSOR.items()
                if k not in ("image_processor_type", "processor_class")}
    want_pad = LlavaImageProcessorPil(**settings, do_pad=True)(images=[wide], return_tensors="np")
    want_crop = CLIPImageProcessorPil(**settings)(images=[wide], return_tensors="np")
    got_pad, got_crop = pad(wide, "q")["pixel_values"], crop(wide, "q")["pixel_values"]
    np.testing.assert_allclose(got_pad, want_pad["pixel_values"][0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got_crop, want_crop["pixel_values"][0], rtol=0, atol=1e-6)
    assert np.abs(got_pad - got_crop).max() > 0.5
    # 64 x 16 padded to 64 x 64 with the mean colour: 24 rows above the image, 10.5 after the
    # resize to 28, so row 0 is pure padding: (int(mean * 255) / 255 - mean) / std.
    mean, std = np.array(MEAN), np.array(STD)
    pad_value = (np.floor(mean * 255) / 255 - mean) / std
    np.testing.assert_allclose(got_pad[:, 0, :], np.broadcast_to(pad_value[:, None], (3, 28)),
                               atol=1e-5)
    # The v5 checkpoint's own processor pads ("checkpoint"); "crop" overrides it.
    v5 = LlavaPromptProcessor.from_hf(v5_dir)
    np.testing.assert_allclose(v5(wide, "q")["pixel_values"], got_pad, rtol=0, atol=1e-6)
    v5_crop = LlavaPromptProcessor.from_hf(v5_dir, image_aspect_ratio="crop")
    np.testing.assert_allclose(v5_crop(wide, "q")["pixel_values"], got_crop, rtol=0, atol=1e-6)
    assert not v5_crop.image_processor.do_pad


def test_image_modes_arrays_and_extreme_sizes(v4_dir):
    """Every PIL mode and uint8 HW / HWC arrays become RGB exactly as transformers converts
    them; 1 x 1 and 10,000-pixel-wide images work; bad inputs name the image."""
    ours = LlavaPromptProcessor.from_hf(v4_dir)
    ref = CLIPImageProcessorPil.from_pretrained(v4_dir)
    rng = np.random.default_rng(7)
    rgba = rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)
    pil = {"L": Image.fromarray(rgba[..., 0], "L"), "LA": Image.fromarray(rgba[..., :2], "LA"),
           "RGBA": Image.fromarray(rgba, "RGBA"), "P": Image.fromarray(rgba[..., :3]).convert("P"),
           "CMYK": Image.fromarray(rgba, "RGBA").convert("CMYK"),
           "I;16": Image.fromarray(rng.integers(0, 600, (20, 30)).astype(np.uint16)),
           "I": Image.fromarray(rng.integers(-50, 600, (20, 30)).astype(np.int32)),
           "F": Image.fromarray((rng.random((20, 30)) * 300).astype(np.float32))}
    for mode, image in pil.items():
        assert image.mode == mode
        np.testing.assert_allclose(ours.pixel_values([image])[0],
                                   ref(images=[image], return_tensors="np")["pixel_values"][0],
                                   rtol=0, atol=1e-6, err_msg=mode)
    arrays = {"HW": (rgba[..., 0], pil["L"]), "HW1": (rgba[..., :1], pil["L"]),
              "HWC": (rgba[..., :3], Image.fromarray(rgba[..., :3])),
              "HWC4": (rgba, Image.fromarray(rgba, "RGBA"))}
    for name, (array, same_image) in arrays.items():
        want = ref(images=[same_image], return_tensors="np")["pixel_values"][0]
        np.testing.assert_allclose(ours.pixel_values([array])[0], want, rtol=0, atol=1e-6,
                                   err_msg=name)
    tiny = np.array([[[200, 10, 30]]], dtype=np.uint8)  # 1 x 1 x 3: transformers alone would
    np.testing.assert_allclose(ours.pixel_values([tiny])[0],  # read it channels-first
                               ref(images=[Image.fromarray(tiny)],
                                   return_tensors="np")["pixel_values"][0], rtol=0, atol=1e-6)
    for image in (Image.new("RGB", (1, 1), (9, 99, 199)), Image.new("L", (10_000, 3), 77)):
        out = ours(image, "q")
        assert out["pixel_values"].shape == (3, 28, 28) and np.isfinite(out["pixel_values"]).all()
    pad = LlavaPromptProcessor.from_hf(v4_dir, image_aspect_ratio="pad")
    assert pad(Image.new("RGB", (1, 1)), "q")["pixel_values"].shape == (3, 28, 28)
    for bad, match in [(np.zeros((4, 4, 3), np.float32), r"array float32 \[4, 4, 3\]"),
                       (np.zeros((4, 4, 2), np.uint8), r"array uint8 \[4, 4, 2\]"),
                       (Image.new("RGB", (0, 5)), "0x5.* is empty"),
                       ("image.png", "of type str")]:
        with pytest.raises(ValueError, match=match):
            ours(bad, "q")


def test_missing_chat_template_and_unknown_image_processor_are_clear(v4_dir, v5_dir, tmp_path):
    with pytest.raises(ValueError, match=r"ckpt: template=.chat_template. but the checkpoint "
                                         r"has no chat template"):
        LlavaPromptProcessor.from_hf(v4_dir, template="chat_template")
    with pytest.raises(ValueError, match="template must be one of"):
        LlavaPromptProcessor.from_hf(v4_dir, template="vicuna")
    with pytest.raises(ValueError, match="image_aspect_ratio must be one of"):
        LlavaPromptProcessor.from_hf(v4_dir, image_aspect_ratio="anyres")

    v4 = _copy(v4_dir, tmp_path, "v4")
    _write_json(os.path.join(v4, "preprocessor_config.json"),
                {**V4_PREPROCESSOR, "image_processor_type": "LlavaNextImageProcessor"})
    with pytest.raises(ValueError, match=r"preprocessor_config.json: image processor class "
                                         r"'LlavaNextImageProcessor' is not supported"):
        LlavaPromptProcessor.from_hf(v4)

    v5 = _copy(v5_dir, tmp_path, "v5")
    with open(os.path.join(v5, "processor_config.json")) as f:
        settings = json.load(f)
    settings["image_processor"]["image_processor_type"] = "MyImageProcessorFast"
    _write_json(os.path.join(v5, "processor_config.json"), settings)
    with pytest.raises(ValueError, match=r"processor_config.json: image processor class "
                                         r"'MyImageProcessor' is not supported"):
        LlavaPromptProcessor.from_hf(v5)

    os.remove(os.path.join(v4, "preprocessor_config.json"))
    with pytest.raises(FileNotFoundError, match="no image processor settings"):
        LlavaPromptProcessor.from_hf(v4)
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        LlavaPromptProcessor.from_hf(str(tmp_path / "nope"))


def test_processor_tokens_must_match_the_vision_tower(v5_dir, tmp_path):
    """A processor_config.json whose image-token count disagrees with config.json is an error."""
    path = _copy(v5_dir, tmp_path)
    with open(os.path.join(path, "processor_config.json")) as f:
        settings = json.load(f)
    _write_json(os.path.join(path, "processor_config.json"),
                {**settings, "num_additional_image_tokens": 0})
    with pytest.raises(ValueError, match="gives 3 image tokens .* gives 4 features"):
        LlavaPromptProcessor.from_hf(path)


def test_own_export_roundtrips_through_from_hf(v5_dir, tmp_path):
    """save_pretrained keeps template, chat template and aspect-ratio mode; from_hf loads it."""
    proc = LlavaPromptProcessor.from_hf(v5_dir, image_aspect_ratio="crop")
    proc.save_pretrained(str(tmp_path / "export"))
    image = _mode_images()["RGBA"]
    for back in (LlavaPromptProcessor.from_pretrained(str(tmp_path / "export")),
                 LlavaPromptProcessor.from_hf(str(tmp_path / "export"))):
        assert (back.template, back.image_aspect_ratio) == ("chat_template", "crop")
        a, b = proc(image, QUESTIONS[0], "x"), back(image, QUESTIONS[0], "x")
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    v1 = LlavaPromptProcessor.from_hf(str(tmp_path / "export"), template="llava_v1",
                                      image_aspect_ratio="pad")
    assert (v1.template, v1.image_aspect_ratio) == ("llava_v1", "pad")
    assert v1.image_processor.do_pad
