"""POPE: yes/no hallucination metrics, and a model answering the question files.

    pope_metrics(predictions, labels, parser="pope")      # one split
    report = evaluate_pope(model, processor, {"random": ex_r, "popular": ex_p, ...}, cfg)
    report = run_pope(cfg, checkpoint, pope_dir, image_dir)   # `perpo-jax pope`

`pope_metrics`: accuracy, precision, recall, F1, yes_ratio ("yes" is the positive class), with
the official POPE answer parser (`pope_answer`, shared with the "pope" reward) or lmms-eval's
exact match; `pope_summary` adds the mean F1 over splits (how LLaVA-1.5 reports POPE). The
question files are read by `perpo_jax.data.pope`.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from perpo_jax.data import prepare
from perpo_jax.data.examples import prompt_length, prompt_limit
from perpo_jax.data.pope import pope_examples, pope_files, read_pope_questions
from perpo_jax.eval.run import greedy_texts
from perpo_jax import assemble
from perpo_jax.restore import model_from_checkpoint
from perpo_jax.rewards.pope import pope_answer

POPE_PARSERS = ("pope", "exact")


def exact_answer(text: str) -> str | None:
    """lmms-eval's rule: lower-cased and stripped, the answer must be exactly "yes" or "no";
    None otherwise (counted wrong, reported as unparsed)."""
    text = str(text).strip().lower()
    return text if text in ("yes", "no") else None


def _label(value, i: int) -> str:
    label = str(value).strip().lower()
    if label not in ("yes", "no"):
        raise ValueError(f"POPE label {i} is {value!r}; labels must be 'yes' or 'no'")
    return label


def pope_metrics(predictions: Sequence[str], labels: Sequence[str],
                 parser: str = "pope") -> dict[str, float]:
    """POPE metrics of predicted answer texts [N] against labels [N] ("yes" / "no").

    parser="pope": `pope_answer` (every text becomes yes or no); parser="exact":
    `exact_answer`, where anything but yes/no is wrong and counted in `unparsed`.
    "yes" is the positive class: precision = TP / predicted yes, recall = TP / labelled yes
    (an unparsed answer to a yes question is a miss), F1 their harmonic mean (0 when both 0),
    accuracy = correct / N, yes_ratio = predicted yes / N (of the PREDICTIONS, not the labels).
    """
    if parser not in POPE_PARSERS:
        raise ValueError(f"parser must be one of {POPE_PARSERS}, got {parser!r}")
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not len(labels):
        raise ValueError("pope_metrics needs at least one prediction")
    gold = [_label(v, i) for i, v in enumerate(labels)]
    parse = pope_answer if parser == "pope" else exact_answer
    pred = [parse(t) for t in predictions]
    tp = sum(p == "yes" and g == "yes" for p, g in zip(pred, gold))
    pred_yes = sum(p == "yes" for p in pred)
    gold_yes = sum(g == "yes" for g in gold)
    correct = sum(p == g for p, g in zip(pred, gold))
    precision = tp / pred_yes if pred_yes else 0.0
    recall = tp / gold_yes if gold_yes else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    out = {"accuracy": correct / len(gold), "precision": precision, "recall": recall, "f1": f1,
           "yes_ratio": pred_yes / len(gold), "count": len(gold)}
    if parser == "exact":
        out["unparsed"] = sum(p is None for p in pred)
    return out


def pope_summary(by_split: Mapping[str, Mapping[str, float]]) -> dict:
    """{split: metrics} -> the same plus "mean_f1" (and "mean_accuracy") over the splits."""
    splits = dict(by_split)
    if not splits:
        raise ValueError("pope_summary needs at least one split")
    return {**splits, "mean_f1": float(np.mean([m["f1"] for m in splits.values()])),
            "mean_accuracy": float(np.mean([m["accuracy"] for m in splits.values()]))}


# ----------------------------------------------------------------------------- running a model


def evaluate_pope(model, processor, examples_by_split: Mapping[str, Sequence], cfg, *,
                  mesh=None, parser: str = "pope", progress: bool = False) -> dict:
    """Greedy answers of `model` per split, `pope_metrics` of each and the mean F1.
    Returns {"splits": {split: metrics}, "mean_f1", "mean_accuracy", "answers": {split: [..]}}."""
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
    mesh = assemble.build_mesh(cfg)
    if cfg.model.hf_path is not None:
        processor = prepare._hf_processor(cfg)
    else:
        processor = prepare.prepare_data(cfg, progress=False).processor
    if checkpoint is None:
        return assemble.build_run_model(cfg, mesh, processor), processor, mesh
    return model_from_checkpoint(cfg, checkpoint, mesh, processor), processor, mesh
