"""How a student's K-step errors are spread over samples: the trainer's fidelity-check set against the study's set.

The trainer's fidelity check (``training.fidelity_check_every``, :mod:`perflow.training.fidelity`) is the mean
over the first 5 batches of the data (32 samples each, fixed noise) of the squared error of the student's K-step
sample to the teacher's chain of window solves. The study evaluates the mean paired MSE to the teacher's 100-step
DDIM output on its own 256 noises. This script prints, for a saved student, the mean, median, 90th and 99th
percentiles and the maximum of the per-sample errors on both sets: when a few samples carry most of the mean
(a heavy tail), a mean over 160 samples selects noisily.

The student comes from ``benchmarks/recipe_study.py --save``; give it the windows and teacher steps per window
it trained with (the study prints them). ``--handover`` adds a table of where the far samples are made: for
``j = 0..K-1`` the teacher's chain solves windows ``0..j-1`` and the student's K-step sampler the rest, on the
check set, so the tail that vanishes once the teacher does window ``j - 1`` was made there. Example (docs/study.md,
ninth round)::

    python benchmarks/recipe_study.py --teacher photos --steps 300 --eval-every 300 --threads 1 \\
        --set learning_rate=1e-4 boundaries=1,0.75,0.5,0.15,0 student_starts=0.5 --save /tmp/photos300.pt
    python benchmarks/fidelity_tails.py --teacher photos --student /tmp/photos300.pt --solver-steps 8,7,6,11
"""

from __future__ import annotations

import copy

import torch

from recipe_study import denoiser, open_study, student_window_step, study_parser


def main() -> None:
    from perflow.objective import sampler_window_starts, steps_of_windows, teacher_chain_end
    from perflow.parameterization import resolve_model_output_type
    from perflow.schedule import DiscreteVPSchedule
    from perflow.scheduler import PeRFlowScheduler
    from perflow.training.loop import CALIBRATION_BATCHES
    from perflow.training.teachers import teacher_clip_sample

    ap = study_parser(__doc__)
    ap.add_argument("--student", required=True, help="a student state dict written by recipe_study.py --save")
    ap.add_argument("--boundaries", default="1,0.75,0.5,0.15,0", help="the student's window boundaries")
    ap.add_argument("--solver-steps", default="8", help="the teacher's DDIM steps per window (one, or K values)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batches", type=int, default=None, help="check-set batches (default: the trainer's 5)")
    ap.add_argument("--handover", action="store_true", help="also: the teacher's chain for the first j windows, then the student")
    args = ap.parse_args()
    unet, le, config, teacher_type, draw, data = open_study(args)
    schedule = DiscreteVPSchedule.from_config(config)
    clip = teacher_clip_sample(config, args.teacher)
    b = torch.tensor([float(v) for v in args.boundaries.split(",")], dtype=torch.float64)
    K = b.numel() - 1
    steps = [int(v) for v in args.solver_steps.split(",")]
    mot = resolve_model_output_type("auto", "ddim_eps", teacher_type)
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    sched = PeRFlowScheduler.from_config(cfg, prediction_type="ddim_eps", num_time_windows=K,
                                         window_boundaries=b.tolist(), model_output_type=mot)
    sched.set_timesteps(K)
    student = copy.deepcopy(unet)
    student.load_state_dict(torch.load(args.student, weights_only=True))

    @torch.no_grad()
    def k_step(noise, labels):
        return sampler_window_starts(student_window_step(student, le, labels, sched), noise, torch.full((noise.shape[0],), K))

    def student_from(z, j, labels):  # the student's sampler across windows j..K-1
        step = student_window_step(student, le, labels, sched)
        rows = torch.arange(z.shape[0])
        for jj in range(j, K):
            z = step(z, jj, rows)
        return z

    cal = torch.Generator().manual_seed(args.seed * 1_000_003 + 104729)  # the trainer's calibration batches
    check, handover = [], [[] for _ in range(K)]
    n = steps_of_windows(steps if len(steps) > 1 else steps[0], K).expand(K).tolist()
    for _ in range(args.batches or CALIBRATION_BATCHES):
        x, labels = draw(cal, args.batch_size)
        noise = torch.randn(x.shape, generator=cal)
        with torch.no_grad():
            def chain(j):  # the teacher's chain of window solves through window j - 1 (the noise for j = 0)
                return teacher_chain_end(denoiser(unet, le, labels), noise, b[:j + 1], schedule, n[:j], teacher_type,
                                         clip) if j else noise
            ref = chain(K)
            check.append((k_step(noise, labels) - ref).square().flatten(1).mean(1))
            if args.handover:
                for j in range(K):
                    handover[j].append((student_from(chain(j), j, labels) - ref).square().flatten(1).mean(1))
    study = (k_step(data["noise"], data["labels"]) - data["ref"]).square().flatten(1).mean(1)
    print("| set | samples | mean | median | p90 | p99 | max |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, v in (("fidelity check (teacher's chain)", torch.cat(check)), ("study (100-step DDIM)", study)):
        q = torch.quantile(v.double(), torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64))
        print(f"| {name} | {v.numel()} | {v.mean():.5f} | {q[0]:.5f} | {q[1]:.5f} | {q[2]:.5f} | {v.max():.5f} |")
    if args.handover:
        far = torch.cat(check) > 0.05
        print(f"\nOn the check set, the teacher's chain through window j - 1, then the student ({int(far.sum())} samples "
              f"above 0.05 with the student alone):\n")
        print("| teacher's windows | student's windows | mean | median | p99 | max | of the far samples: mean |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for j in range(K):
            v = torch.cat(handover[j])
            q = torch.quantile(v.double(), torch.tensor([0.5, 0.99], dtype=torch.float64))
            tail = f"{v[far].mean():.5f}" if far.any() else "-"
            print(f"| 0..{j - 1} | {j}..{K - 1} | {v.mean():.5f} | {q[0]:.5f} | {q[1]:.5f} | {v.max():.5f} | {tail} |"
                  .replace("| 0..-1 |", "| none |"))


if __name__ == "__main__":
    main()
