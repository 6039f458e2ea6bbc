"""perflow: Piecewise Rectified Flow (PeRFlow) for diffusers models.

Public API (imported lazily, so ``import perflow`` stays cheap, e.g. for ``perflow --help``):

- sampling: :class:`PeRFlowScheduler`
- maths: :mod:`perflow.schedule`, :mod:`perflow.windows`, :mod:`perflow.parameterization`,
  :func:`solve_window` (:mod:`perflow.solver`), :mod:`perflow.objective`
- training: :class:`TrainConfig`, :func:`train`
- plug-and-play: :func:`extract_delta`, :func:`merge_delta`, :func:`load_delta`,
  :func:`save_delta`, :func:`delta_to_lora`, :func:`load_pipeline`
- transfer: :func:`transfer_report` (does a delta accelerate this model?), :func:`adapt_delta`
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

__version__ = "0.1.0"

_LAZY = {
    "PeRFlowScheduler": "perflow.scheduler",
    "PeRFlowSchedulerOutput": "perflow.scheduler",
    "solve_window": "perflow.solver",
    "TrainConfig": "perflow.training",
    "train": "perflow.training",
    "extract_delta": "perflow.delta",
    "merge_delta": "perflow.delta",
    "load_delta": "perflow.delta",
    "save_delta": "perflow.delta",
    "delta_to_lora": "perflow.delta",
    "load_pipeline": "perflow.delta",
    "TransferConfig": "perflow.evaluation.transfer",
    "transfer_report": "perflow.evaluation.transfer",
    "adapt_delta": "perflow.training.adapt",
}

__all__ = sorted(_LAZY) + ["__version__"]


class _Deferred(types.ModuleType):
    """Stands in ``sys.modules`` for a submodule, importing it on first use of one of its names.

    Dunder attributes (``__file__``, ``__spec__``, ...) are answered without importing, so tools
    that walk ``sys.modules`` (``inspect.getmodule``, run by torch's own import) do not trigger it.
    """

    def __getattr__(self, name: str):
        if name.startswith("__") and name != "__all__":
            raise AttributeError(name)
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        real = importlib.import_module(self.__name__)  # runs the module; rebinds the package attribute
        self.__dict__.update(real.__dict__)
        return getattr(real, name)


def _defer(name: str) -> types.ModuleType:
    """Register ``name`` in ``sys.modules`` now, without running it (see :class:`_Deferred`).

    diffusers' ``DiffusionPipeline.from_pretrained`` resolves a component declared as
    ``["perflow.scheduler", "PeRFlowScheduler"]`` in ``model_index.json`` through ``sys.modules``
    only (it never imports a library it does not know); this makes ``import perflow`` enough,
    while ``import perflow`` (and ``perflow --help``) still imports neither torch nor diffusers.
    """
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    module = _Deferred(name)
    module.__spec__, module.__loader__, module.__file__ = spec, spec.loader, spec.origin
    module.__package__ = name.rpartition(".")[0]
    sys.modules[name] = module
    return module


scheduler = _defer("perflow.scheduler")


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'perflow' has no attribute {name!r}")
