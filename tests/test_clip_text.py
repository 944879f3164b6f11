"""CLIP text + vision towers and projections vs transformers' CLIPModel (tiny, random)."""

import numpy as np
import pytest


def _tiny_clip(eos: int, seed: int = 0):
    import torch
    import transformers as tf
    import tiny_hf

    cfg = tf.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, eos_token_id=eos,
                         bos_token_id=97, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=16, patch_size=8),
        projection_dim=24)
    torch.manual_seed(seed)
    model = tf.CLIPModel(cfg).eval().float()
    return tiny_hf._randomize(model, seed)


@pytest.mark.parametrize("eos", [98, 2])
def test_clip_logits_match_transformers(tmp_path, eos):
    import jax.numpy as jnp
    import torch

    from perpo_jax.hf import load_pretrained
    from perpo_jax.mas import clip_mas
    from perpo_jax.models.clip_text import ClipModel

    hf = _tiny_clip(eos)
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(str(tmp_path))
    assert isinstance(ours, ClipModel)
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    # 3 texts, right-padded with pad id 1; each ends in EOS (98) before its padding
    body = rng.integers(3, 90, size=(3, 9))
    lengths = [9, 5, 7]
    ids = np.ones((3, 9), np.int64)
    mask = np.zeros((3, 9), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = body[i, :n]
        ids[i, 0], ids[i, n - 1] = 97, 98  # legacy eos=2 configs pool at the highest id: 98
        mask[i, :n] = 1
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 pixel_values=torch.tensor(pixels))
    got = np.asarray(ours.logits(jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(got, out.logits_per_image.numpy(), atol=1e-4, rtol=0)
    with torch.no_grad():
        text = hf.get_text_features(input_ids=torch.tensor(ids),
                                    attention_mask=torch.tensor(mask)).pooler_output
        image = hf.get_image_features(pixel_values=torch.tensor(pixels)).pooler_output
    np.testing.assert_allclose(np.asarray(ours.text_embeds(jnp.asarray(ids), jnp.asarray(mask))),
                               text.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(ours.image_embeds(jnp.asarray(pixels))), image.numpy(),
                               atol=1e-4, rtol=0)
    mas = clip_mas(np.array([-0.2, 0.1, 0.3, 0.5]))
    np.testing.assert_allclose(mas, [0.0, 0.25, 0.75, 1.0])


def test_clip_scorer_gives_calibrated_mas(tmp_path):
    """ClipScorer: image processor + tokenizer + our CLIP -> MAS in [0, 1], the same numbers
    as the calibration of transformers' cosine similarities."""
    import torch
    from transformers import CLIPImageProcessorPil

    from perpo_jax.hf import load_pretrained
    from perpo_jax.mas import ClipScorer, clip_mas

    hf = _tiny_clip(98)
    hf.save_pretrained(tmp_path)

    class Tok:  # a word -> id tokenizer: BOS, words, EOS, right padding
        def __call__(self, texts, padding, truncation, max_length, return_tensors):
            rows = [[97] + [3 + len(w) % 80 for w in t.split()][:max_length - 2] + [98] for t in texts]
            n = max(map(len, rows))
            return {"input_ids": np.array([r + [1] * (n - len(r)) for r in rows]),
                    "attention_mask": np.array([[1] * len(r) + [0] * (n - len(r)) for r in rows])}

    proc = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    scorer = ClipScorer(load_pretrained(str(tmp_path)), Tok(), proc)
    image = np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    texts = ["a red circle", "two blue squares here", "no"]
    mas = scorer.mas(image, texts)
    assert mas.shape == (3,) and ((mas >= 0) & (mas <= 1)).all()
    tok = Tok()(texts, True, True, 16, "np")
    pixels = proc(images=[image], return_tensors="np")["pixel_values"]
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(tok["input_ids"]), pixel_values=torch.tensor(pixels),
                 attention_mask=torch.tensor(tok["attention_mask"]))
    cos = out.logits_per_image.numpy()[0] / hf.logit_scale.exp().item()
    np.testing.assert_allclose(mas, clip_mas(cos), atol=1e-4)


def _bytes_to_unicode():
    """GPT-2 / CLIP byte -> printable character table."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def save_tiny_clip_dir(path, seed: int = 0):
    """A local HF CLIPModel dir (random weights) with a byte-level CLIP tokenizer (no merges)
    and a 16 px CLIP image processor: what `m3po.clip_path` points at."""
    import torch
    import transformers as tf
    import tiny_hf
    from transformers import CLIPImageProcessorPil

    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = 512, 513
    tok = tf.CLIPTokenizer(vocab=vocab, merges=[])
    cfg = tf.CLIPConfig(
        text_config=dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=40, eos_token_id=513,
                         bos_token_id=512, pad_token_id=513),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, image_size=16, patch_size=8),
        projection_dim=24)
    torch.manual_seed(seed)
    model = tiny_hf._randomize(tf.CLIPModel(cfg).eval().float(), seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 16},
                          crop_size={"height": 16, "width": 16}).save_pretrained(path)
    return model, tok


def test_clip_scorer_from_an_hf_dir(tmp_path):
    import torch
    from transformers import CLIPImageProcessorPil

    from perpo_jax.mas import ClipScorer, clip_mas

    hf, tok = save_tiny_clip_dir(tmp_path)
    scorer = ClipScorer.from_hf(str(tmp_path))
    image = np.random.default_rng(1).integers(0, 255, (24, 20, 3), dtype=np.uint8)
    texts = ["[0.10, 0.20, 0.50, 0.60]", "a red circle", ""]
    enc = tok(texts, padding=True, return_tensors="np")
    pixels = CLIPImageProcessorPil.from_pretrained(str(tmp_path))(
        images=[image], return_tensors="np")["pixel_values"]
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(enc["input_ids"]), pixel_values=torch.tensor(pixels),
                 attention_mask=torch.tensor(enc["attention_mask"]))
    cos = out.logits_per_image.numpy()[0] / hf.logit_scale.exp().item()
    np.testing.assert_allclose(scorer.mas(image, texts), clip_mas(cos), atol=1e-4)
