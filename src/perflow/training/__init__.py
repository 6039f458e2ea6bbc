"""PeRFlow training on ``accelerate``: config, data, teachers, the loop, checkpoints, outputs.

Python::

    from perflow.training import TrainConfig, train
    result = train("digits", max_steps=100, output_dir="runs/digits")   # a recipe name, a file or a TrainConfig
    result.student, result.scheduler, result.losses

CLI: ``perflow train --config digits --max_steps 100``.
"""

from __future__ import annotations

from .config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    PeRFlowConfig,
    TrainConfig,
)
from .config_io import load_config, make_config, recipe_names
from .loop import TrainResult, train
from .teachers import (
    ClassConditionalTeacher,
    SDTeacher,
    SDXLTeacher,
    Teacher,
    UNet2DTeacher,
    as_teacher,
    load_teacher,
    teacher_from_pipeline,
)

__all__ = [
    "TrainConfig",
    "ModelConfig",
    "DataConfig",
    "PeRFlowConfig",
    "OptimConfig",
    "OutputConfig",
    "load_config",
    "make_config",
    "recipe_names",
    "train",
    "TrainResult",
    "Teacher",
    "ClassConditionalTeacher",
    "SDTeacher",
    "SDXLTeacher",
    "UNet2DTeacher",
    "as_teacher",
    "load_teacher",
    "teacher_from_pipeline",
]
