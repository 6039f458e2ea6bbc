"""The parameterization functions called with a window's quantities as loose tensors.

The library takes one :class:`perflow.windows.Window` (``t_s, t_e, lam, eta, prediction_type``);
the tests written before it pass the five quantities separately. These adapters build the
``Window`` and call the library, so those tests keep their bodies unchanged (issue 9: only their
import lines moved). New tests call the library with a ``Window`` directly.
"""

from __future__ import annotations

import torch

from perflow import parameterization
from perflow.windows import Window


def velocity_from_output(output, z, t_c, t_s, t_e, lam, eta, prediction_type: str) -> torch.Tensor:
    return parameterization.velocity_from_output(output, z, t_c, Window(t_s, t_e, lam, eta, prediction_type))


def window_end_from_output(output, z, t_c, t_s, t_e, lam, eta) -> torch.Tensor:
    # the window end formula does not depend on which epsilon-type parameterization gave lam, eta
    return parameterization.window_end_from_output(output, z, t_c, Window(t_s, t_e, lam, eta, "ddim_eps"))


def target_from_window(z_s, z_e, t_s, t_e, lam, eta, prediction_type: str) -> torch.Tensor:
    return parameterization.target_from_window(z_s, z_e, Window(t_s, t_e, lam, eta, prediction_type))
