"""Greyscale faces from scikit-image's bundled ``lfw_subset`` (offline, no download).

``skimage.data.lfw_subset()`` holds 200 greyscale 25x25 crops from Labeled Faces in the Wild:
the first 100 are faces (the rest are non-face patches, not used). Pixels in ``[0, 1]`` are
mapped to ``[-1, 1]`` by ``2 x - 1`` and resized (antialiased bilinear) to
``image_size x image_size`` (16 by default). A fixed, seeded 20 % of the faces is the held-out
``"test"`` split (20 faces, the real reference set of an evaluation), the rest ``"train"`` (80).
The faces teacher is trained with horizontal flips, so its distribution is the mirror-symmetric
one: ``mirrored=True`` appends each face's mirror image (the reference that matches it).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .images import TensorImages, resize_images, split_indices

NUM_FACES = 100
NATIVE_SIZE = 25
IMAGE_SIZE = 16


def faces_tensors(split: str = "train", image_size: int = IMAGE_SIZE, mirrored: bool = False) -> torch.Tensor:
    """The faces of a split, ``(N, 1, S, S)`` float32 in ``[-1, 1]`` (``2N`` with ``mirrored``)."""
    if not isinstance(image_size, int) or not 8 <= image_size <= 64:
        raise ValueError(f"image_size must be an integer in 8..64 (25 is native), got {image_size!r}")
    from skimage.data import lfw_subset

    faces = torch.as_tensor(lfw_subset()[:NUM_FACES], dtype=torch.float32).unsqueeze(1) * 2 - 1  # (100, 1, 25, 25)
    faces = resize_images(faces[split_indices(NUM_FACES, split)], image_size)
    if mirrored:
        faces = torch.cat([faces, faces.flip(-1)])
    return faces.contiguous()


def load_faces_dataset(split: str = "train", image_size: int = IMAGE_SIZE, mirrored: bool = False) -> Dataset:
    """The faces as a dataset of ``{"pixel_values": (1, S, S)}`` items (unconditional, no labels).

    ``split``: ``"train"`` (80 faces), ``"test"`` (the fixed held-out 20, seed 0) or ``"all"``.
    """
    return TensorImages(faces_tensors(split, image_size, mirrored))
