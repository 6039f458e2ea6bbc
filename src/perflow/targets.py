"""Targets: the model a user wants to accelerate with a delta, and the checks that the delta fits it.

A target is a :class:`~perflow.training.teachers.Teacher` (its UNet, noise schedule, conditions and
VAE), so the evaluation harness and the trainer take it as they take a teacher. :func:`load_target`
builds it from

- a model folder (a fine-tuned SD/SDXL pipeline, a class-conditional teacher folder, a
  ``UNet2DModel`` folder) or a built-in teacher name;
- a single-file checkpoint (``.safetensors``, original SD layout) with ``base``: a pipeline folder
  that lends the UNet config and every other part;
- ``base`` plus a LoRA file (diffusers/peft format, keys ``unet.<module>.lora_A|B.weight``), fused
  into the UNet at ``lora_scale``;
- a ControlNet: a ``controlnet/`` folder in the target (a ``StableDiffusionControlNetPipeline``
  folder, or a teacher folder with one) or given apart; the target's UNet becomes a
  :class:`ControlledUNet` and its conditions carry the control image (:class:`ControlCondition`).

:func:`check_delta_fits` refuses, in one line naming what differs, a delta learned on another
base: other tensor names or shapes, another UNet config, or (when the base is known) other base
weights than the ``weights_sha256`` the delta records.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from .denoisers import Condition

CONTROLNET_SHARED_KEYS = (
    "in_channels", "block_out_channels", "down_block_types", "layers_per_block", "cross_attention_dim",
    "attention_head_dim", "num_attention_heads", "transformer_layers_per_block", "mid_block_type",
    "addition_embed_type", "class_embed_type", "encoder_hid_dim", "use_linear_projection",
)
"""UNet config fields a ControlNet must share with the UNet it drives (its residuals are added block by block)."""


@dataclass
class ControlCondition(Condition):
    """A :class:`~perflow.denoisers.Condition` plus the ControlNet's conditioning image ``(B, C, H, W)``."""

    controlnet_cond: torch.Tensor | None = None

    def unet_kwargs(self) -> dict:
        return {**super().unet_kwargs(), "controlnet_cond": self.controlnet_cond}


class ControlledUNet(nn.Module):
    """A UNet driven by a ControlNet, as ``StableDiffusionControlNetPipeline`` runs them: the ControlNet's
    down and mid residuals (times ``conditioning_scale``) are added to the UNet's skip connections.
    ``config`` is the UNet's, so code that reads a denoiser's config sees the UNet."""

    def __init__(self, unet: nn.Module, controlnet: nn.Module, conditioning_scale: float = 1.0):
        super().__init__()
        self.unet, self.controlnet, self.conditioning_scale = unet, controlnet, float(conditioning_scale)

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def forward(self, sample, timestep, encoder_hidden_states=None, controlnet_cond=None, added_cond_kwargs=None,
                return_dict: bool = True):
        if controlnet_cond is None:
            raise ValueError("a ControlNet target needs a control image with every condition (control_images)")
        down, mid = self.controlnet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=controlnet_cond.to(sample.dtype), conditioning_scale=self.conditioning_scale,
            added_cond_kwargs=added_cond_kwargs, return_dict=False,
        )
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=return_dict)


@dataclass
class ControlNetCondition(ControlCondition):
    """A :class:`ControlCondition` whose :meth:`forward` runs the ControlNet itself and then the model, a plain
    UNet, with its residuals added as :class:`ControlledUNet` (and diffusers' ControlNet pipeline) add them: the
    form training on a ControlNet target uses, where the student is the UNet alone and the ControlNet stays
    frozen outside the delta. The ControlNet and its scale are class attributes of the subclass
    :func:`control_condition_type` makes, so every operation of a condition (``to``, ``cat``, ``where``,
    ``select``, ``dataclasses.replace``) keeps them."""

    controlnet: ClassVar[nn.Module | None] = None
    conditioning_scale: ClassVar[float] = 1.0

    def forward(self, model: nn.Module, z: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if self.controlnet_cond is None or self.controlnet is None:
            raise ValueError("a ControlNet target needs a control image with every condition (control_images)")
        kwargs = Condition.unet_kwargs(self)
        dtype = next(self.controlnet.parameters()).dtype
        cast = {k: v.to(dtype) for k, v in kwargs.get("added_cond_kwargs", {}).items()} or None
        with torch.no_grad():  # frozen, and its inputs (z, t, condition) do not depend on the student
            down, mid = self.controlnet(
                z.to(dtype), timestep, encoder_hidden_states=kwargs["encoder_hidden_states"].to(dtype),
                controlnet_cond=self.controlnet_cond.to(dtype), conditioning_scale=self.conditioning_scale,
                added_cond_kwargs=cast, return_dict=False,
            )
        return model(z, timestep, **kwargs, down_block_additional_residuals=[d.to(z.dtype) for d in down],
                     mid_block_additional_residual=mid.to(z.dtype), return_dict=False)[0]


def control_condition_type(controlnet: nn.Module, conditioning_scale: float = 1.0) -> type:
    """The :class:`ControlNetCondition` subclass bound to ``controlnet`` at ``conditioning_scale``."""
    return type("BoundControlNetCondition", (ControlNetCondition,),
                {"controlnet": controlnet, "conditioning_scale": float(conditioning_scale)})


class _ControlNetTeacher:
    """Mixed into a teacher's class by :func:`controlnet_training_teacher`: its conditions carry the batch's
    control images and run the ControlNet (:class:`ControlNetCondition`); the null condition keeps them, as
    diffusers' ControlNet pipeline keeps the control image in the unconditional half of CFG."""

    _condition_type: type
    _controlnet: nn.Module

    def _attach(self, cond: Condition, images: torch.Tensor) -> Condition:
        plain = {f.name: getattr(cond, f.name) for f in dataclasses.fields(Condition)}
        return self._condition_type(**plain, controlnet_cond=images)

    def condition(self, batch: dict) -> Condition:
        if "control_image" not in batch:
            raise ValueError("a ControlNet target trains on items with a control image (`control_image`): adapt it "
                             "data-free, with its --control-images")
        return self._attach(super().condition(batch), batch["control_image"])

    def uncond(self, cond: Condition) -> Condition:
        return self._attach(super().uncond(cond), cond.controlnet_cond)

    def modules(self) -> dict[str, nn.Module]:
        return {**super().modules(), "controlnet": self._controlnet}


def controlnet_training_teacher(teacher: Any) -> Any:
    """A copy of ``teacher`` (its ``unet`` a :class:`ControlledUNet`) that trains the UNet alone: ``unet`` is the
    plain UNet (what the student copies and the delta covers) and every condition runs the frozen ControlNet
    (:class:`ControlNetCondition`) from the batch's ``control_image``."""
    wrapped = teacher.unet
    if not isinstance(wrapped, ControlledUNet):
        raise TypeError(f"{getattr(teacher, 'name', 'the teacher')!r} has no ControlNet")
    out = copy.copy(teacher)
    out.__class__ = type(f"ControlNet{type(teacher).__name__}", (_ControlNetTeacher, type(teacher)), {})
    out.unet, out._controlnet = wrapped.unet, wrapped.controlnet
    out._condition_type = control_condition_type(wrapped.controlnet, wrapped.conditioning_scale)
    return out


def base_unet(unet: nn.Module) -> nn.Module:
    """The UNet a delta goes into: the UNet of a :class:`ControlledUNet`, else ``unet`` itself."""
    return unet.unet if isinstance(unet, ControlledUNet) else unet


def with_control(cond: Condition, images: torch.Tensor) -> ControlCondition:
    """``cond`` with the control image of each sample (``images`` ``(B, C, H, W)``, one per row)."""
    if images.shape[0] != len(cond):
        raise ValueError(f"{images.shape[0]} control images for a batch of {len(cond)} conditions")
    fields = {f.name: getattr(cond, f.name) for f in dataclasses.fields(Condition)}
    return ControlCondition(**fields, controlnet_cond=images)


# ----------------------------------------------------------------------------- checks


def check_controlnet_fits(controlnet: nn.Module, unet: nn.Module, where: str = "the ControlNet") -> None:
    """Refuse a ControlNet built for another base: the fields of :data:`CONTROLNET_SHARED_KEYS` must agree."""
    ours, theirs = dict(unet.config), dict(controlnet.config)
    diff = [k for k in CONTROLNET_SHARED_KEYS if k in ours and k in theirs and _norm(ours[k]) != _norm(theirs[k])]
    if diff:
        shown = ", ".join(f"{k}: {theirs[k]!r} (ControlNet) vs {ours[k]!r} (UNet)" for k in diff[:4])
        raise ValueError(f"{where} does not match the target's UNet (its base differs): {shown}; "
                         "give the ControlNet trained for this base model")


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def check_delta_fits(delta: Mapping[str, torch.Tensor], metadata: Mapping[str, Any], unet: nn.Module,
                     base: nn.Module | None = None) -> None:
    """Refuse a delta that was not learned on this target's base, in one line naming what differs.

    - tensor names and shapes of the delta against the target UNet's (a partial delta, e.g. the
      low-rank part of a PeRFlow LoRA, need only cover a subset);
    - the UNet config against the teacher config the delta records;
    - with ``base`` (the base model the target was derived from, when known: a LoRA's base, ``--base``),
      its weights against the ``weights_sha256`` the delta records.
    """
    from .delta.keys import config_differences, plan_merge, weights_sha256
    from .delta.metadata import recorded_config

    unet = base_unet(unet)
    _, report, _, _ = plan_merge(unet.state_dict(), delta, bool(metadata.get("partial", False)))
    if report:
        raise ValueError("the delta was learned on another base model (architecture differs): "
                         + report.describe("delta", "target") + "; use a delta trained on the target's base")
    recorded = recorded_config(metadata)
    if recorded:
        ours = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
        diff = config_differences({k: v for k, v in recorded.items() if not k.startswith("_")}, ours)
        if diff:
            shown = ", ".join(f"{k}: {recorded.get(k)!r} (delta's base) vs {ours.get(k)!r} (target)" for k in diff[:4])
            raise ValueError(f"the delta was learned on another base model (UNet config differs): {shown}; "
                             "use a delta trained on the target's base")
    want = (metadata.get("base_model") or {}).get("weights_sha256") if isinstance(metadata.get("base_model"), Mapping) else None
    if base is not None and want:
        have = weights_sha256(base_unet(base).state_dict())
        if have != want:
            raise ValueError(f"the delta was learned on another base model: it records base weights {want}, the given "
                             f"base has {have}; use the delta trained on this base, or the base it was trained on")


# ----------------------------------------------------------------------------- LoRA and single files


LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
"""The file ``save_lora_weights`` writes in a LoRA folder."""


@dataclass
class LoRA:
    """A LoRA file's UNet part, as diffusers' pipelines load it: ``tensors`` in peft form (keys
    ``<module>.lora_A.weight`` / ``.lora_B.weight``), ``network_alphas`` (kohya files) and ``metadata`` (the
    peft ``LoraConfig`` of a file saved with ``unet_lora_adapter_metadata``: its ``lora_alpha``, ``rank_pattern``),
    both with diffusers' ``unet.`` key prefix, and the number of text-encoder tensors the file also holds."""

    tensors: dict[str, torch.Tensor]
    network_alphas: dict[str, float] | None
    metadata: dict | None
    text_encoder_tensors: int = 0


def lora_state_dict(path: str | Path, unet_config: Any = None) -> LoRA:
    """Read a LoRA file (or a folder holding ``pytorch_lora_weights.safetensors``) the way
    ``StableDiffusionPipeline.load_lora_weights`` does (``lora_state_dict``: peft, diffusers and kohya key
    forms, alphas, adapter metadata), from safetensors only; its UNet part in peft form."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_unet_state_dict_to_peft

    from .io import read_safetensors

    file = Path(path)
    if file.is_dir():
        if not (file / LORA_WEIGHT_NAME).is_file():
            raise FileNotFoundError(f"the LoRA folder {str(file)!r} has no {LORA_WEIGHT_NAME}; give the LoRA .safetensors file")
        file = file / LORA_WEIGHT_NAME
    read_safetensors(file)  # missing, pickled or damaged: one line naming the file
    sd, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
        str(file), use_safetensors=True, return_lora_metadata=True, unet_config=unet_config)
    prefix = "unet."
    unet = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not unet:  # a bare peft state dict of the UNet (no component prefix)
        unet = {k: v for k, v in sd.items() if ".lora_A." in k or ".lora_B." in k or ".lora.down." in k or ".lora.up." in k}
    if not unet:
        raise ValueError(f"{str(path)!r} holds no UNet LoRA tensors (keys 'unet.<module>.lora_A.weight'); "
                         "give a diffusers/peft LoRA file")
    text = sum(1 for k in sd if k.startswith(("text_encoder", "te_", "lora_te")))
    unet_alphas = {k: v for k, v in (alphas or {}).items() if k.startswith(prefix)} or None
    meta = {k: v for k, v in (metadata or {}).items() if k.startswith(prefix)} or None
    return LoRA(convert_unet_state_dict_to_peft(unet), unet_alphas, meta, text)


def check_lora_fits(lora: Mapping[str, torch.Tensor], unet: nn.Module, where: str = "the LoRA") -> None:
    """Refuse a LoRA whose modules are not in ``unet`` or whose factor shapes do not fit them, naming them."""
    from .delta.keys import key_listing

    modules = dict(unet.named_modules())
    missing, shapes = [], []
    for key, t in lora.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            missing.append(key)
            continue
        name = key.split(".lora_A.")[0] if ".lora_A." in key else key.split(".lora_B.")[0]
        mod = modules.get(name)
        weight = getattr(mod, "weight", None)
        if weight is None:
            missing.append(name)
            continue
        dim = weight.shape[1] if ".lora_A." in key else weight.shape[0]
        if t.shape[1 if ".lora_A." in key else 0] != dim:
            shapes.append(f"{key} {tuple(t.shape)} vs weight {tuple(weight.shape)}")
    if missing or shapes:
        parts = ([f"modules not in the target's UNet: {key_listing(sorted(set(missing)))}"] if missing else []) + \
                ([f"shapes that do not fit: {', '.join(shapes[:3])}"] if shapes else [])
        raise ValueError(f"{where} keys do not match the target's UNet ({'; '.join(parts)}); "
                         "give a LoRA trained on this base model")


def fuse_lora(unet: nn.Module, path: str | Path, scale: float = 1.0) -> nn.Module:
    """Fuse the LoRA file ``path`` into ``unet`` at ``scale`` as ``pipe.load_lora_weights`` + ``pipe.fuse_lora``
    do for the UNet (its alphas and adapter metadata honoured); a LoRA's text-encoder layers are not applied
    (the target's text encoder stays the base's), which is warned about."""
    import warnings

    lora = lora_state_dict(path, getattr(unet, "config", None))
    check_lora_fits(lora.tensors, unet, f"the LoRA {str(path)!r}")
    if lora.text_encoder_tensors:
        warnings.warn(f"the LoRA {str(path)!r} also holds {lora.text_encoder_tensors} text-encoder tensors; only its "
                      "UNet layers are fused into the target (its text encoder stays the base's)", stacklevel=2)
    unet.load_lora_adapter({f"unet.{k}": v for k, v in lora.tensors.items()}, prefix="unet", adapter_name="target_lora",
                           network_alphas=lora.network_alphas, metadata=lora.metadata)
    unet.fuse_lora(lora_scale=scale)
    unet.unload_lora()
    return unet


def load_single_file_unet(path: str | Path, like: nn.Module) -> nn.Module:
    """A copy of ``like`` (the base UNet) with the UNet weights of a single-file SD checkpoint."""
    from .delta.formats import ldm_unet_key_map
    from .io import read_safetensors

    full, _ = read_safetensors(path)
    try:
        key_map = ldm_unet_key_map(list(full), dict(like.config))
    except (KeyError, ValueError) as err:
        raise ValueError(f"{str(path)!r} is not a single-file checkpoint of the base's UNet ({err}); "
                         "give the checkpoint of a model fine-tuned from --base") from None
    own = like.state_dict()
    missing = sorted(k for k in own if k not in key_map or key_map[k] not in full)
    bad = [k for k in own if k in key_map and key_map[k] in full and full[key_map[k]].shape != own[k].shape]
    if missing or bad:
        raise ValueError(f"{str(path)!r} does not hold the base's UNet: {len(missing)} tensors missing, "
                         f"{len(bad)} of another shape (e.g. {(missing + bad)[0]}); give a checkpoint fine-tuned from --base")
    unet = copy.deepcopy(like)
    unet.load_state_dict({k: full[key_map[k]].to(own[k].dtype) for k in own})
    return unet


# ----------------------------------------------------------------------------- loading


@dataclass
class Target:
    """A target model: the :class:`~perflow.training.teachers.Teacher` to sample and train with, its
    name for reports, the base it was derived from when known, and its control images (ControlNet)."""

    teacher: Any
    name: str
    base: nn.Module | None = None
    control_images: torch.Tensor | None = None
    """``(M, C, H, W)`` in ``[-1, 1]``, cycled over the samples; ControlNet targets only."""


def load_target(
    target: Any,
    base: str | None = None,
    lora: str | None = None,
    lora_scale: float = 1.0,
    controlnet: str | None = None,
    control_images: Any = None,
    conditioning_scale: float = 1.0,
) -> Target:
    """Build a :class:`Target` (see the module docstring for the forms ``target`` may take)."""
    from .evaluation.teacher_eval import resolve_teacher

    base_teacher = resolve_teacher(base)[0] if base is not None else None
    path = Path(str(target)) if isinstance(target, (str, Path)) else None
    if path is not None and path.is_file():
        if base_teacher is None:
            raise ValueError(f"{str(path)!r} is a single-file checkpoint: give --base, the pipeline folder of the model "
                             "it was fine-tuned from (it lends the UNet config, VAE and text encoder)")
        teacher, name = copy.copy(base_teacher), path.name
        teacher.unet = load_single_file_unet(path, base_teacher.unet).eval().requires_grad_(False)
    elif target is None:
        if base_teacher is None:
            raise ValueError("give a target model, or --base with --lora")
        teacher, name = copy.copy(base_teacher), str(base)
        teacher.unet = copy.deepcopy(base_teacher.unet)
    else:
        teacher, name, _ = resolve_teacher(target)
    if lora is not None:
        fuse_lora(teacher.unet, lora, lora_scale)
        name = f"{name} + LoRA {Path(lora).name}"
    cn_folder = Path(controlnet) if controlnet is not None else (path / "controlnet" if path is not None and path.is_dir() else None)
    images = None
    if cn_folder is not None and (controlnet is not None or cn_folder.is_dir()):
        from diffusers import ControlNetModel

        from .io import check_weight_files, require_safetensors

        if not (cn_folder / "config.json").is_file():
            raise FileNotFoundError(f"no ControlNet at {str(cn_folder)!r} (config.json missing); give a ControlNetModel folder")
        require_safetensors(cn_folder, "the ControlNet")
        check_weight_files(cn_folder)  # a damaged file: one line naming it
        cn = ControlNetModel.from_pretrained(cn_folder, use_safetensors=True).eval().requires_grad_(False)
        check_controlnet_fits(cn, teacher.unet, f"the ControlNet {str(cn_folder)!r}")
        teacher.unet = ControlledUNet(teacher.unet, cn, conditioning_scale).eval().requires_grad_(False)
        if control_images is None:
            raise ValueError("a ControlNet target needs control images: give --control-images DIR (one per sample, cycled)")
        images = _control_tensor(control_images, cn)
        name = f"{name} + ControlNet"
    elif control_images is not None:
        raise ValueError("control images were given but the target has no ControlNet (--controlnet, or controlnet/ in the target)")
    return Target(teacher=teacher, name=name, base=None if base_teacher is None else base_teacher.unet, control_images=images)


def _control_tensor(images: Any, controlnet: nn.Module) -> torch.Tensor:
    """Control images ``(M, C, H, W)`` from a tensor or a folder of images, with the ControlNet's channels."""
    channels = int(controlnet.config.conditioning_channels)
    if isinstance(images, torch.Tensor):
        out = images.float()
    else:
        from .evaluation.images import load_real_images

        folder = Path(images)
        first = next((p for p in sorted(folder.iterdir())), None) if folder.is_dir() else None
        if first is None:
            raise FileNotFoundError(f"no control images in {str(images)!r}")
        from PIL import Image

        with Image.open(first) as im:
            res = min(im.size)
        out = load_real_images(folder, res, channels=channels)
    if out.dim() != 4 or out.shape[1] != channels:
        raise ValueError(f"control images must be (M, {channels}, H, W) for this ControlNet, got {tuple(out.shape)}")
    return out


__all__ = [
    "ControlCondition", "ControlledUNet", "Target", "base_unet", "check_controlnet_fits", "check_delta_fits",
    "LoRA", "check_lora_fits", "fuse_lora", "load_single_file_unet", "load_target", "lora_state_dict", "with_control",
]
