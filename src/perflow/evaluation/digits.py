"""The digits evaluator: PeRFlow and reflow students against the built-in digits teacher's solvers.

:func:`evaluate_digits` runs :func:`perflow.evaluation.harness.compare_samplers` with the shipped
digit classifier's features (Fréchet distance to the held-out test split) and label accuracy.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

import torch

from . import metrics
from .harness import DEFAULT_STEPS, EvalResult, Metrics, Sampler, compare_samplers
from .samplers import BASELINE_SAMPLERS, ModelFn, baseline_scheduler


@dataclass
class DigitsEvalConfig:
    """What :func:`evaluate_digits` compares. ``perflow``/``reflow``: trained student folders
    (``perflow train`` outputs); either may be ``None`` to compare the baselines only."""

    perflow: str | None = None
    reflow: str | None = None
    teacher: str = "digits"
    steps: tuple[int, ...] = DEFAULT_STEPS
    baselines: tuple[str, ...] = BASELINE_SAMPLERS
    num_samples: int = 1000
    reference_steps: int = 100
    guidance_scale: float = 1.0
    seed: int = 0
    classifier: str | None = None
    flow_steps: int = 32
    """Steps of the fine trajectories on which each student's flow straightness is measured."""


def class_model_fn(unet, label_encoder, labels: torch.Tensor, guidance_scale: float) -> ModelFn:
    """``model(z, timestep)`` of a label-conditioned UNet with classifier-free guidance
    ``out_u + w (out_c - out_u)`` (one batched call; plain conditional output when ``w = 1``)."""
    from perflow.denoisers import Condition, unet_denoiser

    with torch.no_grad():
        cond = Condition(label_encoder(labels.long()))
        if guidance_scale == 1.0:
            return unet_denoiser(unet, cond)
        uncond = Condition(label_encoder(torch.full_like(labels.long(), label_encoder.null_label)))
    return unet_denoiser(unet, cond, uncond, guidance_scale)


def evaluate_digits(config: DigitsEvalConfig, progress: bool = True) -> EvalResult:
    """Compare PeRFlow, whole-range reflow and the teacher's diffusers solvers on the digits.

    Labels are balanced (``i mod 10``); noise is seeded; the real reference set is the held-out
    test split; features and accuracy come from the shipped digit classifier.
    """
    from perflow.builtin.classifier import accuracy, load_digit_classifier
    from perflow.builtin.digits import digits_tensors
    from perflow.training.teachers import load_teacher

    from .students import load_student

    if config.num_samples < 20:
        raise ValueError(f"num_samples={config.num_samples} is too few for a Fréchet distance; use at least 20")
    teacher = load_teacher(config.teacher)
    if teacher.kind != "class" or teacher.vae is not None:
        raise ValueError(f"--task digits (the default) scores digit-like samples of a pixel-space class-conditional UNet "
                         f"teacher with the digit classifier; {config.teacher!r} is a {teacher.kind!r} teacher: "
                         "evaluate it with --task teacher")
    classifier = load_digit_classifier(config.classifier)
    unet, label_encoder = teacher.unet, teacher.label_encoder
    size = unet.config.sample_size
    gen = torch.Generator().manual_seed(config.seed)
    noise = torch.randn(config.num_samples, unet.config.in_channels, size, size, generator=gen)
    labels = torch.arange(config.num_samples) % 10
    teacher_fn = class_model_fn(unet, label_encoder, labels, config.guidance_scale)
    sched_cfg = teacher_scheduler_config(config.teacher)

    samplers: list[Sampler] = []
    for kind, path in (("perflow", config.perflow), ("reflow", config.reflow)):
        if path is None:
            continue
        student = load_student(path, teacher)
        name = f"{kind} (K={student.scheduler.config.num_time_windows})"
        fn = class_model_fn(student.unet, student.label_encoder or label_encoder, labels, config.guidance_scale)
        samplers.append(Sampler(name, fn, student.make_scheduler, kind))
    for b in config.baselines:
        samplers.append(Sampler(f"teacher {b}", teacher_fn, lambda b=b: baseline_scheduler(b, sched_cfg), "baseline"))
    reference = Sampler("teacher ddim", teacher_fn, lambda: baseline_scheduler("ddim", sched_cfg), "reference")

    def to_classifier(x: torch.Tensor) -> torch.Tensor:
        x = x.float().clamp(-1, 1)
        csize = classifier.config.image_size
        if x.shape[-1] != csize:
            x = torch.nn.functional.interpolate(x, size=(csize, csize), mode="bilinear", align_corners=False)
        return x

    with torch.no_grad():
        real_test, test_labels = digits_tensors("test", classifier.config.image_size)
        real_train, _ = digits_tensors("train", classifier.config.image_size)
        real_features = classifier.features(real_test)
        floor = metrics.frechet_distance_features(classifier.features(real_train), real_features)
        classifier_acc = accuracy(classifier, real_test, test_labels)
        feature_fn = lambda x: classifier.features(to_classifier(x))  # noqa: E731
        classify_fn = lambda x: classifier(to_classifier(x))  # noqa: E731
        result = compare_samplers(
            samplers, reference, noise, config.steps, config.reference_steps,
            Metrics(decode=lambda z: z.float().clamp(-1, 1), feature_fn=feature_fn, real_features=real_features,
                    classify_fn=classify_fn, labels=labels),
            progress=progress, flow_steps=config.flow_steps,
        )
    result.meta.update({
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "fd_real_train_vs_test": floor,
        "classifier_test_accuracy": classifier_acc,
        "num_real_reference": int(real_features.shape[0]),
        "torch": torch.__version__,
        "command": " ".join(sys.argv) if sys.argv and sys.argv[0] else "",
    })
    return result


def teacher_scheduler_config(teacher: str) -> dict:
    """The ``scheduler/scheduler_config.json`` of a class-conditional teacher folder or built-in name
    (``digits``); ``FileNotFoundError`` naming the file when it has none."""
    from perflow.builtin.digits import digits_teacher_path
    from perflow.io import read_scheduler_config
    from perflow.training.teachers import BUILTIN_TEACHERS

    # BUILTIN_TEACHERS names the digits teacher only; its public folder is digits_teacher_path().
    return read_scheduler_config(digits_teacher_path() if teacher in BUILTIN_TEACHERS else teacher, required=True)
