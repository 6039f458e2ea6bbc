"""Training throughput of piecewise reflow for K in {1, 2, 4} windows (prints measured figures).

For each K the teacher solves each sample's window with ``n`` DDIM steps. Two settings:

- ``--budget N`` (default 32): a fixed teacher budget over the whole trajectory, ``n = N / K``
  (the paper's point: K windows make each training sample K times cheaper than a full
  trajectory; docs/method.md, teacher window solve);
- ``--solver-steps n``: the same ``n`` for every K (cost per sample independent of K).

Teacher evaluations are counted, not computed: a hook on the teacher UNet counts the rows it
evaluates (grad disabled, so the student's own forward is not counted). Throughput is timed
over the steps after ``--warmup``. The device is accelerate's (a GPU when there is one).

    python benchmarks/train_throughput.py                      # built-in digits teacher, batch 64
    python benchmarks/train_throughput.py --teacher tiny-sd15  # tiny SD1.5 pipeline, VAE + text encoder
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def _teacher_and_data(name: str, resolution: int):
    if name == "digits":
        from perflow.builtin.digits import load_digits_dataset
        from perflow.training import load_teacher

        return load_teacher("digits"), load_digits_dataset("train", resolution), {"source": "digits"}
    if name == "tiny-sd15":
        from perflow.tiny import tiny_sd15_pipeline
        from perflow.training.teachers import teacher_from_pipeline

        g = torch.Generator().manual_seed(0)
        items = [{"pixel_values": torch.rand(3, resolution, resolution, generator=g) * 2 - 1, "caption": "a photo of a cat"}
                 for _ in range(512)]
        return teacher_from_pipeline(tiny_sd15_pipeline(seed=0)), items, {"source": "digits"}
    raise SystemExit(f"unknown teacher {name!r}; choose digits or tiny-sd15")


def measure(teacher_name: str, K: int, n: int, batch_size: int, steps: int, warmup: int, resolution: int,
            mixed_precision: str) -> dict:
    from perflow.training import train

    teacher, data, _ = _teacher_and_data(teacher_name, resolution)
    evaluated = {"rows": 0}

    def count(module, args, kwargs):
        if not torch.is_grad_enabled():
            evaluated["rows"] += args[0].shape[0]

    handle = teacher.unet.register_forward_pre_hook(count, with_kwargs=True)
    stamps: list[float] = []

    def cb(step: int, loss: float) -> None:
        if step == warmup:
            evaluated["rows"] = 0
        stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        res = train(
            "digits", teacher=teacher, dataset=data, callback=cb, max_steps=warmup + steps, batch_size=batch_size,
            num_time_windows=K, num_solver_steps=n, output_dir=out, checkpoint_every=0, validation_every=0,
            tracker="none", progress=False, save_delta=False, resolution=resolution, mixed_precision=mixed_precision,
            caption_dropout=0.0, learning_rate=1e-5,
        )
    handle.remove()
    seconds = stamps[-1] - stamps[warmup - 1]
    samples = steps * batch_size * res.num_processes
    return {"K": K, "n": n, "samples_per_s": samples / seconds, "teacher_evals_per_sample": evaluated["rows"] / samples,
            "s_per_step": seconds / steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="digits", choices=["digits", "tiny-sd15"])
    p.add_argument("--budget", type=int, default=32, help="teacher steps over the whole trajectory: n = budget / K")
    p.add_argument("--solver-steps", type=int, default=None, help="fixed n for every K (overrides --budget)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--resolution", type=int, default=None, help="default: 8 (digits), 32 (tiny-sd15)")
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    resolution = args.resolution or (8 if args.teacher == "digits" else 32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"teacher={args.teacher} resolution={resolution} batch={args.batch_size} device={name} "
          f"mixed_precision={args.mixed_precision}")
    print(f"{'K':>2} {'n':>3} {'samples/s':>10} {'s/step':>8} {'teacher evals/sample':>21}")
    for K in (1, 2, 4):
        n = args.solver_steps or max(1, args.budget // K)
        r = measure(args.teacher, K, n, args.batch_size, args.steps, args.warmup, resolution, args.mixed_precision)
        print(f"{r['K']:>2} {r['n']:>3} {r['samples_per_s']:>10.1f} {r['s_per_step']:>8.3f} {r['teacher_evals_per_sample']:>21.2f}")


if __name__ == "__main__":
    main()
