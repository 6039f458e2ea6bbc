"""scikit-learn's bundled handwritten digits as a torch dataset (offline, no download).

``sklearn.datasets.load_digits`` holds 1797 grey images of 8x8 pixels with values
0..16 and labels 0..9. Pixels are mapped to ``[-1, 1]`` by ``x / 8 - 1`` (the range a
diffusion teacher is trained on) and optionally resized (bilinear) to
``image_size x image_size``. A fixed, seeded 20 % of the images is the held-out
``"test"`` split (the real reference set of the evaluation); the rest is ``"train"``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .images import split_indices

SPLITS = ("train", "test", "all")
TEST_FRACTION = 0.2
SPLIT_SEED = 0
NUM_CLASSES = 10


def digits_tensors(split: str = "train", image_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """All images ``(N, 1, H, W)`` float32 in ``[-1, 1]`` and labels ``(N,)`` int64 of a split."""
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; expected one of {SPLITS}")
    if not isinstance(image_size, int) or image_size < 4:
        raise ValueError(f"image_size must be an integer >= 4 (8 is native), got {image_size!r}")
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # (N, 1, 8, 8)
    labels = torch.as_tensor(data.target, dtype=torch.int64)
    idx = split_indices(images.shape[0], split, TEST_FRACTION, SPLIT_SEED)
    images, labels = images[idx], labels[idx]
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
        images = images.clamp(-1.0, 1.0)
    return images.contiguous(), labels


class DigitsDataset(Dataset):
    """Items ``{"pixel_values": (1, H, W) float32 in [-1, 1], "label": int}``."""

    def __init__(self, split: str = "train", image_size: int = 8):
        self.split = split
        self.image_size = image_size
        self.images, self.labels = digits_tensors(split, image_size)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.images[index], "label": int(self.labels[index])}


def load_digits_dataset(split: str = "train", image_size: int = 8) -> Dataset:
    """The digits as a ``torch.utils.data.Dataset`` of ``{"pixel_values", "label"}`` items.

    ``split``: ``"train"`` (80 %), ``"test"`` (the fixed held-out 20 %, seed 0) or ``"all"``.
    ``image_size``: 8 (native) or larger (bilinear resize), e.g. 16.
    """
    return DigitsDataset(split, image_size)


def digits_teacher_path() -> Path:
    """Folder of the shipped digits teacher (``unet/``, ``scheduler/``, ``label_encoder/``)."""
    path = Path(__file__).parent / "weights" / "digits_teacher"
    if not (path / "unet").is_dir():
        raise FileNotFoundError(
            f"the shipped digits teacher is missing at {path}; recreate it with "
            f"`python -m perflow.builtin.train_teacher --output-dir {path}`"
        )
    return path
