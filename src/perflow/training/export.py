"""Final outputs of a run: the student as a diffusers folder, its PeRFlow scheduler, the delta.

``<output_dir>/``
- ``unet/`` (``transformer/`` for SD3/Flux): the student (``save_pretrained``, safetensors);
- ``scheduler/scheduler_config.json``: the matching ``PeRFlowScheduler`` (same betas, ``K``,
  boundaries, the student's prediction type); for a teacher sampled with ``clip_sample`` or
  ``thresholding``, or a Flux-dev teacher, also ``_teacher_sampling`` (:data:`TEACHER_SAMPLING_KEY`;
  private, so ``from_config`` ignores it): what the window solve did with them, or its guidance input;
- for an SD/SDXL teacher (``save_pipeline``): the rest of the pipeline (``model_index.json``,
  VAE, text encoders, tokenizers), so the folder loads with ``DiffusionPipeline.from_pretrained``;
  for an SD3/Flux teacher the same with the pipeline's own parts (:mod:`perflow.training.flow_teachers`);
  for an unconditional ``UNet2DModel`` teacher (``save_pipeline``): a ``DDPMPipeline``
  ``model_index.json`` (``DDPMPipeline.from_pretrained(out)`` samples with the PeRFlow scheduler);
  for a class-conditional teacher: ``label_encoder/`` (a ``UNet2DModel`` with ``class_labels``:
  ``unet/`` and ``scheduler/`` only, no diffusers pipeline takes its labels);
- ``delta.safetensors``: ``delta = student - teacher`` with metadata (base model, ``K``,
  prediction type, CFG mode, boundaries, scheduler config).

Every folder is written into a temporary sibling (``.tmp-<name>.XXXXXXXX``, removed on failure
and, after a kill, on the next start) and renamed into place, with the permissions the umask gives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ..io import atomic_folder, match_umask, read_json, write_text
from .flow_teachers import FlowTeacher
from .teachers import ClassConditionalTeacher, SDXLTeacher, Teacher, UNet2DTeacher

TEACHER_SAMPLING_KEY = "_teacher_sampling"
"""Scheduler-config key recording the teacher's ``clip_sample``/``thresholding`` and what the window solve applied."""


def replace_dir(target: Path, write: Callable[[Path], None]) -> Path:
    """Write a folder through ``write(tmp)`` into a temporary sibling (:func:`perflow.io.atomic_folder`),
    then swap it into ``target``; everything in it gets the umask's permissions (:func:`match_umask`)."""
    with atomic_folder(target, overwrite=True) as tmp:
        write(tmp)
        match_umask(tmp)
    return Path(target)


def perflow_scheduler(
    teacher: Teacher, prediction_type: str, boundaries: torch.Tensor, num_windows: int, model_output_type: str = "epsilon"
):
    """The ``PeRFlowScheduler`` for a student of ``teacher`` (equal windows unless the boundaries differ)."""
    from ..scheduler import PeRFlowScheduler
    from ..windows import resolve_boundaries

    explicit = not torch.equal(boundaries.to(torch.float64), resolve_boundaries(num_windows))
    return PeRFlowScheduler(
        **teacher.schedule_config,
        prediction_type=prediction_type,
        num_time_windows=num_windows,
        window_boundaries=boundaries.tolist() if explicit else None,
        model_output_type=model_output_type,
        clip_sample=teacher.clip_sample is not None,
        clip_sample_range=teacher.clip_sample or 1.0,
    )


def teacher_sampling(teacher: Teacher) -> dict[str, Any] | None:
    """How the window solve ran the teacher, where a sampler of the student must know it: for a scheduler
    that clips or thresholds ``x0``, ``{"clip_sample": r or None (x0 clipped to [-r, r]), "thresholding": bool
    (never applied)}``; for Flux-dev, ``{"embedded_guidance": g}`` (the guidance input the student was trained
    at and is sampled with). None when there is nothing to record."""
    out: dict[str, Any] = {}
    if teacher.clip_sample is not None or teacher.thresholding:
        out = {"clip_sample": teacher.clip_sample, "thresholding": teacher.thresholding, "thresholding_applied": False}
    if getattr(teacher, "guidance_embeds", False):
        out["embedded_guidance"] = float(teacher.guidance)
    return out or None


def _save_scheduler(scheduler, folder: Path, sampling: dict[str, Any] | None) -> None:
    import json

    scheduler.save_pretrained(folder)
    if sampling is not None:
        f = folder / "scheduler_config.json"
        write_text(f, json.dumps({**read_json(f), TEACHER_SAMPLING_KEY: sampling}, indent=2, sort_keys=True) + "\n")


def export_student(
    output_dir: str | Path,
    student: torch.nn.Module,
    teacher: Teacher,
    scheduler,
    cfg_mode: str,
    save_pipeline: bool = True,
    save_delta: bool = True,
    extra_metadata: dict[str, Any] | None = None,
    teacher_weights: dict[str, torch.Tensor] | None = None,
) -> dict[str, Path]:
    """Write the final outputs (see the module docstring); returns the written paths by name.

    ``teacher_weights``: the teacher UNet's original state dict when training ran it in another
    dtype (the delta must be taken against the weights the student started from).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    written[teacher.denoiser_name] = replace_dir(
        out / teacher.denoiser_name, lambda d: student.save_pretrained(d, safe_serialization=True)
    )
    sampling = teacher_sampling(teacher)
    written["scheduler"] = replace_dir(out / "scheduler", lambda d: _save_scheduler(scheduler, d, sampling))
    if isinstance(teacher, ClassConditionalTeacher):
        written["label_encoder"] = replace_dir(
            out / "label_encoder", lambda d: teacher.label_encoder.save_pretrained(d, safe_serialization=True)
        )
    elif isinstance(teacher, UNet2DTeacher):
        if save_pipeline and not teacher.conditional:
            written["model_index"] = _write_model_index(out, "DDPMPipeline", {"unet": ["diffusers", "UNet2DModel"]})
    elif save_pipeline and isinstance(teacher, FlowTeacher):
        written.update(_export_flow_pipeline(out, teacher, student))
    elif save_pipeline:
        written.update(_export_pipeline(out, teacher))
    if not save_delta and (out / "delta.safetensors").exists():
        # a delta left by an earlier export of this run (before a resume) no longer matches the student
        (out / "delta.safetensors").unlink()
    if save_delta:
        from ..delta import base_model_info, extract_delta, save_delta as _save

        base = teacher.unet if teacher_weights is None else teacher_weights
        delta = extract_delta(student, base)
        meta = {
            # the class of the teacher's denoiser, also when the delta is taken against its state dict (a run that
            # cast the teacher), so that a merge into another model family is refused (perflow.delta.merge.check_family)
            "base_model": {**base_model_info(base, name=teacher.name, config=teacher.unet.config),
                           "class": type(teacher.unet).__name__},
            "num_time_windows": scheduler.num_windows,
            "prediction_type": scheduler.config.prediction_type,
            "cfg_mode": cfg_mode,
            "window_boundaries": scheduler.boundaries.tolist(),
            "scheduler_config": dict(scheduler.config),
            **({"teacher_sampling": sampling} if sampling is not None else {}),
            **(extra_metadata or {}),
        }
        written["delta"] = match_umask(_save(delta, out / "delta.safetensors", meta))
    return written


def _export_flow_pipeline(out: Path, teacher: FlowTeacher, student: torch.nn.Module) -> dict[str, Path]:
    """``model_index.json`` and the SD3/Flux teacher's frozen parts (VAE, text encoders, tokenizers)."""
    written: dict[str, Path] = {}
    index: dict[str, Any] = {"transformer": ["diffusers", type(student).__name__]}
    for name, part in teacher.frozen_parts().items():
        kw = {} if name.startswith("tokenizer") else {"safe_serialization": True}
        written[name] = replace_dir(out / name, lambda d, p=part, k=kw: p.save_pretrained(d, **k))
        index[name] = [type(part).__module__.split(".")[0], type(part).__name__]
    for name in ("image_encoder", "feature_extractor"):  # SD3's optional IP-adapter parts
        if name in teacher.pipe.components and name not in index:
            index[name] = [None, None]
    written["model_index"] = _write_model_index(out, type(teacher.pipe).__name__, index)
    return written


def _export_pipeline(out: Path, teacher: Teacher) -> dict[str, Path]:
    """``model_index.json`` and the teacher's frozen parts, so ``out`` is a loadable pipeline folder."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    written: dict[str, Path] = {}
    parts: dict[str, Any] = {"vae": teacher.vae, "text_encoder": teacher.text_encoder, "tokenizer": teacher.tokenizer}
    if isinstance(teacher, SDXLTeacher):
        parts.update(text_encoder_2=teacher.text_encoder_2, tokenizer_2=teacher.tokenizer_2)
    for name, part in parts.items():
        kw = {} if name.startswith("tokenizer") else {"safe_serialization": True}
        written[name] = replace_dir(out / name, lambda d, p=part, k=kw: p.save_pretrained(d, **k))
    cls = StableDiffusionXLPipeline if isinstance(teacher, SDXLTeacher) else StableDiffusionPipeline
    index: dict[str, Any] = {"unet": ["diffusers", "UNet2DConditionModel"]}
    index["vae"] = ["diffusers", type(teacher.vae).__name__]
    for name in parts:
        if name.startswith(("text_encoder", "tokenizer")):
            index[name] = ["transformers", type(parts[name]).__name__]
    if cls is StableDiffusionPipeline:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    else:
        index.update(force_zeros_for_empty_prompt=teacher.force_zeros_for_empty_prompt)
        index.update(image_encoder=[None, None], feature_extractor=[None, None])
    written["model_index"] = _write_model_index(out, cls.__name__, index)
    return written


def _write_model_index(out: Path, pipeline: str, parts: dict[str, Any]) -> Path:
    """``out/model_index.json`` of a ``pipeline`` with ``parts`` and the PeRFlow scheduler."""
    import json

    import diffusers

    index: dict[str, Any] = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__}
    index["scheduler"] = ["perflow.scheduler", "PeRFlowScheduler"]  # "perflow" alone fails in DiffusionPipeline.from_pretrained
    index.update(parts)
    write_text(out / "model_index.json", json.dumps(index, indent=2))
    return out / "model_index.json"
