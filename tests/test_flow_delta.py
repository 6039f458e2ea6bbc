"""Deltas and LoRA of SD3 and Flux transformers: exact round trips, the CLI on pipeline folders, diffusers'
``load_lora_weights``, and a delta of one model family refused by another."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from delta_helpers import run_cli
from perflow.delta import base_model_info, delta_to_lora, extract_delta, load_delta, merge_delta, save_delta, save_lora
from perflow.scheduler import PeRFlowScheduler

FULL_RANK = 1024


def _pipe(family):
    from perflow.tiny import tiny_flux_pipeline, tiny_sd3_pipeline

    return tiny_sd3_pipeline() if family == "sd3" else tiny_flux_pipeline()


def _perturbed(model, seed=1, size=1e-2):
    student = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(size * torch.randn(p.shape, generator=g))
    return student


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_fp64_delta_round_trip_is_exact_and_fp32_sum_is_the_reference(family):
    teacher = _pipe(family).transformer
    student = _perturbed(teacher)
    d64 = extract_delta(student, teacher, dtype=torch.float64)
    merged = merge_delta(copy.deepcopy(teacher), d64)
    for k, v in student.state_dict().items():
        assert torch.equal(merged.state_dict()[k], v), k
    d32 = extract_delta(student, teacher)
    merged32 = merge_delta(copy.deepcopy(teacher), d32, scale=0.5).state_dict()
    for k, w in teacher.state_dict().items():  # written out: cast(fp32(w) + 0.5 fp32(s - w))
        ref = (w.float() + 0.5 * (student.state_dict()[k].float() - w.float())).to(w.dtype)
        assert torch.equal(merged32[k], ref), k


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_cli_extract_merge_on_pipeline_folders(family, tmp_path, capsys):
    from diffusers import DiffusionPipeline

    pipe = _pipe(family)
    pipe.save_pretrained(tmp_path / "teacher")
    student = _perturbed(pipe.transformer)
    spipe = type(pipe)(**{**pipe.components, "transformer": student,
                          "scheduler": PeRFlowScheduler.from_config(pipe.scheduler.config)})
    spipe.save_pretrained(tmp_path / "student")
    assert run_cli(["delta", "extract", "--student", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"),
                    "-o", str(tmp_path / "d.safetensors"), "--float64"]) == 0
    _, meta = load_delta(tmp_path / "d.safetensors")
    assert meta["prediction_type"] == "velocity" and meta["scheduler_config"]["schedule_kind"] == "flow_matching"
    assert meta["base_model"]["class"] == type(pipe.transformer).__name__
    assert run_cli(["delta", "merge", "--delta", str(tmp_path / "d.safetensors"), "--into", str(tmp_path / "teacher"),
                    "-o", str(tmp_path / "merged")]) == 0
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "merged")
    assert isinstance(loaded.scheduler, PeRFlowScheduler) and loaded.scheduler.config.schedule_kind == "flow_matching"
    assert all(torch.equal(loaded.transformer.state_dict()[k], v) for k, v in student.state_dict().items())
    kw = {"guidance_scale": 3.5} if family == "flux" else {"guidance_scale": 1.0}
    images = loaded("a photo of a cat", num_inference_steps=4, height=16, width=16, max_sequence_length=8,
                    output_type="pt", generator=torch.Generator().manual_seed(0), **kw).images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    # to-lora on the same delta: the pipeline's own loader takes it
    assert run_cli(["delta", "to-lora", "--delta", str(tmp_path / "d.safetensors"), "--rank", "4",
                    "-o", str(tmp_path / "l.safetensors"), "--report-ranks", "1,4"]) == 0
    assert "whole delta" in capsys.readouterr().out
    teacher = DiffusionPipeline.from_pretrained(tmp_path / "teacher")
    teacher.load_lora_weights(str(tmp_path / "l.safetensors"), adapter_name="perflow")
    assert "perflow" in teacher.get_active_adapters()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_lora_export_loads_with_the_pipelines_load_lora_weights(family, tmp_path):
    pipe = _pipe(family)
    teacher = pipe.transformer
    base = {k: v.clone() for k, v in teacher.state_dict().items()}
    delta = extract_delta(_perturbed(teacher), teacher)
    export = delta_to_lora(delta, FULL_RANK, model=teacher, progress=False)
    assert all(k.startswith("transformer.") for k in export.lora)
    assert export.overall_error(FULL_RANK) == 0.0 and export.overall_error(1) > 0.0
    save_lora(export, str(tmp_path / "lora.safetensors"))
    pipe.load_lora_weights(str(tmp_path / "lora.safetensors"), adapter_name="perflow")
    pipe.fuse_lora(adapter_names=["perflow"])
    pipe.unload_lora_weights()
    got = pipe.transformer.state_dict()
    for m in export.ranks:  # every LoRA layer landed: base + delta up to the SVD's fp32 rounding
        key = f"{m}.weight"
        ref = base[key] + delta[key]
        bound = 2.0**-22 * math.sqrt(export.ranks[m]) * float(delta[key].double().norm()) + 4 * float(ref.abs().max()) * 2.0**-24
        assert float((got[key] - ref).abs().max()) <= bound, key
    for key in export.rest:
        assert torch.equal(got[key], base[key]), key


def test_a_delta_of_one_family_is_refused_by_another(tmp_path):
    sd3, flux = _pipe("sd3"), _pipe("flux")
    delta = extract_delta(_perturbed(sd3.transformer), sd3.transformer)
    meta = {"base_model": base_model_info(sd3.transformer), "num_time_windows": 4, "prediction_type": "velocity"}
    with pytest.raises(ValueError, match=r"learned on a SD3 \(MMDiT\) transformer .* cannot be merged into a Flux transformer"):
        merge_delta(flux, delta, metadata=meta)
    save_delta(delta, tmp_path / "sd3.safetensors", meta)
    flux.save_pretrained(tmp_path / "flux")
    with pytest.raises(ValueError, match="cannot be merged into a Flux transformer"):
        run_cli(["delta", "merge", "--delta", str(tmp_path / "sd3.safetensors"), "--into", str(tmp_path / "flux"),
                 "-o", str(tmp_path / "merged")])
    assert not (tmp_path / "merged").exists()
