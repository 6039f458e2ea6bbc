"""The built-in teachers: what each one is, its architecture, noise schedule, data and budget.

Four small pixel-space teachers trained by :mod:`perflow.builtin.train_teacher`, deliberately
different so that acceleration is checked on teachers it was not tuned for:

| name | data | model | schedule, prediction | saved as |
| --- | --- | --- | --- | --- |
| ``digits`` | scikit-learn digits 8x8, grey, 10 classes | ``UNet2DConditionModel`` + label | SD ``scaled_linear``, ``epsilon`` | ``unet/ scheduler/ label_encoder/`` |
| ``faces`` | LFW faces 16x16, grey, unconditional, flips | ``UNet2DModel`` | DDPM ``linear`` 1e-4..0.02, ``epsilon``, clipped | a ``DDPMPipeline`` |
| ``photos`` | 64x64 crops of 9 photos at 16x16, RGB, 9 classes | ``UNet2DConditionModel`` + label | SD ``scaled_linear``, ``v_prediction`` (SD 2.x) | ``unet/ scheduler/ label_encoder/`` |
| ``flow_digits`` | scikit-learn digits 8x8, grey, 10 classes | ``SD3Transformer2DModel`` (MMDiT) + label | flow matching, ``shift`` 2 | ``transformer/ scheduler/ label_encoder/`` |

``flow_digits`` is the flow-matching teacher (rectified-flow loss, logit-normal time, SD3's
conditioning: the label embedding is both its one-token ``encoder_hidden_states`` and its
``pooled_projections``).

Each is a :class:`SuiteTeacher`: ``build_unet()`` (seeded by the caller), ``scheduler()``, and
``batches()``, which loads the training data once and returns ``draw(generator, B) -> (x0, labels)``
(labels ``None`` for an unconditional teacher). Write a dataset as an image folder that
``perflow train --data.path DIR`` reads with::

    python -m perflow.builtin.suite export --dataset photos --split train --out DIR
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

WEIGHTS = Path(__file__).parent / "weights"
Batches = Callable[[torch.Generator, int], "tuple[torch.Tensor, torch.Tensor | None]"]

# Stable Diffusion 1.x's DDIM config (the digits teacher's); SD 2.x's differs only in prediction_type.
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
# The flow-matching teacher's FlowMatchEulerDiscreteScheduler config (SD3's, with a smaller shift for 8x8 pixels).
FLOW_SCHEDULE = dict(num_train_timesteps=1000, shift=2.0)
# Ho et al.'s DDPM schedule, diffusers' DDPMScheduler defaults (clip_sample=True).
DDPM_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    clip_sample=True,
    prediction_type="epsilon",
)


@dataclass(frozen=True)
class SuiteTeacher:
    """One built-in teacher: how to build, feed and save it, and its default training budget."""

    name: str
    layout: str  # "class": unet/, scheduler/, label_encoder/;  "ddpm": a DDPMPipeline folder;
    # "flow": transformer/, scheduler/, label_encoder/ (a flow-matching transformer)
    scheduler_class: str
    schedule: dict
    num_classes: int  # 0: unconditional
    build_unet: Callable[[], torch.nn.Module]  # the denoiser (a transformer for the "flow" layout)
    batches: Callable[[], Batches]
    max_steps: int
    batch_size: int
    learning_rate: float = 2e-3
    ema_decay: float = 0.999

    def scheduler(self):
        """The teacher's diffusers scheduler, built from :attr:`schedule`."""
        import diffusers

        return getattr(diffusers, self.scheduler_class)(**self.schedule)

    @property
    def denoiser_name(self) -> str:
        """The denoiser's sub-folder: ``transformer`` for a flow-matching teacher, else ``unet``."""
        return "transformer" if self.layout == "flow" else "unet"

    @property
    def path(self) -> Path:
        """Where the shipped weights live: ``src/perflow/builtin/weights/<name>_teacher``."""
        return WEIGHTS / f"{self.name}_teacher"


# ----------------------------------------------------------------------------- architectures


def build_teacher_unet(image_size: int = 8, cross_attention_dim: int = 32, channels: int = 1):
    """The class-conditional architecture: a ``UNet2DConditionModel``, blocks (32, 64, 64), 1.7M parameters
    for one channel (``S -> S/2 -> S/4``, cross-attention on the label at the two coarse levels)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def build_flow_transformer(image_size: int = 8, embed_dim: int = 64):
    """The flow-matching architecture: an ``SD3Transformer2DModel`` (MMDiT), 2x2 patches, 6 joint blocks of
    width 64 (4 heads of 16), 0.9M parameters; the label embedding (``embed_dim``) is its one text token and
    its pooled projection."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=image_size, patch_size=2, in_channels=1, out_channels=1, num_layers=6,
        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=embed_dim, caption_projection_dim=64,
        pooled_projection_dim=embed_dim, pos_embed_max_size=image_size // 2,
    )


def build_faces_unet(image_size: int = 16):
    """The unconditional faces architecture: a ``UNet2DModel``, blocks (32, 64, 64), self-attention at
    the two coarse levels (``16 -> 8 -> 4``)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=image_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=16,
    )


# ----------------------------------------------------------------------------- training batches


def _digits_batches() -> Batches:
    from perflow.builtin.digits import digits_tensors

    images, labels = digits_tensors("train", 8)  # (N, 1, 8, 8), (N,)

    def draw(gen: torch.Generator, batch_size: int):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
        return images[idx], labels[idx]

    return draw


def _faces_batches() -> Batches:
    """Training faces with random horizontal flips (probability 1/2)."""
    from perflow.builtin.faces import faces_tensors

    images = faces_tensors("train")  # (80, 1, 16, 16)

    def draw(gen: torch.Generator, batch_size: int):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
        flip = torch.rand(batch_size, generator=gen) < 0.5
        x0 = images[idx]
        return torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0), None

    return draw


def _photos_batches() -> Batches:
    """Fresh random crops every batch: uniform photo, uniform position."""
    from perflow.builtin.photos import NUM_CLASSES, photo_sources, random_crops

    photo_sources()  # load once, before the clock starts

    def draw(gen: torch.Generator, batch_size: int):
        labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen)
        return random_crops(labels, gen), labels

    return draw


SUITE: dict[str, SuiteTeacher] = {
    "digits": SuiteTeacher(
        name="digits", layout="class", scheduler_class="DDIMScheduler", schedule=SCHEDULE, num_classes=10,
        build_unet=lambda: build_teacher_unet(8), batches=_digits_batches, max_steps=3000, batch_size=128,
    ),
    "faces": SuiteTeacher(
        name="faces", layout="ddpm", scheduler_class="DDPMScheduler", schedule=DDPM_SCHEDULE, num_classes=0,
        build_unet=lambda: build_faces_unet(16), batches=_faces_batches, max_steps=3000, batch_size=64,
    ),
    "photos": SuiteTeacher(
        name="photos", layout="class", scheduler_class="DDIMScheduler",
        schedule={**SCHEDULE, "prediction_type": "v_prediction"}, num_classes=9,
        build_unet=lambda: build_teacher_unet(16, channels=3), batches=_photos_batches, max_steps=2400, batch_size=64,
    ),
    "flow_digits": SuiteTeacher(
        name="flow_digits", layout="flow", scheduler_class="FlowMatchEulerDiscreteScheduler", schedule=FLOW_SCHEDULE,
        num_classes=10, build_unet=lambda: build_flow_transformer(8), batches=_digits_batches, max_steps=4000,
        batch_size=128, learning_rate=1e-3,
    ),
}


def get_suite_teacher(name: str) -> SuiteTeacher:
    """The :class:`SuiteTeacher` called ``name`` (``digits``, ``faces``, ``photos`` or ``flow_digits``)."""
    if name not in SUITE:
        raise ValueError(f"unknown built-in teacher {name!r}; expected one of {sorted(SUITE)}")
    return SUITE[name]


def suite_teacher_path(name: str) -> Path:
    """Folder of a shipped suite teacher; ``FileNotFoundError`` naming the command that recreates it."""
    spec = get_suite_teacher(name)
    path = spec.path
    if not (path / spec.denoiser_name).is_dir():
        raise FileNotFoundError(
            f"the shipped {name} teacher is missing at {path}; recreate it with "
            f"`python -m perflow.builtin.train_teacher --teacher {name} --output-dir {path}`"
        )
    return path


# ----------------------------------------------------------------------------- export


DATASETS = ("faces", "photos")


def export_dataset(dataset: str, out: str | Path, split: str = "train") -> Path:
    """Write a suite dataset split as an image folder (PNGs; ``metadata.jsonl`` with labels for photos)."""
    from perflow.builtin.images import write_image_folder

    if dataset == "faces":
        from perflow.builtin.faces import faces_tensors

        return write_image_folder(faces_tensors(split), out)
    if dataset == "photos":
        from perflow.builtin.photos import PHOTOS, photos_tensors

        images, labels = photos_tensors(split)
        return write_image_folder(images, out, labels, PHOTOS)
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m perflow.builtin.suite", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write a dataset split as an image folder for `perflow train --data.path`")
    ex.add_argument("--dataset", choices=DATASETS, required=True)
    ex.add_argument("--split", default="train", help="train or test (faces also: all)")
    ex.add_argument("--out", required=True, help="a new or empty folder")
    args = p.parse_args(argv)
    try:
        out = export_dataset(args.dataset, args.out, args.split)
    except (ValueError, FileNotFoundError) as err:
        p.error(str(err))
    print(f"wrote {sum(1 for f in out.iterdir() if f.suffix == '.png')} images to {out}")


if __name__ == "__main__":
    main()
