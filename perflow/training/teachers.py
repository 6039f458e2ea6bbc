"""Frozen teachers: a UNet, its noise schedule, its condition encoders and (optionally) a VAE.

Three kinds, each loadable from a folder or built from in-memory objects:

- ``sd``: a diffusers Stable Diffusion 1.x/2.x pipeline (``model_index.json``); the teacher's
  prediction type (``epsilon`` or ``v_prediction``) is read from its scheduler config; the
  unconditional input is the empty prompt's embedding.
- ``sdxl``: a ``StableDiffusionXLPipeline`` folder; the condition adds the pooled text embedding
  and the time ids ``(original_size, crop_top_left, target_size)`` of each real image.
- ``class``: a class-conditional teacher folder with ``unet/``, ``scheduler/`` and
  ``label_encoder/`` (:class:`perflow.models.LabelEncoder`; label ``num_classes`` is the null
  label), optionally ``vae/``; without a VAE it works in pixel space. ``"digits"`` names the
  built-in digits teacher.

Every encoder runs under ``torch.no_grad`` in the teacher's dtype. Batches are dicts from
:mod:`perflow.training.data`: ``pixel_values`` ``(B, C, H, W)`` in ``[-1, 1]``, and ``caption``
(list of str) or ``label`` ``(B,)``, and for SDXL ``original_size``/``crop_top_left`` ``(B, 2)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..denoisers import Condition
from ..schedule import DiscreteVPSchedule

BUILTIN_TEACHERS = {"digits": ("builtin", "weights", "digits_teacher")}


def teacher_schedule(config: dict) -> tuple[DiscreteVPSchedule, str, dict]:
    """``(schedule, teacher prediction_type, schedule config)`` of a diffusers scheduler config.

    ``schedule`` is :meth:`perflow.schedule.DiscreteVPSchedule.from_config` (the
    ``alphas_cumprod`` :class:`perflow.PeRFlowScheduler` uses too, ``rescale_betas_zero_snr``
    included) in float64; the schedule config holds its keys with ``DDIMScheduler``'s defaults
    filled in. An ``epsilon`` teacher with zero terminal SNR (``abar(1) = 0``) is refused.
    """
    from diffusers import DDIMScheduler

    from ..schedule import SCHEDULE_KEYS
    from ..solver import TEACHER_PREDICTION_TYPES
    from ..windows import check_nonzero_abar, equal_boundaries

    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in TEACHER_PREDICTION_TYPES:
        raise ValueError(f"the teacher's scheduler has unsupported prediction_type {prediction_type!r}")
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
    and encoders."""

    kind = "base"

    def __init__(self, unet, scheduler_config: dict, vae=None, name: str = "teacher"):
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False) if vae is not None else None
        self.schedule, self.prediction_type, self.schedule_config = teacher_schedule(scheduler_config)
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

    def null_text(self) -> Condition:
        """The batch-1 null condition (empty prompt / null label)."""
        raise NotImplementedError

    def uncond(self, cond: Condition) -> Condition:
        """The null condition for the same batch (SDXL keeps each sample's time ids)."""
        if self._null is None:
            self._null = self.null_text()
        null = self._null.repeat(len(cond))
        return Condition(null.encoder_hidden_states, null.text_embeds, cond.time_ids)

    def drop(self, cond: Condition, dropped: torch.Tensor) -> Condition:
        """Rows where ``dropped`` is true replaced by the null condition (caption dropout)."""
        return cond.where(dropped, self.uncond(cond))

    def validation_condition(self, prompts: list, resolution: int) -> Condition:
        """Condition for sampling previews of ``prompts`` (captions or labels) at ``resolution``."""
        raise NotImplementedError


class ClassConditionalTeacher(Teacher):
    """A ``UNet2DConditionModel`` conditioned on :class:`perflow.models.LabelEncoder` embeddings."""

    kind = "class"

    def __init__(self, unet, scheduler_config: dict, label_encoder, vae=None, name: str = "teacher"):
        super().__init__(unet, scheduler_config, vae, name)
        self.label_encoder = label_encoder.eval().requires_grad_(False)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {**super().modules(), "label_encoder": self.label_encoder}

    @property
    def null_label(self) -> int:
        return self.label_encoder.null_label

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


# ----------------------------------------------------------------------------- construction


def teacher_from_pipeline(pipe: Any, name: str = "teacher") -> Teacher:
    """Wrap an in-memory ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``."""
    config = dict(pipe.scheduler.config)
    if getattr(pipe, "text_encoder_2", None) is not None:
        return SDXLTeacher(
            pipe.unet, config, pipe.vae, pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2,
            force_zeros_for_empty_prompt=bool(getattr(pipe.config, "force_zeros_for_empty_prompt", True)), name=name,
        )
    if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
        raise ValueError(f"{type(pipe).__name__} has no text encoder/tokenizer; expected an SD or SDXL pipeline")
    return SDTeacher(pipe.unet, config, pipe.vae, pipe.tokenizer, pipe.text_encoder, name=name)


def builtin_teacher_path(name: str) -> Path:
    """Folder of the built-in teacher ``name`` (a key of ``BUILTIN_TEACHERS``); ``FileNotFoundError`` if missing."""
    import perflow

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


def load_teacher(spec: str | Path, dtype: torch.dtype | None = None, allow_pickle: bool = False) -> Teacher:
    """Load a teacher from a folder (SD/SDXL pipeline or class-conditional) or a built-in name (``digits``).

    Weights are read from safetensors only; ``allow_pickle=True`` (config ``model.allow_pickle``)
    lets diffusers read pickled ``.bin`` weights with its restricted loader.
    """
    name = str(spec)
    path = builtin_teacher_path(name) if name in BUILTIN_TEACHERS else Path(spec)
    kw = {} if dtype is None else {"torch_dtype": dtype}
    if not path.is_dir():
        if name.count("/") == 1 and not name.startswith((".", "/")):  # a hub id: the local cache, or a download
            from diffusers import DiffusionPipeline

            try:
                return teacher_from_pipeline(_from_pretrained(DiffusionPipeline, name, allow_pickle, **kw), name=name)
            except OSError as err:
                raise FileNotFoundError(f"teacher {name!r} is neither a local folder nor a loadable hub pipeline: {err}") from err
        raise FileNotFoundError(
            f"teacher {name!r} is not a folder; give a diffusers pipeline folder (model_index.json), a "
            f"class-conditional teacher folder (unet/, scheduler/, label_encoder/) or one of {sorted(BUILTIN_TEACHERS)}"
        )
    from perflow.io import read_json, read_scheduler_config

    check_teacher_weights(path, allow_pickle)
    if (path / "model_index.json").is_file():
        import diffusers

        index = read_json(path / "model_index.json")
        cls_name = index.get("_class_name", "")
        if "Img2Img" in cls_name or "Inpaint" in cls_name:
            raise ValueError(f"{cls_name} at {path} is not a text-to-image pipeline; give the base SD/SDXL pipeline")
        cls = getattr(diffusers, cls_name, None) or diffusers.DiffusionPipeline
        if cls_name == "StableDiffusionPipeline":
            kw["safety_checker"] = None
        pipe = _from_pretrained(cls, path, allow_pickle, **kw)
        return teacher_from_pipeline(pipe, name=name)
    missing = [d for d in ("unet", "scheduler", "label_encoder") if not (path / d).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{path} has no model_index.json and lacks {missing}: a class-conditional teacher folder needs "
            "unet/, scheduler/ and label_encoder/ (see perflow.models)"
        )
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ..models import LabelEncoder

    unet = _from_pretrained(UNet2DConditionModel, path / "unet", allow_pickle, **kw)
    label_encoder = _from_pretrained(LabelEncoder, path / "label_encoder", allow_pickle, **kw)
    config = read_scheduler_config(path, required=True)
    vae = _from_pretrained(AutoencoderKL, path / "vae", allow_pickle, **kw) if (path / "vae").is_dir() else None
    return ClassConditionalTeacher(unet, config, label_encoder, vae, name=name)


def as_teacher(obj: Any, allow_pickle: bool = False) -> Teacher:
    """A :class:`Teacher` from a Teacher, a diffusers SD/SDXL pipeline, a folder path or a built-in name.

    ``allow_pickle``: for a folder, let pickled ``.bin`` weights be read (see :func:`load_teacher`).
    """
    if isinstance(obj, Teacher):
        return obj
    if isinstance(obj, (str, Path)):
        return load_teacher(obj, allow_pickle=allow_pickle)
    if hasattr(obj, "unet") and hasattr(obj, "scheduler"):
        return teacher_from_pipeline(obj)
    raise TypeError(f"cannot make a teacher from {type(obj).__name__}; pass a Teacher, a pipeline or a folder path")
