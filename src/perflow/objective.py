"""One piecewise-reflow training example and its loss, model-agnostic.

``docs/method.md``, row "one training batch", in the order a training step needs them:

1. draw ``t`` (:mod:`perflow.time_sampling`; uniform on ``[0, 1]`` by default) and look up its
   :class:`~perflow.windows.Window` ``(t_s, t_e, lam, eta)``;
2. noise a real sample to the window start with the teacher's forward process
   (:meth:`perflow.schedule.NoiseSchedule.marginal`):
   ``z_s = sqrt(abar(t_s)) x0 + sqrt(1 - abar(t_s)) noise``;
3. solve the teacher's ODE to the window end with ``n`` DDIM steps: ``z_e = Phi(z_s, t_s, t_e)``;
4. the student input is the segment point ``z_t = z_s + (z_e - z_s) (t - t_s) / (t_e - t_s)``
   at student timestep ``t T``, and the regression target is given by the parameterization;
5. the loss ``mean_b w_b mean_i rho(student(z_t, t T) - target)`` (:func:`batch_loss`), with
   ``rho`` the squared error or pseudo-Huber and ``w`` optionally the window-end weight.

The trainer (:mod:`perflow.training`) and the small analytic examples call the same
functions, so there is one implementation of the objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .parameterization import (
    check_model_output_type,
    clipped_epsilon,
    epsilon_from_output,
    interpolate,
    target_from_window,
    window_end_denominator,
)
from .schedule import NoiseSchedule, as_schedule
from .solver import Denoiser, solve_window
from .time_sampling import TimeSampler, uniform_times
from .windows import Window, window_index, window_of

LOSSES = ("mse", "huber")
LOSS_WEIGHTINGS = ("none", "window_end")
WINDOW_WEIGHTS = ("none", "auto")
"""Per-window loss weights: ``none`` (all 1), ``auto`` (:func:`window_error_gains` of the teacher, mean 1)."""
SOLVER_STEP_ALLOCATIONS = ("equal", "auto")
"""How ``n K`` teacher steps are spread over the windows: ``equal``, or ``auto`` (:func:`allocate_solver_steps`)."""


@dataclass
class ReflowExample:
    """A batch of training examples. Shapes: latents ``(B, ...)``, times ``(B,)`` float64."""

    z_t: torch.Tensor  # student input
    timestep: torch.Tensor  # student timestep t * T, float32
    target: torch.Tensor  # regression target in the student's parameterization
    t: torch.Tensor
    t_s: torch.Tensor
    t_e: torch.Tensor
    z_s: torch.Tensor
    z_e: torch.Tensor
    window: Window | None = None  # the window of each t, with the parameterization's (lam, eta)
    model_output_type: str = "epsilon"  # what the student's raw output predicts (epsilon-type only)
    alpha_t: torch.Tensor | None = None  # alpha(t), sigma(t) broadcast against z_t (when not epsilon)
    sigma_t: torch.Tensor | None = None
    clip_sample: float | None = None  # a ddim_eps student's clean-sample clipping range (the teacher's)
    alpha_e: torch.Tensor | None = None  # alpha(t_e) broadcast against z_t (when clipping)

    def student_output(self, output: torch.Tensor) -> torch.Tensor:
        """The raw student output in the parameterization's terms: :func:`perflow.parameterization.epsilon_from_output`,
        then, for a clipping teacher's ``ddim_eps`` student, :func:`perflow.parameterization.clipped_epsilon`."""
        if self.model_output_type != "epsilon":
            output = epsilon_from_output(output.float(), self.z_t, self.alpha_t, self.sigma_t, self.model_output_type)
        if self.clip_sample is not None:
            output = clipped_epsilon(
                output.float(), self.z_t, self.t, self.window, self.alpha_t, self.sigma_t, self.alpha_e, self.clip_sample
            )
        return output


def reflow_example(
    denoiser: Denoiser,
    x0: torch.Tensor,
    boundaries: torch.Tensor,
    schedule: NoiseSchedule | torch.Tensor,
    num_solver_steps: int | Sequence[int],
    prediction_type: str,
    teacher_prediction_type: str = "epsilon",
    noise: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    time_sampler: TimeSampler = uniform_times,
    model_output_type: str = "epsilon",
    clip_sample: float | None = None,
    start_from_noise: bool = False,
    starts: torch.Tensor | None = None,
    starts_mask: torch.Tensor | None = None,
    start_states: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]] | None = None,
) -> ReflowExample:
    """Build one piecewise-reflow batch from clean samples ``x0`` (B, ...) and a teacher denoiser.

    ``schedule`` is the teacher's :class:`~perflow.schedule.NoiseSchedule` (or its raw
    ``alphas_cumprod``). ``noise`` and ``t`` may be given (for exact reproducibility); otherwise
    they are drawn from ``generator`` (``t`` through ``time_sampler``). ``prediction_type`` is the
    student's (``diff_eps``, ``ddim_eps`` or ``velocity``); ``model_output_type`` what the student
    network's raw output predicts (:func:`perflow.parameterization.check_model_output_type`), turned
    into the parameterization's output at ``(z_t, t)`` by :meth:`ReflowExample.student_output`;
    ``num_solver_steps``: the teacher's DDIM steps ``n`` in every window, or one ``n_k`` per window
    (:func:`steps_of_windows`); ``clip_sample``: the teacher's x0 clipping range in the window solve
    (:func:`perflow.solver.solve_window`; ``None``: off), and for a ``ddim_eps`` student in its
    predicted window end too (:func:`perflow.parameterization.clipped_epsilon`).

    ``start_from_noise``: the window that starts at ``t_s = 1`` starts from ``z_s = noise``, the sampler's
    own starting point, instead of the forward marginal ``alpha(1) x0 + sigma(1) noise``. The two differ
    when the teacher's schedule keeps signal at ``t = 1`` (SD's ``abar(1) = 0.0047``: 6.8 % of ``x0``), which
    the student can learn to read in training but never sees when sampling; for a zero-terminal-SNR or
    flow-matching teacher they are the same.

    ``starts`` (B, ...) and ``starts_mask`` (B,) bool (default: every row): where the mask is true, the window starts at
    ``z_s = starts`` (e.g. the state the student's own K-step sampler reaches at that window's start,
    :func:`sampler_window_starts`) instead of the forward marginal; the target is the teacher's solve
    from there. ``start_states(noise, t) -> (starts, starts_mask)`` gives them from the batch's noise and times once
    those are drawn (e.g. the student's own sampler states for a random part of the batch), so a caller that needs
    them does not repeat this function's draws.
    """
    check_model_output_type(model_output_type, prediction_type)
    schedule = as_schedule(schedule)
    batch = x0.shape[0]
    if t is None:
        t = time_sampler(batch, generator, x0.device)
    t = t.to(device=x0.device, dtype=torch.float64)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    if start_states is not None:
        if starts is not None:
            raise ValueError("give starts or start_states, not both")
        starts, starts_mask = start_states(noise, t)
    window = window_of(t, boundaries, schedule, prediction_type)
    z_s = schedule.marginal(x0, noise, window.t_s)
    if start_from_noise:
        first = (window.t_s >= 1.0).view(-1, *([1] * (z_s.dim() - 1)))  # samples in the window starting at t = 1
        z_s = torch.where(first, noise.to(z_s.dtype), z_s)
    if starts is not None:
        mask = torch.ones(batch, dtype=torch.bool) if starts_mask is None else starts_mask
        mask = mask.to(z_s.device).view(-1, *([1] * (z_s.dim() - 1)))
        z_s = torch.where(mask, starts.to(device=z_s.device, dtype=z_s.dtype), z_s)
    steps = steps_of_windows(num_solver_steps, torch.as_tensor(boundaries).numel() - 1)
    if steps.numel() > 1:
        steps = steps[window_index(t, boundaries).cpu()]  # (B,): each sample's window's n_k
    z_e = solve_window(denoiser, z_s, window.t_s, window.t_e, steps, schedule, teacher_prediction_type, clip_sample)
    work = torch.promote_types(x0.dtype, torch.float32)
    z_s32, z_e32 = z_s.to(work), z_e.to(work)
    target = target_from_window(z_s32, z_e32, window)
    z_t = interpolate(z_s32, z_e32, t, window.t_s, window.t_e)
    T = schedule.num_train_timesteps
    alpha_t = sigma_t = alpha_e = None
    student_clip = clip_sample if prediction_type == "ddim_eps" else None
    if model_output_type != "epsilon" or student_clip is not None:
        alpha_t, sigma_t = schedule.to(dtype=work).alpha_sigma(t, z_t)
        alpha_e = schedule.to(dtype=work).alpha_sigma(window.t_e, z_t)[0]
    return ReflowExample(
        z_t=z_t, timestep=(t * T).float(), target=target, t=t, t_s=window.t_s, t_e=window.t_e, z_s=z_s, z_e=z_e,
        window=window, model_output_type=model_output_type, alpha_t=alpha_t, sigma_t=sigma_t,
        clip_sample=student_clip, alpha_e=alpha_e,
    )


def sampler_window_starts(window_step, noise: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The state a K-step sampler reaches at the start of window ``k_b`` from ``noise_b`` (B, ...).

    ``z^0 = noise``, ``z^(j+1) = window_step(z^j, j, rows)``: the sampler's step across window ``j``
    for the batch rows ``rows`` (an index tensor; the step needs it to pick their conditions). Row
    ``b`` gets ``z^(k_b)``; only the rows that need window ``j`` are stepped through it.
    """
    k = k.to(noise.device)
    out = noise.clone()
    for j in range(int(k.max()) if k.numel() else 0):
        rows = torch.nonzero(k > j).flatten()
        out[rows] = window_step(out[rows], j, rows).to(out.dtype)
    return out


def window_end_weight(t: torch.Tensor, window: Window) -> torch.Tensor:
    """Weight making the loss the squared error of the predicted window end ``z_e_hat`` (float32, ``(B,)``).

    From ``z_e_hat = (lam (t_e - t_s) z + eta (t_e - t) out) / (lam (t - t_s) + (t_e - t))``
    (:func:`perflow.parameterization.window_end_from_output`):
    ``w = (d z_e_hat / d out)^2 = (eta (t_e - t) / (lam (t - t_s) + t_e - t))^2``; for ``velocity``
    (``z_e_hat = z + (t_e - t) out``) it is ``(t_e - t)^2``. Computed in the window's dtype.
    """
    if window.prediction_type == "velocity":
        return ((window.t_e - t) ** 2).float()
    return (window.eta * (window.t_e - t) / window_end_denominator(t, window)).square().float()


def steps_of_windows(num_solver_steps: int | Sequence[int], num_windows: int) -> torch.Tensor:
    """The teacher's DDIM steps per window as an int64 tensor: ``(1,)`` for one ``n`` in every window, ``(K,)``
    for one ``n_k`` per window (first window at ``t = 1``); each at least 1, a list of exactly ``K``."""
    K = num_windows
    if isinstance(num_solver_steps, torch.Tensor):
        num_solver_steps = num_solver_steps.tolist()
    values = [num_solver_steps] if isinstance(num_solver_steps, int) else list(num_solver_steps)
    if len(values) not in (1, K) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise ValueError(f"num_solver_steps must be an integer >= 1 or one per window ({K} integers >= 1), "
                         f"got {num_solver_steps!r}")
    return torch.tensor(values if len(values) < K or len(set(values)) > 1 else values[:1], dtype=torch.int64)


def _window_chain(denoiser, noise, boundaries, schedule, steps: list[int], prediction_type, clip_sample):
    """``(solve, chain)``: ``solve(z, k, n)`` solves window ``k`` for the whole batch with ``n`` teacher steps, and
    ``chain = [z_0 = noise, z_1, ..., z_K]`` is the teacher's chain of window solves at ``steps[k]`` each."""
    b = torch.as_tensor(boundaries, dtype=torch.float64).to(noise.device)
    batch = noise.shape[0]

    def solve(z: torch.Tensor, k: int, n: int) -> torch.Tensor:
        return solve_window(denoiser, z, b[k].expand(batch), b[k + 1].expand(batch), n, schedule, prediction_type,
                            clip_sample)

    chain = [noise]
    for k, n in enumerate(steps):
        chain.append(solve(chain[-1], k, n))
    return solve, chain


@torch.no_grad()
def teacher_chain_end(
    denoiser: Denoiser,
    noise: torch.Tensor,
    boundaries: torch.Tensor,
    schedule: NoiseSchedule | torch.Tensor,
    num_solver_steps: int | Sequence[int],
    prediction_type: str = "epsilon",
    clip_sample: float | None = None,
) -> torch.Tensor:
    """The end ``z_K`` of the teacher's chain of window solves from ``z_0 = noise`` at ``t = 1``:
    ``z_{k+1} = Phi_{n_k}(z_k, t_k, t_{k+1})`` (:func:`perflow.solver.solve_window`), the sample a perfect
    student's K-step sampler reproduces from the same noise. ``num_solver_steps``: ``n``, or one ``n_k`` per
    window (:func:`steps_of_windows`). Costs ``sum_k n_k`` teacher evaluations of the batch."""
    K = torch.as_tensor(boundaries).numel() - 1
    n = steps_of_windows(num_solver_steps, K).expand(K).tolist()
    return _window_chain(denoiser, noise, boundaries, schedule, n, prediction_type, clip_sample)[1][-1]


@torch.no_grad()
def window_error_gains(
    denoiser: Denoiser,
    noise: torch.Tensor,
    boundaries: torch.Tensor,
    schedule: NoiseSchedule | torch.Tensor,
    num_solver_steps: int | Sequence[int],
    prediction_type: str = "epsilon",
    clip_sample: float | None = None,
) -> torch.Tensor:
    """How much the teacher's flow amplifies an error made at the end of each window, ``(K,)`` float64.

    The chain of exact window solves from ``z_0 = noise`` (at ``t = 1``),
    ``z_{k+1} = Phi_n(z_k, t_k, t_{k+1})`` (:func:`perflow.solver.solve_window`, ``n`` steps), and for
    each window ``k`` one DDIM step ``y_k = Phi_1(z_k, t_k, t_{k+1})`` (the untrained ``ddim_eps``
    student's step) carried to the end by the exact solves of the later windows,
    ``Y_k = Phi_n(..Phi_n(y_k)..)``:

        gain_k = sum ||Y_k - z_K||^2 / sum ||y_k - z_{k+1}||^2   (sums over the batch)

    The last window's gain is 1; above 1 the later windows amplify an error at ``t_{k+1}``, below 1
    they contract it. A window whose one-step error vanishes (relative ``1e-12``) gets gain 1.
    Costs ``n K (K + 1) / 2 + K`` teacher evaluations of the batch. ``num_solver_steps``: ``n``, or one
    ``n_k`` per window (:func:`steps_of_windows`).
    """
    K = torch.as_tensor(boundaries).numel() - 1
    n = steps_of_windows(num_solver_steps, K).expand(K).tolist()
    solve, chain = _window_chain(denoiser, noise, boundaries, schedule, n, prediction_type, clip_sample)
    scale = chain[-1].double().square().sum().clamp_min(1e-30)
    gains = torch.ones(K, dtype=torch.float64)
    for k in range(K - 1):
        y = solve(chain[k], k, 1)
        local = (y.double() - chain[k + 1].double()).square().sum()
        if local <= 1e-12 * scale:
            continue
        for j in range(k + 1, K):
            y = solve(y, j, n[j])
        gains[k] = (y.double() - chain[-1].double()).square().sum() / local
    return gains


@torch.no_grad()
def window_solve_errors(
    denoiser: Denoiser,
    noise: torch.Tensor,
    boundaries: torch.Tensor,
    schedule: NoiseSchedule | torch.Tensor,
    num_solver_steps: int,
    prediction_type: str = "epsilon",
    clip_sample: float | None = None,
) -> torch.Tensor:
    """What each window's ``n``-step teacher solve costs in the final sample, ``(K,)`` float64.

    The chain of window solves from ``z_0 = noise`` (at ``t = 1``), ``z_{k+1} = Phi_n(z_k, t_k, t_{k+1})``
    (:func:`perflow.solver.solve_window`), and for each window ``k`` the same chain with that window
    alone solved at ``2 n`` steps, ``W_k = Phi_n(..Phi_n(Phi_{2n}(z_k))..)``:

        E_k = mean_b ||W_k - z_K||^2 / D   (D: the number of elements of one sample)

    For a first-order solver (DDIM) the window's error is ``A_k / n`` to leading order, so
    ``E_k = A_k^2 / (4 n^2)``: the error that halving the window's step size removes, measured where it
    matters, in the final sample (later windows amplify or damp it). Costs ``n K + sum_k (2n + n (K - 1 - k))``
    teacher evaluations of the batch."""
    K = torch.as_tensor(boundaries).numel() - 1
    solve, chain = _window_chain(denoiser, noise, boundaries, schedule, [num_solver_steps] * K, prediction_type, clip_sample)
    errors = torch.zeros(K, dtype=torch.float64)
    for k in range(K):
        w = solve(chain[k], k, 2 * num_solver_steps)
        for j in range(k + 1, K):
            w = solve(w, j, num_solver_steps)
        errors[k] = (w.double() - chain[-1].double()).square().flatten(1).mean(1).mean()
    return errors


def allocate_solver_steps(errors: torch.Tensor, num_solver_steps: int, max_steps: Sequence[int] | None = None) -> list[int]:
    """Spread ``n K`` teacher steps over the K windows where they remove the most final error.

    ``errors`` ``(K,)``, or ``(M, K)`` measured on ``M`` batches (their per-window median is used, as for
    the window weights), from :func:`window_solve_errors` at ``n`` steps per window: window ``k``'s
    error at ``n_k`` steps is ``A_k^2 / n_k^2`` with ``A_k^2 = 4 n^2 E_k``, and minimising
    ``sum_k A_k^2 / n_k^2`` subject to ``sum_k n_k = n K`` gives

        n_k = n K E_k^{1/3} / sum_j E_j^{1/3}

    kept within ``[ceil(n / 2), max_steps[k]]`` (the error model is measured between ``n`` and ``2 n``
    steps, so no window is extrapolated below ``n / 2``; ``max_steps``: a discrete teacher's index span
    of each window) by fixing the windows outside and sharing the rest again, then rounded to integers
    with the same sum (largest remainders first). Equal (or all-zero) errors give ``n`` everywhere."""
    e = errors.double()
    if e.dim() == 2:
        e = e.median(0).values
    K = e.numel()
    total = num_solver_steps * K
    lo = [-(-num_solver_steps // 2)] * K  # ceil(n / 2)
    hi = [total] * K if max_steps is None else [max(1, int(c)) for c in max_steps]
    lo = [min(a, b) for a, b in zip(lo, hi)]
    root = e.clamp_min(0).pow(1.0 / 3.0).tolist()
    if not sum(root) > 0:
        root = [1.0] * K
    share, fixed = [0.0] * K, [False] * K
    while True:  # water-filling: windows pushed outside their bounds are fixed there
        free = [k for k in range(K) if not fixed[k]]
        left = total - sum(share[k] for k in range(K) if fixed[k])
        weight = sum(root[k] for k in free)
        for k in free:
            share[k] = left * root[k] / weight if weight > 0 else left / len(free)
        out = [k for k in free if not lo[k] <= share[k] <= hi[k]]
        if not out:
            break
        for k in out:
            share[k], fixed[k] = min(max(share[k], lo[k]), hi[k]), True
        if all(fixed):
            break
    steps = [max(lo[k], min(hi[k], int(share[k]))) for k in range(K)]
    order = sorted(range(K), key=lambda k: int(share[k]) - share[k])  # largest remainder first
    while sum(steps) < total and any(steps[k] < hi[k] for k in range(K)):
        for k in order:
            if sum(steps) < total and steps[k] < hi[k]:
                steps[k] += 1
    return steps


def window_weights_from_gains(gains: torch.Tensor, max_ratio: float = 100.0) -> torch.Tensor:
    """Per-window loss weights ``w_k = g_k / mean(g)`` from :func:`window_error_gains`, each first
    clamped to ``[max(g) / max_ratio, max(g)]`` so that no window is dropped from training.

    ``gains`` is ``(K,)``, or ``(M, K)`` measured on ``M`` batches, whose per-window median is used: a
    gain is a ratio of sums with a heavy tail (a few samples whose final sample flips dominate a batch),
    so the median of the batches' gains is stable where one batch's is not."""
    g = gains.double()
    if g.dim() == 2:
        g = g.median(0).values
    g = g.clamp_min(float(g.max()) / max_ratio)
    return g / g.mean()


def reflow_loss(
    pred: torch.Tensor, target: torch.Tensor, kind: str, huber_c: float, weight: torch.Tensor | None
) -> torch.Tensor:
    """``mean_b weight_b mean_i rho(pred - target)``, ``rho(d) = d^2`` (``mse``) or ``sqrt(d^2 + c^2) - c`` (``huber``)."""
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; expected one of {LOSSES}")
    d = pred.float() - target.float()
    rho = d.square() if kind == "mse" else (d.square() + huber_c**2).sqrt() - huber_c
    per_sample = rho.flatten(1).mean(1)  # (B,)
    if weight is not None:
        per_sample = per_sample * weight
    return per_sample.mean()


def batch_loss(
    student: Denoiser,
    example: ReflowExample,
    loss: str = "mse",
    huber_c: float = 0.001,
    weighting: str = "none",
    sample_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The training loss of one batch: ``reflow_loss(out(student(z_t, t T)), target)`` (``out`` the
    raw output in the parameterization's terms, :meth:`ReflowExample.student_output`), weighted by
    :func:`window_end_weight` when ``weighting == "window_end"``.

    ``student(z_t, timestep)`` is the student as a denoiser callable (bind its condition in a
    closure); ``example`` comes from :func:`reflow_example`. ``sample_weight`` (``(B,)``, optional)
    multiplies each example's weight (e.g. a per-window weight looked up from ``example.t_s``).
    """
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {LOSS_WEIGHTINGS}")
    pred = example.student_output(student(example.z_t, example.timestep))
    weight = None
    if weighting == "window_end":
        if example.window is None:
            raise ValueError("the window_end weighting needs example.window; build the example with reflow_example")
        weight = window_end_weight(example.t, example.window)
    if sample_weight is not None:
        sample_weight = sample_weight.to(device=example.target.device, dtype=torch.float32)
        weight = sample_weight if weight is None else weight * sample_weight
    return reflow_loss(pred, example.target, loss, huber_c, weight)


__all__ = [
    "LOSSES",
    "LOSS_WEIGHTINGS",
    "ReflowExample",
    "batch_loss",
    "reflow_example",
    "reflow_loss",
    "sampler_window_starts",
    "teacher_chain_end",
    "WINDOW_WEIGHTS",
    "window_end_weight",
    "window_error_gains",
    "window_weights_from_gains",
]
