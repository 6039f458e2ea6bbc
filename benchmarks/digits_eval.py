"""Benchmark: PeRFlow vs the teacher's few-step solvers and whole-range reflow, on the digits.

Trains a PeRFlow student (K=4) and a whole-range reflow baseline (K=1, InstaFlow-style) from
the shipped digits teacher with the same budget (steps, batch, n teacher DDIM steps per
window: equal teacher evaluations per training sample), then runs the evaluation harness
(the same as ``perflow eval``) and writes ``benchmarks/results/digits_eval.{md,json}``.
Optionally (``--toy2d``) the analytic 2-D benchmark too (``toy2d_eval.{md,json}``).

    python benchmarks/digits_eval.py                     # the committed results
    python benchmarks/digits_eval.py --max-steps 50 --num-samples 200 --results-dir /tmp/bench   # a smoke run

Prints the measured figures; nothing here is hard-coded.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-steps", type=int, default=1000, help="training steps of each student")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-solver-steps", type=int, default=8, help="n, teacher DDIM steps per window")
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--time-sampling", choices=("uniform", "u_shaped"), default="uniform",
                   help="training time distribution inside each window (u_shaped: more weight near the window ends)")
    p.add_argument("--loss-weighting", choices=("none", "window_end"), default="window_end",
                   help="window_end: weight the loss so it is the squared error of the predicted window end "
                        "(the digits recipe's default); none: plain MSE on the parameterization's target")
    p.add_argument("--window-weights", default="none",
                   help="training.window_weights (default none: what the committed results used; the trainer's default is auto)")
    p.add_argument("--solver-step-allocation", choices=("equal", "auto"), default="equal",
                   help="perflow.solver_step_allocation (default equal: what the committed results used; the trainer's default is auto)")
    p.add_argument("--window-start-prob", type=float, default=0.0,
                   help="fraction of training times moved to their window's start (0: what the committed results used; "
                        "the default recipe uses 0.5, docs/study.md)")
    p.add_argument("--prediction-type", choices=("diff_eps", "ddim_eps", "velocity"), default="diff_eps",
                   help="the students' parameterization (docs/method.md, parameterizations)")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--reference-steps", type=int, default=100)
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default="benchmark-runs", help="where the trained students go")
    p.add_argument("--results-dir", default=str(Path(__file__).parent / "results"))
    p.add_argument("--skip-training", action="store_true", help="reuse students already in --work-dir")
    p.add_argument("--train-only", choices=("perflow_k4", "reflow_k1"), default=None,
                   help="train just this student and exit (to train the two in parallel processes)")
    p.add_argument("--toy2d", action="store_true", help="also run the 2-D Gaussian-mixture benchmark")
    p.add_argument("--toy-steps", type=int, default=2000)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from perflow.evaluation.digits import DigitsEvalConfig, evaluate_digits
    from perflow.evaluation.report import command_line, markdown_report, write_results
    from perflow.training import train

    work = Path(args.work_dir)
    timings = {}
    budget = dict(
        max_steps=args.max_steps, batch_size=args.batch_size, num_solver_steps=args.num_solver_steps,
        learning_rate=args.learning_rate, seed=args.seed, time_sampling=args.time_sampling,
        loss_weighting=args.loss_weighting, prediction_type=args.prediction_type,
        window_start_prob=args.window_start_prob, window_weights=args.window_weights,
        solver_step_allocation=args.solver_step_allocation,
    )
    for name, k in (("perflow_k4", 4), ("reflow_k1", 1)):
        if args.skip_training or (args.train_only and args.train_only != name):
            continue
        t0 = time.perf_counter()
        train("digits", output_dir=str(work / name), num_time_windows=k, checkpoint_every=0, validation_every=0,
              tracker="none", save_delta=False, overwrite=True, **budget)
        timings[f"train_{name}_s"] = round(time.perf_counter() - t0, 1)
        print(f"trained {name} in {timings[f'train_{name}_s']} s")
    if args.train_only:
        return

    t0 = time.perf_counter()
    cfg = DigitsEvalConfig(
        perflow=str(work / "perflow_k4"), reflow=str(work / "reflow_k1"), num_samples=args.num_samples,
        reference_steps=args.reference_steps, guidance_scale=args.guidance_scale, seed=args.seed,
    )
    result = evaluate_digits(cfg)
    timings["evaluate_s"] = round(time.perf_counter() - t0, 1)
    result.meta["command"] = command_line(["python", "benchmarks/digits_eval.py", *(argv if argv is not None else os.sys.argv[1:])])
    result.meta["training_budget"] = budget

    result.meta["timings"] = timings
    result.meta["machine"] = f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    result.meta["notes"] = [
        f"Students: PeRFlow K=4 ({args.prediction_type}) and whole-range reflow K=1 ({args.prediction_type}), each trained "
        f"{args.max_steps} steps at batch {args.batch_size}, lr {args.learning_rate}, {args.time_sampling} time sampling, "
        f"loss weighting {args.loss_weighting}, n={args.num_solver_steps} teacher DDIM steps per window "
        "(so both cost the same teacher evaluations per training sample), EMA weights, from the shipped digits teacher.",
        "Baselines: the teacher with diffusers DDIM, DPM-Solver++ (2M) and UniPC, trailing timestep spacing, "
        "ending at the teacher's last noise level abar[0] like the reference.",
        f"Wall-clock (s, shared CPU): {timings}.",
    ]
    if args.skip_training:
        flags = f"--max-steps {args.max_steps} --batch-size {args.batch_size} --num-solver-steps {args.num_solver_steps} " \
                f"--learning-rate {args.learning_rate} --time-sampling {args.time_sampling} --loss-weighting {args.loss_weighting} " \
                f"--prediction-type {args.prediction_type} --window-start-prob {args.window_start_prob} --window-weights {args.window_weights} --solver-step-allocation {args.solver_step_allocation} --seed {args.seed} " \
                f"--work-dir {args.work_dir}"
        result.meta["notes"].append(
            "The students were trained beforehand, in two parallel processes, by "
            f"`python benchmarks/digits_eval.py --train-only perflow_k4 {flags}` and the same with `--train-only reflow_k1`."
        )
    out = Path(args.results_dir)
    write_results(result, out / "digits_eval.json", out / "digits_eval.md", "Benchmark: digits (8x8, class-conditional)")
    print(markdown_report(result, "Benchmark: digits (8x8, class-conditional)"))

    if args.toy2d:
        from perflow.evaluation.toy2d import evaluate_2d, train_2d_student

        students = {
            "perflow (K=4)": (train_2d_student(num_time_windows=4, max_steps=args.toy_steps, seed=args.seed), "perflow"),
            "reflow (K=1)": (train_2d_student(num_time_windows=1, max_steps=args.toy_steps, seed=args.seed), "reflow"),
        }
        toy = evaluate_2d(students, num_samples=2000, reference_steps=args.reference_steps, seed=args.seed)
        toy.meta["command"] = result.meta["command"]
        toy.meta["notes"] = [
            f"MLP students (velocity parameterization) trained {args.toy_steps} steps at batch 1024, n=8 teacher "
            f"steps per window; sliced W2 floor (two exact sample sets of 2000): {toy.meta['sw_exact_vs_exact']:.4f}."
        ]
        write_results(toy, out / "toy2d_eval.json", out / "toy2d_eval.md", "Benchmark: 2-D Gaussian mixture (exact teacher)")
        print(markdown_report(toy, "Benchmark: 2-D Gaussian mixture (exact teacher)"))


if __name__ == "__main__":
    main()
