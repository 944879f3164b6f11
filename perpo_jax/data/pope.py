"""POPE (Li et al. 2023, RUCAIBox/POPE): object-hallucination yes/no questions.

    questions = read_pope_questions("coco_pope_random.json")   # JSONL lines
    examples = pope_examples(questions, "/data/coco/val2014")   # prepare.Example list
    report = evaluate_pope(model, processor, {"random": ex_r, "popular": ex_p, ...}, cfg)

A question file is JSONL, one {"question_id", "image", "text", "label"} per line ("Is there
a {object} in the image?", label "yes" / "no"); the official files hold 3,000 questions over
500 COCO val2014 images per split (random / popular / adversarial). The prompt is the text
plus LLaVA-1.5's short-answer suffix (`POPE_SUFFIX`). Scores: `metrics.pope_metrics` per
split, and the mean F1 over the splits (`metrics.pope_summary`), as LLaVA-1.5 reports POPE.

Importing this module registers the reward "pope" (1 when the official POPE parser reads the
answer as the label, else 0): the discriminative reward of `data.task=pope`.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from perpo_jax.data.refcoco_style import DataFileError
from perpo_jax.metrics import pope_answer, pope_metrics, pope_summary
from perpo_jax.rewards import REWARDS, register_reward

POPE_SUFFIX = "Answer the question using a single word or phrase."
POPE_SPLITS = ("random", "popular", "adversarial")
_KEYS = ("question_id", "image", "text", "label")


def pope_question(text: str) -> str:
    """The prompt of one POPE question: its text, a newline, `POPE_SUFFIX` (LLaVA-1.5 eval)."""
    return f"{text.strip()}\n{POPE_SUFFIX}"


def pope_rewards(texts: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """[N] float32: 1 where the POPE parser reads text i as labels[i] ("yes" / "no")."""
    return np.asarray([float(pope_answer(t) == str(g).strip().lower())
                       for t, g in zip(texts, labels)], np.float32)


if "pope" not in REWARDS:
    register_reward("pope", pope_rewards)


def read_pope_questions(path: str) -> list[dict]:
    """The questions of one POPE JSONL file; a malformed line (bad JSON, not UTF-8, keys or
    label missing) is a DataFileError naming file:line."""
    out = []
    with open(path, "rb") as f:
        data = f.read()
    for n, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataFileError(f"{path}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                                f"column {e.start + 1})") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataFileError(f"{path}:{n}: not a JSON line: {e}") from None
        missing = [k for k in _KEYS if k not in row] if isinstance(row, dict) else list(_KEYS)
        if missing:
            raise DataFileError(f"{path}:{n}: POPE question lacks {missing} (needs "
                                f"{list(_KEYS)})")
        label = str(row["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise DataFileError(f"{path}:{n}: label {row['label']!r} is not yes / no")
        out.append({**row, "label": label})
    if not out:
        raise DataFileError(f"{path}: no POPE questions")
    return out


def pope_examples(questions: Sequence[dict], image_dir: str):
    """`prepare.Example`s (image HWC uint8, prompt with `POPE_SUFFIX`, answer = label) of
    the questions, images read from `image_dir` (each file decoded once)."""
    from perpo_jax.data.prepare import Example

    cache: dict[str, np.ndarray] = {}
    out = []
    for q in questions:
        name = q["image"]
        if name not in cache:
            path = os.path.join(image_dir, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"POPE question {q['question_id']}: image {path} not found")
            try:
                with Image.open(path) as im:
                    cache[name] = np.asarray(im.convert("RGB"))
            except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
                raise DataFileError(f"POPE question {q['question_id']}: image {path} cannot "
                                    f"be read (decoding it failed): {e}") from None
        out.append(Example(image=cache[name], question=pope_question(q["text"]),
                           answer=q["label"]))
    return out


def evaluate_pope(model, processor, examples_by_split: Mapping[str, Sequence], cfg, *,
                  mesh=None, parser: str = "pope", progress: bool = False) -> dict:
    """Greedy answers of `model` per split, `pope_metrics` of each and the mean F1.
    Returns {"splits": {split: metrics}, "mean_f1", "mean_accuracy", "answers": {split: [..]}}."""
    from perpo_jax.evaluate import greedy_texts, prompt_length, prompt_limit

    by_split, answers = {}, {}
    for split, examples in examples_by_split.items():
        examples = list(examples)
        length = prompt_length(examples, processor, prompt_limit(cfg, "eval.max_new_tokens"))
        texts = greedy_texts(model, examples, processor, batch_size=cfg.eval.batch_size,
                             max_new_tokens=cfg.eval.max_new_tokens, mesh=mesh,
                             progress=progress, prompt_len=length)
        by_split[split] = pope_metrics(texts, [e.answer for e in examples], parser=parser)
        answers[split] = texts
    summary = pope_summary(by_split)
    return {"splits": by_split, "mean_f1": summary["mean_f1"],
            "mean_accuracy": summary["mean_accuracy"], "answers": answers}


def pope_files(pope_dir: str, splits: Sequence[str] = POPE_SPLITS) -> dict[str, str]:
    """{split: path} of the official question files (`coco_pope_<split>.json`) in a dir."""
    out = {s: os.path.join(pope_dir, f"coco_pope_{s}.json") for s in splits}
    missing = [p for p in out.values() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"POPE question file(s) not found: {missing}")
    return out


def run_pope(cfg, checkpoint: str | None, pope_dir: str, image_dir: str, *, limit: int = 0,
             parser: str = "pope", progress: bool = True) -> dict:
    """`perpo-jax pope`: the model of `cfg` (its `model.hf_path`, or a training / converted
    `checkpoint`) answers the first `limit` (0: all) questions of every official split file
    in `pope_dir` over the images of `image_dir`; `evaluate_pope`'s report."""
    model, processor, mesh = _model_for(cfg, checkpoint)
    examples = {}
    for split, path in pope_files(pope_dir).items():
        questions = read_pope_questions(path)
        examples[split] = pope_examples(questions[:limit or None], image_dir)
    return evaluate_pope(model, processor, examples, cfg, mesh=mesh, parser=parser,
                         progress=progress)


def _model_for(cfg, checkpoint: str | None):
    """(model, processor, mesh) of a config: its hf_path (or tiny) model, or a checkpoint."""
    from perpo_jax.data import prepare
    from perpo_jax.models import from_config

    mesh = from_config.build_mesh(cfg)
    if cfg.model.hf_path is not None:
        processor = prepare._hf_processor(cfg)
    else:
        processor = prepare.prepare_data(cfg, progress=False).processor
    if checkpoint is None:
        return from_config.build_model(cfg, mesh, processor), processor, mesh
    from perpo_jax.restore import model_from_checkpoint

    return model_from_checkpoint(cfg, checkpoint, mesh, processor), processor, mesh

