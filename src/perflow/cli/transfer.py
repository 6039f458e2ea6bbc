"""``perflow delta report`` and ``perflow delta adapt``: does a delta accelerate your model, and if not, adapt it."""

from __future__ import annotations

import argparse
import sys

from perflow.cli.options import add_threads_option, apply_threads, finite_float, positive_int, read_prompts

REPORT_DESCRIPTION = """\
Does the delta accelerate this model? Samples target + delta with the PeRFlow scheduler and the target
with its own DDIM, DPM-Solver++ and UniPC (each at its best timestep spacing) at the same model
evaluations (--steps, default 4 8), all from the same noise and conditions, against the target's own
--reference-steps DDIM output, and prints a verdict line: paired MSE to that output, the sliced W2
(and, for digits-derived models, the FD in the digit classifier's features) to it, and the flows'
straightness within PeRFlow's windows. Writes transfer_report.json/.md and transfer_grid.png in
--output-dir. Nothing is downloaded.

Targets: a model folder (fine-tuned SD pipeline, class-conditional teacher folder) or built-in name;
a single-file checkpoint with --base; --base with --lora (a LoRA fine-tune); a ControlNet (controlnet/
in the target folder, or --controlnet) with --control-images. A delta learned on another base, a LoRA
whose keys do not fit, or a ControlNet of another base is refused, naming what does not match.
"""


def add_report_parser(sub) -> None:
    r = sub.add_parser("report", help="measure how a delta transfers to a fine-tune, LoRA or ControlNet model",
                       description=REPORT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _target_options(r)
    r.add_argument("--steps", type=int, nargs="+", default=[4, 8], help="model evaluations compared (4 is required)")
    r.add_argument("--baselines", nargs="+", default=["ddim", "dpmsolver++", "unipc"], help="the target's own solvers")
    r.add_argument("--spacings", nargs="+", default=["leading", "trailing", "linspace"],
                   help="timestep_spacing options tried for each solver (the best per step count is reported)")
    r.add_argument("--num-samples", type=positive_int, default=256, help="samples per sampler, all from the same noise")
    r.add_argument("--reference-steps", type=int, default=100, help="the target's DDIM steps of the reference")
    r.add_argument("--real-images", default=None, help="folder of real images (sliced W2 to real)")
    r.add_argument("--classifier", default=None, help="digit classifier folder (FD in its features; default: the "
                                                      "shipped one for digits-derived targets)")
    r.add_argument("--output-dir", default=None, help="where transfer_report.json/.md and transfer_grid.png go")
    r.set_defaults(func=run_report)


def _target_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--delta", required=True, help="delta .safetensors, released delta folder, or a PeRFlow LoRA file "
                                                  "(`perflow delta to-lora`, with --delta-extra its .rest file)")
    p.add_argument("--delta-extra", default=None, help="another delta added too (a PeRFlow LoRA's .rest.safetensors)")
    p.add_argument("--delta-scale", type=finite_float, default=1.0, help="multiplier of the delta")
    p.add_argument("--target", default=None, help="the model: a folder, a built-in name, or a single-file checkpoint "
                                                  "(with --base); omit with --base + --lora")
    p.add_argument("--base", default=None, help="the base model the target was derived from (checked against the delta)")
    p.add_argument("--lora", default=None, help="a LoRA file (diffusers/peft) fused into the target or --base")
    p.add_argument("--lora-scale", type=finite_float, default=1.0, help="strength of the fused --lora (its alpha / r included)")
    p.add_argument("--controlnet", default=None, help="a ControlNetModel folder (default: TARGET/controlnet if present)")
    p.add_argument("--control-images", default=None, help="folder of control images, cycled over the samples")
    p.add_argument("--conditioning-scale", type=finite_float, default=1.0, help="ControlNet conditioning scale")
    p.add_argument("--labels", type=int, nargs="+", default=None, help="class labels (class-conditional targets)")
    p.add_argument("--prompts", nargs="+", default=None, help="prompts (text targets), or one text file")
    p.add_argument("--guidance-scale", type=finite_float, default=None, help="CFG scale for every sampler (default 1; 7.5 text)")
    p.add_argument("--resolution", type=positive_int, default=None, help="image size in pixels (default: the target's own)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per UNet call")
    p.add_argument("--seed", type=int, default=0)
    add_threads_option(p)


def run_report(args) -> int:
    apply_threads(args)
    from perflow.evaluation.report import command_line
    from perflow.evaluation.transfer import TransferConfig, transfer_report

    config = TransferConfig(
        delta=args.delta, target=args.target, base=args.base, lora=args.lora, lora_scale=args.lora_scale,
        controlnet=args.controlnet, control_images=args.control_images, conditioning_scale=args.conditioning_scale,
        delta_extra=args.delta_extra, delta_scale=args.delta_scale, steps=tuple(args.steps),
        baselines=tuple(args.baselines), spacings=tuple(args.spacings), num_samples=args.num_samples,
        reference_steps=args.reference_steps, labels=args.labels, prompts=read_prompts(args.prompts),
        guidance_scale=args.guidance_scale, seed=args.seed, batch_size=args.batch_size, resolution=args.resolution,
        real_images=args.real_images, classifier=args.classifier, output_dir=args.output_dir,
        command=command_line(args.argv, "perflow"),
    )
    result = transfer_report(config)
    from perflow.evaluation.report import markdown_table

    print(markdown_table(result.rows).replace("teacher ref", "target ref"))
    print(f"perflow delta report: {result.meta['verdict']}")
    if args.output_dir:
        print(f"wrote transfer_report.json, transfer_report.md, transfer_grid.png in {args.output_dir}", file=sys.stderr)
    return 0


ADAPT_DESCRIPTION = """\
Adapt a delta to a model it does not transfer to: a short PeRFlow run (the `perflow train` recipe of
--config, the trainer itself) with the target as the teacher and the student started from target + delta.
Every --check-every steps the student is sampled at 4 steps; the run stops when its paired MSE to the
target's own --reference-steps DDIM output beats the target's best 4-evaluation solver (DDIM,
DPM-Solver++, UniPC, best timestep spacing, measured once at the start), or at --budget-steps.
Writes OUTPUT/run/delta.safetensors (student - target: a delta for that target), OUTPUT/adapt.json
(the baseline and every check) and the run's checkpoints. Interrupted (Ctrl-C, SIGTERM, a kill),
it continues with the same command plus --resume, bit for bit.
Training data: the recipe's (--config), changed with --set data.source=imagefolder --set data.path=DIR;
without the target's own images, --data-free (docs/delta.md).
"""


def add_adapt_parser(sub) -> None:
    a = sub.add_parser("adapt", help="adapt a delta to a target it does not transfer to (a short PeRFlow run)",
                       description=ADAPT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _target_options(a)
    a.add_argument("--output-dir", required=True, help="where adapt.json, init/ and run/ go")
    a.add_argument("--config", "-c", default="digits", help="training recipe or YAML/TOML file (as perflow train)")
    a.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a training field, e.g. --set learning_rate=5e-5 --set data.path=DIR (repeatable)")
    a.add_argument("--budget-steps", type=int, default=100, help="most PeRFlow steps to spend")
    a.add_argument("--check-every", type=int, default=25, help="steps between fidelity checks (and checkpoints)")
    a.add_argument("--num-samples", type=int, default=128, help="samples of each check")
    a.add_argument("--reference-steps", type=int, default=100, help="the target's DDIM steps of the reference")
    a.add_argument("--data-free", action="store_true",
                   help="adapt without images (no data.path): every window starts where the student's own sampler "
                        "reaches it from noise (student_starts 1); only the conditions (--labels, --prompts) are read")
    a.add_argument("--resume", action="store_true", help="continue the adaptation in --output-dir")
    a.set_defaults(func=run_adapt)


def _overrides(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set learning_rate=5e-5")
        key, value = item.split("=", 1)
        parsed = yaml.safe_load(value)
        if isinstance(parsed, bool) and value.strip().lower() not in ("true", "false"):
            parsed = value.strip()  # YAML 1.1 reads no/yes/on/off as booleans: mixed_precision=no is the string
        out[key.strip()] = parsed
    return out


def run_adapt(args) -> int:
    apply_threads(args)
    from perflow.training.adapt import adapt_delta
    from perflow.training.safety import StopSignals, TrainingInterrupted

    eval_kwargs = {k: getattr(args, k) for k in ("base", "lora", "lora_scale", "controlnet", "control_images",
                                                  "conditioning_scale", "delta_extra", "delta_scale", "labels", "guidance_scale",
                                                  "seed", "batch_size", "resolution")
                   if getattr(args, k) is not None}
    if args.prompts:
        eval_kwargs["prompts"] = read_prompts(args.prompts)
    again = "the same command plus --resume"  # adapt's --resume is a flag: it continues from the newest checkpoint
    overrides = _overrides(args.set)
    try:
        # outside a training chunk (the baseline, the fidelity checks) SIGINT/SIGTERM stop at once, as one line;
        # inside one, the trainer's own handlers save a checkpoint at the end of the step
        with StopSignals():
            result = adapt_delta(args.delta, args.target, args.output_dir, config=args.config, budget_steps=args.budget_steps,
                                 check_every=args.check_every, num_samples=args.num_samples,
                                 reference_steps=args.reference_steps, resume=args.resume, eval_kwargs=eval_kwargs,
                                 data_free=args.data_free, **overrides)
    except TrainingInterrupted as stop:
        line = stop.describe(again)
        if stop.checkpoint is None:
            line += f"; continue with {again}"
        print(f"perflow delta adapt: {line}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:  # a handler other than StopSignals' (e.g. not the main thread)
        print(f"perflow delta adapt: interrupted; continue with {again}", file=sys.stderr)
        return 130
    last = result.checks[-1]
    verdict = "beats" if result.reached else "does NOT beat"
    print(f"perflow delta adapt: after {result.steps} steps the 4-step paired MSE {last['paired_mse']:.4g} {verdict} the "
          f"target's best 4-evaluation solver {result.baseline['solver']} ({result.baseline['paired_mse']:.4g}); "
          + (f"adapted delta: {result.delta}" if result.delta else "the given delta already does: nothing trained"))
    return 0 if result.reached else 1
