"""Adapters that turn a teacher (a UNet plus its conditioning) into the solver's denoiser callable.

:func:`perflow.solver.solve_window` takes ``denoiser(z, i) -> model_output`` with ``z``
``(B, ...)`` and ``i`` the teacher's discrete timestep index ``(B,)``. This module builds
that callable for

- a diffusers UNet under a :class:`Condition` (SD1.5/2.1 text embeddings, SDXL's added
  text embeds and time ids, a class-conditional teacher's label embedding), with
  classifier-free guidance ``guided = uncond + w (cond - uncond)`` (``docs/method.md``, row
  "conditioning and CFG"):

  - **CFG-sync**: ``w = 1`` on the student's own condition, so a dropped caption means the
    teacher sees the null condition too;
  - **CFG-fixed**: ``w = w*`` on ``(condition, null)``; for a sample whose caption was
    dropped the teacher runs unconditionally (``w`` irrelevant), never the guided target.

The CFG modes are defined here once (:data:`CFG_MODES`).

The teacher models themselves (loading from folders, text/label/VAE encoding) live in
:mod:`perflow.training.teachers`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .solver import Denoiser
from .tensors import expand_like

CFG_MODES = ("sync", "fixed")
"""How the teacher is guided in training: ``sync`` (scale 1 on the student's condition) or ``fixed`` (``w*``)."""


@dataclass
class Condition:
    """What a conditional UNet sees besides ``(z, timestep)``; every tensor has batch size ``B`` first.

    ``encoder_hidden_states`` ``(B, L, D)``: text (or label) embeddings. SDXL adds ``text_embeds``
    ``(B, D2)`` (pooled text embedding) and ``time_ids`` ``(B, 6)`` (original size, crop top-left,
    target size).
    """

    encoder_hidden_states: torch.Tensor
    text_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.encoder_hidden_states.shape[0]

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """``{field name: tensor or None}``, in field order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def forward(self, model: torch.nn.Module, z: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """``model(z, timestep)`` under this condition: a diffusers UNet's call,
        ``model(z, timestep, **unet_kwargs(), return_dict=False)[0]``. A transformer teacher's
        condition (:mod:`perflow.training.flow_teachers`) overrides it with its model's call."""
        return model(z, timestep, **self.unet_kwargs(), return_dict=False)[0]

    def unet_kwargs(self) -> dict:
        """Keyword arguments for ``UNet2DConditionModel.forward``."""
        kwargs: dict = {"encoder_hidden_states": self.encoder_hidden_states}
        if self.text_embeds is not None or self.time_ids is not None:
            if self.text_embeds is None or self.time_ids is None:
                raise ValueError("SDXL conditioning needs both text_embeds and time_ids")
            kwargs["added_cond_kwargs"] = {"text_embeds": self.text_embeds, "time_ids": self.time_ids}
        return kwargs

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Condition":
        """Move every tensor; ``dtype`` applies to floating tensors only."""
        out = {}
        for name, x in self.tensors().items():
            if x is not None:
                x = x.to(device=device, dtype=dtype if (dtype is not None and x.is_floating_point()) else None)
            out[name] = x
        return type(self)(**out)

    def cat(self, other: "Condition") -> "Condition":
        """Concatenate along the batch: ``[self; other]``."""
        out = {}
        for name, x in self.tensors().items():
            y = getattr(other, name)
            if (x is None) != (y is None):
                raise ValueError(f"cannot concatenate conditions: {name} is missing on one side")
            out[name] = None if x is None else torch.cat([x, y.to(x.dtype)])
        return type(self)(**out)

    def where(self, mask: torch.Tensor, other: "Condition") -> "Condition":
        """Row ``b`` from ``other`` where ``mask[b]`` is true, else from ``self``."""
        out = {}
        for name, x in self.tensors().items():
            y = getattr(other, name)
            if x is None or y is None:
                out[name] = x if y is None else y
                continue
            m = mask.to(x.device).reshape((-1,) + (1,) * (x.dim() - 1))
            out[name] = torch.where(m, y.to(x.dtype).expand_as(x), x)
        return type(self)(**out)

    def select(self, rows: torch.Tensor) -> "Condition":
        """The batch rows ``rows`` (indices ``(R,)``) of every tensor."""
        return type(self)(**{n: None if x is None else x[rows.to(x.device)] for n, x in self.tensors().items()})

    def repeat(self, batch_size: int) -> "Condition":
        """Expand a batch-1 condition (e.g. the null condition) to ``batch_size`` rows."""
        if len(self) != 1:
            raise ValueError(f"repeat expects a batch-1 condition, got batch {len(self)}")
        return type(self)(**{n: None if x is None else x.expand(batch_size, *x.shape[1:]) for n, x in self.tensors().items()})


def unet_denoiser(
    unet: torch.nn.Module,
    cond: Condition,
    uncond: Condition | None = None,
    guidance_scale: float | torch.Tensor = 1.0,
) -> Denoiser:
    """``denoiser(z, i)`` for a diffusers UNet (or transformer), in the model's own dtype.

    Without ``uncond`` the output is ``unet(z, i, cond)`` (:meth:`Condition.forward`). With it, one batched call evaluates
    ``[cond; uncond]`` and returns ``uncond + w (cond - uncond)``, ``w`` a scalar or per-sample ``(B,)``.
    ``denoiser.rows(index)`` is the same denoiser on the batch rows ``index`` only (what a window solve with
    a different number of steps per sample runs, :func:`perflow.solver.solve_window`).
    """
    dtype = next(unet.parameters()).dtype
    device = next(unet.parameters()).device
    cond = cond.to(device, dtype)
    both = None
    if uncond is not None:
        if len(uncond) != len(cond):
            raise ValueError(f"uncond has batch {len(uncond)}, cond has {len(cond)}")
        both = cond.cat(uncond.to(device, dtype))
    w = torch.as_tensor(guidance_scale, dtype=torch.float32).to(device)  # () or (B,), moved once

    def denoiser(z: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        zin = z.to(device=device, dtype=dtype)
        if both is None:
            return cond.forward(unet, zin, i.to(device))
        out = both.forward(unet, torch.cat([zin, zin]), torch.cat([i, i]).to(device))
        out_c, out_u = out.float().chunk(2)
        return out_u + expand_like(w, out_c) * (out_c - out_u)

    def rows(index: torch.Tensor) -> Denoiser:
        return unet_denoiser(unet, cond.select(index), None if uncond is None else uncond.select(index),
                             w if w.dim() == 0 else w[index.to(w.device)])

    denoiser.rows = rows
    return denoiser


def guided_teacher_denoiser(
    unet: torch.nn.Module,
    cond: Condition,
    uncond: Condition,
    dropped: torch.Tensor | None,
    cfg_mode: str,
    guidance_scale: float,
) -> Denoiser:
    """The teacher's denoiser for a training batch whose student condition is ``cond``.

    ``cond`` is the condition the student sees (captions already dropped to the null condition
    where ``dropped`` is true); ``uncond`` is the null condition for the same batch (for SDXL it
    keeps each sample's size time ids).

    - ``sync``: ``w = 1`` on ``cond`` (a dropped caption gives the unconditional teacher).
    - ``fixed``: ``uncond + w* (cond - uncond)``, except ``w = 0`` (the unconditional teacher)
      on rows with a dropped caption, so their target matches the student's null input.
    """
    if cfg_mode not in CFG_MODES:
        raise ValueError(f"unknown cfg_mode {cfg_mode!r}; expected one of {CFG_MODES}")
    if cfg_mode == "sync" or guidance_scale == 1.0:
        return unet_denoiser(unet, cond)
    w = torch.full((len(cond),), float(guidance_scale), device=None if dropped is None else dropped.device)
    if dropped is not None:
        if bool(dropped.all()):
            return unet_denoiser(unet, uncond)
        w = torch.where(dropped, torch.zeros_like(w), w)
    return unet_denoiser(unet, cond, uncond, w)


__all__ = [
    "CFG_MODES",
    "Condition",
    "unet_denoiser",
    "guided_teacher_denoiser",
]
