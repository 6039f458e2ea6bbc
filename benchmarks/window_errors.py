"""Where does a PeRFlow student of a suite teacher lose its accuracy? Per-window errors on the teacher's own chain.

The student's K-step sample is exact when each window's single student step lands where the teacher's
n-step window solve lands. This script takes the teacher's chain (the K window solves with n DDIM steps
each, from the study's 256 fixed noises: ``z_0 = noise``, ``z_{k+1} = Phi(z_k, t_k, t_{k+1})``) and
prints, for each window k:

- ``local``: the paired MSE of one step from the chain's own window start ``z_k`` to the window end
  against ``z_{k+1}``; for the teacher's one-step DDIM (the untrained ``ddim_eps`` student) and, with
  ``--student``, for a trained student;
- ``final``: the paired MSE of the final sample to the chain's when only window k takes that one step
  and every other window is solved exactly: what window k's error costs at the end;
- ``gain``: final / local of the DDIM step, how much the teacher's flow amplifies (above 1) or
  contracts (below 1) an error made at the end of window k;
- ``local on data``: the same local error from the forward marginal of real training samples at
  ``t_k`` (the states the student is trained on) instead of the chain's states (the states it meets
  when sampling).

The study's students are written by ``benchmarks/recipe_study.py --save``. Examples (docs/study.md)::

    python benchmarks/window_errors.py --teacher faces
    python benchmarks/recipe_study.py --teacher faces --steps 200 --save /tmp/faces.pt
    python benchmarks/window_errors.py --teacher faces --student /tmp/faces.pt
"""

from __future__ import annotations

import copy

import torch

from recipe_study import denoiser, open_study, study_parser


def main() -> None:
    ap = study_parser(__doc__)
    ap.add_argument("--student", default=None, help="a student state dict written by recipe_study.py --save")
    ap.add_argument("--num-windows", type=int, default=4, help="K equal windows")
    ap.add_argument("--solver-steps", type=int, default=8, help="n teacher DDIM steps per window")
    args = ap.parse_args()
    from perflow.evaluation.metrics import paired_mse
    from perflow.schedule import DiscreteVPSchedule
    from perflow.solver import solve_window
    from perflow.training.teachers import teacher_clip_sample
    from perflow.windows import equal_boundaries

    unet, le, config, teacher_type, draw, data = open_study(args)
    schedule = DiscreteVPSchedule.from_config(config)
    clip = teacher_clip_sample(config, args.teacher)
    bounds = equal_boundaries(args.num_windows).tolist()
    K, n = args.num_windows, args.solver_steps
    teacher = denoiser(unet, le, data["labels"])
    student = None
    if args.student:
        net = copy.deepcopy(unet)
        net.load_state_dict(torch.load(args.student, weights_only=True))
        student = denoiser(net.eval(), le, data["labels"])

    def solve(fn, z, k, steps):
        B = z.shape[0]
        t_s = torch.full((B,), bounds[k], dtype=torch.float64)
        t_e = torch.full((B,), bounds[k + 1], dtype=torch.float64)
        return solve_window(fn, z, t_s, t_e, steps, schedule, teacher_type, clip)

    def to_end(z, k):  # the exact chain from the end of window k
        for j in range(k + 1, K):
            z = solve(teacher, z, j, n)
        return z

    chain = [data["noise"].clone()]
    for k in range(K):
        chain.append(solve(teacher, chain[-1], k, n))
    print(f"{args.teacher}: K={K}, n={n}; the chain (n K = {n * K} DDIM steps) vs the 100-step reference: "
          f"{paired_mse(chain[-1], data['ref']):.5f}")
    for name, fn in (("ddim step", teacher), ("student", student)):
        if fn is None:
            continue
        z = chain[0]
        for k in range(K):
            z = solve(fn, z, k, 1)
        print(f"{name} at {K} steps: vs chain {paired_mse(z, chain[-1]):.5f}, vs reference {paired_mse(z, data['ref']):.5f}")
    g = torch.Generator().manual_seed(7)
    x0, labels = draw(g, args.num_eval)
    noise = torch.randn(x0.shape, generator=g)
    data_teacher = denoiser(unet, le, labels)
    data_student = denoiser(net.eval(), le, labels) if student is not None else None
    for k in range(K):
        row = [f"window {k} [{bounds[k]:.3g}, {bounds[k + 1]:.3g}]"]
        z_data = schedule.marginal(x0, noise, torch.full((x0.shape[0],), bounds[k], dtype=torch.float64))
        exact_data = solve(data_teacher, z_data, k, n)
        for name, fn, dfn in (("ddim", teacher, data_teacher), ("student", student, data_student)):
            if fn is None:
                continue
            step = solve(fn, chain[k], k, 1)
            local, final = paired_mse(step, chain[k + 1]), paired_mse(to_end(step, k), chain[-1])
            on_data = paired_mse(solve(dfn, z_data, k, 1), exact_data)
            row.append(f"{name}: local {local:.3g} final {final:.3g} local on data {on_data:.3g}")
            if name == "ddim":
                row.append(f"gain {final / max(local, 1e-12):.2f}")
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
