"""``perflow train``: distil a teacher into a PeRFlow student (piecewise reflow) on accelerate."""

from __future__ import annotations

import argparse

from perflow.cli.options import add_threads_option, apply_threads
import sys

DESCRIPTION = """\
Train a PeRFlow student by piecewise reflow: the student starts as a copy of the teacher's
UNet and learns, window by window, the straight segment from z_s to the teacher's DDIM
solution z_e. Settings come from --config (a YAML/TOML file or a packaged recipe: {recipes};
`default` is the recommended start for your own model, the others are model-specific); without
--config the defaults shown below apply. Every field can be overridden by a flag, with or
without its section (--training.max_steps 100 == --max_steps 100). Booleans take a value (--center_crop false),
lists a comma list or YAML (--window_boundaries 1,0.6,0.3,0).

Outputs in --output_dir: unet/ (diffusers, safetensors), scheduler/ (PeRFlowScheduler),
delta.safetensors (student - teacher, with metadata), for SD/SDXL the rest of the pipeline,
checkpoints/ (resume with --resume latest), validation/ grids, logs/ (TensorBoard).
A folder holding another run is refused unless --resume latest or --overwrite true.

Ctrl-C or SIGTERM saves a checkpoint at the end of the step and exits with 130 / 143 (a second
Ctrl-C exits at once); a NaN/inf loss stops the run (exit 2) before it reaches the weights.

Your own model: perflow train --teacher MODEL_DIR --path IMAGES   (images or tar shards, at the teacher's resolution)
One GPU:   perflow train --config sd15 --teacher /models/sd15 --path /data/images
Many GPUs: accelerate launch --multi_gpu --num_processes 8 -m perflow train --config sd15 ...
"""


def add_parser(subparsers) -> None:
    from perflow.training.config_io import SECTIONS, field_docs, field_index, load_config, recipe_names

    recipes = ", ".join(recipe_names())
    p = subparsers.add_parser(
        "train", help="train a PeRFlow student from a teacher (piecewise reflow)",
        description=DESCRIPTION.format(recipes=recipes), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", "-c", default=None, metavar="FILE|RECIPE",
                   help=f"YAML/TOML config file or packaged recipe name ({recipes}; `default` is the recommended "
                        "start for your own model); without it, the defaults shown below apply")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    add_threads_option(p)
    docs = field_docs()
    index = field_index()
    resolved = load_config(None).to_dict()  # what a run without --config gets, as --print-config shows it
    groups = {s: p.add_argument_group(f"{s} section") for s in SECTIONS}
    for key, (section, f, tp) in index.items():
        default = resolved[section][f.name]
        tname = _type_name(tp)
        groups[section].add_argument(
            f"--{key}", f"--{f.name}", dest=key, default=argparse.SUPPRESS, metavar=tname,
            help=f"{docs.get(key, '')} (default: {default!r})".replace("%", "%%"),
        )
    p.set_defaults(func=run)


def _type_name(tp) -> str:
    import typing

    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is list:
        return f"{_type_name(args[0])},..."
    if args and typing.get_origin(tp) is not None:
        return "|".join(_type_name(a) for a in args)  # int | list[int]: INT|INT,...
    return getattr(tp, "__name__", "VALUE").upper()


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    from perflow.training.config_io import field_index, load_config

    keys = field_index()
    overrides = {k: v for k, v in vars(args).items() if k in keys}
    cfg = load_config(args.config, overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    from perflow.training import train
    from perflow.training.safety import TrainingInterrupted

    try:
        result = train(cfg)
    except TrainingInterrupted as stop:
        print(f"perflow train: {stop}", file=sys.stderr)
        _close_process_group(barrier=False)
        return stop.exit_code
    except KeyboardInterrupt:  # outside the run's signal handlers (e.g. while exporting)
        print("perflow train: interrupted", file=sys.stderr)
        return 130
    if result.files:
        print(f"trained {result.global_step} steps ({result.samples_per_second:.1f} samples/s); "
              f"student and scheduler in {result.output_dir}")
    _close_process_group()
    return 0


def _close_process_group(barrier: bool = True) -> None:
    """Tear down the distributed group the launcher gave this command (a gloo group left to the
    interpreter's exit can abort the process after the work is done)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
