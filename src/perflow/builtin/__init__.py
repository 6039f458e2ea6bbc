"""The project's own small teachers, data and evaluation classifier (all offline).

- :func:`load_digits_dataset`, :func:`digits_teacher_path`: scikit-learn's 8x8 digits and the
  shipped class-conditional digits teacher (``python -m perflow.builtin.train_teacher``);
- :func:`load_digit_classifier`: the shipped digit classifier (``python -m perflow.builtin.classifier``);
- :class:`GaussianMixture`, :func:`default_mixture`: an analytic 2-D teacher with exact epsilon;
- the teacher suite (:mod:`perflow.builtin.suite`): :func:`load_faces_dataset` (LFW faces, 16x16
  grey, for the unconditional ``faces`` DDPM teacher), :func:`load_photos_dataset` (16x16 colour
  crops of nine bundled photos, for the class-conditional ``photos`` teacher),
  :func:`suite_teacher_path` (the shipped weights; ``python -m perflow.builtin.train_teacher
  --teacher NAME``).
"""

from __future__ import annotations

import importlib

_LAZY = {
    "load_digits_dataset": "perflow.builtin.digits",
    "digits_tensors": "perflow.builtin.digits",
    "digits_teacher_path": "perflow.builtin.digits",
    "load_digit_classifier": "perflow.builtin.classifier",
    "DigitClassifier": "perflow.builtin.classifier",
    "GaussianMixture": "perflow.builtin.gaussian_mixture",
    "default_mixture": "perflow.builtin.gaussian_mixture",
    "faces_tensors": "perflow.builtin.faces",
    "load_faces_dataset": "perflow.builtin.faces",
    "photos_tensors": "perflow.builtin.photos",
    "load_photos_dataset": "perflow.builtin.photos",
    "suite_teacher_path": "perflow.builtin.suite",
    "export_dataset": "perflow.builtin.suite",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'perflow.builtin' has no attribute {name!r}")
