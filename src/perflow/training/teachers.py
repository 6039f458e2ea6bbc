"""Frozen teachers: a UNet, its noise schedule, its condition encoders and (optionally) a VAE.

Four kinds, each loadable from a folder or built from in-memory objects:

- ``sd``: a diffusers Stable Diffusion 1.x/2.x pipeline (``model_index.json``); the teacher's
  prediction type (``epsilon`` or ``v_prediction``) is read from its scheduler config; the
  unconditional input is the empty prompt's embedding.
- ``sdxl``: a ``StableDiffusionXLPipeline`` folder; the condition adds the pooled text embedding
  and the time ids ``(original_size, crop_top_left, target_size)`` of each real image.
- ``class``: a class-conditional teacher folder with ``unet/``, ``scheduler/`` and
  ``label_encoder/`` (:class:`perflow.models.LabelEncoder`; label ``num_classes`` is the null
  label), optionally ``vae/``; without a VAE it works in pixel space. ``"digits"`` names the
  built-in digits teacher.
- ``class_flow``: the same folder with ``transformer/`` (a class-conditional ``SD3Transformer2DModel``
  and a ``FlowMatchEulerDiscreteScheduler``) in place of ``unet/``; ``"flow_digits"`` names the
  built-in flow-matching teacher (:class:`perflow.training.flow_teachers.LabelFlowTeacher`).
- ``sd3`` and ``flux``: a ``StableDiffusion3Pipeline`` or ``FluxPipeline`` folder, a flow-matching
  transformer teacher (:mod:`perflow.training.flow_teachers`).
- ``unet2d``: a pixel-space diffusers ``UNet2DModel``: a ``DDPMPipeline``/``DDIMPipeline`` folder
  (``model_index.json``, ``unet/``, ``scheduler/``) or a bare UNet folder (``config.json`` and
  weights, the schedule from ``scheduler_config.json`` in it, in its ``scheduler/`` subfolder or in
  a ``scheduler/`` folder beside it). Unconditional (the condition is ``UNet2DCondition()``), or
  class-conditional through ``class_labels`` when it has a class embedding (``num_class_embeds``, or
  ``class_embed_type="timestep"``); its null class, if it was trained with one, is ``null_label``
  (``model.null_label``). ``"faces"`` names the built-in faces teacher (a ``DDPMPipeline``).

A teacher whose scheduler config has ``clip_sample: true`` is solved with the predicted ``x0``
clipped to ``[-clip_sample_range, clip_sample_range]`` in every step (:attr:`Teacher.clip_sample`,
passed to :func:`perflow.solver.solve_window`); ``thresholding: true`` is warned about and not applied.

Every encoder runs under ``torch.no_grad`` in the teacher's dtype. Batches are dicts from
:mod:`perflow.training.data`: ``pixel_values`` ``(B, C, H, W)`` in ``[-1, 1]``, and ``caption``
(list of str) or ``label`` ``(B,)``, and for SDXL ``original_size``/``crop_top_left`` ``(B, 2)``.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from ..denoisers import Condition
from ..schedule import DiscreteVPSchedule

BUILTIN_TEACHERS = {"digits": ("builtin", "weights", "digits_teacher")}
SUITE_TEACHER_NAMES = ("faces", "photos", "flow_digits")
"""Built-in suite teachers :func:`load_teacher` also finds by name (:func:`perflow.builtin.suite.suite_teacher_path`)."""


def teacher_clip_sample(config: Mapping[str, Any], name: str = "teacher") -> float | None:
    """The clipping range ``r`` of the predicted ``x0`` that a diffusers scheduler config asks for, or None.

    ``clip_sample: true`` gives ``r = clip_sample_range`` (default 1.0); a config without
    ``clip_sample`` is taken as off (every saved diffusers config has the key; the scheduler
    classes' own default, true, is not assumed). ``thresholding: true`` (dynamic thresholding) is
    not applied in the window solve: a warning says so (``docs/training.md``, "clip_sample").
    """
    if config.get("thresholding"):
        warnings.warn(
            f"{name}: the scheduler config sets thresholding (dynamic thresholding); perflow's window solve does not "
            "apply it" + (" and clips x0 by clip_sample instead" if config.get("clip_sample") else "")
            + " (docs/training.md, clip_sample)",
            UserWarning, stacklevel=3,
        )
    if not config.get("clip_sample"):
        return None
    r = float(config.get("clip_sample_range", 1.0))
    if not r > 0:
        raise ValueError(f"{name}: the scheduler config's clip_sample_range must be > 0, got {r}")
    return r


def teacher_schedule(config: dict) -> tuple[DiscreteVPSchedule, str, dict]:
    """``(schedule, teacher prediction_type, schedule config)`` of a diffusers scheduler config.

    ``schedule`` is :meth:`perflow.schedule.DiscreteVPSchedule.from_config` (the
    ``alphas_cumprod`` :class:`perflow.PeRFlowScheduler` uses too, ``rescale_betas_zero_snr``
    included) in float64; the schedule config holds its keys with ``DDIMScheduler``'s defaults
    filled in. An ``epsilon`` teacher with zero terminal SNR (``abar(1) = 0``) is refused.
    """
    from diffusers import DDIMScheduler

    from ..schedule import SCHEDULE_KEYS, check_beta_schedule, scheduler_kind
    from ..solver import TEACHER_PREDICTION_TYPES
    from ..windows import check_nonzero_abar, equal_boundaries

    prediction_type = config.get("prediction_type", "epsilon")
    if scheduler_kind(config) == "flow_matching":  # a FlowMatch* class, its shift keys, or flow_prediction
        raise ValueError(
            f"this UNet teacher's scheduler is a flow-matching one ({config.get('_class_name') or 'flow_prediction'}); perflow trains "
            "flow-matching teachers from StableDiffusion3Pipeline and FluxPipeline folders (docs/training.md)"
        )
    if prediction_type not in TEACHER_PREDICTION_TYPES:
        raise ValueError(f"the teacher's scheduler has unsupported prediction_type {prediction_type!r}")
    check_beta_schedule(config)  # before DDIMScheduler, which has no other schedules either
    filled = DDIMScheduler.from_config(dict(config)).config
    keys = SCHEDULE_KEYS + ("set_alpha_to_one",)
    schedule_config = {k: filled[k] for k in keys if k in filled}
    if schedule_config.get("trained_betas") is not None:
        schedule_config["trained_betas"] = list(schedule_config["trained_betas"])
    schedule = DiscreteVPSchedule.from_config(schedule_config)
    check_nonzero_abar(equal_boundaries(1), schedule, prediction_type)
    return schedule.to(dtype=torch.float64), prediction_type, schedule_config


class Teacher:
    """Base class: ``unet``, its noise ``schedule`` (:class:`~perflow.schedule.DiscreteVPSchedule`,
    float64) and ``schedule_config`` (the diffusers scheduler keys it came from), ``prediction_type``
    and encoders; ``clip_sample``: the ``x0`` clipping range of its sampler (:func:`teacher_clip_sample`),
    ``thresholding``: whether its scheduler asks for dynamic thresholding (not applied)."""

    kind = "base"
    denoiser_name = "unet"
    """The denoiser's folder (and pipeline component) name: ``unet``, or ``transformer`` (SD3, Flux)."""
    conditional = True
    """False for an unconditional model (its only condition is ``UNet2DCondition()``)."""
    has_null = True
    """Whether :meth:`null_text` exists (the unconditional input of CFG and caption dropout)."""
    uses_labels = False
    """Conditioned on integer class labels (the batch's ``label``) rather than captions."""
    uses_text = False
    """Conditioned on captions through its own text encoders (SD, SDXL, SD3, Flux)."""
    num_labels: int | None = None
    """Label indices the model embeds (the null label included); None: no labels, or no upper bound."""
    null_label: int | None = None
    validation_guidance = 7.5
    """CFG scale of validation grids in CFG-sync runs when ``output.validation_guidance_scale`` is unset."""
    default_parameterization = "ddim_eps"
    """What ``perflow.prediction_type: auto`` trains: ``ddim_eps`` for a diffusion teacher (the untrained
    student is the teacher's DDIM over the windows; docs/study.md), ``velocity`` for a flow-matching one."""

    def __init__(self, unet, scheduler_config: dict, vae=None, name: str = "teacher"):
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False) if vae is not None else None
        self.schedule, self.prediction_type, self.schedule_config = teacher_schedule(scheduler_config)
        self.scheduler_config = dict(scheduler_config)
        """The diffusers scheduler config as given (``clip_sample``, ``steps_offset``, ... included): what the
        teacher's own solvers are built from."""
        self.clip_sample = teacher_clip_sample(scheduler_config, name)
        self.thresholding = bool(scheduler_config.get("thresholding", False))
        self.name = name
        self._null: Condition | None = None

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """The schedule's ``abar[0..T-1]`` (float64 ``(T,)``)."""
        return self.schedule.alphas_cumprod

    # -- devices and dtypes ---------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def modules(self) -> dict[str, torch.nn.Module]:
        """The frozen modules by name (moved together by :meth:`to`)."""
        mods = {"unet": self.unet}
        if self.vae is not None:
            mods["vae"] = self.vae
        return mods

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Teacher":
        for name, mod in self.modules().items():
            keep_fp32 = name == "vae" and getattr(mod.config, "force_upcast", False)
            current = next(mod.parameters()).dtype
            kwargs = {} if (keep_fp32 or dtype in (None, current)) else {"dtype": dtype}
            mod.to(device=device, **kwargs)
        self._null = None
        return self

    # -- images <-> latents -----------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def native_resolution(self) -> int | None:
        """The image size the teacher was built for: its denoiser's ``sample_size`` (the first side of a
        pair) times :attr:`vae_scale`; None when the denoiser's config has no ``sample_size`` (Flux)."""
        size = getattr(self.unet.config, "sample_size", None)
        if size is None:
            return None
        if not isinstance(size, int) and len(set(size)) > 1:
            raise ValueError(f"the teacher's denoiser has a non-square sample_size {list(size)}; perflow trains and "
                             "samples square images: give a teacher with a square sample_size")
        return int(size if isinstance(size, int) else size[0]) * self.vae_scale

    def resolution(self, given: int | None, option: str) -> int:
        """``given`` if set, else :attr:`native_resolution`; a ``ValueError`` naming ``option`` (the setting
        that gives it, e.g. ``--resolution``) when neither exists (a Flux transformer records no size), for a
        non-square teacher, or when a UNet cannot take that size (not a multiple of the VAE factor times
        ``2^(number of downsamplings)``)."""
        native = self.native_resolution
        if given is None and native is None:
            raise ValueError(f"the teacher's denoiser ({type(self.unet).__name__}) records no sample_size; "
                             f"set {option} (e.g. {option} 1024)")
        res = int(given) if given is not None else native
        factor, why = self.size_factor
        if res < 1 or res % factor:
            raise ValueError(f"{option} {res} does not fit the teacher's denoiser: give a positive multiple of {factor} ({why})")
        return res

    @property
    def size_factor(self) -> tuple[int, str]:
        """``(f, why)``: image sizes the denoiser takes are multiples of ``f`` (a UNet: the VAE factor times
        ``2^(number of downsamplings)``; a patch transformer: the VAE factor times its patch size)."""
        config = self.unet.config
        blocks = getattr(config, "down_block_types", None)
        if blocks:
            return self.vae_scale * 2 ** (len(blocks) - 1), f"{len(blocks) - 1} downsamplings x the VAE factor {self.vae_scale}"
        patch = int(getattr(config, "patch_size", 1) or 1)
        return self.vae_scale * patch, f"patch size {patch} x the VAE factor {self.vae_scale}"

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``x0`` for the reflow objective: ``(vae.encode(x).sample() - shift) * scaling`` or the pixels."""
        if self.vae is None:
            return pixel_values.float()
        vdtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode(pixel_values.to(self.device, vdtype)).latent_dist
        noise = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32).to(dist.mean.device)
        latents = dist.mean.float() + dist.std.float() * noise  # (B, c, H/f, W/f)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in ``[-1, 1]`` from latents (identity in pixel space)."""
        if self.vae is None:
            return latents.float().clamp(-1, 1)
        vdtype = next(self.vae.parameters()).dtype
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = latents / self.vae.config.scaling_factor + shift
        return self.vae.decode(z.to(self.device, vdtype)).sample.float().clamp(-1, 1)

    # -- conditions -------------------------------------------------------------------------
    def condition(self, batch: dict) -> Condition:
        """The condition of a data batch (no dropout)."""
        raise NotImplementedError

    def schedule_for(self, latents: torch.Tensor):
        """The schedule a window solve on ``latents`` uses: :attr:`schedule` (a dynamic-shift flow-matching
        teacher resolves its shift at the latents' resolution, :mod:`perflow.training.flow_teachers`)."""
        return self.schedule

    def configure(self, cfg: Any) -> None:
        """Take the run's settings the teacher's conditioning depends on (none here; a Flux teacher takes its
        guidance input, a transformer teacher its text length)."""

    def null_text(self) -> Condition:
        """The batch-1 null condition (empty prompt / null label)."""
        raise NotImplementedError

    def uncond(self, cond: Condition) -> Condition:
        """The null condition for the same batch (SDXL keeps each sample's time ids)."""
        if self._null is None:
            self._null = self.null_text()
        return dataclasses.replace(self._null.repeat(len(cond)), time_ids=cond.time_ids)

    def drop(self, cond: Condition, dropped: torch.Tensor) -> Condition:
        """Rows where ``dropped`` is true replaced by the null condition (caption dropout)."""
        return cond.where(dropped, self.uncond(cond))

    def validation_condition(self, prompts: list, resolution: int) -> Condition:
        """Condition for sampling previews of ``prompts`` (captions or labels) at ``resolution``."""
        raise NotImplementedError

    def default_prompts(self) -> list:
        """Validation prompts (or labels) when ``output.validation_prompts`` is unset."""
        return ["a photo of a cat", "a painting of a dog", "a red digit", ""]

    def check_training(self, cfg: Any) -> None:
        """Refuse, in one line naming the setting and the fix, a :class:`~perflow.training.config.TrainConfig`
        that needs an unconditional pass this teacher cannot make."""
        p, d, o = cfg.perflow, cfg.data, cfg.output
        guided = p.cfg_mode == "fixed" and p.guidance_scale != 1.0
        if not self.conditional:
            if guided:
                raise ValueError(f"{self.name} is an unconditional model: perflow.cfg_mode fixed has nothing to guide; "
                                 "use --cfg_mode sync")
            return
        if self.has_null:
            return
        needs = [name for name, on in (
            (f"perflow.cfg_mode fixed at guidance_scale {p.guidance_scale}", guided),
            (f"data.caption_dropout {d.caption_dropout}", d.caption_dropout > 0),
            ("data.caption_free", d.caption_free),
            (f"output.validation_guidance_scale {o.validation_guidance_scale}",
             o.validation_guidance_scale not in (None, 1.0)),
        ) if on]
        if needs:
            raise ValueError(
                f"{needs[0]} needs the teacher's unconditional (null class) output, but {self.name}'s class embedding "
                f"has no null class: turn it off (--caption_dropout 0, --cfg_mode sync), or name the class index the "
                "model was trained with as 'no class' (--null_label N)"
            )


class ClassConditionalTeacher(Teacher):
    """A ``UNet2DConditionModel`` conditioned on :class:`perflow.models.LabelEncoder` embeddings."""

    kind = "class"
    uses_labels = True
    validation_guidance = 2.0

    def __init__(self, unet, scheduler_config: dict, label_encoder, vae=None, name: str = "teacher"):
        super().__init__(unet, scheduler_config, vae, name)
        self.label_encoder = label_encoder.eval().requires_grad_(False)
        self.num_labels = self.null_label + 1

    def modules(self) -> dict[str, torch.nn.Module]:
        return {**super().modules(), "label_encoder": self.label_encoder}

    @property
    def null_label(self) -> int:
        return self.label_encoder.null_label

    def default_prompts(self) -> list:
        return list(range(self.null_label))

    @torch.no_grad()
    def encode_labels(self, labels: torch.Tensor) -> Condition:
        emb = self.label_encoder(labels.to(self.device, torch.long))  # (B, 1, D)
        return Condition(emb.to(self.dtype))

    def condition(self, batch: dict) -> Condition:
        labels = batch.get("label")
        if labels is None:  # caption-free data: every sample unconditional
            labels = torch.full((batch["pixel_values"].shape[0],), self.null_label)
        return self.encode_labels(torch.as_tensor(labels))

    def null_text(self) -> Condition:
        return self.encode_labels(torch.tensor([self.null_label]))

    def validation_condition(self, prompts: list, resolution: int) -> Condition:
        labels = [self.null_label if p is None else int(p) for p in prompts]
        bad = [p for p in labels if not 0 <= p <= self.null_label]
        if bad:
            raise ValueError(f"validation labels must be in 0..{self.null_label}, got {bad}")
        return self.encode_labels(torch.tensor(labels))


class SDTeacher(Teacher):
    """Stable Diffusion 1.x / 2.x: CLIP text embeddings ``(B, 77, D)`` as ``encoder_hidden_states``."""

    kind = "sd"
    uses_text = True

    def __init__(self, unet, scheduler_config: dict, vae, tokenizer, text_encoder, name: str = "teacher"):
        super().__init__(unet, scheduler_config, vae, name)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval().requires_grad_(False)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {**super().modules(), "text_encoder": self.text_encoder}

    def _ids(self, tokenizer, captions: list[str]) -> torch.Tensor:
        return tokenizer(
            list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> Condition:
        emb = self.text_encoder(self._ids(self.tokenizer, captions), return_dict=True).last_hidden_state
        return Condition(emb.to(self.dtype))

    def condition(self, batch: dict) -> Condition:
        captions = batch.get("caption")
        if captions is None:
            captions = [""] * batch["pixel_values"].shape[0]
        return self.encode_prompts(captions)

    def null_text(self) -> Condition:
        return self.encode_prompts([""])

    def validation_condition(self, prompts: list, resolution: int) -> Condition:
        return self.encode_prompts(["" if p is None else str(p) for p in prompts])


class SDXLTeacher(SDTeacher):
    """SDXL: two text encoders (penultimate hidden states concatenated), pooled embedding and time ids.

    ``time_ids = (orig_h, orig_w, crop_top, crop_left, target_h, target_w)`` per sample, from the
    real image sizes. The null text is the empty prompt's embedding, or zeros when the pipeline's
    ``force_zeros_for_empty_prompt`` is set (what the SDXL pipeline feeds as the unconditional input).
    """

    kind = "sdxl"

    def __init__(
        self, unet, scheduler_config, vae, tokenizer, text_encoder, tokenizer_2, text_encoder_2,
        force_zeros_for_empty_prompt: bool = True, name: str = "teacher",
    ):
        super().__init__(unet, scheduler_config, vae, tokenizer, text_encoder, name)
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2.eval().requires_grad_(False)
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        add_dim = unet.config.addition_time_embed_dim
        expected = unet.config.projection_class_embeddings_input_dim
        got = 6 * add_dim + text_encoder_2.config.projection_dim
        if expected != got:
            raise ValueError(
                f"SDXL UNet expects {expected} added-condition features but 6 time ids x {add_dim} + pooled "
                f"{text_encoder_2.config.projection_dim} = {got}; is this an SDXL refiner? (not supported)"
            )

    def modules(self) -> dict[str, torch.nn.Module]:
        return {**super().modules(), "text_encoder_2": self.text_encoder_2}

    @torch.no_grad()
    def encode_prompts_xl(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_embeds (B, L, D1 + D2), pooled (B, D2))`` as ``StableDiffusionXLPipeline.encode_prompt``."""
        hidden = []
        pooled = None
        for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = enc(self._ids(tok, captions), output_hidden_states=True, return_dict=True)
            hidden.append(out.hidden_states[-2])
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]
        return torch.cat(hidden, dim=-1).to(self.dtype), pooled.to(self.dtype)

    @staticmethod
    def time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: torch.Tensor) -> torch.Tensor:
        """``(B, 6)``: ``[orig_h, orig_w, crop_top, crop_left, target_h, target_w]`` per sample."""
        parts = [torch.as_tensor(x, dtype=torch.float32).reshape(-1, 2) for x in (original_size, crop_top_left, target_size)]
        n = max(p.shape[0] for p in parts)
        return torch.cat([p.expand(n, 2) for p in parts], dim=1)

    def _cond(self, captions: list[str], original_size, crop_top_left, target_size) -> Condition:
        emb, pooled = self.encode_prompts_xl(captions)
        ids = self.time_ids(original_size, crop_top_left, target_size).to(self.device, self.dtype)
        return Condition(emb, pooled, ids.expand(len(captions), 6))

    def condition(self, batch: dict) -> Condition:
        pixels = batch["pixel_values"]
        b, _, h, w = pixels.shape
        captions = batch.get("caption") or [""] * b
        original = batch.get("original_size")
        crop = batch.get("crop_top_left")
        if original is None or crop is None:
            raise ValueError(
                "SDXL teachers need each image's 'original_size' and 'crop_top_left' in the batch "
                "(perflow's image-folder and tar-shard datasets provide them)"
            )
        return self._cond(captions, original, crop, torch.tensor([h, w]))

    def null_text(self) -> Condition:
        emb, pooled = self.encode_prompts_xl([""])
        if self.force_zeros_for_empty_prompt:
            emb, pooled = torch.zeros_like(emb), torch.zeros_like(pooled)
        return Condition(emb, pooled, None)

    def validation_condition(self, prompts: list, resolution: int) -> Condition:
        size = torch.tensor([resolution, resolution])
        return self._cond(["" if p is None else str(p) for p in prompts], size, torch.tensor([0, 0]), size)


@dataclasses.dataclass
class UNet2DCondition(Condition):
    """What a ``UNet2DModel`` sees besides ``(z, timestep)``: ``class_labels`` ``(B,)`` int64 for one with
    a class embedding, nothing for an unconditional one (``UNet2DCondition()``, which has no batch size)."""

    encoder_hidden_states: torch.Tensor | None = None  # unused: a UNet2DModel has no cross-attention
    class_labels: torch.Tensor | None = None

    def __len__(self) -> int:
        if self.class_labels is None:
            raise ValueError("an unconditional UNet2DCondition() holds no tensor and has no batch size")
        return self.class_labels.shape[0]

    def unet_kwargs(self) -> dict:
        """Keyword arguments for ``UNet2DModel.forward``."""
        return {} if self.class_labels is None else {"class_labels": self.class_labels}


class UNet2DTeacher(Teacher):
    """A pixel-space diffusers ``UNet2DModel`` (what ``DDPMPipeline`` samples): unconditional, or
    class-conditional through ``class_labels`` when the UNet has a class embedding.

    ``null_label``: the class index the model was trained with as "no class" (for CFG and caption
    dropout; usually ``num_class_embeds - 1``). Without it every index is a real class and
    :meth:`check_training` refuses whatever needs an unconditional pass. An unconditional model's
    condition is ``UNet2DCondition()`` (its null condition too).
    """

    kind = "unet2d"

    def __init__(self, unet, scheduler_config: dict, null_label: int | None = None, name: str = "teacher"):
        c = unet.config
        if c.class_embed_type not in (None, "timestep"):
            raise ValueError(
                f"{name}: UNet2DModel class_embed_type {c.class_embed_type!r} takes embedding vectors, not class labels; "
                "perflow supports num_class_embeds (a label embedding table) and class_embed_type 'timestep'"
            )
        if c.out_channels != c.in_channels:
            raise ValueError(
                f"{name}: the UNet2DModel outputs {c.out_channels} channels for {c.in_channels} input channels (a learned "
                "variance?); perflow needs out_channels == in_channels (the prediction alone)"
            )
        super().__init__(unet, scheduler_config, None, name)
        self.uses_labels = self.conditional = unet.class_embedding is not None
        self.num_labels = c.num_class_embeds if self.uses_labels and c.class_embed_type is None else None
        if null_label is not None:
            if not self.uses_labels:
                raise ValueError(f"model.null_label {null_label} is set but {name}'s UNet2DModel has no class embedding; "
                                 "leave it unset for an unconditional model")
            if not 0 <= null_label < (self.num_labels or null_label + 1):
                raise ValueError(f"model.null_label must be in 0..{self.num_labels - 1} (num_class_embeds "
                                 f"{self.num_labels}), got {null_label}")
        self.null_label = null_label
        self.has_null = null_label is not None or not self.uses_labels
        self.validation_guidance = 2.0 if self.uses_labels and self.has_null else 1.0

    def _labels(self, labels: Any) -> Condition:
        return UNet2DCondition(class_labels=torch.as_tensor(labels, dtype=torch.long).reshape(-1).to(self.device))  # (B,)

    def _no_null(self, what: str) -> ValueError:
        return ValueError(
            f"{what}, but {self.name}'s class embedding has no null class: give every image a label (a 'label' "
            "column in metadata.jsonl, data.label_column), or name the model's 'no class' index with --null_label N"
        )

    def condition(self, batch: dict) -> Condition:
        if not self.uses_labels:
            return UNet2DCondition()
        labels = batch.get("label")
        if labels is None:  # caption-free data: every sample unconditional
            if self.null_label is None:
                raise self._no_null("the training data has no class labels")
            labels = [self.null_label] * batch["pixel_values"].shape[0]
        labels = torch.as_tensor(labels)
        if bool((labels < 0).any()) or (self.num_labels is not None and bool((labels >= self.num_labels).any())):
            top = self.num_labels - 1 if self.num_labels is not None else ""
            raise ValueError(f"a batch label is outside the teacher's classes 0..{top}: {labels.tolist()}; "
                             "fix the dataset's labels")
        return self._labels(labels)

    def null_text(self) -> Condition:
        if not self.uses_labels:
            return UNet2DCondition()
        if self.null_label is None:
            raise self._no_null("the unconditional output was asked for")
        return self._labels([self.null_label])

    def uncond(self, cond: Condition) -> Condition:
        return UNet2DCondition() if not self.uses_labels else super().uncond(cond)

    def default_prompts(self) -> list:
        if not self.uses_labels:
            return [None]
        return [k for k in range(self.num_labels or 4) if k != self.null_label][:16]

    def validation_condition(self, prompts: list, resolution: int) -> Condition:
        if not self.uses_labels:
            return UNet2DCondition()
        if None in prompts and self.null_label is None:
            raise self._no_null("a validation prompt is empty (the null class)")
        labels = [self.null_label if p is None else int(p) for p in prompts]
        top = self.num_labels if self.num_labels is not None else float("inf")
        bad = [k for k in labels if not 0 <= k < top]
        if bad:
            raise ValueError(f"validation labels must be in 0..{top - 1} (num_class_embeds {top}), got {bad}")
        return self._labels(labels)


# ----------------------------------------------------------------------------- construction


def teacher_from_pipeline(pipe: Any, name: str = "teacher", null_label: int | None = None) -> Teacher:
    """Wrap an in-memory ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``,
    ``FluxPipeline`` (:mod:`perflow.training.flow_teachers`) or a pipeline of a
    ``UNet2DModel`` and a scheduler (``DDPMPipeline``, ``DDIMPipeline``; ``null_label``: see :class:`UNet2DTeacher`)."""
    from diffusers import UNet2DModel

    if getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is not None:
        from .flow_teachers import flow_teacher_from_pipeline

        if null_label is not None:
            raise ValueError(f"model.null_label applies to UNet2DModel teachers with a class embedding, not {type(pipe).__name__}")
        return flow_teacher_from_pipeline(pipe, name=name)
    config = dict(pipe.scheduler.config)
    if isinstance(pipe.unet, UNet2DModel):
        return UNet2DTeacher(pipe.unet, checked_vp_config(config, f"{name}'s scheduler"), null_label, name=name)
    if null_label is not None:
        raise ValueError(f"model.null_label applies to UNet2DModel teachers with a class embedding, not {type(pipe).__name__}")
    if getattr(pipe, "text_encoder_2", None) is not None:
        return SDXLTeacher(
            pipe.unet, config, pipe.vae, pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2,
            force_zeros_for_empty_prompt=bool(getattr(pipe.config, "force_zeros_for_empty_prompt", True)), name=name,
        )
    if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
        raise ValueError(f"{type(pipe).__name__} has no text encoder/tokenizer; expected an SD or SDXL pipeline")
    return SDTeacher(pipe.unet, config, pipe.vae, pipe.tokenizer, pipe.text_encoder, name=name)


def builtin_teacher_path(name: str) -> Path:
    """Folder of the built-in teacher ``name`` (a key of ``BUILTIN_TEACHERS`` or one of
    ``SUITE_TEACHER_NAMES``); ``FileNotFoundError`` if missing."""
    import perflow

    if name in SUITE_TEACHER_NAMES:
        from perflow.builtin.suite import suite_teacher_path

        return suite_teacher_path(name)
    path = Path(perflow.__file__).parent.joinpath(*BUILTIN_TEACHERS[name])
    if not (path / "unet").is_dir():
        raise FileNotFoundError(
            f"the built-in {name!r} teacher is not at {path}; create it with "
            f"`python -m perflow.builtin.train_teacher --output-dir {path}`"
        )
    return path



PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def check_teacher_weights(path: Path, allow_pickle: bool = False) -> None:
    """Check a teacher folder's weights before diffusers reads them.

    Every ``*.safetensors`` in it and its subfolders must be readable (a truncated or damaged file
    is an error naming it), and a component holding only pickled weights (``.bin``, ``.pt``, ...)
    is refused unless ``allow_pickle``, with an error naming the file and the option.
    """
    from perflow.io import check_weight_files

    check_weight_files(path)
    if allow_pickle:
        return
    for folder in (path, *sorted(d for d in path.iterdir() if d.is_dir())):
        pickles = sorted(f for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES and f.is_file())
        if pickles and not list(folder.glob("*.safetensors")):
            raise ValueError(
                f"{str(pickles[0])!r} holds pickled weights and {str(folder)!r} has no .safetensors; perflow unpickles "
                "nothing unless asked: convert it to safetensors, or allow it with model.allow_pickle "
                "(perflow train --allow_pickle true; Python: load_teacher(..., allow_pickle=True)), which reads it "
                "with diffusers' restricted (weights_only) loader"
            )


def _from_pretrained(cls: Any, path: Path | str, allow_pickle: bool, **kw: Any) -> Any:
    """``cls.from_pretrained(path)`` from safetensors only (unless ``allow_pickle``); a missing file is one clear error."""
    try:
        return cls.from_pretrained(path, use_safetensors=None if allow_pickle else True, **kw)
    except OSError as err:
        if err.errno is not None:
            raise
        raise FileNotFoundError(f"cannot load {cls.__name__} from {str(path)!r}: {err}") from None


def checked_vp_config(config: dict, where: str) -> dict:
    """``config`` if it defines a discrete variance-preserving (DDPM/DDIM) beta schedule, else a ``ValueError``."""
    if "beta_schedule" not in config and config.get("trained_betas") is None:
        raise ValueError(
            f"{where} ({config.get('_class_name', 'no _class_name')}) defines no beta schedule; perflow needs a "
            "DDPM/DDIM-style (variance-preserving) scheduler config with beta_schedule or trained_betas"
        )
    return config


def unet2d_scheduler_config(folder: Path) -> dict:
    """The scheduler config of a bare ``UNet2DModel`` folder: ``folder/scheduler_config.json``,
    ``folder/scheduler/scheduler_config.json`` or ``folder/../scheduler/scheduler_config.json`` (a
    pipeline's ``unet/``); a one-line ``FileNotFoundError`` naming the places and the fix when none exists."""
    from perflow.io import read_json

    places = [folder / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json",
              folder.parent / "scheduler" / "scheduler_config.json"]
    for f in places:
        if f.is_file():
            return checked_vp_config(read_json(f), str(f))
    raise FileNotFoundError(
        f"{folder} holds a UNet2DModel but no noise schedule: save the scheduler it was trained with there, e.g. "
        f"DDPMScheduler(...).save_pretrained('{folder}') writes {places[0].name} (also read from scheduler/ in it or beside it)"
    )


def _unet2d_folder(path: Path) -> Path | None:
    """The folder of a bare ``UNet2DModel`` at ``path`` or ``path/unet`` (its ``config.json`` names the class), else None."""
    from perflow.io import read_json

    for folder in (path, path / "unet"):
        if (folder / "config.json").is_file() and read_json(folder / "config.json").get("_class_name") == "UNet2DModel":
            return folder
    return None


def load_teacher(
    spec: str | Path, dtype: torch.dtype | None = None, allow_pickle: bool = False, null_label: int | None = None
) -> Teacher:
    """Load a teacher from a folder (SD/SDXL pipeline, ``DDPMPipeline``, bare ``UNet2DModel``,
    class-conditional, UNet or flow-matching transformer) or a built-in name (``digits``, ``faces``, ``photos``,
    ``flow_digits``).

    Weights are read from safetensors only; ``allow_pickle=True`` (config ``model.allow_pickle``)
    lets diffusers read pickled ``.bin`` weights with its restricted loader. ``null_label``
    (``model.null_label``): the "no class" index of a ``UNet2DModel`` with a class embedding.
    """
    name = str(spec)
    builtin = name in BUILTIN_TEACHERS or name in SUITE_TEACHER_NAMES
    path = builtin_teacher_path(name) if builtin else Path(spec)
    kw = {} if dtype is None else {"torch_dtype": dtype}
    if not path.is_dir():
        if name.count("/") == 1 and not name.startswith((".", "/")):  # a hub id: the local cache, or a download
            from diffusers import DiffusionPipeline

            try:
                pipe = _from_pretrained(DiffusionPipeline, name, allow_pickle, **kw)
                return teacher_from_pipeline(pipe, name=name, null_label=null_label)
            except OSError as err:
                raise FileNotFoundError(f"teacher {name!r} is neither a local folder nor a loadable hub pipeline: {err}") from err
        raise FileNotFoundError(
            f"teacher {name!r} is not a folder; give a diffusers pipeline folder (model_index.json: SD, SDXL, "
            "DDPMPipeline), a UNet2DModel folder (config.json + scheduler_config.json), a class-conditional teacher "
            f"folder (unet/, scheduler/, label_encoder/) or one of {sorted([*BUILTIN_TEACHERS, *SUITE_TEACHER_NAMES])}"
        )
    from perflow.io import read_json, read_scheduler_config

    check_teacher_weights(path, allow_pickle)
    if (path / "model_index.json").is_file():
        import diffusers

        index = read_json(path / "model_index.json")
        cls_name = index.get("_class_name", "")
        needed = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
                  "tokenizer_2", "tokenizer_3")  # the components a teacher uses (not safety_checker, image_encoder...)
        missing = sorted(k for k in needed if isinstance(index.get(k), list) and index[k][:1] != [None]
                         and not (path / k).is_dir())
        if missing:
            raise FileNotFoundError(f"the pipeline folder {path} lacks {', '.join(m + '/' for m in missing)} that its "
                                    "model_index.json names; copy the complete pipeline (every component folder)")
        if "Img2Img" in cls_name or "Inpaint" in cls_name:
            raise ValueError(f"{cls_name} at {path} is not a text-to-image pipeline; give the base SD/SDXL pipeline")
        cls = getattr(diffusers, cls_name, None) or diffusers.DiffusionPipeline
        if cls_name == "StableDiffusionPipeline":
            kw["safety_checker"] = None
        pipe = _from_pretrained(cls, path, allow_pickle, **kw)
        return teacher_from_pipeline(pipe, name=name, null_label=null_label)
    if (folder := _unet2d_folder(path)) is not None:
        from diffusers import UNet2DModel

        config = unet2d_scheduler_config(folder)
        unet = _from_pretrained(UNet2DModel, folder, allow_pickle, **kw)
        return UNet2DTeacher(unet, config, null_label, name=name)
    if null_label is not None:
        raise ValueError(f"model.null_label applies to UNet2DModel teachers with a class embedding; {path} is not one")
    denoiser = "transformer" if (path / "transformer").is_dir() and not (path / "unet").is_dir() else "unet"
    missing = [d for d in (denoiser, "scheduler", "label_encoder") if not (path / d).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{path} has no model_index.json and lacks {missing}: a class-conditional teacher folder needs "
            "unet/ (or transformer/), scheduler/ and label_encoder/ (see perflow.models); a UNet2DModel folder "
            "needs config.json naming UNet2DModel"
        )
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ..models import LabelEncoder

    if denoiser == "transformer":
        from diffusers import SD3Transformer2DModel

        from .flow_teachers import LabelFlowTeacher

        transformer = _from_pretrained(SD3Transformer2DModel, path / "transformer", allow_pickle, **kw)
        label_encoder = _from_pretrained(LabelEncoder, path / "label_encoder", allow_pickle, **kw)
        return LabelFlowTeacher(transformer, read_scheduler_config(path, required=True), label_encoder, name=name)

    unet = _from_pretrained(UNet2DConditionModel, path / "unet", allow_pickle, **kw)
    label_encoder = _from_pretrained(LabelEncoder, path / "label_encoder", allow_pickle, **kw)
    config = read_scheduler_config(path, required=True)
    vae = _from_pretrained(AutoencoderKL, path / "vae", allow_pickle, **kw) if (path / "vae").is_dir() else None
    return ClassConditionalTeacher(unet, config, label_encoder, vae, name=name)


def as_teacher(obj: Any, allow_pickle: bool = False, null_label: int | None = None) -> Teacher:
    """A :class:`Teacher` from a Teacher, a diffusers pipeline (SD, SDXL, ``DDPMPipeline``), a folder path or a built-in name.

    ``allow_pickle``: for a folder, let pickled ``.bin`` weights be read (see :func:`load_teacher`);
    ``null_label``: see :class:`UNet2DTeacher` (a built :class:`Teacher` already has its own).
    """
    if isinstance(obj, Teacher):
        if null_label is not None and null_label != obj.null_label:
            raise ValueError(f"model.null_label {null_label} differs from the given teacher's null label {obj.null_label}; "
                             "leave it unset for a Teacher object")
        return obj
    if isinstance(obj, (str, Path)):
        return load_teacher(obj, allow_pickle=allow_pickle, null_label=null_label)
    if (hasattr(obj, "unet") or hasattr(obj, "transformer")) and hasattr(obj, "scheduler"):
        return teacher_from_pipeline(obj, null_label=null_label)
    raise TypeError(f"cannot make a teacher from {type(obj).__name__}; pass a Teacher, a pipeline or a folder path")
