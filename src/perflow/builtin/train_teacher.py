"""Train a built-in teacher (``digits``, ``faces`` or ``photos``): reproducible, CPU, minutes.

Every teacher (:mod:`perflow.builtin.suite`) is a diffusers UNet trained with the DDPM loss on
its own data: ``|| f_theta(sqrt(abar_i) x0 + sqrt(1 - abar_i) eps, i, c) - target ||^2`` with
``i ~ U{0..T-1}``, ``target = eps`` for an ``epsilon`` teacher and
``v = sqrt(abar_i) eps - sqrt(1 - abar_i) x0`` for a ``v_prediction`` one (the scheduler's
``get_velocity``). A class-conditional teacher is conditioned through ``encoder_hidden_states``
on a learned label embedding (:class:`perflow.models.LabelEncoder`); the null label replaces
10 % of the labels so it supports classifier-free guidance.

The flow-matching teacher ``flow_digits`` (an ``SD3Transformer2DModel``) is trained with the
rectified-flow loss ``|| v_theta((1 - sigma) x0 + sigma eps, sigma T, c) - (eps - x0) ||^2``, its
time logit-normal and shifted as SD3 trains: ``u = sigmoid(n)``, ``n ~ N(0, 1)``,
``sigma = shift u / (1 + (shift - 1) u)`` (the shift of its ``FlowMatchEulerDiscreteScheduler``);
the label embedding is fed as SD3's text states and pooled projection
(:func:`perflow.training.flow_teachers.label_condition`). AdamW with warm-up and cosine decay,
gradient clipping at 1, weights averaged by EMA; seeded. Reproduce the shipped weights with::

    python -m perflow.builtin.train_teacher --teacher digits --output-dir src/perflow/builtin/weights/digits_teacher
    python -m perflow.builtin.train_teacher --teacher faces --threads 1 --output-dir src/perflow/builtin/weights/faces_teacher
    python -m perflow.builtin.train_teacher --teacher photos --threads 1 --output-dir src/perflow/builtin/weights/photos_teacher
    python -m perflow.builtin.train_teacher --teacher flow_digits --threads 1 --output-dir src/perflow/builtin/weights/flow_digits_teacher

A class-conditional folder holds ``unet/`` (``transformer/`` for ``flow_digits``), ``scheduler/``
and ``label_encoder/`` (the format :mod:`perflow.training` loads); the unconditional ``faces`` folder is a diffusers
``DDPMPipeline`` (``model_index.json``, ``unet/``, ``scheduler/``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..io import atomic_folder
from ..io import match_umask
from .suite import SCHEDULE, SuiteTeacher, build_teacher_unet, get_suite_teacher

NULL_DROPOUT = 0.1
__all__ = ["NULL_DROPOUT", "SCHEDULE", "build_teacher_unet", "teacher_scheduler", "save_teacher", "train_teacher",
           "train_digits_teacher"]


def teacher_scheduler():
    """The digits teacher's ``DDIMScheduler`` (SD's beta schedule, ``set_alpha_to_one=False``, epsilon)."""
    return get_suite_teacher("digits").scheduler()


def save_teacher(output_dir: str | Path, unet, label_encoder, scheduler, denoiser_name: str = "unet") -> None:
    """Save ``unet/`` (or ``denoiser_name/``), ``scheduler/`` and ``label_encoder/`` (safetensors) atomically; with
    ``label_encoder=None``, a diffusers ``DDPMPipeline`` folder (``model_index.json``, ``unet/``, ``scheduler/``)."""

    def write(tmp: Path) -> None:
        if label_encoder is None:
            from diffusers import DDPMPipeline

            DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
            return
        unet.save_pretrained(tmp / denoiser_name, safe_serialization=True)
        label_encoder.save_pretrained(tmp / "label_encoder", safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")

    with atomic_folder(output_dir, overwrite=True) as tmp:
        write(tmp)
        match_umask(tmp)  # mkdtemp/safetensors create private files; ship them readable


def label_dim(denoiser) -> int:
    """The label embedding's width: the UNet's ``cross_attention_dim`` or the transformer's ``joint_attention_dim``."""
    cfg = denoiser.config
    return cfg.joint_attention_dim if "joint_attention_dim" in cfg else cfg.cross_attention_dim


def _lr_lambda(max_steps: int):
    """Linear warm-up over ``min(200, max_steps / 10)`` steps times a cosine decay to 0 at ``max_steps``."""
    warmup = min(200, max_steps // 10)
    return lambda s: min(1.0, (s + 1) / max(warmup, 1)) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / max_steps)).item())


def teacher_target(scheduler, x0: torch.Tensor, eps: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """The regression target of the teacher's prediction type: ``eps`` or ``v`` (diffusers' ``get_velocity``)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return eps
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, eps, i)
    raise ValueError(f"train_teacher supports epsilon and v_prediction teachers, not {kind!r}")


def vp_loss(unet, scheduler, x0: torch.Tensor, cond: dict, gen: torch.Generator) -> torch.Tensor:
    """The DDPM loss at ``i ~ U{0..T-1}`` (target: :func:`teacher_target`); ``cond``: the UNet's label states."""
    abar = scheduler.alphas_cumprod.float()  # (T,)
    i = torch.randint(0, abar.numel(), (x0.shape[0],), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    a = abar[i].view(-1, 1, 1, 1)
    z = a.sqrt() * x0 + (1 - a).sqrt() * eps
    pred = unet(z, i, **cond).sample
    return torch.nn.functional.mse_loss(pred, teacher_target(scheduler, x0, eps, i))


def flow_loss(transformer, scheduler, x0: torch.Tensor, cond: dict, gen: torch.Generator) -> torch.Tensor:
    """The rectified-flow loss at a logit-normal, shifted ``sigma`` (target ``eps - x0``); ``cond``: the label states."""
    from perflow.schedule import shift_sigma
    from perflow.training.flow_teachers import label_condition

    sigma = shift_sigma(torch.sigmoid(torch.randn(x0.shape[0], generator=gen)), scheduler.config.shift)
    eps = torch.randn(x0.shape, generator=gen)
    s = sigma.view(-1, 1, 1, 1)
    z = (1 - s) * x0 + s * eps
    pred = label_condition(cond["encoder_hidden_states"]).forward(
        transformer, z, sigma * scheduler.config.num_train_timesteps)
    return torch.nn.functional.mse_loss(pred, eps - x0)


def train_teacher(
    teacher: str | SuiteTeacher,
    output_dir: str | Path | None = None,
    max_steps: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    ema_decay: float | None = None,
    seed: int = 0,
    save_every: int = 1000,
    progress: bool = True,
) -> Path:
    """Train a suite teacher (by name or :class:`SuiteTeacher`) and save its EMA weights; returns the folder.

    ``None`` arguments take the teacher's defaults; ``output_dir`` defaults to its shipped folder.
    """
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from perflow.models import LabelEncoder

    spec = get_suite_teacher(teacher) if isinstance(teacher, str) else teacher
    output_dir = Path(output_dir or spec.path)
    max_steps = max_steps or spec.max_steps
    batch_size = batch_size or spec.batch_size
    ema_decay = spec.ema_decay if ema_decay is None else ema_decay
    if max_steps < 1 or batch_size < 1:
        raise ValueError(f"max_steps and batch_size must be >= 1, got {max_steps} and {batch_size}")

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    draw = spec.batches()
    unet = spec.build_unet()
    label_encoder = None
    if spec.num_classes:
        label_encoder = LabelEncoder(num_classes=spec.num_classes, embed_dim=label_dim(unet))
    scheduler = spec.scheduler()
    loss_fn = flow_loss if spec.layout == "flow" else vp_loss
    modules = [unet] + ([label_encoder] if label_encoder is not None else [])
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=learning_rate or spec.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(max_steps))
    emas = [EMAModel(m.parameters(), decay=ema_decay) for m in modules]

    def save() -> None:
        copies = [spec.build_unet()]
        if label_encoder is not None:
            copies.append(LabelEncoder(spec.num_classes, label_dim(unet)))
        for ema, copy in zip(emas, copies):
            ema.copy_to(copy.parameters())
        save_teacher(output_dir, copies[0], copies[1] if len(copies) > 1 else None, scheduler, spec.denoiser_name)

    start = time.time()
    bar = tqdm(range(max_steps), desc=f"{spec.name} teacher", unit="step", disable=not progress)
    for step in bar:
        x0, y = draw(gen, batch_size)  # (B, C, H, W), (B,) or None
        kwargs = {}
        if label_encoder is not None:
            y = y.clone()
            y[torch.rand(batch_size, generator=gen) < NULL_DROPOUT] = label_encoder.null_label
            kwargs["encoder_hidden_states"] = label_encoder(y)
        loss = loss_fn(unet, scheduler, x0, kwargs, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        for ema, m in zip(emas, modules):
            ema.step(m.parameters())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if save_every and (step + 1) % save_every == 0 and step + 1 < max_steps:
            save()
    save()
    print(f"trained the {spec.name} teacher {max_steps} steps in {time.time() - start:.0f} s; saved to {output_dir}")
    return output_dir


def train_digits_teacher(
    output_dir: str | Path,
    max_steps: int = 3000,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    ema_decay: float = 0.999,
    image_size: int = 8,
    seed: int = 0,
    save_every: int = 1000,
) -> Path:
    """Train the digits teacher and save it (EMA weights) to ``output_dir``; returns the path."""
    if image_size != 8:
        raise ValueError("the digits teacher is trained at image_size 8; other sizes are not a suite teacher")
    return train_teacher("digits", output_dir, max_steps, batch_size, learning_rate, ema_decay, seed, save_every)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m perflow.builtin.train_teacher", description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="digits", help="digits (default), faces, photos or flow_digits")
    p.add_argument("--output-dir", default=None, help="default: src/perflow/builtin/weights/<teacher>_teacher")
    p.add_argument("--max-steps", type=int, default=None, help="default: the teacher's (digits 3000, flow_digits 4000)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the teacher's (digits 128)")
    p.add_argument("--learning-rate", type=float, default=None, help="default: the teacher's (2e-3; flow_digits 1e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    try:
        spec = get_suite_teacher(args.teacher)
    except ValueError as err:
        p.error(str(err))
    if args.threads:
        torch.set_num_threads(args.threads)
    train_teacher(spec, args.output_dir, args.max_steps, args.batch_size, args.learning_rate, seed=args.seed)


if __name__ == "__main__":
    main()
