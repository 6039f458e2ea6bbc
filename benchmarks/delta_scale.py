"""A suite student's delta at other scales: teacher + s (student - teacher) at 4 and 8 steps.

``delta = student - teacher`` (:func:`perflow.delta.extract_delta`) merged into the teacher at scale ``s``
(:func:`perflow.delta.merge_delta`, what ``perflow delta merge --scale s`` does), sampled with the
exported ``PeRFlowScheduler`` at 4 and 8 steps on the study's evaluation set (256 fixed noises, labels
``i mod classes``; ``recipe_study.reference``): paired MSE to the teacher's own 100-step DDIM output and
the sliced Wasserstein distance to it, beside the teacher's best training-free solvers. ``s = 1`` is the
student itself; ``s = 0`` the teacher's DDIM over the windows.

The students are written by ``benchmarks/recipe_study.py --save``. Example (docs/study.md)::

    python benchmarks/recipe_study.py --teacher photos --steps 300 --eval-every 300 --save /tmp/photos.pt
    python benchmarks/delta_scale.py --teacher photos --student /tmp/photos.pt --scales 0.5,0.75,1
"""

from __future__ import annotations

import copy

import torch

from recipe_study import best_baseline, denoiser, open_study, study_parser


def main() -> None:
    ap = study_parser(__doc__)
    ap.add_argument("--student", required=True, help="a student state dict written by recipe_study.py --save")
    ap.add_argument("--scales", type=lambda s: [float(x) for x in s.split(",") if x], default=[0.5, 0.75, 1.0])
    ap.add_argument("--num-windows", type=int, default=4, help="K equal windows (as the student was trained)")
    args = ap.parse_args()
    from perflow.delta import extract_delta, merge_delta
    from perflow.evaluation.metrics import paired_mse, sliced_wasserstein
    from perflow.evaluation.samplers import sample
    from perflow.parameterization import resolve_model_output_type
    from perflow.scheduler import PeRFlowScheduler

    unet, le, config, teacher_type, _, data = open_study(args)
    student = copy.deepcopy(unet)
    student.load_state_dict(torch.load(args.student, weights_only=True))
    delta = extract_delta(student, unet)
    scheduler = PeRFlowScheduler.from_config(
        {k: v for k, v in config.items() if not k.startswith("_")}, prediction_type="ddim_eps",
        num_time_windows=args.num_windows, model_output_type=resolve_model_output_type("auto", "ddim_eps", teacher_type))
    for steps in (4, 8):
        name, v = best_baseline(data["baselines"], steps, "mse")
        print(f"best {steps}-step solver: {name} [{v['spacing']}] MSE {v['mse']:.5f}; best SW "
              f"{best_baseline(data['baselines'], steps, 'swd')[1]['swd']:.4f}")
    for s in args.scales:
        model = merge_delta(copy.deepcopy(unet), delta, scale=s)
        parts = []
        for steps in (4, 8):
            with torch.no_grad():
                out = sample(denoiser(model, le, data["labels"]), PeRFlowScheduler.from_config(scheduler.config),
                             data["noise"].clone(), steps).samples
            parts.append(f"{steps} steps MSE {paired_mse(out, data['ref']):.5f} "
                         f"SW {sliced_wasserstein(out.flatten(1), data['ref'].flatten(1)):.4f}")
        print(f"scale {s:g}: " + " | ".join(parts), flush=True)


if __name__ == "__main__":
    main()
