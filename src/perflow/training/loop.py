"""The piecewise-reflow training loop on ``accelerate``.

One optimizer step (``docs/method.md``, row "one training batch"), per process:

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
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..denoisers import guided_teacher_denoiser
from ..objective import batch_loss, reflow_example
from ..parameterization import resolve_model_output_type
from ..schedule import NoiseSchedule, as_schedule
from ..windows import resolve_boundaries, short_last_boundaries
from .config import OptimConfig, TrainConfig
from .config_io import make_config
from .data import BadImageError
from ..io import write_text
from .outdir import SUMMARY_FILE, WRITE_ERRORS, OutputDirError, OutputLock
from .runs import RunNotes, RunStart, on_main, open_run
from .safety import NonFiniteError, StopSignals, TrainingInterrupted, nonfinite_message, nonfinite_names
from .teachers import Teacher, as_teacher

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CAPTION_FREE_GRID = 16
"""Samples in the validation grid of a caption-free (unconditional) run."""
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
    run_id: str = ""
    """The run's id, recorded in its checkpoints and ``perflow_training.json``."""
    bad_images: list[str] = field(default_factory=list)
    """Unreadable images skipped (``data.on_bad_image skip``), with the reason."""
    missing_captions: int = 0
    """Samples of captioned batches that had no caption (trained with the null caption)."""
    nonfinite_skips: int = 0
    """Steps skipped for a non-finite loss or gradient (``training.max_nonfinite_skips``)."""


def student_output_type(cfg: TrainConfig, teacher: Teacher) -> str:
    """The student network's output type (``perflow.model_output_type``, ``auto`` resolved against the
    teacher: :func:`perflow.parameterization.resolve_model_output_type`)."""
    p = cfg.perflow
    return resolve_model_output_type(p.model_output_type, p.prediction_type, teacher.prediction_type)


def with_parameterization(cfg: TrainConfig, teacher: Teacher) -> TrainConfig:
    """``cfg`` with ``perflow.prediction_type: auto`` replaced by the teacher's default parameterization
    (:attr:`~perflow.training.teachers.Teacher.default_parameterization`); other values are kept, and checked
    by the teacher (:meth:`~perflow.training.teachers.Teacher.check_training`) and the config."""
    if cfg.perflow.prediction_type != "auto":
        return cfg
    resolved = dataclasses.replace(cfg, perflow=dataclasses.replace(cfg.perflow, prediction_type=teacher.default_parameterization))
    return resolved.validate()


def with_data(cfg: TrainConfig, teacher: Teacher) -> TrainConfig:
    """``cfg`` with ``data.source: auto`` resolved from ``data.path``
    (:func:`perflow.training.data.resolve_source`) and an unset ``data.resolution`` set to the teacher's
    own (:attr:`~perflow.training.teachers.Teacher.native_resolution`); other values are kept."""
    from .data import resolve_source

    d = cfg.data
    resolution = teacher.resolution(d.resolution, "--data.resolution")
    data = dataclasses.replace(d, source=resolve_source(d.source, d.path), resolution=resolution)
    return dataclasses.replace(cfg, data=data).validate()


def boundaries_of(cfg: TrainConfig, schedule: NoiseSchedule | torch.Tensor | None = None) -> torch.Tensor:
    """Window boundaries ``[1, ..., 0]`` (float64) from the config (:func:`perflow.windows.resolve_boundaries`),
    checked against the teacher's schedule (or its ``alphas_cumprod``) if given."""
    p = cfg.perflow
    explicit = p.window_boundaries
    if explicit is None and p.last_window_fraction != 1.0:
        explicit = short_last_boundaries(p.num_time_windows, p.last_window_fraction)
    return resolve_boundaries(
        p.num_time_windows, explicit, None if schedule is None else as_schedule(schedule),
        p.num_solver_steps, p.prediction_type,
    )


def lr_scheduler_name(tr) -> str:
    """The diffusers scheduler to build: ``constant`` with ``lr_warmup_steps > 0`` is ``constant_with_warmup``
    (diffusers' ``constant`` ignores the warm-up, which then silently did nothing)."""
    return "constant_with_warmup" if tr.lr_scheduler == "constant" and tr.lr_warmup_steps > 0 else tr.lr_scheduler


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

    The output folder is checked, locked and claimed for this run before the teacher loads
    (:mod:`perflow.training.outdir`). SIGINT/SIGTERM save a checkpoint at the end of the step and
    raise :class:`~perflow.training.safety.TrainingInterrupted`; a non-finite loss or gradient raises
    :class:`~perflow.training.safety.NonFiniteError` before it is applied.
    """
    from accelerate.utils import set_seed

    cfg = make_config(config, overrides)
    accelerator = _accelerator(cfg)
    set_seed(cfg.training.seed)
    locks: list[OutputLock] = []
    with StopSignals() as stop:
        try:
            start = on_main(accelerator, lambda: open_run(cfg, locks))
            return _train(cfg, accelerator, start, stop, teacher, dataset, callback)
        finally:
            for lock in locks:
                lock.release()


def _train(cfg: TrainConfig, accelerator, start: RunStart, stop: StopSignals, teacher, dataset, callback) -> TrainResult:
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from ..time_sampling import make_time_sampler
    from .checkpoint import CheckpointError, load_checkpoint, load_extra, save_checkpoint
    from .data import build_dataset, check_channels, check_dataset_size, close_loader, make_loader, teacher_labels
    from .export import perflow_scheduler
    from .fidelity import BEST_FILE, BestStudent, FidelityCheck, ema_weights, k_step_scheduler, sampler_states

    p, tr, out, dc = cfg.perflow, cfg.training, cfg.output, cfg.data
    device = accelerator.device
    output_dir = Path(out.output_dir)

    # ---- teacher (frozen, its own dtype) and student (fp32 master copy) ----------------------
    teacher_obj = as_teacher(teacher if teacher is not None else cfg.model.teacher, cfg.model.allow_pickle, cfg.model.null_label)
    saved_config = cfg.to_dict()  # what checkpoints record: the settings as given (``auto`` kept, so a resume matches)
    given = cfg.data
    cfg = with_data(with_parameterization(cfg, teacher_obj), teacher_obj)
    p, dc = cfg.perflow, cfg.data
    if dataset is None and dc.source == "digits" and teacher_obj.uses_text:
        raise ValueError(f"the text-to-image teacher {teacher_obj.name!r} needs captioned images: give --data.path (an "
                         "image folder with metadata.jsonl, or tar shards); the built-in digits are for the digits teachers")
    if dataset is None and accelerator.is_main_process and (given.source == "auto" or given.resolution is None):
        print(f"data: {dc.source}" + (f" {dc.path}" if dc.path else " (built-in; give data.path for your images)")
              + f" at {dc.resolution} px" + (" (the teacher's own resolution)" if given.resolution is None else ""))
    if accelerator.is_main_process and accelerator.num_processes > 1:
        print(f"{accelerator.num_processes} processes x batch {tr.batch_size} x {tr.gradient_accumulation_steps} accumulation "
              f"= global batch {tr.batch_size * accelerator.num_processes * tr.gradient_accumulation_steps}")
    elif os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") and "WORLD_SIZE" not in os.environ:
        print("note: one process (`accelerate launch --cpu` starts one whatever --num_processes says; for several "
              "CPU processes use `accelerate launch --multi_gpu --num_processes N` or torchrun, docs/training.md)")
    teacher_obj.check_training(cfg)
    teacher_obj.configure(cfg)
    tdtype = MP_DTYPES[tr.mixed_precision] if cfg.model.teacher_dtype == "auto" else DTYPES[cfg.model.teacher_dtype]
    if device.type == "cpu" and tdtype == torch.float16:
        tdtype = torch.float32  # fp16 kernels are missing or slow on CPU
    if device.type == "cpu" and tr.mixed_precision == "fp16" and accelerator.is_main_process:
        print("note: mixed_precision fp16 has no effect on the CPU (accelerate applies no fp16 autocast there): this "
              "run trains in float32; use bf16 for reduced precision on the CPU")
    student = copy.deepcopy(teacher_obj.unet).to(device)
    if cfg.model.student_init:
        load_student_init(student, cfg.model.student_init)
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

    channels = image_channels(teacher_obj)
    ds = dataset if dataset is not None else build_dataset(dc, tr.seed, channels, teacher_labels(teacher_obj, dc))
    check_channels(ds, channels)
    check_dataset_size(len(ds), tr.batch_size, accelerator.num_processes)  # before minutes of calibration
    schedule = teacher_obj.schedule
    boundaries = boundaries_of(cfg, schedule)
    time_sampler = make_time_sampler(p.time_sampling, boundaries, p.u_shape_a, p.logit_normal_mean, p.logit_normal_std,
                                     p.window_start_prob, p.batch_windows)
    solver_steps = solver_steps_of(cfg, teacher_obj, ds, boundaries, device,
                                   progress=out.progress and accelerator.is_local_main_process,
                                   resume_from=start.resume_from, num_processes=accelerator.num_processes)
    if solver_steps != p.num_solver_steps:
        if accelerator.is_main_process:
            print(f"teacher steps per window ({p.solver_step_allocation}, {p.num_solver_steps} x {len(solver_steps)} "
                  f"in all): {solver_steps}")
        cfg = dataclasses.replace(cfg, perflow=dataclasses.replace(p, num_solver_steps=solver_steps))
        p = cfg.perflow
    window_weights = window_weights_of(cfg, teacher_obj, ds, boundaries, device,
                                       progress=out.progress and accelerator.is_local_main_process,
                                       resume_from=start.resume_from, num_processes=accelerator.num_processes)
    if window_weights is not None and accelerator.is_main_process:
        print(f"window loss weights ({tr.window_weights}): {[round(float(w), 3) for w in window_weights]}")
    recorded_weights = None if window_weights is None else [float(w) for w in window_weights]

    opt = torch.optim.AdamW(
        student.parameters(), lr=tr.learning_rate, betas=(tr.adam_beta1, tr.adam_beta2),
        weight_decay=tr.weight_decay, eps=tr.adam_epsilon,
    )
    lr_sched = get_scheduler(
        lr_scheduler_name(tr), opt, num_warmup_steps=tr.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=tr.max_steps * accelerator.num_processes,
    )
    student, opt, lr_sched = accelerator.prepare(student, opt, lr_sched)
    raw_student = accelerator.unwrap_model(student)
    ema = student_ema(raw_student.parameters(), tr)
    if ema is not None:
        ema.to(device)

    generator = torch.Generator().manual_seed(tr.seed * 1_000_003 + 7919 * (accelerator.process_index + 1))
    global_step, micro_step, losses = 0, 0, []
    notes = RunNotes()
    best = BestStudent()
    if start.resume_from is not None:
        state = load_checkpoint(accelerator, start.resume_from, ema, param_names, generator)
        if state.get("dataset_size") not in (None, len(ds)):
            raise CheckpointError(
                f"the training data changed since {start.resume_from.name}: {state['dataset_size']} items then, {len(ds)} "
                "now, so the saved data position would read other images; restore the data, or start a new run "
                "(--overwrite true, or another --output_dir)")
        global_step, micro_step, losses = state["global_step"], state["micro_step"], list(state.get("losses", []))
        notes.restore(state)
        kept = state.get("best_step") is not None and accelerator.is_main_process
        best.restore(state, load_extra(start.resume_from, BEST_FILE) if kept else None)
        if accelerator.is_main_process:
            print(f"resumed from {start.resume_from} at step {global_step}")

    loader, sampler = make_loader(
        ds, tr.batch_size, accelerator.num_processes, accelerator.process_index, tr.seed, micro_step, dc.num_workers
    )
    if accelerator.is_main_process and out.tracker not in ("none", "", None):
        # purge_step: TensorBoard drops what a killed run logged after the checkpoint, which is logged again now
        accelerator.init_trackers("perflow", config=_flat(cfg.to_dict()),
                                  init_kwargs={"tensorboard": {"purge_step": global_step + 1}})
    scheduler = perflow_scheduler(teacher_obj, p.prediction_type, boundaries, len(boundaries) - 1,
                                  student_output_type(cfg, teacher_obj))
    check = None
    if tr.fidelity_check_every and accelerator.is_main_process:  # the check runs on the main process only
        check = FidelityCheck.build(
            _calibration_batches(cfg, teacher_obj, ds, device, "fidelity check (teacher's chain)",
                                 out.progress and accelerator.is_local_main_process, size=tr.batch_size),
            boundaries, p.num_solver_steps, teacher_obj.prediction_type, teacher_obj.clip_sample, scheduler)
    own_starts = None
    if p.student_starts > 0:
        k_step = k_step_scheduler(scheduler, len(boundaries) - 1, device)

        def own_starts(cond, noise, k):
            with ema_weights(ema, raw_student) as model:
                return sampler_states(model, cond, k_step, noise, k)

    mean_steps = p.num_solver_steps if isinstance(p.num_solver_steps, int) else sum(p.num_solver_steps) / len(p.num_solver_steps)
    evals_per_sample = mean_steps * (2 if (p.cfg_mode == "fixed" and p.guidance_scale != 1.0) else 1)

    bar = tqdm(total=tr.max_steps, initial=global_step, desc="perflow train", unit="step",
               disable=not (out.progress and accelerator.is_local_main_process))

    def log(msg: str) -> None:
        tqdm.write(msg, file=sys.stderr)

    def info(msg: str) -> None:
        tqdm.write(msg)  # stdout, as the run's other measurements

    exported_ema = ema if out.save_ema else None  # the check measures the weights the run would export

    def fidelity_check() -> None:
        """Check the (EMA) student's K-step fidelity; keep it if it is the best so far."""
        with ema_weights(exported_ema, raw_student) as model:
            err = check.error(model)
            kept = best.offer(global_step, err, model.named_parameters())
        accelerator.log({"fidelity": err}, step=global_step)
        info(f"fidelity at step {global_step}: {err:.4g} (K-step sample vs the teacher's chain; best {best.error:.4g} "
            f"at step {best.step})" + (" kept" if kept else ""))

    if check is not None and start.resume_from is None:
        with ema_weights(exported_ema, raw_student) as model:
            start_error = check.error(model)
        info(f"fidelity of the untrained student: {start_error:.4g} (K-step sample vs the teacher's chain of window solves)")
        best.history.append([0, start_error])

    last_checkpoint = start.resume_from

    def checkpoint() -> Path:
        """Save a checkpoint of this step (refusing non-finite weights, so rotation only ever drops finite ones)."""
        named = list(raw_student.named_parameters())
        if ema is not None:
            named += [(f"ema.{n}", t) for n, t in zip(param_names, ema.shadow_params)]
        if bad := nonfinite_names(named):
            raise NonFiniteError(f"the weights hold NaN/inf after step {global_step} ({len(bad)} tensors, e.g. {bad[0]}); "
                                 f"not saved (the newest checkpoint {last_checkpoint} is intact)")
        epoch, index = sampler.position(micro_step)
        state = {"global_step": global_step, "micro_step": micro_step, "epoch": epoch, "batch_index": index,
                 "dataset_size": len(ds), "losses": losses, "config": saved_config, "run_id": start.run_id,
                 "num_processes": accelerator.num_processes, "window_weights": recorded_weights,
                 "solver_steps": p.num_solver_steps, **notes.state(), **best.state()}
        extra = {BEST_FILE: best.weights} if best.weights is not None and accelerator.is_main_process else None
        return save_checkpoint(accelerator, output_dir, global_step, state, ema, param_names, generator,
                               out.keep_checkpoints, start.run_ids, extra)

    start_time, start_step = time.perf_counter(), global_step
    acc_loss = torch.zeros((), device=device)
    params = list(student.parameters())
    try:
        data_iter = iter(loader)
        stop.deferred, stop.step = True, global_step
        while global_step < tr.max_steps:
            batch = _next_batch(data_iter)
            micro_step += 1
            notes.add_batch(batch, log)
            with accelerator.accumulate(student):
                loss = training_loss(batch, cfg, teacher_obj, student, boundaries, schedule, time_sampler, generator, device,
                                     window_weights, own_starts)
                accelerator.backward(loss)
                acc_loss += loss.detach() / tr.gradient_accumulation_steps
                finite = True
                if accelerator.sync_gradients:
                    grad_norm = _checked_grad_norm(accelerator, params, tr.max_grad_norm)
                    step_loss, norm, stop_all = _step_values(accelerator, acc_loss, grad_norm, stop)
                    finite = math.isfinite(step_loss) and math.isfinite(norm)
                if finite or accelerator.scaler is not None:  # fp16's grad scaler skips a non-finite step itself
                    opt.step()
                    lr_sched.step()
                opt.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            acc_loss.zero_()
            if not finite:
                notes.nonfinite_skips += 1
                if notes.nonfinite_skips > tr.max_nonfinite_skips:
                    pixels_ok = bool(torch.isfinite(batch["pixel_values"]).all())
                    raise NonFiniteError(nonfinite_message(global_step + 1, step_loss, norm, cfg, pixels_ok, last_checkpoint))
                log(f"training: step {global_step + 1} had a non-finite loss or gradient; skipped "
                    f"({notes.nonfinite_skips} of training.max_nonfinite_skips {tr.max_nonfinite_skips})")
            else:
                global_step += 1
                stop.step = global_step
                if ema is not None:
                    ema.step(raw_student.parameters())
                if check is not None and (global_step % tr.fidelity_check_every == 0 or global_step == tr.max_steps):
                    fidelity_check()
                losses.append(step_loss)
                bar.update(1)
                if global_step % out.log_every == 0 or global_step == tr.max_steps:
                    bar.set_postfix(loss=f"{step_loss:.4g}")
                    accelerator.log({"loss": step_loss, "lr": lr_sched.get_last_lr()[0]}, step=global_step)
                if callback is not None:
                    callback(global_step, step_loss)
            saved = None
            if finite and out.checkpoint_every and (global_step % out.checkpoint_every == 0 or global_step == tr.max_steps):
                saved = last_checkpoint = checkpoint()
            if stop_all:
                saved = saved or checkpoint()
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, global_step, saved)
            if finite and out.validation_every and global_step % out.validation_every == 0 and accelerator.is_main_process:
                _validate(cfg, raw_student, ema, teacher_obj, scheduler, output_dir / "validation" / f"step-{global_step:07d}.png")
        bar.close()
        seconds = time.perf_counter() - start_time
        steps_done = global_step - start_step
        global_batch = tr.batch_size * accelerator.num_processes * tr.gradient_accumulation_steps
        samples_per_second = steps_done * global_batch / seconds if seconds > 0 else 0.0

        # ---- final outputs ---------------------------------------------------------------------
        accelerator.wait_for_everyone()
        final = raw_student
        if ema is not None and out.save_ema:
            final = copy.deepcopy(raw_student)
            ema.copy_to(final.parameters())
        if tr.keep_best and best.weights is not None and best.step != global_step and accelerator.is_main_process:
            final = copy.deepcopy(raw_student)
            with torch.no_grad():
                for name, param in final.named_parameters():
                    param.copy_(best.weights[name].to(param.device, param.dtype))
            log(f"exporting the student of step {best.step}, the best fidelity check ({best.error:.4g}; step "
                f"{best.history[-1][0]}: {best.history[-1][1]:.4g}); training.keep_best false exports the last")
        final.eval().requires_grad_(False)
        if bad := nonfinite_names(final.named_parameters()):
            raise NonFiniteError(f"the final weights hold NaN/inf ({len(bad)} tensors, e.g. {bad[0]}); nothing exported")
        files: dict[str, Path] = {}
        if accelerator.is_main_process:
            summary = {"global_step": global_step, "final_loss": losses[-1] if losses else None, "seconds": seconds,
                       "samples_per_second": samples_per_second, "teacher_evals_per_sample": evals_per_sample,
                       "run_id": start.run_id, "window_weights": recorded_weights, "solver_steps": p.num_solver_steps, **notes.state(),
                       **best.state(), "exported_step": best.step if tr.keep_best and best.step is not None else global_step,
                       "config": saved_config}
            files = _export(output_dir, final, teacher_obj, scheduler, cfg, reference, summary)
            for line in notes.report():
                log(line)
    finally:
        bar.close()
        close_loader(loader)
        stop.deferred = False
        for tracker in accelerator.trackers:  # not end_training(): that destroys the caller's process group
            tracker.finish()
    return TrainResult(
        student=final, teacher=teacher_obj, scheduler=scheduler, output_dir=output_dir, global_step=global_step,
        losses=losses, seconds=seconds, samples_per_second=samples_per_second,
        teacher_evals_per_sample=float(evals_per_sample), files=files, num_processes=accelerator.num_processes,
        run_id=start.run_id, bad_images=list(notes.bad_images), missing_captions=notes.missing_captions,
        nonfinite_skips=notes.nonfinite_skips,
    )


def _export(output_dir: Path, final, teacher: Teacher, scheduler, cfg: TrainConfig, reference, summary: dict) -> dict[str, Path]:
    """The final outputs and ``perflow_training.json``; a write error becomes one line."""
    from .export import export_student

    out = cfg.output
    try:
        files = export_student(
            output_dir, final, teacher, scheduler, cfg.perflow.cfg_mode, save_pipeline=out.save_pipeline,
            save_delta=out.save_delta, teacher_weights=reference,
        )
        write_text(output_dir / SUMMARY_FILE, json.dumps(summary, indent=1))
        files["summary"] = output_dir / SUMMARY_FILE
    except WRITE_ERRORS as err:
        text = " ".join(str(err).split())
        if out.checkpoint_every > 0:  # the last step was checkpointed before the export
            then = "rerun with --resume latest (the checkpoints are intact)"
        else:
            then = "run it again with --overwrite true (this run kept no checkpoints: checkpoint_every 0)"
        raise OutputDirError(
            f"could not write the final outputs to {output_dir}: {text}; {then if 'free' in text.lower() else 'free space and ' + then}"
        ) from err
    return files


def _next_batch(data_iter) -> dict:
    """The next batch; a :class:`BadImageError` raised in a DataLoader worker keeps its one-line message."""
    try:
        return next(data_iter)
    except BadImageError as err:  # from a worker, the message carries the worker's traceback
        line = str(err).strip().splitlines()[-1]
        raise BadImageError(line.split("BadImageError: ", 1)[-1]) from None


def _checked_grad_norm(accelerator, params: list, max_norm: float) -> torch.Tensor | None:
    """The gradient norm the step checks for NaN/inf, clipping to ``max_norm`` first when it is > 0.
    None under fp16's grad scaler, where overflowing gradients are routine and the scaler skips them."""
    norm = accelerator.clip_grad_norm_(params, max_norm) if max_norm > 0 else None
    if accelerator.scaler is not None:
        return None
    if norm is None:
        grads = [q.grad for q in params if q.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else None
    return norm


def _step_values(accelerator, acc_loss: torch.Tensor, grad_norm: torch.Tensor | None, stop: StopSignals) -> tuple[float, float, bool]:
    """The step's loss (mean over processes), gradient norm and whether any process was asked to stop:
    one all-reduce and the step's one host sync."""
    zero = torch.zeros((), device=acc_loss.device)
    parts = [acc_loss, zero if grad_norm is None else grad_norm.detach().float().reshape(()).to(acc_loss.device)]
    multi = accelerator.num_processes > 1
    if multi:
        parts.append(zero + float(stop.requested))
    values = accelerator.reduce(torch.stack(parts), reduction="mean").tolist()
    return values[0], values[1], (values[2] > 0 if multi else stop.requested)


def image_channels(teacher: Teacher) -> int:
    """Channels of the images the teacher encodes: its VAE's input, or its UNet's in pixel space."""
    return teacher.vae.config.in_channels if teacher.vae is not None else teacher.unet.config.in_channels


def load_student_init(student: torch.nn.Module, path: str) -> None:
    """Copy a saved denoiser's weights (a ``save_pretrained`` folder, or a run / pipeline folder holding it in
    ``unet/`` or ``transformer/``) into the student; the folder's model class (its ``config.json``'s
    ``_class_name``) must be the student's."""
    from perflow.evaluation.students import denoiser_dir
    from perflow.io import check_weight_files, read_json

    folder = Path(path)
    if not (folder / "config.json").is_file() and (denoiser_dir(folder) / "config.json").is_file():
        folder = denoiser_dir(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model.student_init {path!r} is not a diffusers model folder (config.json missing; "
                                "give a perflow train output_dir or its unet/ or transformer/ folder)")
    check_weight_files(folder)  # a truncated or damaged file: an error naming it, not a traceback
    cls, saved = type(student), read_json(folder / "config.json").get("_class_name")
    if saved != cls.__name__:
        raise ValueError(f"model.student_init {path!r} holds a {saved}, but the teacher's denoiser is a {cls.__name__}; "
                         f"give a {cls.__name__} folder")
    try:
        init = cls.from_pretrained(folder, use_safetensors=True).state_dict()
    except OSError as err:
        raise FileNotFoundError(f"model.student_init {path!r}: no readable safetensors UNet weights ({err})") from None
    own = student.state_dict()
    bad = sorted(set(init) ^ set(own)) + [k for k in own if k in init and init[k].shape != own[k].shape]
    if bad:
        raise ValueError(f"model.student_init {path!r} does not match the teacher's UNet architecture: {bad[:5]}")
    student.load_state_dict({k: v.to(own[k].dtype) for k, v in init.items()})


def _teacher_batch(batch: dict, cfg: TrainConfig, teacher: Teacher, generator: torch.Generator, device: torch.device,
                   dropout: bool = True):
    """``(x0, teacher denoiser, condition)`` of one micro-batch: the encoded images, the guided teacher
    (:func:`perflow.denoisers.guided_teacher_denoiser`) and the condition the student sees, with caption
    dropout when ``dropout`` (caption-free data and captionless samples are always unconditional)."""
    p, dc = cfg.perflow, cfg.data
    pixels = batch["pixel_values"].to(device, non_blocking=True)
    x0 = teacher.encode_images(pixels, generator)  # (B, C, h, w) fp32
    b = x0.shape[0]
    cond = teacher.condition(batch)
    if dc.caption_free:
        dropped = torch.ones(b, dtype=torch.bool)
    elif dropout and dc.caption_dropout > 0:
        dropped = torch.rand(b, generator=generator) < dc.caption_dropout
    else:
        dropped = torch.zeros(b, dtype=torch.bool)
    missing = batch.get("caption_missing")
    if missing is not None:  # a sample without a caption is an unconditional one, like a dropped caption
        dropped = dropped | missing
    cond_s = teacher.drop(cond, dropped) if bool(dropped.any()) else cond
    uncond = teacher.uncond(cond_s) if teacher.has_null else None  # without one, check_training refused what uses it
    return x0, guided_teacher_denoiser(teacher.unet, cond_s, uncond, dropped, p.cfg_mode, p.guidance_scale), cond_s


CALIBRATION_BATCHES = 5
"""Batches :func:`window_weights_of` measures the teacher's window error gains on (their median is used)."""


def _calibration_batches(cfg: TrainConfig, teacher: Teacher, dataset, device: torch.device, desc: str, progress: bool,
                         num_processes: int = 1, size: int | None = None):
    """``(teacher denoiser, noise, schedule, student condition)`` of each of the first :data:`CALIBRATION_BATCHES` batches of the data
    in seed order (their conditions, no caption dropout), the noise drawn from ``training.seed``: the same
    batches and noise on every call and in every process. A batch is the run's global batch
    (``batch_size x num_processes x gradient_accumulation_steps``), so the measurement does not depend on how
    a run splits it; ``size`` overrides it (the fidelity check uses one process's ``batch_size``, the memory a
    training step already needs)."""
    from tqdm.auto import tqdm

    from .data import close_loader, make_loader

    tr = cfg.training
    generator = torch.Generator().manual_seed(tr.seed * 1_000_003 + 104729)
    size = size or tr.batch_size * num_processes * tr.gradient_accumulation_steps
    loader, _ = make_loader(dataset, max(1, min(size, len(dataset))), 1, 0, tr.seed, 0, 0)  # a data set smaller than it: one batch
    bar = tqdm(total=CALIBRATION_BATCHES, desc=desc, unit="batch", disable=not progress)
    try:
        for i, batch in enumerate(loader):
            if i == CALIBRATION_BATCHES:
                break
            x0, den, cond = _teacher_batch(batch, cfg, teacher, generator, device, dropout=False)
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(device)
            yield den, noise, teacher.schedule_for(x0), cond.to(device, torch.float32)
            bar.update(1)
    finally:
        bar.close()
        close_loader(loader)


def _recorded(resume_from: Path | None, key: str):
    if resume_from is None:
        return None
    from .checkpoint import read_state

    return (read_state(resume_from) or {}).get(key)


def solver_steps_of(cfg: TrainConfig, teacher: Teacher, dataset, boundaries: torch.Tensor,
                    device: torch.device, progress: bool = False, resume_from: Path | None = None,
                    num_processes: int = 1) -> int | list[int]:
    """The teacher's DDIM steps per window: ``perflow.num_solver_steps`` as given (an integer, or a list), or
    for ``perflow.solver_step_allocation: auto`` its ``n K`` steps spread by
    :func:`perflow.objective.allocate_solver_steps` from :func:`perflow.objective.window_solve_errors` on the
    calibration batches (those of :func:`window_weights_of`). A discrete teacher's window gets at most as many
    steps as it spans timestep indices. A resumed run reads the steps it recorded (``solver_steps`` in its
    ``perflow_state.json``)."""
    from ..objective import allocate_solver_steps, window_solve_errors
    from ..schedule import DiscreteVPSchedule, window_index_spans

    p = cfg.perflow
    K = boundaries.numel() - 1
    if not isinstance(p.num_solver_steps, int) or p.solver_step_allocation == "equal" or K == 1:
        return p.num_solver_steps
    saved = _recorded(resume_from, "solver_steps")
    if isinstance(saved, list) and len(saved) == K:
        return [int(n) for n in saved]
    errors = [window_solve_errors(den, noise, boundaries, schedule, p.num_solver_steps, teacher.prediction_type,
                                  teacher.clip_sample)
              for den, noise, schedule, _ in _calibration_batches(cfg, teacher, dataset, device, "teacher steps per window",
                                                               progress, num_processes)]
    caps = window_index_spans(boundaries, teacher.schedule.num_train_timesteps) \
        if isinstance(teacher.schedule, DiscreteVPSchedule) else None
    return allocate_solver_steps(torch.stack(errors), p.num_solver_steps, caps)


def window_weights_of(cfg: TrainConfig, teacher: Teacher, dataset, boundaries: torch.Tensor,
                      device: torch.device, progress: bool = False,
                      resume_from: Path | None = None, num_processes: int = 1) -> torch.Tensor | None:
    """The per-window loss weights ``(K,)`` of ``training.window_weights`` (``None`` for ``none``).

    ``auto``: :func:`perflow.objective.window_error_gains` of the teacher on each of the first
    :data:`CALIBRATION_BATCHES` batches of the data in seed order (their conditions; each chain starts from
    noise drawn from ``training.seed``), turned into weights by
    :func:`perflow.objective.window_weights_from_gains` (the per-window median over the batches).
    Deterministic, so every process computes the same weights; a run resumed from a checkpoint
    (``resume_from``) reads the weights it recorded (``window_weights`` in its ``perflow_state.json``)
    instead of measuring them again. ``progress``: a progress bar over the batches."""
    from ..objective import window_error_gains, window_weights_from_gains
    from .config import parse_window_weights

    tr = cfg.training
    spec = parse_window_weights(tr.window_weights, boundaries.numel() - 1)
    if spec == "none":
        return None
    if spec != "auto":
        return torch.tensor(spec, dtype=torch.float64)
    saved = _recorded(resume_from, "window_weights")
    if isinstance(saved, list) and len(saved) == boundaries.numel() - 1:
        return torch.tensor(saved, dtype=torch.float64)
    gains = [window_error_gains(den, noise, boundaries, schedule, cfg.perflow.num_solver_steps,
                                teacher.prediction_type, teacher.clip_sample)
             for den, noise, schedule, _ in _calibration_batches(cfg, teacher, dataset, device, "window loss weights", progress,
                                                                      num_processes)]
    return window_weights_from_gains(torch.stack(gains))


def student_ema(parameters, tr: OptimConfig):
    """diffusers' ``EMAModel`` of the student's ``parameters`` (None with ``training.ema_decay`` 0): the decay
    ``ema_decay`` from the second optimizer step on, or with ``training.ema_ramp`` diffusers' ramp
    ``min(ema_decay, (1 + s) / (10 + s))`` (``min_decay = ema_decay`` clamps that ramp away)."""
    from diffusers.training_utils import EMAModel

    if tr.ema_decay <= 0:
        return None
    return EMAModel(parameters, decay=tr.ema_decay, min_decay=0.0 if tr.ema_ramp else tr.ema_decay)


def training_loss(
    batch: dict,
    cfg: TrainConfig,
    teacher: Teacher,
    student: Callable[..., Any],
    boundaries: torch.Tensor,
    schedule: NoiseSchedule,
    time_sampler: Callable[..., torch.Tensor],
    generator: torch.Generator,
    device: torch.device,
    window_weights: torch.Tensor | None = None,
    own_starts: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """Loss of one micro-batch (see the module docstring): caption dropout, the teacher's window solve
    (:func:`perflow.objective.reflow_example`) and :func:`perflow.objective.batch_loss` of the ``student``
    UNet. ``schedule`` is the teacher's (:class:`~perflow.schedule.DiscreteVPSchedule`); ``boundaries``
    from :func:`boundaries_of`; randomness from ``generator``; ``window_weights`` (``(K,)``, from
    :func:`window_weights_of`) multiplies each sample's loss by its window's weight.

    ``own_starts(cond, noise, k)`` (with ``perflow.student_starts`` p > 0): the student's sampler state at the start
    of window ``k_b`` from ``noise_b`` (:func:`perflow.training.fidelity.sampler_states`); once
    :func:`~perflow.objective.reflow_example` has drawn ``t`` and the noise, a fraction p of the rows (drawn from
    ``generator``) starts its window there."""
    from ..windows import window_index

    p, tr = cfg.perflow, cfg.training
    x0, den, cond_s = _teacher_batch(batch, cfg, teacher, generator, device)
    cond32 = cond_s.to(device, torch.float32)
    start_states = None
    if own_starts is not None and p.student_starts > 0:
        def start_states(noise: torch.Tensor, t: torch.Tensor):
            mask = torch.rand(noise.shape[0], generator=generator) < p.student_starts
            return own_starts(cond32, noise, torch.where(mask, window_index(t, boundaries).cpu(), 0)), mask
    ex = reflow_example(
        den, x0, boundaries, teacher.schedule_for(x0), p.num_solver_steps, p.prediction_type, teacher.prediction_type,
        generator=generator, time_sampler=time_sampler, model_output_type=student_output_type(cfg, teacher),
        clip_sample=teacher.clip_sample, start_states=start_states,
    )
    sample_weight = None
    if window_weights is not None:
        sample_weight = window_weights.to(ex.t.device)[window_index(ex.t, boundaries)]
    return batch_loss(lambda z, ts: cond32.forward(student, z, ts), ex, tr.loss, tr.huber_c, tr.loss_weighting,
                      sample_weight)


@torch.no_grad()
def _validate(cfg: TrainConfig, student, ema, teacher: Teacher, scheduler, path: Path) -> Path:
    """Sample the (EMA) student on the validation prompts and save a grid PNG."""
    from .fidelity import ema_weights

    o, p, dc = cfg.output, cfg.perflow, cfg.data
    prompts = o.validation_prompts if o.validation_prompts else teacher.default_prompts()
    w = o.validation_guidance_scale
    if dc.caption_free or not teacher.conditional:  # an unconditional student: the null condition, no guidance, a grid of CAPTION_FREE_GRID
        prompts = prompts if o.validation_prompts else (prompts * CAPTION_FREE_GRID)[:CAPTION_FREE_GRID]
        w = 1.0
    elif w is None:  # CFG-fixed students are sampled without guidance; sync ones with the teacher's usual scale
        w = 1.0 if p.cfg_mode == "fixed" else teacher.validation_guidance
    with ema_weights(ema, student):
        return _validation_grid(cfg, student, teacher, scheduler, path, prompts, w)


def _validation_grid(cfg: TrainConfig, student, teacher: Teacher, scheduler, path: Path, prompts, w: float) -> Path:
    """The grid PNG of ``student``'s samples on ``prompts`` at guidance ``w`` (:func:`_validate`)."""
    from .validation import image_grid, sample_student, save_png

    o, dc = cfg.output, cfg.data
    was_training = student.training
    student.eval()
    try:
        cond = teacher.validation_condition(prompts, dc.resolution)
        if dc.caption_free:
            cond = teacher.uncond(cond)
        size = dc.resolution // teacher.vae_scale
        shape = (len(prompts), teacher.latent_channels, size, size)
        gen = torch.Generator().manual_seed(cfg.training.seed)
        z = sample_student(student, scheduler, cond, teacher.uncond(cond) if teacher.has_null else None, shape, o.validation_steps, w, gen)
        images = teacher.decode_latents(z)
        return save_png(image_grid(images), path)
    finally:
        student.train(was_training)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


__all__ = ["TrainResult", "boundaries_of", "solver_steps_of", "train", "training_loss", "window_weights_of", "with_data"]
