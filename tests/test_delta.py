"""Extract / merge of plug-and-play deltas on tiny SD1.5-architecture models (docs/method.md, plug-and-play)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from perflow.delta import (
    base_model_info,
    extract_delta,
    load_delta,
    merge_delta,
    save_delta,
)
from perflow.scheduler import PeRFlowScheduler
from perflow.tiny import tiny_controlnet, tiny_sd15_pipeline, tiny_sd15_unet

from delta_helpers import perturbed, run_cli


@pytest.fixture(scope="module")
def pair():
    teacher = tiny_sd15_unet(0)
    return teacher, perturbed(teacher)


def test_fp64_delta_merge_reproduces_student_bit_for_bit(pair):
    teacher, student = pair
    delta = extract_delta(student, teacher, dtype=torch.float64)
    merged = merge_delta(teacher.state_dict(), delta)
    s = student.state_dict()
    assert set(merged) == set(s)
    for k in s:
        assert merged[k].dtype == torch.float32
        assert torch.equal(merged[k], s[k]), k


def test_fp32_delta_merge_is_exact_wherever_fp32_allows(pair):
    """fp32: teacher + delta == student except where no fp32 delta can hit the student
    (this small perturbation has no such weight; the synthetic test below does).

    There (a weight changing sign, so ``|delta| > |student|``) the sum lies on a grid
    coarser than the student's; we check the code could not have done better (both
    fp32 neighbours of the stored delta also miss) and the error is within one ulp
    of the delta.
    """
    teacher, student = pair
    delta = extract_delta(student, teacher)
    merged = merge_delta(teacher.state_dict(), delta)
    s, t = student.state_dict(), teacher.state_dict()
    for k in s:
        d = delta[k]
        assert d.dtype == torch.float32
        bad = merged[k] != s[k]
        if bad.any():
            tb, sb, db = t[k][bad], s[k][bad], d[bad]
            for direction in (float("inf"), float("-inf")):
                nb = torch.nextafter(db, torch.full_like(db, direction))
                assert not bool(((tb + nb) == sb).any()), k
            inf = torch.full_like(db, float("inf"))
            ulp_d = torch.nextafter(db.abs(), inf) - db.abs()
            ulp_s = torch.nextafter(sb.abs(), inf) - sb.abs()
            assert bool(((merged[k][bad] - sb).abs() <= ulp_d).all()), k
            # t + d misses s only when d's grid is no finer than s's (else it rounds to s)
            assert bool((ulp_d >= ulp_s).all()), k


def test_scale_zero_and_half(pair):
    teacher, student = pair
    delta = extract_delta(student, teacher)
    t = teacher.state_dict()
    zero = merge_delta(t, delta, scale=0.0)
    assert all(torch.equal(zero[k], t[k]) for k in t)
    half = merge_delta(t, delta, scale=0.5)
    for k in t:
        # 0.5 * d is exact in fp32, so the merge is fl32(t + d / 2): one rounding of the exact sum
        ref = (t[k].double() + 0.5 * delta[k].double()).float()
        assert torch.equal(half[k], ref), k


def test_fp16_model_merges_in_fp32_then_casts(pair):
    teacher, student = pair
    delta = extract_delta(student, teacher)
    target = tiny_sd15_unet(0).half()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    merge_delta(target, delta)
    after = target.state_dict()
    naive_differs = 0
    for k, w in before.items():
        assert after[k].dtype == torch.float16
        assert torch.equal(after[k], (w.float() + delta[k]).half()), k
        naive_differs += int((after[k] != (w + delta[k].half())).sum())
    assert naive_differs > 0  # adding in fp16 (the released code) gives different weights


def test_missing_extra_and_shape_mismatch_errors(pair):
    teacher, student = pair
    delta = extract_delta(student, teacher)
    t = teacher.state_dict()
    broken = dict(delta)
    dropped = "conv_in.bias"
    del broken[dropped]
    broken["not_a_layer.weight"] = torch.zeros(3)
    broken["conv_out.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError) as err:
        merge_delta(t, broken)
    msg = str(err.value)
    for needle in (dropped, "not_a_layer.weight", "conv_out.weight", "strict=False", "--allow-partial"):
        assert needle in msg
    with pytest.warns(UserWarning, match="not_a_layer.weight"):
        merged = merge_delta(t, broken, strict=False)
    assert torch.equal(merged["conv_out.weight"], t["conv_out.weight"])  # skipped, not half-merged
    assert torch.equal(merged[dropped], t[dropped])
    assert torch.equal(merged["conv_in.weight"], t["conv_in.weight"] + delta["conv_in.weight"])


def test_extract_refuses_different_architectures():
    teacher = tiny_sd15_unet(0)
    other = tiny_sd15_unet(0, cross_attention_dim=16)
    with pytest.raises(ValueError, match="shape mismatch"):
        extract_delta(other, teacher)
    sd = dict(teacher.state_dict())
    sd.pop("conv_in.bias")
    with pytest.raises(ValueError, match="conv_in.bias"):
        extract_delta(sd, teacher)


def test_save_load_roundtrip_with_metadata(tmp_path, pair):
    teacher, student = pair
    delta = extract_delta(student, teacher)
    info = base_model_info(teacher, name="tiny-sd15")
    path = save_delta(delta, tmp_path / "d.safetensors", {"base_model": info, "num_time_windows": 4,
                                                          "window_boundaries": [1.0, 0.5, 0.0]})
    loaded, meta = load_delta(path)
    assert set(loaded) == set(delta) and all(torch.equal(loaded[k], delta[k]) for k in delta)
    assert meta["num_time_windows"] == 4 and meta["window_boundaries"] == [1.0, 0.5, 0.0]
    assert meta["base_model"]["weights_sha256"] == info["weights_sha256"]
    assert meta["format"] == "perflow.delta.v1"
    # the hash sees a one-value change of the weights; the architecture fingerprint does not
    assert base_model_info(student)["weights_sha256"] != info["weights_sha256"]
    assert base_model_info(student)["keys_fingerprint"] == info["keys_fingerprint"]
    with pytest.raises(ValueError, match="safetensors"):
        save_delta(delta, tmp_path / "d.bin")
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temporary file


def test_merge_into_unet_with_unfused_lora_goes_into_base_layer(pair):
    """Adapter layers (peft LoRA wrappers) are left alone; the delta lands in the base weights."""
    from peft import LoraConfig

    teacher, student = pair
    delta = extract_delta(student, teacher)
    target = tiny_sd15_unet(0)
    target.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k"]), adapter_name="style")
    assert any(".base_layer." in k for k in target.state_dict())
    merge_delta(target, delta)
    sd = target.state_dict()
    k = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert torch.equal(sd[f"{k}.base_layer.weight"], student.state_dict()[f"{k}.weight"])


def _student_pipeline_folders(tmp_path):
    pipe = tiny_sd15_pipeline()
    pipe.save_pretrained(tmp_path / "teacher")
    student = perturbed(pipe.unet)
    pipe.unet = student
    pipe.scheduler = PeRFlowScheduler.from_config(pipe.scheduler.config, prediction_type="diff_eps",
                                                  num_time_windows=4)
    pipe.save_pretrained(tmp_path / "student")
    return student


def test_cli_extract_merge_pipeline_folder(tmp_path, capsys):
    from diffusers import DiffusionPipeline

    from perflow.delta import load_pipeline

    student = _student_pipeline_folders(tmp_path)
    assert run_cli(["delta", "extract", "--student", str(tmp_path / "student"), "--teacher",
                    str(tmp_path / "teacher"), "-o", str(tmp_path / "d.safetensors"), "--cfg-mode", "sync"]) == 0
    _, meta = load_delta(tmp_path / "d.safetensors")
    assert (meta["num_time_windows"], meta["prediction_type"], meta["cfg_mode"]) == (4, "diff_eps", "sync")
    assert meta["scheduler_config"]["_class_name"] == "PeRFlowScheduler"
    assert meta["teacher_prediction_type"] == "epsilon"
    assert run_cli(["delta", "merge", "--delta", str(tmp_path / "d.safetensors"), "--into",
                    str(tmp_path / "teacher"), "-o", str(tmp_path / "merged")]) == 0
    assert "merged 208 tensors" in capsys.readouterr().out
    index = json.loads((tmp_path / "merged" / "model_index.json").read_text())
    assert index["scheduler"] == ["perflow.scheduler", "PeRFlowScheduler"]
    for pipe in (DiffusionPipeline.from_pretrained(tmp_path / "merged"), load_pipeline(tmp_path / "merged")):
        assert isinstance(pipe.scheduler, PeRFlowScheduler)
        assert pipe.scheduler.config.num_time_windows == 4
        assert pipe.scheduler.config.prediction_type == "diff_eps"
        merged = pipe.unet.state_dict()
        assert all(torch.equal(merged[k], v) for k, v in student.state_dict().items())
    # refuses to overwrite, and refuses a student with no PeRFlow scheduler and no flags
    with pytest.raises(ValueError, match="--overwrite"):
        run_cli(["delta", "merge", "--delta", str(tmp_path / "d.safetensors"), "--into",
                 str(tmp_path / "teacher"), "-o", str(tmp_path / "merged")])
    with pytest.raises(ValueError, match="--prediction-type"):
        run_cli(["delta", "extract", "--student", str(tmp_path / "teacher"), "--teacher",
                 str(tmp_path / "teacher"), "-o", str(tmp_path / "e.safetensors")])


def test_merged_controlnet_pipeline_samples_with_perflow_scheduler(pair):
    from diffusers import StableDiffusionControlNetPipeline

    teacher, student = pair
    delta = extract_delta(student, teacher)
    base = tiny_sd15_pipeline()
    controlnet = tiny_controlnet(base.unet)
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=controlnet)
    control_before = {k: v.clone() for k, v in controlnet.state_dict().items()}
    meta = {"num_time_windows": 4, "prediction_type": "diff_eps"}
    merge_delta(pipe, delta, metadata=meta)
    assert isinstance(pipe.scheduler, PeRFlowScheduler) and pipe.scheduler.config.num_time_windows == 4
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"  # the base's betas kept
    assert all(torch.equal(controlnet.state_dict()[k], v) for k, v in control_before.items())
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in student.state_dict().items())
    image = torch.rand(1, 3, 32, 32)
    out = pipe("a photo of a cat", image=image, num_inference_steps=4, guidance_scale=4.5,
               output_type="pt", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 3, 32, 32) and torch.isfinite(out.images).all()


def test_pipeline_merge_without_scheduler_metadata_warns_and_uses_sd15_recipe(pair):
    teacher, student = pair
    delta = extract_delta(student, teacher)
    pipe = tiny_sd15_pipeline()
    with pytest.warns(UserWarning, match="released SD1.5 recipe"):
        merge_delta(pipe, delta)
    assert (pipe.scheduler.config.num_time_windows, pipe.scheduler.config.prediction_type) == (4, "diff_eps")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge_delta(tiny_sd15_pipeline(), delta, metadata={"num_time_windows": 2, "prediction_type": "ddim_eps"})


def test_fp32_delta_is_the_best_fp32_delta():
    """Across magnitudes and sign changes, teacher + delta hits the student whenever a delta one
    ulp either side would. Weights that shrink towards zero (``|s| << |t|``) include unreachable
    ones: ``t + d`` lies on ``t``'s coarser grid."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(200_000, generator=g) * 10 ** torch.randint(-4, 1, (200_000,), generator=g).float()
    s = t.clone()
    for _ in range(3):  # several updates, as training makes (one fl32(t + n) is always recoverable)
        s = s + torch.randn(200_000, generator=g) * 1e-3
    shrink = torch.rand(200_000, generator=g) < 0.1  # some weights move close to zero: |s| << |t|
    s = torch.where(shrink, t * (torch.rand(200_000, generator=g) - 0.5) * 0.2, s)
    d = extract_delta({"w": s}, {"w": t})["w"]
    naive = s - t
    candidates = [naive, torch.nextafter(naive, torch.full_like(naive, float("inf"))),
                  torch.nextafter(naive, torch.full_like(naive, float("-inf")))]
    reachable = torch.zeros_like(s, dtype=torch.bool)
    for c in candidates:
        reachable |= (t + c) == s
    assert torch.equal((t + d) == s, reachable)
    miss = (t + d) != s
    assert int(miss.sum()) > 0
    inf = torch.full_like(d[miss], float("inf"))
    ulp_d = torch.nextafter(d[miss].abs(), inf) - d[miss].abs()
    ulp_s = torch.nextafter(s[miss].abs(), inf) - s[miss].abs()
    assert bool((ulp_d >= ulp_s).all())  # misses only where d's grid is no finer than s's
    # |t + d - s| <= ulp(d)/2 (rounding s - t) + ulp(s)/2 (rounding the sum) <= ulp(d)
    assert bool(((t + d)[miss] - s[miss]).abs().le(ulp_d).all())


def test_merge_into_ip_adapter_unet_leaves_adapter_alone(pair):
    """An IP-Adapter UNet (image-prompt processors + image projection): the delta goes into the base UNet only."""
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

    teacher, student = pair
    delta = extract_delta(student, teacher)
    unet = tiny_sd15_unet(0)
    procs = {}
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name[: -len(".processor")]).to_q.out_features
            procs[name] = IPAdapterAttnProcessor2_0(hidden_size=hidden, cross_attention_dim=32, num_tokens=4)
        else:
            procs[name] = AttnProcessor2_0()
    unet.set_attn_processor(procs)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection(
        [ImageProjection(cross_attention_dim=32, image_embed_dim=16, num_image_text_embeds=4)]
    )
    unet.config.encoder_hid_dim_type = "ip_image_proj"
    adapter = {k: v.clone() for k, v in unet.state_dict().items() if k not in delta}
    assert len(adapter) == 12  # to_k_ip / to_v_ip of 3 cross-attentions + the image projection
    merge_delta(unet, delta)
    sd = unet.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in adapter.items())
    assert all(torch.equal(sd[k], v) for k, v in student.state_dict().items())
    out = unet(torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 3, 32),
               added_cond_kwargs={"image_embeds": [torch.randn(1, 1, 16)]}).sample
    assert torch.isfinite(out).all()


def test_fp64_delta_is_exact_unless_a_weight_shrinks_by_more_than_2_to_the_28():
    """fp64 delta, merged in fp64 and rounded once: ``fl32(t + d) == s`` wherever ``|s| >= 2^-28 |t|``
    (``s - t`` then fits in 53 bits, or ``t`` is too small to matter); a weight that shrinks further
    loses bits in ``d`` itself, and the fp64 sum stays within ``2^-52 (|s| + |t|)`` of ``s``."""
    g = torch.Generator().manual_seed(0)
    n = 200_000
    t = torch.randn(n, generator=g) * 10 ** torch.randint(-4, 2, (n,), generator=g).float()
    shrink = 2.0 ** -torch.randint(0, 61, (n,), generator=g).float()  # s from t's size down to 2^-60 |t|
    s = (t * shrink * (torch.rand(n, generator=g) + 0.5) * torch.where(torch.rand(n, generator=g) < 0.2, -1.0, 1.0))
    s[: n // 10] = torch.randn(n // 10, generator=g) * 1e3  # and some weights that grow far above t
    d = extract_delta({"w": s}, {"w": t}, dtype=torch.float64)["w"]
    merged = merge_delta({"w": t}, {"w": d})["w"]
    assert merged.dtype == torch.float32
    exact = s.abs().double() >= 2.0**-28 * t.abs().double()
    assert torch.equal(merged[exact], s[exact])
    assert int((merged != s).sum()) > 0 and not bool(exact[merged != s].any())  # misses exist, all below 2^-28
    total = t.double() + d  # the fp64 sum before the final rounding
    assert bool(((total - s.double()).abs() <= 2.0**-52 * (s.double().abs() + t.double().abs())).all())


def test_delta_scheduler_copies_the_schedule_keys_zero_snr_included():
    """The beta-schedule keys a delta's PeRFlow scheduler takes from a base config are
    ``perflow.schedule.SCHEDULE_KEYS``: the old literal tuple plus ``rescale_betas_zero_snr``, which
    used to be dropped, so a zero-terminal-SNR teacher's merged scheduler sampled another ``abar``."""
    from perflow.delta.keys import BETA_KEYS
    from perflow.delta.merge import perflow_scheduler_from_metadata

    assert set(BETA_KEYS) == {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                              "rescale_betas_zero_snr"}
    base = {"num_train_timesteps": 500, "beta_start": 0.001, "beta_end": 0.02, "beta_schedule": "linear",
            "set_alpha_to_one": True, "rescale_betas_zero_snr": True, "steps_offset": 1}
    meta = {"num_time_windows": 2, "prediction_type": "velocity"}
    cfg = perflow_scheduler_from_metadata(meta, base).config
    assert (cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule) == (500, 0.001, 0.02, "linear")
    assert cfg.set_alpha_to_one is True and cfg.rescale_betas_zero_snr is True
