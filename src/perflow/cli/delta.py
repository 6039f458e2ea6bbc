"""``perflow delta``: extract, merge, export as LoRA, inspect a plug-and-play PeRFlow delta."""

from __future__ import annotations

import argparse
import json

from perflow.cli.options import finite_float, positive_int
from perflow.denoisers import CFG_MODES
from perflow.windows import PREDICTION_TYPES

_VARIANT_HELP = "weight variant of a released delta folder holding several (e.g. fp16; '' for the default file)"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "delta",
        help="plug-and-play deltas: extract, merge, to-lora, info, report, adapt",
        description="delta = student - teacher: extract it, merge it into other models of the same base, "
        "export it as a LoRA.",
    )
    sub = p.add_subparsers(dest="delta_command", metavar="ACTION", required=True)

    e = sub.add_parser("extract", help="delta = student - teacher (fp32) with metadata, as .safetensors",
                       description="Write delta = student - teacher (fp32, or fp64 with --float64) as one .safetensors "
                       "file, with the metadata a merge needs: the teacher's class, config and weight hash, K, the "
                       "window boundaries, the parameterization and the PeRFlow scheduler config (read from the "
                       "student's scheduler/ when it has one). An existing output needs --overwrite; the inputs are "
                       "never overwritten.")
    e.add_argument("--student", required=True, help="student: diffusers UNet/transformer folder, pipeline or teacher folder")
    e.add_argument("--teacher", required=True, help="teacher the student was trained from (same layouts)")
    e.add_argument("-o", "--output", required=True, help="output .safetensors file")
    e.add_argument("--num-time-windows", type=int, help="K (only if the student has no PeRFlow scheduler/)")
    e.add_argument("--prediction-type", choices=PREDICTION_TYPES,
                   help="the student's parameterization (only if the student has no PeRFlow scheduler/)")
    e.add_argument("--window-boundaries", type=_floats, help="explicit boundaries, e.g. 1,0.6,0.3,0")
    e.add_argument("--cfg-mode", choices=CFG_MODES, help="how the teacher was guided in training")
    e.add_argument("--base-name", help="name of the base model to record (default: the teacher path)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    e.add_argument("--float64", action="store_true",
                   help="store the fp64 difference (2x size; merging into the teacher is then bit-exact for every "
                        "weight that did not shrink by more than 2^28 in training)")
    e.set_defaults(func=_extract)

    m = sub.add_parser("merge", help="add scale * delta to a UNet folder, pipeline folder or single-file checkpoint",
                       description="Add --scale x delta to a model of the same base (fp32 sums, the model's dtype kept) "
                       "and write it to -o: a UNet/transformer folder, a pipeline folder (its scheduler becomes the "
                       "PeRFlow scheduler from the delta's metadata) or a single-file .safetensors checkpoint. A delta "
                       "of another architecture or base config is refused, as is a pipeline that already samples with "
                       "the PeRFlow scheduler (merged already).")
    m.add_argument("--delta", required=True, help="delta .safetensors or released delta folder")
    m.add_argument("--into", required=True, help="diffusers UNet/transformer folder, pipeline folder (SD, SDXL, SD3, Flux) or single-file .safetensors")
    m.add_argument("-o", "--output", required=True, help="output folder (or .safetensors for a single file)")
    m.add_argument("--variant", default=None, help=_VARIANT_HELP)
    m.add_argument("--scale", type=finite_float, default=1.0, help="multiplier of the delta (default 1.0)")
    m.add_argument("--allow-partial", action="store_true",
                   help="skip delta keys the model lacks or whose shapes differ (listed) instead of refusing")
    m.add_argument("--extra", action="append", default=[],
                   help="another delta file to add as well (e.g. the non-LoRA rest of a LoRA export)")
    m.add_argument("--unet-config", help="UNet folder or config.json, for a single file when the delta has none")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output")
    m.set_defaults(func=_merge)

    lo = sub.add_parser("to-lora", help="low-rank (SVD) LoRA export loadable by pipe.load_lora_weights",
                        description="Export the delta's linear and conv weights as a rank-r LoRA (truncated SVD per "
                        "layer) that pipe.load_lora_weights loads, and the tensors a LoRA cannot carry (biases, norms) "
                        "as a .rest.safetensors delta to merge beside it. Prints the relative error per rank.")
    lo.add_argument("--delta", required=True, help="delta .safetensors or released delta folder")
    lo.add_argument("--variant", default=None, help=_VARIANT_HELP)
    lo.add_argument("--rank", type=positive_int, required=True, help="LoRA rank r")
    lo.add_argument("-o", "--output", required=True, help="output LoRA .safetensors (keys prefixed unet. or transformer.)")
    lo.add_argument("--rest", help="where to store the tensors a LoRA cannot carry (default: OUTPUT with .rest)")
    lo.add_argument("--no-rest", action="store_true", help="drop them (their share of the norm is printed)")
    lo.add_argument("--overwrite", action="store_true", help="replace existing output files")
    lo.add_argument("--report-ranks", type=_ints, default=None, help="ranks for the error table (default: 1,4,16,64,r)")
    lo.add_argument("--per-layer", action="store_true", help="print the error of every layer, not only the totals")
    lo.set_defaults(func=_to_lora)

    i = sub.add_parser("info", help="print a delta's metadata and size",
                       description="Print a delta's metadata (base model, K, boundaries, parameterization), its tensor "
                       "count and norm.")
    i.add_argument("delta", help="delta .safetensors or released delta folder")
    i.add_argument("--variant", default=None, help=_VARIANT_HELP)
    i.set_defaults(func=_info)

    from perflow.cli.transfer import add_adapt_parser, add_report_parser

    add_report_parser(sub)
    add_adapt_parser(sub)


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _safetensors_output(path: str, flag: str = "-o", overwrite: bool = False, inputs: tuple = ()) -> None:
    """Refuse, before any work, an output file that is not ``.safetensors``, cannot be written, already exists
    (unless ``overwrite``), or is one of the ``inputs`` or lies inside an input folder (never, not even with
    ``overwrite``: the command would destroy what it reads)."""
    from pathlib import Path

    from perflow.io import check_output_path

    if not path.endswith(".safetensors"):
        raise ValueError(f"{flag} {path!r}: weights are written as safetensors; give a path ending in .safetensors")
    out = Path(path).resolve()
    for given in inputs:
        src = Path(given).resolve()
        if out == src or (src.is_dir() and src in out.parents):
            raise ValueError(f"{flag} {path!r} would overwrite the input {given!r}; write to another path")
    if out.exists() and not overwrite:
        raise ValueError(f"{flag} {path!r} already exists; pass --overwrite to replace it, or write to another path")
    check_output_path(path)


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"ranks are at least 1, got {text!r}")
    return values


def _extract(args) -> int:
    import torch

    from perflow.delta import extract_from_folders

    _safetensors_output(args.output, overwrite=args.overwrite, inputs=(args.student, args.teacher))
    if args.window_boundaries is not None and args.num_time_windows is not None \
            and len(args.window_boundaries) != args.num_time_windows + 1:
        raise ValueError(f"--window-boundaries has {len(args.window_boundaries)} values, so K = "
                         f"{len(args.window_boundaries) - 1}, but --num-time-windows is {args.num_time_windows}; give one of them")
    delta, meta = extract_from_folders(
        args.student, args.teacher, args.output,
        num_time_windows=args.num_time_windows, prediction_type=args.prediction_type,
        window_boundaries=args.window_boundaries, cfg_mode=args.cfg_mode, base_name=args.base_name,
        dtype=torch.float64 if args.float64 else torch.float32,
    )
    norm = sum(float(v.double().pow(2).sum()) for v in delta.values()) ** 0.5
    print(f"wrote {args.output}: {len(delta)} tensors, ||delta|| = {norm:.6g}, K = {meta.get('num_time_windows')}, "
          f"prediction_type = {meta.get('prediction_type')}")
    return 0


def _merge(args) -> int:
    from pathlib import Path

    from perflow.delta import check_merge_output, load_delta, merge_into_path

    if not Path(args.into).exists():
        raise FileNotFoundError(f"--into {args.into!r}: no such model file or folder")
    check_merge_output(args.into, args.output, args.overwrite)  # before reading anything
    delta, meta = load_delta(args.delta, variant=args.variant)
    for extra in args.extra:
        more, _ = load_delta(extra)
        clash = sorted(set(more) & set(delta))
        if clash:
            raise ValueError(f"--extra {extra} repeats keys of the delta: {clash[:5]}")
        delta.update(more)
    report = merge_into_path(args.into, delta, args.output, args.scale, metadata=meta,
                             strict=not args.allow_partial, unet_config=args.unet_config, overwrite=args.overwrite)
    print(f"merged {report.merged} tensors (scale {args.scale}) into {args.into} -> {args.output}")
    if report.skipped:
        print("SKIPPED (--allow-partial): " + report.skipped.describe("delta", "model"))
    if report.untouched_addons:
        print(f"left {len(report.untouched_addons)} adapter tensors unchanged")
    if report.uncovered:
        print(f"the delta is partial by design; {len(report.uncovered)} model tensors not in it were left unchanged")
    return 0


def _to_lora(args) -> int:
    from pathlib import Path

    from perflow.delta import delta_to_lora, error_table, load_delta, lora_prefix, save_delta, save_lora

    out = Path(args.output)
    rest_path = Path(args.rest) if args.rest else out.with_name(out.stem + ".rest.safetensors")
    _safetensors_output(args.output, overwrite=args.overwrite, inputs=(args.delta,))
    if not args.no_rest:
        if rest_path.resolve() == out.resolve():
            raise ValueError(f"--rest {str(rest_path)!r} is the LoRA's own -o path; give another file")
        _safetensors_output(str(rest_path), "--rest", overwrite=args.overwrite, inputs=(args.delta,))
    delta, meta = load_delta(args.delta, variant=args.variant)
    model = _skeleton(meta)
    if model is None:
        print("note: no model config in the delta's metadata; LoRA targets guessed from tensor shapes (2-D, 4-D)")
    base = meta.get("base_model") if isinstance(meta.get("base_model"), dict) else {}
    prefix = lora_prefix(model if model is not None else str(base.get("class") or "UNet2DConditionModel"))
    export = delta_to_lora(delta, args.rank, model=model, prefix=prefix)
    ranks = args.report_ranks or sorted({1, 4, 16, 64, args.rank})
    print(error_table(export, ranks, per_layer=args.per_layer))
    print(f"{len(export.ranks)} linear/conv weights as LoRA; {len(export.rest)} other tensors (biases, norms, ...) "
          f"hold {100 * export.rest_share:.2f}% of ||delta||")
    lora_meta = {k: meta[k] for k in ("base_model", "num_time_windows", "prediction_type", "window_boundaries",
                                      "scheduler_config", "cfg_mode") if k in meta}
    save_lora(export, args.output, lora_meta)
    print(f"wrote {args.output} (rank {args.rank}, keys {prefix}.*; load with pipe.load_lora_weights)")
    if args.no_rest:
        print(f"dropped the non-LoRA tensors (--no-rest): {100 * export.rest_share:.2f}% of ||delta|| is lost")
    elif export.rest:
        save_delta(export.rest, rest_path, {**lora_meta, "part": "non-LoRA rest of a LoRA export", "partial": True})
        print(f"wrote {rest_path} (merge it with merge_delta or `perflow delta merge --delta {rest_path}`)")
    return 0


def _skeleton(meta: dict):
    """The teacher's denoiser built on the meta device from the recorded config (module types only), or None."""
    import diffusers
    from accelerate import init_empty_weights

    from perflow.delta import recorded_config

    base = meta.get("base_model") if isinstance(meta.get("base_model"), dict) else {}
    config = recorded_config(meta)
    cls = getattr(diffusers, str(base.get("class") or "UNet2DConditionModel"), None)
    if not config or cls is None or not hasattr(cls, "from_config"):
        return None
    try:
        with init_empty_weights():
            return cls.from_config(config)
    except (TypeError, ValueError) as err:  # a config that does not build: fall back to shapes
        print(f"note: the recorded {cls.__name__} config does not build ({err})")
        return None


def _info(args) -> int:
    from perflow.delta import load_delta

    delta, meta = load_delta(args.delta, variant=args.variant)
    norm = sum(float(v.double().pow(2).sum()) for v in delta.values()) ** 0.5
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in delta.values()})
    print(f"{len(delta)} tensors ({', '.join(dtypes)}), {sum(v.numel() for v in delta.values())} values, "
          f"||delta|| = {norm:.6g}")
    shown = {k: v for k, v in meta.items() if k not in ("unet_config",)}
    if isinstance(shown.get("base_model"), dict):
        shown["base_model"] = {k: v for k, v in shown["base_model"].items() if k != "config"}
    print(json.dumps(shown, indent=2, sort_keys=True, default=str))
    return 0
