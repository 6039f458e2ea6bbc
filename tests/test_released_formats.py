"""Released PeRFlow formats (a UNet folder of deltas; merged pipelines) and single-file checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from perflow.delta.formats import ldm_unet_key_map, merge_into_path, unet_to_ldm_state_dict
from perflow.delta import extract_delta, load_delta, load_pipeline, merge_delta, save_delta
from perflow.scheduler import PeRFlowScheduler
from perflow.tiny import tiny_sd15_pipeline, tiny_sd15_unet

from delta_helpers import perturbed, run_cli

# scheduler/scheduler_config.json as the released SD1.5 PeRFlow pipelines ship it (no window_boundaries)
RELEASED_SCHEDULER = {
    "_class_name": "PeRFlowScheduler",
    "_diffusers_version": "0.27.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_time_windows": 4,
    "num_train_timesteps": 1000,
    "prediction_type": "diff_eps",
    "set_alpha_to_one": False,
    "t_clean": 0.0,
    "t_noise": 1.0,
    "trained_betas": None,
}


@pytest.fixture(scope="module")
def pair():
    teacher = tiny_sd15_unet(0)
    return teacher, perturbed(teacher)


def test_released_delta_unet_folder_loads_and_merges(tmp_path, pair):
    teacher, student = pair
    delta = extract_delta(student, teacher)
    as_unet = tiny_sd15_unet(0)
    as_unet.load_state_dict(delta)  # the released format: a UNet whose weights are the deltas
    as_unet.save_pretrained(tmp_path / "perflow-sd15-delta-weights" / "unet")
    for path in (tmp_path / "perflow-sd15-delta-weights", tmp_path / "perflow-sd15-delta-weights" / "unet"):
        loaded, meta = load_delta(path)
        assert meta["format"] == "diffusers_unet_delta" and meta["unet_config"]["cross_attention_dim"] == 32
        assert set(loaded) == set(delta) and all(torch.equal(loaded[k], delta[k]) for k in delta)
    pipe = tiny_sd15_pipeline()
    with pytest.warns(UserWarning, match="released SD1.5 recipe"):
        merge_delta(pipe, tmp_path / "perflow-sd15-delta-weights")
    assert isinstance(pipe.scheduler, PeRFlowScheduler)
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in student.state_dict().items())


def test_released_delta_folder_with_pickles_only_is_refused(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    (tmp_path / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="never unpickles"):
        load_delta(tmp_path)


@pytest.mark.parametrize("entry", [["diffusers", "PeRFlowScheduler"], ["diffusers", "DDIMScheduler"]])
def test_released_merged_pipeline_loads_with_perflow_scheduler(tmp_path, entry):
    pipe = tiny_sd15_pipeline()
    pipe.save_pretrained(tmp_path)
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(RELEASED_SCHEDULER))
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["scheduler"] = entry
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    loaded = load_pipeline(tmp_path)
    assert isinstance(loaded.scheduler, PeRFlowScheduler)
    assert (loaded.scheduler.config.num_time_windows, loaded.scheduler.config.prediction_type) == (4, "diff_eps")
    assert json.loads((tmp_path / "model_index.json").read_text())["scheduler"] == entry  # folder untouched
    out = loaded("a photo of a cat", num_inference_steps=4, guidance_scale=4.5, output_type="pt",
                 generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.images).all()


def test_load_pipeline_refuses_folder_without_perflow_scheduler(tmp_path):
    tiny_sd15_pipeline().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="perflow delta merge"):
        load_pipeline(tmp_path)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_single_file_layout_matches_diffusers_converter(arch):
    """Our diffusers->LDM map is inverted exactly by diffusers' own LDM->diffusers converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from perflow.tiny import tiny_sdxl_unet

    teacher = tiny_sd15_unet(0) if arch == "sd15" else tiny_sdxl_unet(0)
    sd = teacher.state_dict()
    ldm = unet_to_ldm_state_dict(sd, teacher.config)
    assert all(k.startswith("model.diffusion_model.") for k in ldm)
    back = convert_ldm_unet_checkpoint(ldm, dict(teacher.config))
    assert set(back) == set(sd) and all(back[k] is sd[k] for k in sd)
    key_map = ldm_unet_key_map(list(ldm), teacher.config)
    assert all(ldm[key_map[k]] is sd[k] for k in sd)


def test_single_file_merge_round_trip(tmp_path, pair):
    from diffusers import UNet2DConditionModel

    teacher, student = pair
    delta = extract_delta(student, teacher)
    save_delta(delta, tmp_path / "d.safetensors", {"num_time_windows": 4, "prediction_type": "diff_eps"})
    ldm = {k: v.half().contiguous() for k, v in unet_to_ldm_state_dict(teacher.state_dict(), teacher.config).items()}
    ldm["first_stage_model.decoder.conv_in.weight"] = torch.randn(4, 4, 3, 3).half()  # a VAE tensor: copied
    save_file(ldm, tmp_path / "model.safetensors", metadata={"note": "kept"})
    teacher.save_pretrained(tmp_path / "teacher_unet")
    # the delta's metadata has no UNet config: the merge says so, then takes it from --unet-config
    with pytest.raises(ValueError, match="--unet-config"):
        merge_into_path(tmp_path / "model.safetensors", tmp_path / "d.safetensors", tmp_path / "x.safetensors")
    assert run_cli(["delta", "merge", "--delta", str(tmp_path / "d.safetensors"), "--into",
                    str(tmp_path / "model.safetensors"), "-o", str(tmp_path / "merged.safetensors"),
                    "--unet-config", str(tmp_path / "teacher_unet")]) == 0
    merged = load_file(tmp_path / "merged.safetensors")
    assert set(merged) == set(ldm)
    assert torch.equal(merged["first_stage_model.decoder.conv_in.weight"], ldm["first_stage_model.decoder.conv_in.weight"])
    # reference: the same merge on the diffusers fp16 UNet (fp32 sum, fp16 result)
    ref = merge_delta(tiny_sd15_unet(0).half(), delta).state_dict()
    unet = UNet2DConditionModel.from_single_file(str(tmp_path / "merged.safetensors"),
                                                 config=str(tmp_path / "teacher_unet"), torch_dtype=torch.float16)
    got = unet.state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "merged.safetensors"), framework="pt") as f:
        assert f.metadata()["note"] == "kept" and f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16


def test_merge_into_unet_folder_and_class_conditional_teacher_folder(tmp_path, pair):
    """A bare UNet folder, and a folder with unet/ + label_encoder/ + scheduler/ (class-conditional teacher)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from perflow.models import LabelEncoder

    teacher, student = pair
    delta = extract_delta(student, teacher)
    meta = {"num_time_windows": 2, "prediction_type": "velocity"}
    teacher.save_pretrained(tmp_path / "unet_only")
    merge_into_path(tmp_path / "unet_only", delta, tmp_path / "merged_unet", metadata=meta)
    got = UNet2DConditionModel.from_pretrained(tmp_path / "merged_unet").state_dict()
    assert all(torch.equal(got[k], v) for k, v in student.state_dict().items())

    root = tmp_path / "digits_teacher"
    teacher.save_pretrained(root / "unet")
    LabelEncoder(num_classes=10, embed_dim=32).save_pretrained(root / "label_encoder")
    DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02).save_pretrained(root / "scheduler")
    merge_into_path(root, delta, tmp_path / "merged_teacher", metadata=meta)
    sched = PeRFlowScheduler.from_pretrained(tmp_path / "merged_teacher", subfolder="scheduler")
    assert (sched.config.num_time_windows, sched.config.prediction_type) == (2, "velocity")
    assert (sched.config.beta_schedule, sched.config.beta_end) == ("linear", 0.02)  # the teacher's betas kept
    assert (tmp_path / "merged_teacher" / "label_encoder" / "config.json").is_file()
    got = UNet2DConditionModel.from_pretrained(tmp_path / "merged_teacher" / "unet").state_dict()
    assert all(torch.equal(got[k], v) for k, v in student.state_dict().items())


def test_merge_into_folder_with_fp16_variant_merges_each_variant_in_its_dtype(tmp_path, pair):
    from diffusers import UNet2DConditionModel

    teacher, student = pair
    delta = extract_delta(student, teacher)
    teacher.save_pretrained(tmp_path / "unet")
    tiny_sd15_unet(0).half().save_pretrained(tmp_path / "unet", variant="fp16")  # the same weights in fp16
    merge_into_path(tmp_path / "unet", delta, tmp_path / "out", metadata={"num_time_windows": 4})
    plain = UNet2DConditionModel.from_pretrained(tmp_path / "out").state_dict()
    half = UNet2DConditionModel.from_pretrained(tmp_path / "out", variant="fp16", torch_dtype=torch.float16).state_dict()
    for k, v in student.state_dict().items():
        assert torch.equal(plain[k], v), k
        assert half[k].dtype == torch.float16
        assert torch.equal(half[k], (teacher.state_dict()[k].half().float() + delta[k]).half()), k
