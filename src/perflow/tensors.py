"""Small tensor helpers shared by the maths modules.

The broadcasting helper follows k-diffusion's ``utils.append_dims`` and flow_matching's
``utils.expand_tensor_like``: per-sample quantities (times, ``abar``, ``lam``, ``eta``) are
``(B,)`` tensors, and every formula meets them against latents ``(B, C, H, W)``.
"""

from __future__ import annotations

import torch


def expand_like(x: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """``x`` reshaped to broadcast against ``like``, in ``like``'s dtype and device.

    A per-sample ``(B,)`` tensor becomes ``(B, 1, ..., 1)`` with ``like.dim()`` dimensions; a
    scalar (0-d tensor or number) stays 0-d. The cast comes first, so callers choose the
    precision of a formula by choosing ``like``'s dtype.
    """
    x = torch.as_tensor(x, device=like.device, dtype=like.dtype)
    if x.dim() == 0:
        return x
    return x.reshape(x.shape + (1,) * (like.dim() - x.dim()))


__all__ = ["expand_like"]
