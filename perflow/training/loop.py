"""The piecewise-reflow training loop on ``accelerate``.

One optimizer step (``METHOD.md`` sections 2-3), per process:

1. a batch of real images -> ``x0`` (VAE latents, or pixels) and the condition ``c``;
2. caption dropout: ``c <- null`` with probability ``p`` (the student sees this ``c``);
3. the teacher denoiser for ``c`` (CFG-sync: ``w = 1``; CFG-fixed: ``w*`` on ``(c, null)``,
   unconditional where the caption was dropped), and
   :func:`perflow.objective.reflow_example`: ``t`` -> window ``(t_s, t_e)``, ``z_s`` by the forward
   process, ``z_e`` by ``n`` DDIM teacher steps, ``z_t`` on the segment, the target;
4. loss ``mean(weight * rho(student(z_t, t T, c) - target))`` with ``rho`` squared error or
   pseudo-Huber; AdamW with warm-up and clipping, gradient accumulation, mixed precision over an
   fp32 student, EMA of the weights.

Randomness comes from one CPU generator per rank (seeded from ``seed`` and the rank) and a seeded
sampler, both saved in checkpoints, so an interrupted run resumes bit-exactly.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..denoisers import guided_teacher_denoiser
from ..objective import reflow_example
from ..windows import (
    check_boundaries, check_nonzero_abar, check_window_spacing, equal_boundaries, window_coefficients,
)
from .config import TrainConfig, make_config
from .teachers import ClassConditionalTeacher, Teacher, as_teacher

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MP_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    student: torch.nn.Module
    """The trained student UNet (the EMA weights when EMA is on and ``output.save_ema``), on the training device."""
    teacher: Teacher
    scheduler: Any
    """The matching :class:`perflow.PeRFlowScheduler`."""
    output_dir: Path
    global_step: int
    losses: list[float] = field(default_factory=list)
    """Per optimizer step, averaged over processes and accumulation."""
    seconds: float = 0.0
    samples_per_second: float = 0.0
    """Training samples per second over the run (all processes)."""
    teacher_evals_per_sample: float = 0.0
    """Teacher UNet evaluations per training sample: ``n`` (``2 n`` with CFG-fixed)."""
    files: dict[str, Path] = field(default_factory=dict)
    num_processes: int = 1


def boundaries_of(cfg: TrainConfig, alphas_cumprod: torch.Tensor | None = None) -> torch.Tensor:
    """Window boundaries ``[1, ..., 0]`` (float64) from the config, checked against the teacher's schedule if given."""
    p = cfg.perflow
    explicit = p.window_boundaries is not None
    b = check_boundaries(p.window_boundaries) if explicit else equal_boundaries(p.num_time_windows)
    if alphas_cumprod is not None:  # distinct teacher indices per window; no division by abar = 0
        check_window_spacing(b, alphas_cumprod.numel(), p.num_solver_steps)
        check_nonzero_abar(b, alphas_cumprod, p.prediction_type)
    return b


def reflow_loss(
    pred: torch.Tensor, target: torch.Tensor, kind: str, huber_c: float, weight: torch.Tensor | None
) -> torch.Tensor:
    """``mean_b weight_b mean_i rho(pred - target)``, ``rho(d) = d^2`` or ``sqrt(d^2 + c^2) - c``."""
    d = pred.float() - target.float()
    rho = d.square() if kind == "mse" else (d.square() + huber_c**2).sqrt() - huber_c
    per_sample = rho.flatten(1).mean(1)  # (B,)
    if weight is not None:
        per_sample = per_sample * weight
    return per_sample.mean()


def window_end_weight(ex, alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Weight making the loss the squared error of the predicted window end ``z_e_hat``.

    From ``z_e_hat = (lam (t_e - t_s) z + eta (t_e - t) out) / (lam (t - t_s) + (t_e - t))``:
    ``d z_e_hat / d out = eta (t_e - t) / (lam (t - t_s) + t_e - t)``; for ``velocity`` it is ``t_e - t``.
    """
    t, t_s, t_e = ex.t, ex.t_s, ex.t_e
    if prediction_type == "velocity":
        return ((t_e - t) ** 2).float()
    lam, eta = window_coefficients(t_s, t_e, alphas_cumprod.to(torch.float64), prediction_type)
    return (eta * (t_e - t) / (lam * (t - t_s) + (t_e - t))).square().float()


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    tr, out = cfg.training, cfg.output
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", None) not in (None, tr.mixed_precision):
        AcceleratorState._reset_state()  # a new run in the same process with another precision
    trackers = None if out.tracker in ("none", "", None) else out.tracker
    # torchrun on a machine without CUDA: accelerate needs cpu=True to form the gloo group (MULTI_CPU)
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        cpu=cpu,
        mixed_precision=tr.mixed_precision,
        gradient_accumulation_steps=tr.gradient_accumulation_steps,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=out.output_dir, logging_dir=str(Path(out.output_dir) / "logs")),
    )


def _default_prompts(teacher: Teacher) -> list:
    if isinstance(teacher, ClassConditionalTeacher):
        return list(range(teacher.null_label))
    return ["a photo of a cat", "a painting of a dog", "a red digit", ""]


def train(
    config: TrainConfig | dict | str | None = None,
    teacher: Any = None,
    dataset: Any = None,
    callback: Callable[[int, float], None] | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train a PeRFlow student from a teacher; returns a :class:`TrainResult`.

    ``config``: a :class:`TrainConfig`, a ``{section: {field: value}}`` dict, a YAML/TOML path or a
    recipe name (``digits``, ``sd15``, ...). ``overrides`` set fields by name
    (``max_steps=100`` or ``**{"training.max_steps": 100}``). ``teacher``: an in-memory
    :class:`~perflow.training.teachers.Teacher`, an SD/SDXL pipeline or a folder path (default:
    ``config.model.teacher``). ``dataset``: a map-style dataset of ``{"pixel_values", "label" |
    "caption"}`` items (default: ``config.data``). ``callback(step, loss)`` runs after each step
    (raise from it to stop; checkpoints let ``resume="latest"`` continue).

    An in-memory teacher is used in place: it is frozen and moved to the training device and dtype.
    """
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from .checkpoint import load_checkpoint, resolve_resume, save_checkpoint
    from .data import build_dataset, make_loader
    from .export import export_student, perflow_scheduler
    from ..time_sampling import make_time_sampler

    cfg = make_config(config, overrides)
    p, tr, out, dc = cfg.perflow, cfg.training, cfg.output, cfg.data

    accelerator = _accelerator(cfg)
    device = accelerator.device
    set_seed(tr.seed)
    output_dir = Path(out.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    # ---- teacher (frozen, its own dtype) and student (fp32 master copy) ----------------------
    teacher_obj = as_teacher(teacher if teacher is not None else cfg.model.teacher, cfg.model.allow_pickle)
    tdtype = MP_DTYPES[tr.mixed_precision] if cfg.model.teacher_dtype == "auto" else DTYPES[cfg.model.teacher_dtype]
    if device.type == "cpu" and tdtype == torch.float16:
        tdtype = torch.float32  # fp16 kernels are missing or slow on CPU
    student = copy.deepcopy(teacher_obj.unet).to(device)
    if cfg.model.student_init:
        _load_student_init(student, cfg.model.student_init)
    if student.dtype != torch.float32:
        student.to(dtype=torch.float32)
    reference = None  # the teacher's own weights, for the delta, when training casts the teacher
    if out.save_delta and tdtype != teacher_obj.dtype and accelerator.is_main_process:
        reference = {k: v.detach().to("cpu", copy=True) for k, v in teacher_obj.unet.state_dict().items()}
    teacher_obj.to(device, tdtype)
    student.requires_grad_(True).train()
    if cfg.model.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    param_names = [n for n, _ in student.named_parameters()]

    ds = dataset if dataset is not None else build_dataset(dc, seed=tr.seed)
    boundaries = boundaries_of(cfg, teacher_obj.alphas_cumprod)
    ac = teacher_obj.alphas_cumprod
    time_sampler = make_time_sampler(p.time_sampling, boundaries, p.u_shape_a)

    opt = torch.optim.AdamW(
        student.parameters(), lr=tr.learning_rate, betas=(tr.adam_beta1, tr.adam_beta2),
        weight_decay=tr.weight_decay, eps=tr.adam_epsilon,
    )
    lr_sched = get_scheduler(
        tr.lr_scheduler, opt, num_warmup_steps=tr.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=tr.max_steps * accelerator.num_processes,
    )
    student, opt, lr_sched = accelerator.prepare(student, opt, lr_sched)
    raw_student = accelerator.unwrap_model(student)
    ema = EMAModel(raw_student.parameters(), decay=tr.ema_decay) if tr.ema_decay > 0 else None
    if ema is not None:
        ema.to(device)

    generator = torch.Generator().manual_seed(tr.seed * 1_000_003 + 7919 * (accelerator.process_index + 1))
    global_step, micro_step, losses = 0, 0, []
    resume_from = resolve_resume(out.resume, output_dir)
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from, ema, param_names, generator)
        global_step, micro_step, losses = state["global_step"], state["micro_step"], list(state.get("losses", []))
        if accelerator.is_main_process:
            print(f"resumed from {resume_from} at step {global_step}")

    loader, sampler = make_loader(
        ds, tr.batch_size, accelerator.num_processes, accelerator.process_index, tr.seed, micro_step, dc.num_workers
    )
    if accelerator.is_main_process and out.tracker not in ("none", "", None):
        accelerator.init_trackers("perflow", config=_flat(cfg.to_dict()))
    scheduler = perflow_scheduler(teacher_obj, p.prediction_type, boundaries, len(boundaries) - 1)
    evals_per_sample = p.num_solver_steps * (2 if (p.cfg_mode == "fixed" and p.guidance_scale != 1.0) else 1)

    bar = tqdm(total=tr.max_steps, initial=global_step, desc="perflow train", unit="step",
               disable=not (out.progress and accelerator.is_local_main_process))
    start, start_step = time.perf_counter(), global_step
    acc_loss = torch.zeros((), device=device)
    data_iter = iter(loader)
    while global_step < tr.max_steps:
        batch = next(data_iter)
        micro_step += 1
        with accelerator.accumulate(student):
            loss = _micro_step(batch, cfg, teacher_obj, student, boundaries, ac, time_sampler, generator, device)
            accelerator.backward(loss)
            if accelerator.sync_gradients and tr.max_grad_norm > 0:
                accelerator.clip_grad_norm_(student.parameters(), tr.max_grad_norm)
            opt.step()
            lr_sched.step()
            opt.zero_grad(set_to_none=True)
        acc_loss += loss.detach() / tr.gradient_accumulation_steps
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        if ema is not None:
            ema.step(raw_student.parameters())
        step_loss = accelerator.reduce(acc_loss, reduction="mean").item()
        acc_loss.zero_()
        losses.append(step_loss)
        bar.update(1)
        if global_step % out.log_every == 0 or global_step == tr.max_steps:
            bar.set_postfix(loss=f"{step_loss:.4g}")
            accelerator.log({"loss": step_loss, "lr": lr_sched.get_last_lr()[0]}, step=global_step)
        if callback is not None:
            callback(global_step, step_loss)
        if out.checkpoint_every and global_step % out.checkpoint_every == 0:
            epoch, index = sampler.position(micro_step)
            state = {"global_step": global_step, "micro_step": micro_step, "epoch": epoch, "batch_index": index,
                     "losses": losses, "config": cfg.to_dict()}
            save_checkpoint(accelerator, output_dir, global_step, state, ema, param_names, generator, out.keep_checkpoints)
        if out.validation_every and global_step % out.validation_every == 0 and accelerator.is_main_process:
            _validate(cfg, raw_student, ema, teacher_obj, scheduler, output_dir / "validation" / f"step-{global_step:07d}.png")
    bar.close()
    seconds = time.perf_counter() - start
    steps_done = global_step - start_step
    global_batch = tr.batch_size * accelerator.num_processes * tr.gradient_accumulation_steps

    # ---- final outputs ---------------------------------------------------------------------
    accelerator.wait_for_everyone()
    final = raw_student
    if ema is not None and out.save_ema:
        final = copy.deepcopy(raw_student)
        ema.copy_to(final.parameters())
    final.eval().requires_grad_(False)
    files: dict[str, Path] = {}
    if accelerator.is_main_process:
        files = export_student(
            output_dir, final, teacher_obj, scheduler, p.cfg_mode, save_pipeline=out.save_pipeline,
            save_delta=out.save_delta, teacher_weights=reference,
        )
        summary = {"global_step": global_step, "final_loss": losses[-1] if losses else None, "seconds": seconds,
                   "samples_per_second": steps_done * global_batch / seconds if seconds > 0 else 0.0,
                   "teacher_evals_per_sample": evals_per_sample, "config": cfg.to_dict()}
        (output_dir / "perflow_training.json").write_text(json.dumps(summary, indent=1))
        files["summary"] = output_dir / "perflow_training.json"
    for tracker in accelerator.trackers:  # not end_training(): that destroys the caller's process group
        tracker.finish()
    return TrainResult(
        student=final, teacher=teacher_obj, scheduler=scheduler, output_dir=output_dir, global_step=global_step,
        losses=losses, seconds=seconds,
        samples_per_second=steps_done * global_batch / seconds if seconds > 0 else 0.0,
        teacher_evals_per_sample=float(evals_per_sample), files=files, num_processes=accelerator.num_processes,
    )


def _load_student_init(student: torch.nn.Module, path: str) -> None:
    """Copy a saved UNet's weights (a ``save_pretrained`` folder or its parent) into the student."""
    from diffusers import UNet2DConditionModel

    from perflow.io import check_weight_files

    folder = Path(path)
    if (folder / "unet" / "config.json").is_file():
        folder = folder / "unet"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model.student_init {path!r} is not a diffusers UNet folder (config.json missing)")
    check_weight_files(folder)  # a truncated or damaged file: an error naming it, not a traceback
    try:
        init = UNet2DConditionModel.from_pretrained(folder, use_safetensors=True).state_dict()
    except OSError as err:
        raise FileNotFoundError(f"model.student_init {path!r}: no readable safetensors UNet weights ({err})") from None
    own = student.state_dict()
    bad = sorted(set(init) ^ set(own)) + [k for k in own if k in init and init[k].shape != own[k].shape]
    if bad:
        raise ValueError(f"model.student_init {path!r} does not match the teacher's UNet architecture: {bad[:5]}")
    student.load_state_dict({k: v.to(own[k].dtype) for k, v in init.items()})


def _micro_step(batch, cfg: TrainConfig, teacher: Teacher, student, boundaries, ac, time_sampler, generator, device):
    """Loss of one micro-batch (see the module docstring)."""
    p, tr, dc = cfg.perflow, cfg.training, cfg.data
    pixels = batch["pixel_values"].to(device, non_blocking=True)
    x0 = teacher.encode_images(pixels, generator)  # (B, C, h, w) fp32
    b = x0.shape[0]
    cond = teacher.condition(batch)
    if dc.caption_free:
        dropped = torch.ones(b, dtype=torch.bool)
    elif dc.caption_dropout > 0:
        dropped = torch.rand(b, generator=generator) < dc.caption_dropout
    else:
        dropped = torch.zeros(b, dtype=torch.bool)
    cond_s = teacher.drop(cond, dropped) if bool(dropped.any()) else cond
    den = guided_teacher_denoiser(teacher.unet, cond_s, teacher.uncond(cond_s), dropped, p.cfg_mode, p.guidance_scale)
    ex = reflow_example(
        den, x0, boundaries, ac, p.num_solver_steps, p.prediction_type, teacher.prediction_type,
        generator=generator, time_sampler=time_sampler,
    )
    pred = student(ex.z_t, ex.timestep, **cond_s.to(device, torch.float32).unet_kwargs(), return_dict=False)[0]
    weight = window_end_weight(ex, ac, p.prediction_type) if tr.loss_weighting == "window_end" else None
    return reflow_loss(pred, ex.target, tr.loss, tr.huber_c, weight)


@torch.no_grad()
def _validate(cfg: TrainConfig, student, ema, teacher: Teacher, scheduler, path: Path) -> Path:
    """Sample the (EMA) student on the validation prompts and save a grid PNG."""
    from .validation import image_grid, sample_student, save_png

    o, p, dc = cfg.output, cfg.perflow, cfg.data
    prompts = o.validation_prompts if o.validation_prompts else _default_prompts(teacher)
    w = o.validation_guidance_scale
    if w is None:  # CFG-fixed students are sampled without guidance; sync ones with the teacher's usual scale
        w = 1.0 if p.cfg_mode == "fixed" else (2.0 if isinstance(teacher, ClassConditionalTeacher) else 7.5)
    if ema is not None:
        ema.store(student.parameters())
        ema.copy_to(student.parameters())
    was_training = student.training
    student.eval()
    try:
        cond = teacher.validation_condition(prompts, dc.resolution)
        size = dc.resolution // teacher.vae_scale
        shape = (len(prompts), teacher.latent_channels, size, size)
        gen = torch.Generator().manual_seed(cfg.training.seed)
        z = sample_student(student, scheduler, cond, teacher.uncond(cond), shape, o.validation_steps, w, gen)
        images = teacher.decode_latents(z)
        return save_png(image_grid(images), path)
    finally:
        student.train(was_training)
        if ema is not None:
            ema.restore(student.parameters())


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


__all__ = ["TrainResult", "train", "reflow_loss", "window_end_weight", "boundaries_of"]
