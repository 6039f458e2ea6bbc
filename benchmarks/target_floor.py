"""How close can a PeRFlow student of a suite teacher get? The teacher's own DDIM at n x K steps.

A student trained with n teacher DDIM steps per window over K windows learns the composed window
solves, the teacher's DDIM at n K steps; its paired MSE to the 100-step reference cannot be expected
below that solver's. Prints, for each step count, the paired MSE of the teacher's DDIM (``trailing``
spacing, the window solve's grid for equal windows) to the study's reference on the same 256 noises
(``benchmarks/recipe_study.py``'s evaluation set). Example (docs/study.md)::

    python benchmarks/target_floor.py --teacher faces --steps 16 32 64
"""

from __future__ import annotations

import torch

from recipe_study import denoiser, open_study, study_parser


def main() -> None:
    ap = study_parser(__doc__)
    ap.add_argument("--steps", type=int, nargs="+", default=[32], help="DDIM steps (n x K)")
    args = ap.parse_args()
    from perflow.evaluation import metrics
    from perflow.evaluation.samplers import baseline_scheduler, sample

    unet, le, config, _, _, data = open_study(args)
    fn = denoiser(unet, le, data["labels"])
    for n in args.steps:
        with torch.no_grad():
            out = sample(fn, baseline_scheduler("ddim", {**config, "timestep_spacing": "trailing"}), data["noise"].clone(), n).samples
        print(f"{args.teacher}: DDIM {n} steps (trailing), paired MSE to the 100-step reference {metrics.paired_mse(out, data['ref']):.6f}")


if __name__ == "__main__":
    main()
