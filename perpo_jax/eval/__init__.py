"""Evaluation: a model run over a split or the POPE files, and pure metrics by task.

    result = evaluate(model, data, cfg, mesh=mesh)           # greedy answers + task metrics
    write_eval_outputs(result, "runs/demo/eval")             # report.json (+ boxes.png)
    report = run_pope(cfg, checkpoint, pope_dir, image_dir)  # POPE per split + mean F1

Modules:
- `run`        `evaluate`, `greedy_texts`, `task_metrics`, `write_eval_outputs`
- `grounding`  Acc@0.5 / mean IoU (`grounding_metrics`), `predicted_boxes`
- `ocr`        NED, char P/R/F1, corpus BLEU (`ocr_metrics`); the dense-OCR benchmark table
               (`ocr_benchmark_metrics`, `ocr_page_metrics`, METEOR)
- `pope`       `pope_metrics` / `pope_summary`; `evaluate_pope` / `run_pope` answer the files
- `bootstrap`  `paired_bootstrap_gain`: two models on the same examples
- `report`     `write_report` (JSON, atomic), `draw_boxes_png`
"""
from perpo_jax.eval.pope import evaluate_pope, run_pope
from perpo_jax.eval.run import EvalResult, evaluate, greedy_texts, write_eval_outputs

__all__ = ["EvalResult", "evaluate", "evaluate_pope", "greedy_texts", "run_pope",
           "write_eval_outputs"]
