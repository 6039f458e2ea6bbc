"""Does a low-rank or rescaled PeRFlow delta transfer better than the plain delta?

The transfer benchmark (``transfer.py``) found that the digits delta stops beating a LoRA fine-tune's own
best 4-step solver between LoRA scale 0.5 and 1. This script asks whether a different use of the same
delta transfers further: its rank-``r`` truncated SVD (the PeRFlow LoRA of ``perflow delta to-lora --rank r``)
and the delta at another scale (``perflow delta merge --scale s``). For the teacher itself (the control) and each peft LoRA variant of
``transfer.py`` (made the same way, same seed), :func:`perflow.evaluation.transfer.transfer_report`
(``perflow delta report``) of each delta variant: target + delta at 4 and 8 steps against the target's
best training-free solver, all against the target's own 100-step DDIM output from the same noise.

    perflow train --config digits --max_steps 600 --window_weights none --solver_step_allocation equal --output_dir runs/digits_default_600
    python benchmarks/delta_variants.py --perflow-run runs/digits_default_600 --lora-ranks 4 --ranks 4,16 \\
        --scales 0.75,1.25 --out benchmarks/results/delta_variants
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

from transfer import RESULTS, make_variants, summarise


def truncated(delta: dict[str, torch.Tensor], rank: int, model) -> dict[str, torch.Tensor]:
    """The delta a user gets back from ``perflow delta to-lora --rank RANK``: each linear / conv weight's
    truncated SVD (:func:`perflow.delta.lora.delta_to_lora`, then ``B A``), every other tensor as it is."""
    from perflow.delta.lora import delta_to_lora, lora_to_delta

    export = delta_to_lora(delta, rank, model=model, progress=False)
    return {**export.rest, **lora_to_delta(export.lora)}


def norm(delta: dict[str, torch.Tensor]) -> float:
    return sum(float(d.double().square().sum()) for d in delta.values()) ** 0.5


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--perflow-run", required=True, help="a `perflow train --config digits` output folder (delta.safetensors)")
    p.add_argument("--lora-ranks", type=lambda s: [int(x) for x in s.split(",") if x], default=[4, 16])
    p.add_argument("--lora-steps", type=int, default=300)
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",") if x], default=[4, 16],
                   help="truncated-SVD ranks of the delta")
    p.add_argument("--scales", type=lambda s: [float(x) for x in s.split(",") if x], default=[0.75, 1.25],
                   help="scales of the (full-rank) delta")
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "delta_variants"), help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from perflow.builtin.classifier import WEIGHTS_DIR
    from perflow.delta import load_delta, weights_sha256
    from perflow.evaluation.transfer import TransferConfig, transfer_report
    from perflow.io import write_text
    from perflow.targets import Target
    from perflow.training.teachers import load_teacher

    t_start = time.time()
    delta, meta = load_delta(Path(args.perflow_run) / "delta.safetensors")
    teacher = load_teacher("digits")
    if meta["base_model"]["weights_sha256"] != weights_sha256(teacher.unet.state_dict()):
        raise SystemExit("the delta was not learned on the current digits teacher: retrain it (see the docstring)")
    made = types.SimpleNamespace(teacher="digits", lora_ranks=args.lora_ranks, lora_steps=args.lora_steps,
                                 lora_lr=args.lora_lr, lora_scales=[1.0], strengths=[], controlnet_steps=0, seed=args.seed)
    variants = make_variants(teacher, made, delta)
    deltas = [("delta", delta)] + [(f"rank {r}", truncated(delta, r, teacher.unet)) for r in args.ranks] + \
             [(f"delta x {s}", {k: v * s for k, v in delta.items()}) for s in args.scales]
    work = Path(tempfile.mkdtemp(prefix="perflow-delta-variants-"))
    rows = []
    for v in variants:
        target = Target(teacher=v["teacher"], name=v["name"])
        for name, d in deltas:
            report = transfer_report(TransferConfig(delta=(d, meta), target=target, steps=(4, 8), num_samples=args.num_samples,
                                                    classifier=str(WEIGHTS_DIR), seed=args.seed,
                                                    output_dir=str(work / f"report-{len(rows)}")), progress=False)
            row = {"target": v["name"], "delta": name, "norm_ratio": norm(d) / norm(delta), **summarise(report)}
            rows.append(row)
            print(f"{v['name']} | {name}: @4 {row['delta_paired_mse@4']:.4f} vs {row['best_paired_mse@4']:.4f}, "
                  f"@8 {row['delta_paired_mse@8']:.4f} vs {row['best_paired_mse@8']:.4f}", flush=True)
    command = "python benchmarks/delta_variants.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    result = {"command": command, "perflow_run": args.perflow_run, "rows": rows, "seconds": round(time.time() - t_start, 1),
              "threads": args.threads, "torch": torch.__version__}
    write_text(Path(args.out + ".json"), json.dumps(result, indent=1))
    lines = [
        "# Delta variants: does a low-rank or rescaled delta transfer further than the plain delta?", "",
        f"Command: `{command}`", "",
        f"Delta: {args.perflow_run}/delta.safetensors. Each row: `perflow delta report` ({args.num_samples} samples, labels "
        "0-9 cycled) of target + the delta variant at 4 and 8 steps; `best own` = the target's best of DDIM / "
        "DPM-Solver++ / UniPC at that number of evaluations (best timestep spacing); MSE = paired MSE to the "
        "target's own 100-step DDIM output from the same noise. `rank r` = the delta's rank-r LoRA (`perflow delta "
        "to-lora --rank r`); `delta x s` = the delta at scale s; `norm` = the variant's norm over the delta's.", "",
        "| target | delta used | norm | MSE @4 | best own @4 | MSE @8 | best own @8 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        mark = lambda a, b: f"**{a:.4f}**" if a < b else f"{a:.4f}"  # noqa: E731 (bold: beats the best solver)
        lines.append(f"| {r['target']} | {r['delta']} | {r['norm_ratio']:.2f} | "
                     f"{mark(r['delta_paired_mse@4'], r['best_paired_mse@4'])} | {r['best_paired_mse@4']:.4f} | "
                     f"{mark(r['delta_paired_mse@8'], r['best_paired_mse@8'])} | {r['best_paired_mse@8']:.4f} |")
    lines += ["", "Bold: better than the target's best solver at the same evaluations.", "",
              f"Time: {result['seconds']} s on {args.threads} thread(s), torch {torch.__version__}."]
    write_text(Path(args.out + ".md"), "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
