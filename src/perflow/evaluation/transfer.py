"""The transfer report: does a PeRFlow delta accelerate *this* model (a fine-tune, a LoRA, a ControlNet)?

:func:`transfer_report` merges the delta (or a PeRFlow LoRA, plus its rest) into a copy of the
target's UNet and runs :func:`perflow.evaluation.teacher_eval.evaluate_teacher` with the target as
the teacher: target + delta with the PeRFlow scheduler, and the target with its own DDIM,
DPM-Solver++ and UniPC (each at its best ``timestep_spacing``), at the same model evaluations, all
against the target's own ``reference_steps``-step DDIM output from the same noise and conditions.

The verdict compares, at each step count, target + delta with the target's best own solver:

- ``paired_mse``: mean squared distance to the target's many-step output (fidelity);
- ``sw_ref`` (sliced Wasserstein-2, pixels) and, where a feature model exists locally (the digit
  classifier), ``fd_ref``: distances between the two image *distributions*;
- straightness within PeRFlow's windows of target + delta's flow against the target's own.

The delta *transfers* when target + delta at 4 steps has a lower paired MSE than every solver of the
target at 4 evaluations; otherwise the report says so and points at ``perflow delta adapt``.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .harness import EvalResult
from .samplers import BASELINE_SAMPLERS, TIMESTEP_SPACINGS

DELTA_ROW = "target + delta"


@dataclass
class TransferConfig:
    """What :func:`transfer_report` measures (fields mirror ``perflow delta report`` flags)."""

    delta: Any
    """A delta ``.safetensors``, a released delta folder, a PeRFlow LoRA file (``to-lora``), or ``(tensors, metadata)``."""
    target: Any = None
    """A model folder, a built-in name, a single-file checkpoint (with ``base``) or a
    :class:`~perflow.targets.Target`; ``None`` with ``base`` + ``lora``: the base with the LoRA."""
    base: str | None = None
    """The base model the target was derived from (single files, LoRAs; checked against the delta's record)."""
    lora: str | None = None
    """A LoRA file fused into the target (``base`` + ``lora``: a LoRA fine-tune)."""
    lora_scale: float = 1.0
    controlnet: str | None = None
    """A ControlNetModel folder (default: ``controlnet/`` in the target folder, if any)."""
    control_images: Any = None
    """Folder of control images or a tensor ``(M, C, H, W)`` in ``[-1, 1]``, cycled over the samples."""
    conditioning_scale: float = 1.0
    delta_extra: str | None = None
    """Another delta added too (the ``.rest.safetensors`` of a PeRFlow LoRA)."""
    delta_scale: float = 1.0
    steps: tuple[int, ...] = (4, 8)
    baselines: tuple[str, ...] = BASELINE_SAMPLERS
    spacings: tuple[str, ...] = TIMESTEP_SPACINGS
    num_samples: int = 256
    reference_steps: int = 100
    labels: list[int] | None = None
    prompts: list[str] | None = None
    guidance_scale: float | None = None
    seed: int = 0
    batch_size: int = 64
    resolution: int | None = None
    real_images: str | None = None
    classifier: str | None = None
    """Digit classifier folder: FD in its feature space (``fd_ref``); the shipped one for digits-derived targets."""
    output_dir: str | None = None
    """Writes ``transfer_report.json``, ``transfer_report.md`` and ``transfer_grid.png`` there."""
    command: str = ""


def read_delta(delta: Any, extra: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, metadata)`` of a delta file/folder or a PeRFlow LoRA file, plus ``extra`` (its rest)."""
    from perflow.delta import load_delta

    tensors, meta = (dict(delta[0]), dict(delta[1])) if isinstance(delta, tuple) else load_delta(delta)
    if extra is not None:
        more, more_meta = load_delta(extra)
        overlap = sorted(set(tensors) & set(more))
        if overlap:
            raise ValueError(f"the extra delta {str(extra)!r} repeats {len(overlap)} tensors of the delta (e.g. {overlap[0]})")
        tensors.update(more)
        meta = {**more_meta, **meta}
        meta["partial"] = bool(meta.get("partial")) and bool(more_meta.get("partial"))
    return tensors, meta


def accelerated_student(target, delta: dict, meta: dict, scale: float = 1.0):
    """A :class:`~perflow.evaluation.students.Student`: a copy of the target's denoiser with the delta
    merged into its UNet (a ControlNet stays as it is), sampled with the delta's PeRFlow scheduler."""
    from perflow.delta import merge_delta, perflow_scheduler_from_metadata
    from perflow.targets import base_unet
    from perflow.training.export import TEACHER_SAMPLING_KEY

    from .students import Student

    unet = copy.deepcopy(target.teacher.unet)
    merge_delta(base_unet(unet), delta, scale, metadata=meta)
    sched = perflow_scheduler_from_metadata(meta, base_config=target.teacher.schedule_config)
    config = {**sched.config, **({TEACHER_SAMPLING_KEY: meta["teacher_sampling"]} if meta.get("teacher_sampling") else {})}
    return Student(unet.eval(), config, getattr(target.teacher, "label_encoder", None), Path("target+delta"))


def resolve_target(config: TransferConfig):
    from perflow.targets import Target, load_target

    if isinstance(config.target, Target):
        return config.target
    return load_target(config.target, config.base, config.lora, config.lora_scale, config.controlnet,
                       config.control_images, config.conditioning_scale)


def transfer_report(config: TransferConfig, progress: bool = True) -> EvalResult:
    """Measure how the delta transfers to the target; ``result.meta["verdict"]`` is the one-line answer,
    ``meta["transfers"]`` its boolean. With ``output_dir`` the JSON, Markdown and sample grid are written."""
    from perflow.io import check_output_path
    from perflow.targets import check_delta_fits

    from .teacher_eval import TeacherEvalConfig, evaluate_teacher

    if config.output_dir is not None:
        check_output_path(config.output_dir, folder=True)
    if 4 not in config.steps:
        raise ValueError(f"the verdict is taken at 4 steps: include 4 in steps (got {list(config.steps)})")
    delta, meta = read_delta(config.delta, config.delta_extra)
    target = resolve_target(config)
    check_delta_fits(delta, meta, target.teacher.unet, target.base)
    student = accelerated_student(target, delta, meta, config.delta_scale)
    classifier = config.classifier
    if classifier is None and _digits_derived(meta, target):
        from perflow.builtin.classifier import WEIGHTS_DIR

        classifier = str(WEIGHTS_DIR)
    eval_config = TeacherEvalConfig(
        teacher=target.teacher, perflow=student, student_name=DELTA_ROW, labels=config.labels, prompts=config.prompts,
        steps=tuple(config.steps), baselines=tuple(config.baselines), spacings=tuple(config.spacings),
        num_samples=config.num_samples, reference_steps=config.reference_steps, guidance_scale=config.guidance_scale,
        resolution=config.resolution, seed=config.seed, batch_size=config.batch_size, real_images=config.real_images,
        classifier=classifier, control_images=target.control_images,
    )
    result = evaluate_teacher(eval_config, progress=progress)
    _rename_teacher_rows(result)
    result.meta.update({
        "target": target.name, "delta": _describe(config.delta), "delta_extra": config.delta_extra,
        "delta_scale": config.delta_scale, "delta_metadata": {k: meta.get(k) for k in ("num_time_windows", "prediction_type", "cfg_mode")},
        "command": config.command, "digits_derived": _digits_derived(meta, target),
    })
    result.meta.update(verdict(result))
    if config.output_dir is not None:
        write_transfer_report(result, config.output_dir)
    return result


def _digits_derived(meta: dict, target) -> bool:
    """Whether the delta was learned on the built-in digits teacher (its class and 10 labels), so the
    shipped digit classifier's features make sense for the target's samples."""
    name = str((meta.get("base_model") or {}).get("name", ""))
    return getattr(target.teacher, "kind", "") == "class" and ("digits" in name) and target.teacher.unet.config.in_channels == 1


def _describe(delta: Any) -> str:
    return "tensors" if isinstance(delta, tuple) else str(delta)


def _rename_teacher_rows(result: EvalResult) -> None:
    """``teacher X`` -> ``target X`` in rows, previews and straightness (the target plays the teacher here)."""
    def rn(name: str) -> str:
        return "target" + name[len("teacher"):] if name.startswith("teacher") else name

    for r in result.rows:
        r["sampler"] = rn(r["sampler"])
    result.previews = {rn(k): v for k, v in result.previews.items()}
    result.meta["straightness"] = {rn(k): v for k, v in result.meta.get("straightness", {}).items()}


def best_baseline(result: EvalResult, steps: int, metric: str = "paired_mse") -> dict | None:
    """The target's own solver row with the lowest ``metric`` at ``steps`` evaluations, or None."""
    rows = [r for r in result.rows if r["kind"] == "baseline" and r["steps"] == steps and metric in r]
    return min(rows, key=lambda r: r[metric]) if rows else None


def verdict(result: EvalResult) -> dict:
    """``{"verdict": one line, "transfers": bool, "comparisons": [...]}``: target + delta against the
    target's best own solver at each step count, on paired MSE and the distribution metrics."""
    comparisons, parts = [], []
    for n in sorted({r["steps"] for r in result.rows if r["sampler"] == DELTA_ROW}):
        ours = result.row(DELTA_ROW, n)
        for metric in ("paired_mse", "sw_ref", "fd_ref"):
            best = best_baseline(result, n, metric)
            if best is None or metric not in ours:
                continue
            label = f"{best['sampler']} [{best.get('spacing', '')}]"
            comparisons.append({"steps": n, "metric": metric, "delta": ours[metric], "best_solver": label,
                                "best_solver_value": best[metric], "delta_wins": ours[metric] < best[metric]})
    for c in comparisons:
        if c["metric"] == "paired_mse" or c["steps"] == 4:
            parts.append(f"{c['steps']} steps {c['metric']} {c['delta']:.4g} vs {c['best_solver']} {c['best_solver_value']:.4g}"
                         f" ({'better' if c['delta_wins'] else 'WORSE'})")
    straight = result.meta.get("straightness", {})
    mine = next((v for k, v in straight.items() if k.startswith(DELTA_ROW)), None)
    own = next((v for k, v in straight.items() if k.startswith("target ddim")), None)
    if mine and own:
        parts.append(f"straightness within windows {mine['within_windows']:.3f} (target + delta) vs {own['within_windows']:.3f} (target)")
    at4 = [c for c in comparisons if c["steps"] == 4 and c["metric"] == "paired_mse"]
    transfers = bool(at4) and at4[0]["delta_wins"]
    head = ("the delta TRANSFERS: target + delta at 4 steps beats the target's best 4-evaluation solver"
            if transfers else
            "the delta does NOT transfer: target + delta at 4 steps loses to the target's own best 4-evaluation solver; "
            "adapt it with `perflow delta adapt`")
    return {"verdict": f"{head}. " + "; ".join(parts), "transfers": transfers, "comparisons": comparisons}


def write_transfer_report(result: EvalResult, output_dir: str | os.PathLike) -> dict[str, Path]:
    """``transfer_report.json``, ``transfer_report.md`` and ``transfer_grid.png`` in ``output_dir``."""
    from perflow.io import write_text

    from .plots import save_sample_grid
    from .report import markdown_report

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "transfer_report.json", "md": out / "transfer_report.md", "grid": out / "transfer_grid.png"}
    write_text(files["json"], json.dumps(result.to_json_dict(), indent=2, default=str) + "\n")
    md = markdown_report(result, f"Transfer report: {result.meta.get('target')}")
    md = md.replace("teacher ref", "target ref").replace("reference: teacher DDIM", "reference: target DDIM")
    write_text(files["md"], md + f"\nVerdict: {result.meta['verdict']}\n")
    ref = next(k for k in result.previews if k.startswith("target ddim@") and k.endswith(f"@{result.meta['reference_steps']}"))
    names = [ref]
    for n in result.meta["steps"]:
        names.append(f"{DELTA_ROW}@{n}")
        best = best_baseline(result, n)
        if best is not None:
            names.append(f"{best['sampler']}@{n}")
    names = [k for k in names if k in result.previews]
    save_sample_grid(result.previews, names, files["grid"], title=f"{result.meta.get('target')}: same noise, same conditions",
                     invert=bool(result.meta.get("digits_derived")))
    return files


__all__ = ["TransferConfig", "transfer_report", "verdict", "best_baseline", "write_transfer_report", "read_delta",
           "accelerated_student"]
