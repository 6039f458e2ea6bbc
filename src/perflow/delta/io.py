"""Deltas on disk: the perflow delta file, the released delta folder, a LoRA read back, model folders.

A perflow delta is one ``.safetensors`` file of fp32 (or fp64) tensors whose header
records what the delta was learned on (:mod:`perflow.delta.metadata`). :func:`load_delta`
also reads the released SD1.5 format (a diffusers UNet folder whose weights are the
deltas, :func:`load_delta_folder`) and a LoRA written by ``perflow delta to-lora`` (as its
low-rank delta). A diffusers **model folder** is ``config.json`` +
``diffusion_pytorch_model*.safetensors`` (sharded or not, one file set per weight
variant), by itself or as a pipeline's ``unet/``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from perflow import __version__
from perflow.io import read_json, read_safetensors, read_scheduler_config, save_safetensors

from .keys import is_perflow_scheduler_config, key_listing
from .lora import lora_file_to_delta
from .metadata import FORMAT, decode_metadata, encode_metadata, scheduler_metadata

# ----------------------------------------------------------------------------- delta files


def save_delta(delta: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``delta`` (fp32) to a ``.safetensors`` file atomically, metadata values JSON-encoded.

    Recommended metadata keys: ``base_model`` (see :func:`perflow.delta.base_model_info`),
    ``num_time_windows``, ``prediction_type``, ``cfg_mode``, ``window_boundaries``,
    ``scheduler_config`` (the ``PeRFlowScheduler`` config dict, e.g. ``dict(scheduler.config)``:
    its ``_class_name`` is added when missing); ``format`` and ``perflow_version`` are filled in.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"a delta is written as safetensors: give a path ending in .safetensors, got {str(path)!r}")
    bad = [k for k, v in delta.items() if not isinstance(v, torch.Tensor) or not v.is_floating_point()]
    if bad:
        raise ValueError(f"delta values must be floating-point tensors; offending keys: {key_listing(bad)}")
    meta = {"format": FORMAT, "perflow_version": __version__}
    meta.update(metadata or {})
    sched = meta.get("scheduler_config")
    if is_perflow_scheduler_config(sched) and not sched.get("_class_name"):
        meta["scheduler_config"] = {"_class_name": "PeRFlowScheduler", **dict(sched)}
    keep = (torch.float32, torch.float64)
    tensors = {k: v if v.dtype in keep else v.float() for k, v in delta.items()}
    save_safetensors(tensors, path, encode_metadata(meta))
    return path


def load_delta(path: str | os.PathLike, variant: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a delta and its metadata.

    Accepts a ``.safetensors`` file written by :func:`save_delta` (or any
    safetensors file of deltas), or a released-format folder: a diffusers UNet
    folder whose weights are the deltas (``config.json`` +
    ``diffusion_pytorch_model.safetensors``), or a folder holding such a
    ``unet/``. For folders the metadata holds ``format``, the UNet ``config`` and,
    when a ``scheduler/`` folder is present, its config as ``scheduler_config``.
    A LoRA written by ``perflow delta to-lora`` is read back as its low-rank delta
    ``B A`` (metadata ``"partial": true``: it carries no biases or norms).
    ``variant``: which weights of a folder holding several (``"fp16"``, ...); a folder with
    more than one variant and no ``variant`` is refused with the variants it holds.
    A truncated or damaged file is a ``ValueError`` naming it.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no delta at {str(path)!r}")
    if path.is_dir():
        return load_delta_folder(path, variant=variant)
    if variant is not None:
        raise ValueError(f"variant={variant!r} selects weights of a delta folder, but {str(path)!r} is a single file; drop it")
    if path.suffix != ".safetensors":
        raise ValueError(
            f"{str(path)!r} is not a safetensors file; perflow never unpickles weights. "
            "Convert it to .safetensors first (e.g. with safetensors.torch.save_file after a weights_only load)."
        )
    tensors, raw = read_safetensors(path)
    if any(".lora_A." in k or ".lora_down." in k for k in tensors):
        return lora_file_to_delta(tensors, raw, path)
    return tensors, decode_metadata(raw)


# ----------------------------------------------------------------------------- model folders


def model_folder(path: str | os.PathLike) -> Path:
    """The diffusers model folder of ``path``: ``path`` itself or its ``unet/`` (``transformer/`` for SD3, Flux) subfolder."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no model folder at {str(path)!r}")
    for cand in (path, path / "unet", path / "transformer"):
        if (cand / "config.json").is_file() and list(cand.glob("diffusion_pytorch_model*.safetensors")):
            return cand
    hint = " (pickled .bin weights are not read: re-save them as safetensors)" if list(path.rglob("*.bin")) else ""
    raise ValueError(
        f"{str(path)!r} is neither a diffusers model folder (config.json + diffusion_pytorch_model.safetensors) "
        f"nor a pipeline folder with such a unet/ or transformer/ subfolder{hint}"
    )


_SHARD = re.compile(r"-\d{5}-of-\d{5}(?=\.safetensors$)")


def weight_files(folder: str | os.PathLike) -> dict[str, list[Path]]:
    """A model folder's safetensors weights by variant: ``""`` (default), ``"fp16"``, ...; shards listed together."""
    groups: dict[str, list[Path]] = {}
    for f in sorted(Path(folder).glob("diffusion_pytorch_model*.safetensors")):
        stem = _SHARD.sub("", f.name)[: -len(".safetensors")]  # diffusion_pytorch_model[.variant]
        groups.setdefault(stem[len("diffusion_pytorch_model"):].lstrip("."), []).append(f)
    return groups


def read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    """The tensors of one variant's (possibly sharded) safetensors files (a damaged file is an error naming it)."""
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(read_safetensors(f)[0])
    return sd


def variant_listing(groups: Mapping[str, list[Path]]) -> str:
    """``default (a.safetensors), fp16 (a.fp16.safetensors)``: the weight variants of a folder, for messages."""
    return ", ".join(f"{v or 'default'} ({', '.join(f.name for f in files)})" for v, files in sorted(groups.items()))


def read_model_folder(path: str | os.PathLike, variant: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state dict, config)`` of a model folder (or a pipeline's ``unet/``), read from safetensors.

    ``variant``: which weights when the folder holds several (``"fp16"``, ...); default the
    plain ``diffusion_pytorch_model*.safetensors``, else the only variant there is.
    """
    folder = model_folder(path)
    groups = weight_files(folder)
    if variant is None:
        if "" not in groups and len(groups) > 1:
            raise ValueError(f"{str(folder)!r} holds weight variants {variant_listing(groups)}; say which one to read")
        variant = "" if "" in groups else next(iter(groups))
    if variant not in groups:
        raise ValueError(f"{str(folder)!r} has no {variant!r} weights; it has {variant_listing(groups)}")
    return read_weights(groups[variant]), read_json(folder / "config.json")


# ----------------------------------------------------------------------------- released delta folders


def load_delta_folder(path: str | os.PathLike, variant: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The released SD1.5 delta format: a diffusers UNet folder (or a folder with ``unet/``) of deltas.

    Metadata: ``format = "diffusers_unet_delta"``, ``source``, ``unet_config`` and, when a
    ``scheduler/`` folder sits beside it, that config's PeRFlow settings. A folder holding
    several weight variants (``diffusion_pytorch_model.safetensors`` and ``...fp16.safetensors``)
    needs ``variant`` (``"fp16"``; ``""`` for the default file): the variants differ in
    precision, so picking one silently would be a guess.
    """
    root = Path(path)
    try:
        folder = model_folder(root)
    except ValueError as err:
        raise ValueError(
            f"{str(root)!r} is not a released delta folder: expected config.json and "
            f"diffusion_pytorch_model.safetensors in it or in its unet/ subfolder; "
            f"perflow never unpickles weights ({err})"
        ) from None
    groups = weight_files(folder)
    if variant is None and len(groups) > 1:
        named = sorted(v for v in groups if v)
        raise ValueError(
            f"the delta folder {str(folder)!r} holds weight variants {variant_listing(groups)}; say which one: "
            f"variant={named[0]!r} (CLI: --variant {named[0]}), or variant='' for the default file"
        )
    sd, config = read_model_folder(folder, variant=variant)
    meta: dict[str, Any] = {"format": "diffusers_unet_delta", "source": str(root), "unet_config": config}
    if variant:
        meta["variant"] = variant
    for where in (root, folder.parent):
        sched = read_scheduler_config(where)
        if sched is not None:
            meta.update(scheduler_metadata(sched))
            break
    return sd, meta
