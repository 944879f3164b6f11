"""A small byte-level BPE tokenizer trained offline, saved in the transformers format.

Design:
- byte-level BPE (GPT-2 style pre-tokenisation): any text round-trips exactly through
  encode/decode and nothing is ever `<unk>`;
- digits are split one per token before BPE (as Llama does), so boxes tokenise compactly and
  predictably: each of `0-9 [ ] , .` is a single token and BPE never glues a digit to anything;
  "[0.12, 0.34, 0.56, 0.78]" is exactly 24 tokens;
- special tokens `<s>` (BOS, prepended by the post-processor), `</s>` (EOS), `<unk>`,
  `<pad>`, `<image>` (registered as the tokenizer's `image_token`, never split).

The directory written by `train_tokenizer` loads with `AutoTokenizer.from_pretrained(dir)`.
"""
from __future__ import annotations

from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from perpo_jax.atomic import atomic_dir
from perpo_jax.data.processor import llava_v1_prompt

SPECIAL_TOKENS = ("<s>", "</s>", "<unk>", "<pad>", "<image>")
BOS, EOS, UNK, PAD, IMAGE = SPECIAL_TOKENS


def _byte_level_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and save it to `out_dir` (written atomically).

    Args:
      texts: training corpus (e.g. the prompts, questions and answers of a dataset).
      vocab_size: total size including the 256 byte symbols and the 5 special tokens.
      out_dir: directory to create (replaced if it exists).
    Returns the loaded `PreTrainedTokenizerFast` (bos/eos/unk/pad set, `image_token`).
    """
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} < {minimum} (256 bytes + special tokens)")
    tok = _byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE}, padding_side="right")
    _save_atomically(fast, out_dir)
    return fast


def tokenizer_corpus(questions: Iterable[str], answers: Iterable[str]) -> Iterator[str]:
    """Training texts for a dataset: each LLaVA-v1 prompt and its answer as the model sees them."""
    for question, answer in zip(questions, answers):
        yield llava_v1_prompt(question) + " " + answer


def _save_atomically(fast: PreTrainedTokenizerFast, out_dir: str) -> None:
    """save_pretrained into a sibling temp dir, then rename over `out_dir`."""
    with atomic_dir(out_dir) as tmp:
        fast.save_pretrained(tmp)
