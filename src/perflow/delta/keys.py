"""Named tensors: which model they belong to, how two sets of them match, and their fingerprints.

A model's denoiser and its state dict, the comparison of two key sets (missing, extra,
shape mismatches) and the matching of a delta to a model that may carry adapter tensors
(IP-Adapter, unfused LoRA), SHA-256 fingerprints of a config, a key set and a set of
weights, the config fields two models differ in, and the one test of whether a
scheduler config is a PeRFlow one.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from perflow.schedule import SCHEDULE_KEYS
from perflow.windows import PREDICTION_TYPES

BETA_KEYS = tuple(SCHEDULE_KEYS)
"""The beta-schedule keys a delta's PeRFlow scheduler takes from a base scheduler config: all of
:data:`perflow.schedule.SCHEDULE_KEYS`, ``rescale_betas_zero_snr`` included, so a zero-terminal-SNR
teacher's delta samples with the teacher's own ``abar`` (issue 8, defect 4)."""

StateDict = Mapping[str, torch.Tensor]

# Keys that adapters add on top of a base UNet (IP-Adapter processors and projection,
# unfused peft LoRA layers): the delta leaves them alone instead of calling them "extra".
_ADDON_PATTERNS = (
    re.compile(r"(^|\.)processor\."),
    re.compile(r"^encoder_hid_proj\."),
    re.compile(r"\.lora_(A|B|magnitude_vector|embedding_A|embedding_B)\."),
)
VOLATILE_CONFIG_KEYS = frozenset({"_name_or_path", "_diffusers_version", "_use_default_values", "_commit_hash"})
"""Config fields that name paths and library versions, not the model: left out of fingerprints and comparisons."""
MAX_LISTED = 12

# ----------------------------------------------------------------------------- state dicts


def denoiser_of(model: Any) -> Any:
    """The denoiser of ``model``: a pipeline's ``unet`` (or ``transformer``), else ``model`` itself."""
    if isinstance(model, Mapping) or isinstance(model, nn.Module):
        return model
    for name in ("unet", "transformer"):
        sub = getattr(model, name, None)
        if isinstance(sub, nn.Module):
            return sub
    raise TypeError(
        f"expected an nn.Module, a state dict or a diffusers pipeline with a UNet, got {type(model).__name__}"
    )


def state_dict_of(model: Any) -> dict[str, torch.Tensor]:
    """The denoiser's tensors by name (a module's ``state_dict()``, a mapping as is)."""
    model = denoiser_of(model)
    if isinstance(model, nn.Module):
        return dict(model.state_dict())
    bad = [k for k, v in model.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"state dict values must be tensors; not tensors: {key_listing(bad)}")
    return dict(model)


def key_listing(keys: list[str]) -> str:
    """Sorted keys, comma-separated, cut after :data:`MAX_LISTED` with the total: for error messages."""
    keys = sorted(keys)
    shown = ", ".join(keys[:MAX_LISTED])
    return f"{shown} ... ({len(keys)} in all)" if len(keys) > MAX_LISTED else shown


def _is_addon(key: str) -> bool:
    return any(p.search(key) for p in _ADDON_PATTERNS)


def _base_key(key: str) -> str:
    """``a.to_q.base_layer.weight -> a.to_q.weight`` (a peft-wrapped layer's base weight)."""
    return key.replace(".base_layer.", ".")


@dataclass
class KeyReport:
    """How two key sets compare: keys only in the delta, only in the model, and shape mismatches."""

    missing: list[str] = field(default_factory=list)  # in the delta/student, not in the model/teacher
    extra: list[str] = field(default_factory=list)  # in the model/teacher, not in the delta/student
    shape: list[str] = field(default_factory=list)  # "key: (a, b) vs (c, d)"

    def __bool__(self) -> bool:
        return bool(self.missing or self.extra or self.shape)

    def describe(self, left: str, right: str) -> str:
        lines = []
        if self.missing:
            lines.append(f"{len(self.missing)} key(s) in the {left} but not in the {right}: {key_listing(self.missing)}")
        if self.extra:
            lines.append(f"{len(self.extra)} key(s) in the {right} but not in the {left}: {key_listing(self.extra)}")
        if self.shape:
            lines.append(f"{len(self.shape)} shape mismatch(es): {key_listing(self.shape)}")
        return "; ".join(lines)


def compare_keys(left: StateDict, right: StateDict) -> KeyReport:
    """Keys of ``left`` missing from ``right``, keys of ``right`` missing from ``left``, shape mismatches."""
    report = KeyReport(
        missing=[k for k in left if k not in right],
        extra=[k for k in right if k not in left],
    )
    for k in left:
        if k in right and tuple(left[k].shape) != tuple(right[k].shape):
            report.shape.append(f"{k}: {tuple(left[k].shape)} vs {tuple(right[k].shape)}")
    return report


def plan_merge(
    model_sd: StateDict, delta: StateDict, partial: bool = False
) -> tuple[dict[str, str], KeyReport, list[str], list[str]]:
    """Match delta keys to model keys.

    Returns ``(mapping delta key -> model key, problems, add-on keys, uncovered keys)``.
    A model tensor the delta does not cover is a problem ("extra") unless the delta is
    ``partial`` by design (the non-LoRA rest of a LoRA export), then it is listed as
    uncovered. Model keys of adapters (IP-Adapter processors, ``encoder_hid_proj``,
    unfused LoRA layers) are add-ons the delta does not touch; a peft-wrapped
    ``x.base_layer.weight`` takes the delta of ``x.weight``.
    """
    by_base: dict[str, str] = {}
    addons: list[str] = []
    for k in model_sd:
        if _is_addon(k):
            addons.append(k)
        else:
            by_base[_base_key(k)] = k
    mapping: dict[str, str] = {}
    report = KeyReport()
    for k, d in delta.items():
        mk = by_base.get(k)
        if mk is None:
            report.missing.append(k)
        elif tuple(model_sd[mk].shape) != tuple(d.shape):
            report.shape.append(f"{k}: delta {tuple(d.shape)} vs model {tuple(model_sd[mk].shape)}")
        else:
            mapping[k] = mk
    skip = {by_base[k] for k in delta if k in by_base} | set(addons)
    uncovered = [mk for mk, v in model_sd.items() if mk not in skip and v.is_floating_point()]
    if not partial:
        report.extra, uncovered = uncovered, []
    return mapping, report, addons, uncovered


# ----------------------------------------------------------------------------- fingerprints and configs


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """SHA-256 (16 hex digits) of a diffusers model config, ignoring paths and library versions."""
    clean = {k: v for k, v in dict(config).items() if k not in VOLATILE_CONFIG_KEYS}
    blob = json.dumps(clean, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def keys_fingerprint(sd: StateDict) -> str:
    """SHA-256 (16 hex digits) of the sorted ``name:shape`` list: the architecture as the weights see it."""
    blob = "\n".join(f"{k}:{tuple(sd[k].shape)}" for k in sorted(sd)).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def weights_sha256(sd: StateDict) -> str:
    """SHA-256 (16 hex digits) over names, dtypes, shapes and bytes of every tensor, in sorted name order."""
    h = hashlib.sha256()
    for k in sorted(sd):
        v = sd[k].detach().cpu().contiguous()
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()[:16]


def config_differences(left: Mapping[str, Any], right: Mapping[str, Any]) -> list[str]:
    """Sorted config fields (paths and library versions ignored) whose values differ between two configs."""
    keys = (set(left) | set(right)) - VOLATILE_CONFIG_KEYS

    def enc(config: Mapping[str, Any], k: str) -> str:
        return json.dumps(config.get(k), sort_keys=True, default=str)

    return sorted(k for k in keys if enc(left, k) != enc(right, k))


def is_perflow_scheduler_config(config: Any) -> bool:
    """Whether a scheduler config dict configures a ``PeRFlowScheduler``.

    True when its ``_class_name`` names PeRFlow, or, since ``dict(scheduler.config)`` carries
    no class name, when its keys are PeRFlow's own: a PeRFlow ``prediction_type``
    (``diff_eps``, ``ddim_eps``, ``velocity``) together with ``num_time_windows`` or
    ``window_boundaries``.
    """
    if not isinstance(config, Mapping):
        return False
    if "PeRFlow" in str(config.get("_class_name") or ""):
        return True
    has_windows = config.get("num_time_windows") is not None or config.get("window_boundaries") is not None
    return config.get("prediction_type") in PREDICTION_TYPES and has_windows
