"""Loading trained PeRFlow students (``perflow train`` outputs) for sampling.

A student folder holds ``unet/`` (a diffusers ``UNet2DConditionModel``) and ``scheduler/``
(a :class:`perflow.PeRFlowScheduler` config giving ``K``, the boundaries and the student's
parameterization); a class-conditional student may carry its own ``label_encoder/``,
otherwise the teacher's is used (PeRFlow trains the UNet only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

_NESTED = ("", "student", "final", "pipeline")


@dataclass
class Student:
    unet: torch.nn.Module
    scheduler_config: dict
    label_encoder: torch.nn.Module | None
    path: Path

    @property
    def scheduler(self):
        return self.make_scheduler()

    def make_scheduler(self):
        from perflow.scheduler import PeRFlowScheduler

        return PeRFlowScheduler.from_config(self.scheduler_config)


def find_student_dir(path: str | Path) -> Path:
    """The folder under ``path`` (itself or ``student/``, ``final/``, ``pipeline/``) with ``unet/`` and ``scheduler/``."""
    root = Path(path)
    for sub in _NESTED:
        cand = root / sub if sub else root
        if (cand / "unet").is_dir() and (cand / "scheduler" / "scheduler_config.json").is_file():
            return cand
    raise FileNotFoundError(
        f"no PeRFlow student at {root}: expected unet/ and scheduler/scheduler_config.json there "
        "(the output_dir of `perflow train`)"
    )


def load_student(path: str | Path, teacher=None) -> Student:
    """Load a student's UNet (eval mode), its PeRFlow scheduler config and label encoder (if any)."""
    from diffusers import UNet2DConditionModel

    folder = find_student_dir(path)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    if config.get("_class_name") not in (None, "PeRFlowScheduler"):
        raise ValueError(
            f"{folder / 'scheduler'} configures {config.get('_class_name')}, not PeRFlowScheduler: "
            "is this a teacher folder rather than a PeRFlow student?"
        )
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval().requires_grad_(False)
    label_encoder = None
    if (folder / "label_encoder").is_dir():
        from perflow.models import LabelEncoder

        label_encoder = LabelEncoder.from_pretrained(folder / "label_encoder").eval()
    elif teacher is not None:
        label_encoder = getattr(teacher, "label_encoder", None)
    return Student(unet, config, label_encoder, folder)
