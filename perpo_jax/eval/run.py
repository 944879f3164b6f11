"""Greedy evaluation of a model on a prepared split, and its report files.

    result = evaluate(model, data, cfg, mesh=mesh)      # data: prepare.DataHandle
    write_eval_outputs(result, "runs/demo/eval")        # report.json (+ boxes.png for grounding)

Decoding is `perpo_jax.sampling.sample` at temperature 0 with one sample per prompt, over the
first `cfg.eval.num_examples` examples in batches of `cfg.eval.batch_size` (the last batch is
padded with copies of its last example so every batch has one compiled shape; the padded
results are dropped). Prompts are padded to the longest prompt of the evaluated examples,
rounded up to a multiple of 32 tokens (`data.batching.bucketed`: fewer recompiles). The
training length limit holds here too: prompt + `eval.max_new_tokens` <= `train.max_length`,
else a `PromptTooLongError` names the example and the keys (`data.examples.prompt_length`).

The split defaults to "val", or to "train" for data without a val split (`official_json`
lists are train-only); asking for a split the data lacks is an error saying so.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from perpo_jax import storage
from perpo_jax.config import Config, ConfigError
from perpo_jax.data.examples import (Example, default_split, prompt_batch_for, prompt_length,
                                     prompt_limit, record_example, split_source)
from perpo_jax.data.shapes_grounding import GROUNDING_PROMPT
from perpo_jax.eval.grounding import grounding_metrics, predicted_boxes
from perpo_jax.eval.ocr import ocr_benchmark_metrics, ocr_metrics
from perpo_jax.eval.report import draw_boxes_png, write_report
from perpo_jax.rewards import REWARDS
from perpo_jax.sampling import sample


@dataclasses.dataclass
class EvalResult:
    """task; metrics (`task_metrics` + samples_per_s, split); texts [N] decoded greedy
    answers; gt: boxes [N, 4] float32 (grounding) or reference strings [N]; questions [N];
    images: HWC uint8 of the first `cfg.eval.num_images` examples."""

    task: str
    metrics: dict[str, Any]
    texts: list[str]
    gt: Any
    questions: list[str]
    images: list[np.ndarray]


def greedy_texts(model, examples: list[Example], processor, *, batch_size: int,
                 max_new_tokens: int, mesh=None, progress: bool = True,
                 prompt_len: int | None = None) -> list[str]:
    """Greedy answers [N] of `model` for `examples`, decoded (EOS and padding removed).
    prompt_len: the padded prompt width (None: `prompt_length(examples, processor)`)."""
    tok = processor.tokenizer
    length = prompt_length(examples, processor) if prompt_len is None else prompt_len
    texts: list[str] = []
    with tqdm(total=len(examples), desc="eval", unit="ex", disable=not progress) as bar:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
            out = sample(model, prompt_batch_for(padded, processor, length), num_samples=1,
                         max_new_tokens=max_new_tokens, temperature=0.0, rng=None,
                         eos_id=processor.stop_ids, pad_id=tok.pad_token_id or 0, mesh=mesh)
            tokens = np.asarray(jax.device_get(out.tokens))[: len(chunk), 0]  # [b, R]
            texts.extend(processor.decode_response(t) for t in tokens)
            bar.update(len(chunk))
    return texts


def task_metrics(task: str, texts: list[str], examples: list[Example]) -> tuple[dict, Any]:
    """(metrics, ground truth) for `task`; unknown tasks report their registered reward."""

    if task == "grounding":
        missing = [i for i, e in enumerate(examples) if e.box is None]
        if missing:
            raise ValueError(f"grounding evaluation needs a box for every example; example "
                             f"{missing[0]} has none")
        gt = np.stack([e.box for e in examples]).astype(np.float32)
        return grounding_metrics(texts, gt), gt
    gt = [e.answer for e in examples]
    if task == "ocr":  # the dense-OCR table's word-level metrics, character-level extras
        table = ocr_benchmark_metrics(texts, gt)
        chars = ocr_metrics(texts, gt)
        return {**table, "ned": chars["ned"], "edit_similarity": chars["edit_similarity"]}, gt
    rewards = np.asarray(REWARDS[task](texts, gt), np.float64)
    return {"mean_reward": float(rewards.mean()), "count": len(texts)}, gt


def evaluate(model, data, cfg: Config, *, split: str | None = None, mesh=None,
             progress: bool = True) -> EvalResult:
    """Greedy-decodes the first `cfg.eval.num_examples` of `split` (None: `default_split`)
    and scores them."""
    split = default_split(data) if split is None else split
    source = split_source(data, split, cfg.data.source)
    n = min(cfg.eval.num_examples, len(source))
    if n < 1 or cfg.eval.batch_size < 1:
        raise ConfigError(f"eval.num_examples / eval.batch_size: nothing to evaluate "
                          f"(num_examples={cfg.eval.num_examples}, batch_size="
                          f"{cfg.eval.batch_size}, split {split!r} has {len(source)})")
    examples = [record_example(source[i]) for i in range(n)]
    length = prompt_length(examples, data.processor, prompt_limit(cfg, "eval.max_new_tokens"))
    start = time.perf_counter()
    texts = greedy_texts(model, examples, data.processor, batch_size=cfg.eval.batch_size,
                         max_new_tokens=cfg.eval.max_new_tokens, mesh=mesh, progress=progress,
                         prompt_len=length)
    elapsed = time.perf_counter() - start
    metrics, gt = task_metrics(data.task, texts, examples)
    metrics = dict(metrics, samples_per_s=n / elapsed if elapsed > 0 else float("nan"),
                   split=split)
    return EvalResult(task=data.task, metrics=metrics, texts=texts, gt=gt,
                      questions=[e.question for e in examples],
                      images=[e.image for e in examples[: cfg.eval.num_images]])


def _caption(question: str) -> str:
    """The referring expression of a grounding prompt (the prompt prefix is the same for all)."""

    return question[len(GROUNDING_PROMPT):] if question.startswith(GROUNDING_PROMPT) else question


def write_eval_outputs(result: EvalResult, out_dir: str) -> dict[str, str]:
    """report.json (metrics + every prediction) and, for grounding, boxes.png (GT green,
    prediction red) of the first images. Returns {"report": path, "png": path?}."""

    storage.makedirs(out_dir)  # gs://: nothing to make; each file is uploaded whole
    gt = result.gt.tolist() if isinstance(result.gt, np.ndarray) else list(result.gt)
    predictions = [{"question": q, "prediction": t, "ground_truth": g}
                   for q, t, g in zip(result.questions, result.texts, gt)]
    paths = {"report": os.path.join(out_dir, "report.json")}
    write_report(paths["report"], {"task": result.task, "metrics": result.metrics,
                                   "predictions": predictions})
    n = len(result.images)
    if result.task == "grounding" and n:
        paths["png"] = os.path.join(out_dir, "boxes.png")
        predicted = predicted_boxes(result.texts[:n])
        draw_boxes_png(paths["png"], result.images, result.gt[:n], {"model": predicted},
                       [_caption(q) for q in result.questions[:n]])
    return paths
