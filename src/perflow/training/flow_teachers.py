"""Flow-matching transformer teachers: ``StableDiffusion3Pipeline`` and ``FluxPipeline`` folders.

The teacher's noise schedule is a :class:`perflow.schedule.FlowMatchSchedule` read from its
``FlowMatchEulerDiscreteScheduler`` config; its denoiser is the transformer, called through a
:class:`~perflow.denoisers.Condition` subclass that knows the model's signature
(:meth:`~perflow.denoisers.Condition.forward`); prompts are encoded by the pipeline's own
``encode_prompt`` (so training sees exactly what sampling feeds the transformer).

- **SD3** (:class:`SD3Teacher`): two CLIP encoders and T5; ``encoder_hidden_states`` ``(B, L, D)``
  (CLIP states padded to T5's width, then T5's) and ``pooled_projections`` ``(B, P)``; timestep
  ``sigma T``. CFG-sync and CFG-fixed as for SD, the empty prompt as the unconditional input.
- **Class labels** (:class:`LabelFlowTeacher`): a class-conditional ``SD3Transformer2DModel`` folder
  (``transformer/``, ``scheduler/``, ``label_encoder/``, pixel space), as the built-in ``flow_digits``
  teacher; the label embedding ``(B, 1, D)`` is both the text states and, as ``(B, D)``, the pooled
  projections (:func:`label_condition`); the null label is the unconditional input.
- **Flux** (:class:`FluxTeacher`): CLIP pooled output and T5; latents ``(B, C, H, W)`` are packed
  into ``(B, H/2 W/2, 4C)`` tokens with image ids, text ids are zeros, timestep ``sigma`` (the
  pipeline's ``t / 1000``). A guidance-distilled Flux (``guidance_embeds``) takes its guidance as
  an input: **the teacher runs at ``perflow.embedded_guidance`` and the student is trained with the
  same value in its guidance input, and is to be sampled with ``guidance_scale`` = that value**
  (``docs/training.md``); there is no two-pass CFG, so ``cfg_mode fixed`` is refused.

The latents are kept unpacked ``(B, C, H, W)`` everywhere (the VAE's, with ``shift_factor`` and
``scaling_factor``), so the objective, the scheduler and the delta never see the packing; the
token count ``(H / 2) (W / 2)`` gives a dynamic-shift teacher its shift
(:meth:`FlowTeacher.schedule_for`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..denoisers import Condition
from ..schedule import FLOW_MATCH_KEYS, FlowMatchSchedule, scheduler_kind
from .teachers import ClassConditionalTeacher, Teacher

FLOW_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")
"""The flow-matching pipeline classes a teacher folder may hold."""


@dataclass
class SD3Condition(Condition):
    """SD3's condition: ``encoder_hidden_states`` ``(B, L, D)`` and ``pooled_projections`` ``(B, P)``."""

    pooled_projections: torch.Tensor | None = None

    def forward(self, model: torch.nn.Module, z: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """``SD3Transformer2DModel(hidden_states=z, timestep=sigma T, ...)``, as ``StableDiffusion3Pipeline`` calls it."""
        t = timestep.to(z.dtype).expand(z.shape[0])
        return model(hidden_states=z, timestep=t, encoder_hidden_states=self.encoder_hidden_states,
                     pooled_projections=self.pooled_projections, return_dict=False)[0]


def label_condition(embeddings: torch.Tensor) -> SD3Condition:
    """The SD3 condition of label embeddings ``(B, 1, D)``: text states ``(B, 1, D)``, pooled projections ``(B, D)``."""
    return SD3Condition(embeddings, pooled_projections=embeddings[:, 0])


def check_velocity(cfg: Any, name: str) -> None:
    """Refuse a student parameterization other than ``velocity`` for a flow-matching teacher (one line, with the fix)."""
    p = cfg.perflow
    if p.prediction_type != "velocity":
        raise ValueError(f"perflow.prediction_type {p.prediction_type!r} does not apply to the flow-matching teacher "
                         f"{name}; use --prediction_type velocity or auto (the student then starts at the teacher)")


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H/2 W/2, 4C)``: 2x2 patches as tokens, diffusers' ``FluxPipeline._pack_latents``."""
    from diffusers import FluxPipeline

    b, c, h, w = z.shape
    return FluxPipeline._pack_latents(z, b, c, h, w)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents`: ``(B, H/2 W/2, 4C)`` -> ``(B, C, H, W)``."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


@dataclass
class FluxCondition(Condition):
    """Flux's condition: T5 ``encoder_hidden_states`` ``(B, L, D)``, CLIP ``pooled_projections`` ``(B, P)`` and,
    for a guidance-distilled model, the ``guidance`` input ``(B,)``."""

    pooled_projections: torch.Tensor | None = None
    guidance: torch.Tensor | None = None

    def forward(self, model: torch.nn.Module, z: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """``FluxTransformer2DModel`` on the packed latents with image/text ids, ``timestep = sigma T / 1000``
        (as ``FluxPipeline``); the output is unpacked to ``z``'s shape."""
        from diffusers import FluxPipeline

        b, _, h, w = z.shape
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, z.device, z.dtype)
        txt_ids = torch.zeros(self.encoder_hidden_states.shape[1], 3, device=z.device, dtype=z.dtype)
        t = timestep.to(z.dtype).expand(b) / 1000
        out = model(hidden_states=pack_latents(z), timestep=t, guidance=self.guidance,
                    pooled_projections=self.pooled_projections, encoder_hidden_states=self.encoder_hidden_states,
                    txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return unpack_latents(out, h, w)


def flow_schedule_config(config: dict, where: str) -> dict:
    """The flow-matching keys of a teacher's scheduler config (``FlowMatchEulerDiscreteScheduler``'s defaults
    filled in) and ``schedule_kind``, for :class:`perflow.PeRFlowScheduler`; a config of another kind is refused."""
    if scheduler_kind(config) != "flow_matching":
        raise ValueError(f"{where}'s scheduler ({config.get('_class_name', '?')}) is not a flow-matching scheduler; "
                         "an SD3/Flux teacher needs its FlowMatchEulerDiscreteScheduler config")
    schedule = FlowMatchSchedule.from_config(config)
    return {"schedule_kind": "flow_matching", **{k: getattr(schedule, k) for k in FLOW_MATCH_KEYS}}


class FlowTeacher(Teacher):
    """A flow-matching transformer teacher held in its diffusers pipeline (text encoders, tokenizers, VAE)."""

    denoiser_name = "transformer"
    uses_text = True
    validation_guidance = 3.5
    default_parameterization = "velocity"
    condition_type: type[Condition] = SD3Condition
    default_max_sequence_length = 256

    def __init__(self, pipe: Any, name: str = "teacher"):
        self.pipe = pipe
        self.unet = pipe.transformer.eval().requires_grad_(False)  # the denoiser (``unet`` is the loop's name for it)
        self.vae = pipe.vae.eval().requires_grad_(False)
        self.schedule_config = flow_schedule_config(dict(pipe.scheduler.config), name)
        self.schedule = FlowMatchSchedule.from_config(self.schedule_config)
        self.prediction_type = "flow_prediction"
        self.clip_sample, self.thresholding = None, False
        self.name = name
        self.max_sequence_length = self.default_max_sequence_length
        self._null: Condition | None = None
        for n in self.text_encoder_names:
            getattr(pipe, n).eval().requires_grad_(False)

    @property
    def text_encoder_names(self) -> tuple[str, ...]:
        return tuple(n for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if getattr(self.pipe, n, None) is not None)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "vae": self.vae, **{n: getattr(self.pipe, n) for n in self.text_encoder_names}}

    def frozen_parts(self) -> dict[str, Any]:
        """The pipeline's components other than the transformer and the scheduler (for the exported folder)."""
        return {k: v for k, v in self.pipe.components.items() if k not in ("transformer", "scheduler") and v is not None}

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    def image_seq_len(self, latents: torch.Tensor) -> int:
        """The transformer's image token count for ``latents`` ``(B, C, H, W)``: ``(H / 2) (W / 2)``."""
        return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    def schedule_for(self, latents: torch.Tensor) -> FlowMatchSchedule:
        """The schedule at the latents' resolution (a dynamic shift from their token count)."""
        return self.schedule.at_resolution(self.image_seq_len(latents))

    def configure(self, cfg: Any) -> None:
        if cfg.model.max_sequence_length is not None:
            self.max_sequence_length = int(cfg.model.max_sequence_length)
        self._null = None

    def check_training(self, cfg: Any) -> None:
        check_velocity(cfg, self.name)  # the resolution is checked by Teacher.resolution (perflow.training.loop.with_data)

    def encode_prompts(self, captions: list[str]) -> Condition:
        raise NotImplementedError

    def condition(self, batch: dict) -> Condition:
        captions = batch.get("caption")
        if captions is None:
            captions = [""] * batch["pixel_values"].shape[0]
        return self.encode_prompts(list(captions))

    def null_text(self) -> Condition:
        return self.encode_prompts([""])

    def uncond(self, cond: Condition) -> Condition:
        if self._null is None:
            self._null = self.null_text()
        return self._null.repeat(len(cond))

    def validation_condition(self, prompts: list, resolution: int) -> Condition:
        return self.encode_prompts(["" if p is None else str(p) for p in prompts])


class SD3Teacher(FlowTeacher):
    """``StableDiffusion3Pipeline``: ``encode_prompt`` gives the joint text states and the pooled projections."""

    kind = "sd3"
    validation_guidance = 7.0

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> SD3Condition:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=captions, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return SD3Condition(embeds.to(self.dtype), pooled_projections=pooled.to(self.dtype))


class FluxTeacher(FlowTeacher):
    """``FluxPipeline``: T5 states, CLIP pooled output; the guidance input at :attr:`guidance` (Flux-dev)."""

    kind = "flux"
    condition_type = FluxCondition
    default_max_sequence_length = 512
    validation_guidance = 1.0  # guidance is an input, not two passes

    def __init__(self, pipe: Any, name: str = "teacher"):
        super().__init__(pipe, name)
        self.guidance = 3.5

    @property
    def size_factor(self) -> tuple[int, str]:
        """Flux packs 2 x 2 latents into one token."""
        return 2 * self.vae_scale, f"2 x 2 latents per token x the VAE factor {self.vae_scale}"

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.unet.config.get("guidance_embeds", False))

    def configure(self, cfg: Any) -> None:
        super().configure(cfg)
        self.guidance = float(cfg.perflow.embedded_guidance)

    def check_training(self, cfg: Any) -> None:
        super().check_training(cfg)
        p = cfg.perflow
        if p.cfg_mode == "fixed" and p.guidance_scale != 1.0:
            raise ValueError(
                f"{self.name} is a Flux model: its guidance is an input embedding, not a two-pass CFG; use --cfg_mode sync "
                "and set the guidance the teacher runs at (and the student is trained and sampled with) by "
                "--embedded_guidance"
            )
        if cfg.output.validation_guidance_scale not in (None, 1.0):
            raise ValueError("output.validation_guidance_scale does not apply to a Flux student (its guidance is the "
                             "embedded_guidance input); leave it unset")

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> FluxCondition:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=captions, prompt_2=None, device=self.device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        g = torch.full((len(captions),), self.guidance, device=self.device) if self.guidance_embeds else None
        return FluxCondition(embeds.to(self.dtype), pooled_projections=pooled.to(self.dtype), guidance=g)


class LabelFlowTeacher(ClassConditionalTeacher):
    """A class-conditional flow-matching ``SD3Transformer2DModel`` in pixel space (the built-in ``flow_digits``):
    ``transformer/``, ``scheduler/`` (``FlowMatchEulerDiscreteScheduler``) and ``label_encoder/``."""

    kind = "class_flow"
    denoiser_name = "transformer"
    default_parameterization = "velocity"

    def __init__(self, transformer, scheduler_config: dict, label_encoder, name: str = "teacher"):
        self.unet = transformer.eval().requires_grad_(False)  # the denoiser (``unet`` is the loop's name for it)
        self.vae = None
        self.schedule_config = flow_schedule_config(dict(scheduler_config), name)
        self.schedule = FlowMatchSchedule.from_config(self.schedule_config)
        self.prediction_type = "flow_prediction"
        self.clip_sample, self.thresholding = None, False
        self.name = name
        self._null: Condition | None = None
        self.label_encoder = label_encoder.eval().requires_grad_(False)
        self.num_labels = self.null_label + 1

    @torch.no_grad()
    def encode_labels(self, labels: torch.Tensor) -> SD3Condition:
        emb = self.label_encoder(labels.to(self.device, torch.long))  # (B, 1, D)
        return label_condition(emb.to(self.dtype))

    def schedule_for(self, latents: torch.Tensor) -> FlowMatchSchedule:
        """The schedule at the image's token count ``(H / p) (W / p)`` (``p``: the patch size)."""
        p = self.unet.config.patch_size
        return self.schedule.at_resolution((latents.shape[-2] // p) * (latents.shape[-1] // p))

    def check_training(self, cfg: Any) -> None:
        check_velocity(cfg, self.name)
        super().check_training(cfg)


def flow_teacher_from_pipeline(pipe: Any, name: str = "teacher") -> FlowTeacher:
    """The teacher of an in-memory ``StableDiffusion3Pipeline`` or ``FluxPipeline``; another transformer pipeline is refused."""
    cls_name = type(pipe).__name__
    if cls_name == "StableDiffusion3Pipeline":
        return SD3Teacher(pipe, name)
    if cls_name == "FluxPipeline":
        return FluxTeacher(pipe, name)
    raise ValueError(f"{cls_name} is not a supported flow-matching teacher; perflow takes {FLOW_PIPELINES} "
                     "(the text-to-image pipeline of the model)")


__all__ = [
    "FLOW_PIPELINES",
    "FluxCondition",
    "FluxTeacher",
    "FlowTeacher",
    "LabelFlowTeacher",
    "check_velocity",
    "label_condition",
    "SD3Condition",
    "SD3Teacher",
    "flow_teacher_from_pipeline",
    "pack_latents",
    "unpack_latents",
]
