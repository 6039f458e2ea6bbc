"""The comparison harness: several samplers, the same noise and conditions, equal model evaluations.

:func:`compare_samplers` is model-agnostic: it takes :class:`Sampler` objects (a model
callable plus a scheduler factory), initial noise, a reference sampler (the teacher at
100+ steps) and the metric hooks (:class:`Metrics`), and returns one row per (sampler, steps):

- ``fd``: Fréchet distance of the samples' features to the real reference features;
- ``paired_mse``: mean squared distance to the reference sampler's output from the same noise, with the
  median and 99th percentile of the per-sample errors (``paired_mse_p50``, ``paired_mse_p99``: a mean carried by
  a few far samples shows as a p99 far above the median); the per-sample errors are kept
  (``EvalResult.paired_errors``) so the findings can give each paired-MSE comparison its standard error;
- ``accuracy``: for class-conditional models, the classifier's agreement with the labels.

The evaluators specialise it: :func:`perflow.evaluation.digits.evaluate_digits` (built-in digits
teacher and classifier), :func:`perflow.evaluation.images.evaluate_images` (SD/SDXL pipelines),
:func:`perflow.evaluation.toy2d.evaluate_2d` (exact Gaussian-mixture teacher).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from . import metrics
from .samplers import ModelFn, sample

DEFAULT_STEPS = (1, 2, 4, 8)


@dataclass
class Sampler:
    """A named way to sample: ``model_fn(z, timestep) -> output`` stepped by ``make_scheduler()``."""

    name: str
    model_fn: ModelFn
    make_scheduler: Callable[[], object]
    kind: str = "baseline"  # "perflow", "reflow", "baseline" or "reference"


@dataclass
class EvalResult:
    """Rows of metrics, run metadata, and the first few samples of every run (for pictures)."""

    rows: list[dict]
    meta: dict
    previews: dict[str, torch.Tensor] = field(default_factory=dict)
    trajectories: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    paired_errors: dict[str, torch.Tensor] = field(default_factory=dict)  # "sampler@steps" -> (B,) per-sample errors

    def row(self, sampler: str, steps: int) -> dict:
        for r in self.rows:
            if r["sampler"] == sampler and r["steps"] == steps:
                return r
        raise KeyError(f"no result for sampler {sampler!r} at {steps} steps")

    def to_json_dict(self) -> dict:
        return {"meta": self.meta, "rows": self.rows}


@dataclass
class Metrics:
    """What :func:`compare_samplers` measures on every run, and how.

    ``decode`` maps final latents to the space the metrics see (identity for pixel-space models);
    ``feature_fn`` + ``real_features`` give the Fréchet distance ``fd``; ``classify_fn`` + ``labels``
    the ``accuracy``; ``extra`` maps a column name to ``fn(decoded samples) -> float``
    (e.g. a sliced Wasserstein distance). A hook left ``None`` leaves its column out.
    """

    decode: Callable[[torch.Tensor], torch.Tensor] = lambda z: z  # noqa: E731
    feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    real_features: torch.Tensor | None = None
    classify_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    labels: torch.Tensor | None = None
    extra: dict[str, Callable[[torch.Tensor], float]] | None = None

    def measure(self, out: torch.Tensor, reference: torch.Tensor | None) -> dict:
        """The row of metrics of decoded samples ``out`` (``paired_mse`` against ``reference`` if given)."""
        row: dict = {name: fn(out) for name, fn in (self.extra or {}).items()}
        if self.feature_fn is not None and self.real_features is not None:
            row["fd"] = metrics.frechet_distance_features(self.feature_fn(out), self.real_features)
        if reference is not None:
            errors = metrics.paired_errors(out, reference)
            q = torch.quantile(errors, torch.tensor([0.5, 0.99], dtype=torch.float64))
            row.update(paired_mse=errors.mean().item(), paired_mse_p50=q[0].item(), paired_mse_p99=q[1].item())
        if self.classify_fn is not None and self.labels is not None:
            row["accuracy"] = metrics.label_accuracy(self.classify_fn(out), self.labels)
        return row


def compare_samplers(
    samplers: Sequence[Sampler],
    reference: Sampler,
    noise: torch.Tensor,
    steps: Sequence[int] = DEFAULT_STEPS,
    reference_steps: int = 100,
    measure: Metrics | None = None,
    num_previews: int = 20,
    keep_trajectories: int = 0,
    flow_boundaries: torch.Tensor | None = None,
    flow_steps: int = 32,
    progress: bool = True,
) -> EvalResult:
    """Sample every sampler at every step count from the same ``noise`` and measure it.

    The reference sampler runs once at ``reference_steps``; every other output is compared
    with it pixel by pixel (``paired_mse``, on decoded samples). ``measure`` (:class:`Metrics`;
    default: decode by identity, ``paired_mse`` only) says how samples are decoded and which other
    columns are measured.
    ``keep_trajectories > 0`` keeps that many trajectories per run in ``result.trajectories``.

    Flow straightness (``result.meta["straightness"]``): for the teacher (its reference
    trajectory) and for every student (sampled again with ``flow_steps`` steps), the
    :func:`~perflow.evaluation.metrics.straightness` over the whole range and within the windows
    ``flow_boundaries`` (default: the windows of the first ``perflow`` sampler's scheduler, else 4 equal windows).
    Baseline solvers share the teacher's flow.
    """
    from perflow.windows import equal_boundaries

    if flow_boundaries is None:
        own = [getattr(s.make_scheduler(), "boundaries", None) for s in samplers if s.kind == "perflow"]
        flow_boundaries = own[0].to(torch.float64).cpu() if own and own[0] is not None else equal_boundaries(4)
    from tqdm.auto import tqdm

    measure = measure if measure is not None else Metrics()
    if reference_steps < max(steps):
        raise ValueError(f"reference_steps={reference_steps} must be at least the largest step count {max(steps)}")
    runs = [(s, n) for s in samplers for n in steps]
    bar = tqdm(total=len(runs) + 1, desc="evaluating samplers", unit="run", disable=not progress)
    bar.set_postfix_str(f"{reference.name} x{reference_steps}")
    ref = sample(reference.model_fn, reference.make_scheduler(), noise, reference_steps, return_trajectory=True)
    ref_out = measure.decode(ref.samples)
    bar.update()
    rows = [{
        "sampler": reference.name, "kind": "reference", "steps": reference_steps, "nfe": ref.num_model_evals,
        **measure.measure(ref_out, None),
        "paired_mse": 0.0,
    }]
    previews = {f"{reference.name}@{reference_steps}": ref_out[:num_previews].cpu()}
    paired: dict[str, torch.Tensor] = {}
    trajectories = {}
    if keep_trajectories:
        trajectories[f"{reference.name}@{reference_steps}"] = (ref.trajectory[:, :keep_trajectories].cpu(), ref.times)
    for s, n in runs:
        bar.set_postfix_str(f"{s.name} x{n}")
        res = sample(s.model_fn, s.make_scheduler(), noise, n, return_trajectory=True)
        out = measure.decode(res.samples)
        rows.append({
            "sampler": s.name, "kind": s.kind, "steps": n, "nfe": res.num_model_evals,
            **measure.measure(out, ref_out),
        })
        previews[f"{s.name}@{n}"] = out[:num_previews].cpu()
        paired[f"{s.name}@{n}"] = metrics.paired_errors(out, ref_out).cpu()
        if keep_trajectories:
            trajectories[f"{s.name}@{n}"] = (res.trajectory[:, :keep_trajectories].cpu(), res.times)
        bar.update()
    bar.close()

    def flow(traj: torch.Tensor, times: torch.Tensor) -> dict:
        return {
            "whole_range": metrics.straightness(traj, times),
            "within_windows": metrics.straightness(traj, times, flow_boundaries),
        }

    straight = {f"{reference.name} ({reference_steps} steps)": flow(ref.trajectory, ref.times)}
    for s in samplers:
        if s.kind in ("perflow", "reflow"):
            res = sample(s.model_fn, s.make_scheduler(), noise, flow_steps, return_trajectory=True)
            straight[f"{s.name} ({flow_steps} steps)"] = flow(res.trajectory, res.times)
            if keep_trajectories:
                trajectories[f"{s.name}@{flow_steps}"] = (res.trajectory[:, :keep_trajectories].cpu(), res.times)
    meta = {
        "steps": list(steps), "reference_steps": reference_steps, "straightness": straight,
        "straightness_windows": [float(b) for b in flow_boundaries],
    }
    return EvalResult(rows=rows, meta=meta, previews=previews, trajectories=trajectories, paired_errors=paired)
