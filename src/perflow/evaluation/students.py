"""Loading trained PeRFlow students (``perflow train`` outputs) for sampling.

A student folder holds ``unet/`` (a diffusers ``UNet2DConditionModel``, or ``UNet2DModel`` for an
unconditional teacher; ``transformer/``, an ``SD3Transformer2DModel`` or ``FluxTransformer2DModel``, for
a flow-matching teacher) and ``scheduler/``
(a :class:`perflow.PeRFlowScheduler` config giving ``K``, the boundaries and the student's
parameterization); a class-conditional student may carry its own ``label_encoder/``,
otherwise the teacher's is used (PeRFlow trains the UNet only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

_NESTED = ("", "student", "final", "pipeline")
UNET_CLASSES = ("UNet2DConditionModel", "UNet2DModel", "SD3Transformer2DModel", "FluxTransformer2DModel")
"""The diffusers denoiser classes a student's ``unet/config.json`` may name."""
_FIX = "evaluate it against the teacher it was trained from (--teacher)"


@dataclass
class Student:
    unet: torch.nn.Module
    scheduler_config: dict
    label_encoder: torch.nn.Module | None
    path: Path

    @property
    def scheduler(self):
        return self.make_scheduler()

    @property
    def embedded_guidance(self) -> float | None:
        """The guidance input a Flux-dev student was trained at (its scheduler config's ``_teacher_sampling``), else None."""
        from perflow.training.export import TEACHER_SAMPLING_KEY

        return (self.scheduler_config.get(TEACHER_SAMPLING_KEY) or {}).get("embedded_guidance")

    def make_scheduler(self):
        from perflow.scheduler import PeRFlowScheduler

        return PeRFlowScheduler.from_config(self.scheduler_config)


def denoiser_dir(folder: Path) -> Path:
    """A student's denoiser folder: ``unet/``, or ``transformer/`` when there is no ``unet/``."""
    return folder / "unet" if (folder / "unet").is_dir() or not (folder / "transformer").is_dir() else folder / "transformer"


def find_student_dir(path: str | Path) -> Path:
    """The folder under ``path`` (itself or ``student/``, ``final/``, ``pipeline/``) with ``unet/`` (or
    ``transformer/``) and ``scheduler/``."""
    root = Path(path)
    for sub in _NESTED:
        cand = root / sub if sub else root
        if denoiser_dir(cand).is_dir() and (cand / "scheduler" / "scheduler_config.json").is_file():
            return cand
    raise FileNotFoundError(
        f"no PeRFlow student at {root}: expected unet/ and scheduler/scheduler_config.json there "
        "(the output_dir of `perflow train`)"
    )


def load_student(path: str | Path, teacher=None) -> Student:
    """Load a student's UNet (eval mode), its PeRFlow scheduler config and label encoder (if any).

    With ``teacher``, the student must be a trained copy of the teacher's UNet: the same class,
    config and tensor names and shapes; otherwise a ``ValueError`` names the mismatch. Weights
    are read from safetensors only (a damaged file is an error naming it).
    """
    import diffusers

    from perflow.delta.keys import is_perflow_scheduler_config
    from perflow.io import check_weight_files, read_json, read_scheduler_config

    folder = find_student_dir(path)
    config = read_scheduler_config(folder, required=True)
    if not is_perflow_scheduler_config(config):
        raise ValueError(
            f"{folder / 'scheduler'} configures {config.get('_class_name') or 'no PeRFlow scheduler'}, not "
            "PeRFlowScheduler: is this a teacher folder rather than a PeRFlow student?"
        )
    check_weight_files(folder)
    den = denoiser_dir(folder)
    cls_name = read_json(den / "config.json").get("_class_name", "UNet2DConditionModel")
    if cls_name not in UNET_CLASSES:
        raise ValueError(f"{den / 'config.json'} names {cls_name!r}; a student denoiser is one of {UNET_CLASSES}")
    if teacher is not None and cls_name != type(teacher.unet).__name__:
        raise ValueError(
            f"the student {str(den)!r} is a {cls_name}, the teacher's denoiser a "
            f"{type(teacher.unet).__name__}; {_FIX}"
        )
    unet = getattr(diffusers, cls_name).from_pretrained(den, use_safetensors=True)
    unet = unet.eval().requires_grad_(False)
    if teacher is not None:
        check_same_architecture(unet, teacher.unet, den)
        check_same_schedule(config, teacher, folder / "scheduler")
    label_encoder = None
    if (folder / "label_encoder").is_dir():
        from perflow.models import LabelEncoder

        label_encoder = LabelEncoder.from_pretrained(folder / "label_encoder", use_safetensors=True).eval()
    elif teacher is not None:
        label_encoder = getattr(teacher, "label_encoder", None)
    return Student(unet, config, label_encoder, folder)


def check_same_schedule(student_config: dict, teacher, where: Path | str = "student") -> None:
    """Refuse a student whose PeRFlow scheduler follows another noise schedule than the teacher's (a student of
    another teacher of the same architecture: its samples would be compared with the wrong reference)."""
    from perflow.schedule import DiscreteVPSchedule

    schedule = getattr(teacher, "schedule", None)
    if not isinstance(schedule, DiscreteVPSchedule) or student_config.get("schedule_kind", "discrete_vp") != "discrete_vp":
        return
    ours = DiscreteVPSchedule.from_config(student_config).alphas_cumprod.double()
    theirs = schedule.alphas_cumprod.double()
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-5, atol=1e-7):
        keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end")
        shown = ", ".join(f"{k} {student_config.get(k)!r}" for k in keys)
        raise ValueError(f"the student's scheduler {str(where)!r} ({shown}) follows another noise schedule than the "
                         f"teacher's; {_FIX}")


def check_same_architecture(student_unet: torch.nn.Module, teacher_unet: torch.nn.Module, where: Path | str = "student") -> None:
    """Refuse a student UNet whose class, config or tensor names/shapes are not the teacher UNet's (naming them)."""
    from perflow.delta.keys import compare_keys, config_differences

    fix = _FIX
    if type(student_unet) is not type(teacher_unet):
        raise ValueError(
            f"the student {str(where)!r} is a {type(student_unet).__name__}, the teacher's denoiser a "
            f"{type(teacher_unet).__name__}; {fix}"
        )
    ours = {k: v for k, v in dict(student_unet.config).items() if not k.startswith("_")}
    theirs = {k: v for k, v in dict(teacher_unet.config).items() if not k.startswith("_")}
    diff = config_differences(ours, theirs)
    if diff:
        shown = ", ".join(f"{k}: {ours.get(k)!r} (student) vs {theirs.get(k)!r} (teacher)" for k in diff[:6])
        raise ValueError(
            f"the student {str(where)!r} is not a copy of the teacher's UNet: configs differ in {shown}"
            f"{' ...' if len(diff) > 6 else ''}; {fix}"
        )
    report = compare_keys(student_unet.state_dict(), teacher_unet.state_dict())
    if report:
        raise ValueError(f"the student {str(where)!r} does not match the teacher's UNet: {report.describe('student', 'teacher')}; {fix}")
