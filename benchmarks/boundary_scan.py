"""Where should the window boundaries sit? The teacher's own view of each placement, before any training.

For each placement of K windows (power warps ``t_i = (1 - i / K)^p`` of the equal windows, ``p = 1``, and
windows equal in log-SNR, ``recipe_study.logsnr_boundaries``) this prints, on the study's evaluation set
(256 fixed noises; ``recipe_study.reference``), the paired MSE to the teacher's 100-step DDIM output of

- ``ddim``: one teacher DDIM step per window, which is where the ``ddim_eps`` student starts;
- ``chain``: n DDIM steps per window, the chain the student is trained to follow (its floor).

A placement is only as good as what the student then learns in it; the trained rows are
``recipe_study.py --set boundaries=...`` (docs/study.md). ``--window-solver dpmsolver++`` makes the chain's
n steps per window DPM-Solver++ (2M, data prediction in log-SNR, first step of each window DDIM) instead of
the method's DDIM: does a higher-order window solve give the student a closer target? Examples::

    python benchmarks/boundary_scan.py --teacher faces
    python benchmarks/boundary_scan.py --teacher faces --powers 1 --window-solver dpmsolver++
    python benchmarks/boundary_scan.py --teacher faces --powers 1 --solver-steps 17,4,5,6   # n per window
"""

from __future__ import annotations


import torch

from recipe_study import best_baseline, denoiser, logsnr_boundaries, open_study, study_parser


@torch.no_grad()
def solve_window_2m(den, z, t_s, t_e, n, schedule, prediction_type, clip):
    """n DPM-Solver++ (2M) steps on the window solve's grid: ``D = (1 + 1/2r) x0_j - (1/2r) x0_{j-1}``
    (``r = h_{j-1} / h_j``, ``h`` the log-SNR step) in place of DDIM's ``x0_j``; the first step is DDIM."""
    from perflow.solver import x0_eps_from_output

    z = z.float()
    t_s, t_e = (torch.as_tensor(t, dtype=torch.float64).expand(z.shape[0]) for t in (t_s, t_e))
    prev = h_prev = None
    for j in range(n):
        t_a, t_b = schedule.solver_time(t_s, t_e, j, n), schedule.solver_time(t_s, t_e, j + 1, n)
        (a_a, s_a), (a_b, s_b) = schedule.alpha_sigma(t_a, z), schedule.alpha_sigma(t_b, z)
        x0, _ = x0_eps_from_output(den(z, schedule.timestep(t_a)).float(), z, a_a, s_a, prediction_type)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        h = (a_b / s_b).log() - (a_a / s_a).log()
        d = x0 if prev is None else x0 + (x0 - prev) * (h / (2 * h_prev))
        z = a_b * d + s_b * (z - a_a * d) / s_a
        prev, h_prev = x0, h
    return z


def main() -> None:
    ap = study_parser(__doc__)
    ap.add_argument("--powers", type=lambda s: [float(x) for x in s.split(",") if x], default=[0.6, 0.8, 1.0, 1.25, 1.5, 2.0])
    ap.add_argument("--num-windows", type=int, default=4)
    ap.add_argument("--solver-steps", type=lambda v: [int(x) for x in v.split(",")], default=[8],
                    help="n teacher DDIM steps per window, or one per window (comma list, the first window at t = 1)")
    ap.add_argument("--window-solver", choices=("ddim", "dpmsolver++"), default="ddim",
                    help="the chain's solver inside each window (the method's is DDIM)")
    args = ap.parse_args()
    from perflow.evaluation.metrics import paired_mse
    from perflow.schedule import DiscreteVPSchedule
    from perflow.solver import solve_window
    from perflow.training.teachers import teacher_clip_sample
    from perflow.windows import resolve_boundaries

    unet, le, config, teacher_type, _, data = open_study(args)
    schedule = DiscreteVPSchedule.from_config(config)
    clip = teacher_clip_sample(config, args.teacher)
    teacher = denoiser(unet, le, data["labels"])
    K = args.num_windows

    def chain(bounds: list[float], n: list[int]) -> torch.Tensor:
        z = data["noise"].clone()
        for k in range(K):
            n_k = n[k] if len(n) == K else n[0]
            solve = solve_window_2m if args.window_solver == "dpmsolver++" and n_k > 1 else solve_window
            z = solve(teacher, z, torch.tensor(bounds[k]), torch.tensor(bounds[k + 1]), n_k, schedule, teacher_type, clip)
        return z

    placements = {f"power {p:g}": [(1 - i / K) ** p for i in range(K + 1)] for p in args.powers}
    placements["log-SNR"] = logsnr_boundaries(schedule.alphas_cumprod, K)
    best4 = best_baseline(data["baselines"], 4, "mse")[1]["mse"]
    print(f"{args.teacher}: best 4-step training-free solver MSE {best4:.5f}")
    for name, bounds in placements.items():
        b = resolve_boundaries(K, bounds, schedule, args.solver_steps if len(args.solver_steps) == K else args.solver_steps[0],
                               "ddim_eps").tolist()
        n = ",".join(map(str, args.solver_steps))
        with torch.no_grad():
            one, floor = paired_mse(chain(b, [1]), data["ref"]), paired_mse(chain(b, args.solver_steps), data["ref"])
        print(f"{name:10s} boundaries {[round(x, 3) for x in b]}: ddim {one:.5f}, chain (n={n}, {args.window_solver}) {floor:.5f}",
              flush=True)


if __name__ == "__main__":
    main()
