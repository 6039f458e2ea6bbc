"""Adaptation without the target's own data: which training states does `perflow delta adapt` need?

A user who downloads a LoRA or a fine-tuned checkpoint seldom has the images it was trained on. This
benchmark adapts the digits delta to derived models of the teacher (``transfer.py``'s variants: a
full-strength peft LoRA and a full fine-tune, both on thick-stroke digits) with three sources of the
windows' starting states:

- ``own data``: the variant's own style (thick-stroke digits), what the transfer benchmark uses;
- ``base data``: the base model's data (thin digits), what a user without the variant's data has;
- ``data-free``: no images at all, every window starting where the student's own K-step sampler
  reaches it from noise (``student_starts 1``), the images replaced by zeros (only their labels, the
  conditions, are read): ``perflow delta adapt --data-free``.

For each: the 4-step paired MSE of each check against the target's best 4-evaluation solver, and the
steps to beat it. Commands and results: docs/delta.md ("Adaptation without the target's data").

    perflow train --config digits --max_steps 600 --output_dir runs/digits_default_noramp --threads 1 \
        --validation_every 0 --tracker none
    python benchmarks/adapt_data.py --perflow-run runs/digits_default_noramp --check-every 5 --budget-steps 60 \
        --threads 1 --out benchmarks/results/adapt_data
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from transfer import RESULTS, make_variants, thick_dataset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--perflow-run", required=True, help="a `perflow train --config digits` output folder (delta.safetensors)")
    p.add_argument("--teacher", default="digits")
    p.add_argument("--lora-ranks", type=lambda s: [int(x) for x in s.split(",") if x], default=[4])
    p.add_argument("--lora-steps", type=int, default=300)
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--strengths", type=lambda s: [(int(a), float(b)) for a, b in (x.split(":") for x in s.split(",") if x)],
                   default=[(400, 2e-4)], help="full fine-tunes, steps:lr,...")
    p.add_argument("--sources", default="own,base,free", help="comma list of own, base, free")
    p.add_argument("--budget-steps", type=int, default=60)
    p.add_argument("--check-every", type=int, default=20)
    p.add_argument("--adapt-samples", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "adapt_data"), help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    args.lora_scales, args.controlnet_steps = [1.0], 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from perflow.builtin.classifier import WEIGHTS_DIR
    from perflow.delta import load_delta
    from perflow.io import read_json, write_text
    from perflow.targets import Target
    from perflow.training.adapt import adapt_delta
    from perflow.training.teachers import load_teacher

    t_start = time.time()
    run = Path(args.perflow_run)
    delta, meta = load_delta(run / "delta.safetensors")
    summary = read_json(run / "perflow_training.json")
    teacher = load_teacher(args.teacher)
    recipe = summary["config"]
    variants = [v for v in make_variants(teacher, args, delta) if v["kind"] != "teacher"]
    work = Path(tempfile.mkdtemp(prefix="perflow-adapt-data-"))
    rows = []
    for v in variants:
        target = Target(teacher=v["teacher"], name=v["name"])
        for source in [s for s in args.sources.split(",") if s]:
            t0 = time.time()
            kw = {"own": {"dataset": thick_dataset()}, "base": {"dataset": None},
                  "free": {"dataset": None, "data_free": True}}[source]
            res = adapt_delta((delta, meta), target, work / f"{len(rows)}", config=recipe, budget_steps=args.budget_steps,
                              check_every=args.check_every, num_samples=args.adapt_samples,
                              eval_kwargs={"classifier": str(WEIGHTS_DIR), "seed": args.seed}, progress=False,
                              tracker="none", **kw)
            first = next((c for c in res.checks if c["beats"]), None)
            rows.append({"variant": v["name"], "rel_size": v["rel_size"], "source": source, "checks": res.checks,
                         "baseline": res.baseline, "steps_to_reach": None if first is None else first["step"],
                         "seconds": round(time.time() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
    result = {"command": "python " + shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
              "delta_run": str(run), "delta_steps": int(summary["global_step"]), "check_every": args.check_every,
              "budget_steps": args.budget_steps, "adapt_samples": args.adapt_samples, "threads": args.threads,
              "torch": torch.__version__, "seconds": round(time.time() - t_start, 1), "rows": rows}
    write_text(Path(args.out + ".json"), json.dumps(result, indent=1, default=float))
    md = markdown(result)
    write_text(Path(args.out + ".md"), md)
    print(md)
    return 0


SOURCES = {"own": "the variant's own data (thick digits)", "base": "the base model's data (thin digits)",
           "free": "data-free (student starts, no images)"}


def markdown(r: dict) -> str:
    lines = ["# Adaptation without the target's own data", "", f"Command: `{r['command']}`", "",
             f"Delta: {r['delta_run']} ({r['delta_steps']} PeRFlow steps). Each row: `perflow delta adapt` on the variant "
             f"with a budget of {r['budget_steps']} steps, checked every {r['check_every']} steps on {r['adapt_samples']} "
             "samples (4-step paired MSE to the variant's own 100-step DDIM output, the same noise and labels each "
             "check); `best own` = the variant's best 4-evaluation solver (DDIM, DPM-Solver++, UniPC, best timestep "
             "spacing) on the same samples.", "",
             "| variant | rel. size | states from | best own@4 | checks (step: MSE@4) | steps to beat it |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in r["rows"]:
        checks = ", ".join(f"{c['step']}: {c['paired_mse']:.4f}" for c in row["checks"])
        reach = "not in budget" if row["steps_to_reach"] is None else str(row["steps_to_reach"])
        lines.append(f"| {row['variant']} | {row['rel_size']:.1f} | {SOURCES[row['source']]} | "
                     f"{row['baseline']['paired_mse']:.4f} ({row['baseline']['solver']}) | {checks} | {reach} |")
    lines += ["", f"Time: {r['seconds']:.0f} s on {r['threads']} thread(s), torch {r['torch']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
