"""Benchmark: PeRFlow vs diffusers' flow-matching solvers on the built-in flow-matching digits teacher.

Checks the shipped ``flow_digits`` teacher (an ``SD3Transformer2DModel`` trained with the
rectified-flow loss, shift 2) first: the fraction of its 50-step Euler samples
(``FlowMatchEulerDiscreteScheduler``) the shipped digit classifier reads as the requested digit.
Then trains a PeRFlow student (K=4, velocity) with the ``flow_digits`` recipe (what
``perflow train --config flow_digits`` runs) and compares it at 1, 2, 4 and 8 model evaluations
with the teacher under ``FlowMatchEulerDiscreteScheduler``, DPM-Solver++ (2M) and UniPC in their
flow modes (``use_flow_sigmas``, ``flow_prediction``, ``flow_shift`` = the teacher's shift), same
noise and labels (:func:`perflow.evaluation.teacher_eval.evaluate_teacher`, what ``perflow eval
--task teacher --teacher flow_digits`` runs): paired MSE to the teacher's own 100-step Euler output
and the Fréchet distance to the held-out digits in the digit classifier's feature space. Writes
``benchmarks/results/flow_digits_eval.{md,json}``.

    python benchmarks/flow_digits_eval.py --threads 1                 # the committed results
    python benchmarks/flow_digits_eval.py --max-steps 20 --num-samples 100 --results-dir /tmp/bench   # a smoke run

Prints the measured figures; nothing here is hard-coded.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch


@torch.no_grad()
def teacher_accuracy(num_samples: int = 1000, steps: int = 50, guidance_scale: float = 1.0, seed: int = 0,
                     batch_size: int = 500) -> float:
    """Fraction of the shipped ``flow_digits`` teacher's ``steps``-step Euler samples (labels 0..9 in turn) that the
    shipped digit classifier reads as the requested digit."""
    from perflow.builtin.classifier import load_digit_classifier
    from perflow.denoisers import unet_denoiser
    from perflow.evaluation.samplers import baseline_scheduler, sample
    from perflow.training.teachers import load_teacher

    teacher, classifier = load_teacher("flow_digits"), load_digit_classifier()
    labels = torch.arange(num_samples) % teacher.null_label
    noise = torch.randn(num_samples, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    hits = 0
    for lab, z in zip(labels.split(batch_size), noise.split(batch_size)):
        cond = teacher.encode_labels(lab)
        uncond = teacher.uncond(cond) if guidance_scale != 1.0 else None
        fn = unet_denoiser(teacher.unet, cond, uncond, guidance_scale)
        x = sample(fn, baseline_scheduler("ddim", teacher.schedule_config), z, steps).samples
        hits += int((classifier(x.clamp(-1, 1)).argmax(-1) == lab).sum())
    return hits / num_samples


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-steps", type=int, default=400, help="training steps of the PeRFlow student")
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--reference-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default="benchmark-runs", help="where the trained student goes")
    p.add_argument("--results-dir", default=str(Path(__file__).parent / "results"))
    p.add_argument("--skip-training", action="store_true", help="reuse the student already in --work-dir")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from perflow.evaluation.report import command_line, markdown_report, write_results
    from perflow.evaluation.teacher_eval import TeacherEvalConfig, evaluate_teacher
    from perflow.training import train

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    accuracy = teacher_accuracy(args.num_samples, seed=args.seed)
    timings["teacher_check_s"] = round(time.perf_counter() - t0, 1)
    print(f"flow_digits teacher, 50-step Euler, no guidance: classifier accuracy {accuracy:.4f} on {args.num_samples}")

    student = Path(args.work_dir) / "flow_perflow_k4"
    budget = dict(max_steps=args.max_steps, learning_rate=args.learning_rate, seed=args.seed)
    if not args.skip_training:
        t0 = time.perf_counter()
        train("flow_digits", output_dir=str(student), checkpoint_every=0, validation_every=0, tracker="none",
              save_delta=False, overwrite=True, **budget)
        timings["train_perflow_k4_s"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    cfg = TeacherEvalConfig(teacher="flow_digits", perflow=str(student), steps=(1, 2, 4, 8), spacings=("trailing",),
                            num_samples=args.num_samples, reference_steps=args.reference_steps, seed=args.seed,
                            batch_size=500)
    result = evaluate_teacher(cfg)
    timings["evaluate_s"] = round(time.perf_counter() - t0, 1)
    result.meta["eval_command"] = result.meta.get("command")  # the `perflow eval --task teacher` line of this evaluation
    result.meta["command"] = command_line(["python", "benchmarks/flow_digits_eval.py", *(argv if argv is not None else os.sys.argv[1:])])
    result.meta["training_budget"] = budget
    result.meta["teacher_accuracy_50_euler"] = accuracy
    result.meta["timings"] = timings
    result.meta["machine"] = f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    result.meta["notes"] = [
        f"Teacher check: {accuracy:.4f} of {args.num_samples} 50-step Euler samples of the shipped flow_digits teacher "
        "(labels 0..9 in turn, no guidance) are the requested digit by the shipped classifier.",
        f"Student: PeRFlow K=4, velocity, the flow_digits recipe (n=8 teacher Euler steps per window, window-end loss "
        f"weighting, EMA) for {args.max_steps} steps at batch 64, lr {args.learning_rate}, from the shipped teacher.",
        "Baselines: the teacher with diffusers' FlowMatchEulerDiscreteScheduler (row 'teacher ddim': Euler is DDIM on the "
        "linear path), DPMSolverMultistepScheduler (dpmsolver++, order 2) and UniPCMultistepScheduler with "
        "use_flow_sigmas=True, prediction_type='flow_prediction', flow_shift=2 (the teacher's shift), all ending at sigma 0; "
        "the reference is the teacher's 100-step Euler output. fd: Fréchet distance to the 359 held-out digits in the "
        "shipped classifier's features; accuracy: the classifier's agreement with the requested labels.",
        f"Wall-clock (s, shared 2-core CPU): {timings}.",
    ]
    out = Path(args.results_dir)
    title = "Benchmark: flow-matching digits teacher (SD3 transformer, 8x8, class-conditional)"
    write_results(result, out / "flow_digits_eval.json", out / "flow_digits_eval.md", title)
    print(markdown_report(result, title))


if __name__ == "__main__":
    main()
