"""Evaluation: metrics, baseline samplers, the comparison harness, reports and plots.

- metrics (:mod:`perflow.evaluation.metrics`): :func:`frechet_distance`,
  :func:`frechet_distance_features`, :func:`sliced_wasserstein`, :func:`paired_mse`, :func:`straightness`;
- harness: :func:`compare_samplers` (model-agnostic);
- evaluators, one module each: :func:`evaluate_teacher` (any teacher kind, :mod:`.teacher_eval`),
  :func:`evaluate_digits` (built-in teacher, :mod:`.digits`),
  :func:`evaluate_images` (SD/SDXL pipelines, FID/CLIP from local weights, :mod:`.images`),
  :func:`evaluate_2d` (exact Gaussian-mixture teacher, :mod:`.toy2d`);
- :func:`baseline_scheduler` (DDIM, DPM-Solver++, UniPC) and :func:`sample`;
- :func:`write_results`, :func:`markdown_report`; :func:`save_sample_grid`, :func:`save_trajectory_plot`.
"""

from __future__ import annotations

import importlib

_LAZY = {
    **{n: "perflow.evaluation.metrics" for n in (
        "frechet_distance", "frechet_distance_features", "gaussian_stats", "sliced_wasserstein",
        "paired_mse", "straightness", "label_accuracy")},
    **{n: "perflow.evaluation.harness" for n in ("Sampler", "EvalResult", "Metrics", "compare_samplers")},
    **{n: "perflow.evaluation.digits" for n in (
        "DigitsEvalConfig", "evaluate_digits", "class_model_fn")},
    "TeacherEvalConfig": "perflow.evaluation.teacher_eval",
    "evaluate_teacher": "perflow.evaluation.teacher_eval",
    "ImageEvalConfig": "perflow.evaluation.images",
    "evaluate_images": "perflow.evaluation.images",
    "evaluate_2d": "perflow.evaluation.toy2d",
    "train_2d_student": "perflow.evaluation.toy2d",
    "baseline_scheduler": "perflow.evaluation.samplers",
    "sample": "perflow.evaluation.samplers",
    "load_student": "perflow.evaluation.students",
    "InceptionFeatures": "perflow.evaluation.features",
    "CLIPScorer": "perflow.evaluation.features",
    "write_results": "perflow.evaluation.report",
    "markdown_report": "perflow.evaluation.report",
    "save_sample_grid": "perflow.evaluation.plots",
    "save_trajectory_plot": "perflow.evaluation.plots",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'perflow.evaluation' has no attribute {name!r}")
