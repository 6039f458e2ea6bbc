"""Small model parts that let non-text teachers run through the Stable Diffusion code path.

A class-conditional teacher is a ``UNet2DConditionModel`` whose "text" condition is a
learned label embedding passed as ``encoder_hidden_states``. :class:`LabelEncoder` is that
embedding, saved and loaded like any diffusers model. Label ``num_classes`` is the null
label (the unconditional input for classifier-free guidance).

On disk a class-conditional teacher is a folder with ``unet/`` (a diffusers
``UNet2DConditionModel``), ``scheduler/`` (a diffusers scheduler config giving the beta
schedule and the teacher's prediction type) and ``label_encoder/`` (this module).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class LabelEncoder(ModelMixin, ConfigMixin):
    """``labels (B,) -> encoder_hidden_states (B, 1, embed_dim)``; label ``num_classes`` is the null label."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, num_classes: int = 10, embed_dim: int = 32):
        super().__init__()
        self.embedding = nn.Embedding(num_classes + 1, embed_dim)

    @property
    def null_label(self) -> int:
        return self.config.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if labels.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"labels must be integer class ids, got dtype {labels.dtype}")
        return self.embedding(labels).unsqueeze(1)  # (B, 1, D)
