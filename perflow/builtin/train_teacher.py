"""Train the built-in class-conditional digits teacher (reproducible, CPU, a few minutes).

The teacher is a diffusers ``UNet2DConditionModel`` predicting ``epsilon`` on 8x8
digits (:mod:`perflow.builtin.digits`), conditioned through ``encoder_hidden_states``
on a learned label embedding (:class:`perflow.models.LabelEncoder`; label 10 is the
null label, used for 10 % of the examples so the teacher supports classifier-free
guidance). Noise schedule: Stable Diffusion's (``scaled_linear`` betas 0.00085..0.012,
``T = 1000``), so the PeRFlow maths runs exactly as it does for SD.

Loss (DDPM): ``|| eps_theta(sqrt(abar_i) x0 + sqrt(1 - abar_i) eps, i, c) - eps ||^2`` with
``i ~ U{0..T-1}``; weights averaged by EMA. Reproduce the shipped weights with::

    python -m perflow.builtin.train_teacher --output-dir perflow/builtin/weights/digits_teacher

The folder holds ``unet/``, ``scheduler/`` (a ``DDIMScheduler`` config) and
``label_encoder/``, the class-conditional teacher format :mod:`perflow.training` loads.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

NULL_DROPOUT = 0.1
SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def build_teacher_unet(image_size: int = 8, cross_attention_dim: int = 32):
    """The teacher architecture: a 1.7M-parameter ``UNet2DConditionModel`` (8 -> 4 -> 2 pixels)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=image_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def teacher_scheduler():
    """The teacher's ``DDIMScheduler`` (SD's beta schedule, ``set_alpha_to_one=False``, epsilon)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULE)


def _save_atomically(output_dir: Path, write) -> None:
    """Write a folder into a temporary sibling, then swap it into place."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        write(tmp)
        for path in [tmp, *tmp.rglob("*")]:  # mkdtemp/safetensors create private files; ship them readable
            path.chmod(0o755 if path.is_dir() else 0o644)
        old = None
        if output_dir.exists():
            old = output_dir.with_name(f".{output_dir.name}.old{os.getpid()}")
            os.replace(output_dir, old)
        os.replace(tmp, output_dir)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def save_teacher(output_dir: str | Path, unet, label_encoder, scheduler) -> None:
    """Save ``unet/``, ``scheduler/`` and ``label_encoder/`` (safetensors) atomically."""

    def write(tmp: Path) -> None:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        label_encoder.save_pretrained(tmp / "label_encoder", safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")

    _save_atomically(Path(output_dir), write)


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
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from perflow.builtin.digits import NUM_CLASSES, digits_tensors
    from perflow.models import LabelEncoder

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, labels = digits_tensors("train", image_size)  # (N, 1, H, W), (N,)
    unet = build_teacher_unet(image_size)
    label_encoder = LabelEncoder(num_classes=NUM_CLASSES, embed_dim=unet.config.cross_attention_dim)
    scheduler = teacher_scheduler()
    abar = scheduler.alphas_cumprod.float()  # (T,)
    params = list(unet.parameters()) + list(label_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    warmup = min(200, max_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / max_steps)).item())
    )
    ema_unet = EMAModel(unet.parameters(), decay=ema_decay)
    ema_label = EMAModel(label_encoder.parameters(), decay=ema_decay)

    def save(step: int) -> None:
        u, le = build_teacher_unet(image_size), LabelEncoder(NUM_CLASSES, unet.config.cross_attention_dim)
        ema_unet.copy_to(u.parameters())
        ema_label.copy_to(le.parameters())
        save_teacher(output_dir, u, le, scheduler)

    start = time.time()
    bar = tqdm(range(max_steps), desc="digits teacher", unit="step")
    for step in bar:
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(batch_size, generator=gen) < NULL_DROPOUT] = label_encoder.null_label
        i = torch.randint(0, abar.numel(), (batch_size,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = abar[i].view(-1, 1, 1, 1)
        z = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = unet(z, i, encoder_hidden_states=label_encoder(y)).sample
        loss = torch.nn.functional.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema_unet.step(unet.parameters())
        ema_label.step(label_encoder.parameters())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if save_every and (step + 1) % save_every == 0 and step + 1 < max_steps:
            save(step + 1)
    save(max_steps)
    print(f"trained {max_steps} steps in {time.time() - start:.0f} s; saved to {output_dir}")
    return Path(output_dir)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", default=str(Path(__file__).parent / "weights" / "digits_teacher"))
    p.add_argument("--max-steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train_digits_teacher(args.output_dir, args.max_steps, args.batch_size, args.learning_rate, seed=args.seed)


if __name__ == "__main__":
    main()
