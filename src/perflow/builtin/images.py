"""Small image tensors as data: fixed splits, a map-style dataset, resizing, export to a folder.

Shared by the suite's datasets (:mod:`perflow.builtin.faces`, :mod:`perflow.builtin.photos`).
Images are float32 ``(N, C, H, W)`` in ``[-1, 1]``; an exported folder holds one PNG per image
(``"L"`` for one channel, ``"RGB"`` for three, pixel ``round((x + 1) * 127.5)``) and, for
labelled data, a ``metadata.jsonl`` of ``{"file_name", "label", "text"}`` lines (the HF
``imagefolder`` convention that ``perflow train --data.path`` reads; ``text`` is the class name).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

SPLITS = ("train", "test", "all")


def split_indices(num: int, split: str, test_fraction: float = 0.2, seed: int = 0) -> torch.Tensor:
    """Sorted indices of ``split`` in a fixed permutation ``randperm(num, seed)``.

    ``"test"`` is the first ``round(num * test_fraction)`` of the permutation, ``"train"`` the
    rest, ``"all"`` every index (the rule of :mod:`perflow.builtin.digits`).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    perm = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
    num_test = int(round(num * test_fraction))
    if split == "test":
        return perm[:num_test].sort().values
    if split == "train":
        return perm[num_test:].sort().values
    return torch.arange(num)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, C, h, w) -> (N, C, size, size)``: antialiased bilinear, clamped to ``[-1, 1]``."""
    if images.shape[-2:] == (size, size):
        return images
    out = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.clamp(-1.0, 1.0)


class TensorImages(Dataset):
    """Items ``{"pixel_values": (C, H, W) float32 in [-1, 1]}``, plus ``"label": int`` when labelled."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        if labels is not None and labels.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict:
        item = {"pixel_values": self.images[index]}
        if self.labels is not None:
            item["label"] = int(self.labels[index])
        return item


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(N, C, H, W)`` in ``[-1, 1]`` -> ``(N, H, W, C)`` uint8 by ``round((x + 1) * 127.5)``."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def write_image_folder(
    images: torch.Tensor, out: str | Path, labels: torch.Tensor | None = None, label_names: Sequence[str] | None = None
) -> Path:
    """Write ``00000.png, ...`` (and ``metadata.jsonl`` when labelled) into a new or empty folder ``out``."""
    from PIL import Image

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder; choose a new --out folder or delete it")
    channels = images.shape[1]
    if channels not in (1, 3):
        raise ValueError(f"can only write 1- or 3-channel images as PNG, got {channels} channels")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n, arr in enumerate(to_uint8(images)):
        name = f"{n:05d}.png"
        Image.fromarray(arr[..., 0] if channels == 1 else arr).save(out / name)  # "L" or "RGB"
        if labels is not None:
            label = int(labels[n])
            text = label_names[label] if label_names is not None else str(label)
            rows.append(json.dumps({"file_name": name, "label": label, "text": text}))
    if rows:
        (out / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return out
