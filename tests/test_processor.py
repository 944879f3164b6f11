"""Tokenizer + processor: parity with transformers' LlavaProcessor, padding rules."""
import numpy as np
import pytest
from PIL import Image
from transformers import (AutoTokenizer, CLIPImageProcessorPil, LlavaProcessor,
                          SiglipImageProcessorPil)

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
