"""Colour patches of the photos bundled with scikit-image and scikit-learn, labelled by photo.

Nine photos that load offline (:data:`PHOTOS`: seven from ``skimage.data``, ``china`` and
``flower`` from ``sklearn.datasets.load_sample_images``) are each resized (antialiased) so the
short side is :data:`SHORT_SIDE` = 128 pixels. A sample is a random ``64 x 64`` crop of one photo
(uniform class, uniform integer position) resized to ``image_size`` (16: a 4x antialiased
downscale, so a sample shows half the photo's short side), pixels in ``[-1, 1]``; its label is the
photo's index. No flips: a crop's orientation is part of its class's look.

Fixed splits (crops are drawn, not enumerated): ``"test"`` = 64 crops per class from seed 1
(576, the real reference set of an evaluation), ``"train"`` = 512 per class from seed 0 (4608,
what ``export`` writes; the teacher itself trains on fresh crops every step). Both are drawn from
the whole photo, so test crops overlap training pixels: the split fixes the reference set, it is
not a generalisation test.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch.utils.data import Dataset

from .images import TensorImages, resize_images

PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
    "china", "flower",
)
NUM_CLASSES = len(PHOTOS)
SHORT_SIDE = 128
CROP = 64
IMAGE_SIZE = 16
SPLIT_CROPS = {"train": (512, 0), "test": (64, 1)}  # split: (crops per class, seed)


def _load_photo(name: str):
    """The photo ``name`` as a uint8 ``(H, W, 3)`` array."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_images

        data = load_sample_images()
        return next(img for img, f in zip(data.images, data.filenames) if f.endswith(f"{name}.jpg"))
    import skimage.data

    return getattr(skimage.data, name)()


@lru_cache(maxsize=1)
def photo_sources() -> tuple[torch.Tensor, ...]:
    """Each photo of :data:`PHOTOS` as ``(3, H, W)`` float32 in ``[-1, 1]`` with ``min(H, W) = 128``."""
    import torch.nn.functional as F

    out = []
    for name in PHOTOS:
        x = torch.tensor(_load_photo(name)).permute(2, 0, 1)[None].float() / 127.5 - 1  # (1, 3, H, W)
        h, w = x.shape[-2:]
        size = (SHORT_SIDE, round(w * SHORT_SIDE / h)) if h <= w else (round(h * SHORT_SIDE / w), SHORT_SIDE)
        out.append(F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(-1, 1))
    return tuple(out)


def random_crops(
    labels: torch.Tensor, generator: torch.Generator, image_size: int = IMAGE_SIZE
) -> torch.Tensor:
    """One random ``64 x 64`` crop of photo ``labels[b]`` per row, resized: ``(B, 3, S, S)`` in ``[-1, 1]``.

    The crop's top-left corner is ``floor(u (H - 64 + 1))``, ``floor(u' (W - 64 + 1))`` with
    ``u, u' ~ U[0, 1)`` drawn from ``generator`` (``(B, 2)`` uniforms in one call).
    """
    if not isinstance(image_size, int) or not 4 <= image_size <= CROP:
        raise ValueError(f"image_size must be an integer in 4..{CROP}, got {image_size!r}")
    sources = photo_sources()
    u = torch.rand(labels.shape[0], 2, generator=generator)
    crops = []
    for (uy, ux), c in zip(u.tolist(), labels.tolist()):
        src = sources[c]
        top, left = int(uy * (src.shape[1] - CROP + 1)), int(ux * (src.shape[2] - CROP + 1))
        crops.append(src[:, top: top + CROP, left: left + CROP])
    return resize_images(torch.stack(crops), image_size)  # (B, 3, S, S)


def photos_tensors(split: str = "train", image_size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed crops of a split: images ``(N, 3, S, S)`` in ``[-1, 1]``, labels ``(N,)`` int64, class-major."""
    if split not in SPLIT_CROPS:
        raise ValueError(f"unknown photos split {split!r}; expected one of {tuple(SPLIT_CROPS)}")
    per_class, seed = SPLIT_CROPS[split]
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    return random_crops(labels, torch.Generator().manual_seed(seed), image_size), labels


def load_photos_dataset(split: str = "train", image_size: int = IMAGE_SIZE) -> Dataset:
    """The photo crops as a dataset of ``{"pixel_values": (3, S, S), "label": int}`` items.

    ``split``: ``"train"`` (512 crops per photo, seed 0) or ``"test"`` (64 per photo, seed 1).
    """
    return TensorImages(*photos_tensors(split, image_size))
