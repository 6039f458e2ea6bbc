"""Plug-and-play on the built-in digits teacher: does a PeRFlow delta accelerate a fine-tuned variant?

1. PeRFlow delta on the original digits teacher: taken from a ``perflow train`` run
   (``--perflow-run DIR`` with ``delta.safetensors``; its recorded teacher hash must match the
   current teacher) or trained here (``--perflow-steps``, recipe ``digits``).
2. A *variant*: a copy of the teacher fine-tuned with the ordinary diffusion (epsilon) loss on a
   visibly different style of the same data, thick strokes (each digit grey-dilated 2x2), for
   ``--finetune-steps`` steps. Only the UNet changes; the label encoder is shared.
3. ``variant + delta`` (``merge_delta``) sampled with the PeRFlow scheduler at 4 and 8 steps,
   against the variant itself with DDIM and DPM-Solver++ at 4 and 8 steps; the reference is the
   variant's own 100-step DDIM samples from the same noise and labels. A control row,
   ``teacher + delta`` (the original PeRFlow student, which never saw thick strokes), shows what
   the delta alone gives.

Metrics (``perflow.evaluation``): ``paired_mse`` to the variant's 100-step samples, Fréchet
distance of the digit classifier's features to the held-out *thick* digits, label accuracy,
and ``ink`` (fraction of pixels above 0, the stroke-thickness the style changes).

    python benchmarks/plug_and_play.py --threads 1          # trains both (~10 min on 2 shared cores)
    python benchmarks/plug_and_play.py --perflow-run perflow-digits   # reuse a trained student
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def thick_digits(split: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits with strokes thickened by a 2x2 grey dilation, in ``[-1, 1]`` (N, 1, H, W)."""
    from scipy.ndimage import grey_dilation

    from perflow.builtin.digits import digits_tensors

    images, labels = digits_tensors(split, image_size)
    thick = torch.stack([torch.from_numpy(grey_dilation(im[0].numpy(), size=(2, 2))) for im in images])
    return thick.unsqueeze(1).float(), labels


def ink(x: torch.Tensor) -> float:
    """Fraction of pixels above 0 (mid-grey): how much of the image the strokes cover."""
    return float((x.float() > 0).float().mean())


def finetune_variant(teacher, teacher_name: str, steps: int, batch_size: int, lr: float, seed: int, image_size: int):
    """Copy of the teacher UNet fine-tuned on thick digits with the epsilon loss (labels dropped 10 %)."""
    images, labels = thick_digits("train", image_size)
    unet = copy.deepcopy(teacher.unet).train().float().requires_grad_(True)
    losses = epsilon_finetune(unet, list(unet.parameters()), teacher, teacher_name, images, labels, steps, batch_size,
                              lr, seed, desc="fine-tune variant (thick strokes)")
    return unet.eval(), losses


def epsilon_finetune(model, params: list, teacher, teacher_name: str, images: torch.Tensor, labels: torch.Tensor,
                     steps: int, batch_size: int, lr: float, seed: int, control=None, desc: str = "fine-tune") -> list[float]:
    """Train ``params`` of ``model(z_t, t, cond, [control image]) -> eps`` with the diffusion (epsilon) loss on
    ``images``/``labels`` (labels dropped to the null label 10 % of the time), AdamW, clipping 1.0.

    ``control``: ``fn(x0) -> control image`` for a ControlNet (then ``model`` takes it as a 4th argument)."""
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    from perflow.evaluation.digits import teacher_scheduler_config

    enc = teacher.label_encoder
    noise_sched = DDPMScheduler.from_config(teacher_scheduler_config(teacher_name))
    if noise_sched.config.prediction_type != "epsilon":
        raise ValueError("the fine-tune here assumes an epsilon-prediction digits teacher")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(steps), desc=desc):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=g)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(batch_size, generator=g) < 0.1] = enc.null_label
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,), generator=g)
        zt = noise_sched.add_noise(x0, noise, t)
        with torch.no_grad():
            cond = enc(y)
        out = model(zt, t, cond) if control is None else model(zt, t, cond, control(x0))
        loss = torch.nn.functional.mse_loss(out.sample if hasattr(out, "sample") else out, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


def perflow_delta(args, teacher_name: str):
    """``(delta, metadata, source)``: from ``--perflow-run`` or a fresh ``perflow train`` run."""
    from perflow.delta import load_delta, weights_sha256
    from perflow.training.teachers import load_teacher

    if args.perflow_run:
        run = Path(args.perflow_run)
        if (run / "delta.safetensors").is_file():
            delta, meta = load_delta(run / "delta.safetensors")
            source = f"perflow train run {args.perflow_run}"
        else:  # a student folder without a saved delta: extract it (perflow delta extract)
            from perflow.delta import extract_from_folders
            from perflow.training.teachers import BUILTIN_TEACHERS, builtin_teacher_path

            teacher_dir = builtin_teacher_path(teacher_name) if teacher_name in BUILTIN_TEACHERS else Path(teacher_name)
            out = Path(tempfile.mkdtemp(prefix="perflow-pnp-")) / "delta.safetensors"
            delta, meta = extract_from_folders(run, teacher_dir, out, cfg_mode="sync")
            source = f"perflow delta extract --student {args.perflow_run} --teacher {teacher_dir}"
    else:
        from perflow.training import train

        out = Path(tempfile.mkdtemp(prefix="perflow-pnp-"))
        result = train("digits", max_steps=args.perflow_steps, output_dir=str(out), validation_every=0,
                       checkpoint_every=0, tracker="none", seed=args.seed, **{"model.teacher": teacher_name})
        delta, meta = load_delta(result.files["delta"])
        source = f"perflow train --config digits --max_steps {args.perflow_steps} (trained by this script)"
        print(f"PeRFlow student and delta kept in {out} (reuse with --perflow-run {out})")
    teacher = load_teacher(teacher_name)
    recorded = (meta.get("base_model") or {}).get("weights_sha256")
    current = weights_sha256(teacher.unet.state_dict())
    if recorded is not None and recorded != current:
        raise ValueError(
            f"the delta was learned on a different digits teacher (weights {recorded}, current {current}); "
            "retrain it (drop --perflow-run) or point at a run on the current teacher"
        )
    return delta, meta, source


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="digits", help="class-conditional teacher folder or built-in name")
    p.add_argument("--perflow-run", help="a `perflow train --config digits` output folder (with delta.safetensors)")
    p.add_argument("--perflow-steps", type=int, default=300, help="PeRFlow steps when training the delta here")
    p.add_argument("--finetune-steps", type=int, default=400, help="fine-tuning steps of the thick-stroke variant")
    p.add_argument("--finetune-lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--steps", default="4,8", help="sampling steps to compare")
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--lora-ranks", default="16", help="also test the delta as a LoRA of these ranks (+ its rest), e.g. 4,16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "plug_and_play"), help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from perflow.builtin.classifier import load_digit_classifier
    from perflow.delta import merge_delta, perflow_scheduler_from_metadata
    from perflow.evaluation import metrics
    from perflow.evaluation.digits import class_model_fn, teacher_scheduler_config
    from perflow.evaluation.harness import Metrics, Sampler, compare_samplers
    from perflow.io import write_text
    from perflow.evaluation.samplers import baseline_scheduler
    from perflow.training.teachers import load_teacher

    t_start = time.time()
    steps = tuple(int(s) for s in args.steps.split(","))
    teacher = load_teacher(args.teacher)
    size = teacher.unet.config.sample_size
    delta, meta, delta_source = perflow_delta(args, args.teacher)
    t_delta = time.time() - t_start

    t0 = time.time()
    variant, ft_losses = finetune_variant(teacher, args.teacher, args.finetune_steps, args.batch_size, args.finetune_lr,
                                          args.seed, size)
    t_finetune = time.time() - t0
    variant_plus_delta = merge_delta(copy.deepcopy(variant), delta)
    teacher_plus_delta = merge_delta(copy.deepcopy(teacher.unet), delta)

    gen = torch.Generator().manual_seed(args.seed + 1)
    noise = torch.randn(args.num_samples, teacher.unet.config.in_channels, size, size, generator=gen)
    labels = torch.arange(args.num_samples) % 10
    enc = teacher.label_encoder
    w = args.guidance_scale
    sched_cfg = teacher_scheduler_config(args.teacher)
    make_perflow = lambda: perflow_scheduler_from_metadata(meta)  # noqa: E731
    variant_fn = class_model_fn(variant, enc, labels, w)
    lora_errors: dict[int, float] = {}
    samplers = [
        Sampler("variant + delta (PeRFlow)", class_model_fn(variant_plus_delta, enc, labels, w), make_perflow, "perflow"),
        Sampler("teacher + delta (control: no fine-tune)", class_model_fn(teacher_plus_delta, enc, labels, w),
                make_perflow, "perflow"),
        Sampler("variant ddim", variant_fn, lambda: baseline_scheduler("ddim", sched_cfg)),
        Sampler("variant dpmsolver++", variant_fn, lambda: baseline_scheduler("dpmsolver++", sched_cfg)),
    ]
    for rank in [int(r) for r in args.lora_ranks.split(",") if r]:
        from perflow.delta import delta_to_lora, lora_to_delta

        export = delta_to_lora(delta, rank, model=teacher.unet, progress=False)
        low = {**lora_to_delta(export.lora), **export.rest}
        unet_r = merge_delta(copy.deepcopy(variant), low)
        samplers.insert(1, Sampler(f"variant + LoRA r={rank} + rest (PeRFlow)", class_model_fn(unet_r, enc, labels, w),
                                   make_perflow, "perflow"))
        lora_errors[rank] = export.overall_error(rank, rest="stored")
    reference = Sampler("variant ddim", variant_fn, lambda: baseline_scheduler("ddim", sched_cfg), "reference")

    classifier = load_digit_classifier()
    csize = classifier.config.image_size

    def to_classifier(x: torch.Tensor) -> torch.Tensor:
        x = x.float().clamp(-1, 1)
        if x.shape[-1] != csize:
            x = torch.nn.functional.interpolate(x, size=(csize, csize), mode="bilinear", align_corners=False)
        return x

    t0 = time.time()
    with torch.no_grad():
        from perflow.builtin.digits import digits_tensors

        thick_test, _ = thick_digits("test", csize)
        thin_test, _ = digits_tensors("test", csize)
        def measure(real: torch.Tensor) -> Metrics:
            """Digit metrics against the classifier features of the real images ``real``."""
            return Metrics(
                decode=lambda z: z.float().clamp(-1, 1), feature_fn=lambda x: classifier.features(to_classifier(x)),
                real_features=classifier.features(real), classify_fn=lambda x: classifier(to_classifier(x)),
                labels=labels, extra={"ink": ink},
            )

        # transfer: the variant with the delta vs the variant's own solvers (FD to thick test digits)
        result = compare_samplers(samplers, reference, noise, steps, 100, measure(thick_test))
        # in distribution: the delta on the teacher it was learned on (FD to the usual thin test digits)
        teacher_fn = class_model_fn(teacher.unet, enc, labels, w)
        ddim = lambda: baseline_scheduler("ddim", sched_cfg)  # noqa: E731
        in_dist = compare_samplers(
            [Sampler("teacher + delta (PeRFlow)", class_model_fn(teacher_plus_delta, enc, labels, w), make_perflow,
                     "perflow"),
             Sampler("teacher ddim", teacher_fn, ddim),
             Sampler("teacher dpmsolver++", teacher_fn, lambda: baseline_scheduler("dpmsolver++", sched_cfg))],
            Sampler("teacher ddim", teacher_fn, ddim, "reference"), noise, steps, 100, measure(thin_test))
        context = {
            "ink_real_thin_test": ink(thin_test),
            "ink_real_thick_test": ink(thick_test),
            "fd_real_thin_test_to_thick_test": metrics.frechet_distance_features(
                classifier.features(thin_test), classifier.features(thick_test)),
        }
    t_eval = time.time() - t0

    order = lambda r: (r["kind"] != "reference", r["steps"], r["sampler"])  # noqa: E731
    rows, in_rows = sorted(result.rows, key=order), sorted(in_dist.rows, key=order)
    report = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "delta_source": delta_source,
        "delta_metadata": {k: meta.get(k) for k in ("num_time_windows", "prediction_type", "cfg_mode")},
        "finetune": {"steps": args.finetune_steps, "lr": args.finetune_lr, "batch_size": args.batch_size,
                     "final_loss_mean_last_50": sum(ft_losses[-50:]) / max(1, len(ft_losses[-50:]))},
        "num_samples": args.num_samples, "guidance_scale": w, "steps": list(steps),
        "seconds": {"delta": round(t_delta, 1), "finetune": round(t_finetune, 1), "evaluation": round(t_eval, 1),
                    "total": round(time.time() - t_start, 1)},
        "threads": args.threads, "torch": torch.__version__,
        "context": context,
        "lora_relative_error_of_delta": lora_errors,
        "rows": rows,
        "in_distribution_rows": in_rows,
        "straightness": {**result.meta.get("straightness", {}), **in_dist.meta.get("straightness", {})},
    }
    md = markdown(report)
    write_text(Path(args.out).with_suffix(".json"), json.dumps(report, indent=2, default=float))
    write_text(Path(args.out).with_suffix(".md"), md)
    print(md)
    return 0


def _table(rows: list[dict], ref: str, fd_to: str) -> list[str]:
    cols = [("sampler", "sampler", "{}"), ("steps", "steps", "{}"), ("nfe", "NFE", "{}"),
            ("paired_mse", f"MSE to {ref} (lower)", "{:.4f}"), ("fd", f"FD to {fd_to} (lower)", "{:.3f}"),
            ("accuracy", "label accuracy", "{:.3f}"), ("ink", "ink", "{:.3f}")]
    out = ["| " + " | ".join(c[1] for c in cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for r in rows:
        out.append("| " + " | ".join("-" if r.get(k) is None else f.format(r[k]) for k, _, f in cols) + " |")
    return out


def markdown(report: dict) -> str:
    c = report["context"]
    lines = ["# Plug-and-play: PeRFlow delta on a fine-tuned digits variant", "",
             f"Command: `{report['command']}`", "",
             f"Delta: {report['delta_source']} ({report['delta_metadata']}). Variant: teacher fine-tuned "
             f"{report['finetune']['steps']} steps on 2x2-dilated (thick-stroke) digits "
             f"(lr {report['finetune']['lr']}, batch {report['finetune']['batch_size']}). "
             f"{report['num_samples']} samples, guidance {report['guidance_scale']}, the same noise and labels for "
             "every row. `ink` = fraction of pixels above mid-grey (the stroke thickness the variant changes): "
             f"real test digits {c['ink_real_thin_test']:.3f} thin, {c['ink_real_thick_test']:.3f} thick; "
             f"FD between real thin and thick test digits {c['fd_real_thin_test_to_thick_test']:.3f}.",
             "", "## Transfer: variant + delta vs the variant's own solvers", "",
             "Reference: the variant's 100-step DDIM samples. `teacher + delta` (the PeRFlow student of the "
             "original teacher, never fine-tuned) is the control: what the delta gives without the variant.", ""]
    lines += _table(report["rows"], "variant@100", "thick test digits")
    lines += ["", "## In distribution: the delta on the teacher it was learned on", "",
              "Reference: the original teacher's 100-step DDIM samples.", ""]
    lines += _table(report["in_distribution_rows"], "teacher@100", "thin test digits")
    if report["lora_relative_error_of_delta"]:
        errs = ", ".join(f"r={r}: {e:.4f}" for r, e in report["lora_relative_error_of_delta"].items())
        lines += ["", f"LoRA rows: relative error ||delta - (LoRA + rest)|| / ||delta|| = {errs}."]
    lines += ["", f"Time (s, {report['threads']} threads): {report['seconds']}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
