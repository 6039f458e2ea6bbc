"""Training PeRFlow students of flow-matching transformer teachers: tiny SD3 and Flux pipeline folders.

A few training steps from a pipeline folder (the teacher's kind read from ``model_index.json``), the
exported folder loads with ``DiffusionPipeline.from_pretrained`` with the PeRFlow scheduler and generates at
4 steps (text-to-image); the adapters' conditioning and packing are checked against the pipelines' own.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from perflow.scheduler import PeRFlowScheduler
from perflow.training import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    root.mkdir()
    lines = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
        lines.append(json.dumps({"file_name": f"{i:02d}.png", "text": f"a photo of a cat {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _settings(out, **kw):
    base = {
        "data.source": "imagefolder", "data.resolution": 16, "model.max_sequence_length": 8,
        "perflow.prediction_type": "velocity", "perflow.num_solver_steps": 2, "training.batch_size": 2,
        "training.max_steps": 2, "training.learning_rate": 1e-4, "training.lr_warmup_steps": 0,
        "output.output_dir": str(out), "output.checkpoint_every": 0, "output.validation_every": 0,
        "output.tracker": "none", "output.progress": False, "training.ema_decay": 0.0,
    }
    base.update(kw)
    return base


def _folder(family, tmp_path):
    from perflow.tiny import tiny_flux_pipeline, tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline() if family == "sd3" else tiny_flux_pipeline()
    folder = tmp_path / f"{family}-teacher"
    pipe.save_pretrained(folder)
    return pipe, folder


@pytest.mark.parametrize("family,extra", [
    ("sd3", {"perflow.cfg_mode": "fixed", "perflow.guidance_scale": 4.0, "data.caption_dropout": 0.5,
             "perflow.time_sampling": "logit_normal"}),
    ("flux", {"perflow.embedded_guidance": 2.5}),
])
def test_train_from_a_pipeline_folder_exports_a_loadable_pipeline(family, extra, image_folder, tmp_path):
    from diffusers import DiffusionPipeline

    pipe, folder = _folder(family, tmp_path)
    out = tmp_path / "out"
    result = train(None, **_settings(out, **{"model.teacher": str(folder), "data.path": str(image_folder),
                                             "output.validation_every": 2, "output.validation_steps": 4, **extra}))
    assert (out / "validation" / "step-0000002.png").is_file()  # the student's 4-step preview grid
    assert result.teacher.kind == family and len(result.losses) == 2 and all(np.isfinite(result.losses))
    assert result.teacher_evals_per_sample == (4 if family == "sd3" else 2)
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file() and not (out / "unet").exists()
    loaded = DiffusionPipeline.from_pretrained(out)
    assert type(loaded).__name__ == type(pipe).__name__
    assert isinstance(loaded.scheduler, PeRFlowScheduler)
    assert loaded.scheduler.config.schedule_kind == "flow_matching" and loaded.scheduler.config.prediction_type == "velocity"
    assert loaded.scheduler.config.use_dynamic_shifting == (family == "flux")
    trained = result.student.state_dict()
    assert all(torch.equal(loaded.transformer.state_dict()[k], v) for k, v in trained.items())
    assert any(not torch.equal(pipe.transformer.state_dict()[k], v) for k, v in trained.items())  # it did train
    from perflow.delta import load_delta

    _, meta = load_delta(out / "delta.safetensors")
    assert meta["base_model"]["class"] == type(pipe.transformer).__name__ and meta["prediction_type"] == "velocity"
    kw = {"guidance_scale": 2.5} if family == "flux" else {"guidance_scale": 1.5}
    images = loaded("a photo of a cat", num_inference_steps=4, height=16, width=16, max_sequence_length=8,
                    output_type="np", generator=torch.Generator().manual_seed(0), **kw).images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()
    # image-to-image from the same folder: the img2img pipeline with the loaded PeRFlow scheduler
    from diffusers import FluxImg2ImgPipeline, StableDiffusion3Img2ImgPipeline

    i2i_cls = StableDiffusion3Img2ImgPipeline if family == "sd3" else FluxImg2ImgPipeline
    i2i = i2i_cls(**loaded.components)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    edited = i2i("a photo of a cat", image=image, strength=0.5, num_inference_steps=4, height=16, width=16,
                 max_sequence_length=8, output_type="np", generator=torch.Generator().manual_seed(0), **kw).images
    assert edited.shape == (1, 16, 16, 3) and np.isfinite(edited).all() and i2i.scheduler.begin_index == 2


def test_a_scheduler_of_neither_kind_is_refused():
    from diffusers import EDMEulerScheduler

    from perflow.training.teachers import as_teacher
    from perflow.tiny import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline()
    pipe.scheduler = EDMEulerScheduler()
    with pytest.raises(ValueError, match="neither variance-preserving .* nor flow-matching"):
        as_teacher(pipe)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_teacher_denoiser_is_the_pipelines_transformer_call(family):
    """The adapter's call (packing, ids, timestep scaling, guidance) gives what the pipeline's own call gives."""
    from perflow.training.flow_teachers import pack_latents, unpack_latents
    from perflow.training.teachers import as_teacher
    from perflow.tiny import tiny_flux_pipeline, tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline() if family == "sd3" else tiny_flux_pipeline()
    teacher = as_teacher(pipe)
    teacher.max_sequence_length = 8
    z = torch.randn(2, teacher.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.8, 0.3], dtype=torch.float64)
    cond = teacher.encode_prompts(["a photo of a cat", "a red dog"])
    ours = cond.forward(teacher.unet, z, teacher.schedule.timestep(sigma))
    with torch.no_grad():
        if family == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt("a photo of a cat", None, None, do_classifier_free_guidance=False,
                                                      max_sequence_length=8)
            ref0 = pipe.transformer(hidden_states=z[:1], timestep=torch.tensor([800.0]), encoder_hidden_states=embeds,
                                    pooled_projections=pooled, return_dict=False)[0]
        else:
            assert torch.equal(unpack_latents(pack_latents(z), 8, 8), z)
            embeds, pooled, text_ids = pipe.encode_prompt("a photo of a cat", None, max_sequence_length=8)
            latents = pipe._pack_latents(z[:1], 1, 1, 8, 8)
            ids = pipe._prepare_latent_image_ids(1, 4, 4, z.device, z.dtype)
            out = pipe.transformer(hidden_states=latents, timestep=torch.tensor([0.8]), guidance=torch.tensor([3.5]),
                                   pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                                   img_ids=ids, return_dict=False)[0]
            ref0 = pipe._unpack_latents(out, 16, 16, pipe.vae_scale_factor)
    torch.testing.assert_close(ours[:1], ref0, rtol=1e-5, atol=1e-5)


def test_flux_refuses_two_pass_cfg_and_eps_types(image_folder, tmp_path):
    from perflow.tiny import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    data = {"data.path": str(image_folder)}
    with pytest.raises(ValueError, match="guidance is an input embedding.*--embedded_guidance"):
        train(None, teacher=pipe, **_settings(tmp_path / "a", **{"perflow.cfg_mode": "fixed", **data}))
    with pytest.raises(ValueError, match="does not apply to the flow-matching teacher.*velocity"):
        train(None, teacher=pipe, **_settings(tmp_path / "b", **{"perflow.prediction_type": "ddim_eps", **data}))


def test_cli_train_picks_the_teacher_from_model_index(image_folder, tmp_path):
    from diffusers import DiffusionPipeline

    from perflow.cli import main

    _, folder = _folder("sd3", tmp_path)
    out = tmp_path / "cli-out"
    flags = {**_settings(out, **{"model.teacher": str(folder), "data.path": str(image_folder), "training.max_steps": 1,
                                 "data.caption_dropout": 0.0})}
    rc = main(["train", *[f"--{k}={v}" for k, v in flags.items()]])
    assert rc in (0, None)
    loaded = DiffusionPipeline.from_pretrained(out)
    assert type(loaded).__name__ == "StableDiffusion3Pipeline" and isinstance(loaded.scheduler, PeRFlowScheduler)


@pytest.mark.parametrize("recipe", ["sd3", "flux"])
def test_recipes_train_a_tiny_teacher_of_their_family(recipe, image_folder, tmp_path):
    """The packaged recipes' settings (velocity, logit-normal, CFG mode, guidance input) run, shrunk to toy size."""
    from perflow.tiny import tiny_flux_pipeline, tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline() if recipe == "sd3" else tiny_flux_pipeline()
    small = _settings(tmp_path / "out", **{"data.path": str(image_folder), "training.max_steps": 1,
                                           "training.gradient_accumulation_steps": 1, "training.mixed_precision": "no",
                                           "model.gradient_checkpointing": False, "output.validation_every": 0,
                                           "data.num_workers": 0})
    result = train(recipe, teacher=pipe, **small)
    assert result.teacher.kind == recipe and len(result.losses) == 1 and np.isfinite(result.losses[0])
    assert result.scheduler.config.schedule_kind == "flow_matching"


def test_a_unet_teacher_with_a_flow_matching_scheduler_is_refused():
    from diffusers import UniPCMultistepScheduler

    from perflow.training.teachers import teacher_schedule

    from diffusers import FlowMatchEulerDiscreteScheduler

    config = dict(UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0).config)
    with pytest.raises(ValueError, match="flow-matching one .* StableDiffusion3Pipeline and FluxPipeline"):
        teacher_schedule(config)
    # FlowMatchEulerDiscreteScheduler's config has no prediction_type: it was read as an epsilon DDPM before
    config = {**FlowMatchEulerDiscreteScheduler(shift=3.0).config, "_class_name": "FlowMatchEulerDiscreteScheduler"}
    with pytest.raises(ValueError, match="flow-matching one \\(FlowMatchEulerDiscreteScheduler\\)"):
        teacher_schedule(config)


def test_a_teacher_without_sample_size_needs_a_resolution(tmp_path, capsys):
    """A Flux transformer records no ``sample_size``: ``perflow eval`` (and ``train``) say which option sets it."""
    from perflow.tiny import tiny_flux_pipeline

    from cli_helpers import cli, error_line

    folder = tmp_path / "flux"
    tiny_flux_pipeline().save_pretrained(folder)
    rc, _, err = cli(["eval", "--task", "teacher", "--teacher", folder, "--prompts", "a", "--num-samples", 20,
                      "--steps", 1, "--reference-steps", 2, "--no-progress"], capsys)
    assert rc != 0 and "records no sample_size; set --resolution" in error_line(err)


def test_flux_baselines_take_the_dynamic_shift_of_the_resolution():
    """The baselines of a dynamic-shift teacher run at ``e^mu`` of the evaluated resolution: the same sigmas as
    diffusers' scheduler given that ``mu`` (FluxPipeline's ``calculate_shift`` of the image's token count)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from perflow.evaluation.teacher_eval import sampler_config
    from perflow.tiny import tiny_flux_pipeline
    from perflow.training.flow_teachers import flow_teacher_from_pipeline

    pipe = tiny_flux_pipeline()
    teacher = flow_teacher_from_pipeline(pipe)
    latents = torch.zeros(2, teacher.latent_channels, 8, 12)
    c = pipe.scheduler.config
    mu = calculate_shift((8 // 2) * (12 // 2), c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    fixed = FlowMatchEulerDiscreteScheduler.from_config(sampler_config(teacher, None, latents))
    dynamic = FlowMatchEulerDiscreteScheduler.from_config(c)
    sigmas = np.linspace(1.0, 1 / 6, 6)
    fixed.set_timesteps(sigmas=sigmas)
    dynamic.set_timesteps(sigmas=sigmas, mu=mu)
    assert c.use_dynamic_shifting and not fixed.config.use_dynamic_shifting
    torch.testing.assert_close(fixed.sigmas, dynamic.sigmas, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_perflow_eval_compares_a_transformer_student_with_the_solvers(family, image_folder, tmp_path):
    """``perflow eval --task teacher`` on a text-to-image transformer teacher and its student: text-conditioned,
    every sampler from the same noise, the student's rows beside the teacher's solvers."""
    from perflow.evaluation.teacher_eval import TeacherEvalConfig, evaluate_teacher

    _, folder = _folder(family, tmp_path)
    out = tmp_path / "student"
    extra = {"perflow.embedded_guidance": 2.0} if family == "flux" else {}
    train(None, **_settings(out, **{"model.teacher": str(folder), "data.path": str(image_folder), **extra}))
    result = evaluate_teacher(TeacherEvalConfig(teacher=str(folder), perflow=str(out), prompts=["a cat", "a dog"],
                                                num_samples=20, steps=[4], reference_steps=8, resolution=16,
                                                spacings=["trailing"]), progress=False)
    assert result.meta["teacher_conditioning"] == "text"
    # Flux-dev: the guidance input the student was trained at (recorded in its scheduler config and delta) for
    # every sampler, and no second (unconditional) pass; SD3: two-pass CFG 7.5
    assert result.meta["guidance_scale"] == (1.0 if family == "flux" else 7.5)
    assert result.meta["embedded_guidance"] == (2.0 if family == "flux" else None)
    if family == "flux":
        from perflow.delta import load_delta

        assert load_delta(out / "delta.safetensors")[1]["teacher_sampling"] == {"embedded_guidance": 2.0}
        from perflow.evaluation.transfer import TransferConfig, transfer_report  # the delta carries it too

        report = transfer_report(TransferConfig(delta=str(out / "delta.safetensors"), target=str(folder), prompts=["a"],
                                                steps=(4,), baselines=("ddim",), num_samples=20, reference_steps=8,
                                                resolution=16, spacings=("trailing",)), progress=False)
        assert report.meta["embedded_guidance"] == 2.0 and report.meta["guidance_scale"] == 1.0
    rows = {r["sampler"]: r for r in result.rows if r["steps"] == 4}
    assert {"perflow (K=4)", "teacher ddim", "teacher dpmsolver++", "teacher unipc"} <= set(rows)
    assert all(np.isfinite(r["paired_mse"]) for r in rows.values())


def test_student_init_reads_a_transformer_run_folder(tmp_path):
    """``model.student_init RUN`` for an SD3/Flux run: the weights in ``RUN/transformer/`` (progressive K 4 -> 2)."""
    from perflow.tiny import tiny_flux_pipeline
    from perflow.training.loop import load_student_init

    saved, student = tiny_flux_pipeline().transformer, tiny_flux_pipeline().transformer
    with torch.no_grad():
        for p in saved.parameters():
            p.add_(0.01)
    saved.save_pretrained(tmp_path / "run" / "transformer")
    load_student_init(student, str(tmp_path / "run"))
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), saved.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="not a diffusers model folder"):
        load_student_init(student, str(tmp_path))


def test_a_pipeline_folder_missing_a_component_names_it(tmp_path, capsys):
    import shutil

    from cli_helpers import cli, error_line

    _, folder = _folder("sd3", tmp_path)
    shutil.rmtree(folder / "text_encoder_3")
    rc, _, err = cli(["eval", "--task", "teacher", "--teacher", folder, "--prompts", "a", "--num-samples", 20,
                      "--resolution", 16], capsys)
    assert rc == 2 and "lacks text_encoder_3/ that its model_index.json names" in error_line(err)
