"""Typed training configuration: the schema (nested dataclasses with documented defaults), its
validation and which fields a resumed run may change. Loading from YAML/TOML, recipes and overrides
live in :mod:`perflow.training.config_io`.

A config file has up to five sections (``model``, ``data``, ``perflow``, ``training``,
``output``); every field has a documented default. Field names are unique across sections,
so a flag may name a field with or without its section: ``--training.max_steps 100`` and
``--max_steps 100`` are the same. Recipes shipped in ``src/perflow/recipes/`` are found by name
(``--config digits``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    """The teacher, and how the student is built from it."""

    teacher: str = "digits"
    """Teacher: a diffusers SD1.5/2.1/SDXL or DDPMPipeline folder (model_index.json), a bare UNet2DModel
    folder (config.json + scheduler_config.json), a class-conditional folder (unet/, scheduler/,
    label_encoder/) or a built-in name (``digits``, ``faces``, ``photos``, ``flow_digits``); see docs/training.md."""
    teacher_dtype: str = "auto"
    """Teacher dtype: ``auto`` (the mixed-precision dtype, else float32), float32, float16, bfloat16."""
    gradient_checkpointing: bool = False
    """Recompute student activations in the backward pass (less memory, ~30 % slower)."""
    student_init: str | None = None
    """Start the student from this UNet folder instead of the teacher's weights (e.g. the previous
    stage of progressive reflow, K = 4 -> 2 -> 1); the delta is still taken against the teacher."""
    null_label: int | None = None
    """A UNet2DModel teacher with a class embedding: the class index it was trained with as "no class"
    (CFG, caption dropout); unset: none, so set data.caption_dropout 0 and cfg_mode sync."""
    max_sequence_length: int | None = None
    """SD3/Flux teachers: the T5 prompt length (unset: the pipeline's default, 256 for SD3, 512 for Flux);
    sample the student with the same ``max_sequence_length``."""
    allow_pickle: bool = False
    """Let the teacher's pickled ``.bin`` weights be read (by diffusers' restricted loader) when a
    component has no safetensors; off by default: such a teacher is refused, naming the file."""


DATA_SOURCES = ("auto", "imagefolder", "webdataset", "digits")
"""The values of ``data.source``."""


@dataclass
class DataConfig:
    """Training images."""

    source: str = "auto"
    """``imagefolder`` (images + metadata.jsonl), ``webdataset`` (tar shards) or ``digits`` (the built-in
    digits); ``auto``: ``webdataset`` when ``data.path`` names tar shards, ``imagefolder`` for any other
    ``data.path``, the built-in digits when there is none (:func:`perflow.training.data.resolve_source`)."""
    path: str | None = None
    """Image folder, or tar shards: a folder of ``*.tar``, a glob, or a brace list ``shard-{000..009}.tar``."""
    resolution: int | None = None
    """Training resolution (images are resized on the short side, then cropped to a square); unset: the
    teacher's own (its denoiser's ``sample_size`` times its VAE's scale factor)."""
    center_crop: bool = True
    """Centre crop (``true``) or a seeded random crop (``false``)."""
    random_flip: bool = False
    """Seeded horizontal flips."""
    caption_column: str = "text"
    """Caption field in metadata.jsonl / the ``.json`` of a shard sample (``.txt`` is also read)."""
    label_column: str = "label"
    """Class label field in metadata.jsonl/csv, read for a teacher conditioned on class labels."""
    caption_free: bool = False
    """Ignore captions/labels: train an unconditional student (every sample gets the null condition)."""
    caption_dropout: float = 0.1
    """Probability that a sample's caption/label is replaced by the null one (for CFG)."""
    num_workers: int = 0
    """DataLoader worker processes."""
    on_bad_image: str = "skip"
    """An unreadable image or sample: ``skip`` (its slot takes the next readable one; the names are
    logged and counted) or ``error`` (stop with the file's name)."""


@dataclass
class PeRFlowConfig:
    """The piecewise-reflow objective (``docs/method.md``)."""

    num_time_windows: int = 4
    """K, the number of time windows (equal windows unless ``window_boundaries`` is given)."""
    window_boundaries: list[float] | None = None
    """Explicit decreasing boundaries ``[1, ..., 0]`` (K + 1 values), overriding the placement below."""
    last_window_fraction: float = 1.0
    """Without ``window_boundaries``: K equal windows with the last one (ending at the clean sample) shortened to
    this fraction of its width, the window before it taking the rest (:func:`perflow.windows.short_last_boundaries`;
    K = 4 and 0.6: ``[1, 0.75, 0.5, 0.15, 0]``); 1 (the default) gives equal windows. The last window is the one
    students learn slowest; 0.6 lowers the 4-step paired MSE on all three study teachers in the study's loop
    (docs/study.md, sixth round), but with lr 1e-4 and student_starts the trainer's digits student gets a heavy
    tail of samples far from the teacher (ninth round)."""
    num_solver_steps: int | list[int] = 8
    """n, the teacher's DDIM steps per window (its solve of each window's ODE), or one per window: K integers,
    the first window the one at t = 1 (e.g. 20,4,4,4)."""
    solver_step_allocation: str = "auto"
    """How an integer num_solver_steps n is spread over the windows: ``auto`` (the same n K teacher steps where they
    remove the most error from the final sample, measured on the teacher's chain at the start,
    :func:`perflow.objective.allocate_solver_steps`; printed and recorded in the run; docs/study.md, fifth round)
    or ``equal`` (n in each). A list of num_solver_steps is used as given."""
    prediction_type: str = "auto"
    """Student parameterization: ``auto`` (``ddim_eps`` for a diffusion teacher: with ``model_output_type: auto``
    the untrained student is the teacher's DDIM over the windows; ``velocity`` for a flow-matching teacher,
    which then starts as the teacher), ``ddim_eps``, ``diff_eps`` or ``velocity``."""
    model_output_type: str = "auto"
    """What the student network outputs: ``auto`` (the teacher's own prediction type with an
    epsilon-type parameterization, so ``ddim_eps`` starts as the teacher's DDIM), ``epsilon``,
    ``v_prediction`` or ``sample``."""
    cfg_mode: str = "sync"
    """``sync`` (teacher at guidance 1 on the student's condition) or ``fixed`` (teacher guided at guidance_scale)."""
    guidance_scale: float = 7.5
    """Teacher guidance w* in CFG-fixed mode (unused in sync mode)."""
    embedded_guidance: float = 3.5
    """A guidance-distilled teacher (Flux-dev): the guidance input the teacher runs at, which the student is
    trained with in its own guidance input and is to be sampled with (``guidance_scale`` of FluxPipeline)."""
    time_sampling: str = "uniform"
    """``uniform`` t in [0, 1), ``u_shaped`` (uniform window, then a U-shaped position inside it) or
    ``logit_normal`` (``t = sigmoid(m + s n)``, SD3's training distribution, for flow-matching teachers)."""
    u_shape_a: float = 4.0
    """Sharpness a of the U-shaped density ``p(u) ~ cosh(a (u - 1/2))`` within a window."""
    logit_normal_mean: float = 0.0
    """``m`` of the ``logit_normal`` time sampling."""
    logit_normal_std: float = 1.0
    """``s`` of the ``logit_normal`` time sampling."""
    window_start_prob: float = 0.5
    """Probability that a training time is moved to its window's start, where a K-step sampler
    evaluates the student and the target is deterministic (:func:`perflow.time_sampling.with_window_starts`)."""
    batch_windows: str = "mixed"
    """``mixed`` (each sample of a batch in its own window) or ``single`` (one window per batch, drawn as the time
    sampling draws windows; :func:`perflow.time_sampling.one_window_per_batch`). With different teacher steps per
    window a mixed batch's solve takes ``max n_k`` sequential teacher calls, a single-window batch ``n_k``."""
    student_starts: float = 0.0
    """Fraction of each batch whose window starts where the (EMA) student's own K-step sampler reaches that window's
    start from the example's noise, instead of at the forward marginal (the target is the teacher's solve from
    there): training on the states the sampler will meet, its earlier windows' errors included
    (:mod:`perflow.training.fidelity`; docs/study.md, eighth and ninth rounds). Costs up to K - 1 student
    evaluations without gradient per step; 0 (the default): every window starts at the forward marginal."""


@dataclass
class OptimConfig:
    """Optimisation (section ``training``)."""

    max_steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 32
    """Samples per process per micro-step (global batch = batch_size x processes x accumulation)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    learning_rate: float = 3e-5
    """AdamW learning rate (after warm-up). 3e-5: at 1e-4 the photos teacher's student drifts away from the teacher
    after a few hundred steps (docs/study.md, seventh round), and the digits student gets a heavy tail of samples
    far from the teacher (ninth round)."""
    lr_scheduler: str = "constant"
    """A diffusers scheduler name: constant, linear, cosine, ... (all with warm-up; constant with lr_warmup_steps is
    diffusers' constant_with_warmup)."""
    lr_warmup_steps: int = 0
    """Linear warm-up steps of the learning rate (0: none)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0 disables)."""
    loss: str = "mse"
    """``mse`` or ``huber`` (pseudo-Huber ``sqrt(d^2 + c^2) - c`` per element)."""
    huber_c: float = 0.001
    """c of the pseudo-Huber loss."""
    loss_weighting: str = "window_end"
    """``none``, or ``window_end``: weight each sample so the loss measures the error of its predicted window end."""
    window_weights: str = "auto"
    """Per-window loss weights on top of ``loss_weighting``: ``auto`` measures, once at the start, how much the
    teacher's own flow amplifies an error made at each window's end on the way to the final sample
    (:func:`perflow.objective.window_error_gains`, the per-window median over the first 5 batches) and weights each window by it
    (mean 1); ``none`` weights all windows alike; or ``K`` comma-separated positive numbers."""
    mixed_precision: str = "no"
    """``no``, ``fp16`` or ``bf16``; the student's master weights stay float32."""
    ema_decay: float = 0.99
    """EMA decay of the student's weights (0 disables EMA)."""
    ema_ramp: bool = False
    """false: ``ema_decay`` from the second step on (the first copies the student, one step from the teacher's
    weights; the recipe study's EMA); true: diffusers' ``EMAModel`` ramp, decay ``min(ema_decay, (1 + s) / (10 + s))`` at step ``s``
    (0.975 at step 350; ``ema_decay`` 0.99 is reached only at step 890)."""
    seed: int = 0
    """Seed of the student's data order, noise, times and caption dropout (exactly reproducible on CPU)."""
    max_nonfinite_skips: int = 0
    """Optimizer steps with a non-finite loss or gradient to skip (not applied, not counted) before the
    run stops; 0 stops at the first one."""
    fidelity_check_every: int = 50
    """Every N steps and at the last: the (EMA) student's K-step sample against the teacher's chain of window
    solves from the same noise, on the first 5 batches of the data in seed order (mean squared error, logged as
    ``fidelity``; :mod:`perflow.training.fidelity`); 0 disables. Costs ``5 K`` student evaluations of a batch per check."""
    keep_best: bool = True
    """Export the checked student with the lowest fidelity error instead of the last one (a run whose student
    drifts away from the teacher's trajectories keeps its best point); needs ``fidelity_check_every``."""


@dataclass
class OutputConfig:
    """Outputs, checkpoints, validation and logging."""

    output_dir: str = "perflow-output"
    """Where the student, scheduler, delta, checkpoints, validation grids and logs go."""
    checkpoint_every: int = 500
    """Save a resumable checkpoint every N steps and at the last step (0 disables)."""
    keep_checkpoints: int = 2
    """Keep the last M checkpoints."""
    resume: str | None = None
    """``latest`` (the newest intact checkpoint in output_dir, if any) or a checkpoint folder."""
    overwrite: bool = False
    """Start afresh in an output_dir that holds another run's checkpoints or outputs, deleting them
    (without it such a folder is refused unless the run resumes)."""
    validation_every: int = 0
    """Write a grid of samples from the EMA weights every N steps (0 disables)."""
    validation_prompts: list[str] | None = None
    """Prompts (or class labels for a class-conditional teacher) for the validation grid; default: a few."""
    validation_steps: int = 4
    """PeRFlow sampling steps for validation."""
    validation_guidance_scale: float | None = None
    """CFG scale for validation samples; default 7.5 for cfg_mode sync, 1.0 for fixed."""
    tracker: str = "tensorboard"
    """An accelerate tracker (tensorboard, wandb, ...) or ``none``."""
    log_every: int = 10
    """Log loss and learning rate every N steps."""
    save_pipeline: bool = True
    """For SD/SDXL teachers also save the full pipeline with the student UNet and the PeRFlow scheduler."""
    save_delta: bool = True
    """Save ``delta = student - teacher`` as ``delta.safetensors``."""
    save_ema: bool = True
    """Save the EMA weights (if EMA is on) as the final student, else the raw weights."""
    progress: bool = True
    """Show a tqdm progress bar."""


@dataclass
class TrainConfig:
    """Everything a PeRFlow training run needs (see ``perflow train --help``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    perflow: PeRFlowConfig = field(default_factory=PeRFlowConfig)
    training: OptimConfig = field(default_factory=OptimConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "TrainConfig":
        """Raise a ``ValueError`` naming the field and the fix for any inconsistent value."""
        from ..denoisers import CFG_MODES
        from ..objective import LOSS_WEIGHTINGS, LOSSES, SOLVER_STEP_ALLOCATIONS, steps_of_windows
        from ..parameterization import MODEL_OUTPUT_TYPES, check_model_output_type
        from ..time_sampling import BATCH_WINDOWS, TIME_SAMPLINGS
        from ..windows import PREDICTION_TYPES, resolve_boundaries, short_last_boundaries

        p, t, d, o = self.perflow, self.training, self.data, self.output
        _choice("perflow.prediction_type", p.prediction_type, ("auto",) + PREDICTION_TYPES)
        _choice("perflow.model_output_type", p.model_output_type, ("auto",) + MODEL_OUTPUT_TYPES)
        if p.model_output_type not in ("auto", "epsilon") and p.prediction_type != "auto":
            check_model_output_type(p.model_output_type, p.prediction_type)
        _choice("perflow.cfg_mode", p.cfg_mode, CFG_MODES)
        _choice("perflow.time_sampling", p.time_sampling, TIME_SAMPLINGS)
        _choice("perflow.batch_windows", p.batch_windows, BATCH_WINDOWS)
        _choice("training.loss", t.loss, LOSSES)
        _choice("training.loss_weighting", t.loss_weighting, LOSS_WEIGHTINGS)
        _choice("training.mixed_precision", t.mixed_precision, ("no", "fp16", "bf16"))
        _choice("model.teacher_dtype", self.model.teacher_dtype, ("auto", "float32", "float16", "bfloat16"))
        _choice("data.source", d.source, DATA_SOURCES)
        _choice("data.on_bad_image", d.on_bad_image, ("skip", "error"))
        for name, value, low in (
            ("perflow.num_time_windows", p.num_time_windows, 1),
            ("training.max_steps", t.max_steps, 1),
            ("perflow.embedded_guidance", p.embedded_guidance, 0),
            ("training.batch_size", t.batch_size, 1),
            ("training.gradient_accumulation_steps", t.gradient_accumulation_steps, 1),
            ("training.learning_rate", t.learning_rate, 0),
            ("training.lr_warmup_steps", t.lr_warmup_steps, 0),
            ("training.max_grad_norm", t.max_grad_norm, 0),
            ("training.huber_c", t.huber_c, 0),
            ("training.max_nonfinite_skips", t.max_nonfinite_skips, 0),
            ("training.fidelity_check_every", t.fidelity_check_every, 0),
            ("data.num_workers", d.num_workers, 0),
            ("output.checkpoint_every", o.checkpoint_every, 0),
            ("output.validation_every", o.validation_every, 0),
            ("output.validation_steps", o.validation_steps, 1),
            ("output.keep_checkpoints", o.keep_checkpoints, 1),
            ("output.log_every", o.log_every, 1),
        ):
            if not value >= low:  # also refuses NaN
                raise ValueError(f"{name} must be >= {low}, got {value}")
        _choice("perflow.solver_step_allocation", p.solver_step_allocation, SOLVER_STEP_ALLOCATIONS)
        if p.window_boundaries is not None:
            b = resolve_boundaries(window_boundaries=p.window_boundaries)
            if b.numel() - 1 != p.num_time_windows:
                if p.num_time_windows != PeRFlowConfig.num_time_windows:  # set to something other than the default
                    raise ValueError(f"perflow.window_boundaries give K = {b.numel() - 1} windows but "
                                     f"perflow.num_time_windows is {p.num_time_windows}; give one of them")
                p.num_time_windows = b.numel() - 1
        parse_window_weights(t.window_weights, p.num_time_windows)
        try:
            steps_of_windows(p.num_solver_steps, p.num_time_windows)
            short_last_boundaries(p.num_time_windows, p.last_window_fraction)
        except ValueError as err:
            raise ValueError(f"perflow.{err}") from None
        from diffusers.optimization import SchedulerType

        names = [v.value for v in SchedulerType]
        if t.lr_scheduler not in names:
            raise ValueError(f"training.lr_scheduler {t.lr_scheduler!r} is not one of diffusers' schedulers {names}")
        if not 0.0 <= p.student_starts <= 1.0:
            raise ValueError(f"perflow.student_starts must be in [0, 1] (a fraction of each batch), got {p.student_starts}")
        if not 0.0 <= p.window_start_prob <= 1.0:
            raise ValueError(f"perflow.window_start_prob must be in [0, 1], got {p.window_start_prob}")
        if not 0.0 <= d.caption_dropout < 1.0:
            raise ValueError(f"data.caption_dropout must be in [0, 1), got {d.caption_dropout}")
        if not 0.0 <= t.ema_decay < 1.0:
            raise ValueError(f"training.ema_decay must be in [0, 1) (0 disables EMA), got {t.ema_decay}")
        if d.resolution is not None and not d.resolution >= 4:
            raise ValueError(f"data.resolution must be >= 4 (or unset: the teacher's own), got {d.resolution}")
        if d.source in ("imagefolder", "webdataset") and not d.path:
            raise ValueError(f"data.source {d.source!r} needs data.path (an image folder or tar shards)")
        if d.source == "digits" and d.path:
            raise ValueError(f"data.source 'digits' is the built-in digits and reads no data.path ({d.path!r}); "
                             "set data.source auto, imagefolder or webdataset to train on it")
        if p.cfg_mode == "fixed" and p.guidance_scale < 1.0:
            raise ValueError(f"perflow.guidance_scale must be >= 1 in cfg_mode fixed, got {p.guidance_scale}")
        return self


RESUME_MAY_CHANGE = frozenset({
    "training.max_steps", "training.max_nonfinite_skips", "training.fidelity_check_every", "training.keep_best",
    "model.gradient_checkpointing", "model.allow_pickle",
    "data.num_workers", "data.on_bad_image",
    "output.output_dir", "output.resume", "output.overwrite", "output.checkpoint_every",
    "output.keep_checkpoints", "output.validation_every", "output.validation_prompts", "output.validation_steps",
    "output.validation_guidance_scale", "output.tracker", "output.log_every", "output.save_pipeline",
    "output.save_delta", "output.save_ema", "output.progress",
})
"""Fields a resumed run may set differently from its checkpoint: how long it runs, where and how
often it saves, logs and validates, what it exports, and speed knobs that leave the numbers unchanged.
Every other field changes what the run trains, so :func:`resume_conflicts` refuses a change."""


def resume_conflicts(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"section.field saved -> current"`` for each field outside :data:`RESUME_MAY_CHANGE` whose value
    differs between a checkpoint's config and the current one (fields the checkpoint lacks are skipped)."""
    current = json.loads(json.dumps(current))  # the form the checkpoint stored (lists, floats)
    out = []
    for section, fields in current.items():
        for name, value in fields.items():
            key = f"{section}.{name}"
            old = (saved.get(section) or {}).get(name, value)
            if key not in RESUME_MAY_CHANGE and old != value:
                out.append(f"{key} {old!r} -> {value!r}")
    return out


def parse_window_weights(value: Any, num_windows: int) -> str | list[float]:
    """``training.window_weights`` as ``"auto"``, ``"none"`` or a list of ``num_windows`` positive floats
    (from a list or a comma-separated string); a one-line ``ValueError`` naming the fix otherwise."""
    from ..objective import WINDOW_WEIGHTS

    if isinstance(value, str) and value.strip() in WINDOW_WEIGHTS:
        return value.strip()
    items = value.split(",") if isinstance(value, str) else value
    try:
        weights = [float(v) for v in items]
    except (TypeError, ValueError):
        weights = None
    if weights is None or len(weights) != num_windows or not all(w > 0 and math.isfinite(w) for w in weights):
        raise ValueError(
            f"training.window_weights must be 'auto', 'none' or {num_windows} positive numbers separated by commas "
            f"(one per window), got {value!r}"
        )
    return weights


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
