"""``perflow demo``: accelerate the built-in digits teacher with PeRFlow, evaluate it, draw it."""

from __future__ import annotations

import argparse

from perflow.cli.options import add_threads_option, apply_threads
import math


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train PeRFlow on the built-in digits teacher, compare it with DDIM/DPM-Solver++/UniPC, draw pictures",
        description=(
            "Offline, CPU-sized demonstration (7.5 CPU minutes at --threads 1, docs/demo.md): PeRFlow (K=4) and a whole-range "
            "reflow baseline (K=1) are trained from the built-in digits teacher with the project's trainer, then "
            "compared with the teacher's diffusers solvers at 1, 2, 4 and 8 model evaluations (reference: the "
            "teacher's 100-step DDIM output from the same noise). Also trains 2-D students on an exact "
            "Gaussian-mixture teacher and plots their trajectories."
        ),
    )
    p.add_argument("--output-dir", default="perflow-demo", help="folder for results, pictures and students (default: perflow-demo)")
    p.add_argument("--quick", action="store_true", help="a reduced run (well under a minute) to check the installation")
    p.add_argument("--max-steps", type=int, default=None, help="digits training steps per student (default 200; --quick: 2)")
    p.add_argument("--batch-size", type=int, default=None, help="digits training batch size (default 64)")
    p.add_argument("--num-samples", type=int, default=None, help="evaluation samples per sampler (default 500)")
    p.add_argument("--toy-steps", type=int, default=None, help="2-D MLP training steps (default 600)")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance, the same for every sampler (default 1.0)")
    p.add_argument("--no-reflow-baseline", action="store_true", help="skip the K=1 reflow baseline (saves a third of the time)")
    p.add_argument("--teacher", default="digits", help="a class-conditional pixel-space teacher folder (default: the built-in digits teacher)")
    p.add_argument("--flow", action="store_true",
                   help="also run PeRFlow on the built-in flow-matching teacher (flow_digits, an SD3 transformer) against "
                        "its Euler / DPM-Solver++ / UniPC flow-mode solvers (about 2.5 more CPU minutes)")
    p.add_argument("--flow-max-steps", type=int, default=None, help="training steps on the flow-matching teacher (default 150; --quick: 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of training and of the evaluation noise (default 0)")
    add_threads_option(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from perflow.demo import DemoConfig, run_demo
    from perflow.evaluation.report import command_line

    apply_threads(args)
    base = DemoConfig.quick() if args.quick else DemoConfig()
    sizes = {
        "max_steps": args.max_steps, "batch_size": args.batch_size, "num_samples": args.num_samples,
        "toy_steps": args.toy_steps, "flow_max_steps": args.flow_max_steps,
    }
    for key, value in sizes.items():
        if value is not None:
            if value < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
            setattr(base, key, value)
    if not math.isfinite(args.guidance_scale):
        raise ValueError(f"--guidance-scale must be a finite number, got {args.guidance_scale}")
    from perflow.io import check_output_path

    check_output_path(args.output_dir, folder=True)  # now, not after training
    base.output_dir = args.output_dir
    base.guidance_scale = args.guidance_scale
    base.reflow_baseline = not args.no_reflow_baseline
    base.teacher = args.teacher
    base.seed = args.seed
    base.flow = args.flow
    base.progress = not args.no_progress
    run_demo(base, command=command_line(getattr(args, "argv", None), "perflow"))
    return 0
