"""perflow: Piecewise Rectified Flow (PeRFlow) for diffusers models.

Public API (imported lazily, so ``import perflow`` stays cheap):

- sampling: :class:`PeRFlowScheduler`
- maths: :mod:`perflow.windows`, :mod:`perflow.parameterization`, :func:`solve_window`
- training: :class:`TrainConfig`, :func:`train`
- plug-and-play: :func:`extract_delta`, :func:`merge_delta`, :func:`load_delta`,
  :func:`save_delta`, :func:`delta_to_lora`, :func:`load_pipeline`
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "PeRFlowScheduler": "perflow.scheduler",
    "PeRFlowSchedulerOutput": "perflow.scheduler",
    "solve_window": "perflow.teacher",
    "TrainConfig": "perflow.training",
    "train": "perflow.training",
    "extract_delta": "perflow.delta",
    "merge_delta": "perflow.delta",
    "load_delta": "perflow.delta",
    "save_delta": "perflow.delta",
    "delta_to_lora": "perflow.delta",
    "load_pipeline": "perflow.delta",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'perflow' has no attribute {name!r}")
