"""What a delta file's header records, and its encoding.

safetensors metadata maps strings to strings: each value is JSON-encoded
(:func:`encode_metadata`, :func:`decode_metadata`). A delta records the teacher it was
learned on (:func:`base_model_info`: name, class, config and fingerprints of its config,
key set and weights), ``K``, the prediction type, the window boundaries and the PeRFlow
scheduler config (:func:`scheduler_metadata`), the CFG mode, ``format`` (:data:`FORMAT`)
and the perflow version.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from torch import nn

from .keys import (
    VOLATILE_CONFIG_KEYS,
    config_fingerprint,
    denoiser_of,
    is_perflow_scheduler_config,
    keys_fingerprint,
    state_dict_of,
    weights_sha256,
)

FORMAT = "perflow.delta.v1"
SCHEDULER_SETTINGS = ("num_time_windows", "prediction_type", "window_boundaries")
"""The metadata keys that name a delta's PeRFlow scheduler beside its full ``scheduler_config``."""


def encode_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """safetensors metadata must be ``str -> str``: every value is JSON-encoded."""
    return {str(k): json.dumps(v, sort_keys=True, default=str) for k, v in (metadata or {}).items()}


def decode_metadata(raw: Mapping[str, str] | None) -> dict[str, Any]:
    """Inverse of :func:`encode_metadata`; a value that is not JSON is kept as the string it is."""
    out: dict[str, Any] = {}
    for k, v in (raw or {}).items():
        try:
            out[k] = json.loads(v)
        except (TypeError, ValueError):
            out[k] = v
    return out


def base_model_info(teacher: Any, name: str | None = None, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Identity of the teacher for the delta's metadata.

    ``{"name", "class", "config_fingerprint", "config", "keys_fingerprint", "weights_sha256"}``;
    ``teacher`` is a module, pipeline or state dict (then pass its ``config`` if known).
    """
    model = denoiser_of(teacher)
    sd = state_dict_of(model)
    info: dict[str, Any] = {"keys_fingerprint": keys_fingerprint(sd), "weights_sha256": weights_sha256(sd)}
    if config is None and isinstance(model, nn.Module):
        config = getattr(model, "config", None)
    if config is not None:
        config = dict(config)
        info["class"] = config.get("_class_name") or type(model).__name__
        info["config_fingerprint"] = config_fingerprint(config)
        info["config"] = {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}
        name = name or config.get("_name_or_path")
    if name:
        info["name"] = str(name)
    return info


def recorded_config(metadata: Mapping[str, Any]) -> dict[str, Any] | None:
    """The teacher's model config a delta records (``base_model.config``, or a released folder's ``unet_config``)."""
    base = metadata.get("base_model")
    for config in (base.get("config") if isinstance(base, Mapping) else None, metadata.get("unet_config")):
        if isinstance(config, Mapping) and config:
            return dict(config)
    return None


def scheduler_metadata(config: Mapping[str, Any]) -> dict[str, Any]:
    """Delta metadata (``scheduler_config``, ``num_time_windows``, ``prediction_type``, ...) from a scheduler config."""
    meta: dict[str, Any] = {"scheduler_config": dict(config)}
    if is_perflow_scheduler_config(config):
        meta["scheduler_config"].setdefault("_class_name", "PeRFlowScheduler")
        for key in SCHEDULER_SETTINGS:
            if config.get(key) is not None:
                meta[key] = config[key]
    return meta
