"""Do DPM-Solver++ and UniPC gain from the teacher's clipping? The study's baselines with and without it.

diffusers' ``DPMSolverMultistepScheduler`` and ``UniPCMultistepScheduler`` have no ``clip_sample``: on a
teacher whose config clips ``x0`` (a ``DDPMScheduler`` default, the faces teacher) they sample its
unclipped ODE, which is what a user who swaps them into the teacher's pipeline gets (and what the study's
baselines are). Their dynamic ``thresholding`` with ``sample_max_value = 1`` is exactly ``clip(x0, -1, 1)``
(the threshold ``s`` is clamped to ``[1, sample_max_value]``), so this prints, on the study's evaluation set
(``recipe_study.reference``: 256 fixed noises, paired MSE to the teacher's 100-step DDIM), each solver's
best-spacing paired MSE at 4 and 8 steps without and with that clipping. Example (docs/study.md)::

    python benchmarks/clipped_baselines.py --teacher faces
"""

from __future__ import annotations

import torch

from recipe_study import SPACINGS, denoiser, open_study, study_parser


def main() -> None:
    args = study_parser(__doc__).parse_args()
    from perflow.evaluation import metrics
    from perflow.evaluation.samplers import baseline_scheduler, sample

    unet, le, config, _, _, data = open_study(args)
    fn = denoiser(unet, le, data["labels"])
    for solver in ("dpmsolver++", "unipc"):
        for steps in (4, 8):
            row = []
            for clip in (False, True):
                best = None
                for spacing in SPACINGS:
                    sch = baseline_scheduler(solver, config)
                    extra = dict(thresholding=True, sample_max_value=1.0) if clip else {}
                    sch = sch.__class__.from_config(sch.config, timestep_spacing=spacing, **extra)
                    with torch.no_grad():
                        out = sample(fn, sch, data["noise"].clone(), steps).samples
                    mse = metrics.paired_mse(out, data["ref"])
                    best = mse if best is None or mse < best else best
                row.append(best)
            print(f"{args.teacher} {solver} {steps} steps: paired MSE {row[0]:.5f} unclipped, {row[1]:.5f} clipped", flush=True)


if __name__ == "__main__":
    main()
