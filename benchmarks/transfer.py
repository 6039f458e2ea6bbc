"""Transfer benchmark: does the digits teacher's PeRFlow delta accelerate models derived from the teacher?

Derived models ("variants") of the built-in digits teacher, each made here:

- peft LoRA fine-tunes (ranks ``--lora-ranks``) on thick-stroke digits (a different style), fused;
- full fine-tunes on thick-stroke digits of increasing strength (``--strengths`` steps:lr), with the
  relative size ``||variant - teacher|| / ||delta||`` of each;
- a diffusers ``ControlNetModel`` trained on the teacher (frozen) with a low-resolution (4x4, nearest
  upsampled) version of the digit as its conditioning image, used with the accelerated UNet; and the same
  ControlNet on the first LoRA at full strength (a style LoRA and a ControlNet together, as users combine them).

For each, :func:`perflow.evaluation.transfer.transfer_report` (``perflow delta report``): target + delta
with the PeRFlow scheduler at 4 and 8 steps against the target's own DDIM / DPM-Solver++ / UniPC (best
timestep spacing) at the same evaluations, all against the target's own 100-step DDIM output from the same
noise and labels; then :func:`perflow.training.adapt.adapt_delta` (``perflow delta adapt``) with a budget of
``--adapt-fraction`` of the original PeRFlow run's steps, on the variant's own style of data (``--adapt-data own``)
or without images (``--adapt-data free``, ``perflow delta adapt --data-free``; a ControlNet target always adapts
data-free, on its control images). The full
report is also written for the 400-step thick-stroke variant (the one of ``plug_and_play.py``) before
and after adaptation.

    perflow train --config digits --max_steps 600 --window_weights none --solver_step_allocation equal \
        --learning_rate 3e-5 --last_window_fraction 1 --student_starts 0 --fidelity_check_every 0 --ema_ramp true \
        --output_dir runs/perflow_digits_600 --tracker none
    python benchmarks/transfer.py --perflow-run runs/perflow_digits_600 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from plug_and_play import epsilon_finetune, thick_digits

RESULTS = Path(__file__).resolve().parent / "results"


def low_res(x: torch.Tensor) -> torch.Tensor:
    """The ControlNet's conditioning image: the digit at 4x4 (average pooled), nearest-upsampled back (N, 1, H, W)."""
    small = torch.nn.functional.avg_pool2d(x, 2)
    return torch.nn.functional.interpolate(small, scale_factor=2, mode="nearest")


def rel_size(unet, teacher_unet, delta: dict) -> float:
    """``||variant - teacher|| / ||delta||`` over the UNet tensors."""
    v, t = unet.state_dict(), teacher_unet.state_dict()
    num = math.sqrt(sum(float((v[k].double() - t[k].double()).pow(2).sum()) for k in t if t[k].is_floating_point()))
    den = math.sqrt(sum(float(d.double().pow(2).sum()) for d in delta.values()))
    return num / den


def thick_dataset():
    from perflow.builtin.digits import DigitsDataset

    ds = DigitsDataset("train", 8)
    ds.images, ds.labels = thick_digits("train", 8)
    return ds


def make_variants(teacher, args, delta: dict) -> list[dict]:
    """The derived models: ``{"name", "kind", "teacher", "rel_size", "control_images", "seconds", ...}``."""
    from perflow.targets import ControlledUNet
    from perflow.training.teachers import ClassConditionalTeacher

    images, labels = thick_digits("train", 8)
    out = [{"name": "the teacher itself (control: no fine-tune)", "kind": "teacher", "teacher": teacher, "rel_size": 0.0,
            "final_loss": None, "seconds": 0.0, "style": "thin"}]

    def wrap(unet, name):
        return ClassConditionalTeacher(unet.eval().requires_grad_(False), teacher.scheduler_config, teacher.label_encoder,
                                       name=f"digits {name}")

    for rank in args.lora_ranks:
        from peft import LoraConfig

        t0 = time.time()
        unet = copy.deepcopy(teacher.unet).float()
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
                                                    "conv1", "conv2"]))
        params = [p for n, p in unet.named_parameters() if "lora_" in n]
        unet.train()
        losses = epsilon_finetune(unet, params, teacher, args.teacher, images, labels, args.lora_steps, 64, args.lora_lr,
                                  args.seed, desc=f"LoRA r={rank} (thick strokes)")
        unet.fuse_lora()
        unet.unload_lora()
        fused = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        base = teacher.unet.state_dict()
        for scale in args.lora_scales:  # the LoRA at scale s: W + s B A (peft's lora_scale / set_adapters weight)
            scaled = copy.deepcopy(unet)
            scaled.load_state_dict({k: base[k].float() + scale * (fused[k] - base[k].float()) for k in fused})
            name = f"LoRA r={rank}, {args.lora_steps} steps lr {args.lora_lr}" + ("" if scale == 1.0 else f", scale {scale}")
            out.append({"name": name, "kind": "lora", "teacher": wrap(scaled, name), "rel_size": rel_size(scaled, teacher.unet, delta),
                        "final_loss": sum(losses[-50:]) / len(losses[-50:]), "seconds": time.time() - t0, "style": "thick"})
    for steps, lr in args.strengths:
        t0 = time.time()
        unet = copy.deepcopy(teacher.unet).train().float().requires_grad_(True)
        losses = epsilon_finetune(unet, list(unet.parameters()), teacher, args.teacher, images, labels, steps, 64, lr,
                                  args.seed, desc=f"full fine-tune {steps} steps lr {lr}")
        name = f"full fine-tune {steps} steps lr {lr}"
        out.append({"name": name, "kind": "finetune", "teacher": wrap(unet, name), "rel_size": rel_size(unet, teacher.unet, delta),
                    "final_loss": sum(losses[-50:]) / len(losses[-50:]), "seconds": time.time() - t0, "style": "thick"})
    if args.controlnet_steps:
        from diffusers import ControlNetModel

        from perflow.builtin.digits import digits_tensors

        t0 = time.time()
        torch.manual_seed(args.seed)
        cn = ControlNetModel.from_unet(teacher.unet, conditioning_channels=1, conditioning_embedding_out_channels=(16,))
        cn.train().requires_grad_(True)
        thin, thin_labels = digits_tensors("train", 8)
        model = ControlledUNet(teacher.unet, cn)
        losses = epsilon_finetune(model, list(cn.parameters()), teacher, args.teacher, thin, thin_labels,
                                  args.controlnet_steps, 64, args.controlnet_lr, args.seed, control=low_res,
                                  desc="ControlNet (low-res digit)")
        cn.eval().requires_grad_(False)
        name = f"ControlNet (4x4 digit), {args.controlnet_steps} steps lr {args.controlnet_lr}"
        ct = copy.copy(teacher)
        ct.unet = ControlledUNet(teacher.unet, cn).eval()
        test, test_labels = digits_tensors("test", 8)
        out.append({"name": name, "kind": "controlnet", "teacher": ct, "rel_size": None, "control_images": low_res(test),
                    "labels": [int(y) for y in test_labels], "final_loss": sum(losses[-50:]) / len(losses[-50:]),
                    "seconds": time.time() - t0, "style": "thin"})
        lora = next((v for v in out if v["kind"] == "lora" and ", scale" not in v["name"]), None)
        if lora is not None:  # the style LoRA at full strength with the ControlNet
            both = copy.copy(lora["teacher"])
            both.unet = ControlledUNet(lora["teacher"].unet, cn).eval()
            out.append({**out[-1], "name": f"{lora['name']} + the ControlNet", "teacher": both,
                        "rel_size": lora["rel_size"], "seconds": 0.0, "style": "thick"})
    return out


def summarise(result) -> dict:
    """The numbers of one transfer report: per step count, target + delta and the target's best solver."""
    from perflow.evaluation.transfer import DELTA_ROW, best_baseline

    row = {"transfers": result.meta["transfers"], "verdict": result.meta["verdict"]}
    for n in result.meta["steps"]:
        ours = result.row(DELTA_ROW, n)
        for metric in ("paired_mse", "sw_ref", "fd_ref", "accuracy"):
            row[f"delta_{metric}@{n}"] = ours.get(metric)
            best = best_baseline(result, n, metric if metric != "accuracy" else "paired_mse")
            if best is not None:
                row[f"best_{metric}@{n}"] = best.get(metric)
                if metric == "paired_mse":
                    row[f"best_solver@{n}"] = f"{best['sampler'].replace('target ', '')} [{best.get('spacing')}]"
    st = result.meta["straightness"]
    row["straightness_target"] = next(v["within_windows"] for k, v in st.items() if k.startswith("target ddim"))
    row["straightness_delta"] = next(v["within_windows"] for k, v in st.items() if k.startswith(DELTA_ROW))
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--perflow-run", required=True, help="a `perflow train --config digits` output folder (delta.safetensors)")
    p.add_argument("--teacher", default="digits")
    p.add_argument("--lora-ranks", type=lambda s: [int(x) for x in s.split(",") if x], default=[4, 16])
    p.add_argument("--lora-steps", type=int, default=400)
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--lora-scales", type=lambda s: [float(x) for x in s.split(",") if x], default=[1.0],
                   help="each LoRA is also used at these scales (W + s B A), e.g. 0.25,0.5,1")
    p.add_argument("--strengths", type=lambda s: [(int(a), float(b)) for a, b in (x.split(":") for x in s.split(",") if x)],
                   default=[(50, 1e-4), (200, 2e-4), (400, 2e-4), (800, 5e-4)], help="full fine-tunes, steps:lr,...")
    p.add_argument("--before-after", default="400:0.0002",
                   help="the full fine-tune (steps:lr) whose report is written before and after adaptation")
    p.add_argument("--controlnet-steps", type=int, default=300)
    p.add_argument("--controlnet-lr", type=float, default=5e-4)
    p.add_argument("--num-samples", type=int, default=256, help="samples of each transfer report")
    p.add_argument("--adapt-fraction", type=float, default=0.1, help="adaptation budget, a fraction of the run's steps")
    p.add_argument("--check-every", type=int, default=20)
    p.add_argument("--adapt-samples", type=int, default=128, help="samples of each adaptation check")
    p.add_argument("--adapt-data", choices=("own", "free"), default="own",
                   help="adaptation's training states: the variant's own style of digits, or data-free (no images: "
                        "perflow delta adapt --data-free); ControlNet targets always adapt data-free")
    p.add_argument("--no-adapt", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "transfer"), help="writes OUT.json, OUT.md and OUT_thick_*.png")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from perflow.builtin.classifier import WEIGHTS_DIR
    from perflow.delta import load_delta, weights_sha256
    from perflow.evaluation.transfer import TransferConfig, transfer_report
    from perflow.io import read_json, write_bytes, write_text
    from perflow.targets import Target
    from perflow.training.adapt import adapt_delta
    from perflow.training.teachers import load_teacher

    t_start = time.time()
    steps_lr = args.before_after.split(":")
    thick_reference = f"full fine-tune {int(steps_lr[0])} steps lr {float(steps_lr[1])}"
    run = Path(args.perflow_run)
    delta, meta = load_delta(run / "delta.safetensors")
    summary = read_json(run / "perflow_training.json")
    budget = int(summary["global_step"])
    teacher = load_teacher(args.teacher)
    if meta["base_model"]["weights_sha256"] != weights_sha256(teacher.unet.state_dict()):
        raise SystemExit("the delta was not learned on the current digits teacher: retrain it (see the docstring)")
    recipe = summary["config"]
    adapt_steps = max(args.check_every, int(args.adapt_fraction * budget))
    variants = make_variants(teacher, args, delta)
    work = Path(tempfile.mkdtemp(prefix="perflow-transfer-"))
    records = []
    for v in variants:
        target = Target(teacher=v["teacher"], name=v["name"], control_images=v.get("control_images"))
        labels = v.get("labels")
        t0 = time.time()
        report = transfer_report(TransferConfig(delta=(delta, meta), target=target, steps=(4, 8), num_samples=args.num_samples,
                                                labels=labels, classifier=str(WEIGHTS_DIR), seed=args.seed,
                                                output_dir=str(work / f"report-{len(records)}")), progress=False)
        rec = {"name": v["name"], "kind": v["kind"], "rel_size": v["rel_size"], "make_seconds": round(v["seconds"], 1),
               "make_final_loss": v["final_loss"], "report_seconds": round(time.time() - t0, 1), **summarise(report)}
        if v["name"] == thick_reference:
            rec["report_before"] = report.to_json_dict()
            write_bytes(Path(args.out + "_thick_before.png"), (work / f"report-{len(records)}" / "transfer_grid.png").read_bytes())
        if not args.no_adapt and v["kind"] != "teacher":
            t0 = time.time()
            free = args.adapt_data == "free" or v["kind"] == "controlnet"
            res = adapt_delta((delta, meta), target, work / f"adapt-{len(records)}", config=recipe,
                              budget_steps=adapt_steps, check_every=args.check_every, num_samples=args.adapt_samples,
                              dataset=thick_dataset() if v["style"] == "thick" and not free else None, data_free=free,
                              eval_kwargs={"classifier": str(WEIGHTS_DIR), "seed": args.seed,
                                           **({"labels": labels} if labels else {})},
                              progress=False, tracker="none")
            first = next((c for c in res.checks if c["beats"]), None)
            rec["adapt"] = {"budget_steps": adapt_steps, "data_free": free, "checks": res.checks, "baseline": res.baseline, "reached": res.reached,
                            "steps_to_reach": None if first is None else first["step"],
                            "fraction_of_original": None if first is None else first["step"] / budget,
                            "seconds": round(time.time() - t0, 1)}
            if v["name"] == thick_reference and res.delta is not None:
                adapted, adapted_meta = load_delta(res.delta)
                after = transfer_report(TransferConfig(delta=(adapted, adapted_meta), target=target, steps=(4, 8),
                                                       num_samples=args.num_samples, classifier=str(WEIGHTS_DIR),
                                                       seed=args.seed, output_dir=str(work / "report-thick-after")),
                                        progress=False)
                rec["report_after"] = after.to_json_dict()
                rec["after"] = summarise(after)
                write_bytes(Path(args.out + "_thick_after.png"), (work / "report-thick-after" / "transfer_grid.png").read_bytes())
        records.append(rec)
        print(f"{v['name']}: {rec['verdict']}", flush=True)

    result = {
        "command": "python " + shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "delta": {"run": str(run), "steps": budget, "metadata": {k: meta.get(k) for k in ("num_time_windows", "prediction_type", "cfg_mode")},
                  "train_seconds": summary.get("seconds"),
                  "recipe": {**recipe["training"], **{k: recipe["perflow"].get(k, RECIPE_FLAGS[k]) for k in
                                                      ("solver_step_allocation", "last_window_fraction", "student_starts")}}},
        "out": args.out, "num_samples": args.num_samples, "adapt_budget_steps": None if args.no_adapt else adapt_steps,
        "adapt_data": args.adapt_data,
        "check_every": args.check_every,
        "adapt_samples": args.adapt_samples, "threads": args.threads,
        "torch": torch.__version__, "seconds": round(time.time() - t_start, 1), "variants": records,
    }
    write_text(Path(args.out + ".json"), json.dumps(result, indent=1, default=float))
    md = markdown(result)
    write_text(Path(args.out + ".md"), md)
    print(md)
    return 0


def _f(x, fmt="{:.4f}") -> str:
    return "-" if x is None else fmt.format(x)


RECIPE_FLAGS = {"window_weights": "none", "solver_step_allocation": "equal", "learning_rate": 3e-5,
                "last_window_fraction": 1.0, "student_starts": 0.0, "fidelity_check_every": 0, "ema_ramp": True}
"""The delta run's settings the report spells out, with their values in runs made before each existed."""


def markdown(r: dict) -> str:
    lines = [
        "# Transfer benchmark: the digits PeRFlow delta on models derived from the teacher", "",
        f"Command: `{r['command']}`", "",
        f"Delta: `perflow train --config digits --max_steps {r['delta']['steps']} "
        + " ".join(f"--{k} {r['delta'].get('recipe', {}).get(k, v)}" for k, v in RECIPE_FLAGS.items())
        + f"` ({r['delta']['run']}, "
        f"{r['delta']['metadata']}). Each row: `perflow delta report` on the variant ({r['num_samples']} samples, "
        "labels 0-9 cycled (the ControlNet: the held-out digits' labels with their 4x4 versions as control images), "
        "reference: the variant's own 100-step DDIM from the same noise)"
        + ("" if r["adapt_budget_steps"] is None else
           f", and `perflow delta adapt` with a budget of {r['adapt_budget_steps']} PeRFlow steps "
           f"({100 * r['adapt_budget_steps'] / r['delta']['steps']:.0f} % of the original run), checked every "
           f"{r['check_every']} steps on {r['adapt_samples']} samples, "
           + ("data-free (`--data-free`: every window starting at the student's own sampler state, no images)"
              if r.get("adapt_data") == "free" else "trained on the variant's own style of digits")
           + " (a ControlNet target data-free, on its control images)")
        + ". LoRA rows with a scale: the LoRA at that scale (W + s B A). "
        "`best own` = the variant's best of DDIM / DPM-Solver++ / UniPC at that number of evaluations, each at its best "
        "timestep spacing (chosen on the same samples, which favours them). MSE = paired MSE to the reference; "
        "FD = Fréchet distance to the reference samples in the digit classifier's features; straightness within "
        "PeRFlow's 4 windows of the variant's own flow vs the variant + delta's.", "",
        "| variant | rel. size | MSE delta@4 | MSE best own@4 (solver) | MSE delta@8 | MSE best own@8 | FD delta@4 | FD best own@4 "
        "| straightness variant / +delta | transfers at 4 | adaptation: steps to beat best own@4 (of budget) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for v in r["variants"]:
        a = v.get("adapt", {})
        if v["kind"] == "teacher":
            adapt = "-"
        elif r["adapt_budget_steps"] is None:
            adapt = "not run (--no-adapt)"
        elif "not_run" in a:  # results written before ControlNet targets could be adapted
            adapt = "not run (ControlNet adaptation not supported)"
        elif v["transfers"]:
            adapt = "0 (not needed)"
        elif a.get("steps_to_reach") is not None:
            adapt = f"{a['steps_to_reach']} ({100 * a['fraction_of_original']:.1f} % of the original run)"
        else:
            last = a["checks"][-1] if a.get("checks") else {}
            adapt = f"not reached in {a.get('budget_steps')} (MSE@4 {_f(last.get('paired_mse'))} vs {_f(a.get('baseline', {}).get('paired_mse'))})"
        lines.append(
            f"| {v['name']} | {_f(v['rel_size'], '{:.3f}')} | {_f(v['delta_paired_mse@4'])} | {_f(v['best_paired_mse@4'])} "
            f"({v['best_solver@4']}) | {_f(v['delta_paired_mse@8'])} | {_f(v['best_paired_mse@8'])} | "
            f"{_f(v.get('delta_fd_ref@4'), '{:.2f}')} | {_f(v.get('best_fd_ref@4'), '{:.2f}')} | "
            f"{v['straightness_target']:.3f} / {v['straightness_delta']:.3f} | {'yes' if v['transfers'] else 'NO'} | {adapt} |")
    if any(v.get("adapt", {}).get("checks") for v in r["variants"]):
        lines += ["", "Adaptation checks (step: 4-step paired MSE), per variant:", ""]
    for v in r["variants"]:
        a = v.get("adapt", {})
        if a.get("checks"):
            lines.append(f"- {v['name']}: best own@4 {a['baseline']['solver']} {a['baseline']['paired_mse']:.4f}; "
                         + ", ".join(f"{c['step']}: {c['paired_mse']:.4f}" for c in a["checks"]) + f" ({a['seconds']} s)")
    thick = next((v for v in r["variants"] if "after" in v), None)
    if thick:
        grid = Path(r["out"]).name if r.get("out") else "transfer"   # the files main() wrote: OUT_thick_*.png
        lines += ["", f"## The thick-stroke variant ({thick['name']}) before and after adaptation", "",
                  f"Before: {thick['verdict']}", "", f"After: {thick['after']['verdict']}", "",
                  f"Sample grids: `{grid}_thick_before.png`, `{grid}_thick_after.png` (rows: the variant's reference, "
                  "variant + delta at 4 and 8 steps, the variant's best solver at 4 and 8)."]
    lines += ["", f"Time: {r['seconds']} s on {r['threads']} thread(s), torch {r['torch']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
