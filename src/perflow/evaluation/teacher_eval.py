"""Evaluate PeRFlow students of any teacher: unconditional, class-conditional (labels) or text (prompts).

:func:`evaluate_teacher` runs :func:`perflow.evaluation.harness.compare_samplers` through the generic
:class:`perflow.training.teachers.Teacher` interface only (``unet``, ``validation_condition``,
``uncond``, ``schedule_config``, ``prediction_type``, ``decode_latents``), so it works for every
teacher kind ``load_teacher`` knows. Every sampler gets the same initial noise and conditions; all
metrics are computed on decoded images in ``[-1, 1]``, with nothing downloaded:

- ``paired_mse``: mean squared distance to the teacher's ``reference_steps``-step DDIM output from
  the same noise and condition (0 for a perfect few-step sampler);
- ``sw_ref``: sliced Wasserstein-2 distance (:func:`~perflow.evaluation.metrics.sliced_wasserstein`,
  fixed random directions) between the sampler's ``N`` images and the reference's ``N`` images,
  pixels flattened; it compares the two image distributions and ignores which noise made which image;
  ``sw_ref_se`` is its bootstrap standard error (pairs resampled), ``meta["sw_ref_floor"]`` the
  distance between the two halves of the reference set (what two independent teacher sample sets of
  ``N/2`` images differ by);
- ``sw_real``: the same distance to real images (a folder, or the test split of a built-in teacher's
  data), and ``fd`` (Fréchet distance) where local features exist (``inception`` with real images, or
  the digit classifier), ``accuracy`` (the digit classifier's agreement with the labels; only for the
  built-in digits teacher or a given ``classifier``), ``clip_score`` (``clip``, text teachers).

Baselines (DDIM, DPM-Solver++, UniPC) are run with each of diffusers' ``timestep_spacing`` options
and, at each step count, the one with the lowest ``paired_mse`` is reported (its ``spacing`` column;
the others in ``spacing_paired_mse``).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from . import metrics
from .images import chunked_denoiser as denoiser
from .harness import DEFAULT_STEPS, EvalResult, Metrics, Sampler, compare_samplers
from .samplers import BASELINE_SAMPLERS, TIMESTEP_SPACINGS, baseline_scheduler

DIGIT_TEACHERS = ("digits", "flow_digits")
"""Built-in teachers of the digits: the shipped digit classifier gives their ``fd`` and ``accuracy``."""
SPACING_CRITERIA = ("paired_mse", "sw_ref")
"""Columns that may pick a baseline's best ``timestep_spacing``."""
MIN_SAMPLES = 20
"""Fewest samples :func:`evaluate_teacher` accepts: the Fréchet distance and the sliced-W2 noise
floor (two halves of the reference set) need a few per half."""


@dataclass
class TeacherEvalConfig:
    """What :func:`evaluate_teacher` compares (fields mirror ``perflow eval --task teacher`` flags)."""

    teacher: Any = "digits"
    """A teacher folder (diffusers pipeline or class-conditional), a built-in name (``digits``,
    ``faces``, ``photos``) or a :class:`~perflow.training.teachers.Teacher` object."""
    perflow: Any = None
    """PeRFlow student folder (a ``perflow train`` output_dir), or a loaded
    :class:`~perflow.evaluation.students.Student` (e.g. a target plus a delta)."""
    student_name: str | None = None
    """Row name of the PeRFlow student (default ``perflow (K=k)``)."""
    reflow: str | None = None
    """Whole-range reflow (K = 1) student folder."""
    labels: list[int] | None = None
    """Class labels, cycled to ``num_samples`` (class teachers; default: every class in turn)."""
    prompts: list[str] | None = None
    """Prompts, cycled to ``num_samples`` (text teachers; required there)."""
    steps: tuple[int, ...] = DEFAULT_STEPS
    baselines: tuple[str, ...] = BASELINE_SAMPLERS
    spacings: tuple[str, ...] = TIMESTEP_SPACINGS
    """``timestep_spacing`` options tried for every baseline; the best per step count is reported."""
    select_spacing_by: str = "paired_mse"
    """The column (lower is better) that picks each baseline's spacing: ``paired_mse`` or ``sw_ref``."""
    num_samples: int = 256
    reference_steps: int = 100
    guidance_scale: float | None = None
    """Classifier-free guidance for every sampler (default: 7.5 for text teachers, else 1.0)."""
    resolution: int | None = None
    """Image resolution (default: the UNet's sample size times the VAE factor)."""
    seed: int = 0
    batch_size: int = 64
    """Images per UNet call."""
    real_images: str | None = None
    """Folder of real images for ``sw_real`` (and ``fd`` with ``inception``)."""
    inception: str | None = None
    clip: str | None = None
    classifier: str | None = None
    """Digit classifier folder (``fd`` in its feature space and ``accuracy``); the shipped one is used
    for the built-in digits teacher."""
    sw_projections: int = 256
    bootstrap: int = 20
    """Bootstrap resamples for ``sw_ref_se``."""
    flow_steps: int = 32
    device: str | None = None
    """Where the teacher and students run (default: where the teacher was loaded, the CPU)."""
    control_images: Any = None
    """ControlNet teachers (:class:`perflow.targets.ControlledUNet`): control images ``(M, C, H, W)``,
    cycled over the samples like the labels or prompts."""
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- the teacher and its conditions


def resolve_teacher(spec: Any):
    """``(Teacher, name, folder or None)`` for a folder, a built-in name or a Teacher object."""
    from perflow.builtin.suite import SUITE, suite_teacher_path
    from perflow.training.teachers import BUILTIN_TEACHERS, Teacher, builtin_teacher_path, load_teacher

    if isinstance(spec, Teacher):
        return spec, spec.name, None
    name = str(spec)
    if name in BUILTIN_TEACHERS:
        folder = builtin_teacher_path(name)
    elif name in SUITE and not Path(name).exists():
        folder = suite_teacher_path(name)
    else:
        folder = Path(name)
    teacher = load_teacher(folder if folder.is_dir() else name)
    return teacher, name, folder if folder.is_dir() else None


def conditioning(teacher) -> str:
    """``"text"`` (captions through its text encoders: SD, SDXL, SD3, Flux), ``"class"`` (integer labels: a
    label encoder or a class embedding) or ``"none"`` (unconditional), read from the teacher's attributes."""
    if getattr(teacher, "uses_text", False):
        return "text"
    if getattr(teacher, "label_encoder", None) is not None or getattr(teacher, "uses_labels", False):
        return "class"
    return "none"


def num_classes(teacher) -> int:
    """The real classes of a class-conditional teacher: those below its null label, else every embedded one."""
    null = getattr(teacher, "null_label", None)
    count = null if null is not None else getattr(teacher, "num_labels", None)
    if not count:
        raise ValueError(f"{teacher.name!r} does not say how many classes it has: give --labels")
    return int(count)


def sample_conditions(teacher, config: TeacherEvalConfig) -> list:
    """One condition input per sample for ``teacher.validation_condition``: labels, prompts or ``None``."""
    kind, n = conditioning(teacher), config.num_samples
    if kind != "class" and config.labels:
        raise ValueError(f"--labels is for class-conditional teachers; {teacher.name!r} is {_KIND_WORDS[kind]}")
    if kind != "text" and config.prompts:
        raise ValueError(f"--prompts is for text-conditioned teachers; {teacher.name!r} is {_KIND_WORDS[kind]}")
    if kind == "text":
        if not config.prompts:
            raise ValueError(f"{teacher.name!r} is a text-to-image teacher: give --prompts (strings, or a text file)")
        return [config.prompts[i % len(config.prompts)] for i in range(n)]
    if kind == "class":
        labels = config.labels or list(range(num_classes(teacher)))
        return [int(labels[i % len(labels)]) for i in range(n)]
    return [None] * n


_KIND_WORDS = {"text": "text-conditioned", "class": "class-conditional", "none": "unconditional"}


def sampler_config(teacher, folder: Path | None, latents: torch.Tensor) -> dict:
    """The teacher's diffusers scheduler config for the baselines: its folder's, else its schedule.

    A flow-matching teacher with dynamic shifting (Flux) gets the fixed shift ``e^mu`` of the ``latents``'
    resolution (``teacher.schedule_for``): diffusers' exponential time shift with ``mu`` is that fixed shift."""
    from perflow.io import read_scheduler_config

    found = read_scheduler_config(folder, required=False) if folder is not None else None
    # a Teacher object: the config it was built from (a bare schedule would leave DDIM's default clip_sample=True)
    config = found or {**getattr(teacher, "scheduler_config", teacher.schedule_config), "prediction_type": teacher.prediction_type}
    if config.get("use_dynamic_shifting"):
        config = {**config, "use_dynamic_shifting": False, "shift": teacher.schedule_for(latents).effective_shift}
    return config


# ----------------------------------------------------------------------------- real reference sets


def builtin_real_images(name: str, resolution: int) -> torch.Tensor | None:
    """The held-out images of a built-in teacher's data (``digits``, ``flow_digits``, ``faces``, ``photos``), else ``None``."""
    if name in DIGIT_TEACHERS:
        from perflow.builtin.digits import digits_tensors

        return digits_tensors("test", resolution)[0]
    if name == "faces":
        from perflow.builtin.faces import faces_tensors

        return faces_tensors("test", resolution)
    if name == "photos":
        from perflow.builtin.photos import photos_tensors

        return photos_tensors("test", resolution)[0]
    return None


def real_reference(config: TeacherEvalConfig, name: str, resolution: int, channels: int) -> tuple[torch.Tensor | None, str]:
    """``(real images (M, C, R, R) in [-1, 1] or None, where they came from)``."""
    from .images import load_real_images

    if config.real_images:
        return load_real_images(config.real_images, resolution, channels=channels), str(config.real_images)
    real = builtin_real_images(name, resolution)
    return real, (f"built-in {name} test split" if real is not None else "")


# ----------------------------------------------------------------------------- the evaluation


def check_config(config: TeacherEvalConfig) -> None:
    """One-line ``ValueError`` for a config that cannot run."""
    if config.num_samples < MIN_SAMPLES:
        raise ValueError(
            f"num_samples={config.num_samples} is too few: the Fréchet distance and the sliced-W2 noise floor "
            f"need at least {MIN_SAMPLES} (--num-samples)"
        )
    if not config.steps or any(int(n) < 1 for n in config.steps):
        raise ValueError(f"steps must be positive integers, got {list(config.steps)}")
    if config.reference_steps <= max(config.steps):
        raise ValueError(f"reference_steps={config.reference_steps} must exceed the largest step count {max(config.steps)} "
                         "(the teacher's DDIM at the reference's own step count would be the reference itself); "
                         "use --reference-steps 100")
    unknown = [b for b in config.baselines if b not in BASELINE_SAMPLERS]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {list(BASELINE_SAMPLERS)}")
    bad = [s for s in config.spacings if s not in TIMESTEP_SPACINGS]
    if bad or not config.spacings:
        raise ValueError(f"spacings must be a non-empty list of {list(TIMESTEP_SPACINGS)}, got {list(config.spacings)}")
    if config.select_spacing_by not in SPACING_CRITERIA:
        raise ValueError(f"select_spacing_by must be one of {list(SPACING_CRITERIA)}, got {config.select_spacing_by!r}")
    if config.batch_size < 1 or config.sw_projections < 1 or config.bootstrap < 2:
        raise ValueError("batch_size and sw_projections must be >= 1 and bootstrap >= 2")


def evaluate_teacher(config: TeacherEvalConfig, progress: bool = True) -> EvalResult:
    """Compare PeRFlow students with the teacher's DDIM / DPM-Solver++ / UniPC (best spacing) on any teacher.

    Returns an :class:`~perflow.evaluation.harness.EvalResult`; ``meta["command"]`` is the
    ``perflow eval`` command line that reproduces it (for a teacher given by folder or name).
    """
    from .students import Student, load_student

    check_config(config)
    teacher, name, folder = resolve_teacher(config.teacher)
    if config.device is not None:
        teacher.to(config.device)
    kind = conditioning(teacher)
    embedded = None
    students = {role: (p if p is None or isinstance(p, Student) else load_student(p, teacher))
                for role, p in (("perflow", config.perflow), ("reflow", config.reflow))}
    if getattr(teacher, "kind", "") == "flux":  # Flux is never sampled with a second (unconditional) pass
        if teacher.guidance_embeds:
            # Flux-dev: guidance is an input embedding, the same for every sampler: --guidance-scale, else the value
            # the student was trained at (its --embedded_guidance, recorded in its scheduler config), else 3.5
            recorded = [st.embedded_guidance for st in students.values() if st is not None and st.embedded_guidance is not None]
            if config.guidance_scale is not None:
                teacher.guidance = float(config.guidance_scale)
            elif recorded:
                teacher.guidance = float(recorded[0])
            embedded = teacher.guidance
        elif config.guidance_scale not in (None, 1.0):
            raise ValueError(f"{name!r} is a Flux model without a guidance input (schnell): it takes no guidance; "
                             "leave --guidance-scale unset")
        w = 1.0
    else:
        w = config.guidance_scale if config.guidance_scale is not None else (7.5 if kind == "text" else 1.0)
    if kind == "none" and w != 1.0:
        raise ValueError(f"{name!r} is unconditional: classifier-free guidance needs a condition; use --guidance-scale 1")
    if w != 1.0 and not getattr(teacher, "has_null", True):
        raise ValueError(f"{name!r} has no null class, so no unconditional output to guide against; use --guidance-scale 1")
    inputs = sample_conditions(teacher, config)
    res = teacher.resolution(config.resolution, "--resolution")
    side = res // teacher.vae_scale
    cond = teacher.validation_condition(inputs, res)
    uncond = teacher.uncond(cond) if w != 1.0 else None
    if config.control_images is not None:
        from perflow.targets import with_control

        ctrl = config.control_images[torch.arange(config.num_samples) % config.control_images.shape[0]]
        cond, uncond = with_control(cond, ctrl), None if uncond is None else with_control(uncond, ctrl)
    gen = torch.Generator().manual_seed(config.seed)
    noise = torch.randn(config.num_samples, teacher.latent_channels, side, side, generator=gen)
    noise = noise.to(teacher.device, teacher.dtype)

    sched_cfg = sampler_config(teacher, folder, noise)
    teacher_fn = denoiser(teacher.unet, cond, uncond, w, config.batch_size)
    samplers: list[Sampler] = []
    for skind, st in students.items():
        if st is not None:
            st.unet.to(teacher.device, teacher.dtype)
            k = st.scheduler_config.get("num_time_windows")
            label = (config.student_name if skind == "perflow" else None) or f"{skind} (K={k})"
            samplers.append(Sampler(label, denoiser(st.unet, cond, uncond, w, config.batch_size), st.make_scheduler, skind))
    for b in config.baselines:
        for sp in config.spacings:
            samplers.append(Sampler(_spaced(b, sp), teacher_fn, lambda b=b, sp=sp: baseline_scheduler(b, sched_cfg, sp)))
    reference = Sampler("teacher ddim", teacher_fn, lambda: baseline_scheduler("ddim", sched_cfg), "reference")

    def decode(z: torch.Tensor) -> torch.Tensor:  # (N, c, h, w) latents -> (N, C, R, R) images
        return torch.cat([teacher.decode_latents(c) for c in z.split(config.batch_size)]).float().cpu()

    channels = teacher.unet.config.out_channels if teacher.vae is None else 3
    real, real_source = real_reference(config, name, res, channels)
    measure, ref_holder, info = _metrics(config, name, kind, inputs, real, decode)
    with torch.no_grad():
        result = compare_samplers(
            samplers, reference, noise, config.steps, config.reference_steps, measure,
            progress=progress, num_previews=min(20, config.num_samples), flow_steps=config.flow_steps,
        )
    ref_images = ref_holder["images"]
    keep_best_spacing(result, config.baselines, config.spacings, config.select_spacing_by)
    half = config.num_samples // 2
    floor = metrics.sliced_wasserstein(ref_images[:half].flatten(1), ref_images[half:2 * half].flatten(1),
                                       config.sw_projections, seed=config.seed)
    result.meta.update({
        "config": _json_config(config, name),
        "teacher_conditioning": kind,
        "guidance_scale": w,
        "embedded_guidance": embedded,
        "resolution": res,
        "sw_ref_floor": floor,
        "sw_projections": config.sw_projections,
        "real_reference": real_source or None,
        "num_real_reference": None if real is None else int(real.shape[0]),
        **info,
        "torch": torch.__version__,
        "command": eval_command(config, name) if folder is not None else "",
    })
    result.meta["config"]["guidance_scale"] = w
    result.meta["notes"] = notes(result.meta, config)
    return result


def _spaced(baseline: str, spacing: str) -> str:
    return f"teacher {baseline} [{spacing}]"


def _metrics(config: TeacherEvalConfig, name: str, kind: str, inputs: list, real, decode):
    """The :class:`Metrics` of a run, a holder the reference images land in, and extra meta entries."""
    ref_holder: dict = {}
    info: dict = {}

    def sw_ref(x: torch.Tensor) -> float:
        ref = ref_holder.setdefault("images", x)  # the reference is measured first (compare_samplers)
        return metrics.sliced_wasserstein(x.flatten(1), ref.flatten(1), config.sw_projections, seed=config.seed)

    def sw_ref_se(x: torch.Tensor) -> float:
        ref = ref_holder["images"]
        return bootstrap_se(lambda i: metrics.sliced_wasserstein(
            x[i].flatten(1), ref[i].flatten(1), config.sw_projections, seed=config.seed), x.shape[0], config.bootstrap, config.seed)

    extra = {"sw_ref": sw_ref, "sw_ref_se": sw_ref_se}
    if real is not None:
        extra["sw_real"] = lambda x: metrics.sliced_wasserstein(x.flatten(1), real.flatten(1), config.sw_projections, seed=config.seed)
    feature_fn = real_features = classify_fn = labels = None
    if config.classifier is not None and kind != "class":
        raise ValueError(f"--classifier checks labels: it needs a class-conditional teacher, {name!r} is {_KIND_WORDS[kind]}")
    if config.inception and real is None:
        raise ValueError("--inception computes FID against real images: give --real-images DIR")
    use_classifier = kind == "class" and (config.classifier is not None or name in DIGIT_TEACHERS)
    if use_classifier:
        from perflow.builtin.classifier import load_digit_classifier

        classifier = load_digit_classifier(config.classifier)
        csize = classifier.config.image_size

        def to_classifier(x: torch.Tensor) -> torch.Tensor:
            x = x.float().clamp(-1, 1)
            if x.shape[1] != 1:
                x = x.mean(1, keepdim=True)
            if x.shape[-1] != csize:
                x = torch.nn.functional.interpolate(x, size=(csize, csize), mode="bilinear", align_corners=False)
            return x

        classify_fn = lambda x: classifier(to_classifier(x))  # noqa: E731
        labels = torch.tensor(inputs)
        feature_fn = lambda x: classifier.features(to_classifier(x))  # noqa: E731
        info["fd_features"] = "digit classifier"
    if config.inception:
        from .features import InceptionFeatures

        feature_fn = InceptionFeatures(config.inception)
        info["fd_features"] = "Inception"
    if feature_fn is not None and real is not None:
        with torch.no_grad():
            real_features = feature_fn(real)
    if feature_fn is not None:  # the same distance to the reference's samples: needs no real images
        def fd_ref(x: torch.Tensor) -> float:
            ref = ref_holder.setdefault("features", feature_fn(ref_holder.setdefault("images", x)))
            return metrics.frechet_distance_features(feature_fn(x), ref)

        extra["fd_ref"] = fd_ref
    if config.clip:
        if kind != "text":
            raise ValueError("--clip scores images against prompts: it needs a text-conditioned teacher")
        from .features import CLIPScorer

        scorer = CLIPScorer(config.clip)
        extra["clip_score"] = lambda x: scorer(x, inputs).mean().item()
    measure = Metrics(decode=decode, feature_fn=feature_fn if real_features is not None else None,
                      real_features=real_features, classify_fn=classify_fn, labels=labels, extra=extra)
    return measure, ref_holder, info


def bootstrap_se(stat, n: int, num: int, seed: int = 0) -> float:
    """Standard deviation of ``stat(idx)`` over ``num`` bootstrap index sets ``idx`` (``n`` draws with replacement)."""
    g = torch.Generator().manual_seed(seed + 1)
    values = torch.tensor([stat(torch.randint(0, n, (n,), generator=g)) for _ in range(num)], dtype=torch.float64)
    return values.std().item()


def keep_best_spacing(result: EvalResult, baselines, spacings, metric: str = "paired_mse") -> None:
    """Replace the rows of every ``(baseline, steps)`` by the spacing with the lowest ``metric``.

    The kept row is named ``teacher <baseline>``, with ``spacing`` (the winner) and
    ``spacing_<metric>`` (every spacing's value); previews and per-sample errors follow."""
    rows = []
    for r in result.rows:
        if r["kind"] != "baseline":
            rows.append(r)
            continue
        base = next(b for b in baselines if r["sampler"] in {_spaced(b, s) for s in spacings})
        tried = {s: result.row(_spaced(base, s), r["steps"])[metric] for s in spacings}
        best = min(tried, key=tried.get)
        if r["sampler"] == _spaced(base, best):
            rows.append({**r, "sampler": f"teacher {base}", "spacing": best, f"spacing_{metric}": tried})
            for kept in (result.previews, result.paired_errors):
                if f"{r['sampler']}@{r['steps']}" in kept:
                    kept[f"teacher {base}@{r['steps']}"] = kept[f"{r['sampler']}@{r['steps']}"]
    result.previews = {k: v for k, v in result.previews.items() if " [" not in k}
    result.paired_errors = {k: v for k, v in result.paired_errors.items() if " [" not in k}
    result.rows = rows


def notes(meta: dict, config: TeacherEvalConfig) -> list[str]:
    """Plain sentences for the report: what the distribution metric measures and its noise level."""
    n = config.num_samples
    out = [
        f"Teacher {meta['config']['teacher']!r} ({_KIND_WORDS[meta['teacher_conditioning']]}), resolution {meta['resolution']}"
        + (f", guidance input {meta['embedded_guidance']:g} for every sampler (Flux: no second CFG pass)."
           if meta.get("embedded_guidance") is not None else f", guidance scale {meta['guidance_scale']:g}."),
        f"sliced W2 (sw_ref) is the sliced Wasserstein-2 distance, over {config.sw_projections} fixed random directions "
        f"in pixel space, between a sampler's {n} images and the teacher reference's {n}; ± is its bootstrap standard "
        f"error ({config.bootstrap} resamples). Noise floor: two halves of the reference ({n // 2} images each) are "
        f"{meta['sw_ref_floor']:.4f} apart.",
        "Baselines: each step count reports the timestep_spacing (of " + ", ".join(config.spacings)
        + f") with the lowest {config.select_spacing_by}, chosen on these same samples (favours the baselines).",
    ]
    if meta.get("real_reference"):
        out.append(f"sw_real: the same distance to {meta['num_real_reference']} real images ({meta['real_reference']}).")
    return out


def _json_config(config: TeacherEvalConfig, name: str) -> dict:
    def plain(v: Any) -> Any:  # a loaded student or a tensor is named, not copied
        if isinstance(v, torch.Tensor):
            return f"tensor {tuple(v.shape)}"
        if hasattr(v, "path") and hasattr(v, "unet"):
            return str(v.path)
        return list(v) if isinstance(v, tuple) else v

    out = {f.name: plain(getattr(config, f.name)) for f in fields(config) if f.name != "teacher"}
    return {"teacher": name, **out}


def eval_command(config: TeacherEvalConfig, name: str) -> str:
    """The ``perflow eval --task teacher`` command line that runs ``config``."""
    flags: list[str] = ["perflow", "eval", "--task", "teacher", "--teacher", name]
    for flag, value in (("--perflow", config.perflow), ("--reflow", config.reflow),
                        ("--real-images", config.real_images), ("--inception", config.inception),
                        ("--clip", config.clip), ("--classifier", config.classifier),
                        ("--guidance-scale", config.guidance_scale), ("--resolution", config.resolution),
                        ("--device", config.device)):
        if value is not None:
            flags += [flag, str(value)]
    for flag, values in (("--labels", config.labels), ("--prompts", config.prompts)):
        if values:
            flags += [flag, *map(str, values)]
    flags += ["--steps", *map(str, config.steps), "--baselines", *config.baselines, "--spacings", *config.spacings,
              "--select-spacing-by", config.select_spacing_by,
              "--num-samples", str(config.num_samples), "--reference-steps", str(config.reference_steps),
              "--batch-size", str(config.batch_size), "--seed", str(config.seed)]
    return " ".join(shlex.quote(f) for f in flags)
