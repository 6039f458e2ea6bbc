"""What stops a run early, and how: stop signals and non-finite numbers.

- :class:`StopSignals`: while a run trains, SIGINT and SIGTERM only *request* a stop; the loop
  saves a checkpoint at the end of the step and raises :class:`TrainingInterrupted`. Before the
  first step, or on a second signal, it raises at once. Handlers are installed in the main thread
  only and the previous ones are restored on exit.
- :class:`NonFiniteError`: a non-finite loss or gradient norm (checked from the values the step
  already brings to the host) stops the run before the optimizer applies it, so checkpoints and
  exported weights stay finite; :func:`nonfinite_message` names the step and the likely cause.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any, Iterable

import torch

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT/SIGTERM. ``checkpoint`` is where its work was saved (None: not saved);
    ``exit_code`` is ``128 + signal``, the shell's convention (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, step: int | None = None, checkpoint: Any = None, at_once: bool = False):
        super().__init__(signum, step, checkpoint, at_once)
        self.signum, self.step, self.checkpoint, self.at_once = signum, step, checkpoint, at_once

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)

    def __str__(self) -> str:
        return self.describe()

    def describe(self, continue_with: str = "--resume latest") -> str:
        """One line: what stopped the run, where its work was saved and, when saved, how to continue
        (``continue_with``: the option that continues it, ``--resume latest`` for ``perflow train``)."""
        name = signal.Signals(self.signum).name
        if self.checkpoint is not None:
            return f"stopped by {name} after step {self.step}; checkpoint saved in {self.checkpoint}; continue with {continue_with}"
        why = "a second signal: stopped at once" if self.at_once and self.step is not None else "stopped"
        return f"{why} by {name} without saving (the newest checkpoint, if any, is intact)"


class StopSignals:
    """Context manager turning SIGINT/SIGTERM into a stop request (see the module docstring).

    ``deferred`` is False until the loop can save at a step boundary: until then a signal stops at once.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferred = False
        self.step: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:
        if self.requested or not self.deferred:
            raise TrainingInterrupted(signum, self.step, at_once=True)
        self.signum = signum
        print(f"perflow train: {signal.Signals(signum).name} received: stopping at the end of this step with a "
              "checkpoint (send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


class NonFiniteError(ValueError):
    """The loss, a gradient or the weights became NaN/inf; nothing non-finite was saved or exported."""


def nonfinite_message(step: int, loss: float, grad_norm: float, cfg, pixels_finite: bool, last_checkpoint) -> str:
    """One line naming the step, what was non-finite and the likely causes, most likely first."""
    tr = cfg.training
    what = f"loss {loss}" if loss != loss or abs(loss) == float("inf") else f"gradient norm {grad_norm} (loss {loss:.4g})"
    causes = []
    if not pixels_finite:
        causes.append("bad data (the batch holds NaN/inf pixels)")
    if tr.mixed_precision == "fp16":
        causes.append("fp16 overflow (try --mixed_precision bf16 or no)")
    if step > 1:
        warm = tr.lr_warmup_steps > 0 and tr.lr_scheduler != "constant"  # diffusers' "constant" ignores warm-up
        causes.append(f"a learning rate too high (training.learning_rate {tr.learning_rate:g}; try 10x lower"
                      + ("" if warm else ", or a warm-up: --lr_scheduler constant_with_warmup --lr_warmup_steps 100") + ")")
    if pixels_finite:
        causes.append("bad data")
    saved = f"the newest checkpoint {last_checkpoint} is finite" if last_checkpoint else "no checkpoint was saved"
    return (f"non-finite {what} at step {step}; stopped before applying it ({saved}, nothing exported); "
            f"likely cause: {' or '.join(causes)}; training.max_nonfinite_skips lets a run skip a few such steps")


def nonfinite_names(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors holding NaN/inf (one host sync for all of them)."""
    named = list(named)
    if not named:
        return []
    flags = torch.stack([torch.isfinite(t).all() for _, t in named]).cpu()
    return [n for (n, _), ok in zip(named, flags.tolist()) if not ok]


__all__ = ["StopSignals", "TrainingInterrupted", "NonFiniteError", "nonfinite_message", "nonfinite_names"]
