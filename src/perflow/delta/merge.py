"""Extracting and merging: ``delta = student - teacher`` and ``merged = model + scale * delta``.

    delta[name] = student[name] - teacher[name]        (fp32, tensor by tensor, whole denoiser)
    merged[name] = cast_to_model_dtype(fp32(target[name]) + scale * delta[name])

A merge checks before it writes: the delta's keys and shapes against the model's
(:func:`perflow.delta.keys.plan_merge`), a finite ``scale``, finite delta values, that the delta is not
a whole model (:func:`delta_model_similarity`) and the model's config against the teacher config the
delta records. A pipeline also gets the PeRFlow
scheduler the delta's metadata names (:func:`perflow_scheduler_from_metadata`).

Bit-exactness, for a student weight ``s`` and teacher weight ``t`` (both fp32):

- fp32 delta ``d = fl32(s - t)``: ``fl32(t + d) == s`` whenever any fp32 delta can
  give ``s`` (``d`` is the fp32 number nearest the exact difference); always when
  ``s - t`` is exact in fp32, e.g. ``t/2 <= s <= 2 t`` (Sterbenz). The weights left
  (one that shrinks towards zero or changes sign, so ``|d| > |s|`` and the fp32 deltas
  near ``s - t`` are spaced no finer than the fp32 numbers near ``s``) come back
  within one ulp of ``d``.
- fp64 delta (``dtype=torch.float64``) ``d = fl64(s - t)``, merged in fp64 and rounded
  once: ``fl32(fl64(t + d)) == s`` whenever ``|s| >= 2^-28 |t|`` (then either ``s - t``
  fits in 53 bits, so ``d`` is exact and ``t + d = s`` exactly, or ``|t| < 2^-28 |s|`` and
  the fp64 roundings stay far below half an fp32 ulp of ``s``). A weight that shrinks by
  more than ``2^28`` (about 2.7e8) loses bits in ``d`` itself: the fp64 sum is within
  ``2^-52 (|s| + |t|)`` of ``s`` and may round to another fp32 number (or 0).
  (``tests/test_delta.py`` checks both statements on 200k weights across magnitudes.)
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from .io import load_delta
from .keys import (
    BETA_KEYS,
    KeyReport,
    StateDict,
    compare_keys,
    config_differences,
    denoiser_of,
    is_perflow_scheduler_config,
    key_listing,
    plan_merge,
    state_dict_of,
)
from .metadata import SCHEDULER_SETTINGS, recorded_config

# ----------------------------------------------------------------------------- extraction


def extract_delta(student: Any, teacher: Any, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``delta[name] = student[name] - teacher[name]`` in fp32 over every floating-point tensor.

    ``student`` and ``teacher`` are modules, state dicts or pipelines (their ``unet``).
    Key sets and shapes must match exactly; otherwise a ``ValueError`` lists the
    missing and extra keys and the shape mismatches. Integer buffers must be equal
    and are left out. ``fl32(student - teacher)`` is the fp32 number nearest the
    exact difference, so whenever some fp32 delta reproduces a student weight under
    ``teacher + delta``, this one does (see the module docstring).
    ``dtype=torch.float64`` stores ``fl64(student - teacher)`` (twice the size), exact and
    merging back to the fp32 student bit for bit wherever ``|student| >= 2^-28 |teacher|``;
    a weight that shrank by more than that comes back within ``2^-52 (|s| + |t|)`` before
    the final rounding to fp32 (see the module docstring).
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"a delta is stored in float32 or float64, got {dtype}")
    s_sd, t_sd = state_dict_of(student), state_dict_of(teacher)
    report = compare_keys(s_sd, t_sd)
    if report:
        raise ValueError(
            "student and teacher do not share an architecture: "
            + report.describe("student", "teacher")
            + ". The student must be a trained copy of the teacher (same class and config)."
        )
    delta: dict[str, torch.Tensor] = {}
    for name, s in s_sd.items():
        t = t_sd[name]
        if not s.is_floating_point():
            if not torch.equal(s, t.to(s.device)):
                raise ValueError(f"non-floating tensor {name!r} differs between student and teacher")
            continue
        delta[name] = s.detach().cpu().to(dtype) - t.detach().cpu().to(dtype)
    return delta


# ----------------------------------------------------------------------------- merging


@dataclass
class MergeReport:
    """What a merge did: tensors changed, delta keys skipped (``strict=False`` only), model keys left alone."""

    merged: int = 0
    skipped: KeyReport = field(default_factory=KeyReport)
    untouched_addons: list[str] = field(default_factory=list)
    uncovered: list[str] = field(default_factory=list)  # model keys a partial delta leaves alone


def _check_plan(report: KeyReport, strict: bool) -> None:
    if report and strict:
        raise ValueError(
            "the delta does not fit this model: "
            + report.describe("delta", "model")
            + ". Apply it to a model of the architecture it was extracted from; "
            "to skip the mismatched tensors on purpose pass strict=False (CLI: --allow-partial)."
        )
    if report:
        warnings.warn("partial merge (strict=False), skipped: " + report.describe("delta", "model"), stacklevel=4)


def check_scale(scale: float) -> float:
    """A merge's ``scale``: a finite real number (NaN or infinity would write a NaN/inf model)."""
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a number, got {scale!r}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}; it would write a model of NaN/inf weights")
    return float(scale)


def _check_finite(delta: StateDict, keys: Any) -> None:
    bad = [k for k in keys if not bool(torch.isfinite(delta[k]).all())]
    if bad:
        raise ValueError(
            f"the delta holds NaN or infinite values in {len(bad)} tensor(s): {key_listing(bad)}; "
            "it is damaged or its training diverged: re-extract it from a healthy student"
        )


def delta_model_similarity(model_sd: StateDict, delta: StateDict, mapping: Mapping[str, str]) -> tuple[float, float]:
    """``(||d|| / ||w||, cos(d, w))`` over the matched weight matrices and kernels (dim >= 2), in fp64.

    A weight difference ``d = student - teacher`` of a fine-tuned model is small beside the weights
    and not aligned with them; the weights of a whole model of the same base are the size of the
    model's own and nearly parallel to them (``cos`` near 1). ``(0, 0)`` when nothing is matched.
    """
    dd = ww = dw = 0.0
    for dk, mk in mapping.items():
        d, w = delta[dk], model_sd[mk]
        if d.dim() < 2 or not d.is_floating_point():
            continue
        d64, w64 = d.detach().to("cpu", torch.float64), w.detach().to("cpu", torch.float64)
        dd += float(d64.square().sum())
        ww += float(w64.square().sum())
        dw += float((d64 * w64).sum())
    if dd == 0.0 or ww == 0.0:
        return 0.0, 0.0
    return math.sqrt(dd / ww), dw / math.sqrt(dd * ww)


def _check_not_a_model(model_sd: StateDict, delta: StateDict, mapping: Mapping[str, str]) -> None:
    """Refuse a whole model given as the delta: merging it would double the target's weights."""
    size, cos = delta_model_similarity(model_sd, delta, mapping)
    if size > 0.5 and cos > 0.5:
        raise ValueError(
            f"the delta looks like a whole model, not a weight difference: its weights are {size:.0%} the size of the "
            f"model's and point along them (cosine {cos:.2f}), so merging would roughly double the model; a delta is "
            "student - teacher: make one with `perflow delta extract --student STUDENT --teacher TEACHER -o delta.safetensors` "
            "(Python: extract_delta), or use the PeRFlow model itself"
        )


def _checked_plan(
    model_sd: StateDict, delta: StateDict, scale: float, strict: bool, partial: bool
) -> tuple[dict[str, str], MergeReport]:
    """Every check a merge makes before it writes (the module docstring), then the delta key -> model key
    mapping and the merge's report."""
    check_scale(scale)
    mapping, report, addons, uncovered = plan_merge(model_sd, delta, partial)
    _check_plan(report, strict)
    _check_finite(delta, mapping)
    _check_not_a_model(model_sd, delta, mapping)
    return mapping, MergeReport(len(mapping), report, addons, uncovered)


def merge_state_dict(
    model_sd: StateDict, delta: StateDict, scale: float = 1.0, strict: bool = True, partial: bool = False
) -> tuple[dict[str, torch.Tensor], MergeReport]:
    """``merged = cast(fp32(model) + scale * delta)`` for every matched tensor; others copied unchanged."""
    mapping, merge_report = _checked_plan(model_sd, delta, scale, strict, partial)
    out = dict(model_sd)
    for dk, mk in mapping.items():
        w = model_sd[mk]
        out[mk] = _add(w, delta[dk], scale)
    return out, merge_report


def _add(w: torch.Tensor, d: torch.Tensor, scale: float) -> torch.Tensor:
    """``cast(w + scale d)`` computed in fp32, or in fp64 for an fp64 delta."""
    acc = torch.promote_types(torch.float32, d.dtype)
    d_ = d.to(device=w.device, dtype=acc)
    merged = w.to(acc) + d_ if scale == 1.0 else w.to(acc) + scale * d_
    return merged.to(w.dtype)


def merge_into_module(
    module: nn.Module, delta: StateDict, scale: float = 1.0, strict: bool = True, partial: bool = False
) -> MergeReport:
    """Add ``scale * delta`` to ``module``'s parameters and buffers in place (fp32 sum, cast back)."""
    sd = module.state_dict(keep_vars=True)
    mapping, merge_report = _checked_plan(sd, delta, scale, strict, partial)
    with torch.no_grad():
        for dk, mk in mapping.items():
            p = sd[mk]
            p.copy_(_add(p.detach(), delta[dk], scale))
    return merge_report


def merge_delta(
    target: Any,
    delta: Mapping[str, torch.Tensor] | str | os.PathLike,
    scale: float = 1.0,
    *,
    metadata: Mapping[str, Any] | None = None,
    strict: bool = True,
    set_scheduler: bool = True,
    variant: str | None = None,
) -> Any:
    """Make ``target`` a PeRFlow model: ``target[name] += scale * delta[name]`` (fp32 sum, model dtype kept).

    ``target`` is a module (changed in place and returned), a state dict (a new
    merged dict is returned) or a diffusers pipeline: the delta goes into
    ``pipe.unet`` only (a ControlNet or IP-Adapter stays as it is) and, with
    ``set_scheduler``, ``pipe.scheduler`` becomes a ``PeRFlowScheduler`` built from
    the delta's metadata. ``delta`` is a tensor dict or a path for :func:`load_delta`
    (whose metadata is then used). ``strict=False`` skips mismatched keys with a
    warning listing them; the default refuses any mismatch. A delta whose metadata
    says ``"partial": true`` (the non-LoRA rest of a LoRA export) may leave model
    tensors uncovered. ``variant`` picks the weights of a released delta folder holding
    several (see :func:`load_delta`). A model whose config differs from the teacher config
    the delta records gets a warning naming the differing fields.
    """
    check_scale(scale)
    if isinstance(delta, (str, os.PathLike)):
        delta, file_meta = load_delta(delta, variant=variant)
        metadata = {**file_meta, **(metadata or {})}
    elif variant is not None:
        raise ValueError("variant= selects the weights of a delta folder; it needs a path, not a tensor dict")
    metadata = dict(metadata or {})
    partial = bool(metadata.get("partial", False))
    if isinstance(target, Mapping):
        merged, _ = merge_state_dict(target, delta, scale, strict, partial)
        return merged
    module = denoiser_of(target)
    check_family(type(module).__name__, metadata)
    check_base_config(getattr(module, "config", None), metadata)
    scheduler = getattr(target, "scheduler", None) if module is not target else None
    if scheduler is not None and not partial and is_perflow_scheduler_config(dict(scheduler.config)):
        import warnings

        warnings.warn("the pipeline already samples with the PeRFlow scheduler: if a delta is merged into it already, "
                      "this merge adds a second one", stacklevel=2)
    merge_into_module(module, delta, scale, strict, partial)
    if module is not target and set_scheduler:
        target.scheduler = perflow_scheduler_from_metadata(metadata, base_config=dict(target.scheduler.config))
    return target


MODEL_FAMILIES = {
    "UNet2DConditionModel": "Stable Diffusion UNet",
    "SD3Transformer2DModel": "SD3 (MMDiT) transformer",
    "FluxTransformer2DModel": "Flux transformer",
    "SanaTransformer2DModel": "SANA transformer",
}
"""Denoiser classes whose deltas never transfer to one another (a different architecture, not a fine-tune)."""


def check_family(model_class: str | None, metadata: Mapping[str, Any]) -> None:
    """Refuse to merge a delta learned on one model family into another (an SD3 delta into Flux, ...).

    The delta's family is its recorded teacher class (``base_model.class``); a delta without one (the
    released SD1.5 format) and classes outside :data:`MODEL_FAMILIES` are left to the key and shape checks.
    """
    base = metadata.get("base_model")
    recorded = base.get("class") if isinstance(base, Mapping) else None
    theirs, ours = MODEL_FAMILIES.get(recorded or ""), MODEL_FAMILIES.get(model_class or "")
    if theirs and ours and theirs != ours:
        raise ValueError(
            f"this delta was learned on a {theirs} ({recorded}) and cannot be merged into a {ours} ({model_class}): "
            f"a delta only applies to models of its teacher's architecture and lineage; merge it into a "
            f"{theirs}, or train a PeRFlow student of the {ours} teacher"
        )


def check_base_config(config: Mapping[str, Any] | None, metadata: Mapping[str, Any]) -> list[str]:
    """Warn when a model's config differs from the delta's recorded teacher config; return the differing fields.

    Same shapes do not make the same model: ``act_fn``, ``norm_eps`` and the like change what the
    weights compute. The warning names each differing field with both values.
    """
    recorded = recorded_config(metadata)
    if not recorded or config is None:
        return []
    ours = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    recorded = {k: v for k, v in recorded.items() if not k.startswith("_")}
    diff = config_differences(recorded, ours)
    if diff:
        shown = ", ".join(f"{k}: {recorded.get(k)!r} (delta's teacher) vs {ours.get(k)!r} (model)" for k in diff[:6])
        more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
        warnings.warn(
            f"the model's config differs from the delta's teacher in {diff}: {shown}{more}; "
            "the delta is meant for models of the same architecture and lineage",
            stacklevel=3,
        )
    return diff


# ----------------------------------------------------------------------------- scheduler


SD15_RELEASE_DEFAULTS = {"num_time_windows": 4, "prediction_type": "diff_eps"}


def perflow_scheduler_from_metadata(metadata: Mapping[str, Any], base_config: Mapping[str, Any] | None = None):
    """A ``PeRFlowScheduler`` for a merged model.

    Uses the delta's ``scheduler_config`` when it is a PeRFlow config; else the
    beta schedule of ``base_config`` (the pipeline's current scheduler) with the
    metadata's ``num_time_windows`` / ``prediction_type`` / ``window_boundaries``.
    A delta with neither (the released SD1.5 delta folder) gets the released SD1.5
    recipe (``K = 4``, ``diff_eps``), with a warning saying so.
    """
    from perflow.scheduler import PeRFlowScheduler

    sched = metadata.get("scheduler_config")
    if is_perflow_scheduler_config(sched):
        return PeRFlowScheduler.from_config(dict(sched))
    settings = {k: metadata[k] for k in SCHEDULER_SETTINGS if metadata.get(k) is not None}
    if "num_time_windows" not in settings or "prediction_type" not in settings:
        missing = {k: v for k, v in SD15_RELEASE_DEFAULTS.items() if k not in settings}
        warnings.warn(
            f"the delta's metadata does not name its PeRFlow scheduler settings {sorted(missing)}; "
            f"using the released SD1.5 recipe's {missing}. Pass metadata={{...}} to override.",
            stacklevel=3,
        )
        settings = {**missing, **settings}
    base = dict(sched if isinstance(sched, Mapping) else base_config or {})
    config = {k: base[k] for k in (*BETA_KEYS, "set_alpha_to_one") if k in base}
    config.update(settings)
    return PeRFlowScheduler(**config)
