"""Micro-benchmark: PeRFlowScheduler.step time against one SD1.5 UNet forward pass.

Builds an SD1.5-configured ``UNet2DConditionModel`` (860M parameters, random weights, no
download), times one forward pass on SD1.5-sized latents (1, 4, 64, 64) with (1, 77, 768) text
embeddings, then times ``step`` for each prediction type (K = 4, 4 steps, every scheduled
timestep) and prints medians and the ratio. Run from the repository root::

    python benchmarks/scheduler_step.py [--unet-repeats 3] [--step-repeats 200] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from perflow import PeRFlowScheduler

PREDICTION_TYPES = ("diff_eps", "ddim_eps", "velocity")


def sd15_unet():
    """SD1.5's UNet configuration (runwayml/stable-diffusion-v1-5 unet/config.json), random weights."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, repeats: int, device: torch.device, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet-repeats", type=int, default=3, help="timed UNet forward passes (after 1 warm-up)")
    parser.add_argument("--step-repeats", type=int, default=200, help="timed sampling loops per prediction type")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU threads")

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 64, 64, generator=g).to(device)  # (B, C, H, W) SD1.5 at 512 px
    text = torch.randn(1, 77, 768, generator=g).to(device)  # (B, tokens, width) CLIP ViT-L/14

    t0 = time.perf_counter()
    torch.manual_seed(0)
    unet = sd15_unet().to(device)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"SD1.5 UNet built from config: {n_params / 1e6:.0f}M parameters in {time.perf_counter() - t0:.1f} s")
    timestep = torch.tensor(750, device=device)
    with torch.no_grad():
        unet_s = median_seconds(
            lambda: unet(latents, timestep, encoder_hidden_states=text).sample, args.unet_repeats, device
        )
    print(f"UNet forward, batch 1, 4x64x64, fp32: median {unet_s * 1e3:.0f} ms over {args.unet_repeats} runs")
    del unet

    out = torch.randn(1, 4, 64, 64, generator=g).to(device)
    worst = 0.0
    for prediction_type in PREDICTION_TYPES:
        sched = PeRFlowScheduler(prediction_type=prediction_type, num_time_windows=4)
        sched.set_timesteps(4, device=device)

        def loop():
            z = latents
            for t in sched.timesteps:
                z = sched.step(out, t, z).prev_sample

        step_s = median_seconds(loop, args.step_repeats, device, warmup=5) / len(sched.timesteps)
        worst = max(worst, step_s)
        print(
            f"step ({prediction_type:>8}, K=4, N=4): median {step_s * 1e6:7.1f} us per step "
            f"= {100 * step_s / unet_s:.4f} % of one UNet forward"
        )
    print(f"worst step / UNet forward: {100 * worst / unet_s:.4f} % (goal: under 1 %)")


if __name__ == "__main__":
    main()
