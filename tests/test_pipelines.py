"""PeRFlowScheduler inside diffusers pipelines (tiny SD1.5 / SDXL / ControlNet architectures, offline).

Beyond "it runs": the pipelines' latents must equal a loop written here with the scheduler, which
catches a pipeline scaling or offsetting the latents or the timesteps behind the scheduler's back.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from perflow import PeRFlowScheduler
from perflow.tiny import tiny_controlnet, tiny_sd15_pipeline, tiny_sdxl_pipeline

PROMPT = "a photo of a cat"
SIZE = 32  # pixels; the tiny VAE downsamples by 2 -> 16x16 latents
STEPS = 4


def perflow_pipe(pipe, prediction_type: str = "diff_eps"):
    pipe.scheduler = PeRFlowScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def initial_latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(seed))


class UNetRecorder:
    """Records every UNet call of a pipeline: (input latents, timestep, output)."""

    def __init__(self, unet):
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.handle = unet.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        out = output[0] if isinstance(output, tuple) else output.sample
        self.calls.append((sample.detach().clone(), torch.as_tensor(timestep).clone(), out.detach().clone()))


def replay(calls, scheduler: PeRFlowScheduler, latents: torch.Tensor) -> torch.Tensor:
    """The sampling loop by hand: each UNet input must be the previous step's result, from `latents`."""
    scheduler.set_timesteps(STEPS)
    assert [int(t) for _, t, _ in calls] == scheduler.timesteps.tolist()
    z = latents
    for sample, t, out in calls:
        torch.testing.assert_close(sample, z, rtol=0, atol=0)
        z = scheduler.step(out, t, z).prev_sample
    return z


def test_sd15_pipeline_equals_hand_written_loop_with_cfg():
    pipe = perflow_pipe(tiny_sd15_pipeline())
    latents = initial_latents()
    got = pipe(
        PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, guidance_scale=7.5,
        latents=latents.clone(), output_type="latent",
    ).images
    # by hand: the UNet on (uncond, cond), classifier-free guidance, the scheduler's step
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    embeddings = torch.cat([uncond, cond])
    sched = PeRFlowScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(STEPS)
    assert sched.timesteps.tolist() == [1000, 750, 500, 250]
    z = latents
    with torch.no_grad():
        for t in sched.timesteps:
            e_u, e_c = pipe.unet(torch.cat([z, z]), t, encoder_hidden_states=embeddings).sample.chunk(2)
            z = sched.step(e_u + 7.5 * (e_c - e_u), t, z).prev_sample
    torch.testing.assert_close(got, z, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("which", ["sd15", "sdxl", "controlnet"])
def test_pipelines_sample_finite_images_and_follow_the_scheduler(which):
    if which == "sdxl":
        pipe = perflow_pipe(tiny_sdxl_pipeline(), "ddim_eps")
        extra = {}
    elif which == "sd15":
        pipe = perflow_pipe(tiny_sd15_pipeline())
        extra = {}
    else:
        from diffusers import StableDiffusionControlNetPipeline

        base = tiny_sd15_pipeline()
        pipe = perflow_pipe(
            StableDiffusionControlNetPipeline(
                vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
                controlnet=tiny_controlnet(base.unet), scheduler=base.scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
        )
        extra = {"image": torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))}
    latents = initial_latents()
    recorder = UNetRecorder(pipe.unet)
    kwargs = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, latents=latents.clone(), **extra)
    images = pipe(PROMPT, guidance_scale=1.0, output_type="latent", **kwargs).images
    expected = replay(recorder.calls, PeRFlowScheduler.from_config(pipe.scheduler.config), latents)
    torch.testing.assert_close(images, expected, rtol=0, atol=0)
    recorder.handle.remove()
    rgb = pipe(PROMPT, guidance_scale=2.0, output_type="np", **kwargs).images
    assert rgb.shape == (1, SIZE, SIZE, 3) and np.isfinite(rgb).all()


def test_saved_pipeline_reloads_its_scheduler(tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = tiny_sd15_pipeline()
    pipe.scheduler = PeRFlowScheduler.from_config(
        pipe.scheduler.config, prediction_type="ddim_eps", window_boundaries=[1.0, 0.6, 0.3, 0.0]
    )
    pipe.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "PeRFlowScheduler"
    sched = PeRFlowScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert sched.config.prediction_type == "ddim_eps" and sched.boundaries.tolist() == [1.0, 0.6, 0.3, 0.0]
    # the whole pipeline reloads with it too (model_index.json names the perflow package)
    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(reloaded.scheduler, PeRFlowScheduler)
    assert reloaded.scheduler.config.window_boundaries == [1.0, 0.6, 0.3, 0.0]
