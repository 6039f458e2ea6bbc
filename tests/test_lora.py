"""LoRA export of a delta: SVD accuracy, diffusers' own loader, scaling and combining adapters."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from perflow.delta import extract_delta, load_delta, merge_delta
from perflow.delta import delta_to_lora, error_table, lora_to_delta, save_lora
from perflow.tiny import tiny_sd15_pipeline, tiny_sd15_unet

from delta_helpers import perturbed, run_cli

FULL_RANK = 1024  # above every (out, in k k) dimension of the tiny UNet: the SVD keeps all singular values


@pytest.fixture(scope="module")
def setup():
    teacher = tiny_sd15_unet(0)
    student = perturbed(teacher, size=1e-2)
    delta = extract_delta(student, teacher)
    return teacher, delta, delta_to_lora(delta, FULL_RANK, model=teacher, progress=False)


def _bound(d: torch.Tensor, rank: int) -> float:
    """Elementwise error bound of ``B A`` with fp32-rounded factors of an exact SVD:
    ``|sum_i s_i u_i v_i^T (rel. errors 2^-24 each)| <= 2^-23 sum_i s_i <= 2^-23 sqrt(r) ||D||_F``,
    doubled for the fp64 SVD and the product's own rounding."""
    return 2.0**-22 * math.sqrt(rank) * float(d.double().norm())


def test_targets_are_exactly_the_linear_and_conv_weights(setup):
    teacher, delta, export = setup
    modules = dict(teacher.named_modules())
    for key in delta:
        module = modules.get(key.rsplit(".", 1)[0])
        is_target = key.endswith(".weight") and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
        assert (is_target and key.rsplit(".", 1)[0] in export.ranks) or (not is_target and key in export.rest), key
    assert len(export.ranks) + len(export.rest) == len(delta)


def test_full_rank_lora_reproduces_delta(setup):
    _, delta, export = setup
    rebuilt = lora_to_delta(export.lora)
    assert set(rebuilt) == {f"{m}.weight" for m in export.ranks}
    for key, d in rebuilt.items():
        assert d.shape == delta[key].shape
        err = float((d - delta[key]).abs().max())
        assert err <= _bound(delta[key], export.ranks[key[: -len(".weight")]]), key
        assert export.layer_error(key[: -len(".weight")], export.ranks[key[: -len(".weight")]]) == 0.0


def test_reported_errors_match_the_factors_and_decrease_with_rank(setup):
    _, delta, _ = setup
    export = delta_to_lora(delta, 4, progress=False)
    rebuilt = lora_to_delta(export.lora)
    num = den = 0.0
    for key, d in rebuilt.items():
        true = float((d.double() - delta[key].double()).norm() / delta[key].double().norm())
        assert abs(true - export.layer_error(key[: -len(".weight")], 4)) < 1e-5, key
        num += float((d.double() - delta[key].double()).norm() ** 2)
        den += float(delta[key].double().norm() ** 2)
    assert abs(math.sqrt(num / den) - export.overall_error(4)) < 1e-5
    errors = [export.overall_error(r) for r in (1, 2, 4, 8, 16, 64, FULL_RANK)]
    assert all(a >= b for a, b in zip(errors, errors[1:])) and errors[-1] == 0.0
    # the rest's share of the norm, from the tensors themselves
    rest_sq = sum(float(delta[k].double().norm() ** 2) for k in export.rest)
    total_sq = sum(float(v.double().norm() ** 2) for v in delta.values())
    assert abs(export.rest_share - math.sqrt(rest_sq / total_sq)) < 1e-9
    table = error_table(export, [1, 4], per_layer=True)
    assert "conv_in" in table and "whole delta, rest dropped" in table


def test_lora_loads_fuses_and_scales_through_diffusers(tmp_path, setup):
    teacher, delta, export = setup
    save_lora(export, str(tmp_path / "lora.safetensors"), {"num_time_windows": 4})
    with safe_open(str(tmp_path / "lora.safetensors"), framework="pt") as f:
        assert "lora_adapter_metadata" in f.metadata()
    base = {k: v.clone() for k, v in teacher.state_dict().items()}
    for scale in (1.0, 0.5):
        pipe = tiny_sd15_pipeline()
        pipe.load_lora_weights(str(tmp_path / "lora.safetensors"), adapter_name="perflow")
        pipe.set_adapters(["perflow"], adapter_weights=[scale])
        pipe.fuse_lora(adapter_names=["perflow"])
        pipe.unload_lora_weights()
        got = pipe.unet.state_dict()
        for m, r in export.ranks.items():
            key = f"{m}.weight"
            ref = base[key] + scale * delta[key]
            bound = scale * _bound(delta[key], r) + 2 * float(ref.abs().max()) * 2.0**-24
            assert float((got[key] - ref).abs().max()) <= bound, key
        for key in export.rest:  # a LoRA does not carry biases and norms
            assert torch.equal(got[key], base[key]), key


def test_lora_combines_with_another_adapter(tmp_path, setup):
    teacher, delta, export = setup
    other = extract_delta(perturbed(teacher, seed=7, size=1e-2), teacher)
    other_export = delta_to_lora(other, FULL_RANK, model=teacher, progress=False)
    save_lora(export, str(tmp_path / "perflow.safetensors"))
    save_lora(other_export, str(tmp_path / "style.safetensors"))
    pipe = tiny_sd15_pipeline()
    pipe.load_lora_weights(str(tmp_path / "perflow.safetensors"), adapter_name="perflow")
    pipe.load_lora_weights(str(tmp_path / "style.safetensors"), adapter_name="style")
    pipe.set_adapters(["perflow", "style"], adapter_weights=[1.0, 1.0])
    pipe.fuse_lora(adapter_names=["perflow", "style"])
    pipe.unload_lora_weights()
    got, base = pipe.unet.state_dict(), teacher.state_dict()
    for m, r in export.ranks.items():
        key = f"{m}.weight"
        ref = base[key] + delta[key] + other[key]
        bound = _bound(delta[key], r) + _bound(other[key], r) + 3 * float(ref.abs().max()) * 2.0**-24
        assert float((got[key] - ref).abs().max()) <= bound, key


def test_cli_to_lora_writes_rest_and_lora_plus_rest_is_the_delta(tmp_path, setup, capsys):
    teacher, delta, _ = setup
    from perflow.delta import base_model_info, save_delta

    save_delta(delta, tmp_path / "d.safetensors", {"base_model": base_model_info(teacher)})
    assert run_cli(["delta", "to-lora", "--delta", str(tmp_path / "d.safetensors"), "--rank", "8",
                    "-o", str(tmp_path / "l.safetensors"), "--report-ranks", "1,8"]) == 0
    out = capsys.readouterr().out
    assert "| r=1 | r=8 |" in out and "of ||delta||" in out
    rest, meta = load_delta(tmp_path / "l.rest.safetensors")
    assert meta["part"].startswith("non-LoRA") and meta["base_model"]["keys_fingerprint"]
    low = delta_to_lora(delta, 8, progress=False)
    assert set(rest) == set(low.rest)
    # fused LoRA + merged rest = teacher + (rank-8 delta on weights, exact delta elsewhere)
    pipe = tiny_sd15_pipeline()
    pipe.load_lora_weights(str(tmp_path / "l.safetensors"), adapter_name="perflow")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    with pytest.raises(ValueError, match="in the model but not in the delta"):
        merge_delta(pipe.unet, rest)  # a bare dict of the rest is refused: it does not cover the weights
    merge_delta(pipe.unet, tmp_path / "l.rest.safetensors")  # the file says it is partial
    got, base = pipe.unet.state_dict(), teacher.state_dict()
    approx = {**lora_to_delta(low.lora), **rest}
    assert set(approx) == set(delta)
    for key, d in approx.items():
        ref = base[key] + d
        assert float((got[key] - ref).abs().max()) <= 1e-6 * max(1.0, float(ref.abs().max())), key
    # the LoRA file itself reads back as its low-rank (partial) delta; with the rest it covers everything
    low_delta, low_meta = load_delta(tmp_path / "l.safetensors")
    assert low_meta["partial"] is True and set(low_delta) == {f"{m}.weight" for m in low.ranks}
    assert all(torch.allclose(low_delta[k], v) for k, v in lora_to_delta(low.lora).items())
    from diffusers import UNet2DConditionModel

    teacher.save_pretrained(tmp_path / "unet")
    assert run_cli(["delta", "merge", "--delta", str(tmp_path / "l.safetensors"), "--extra",
                    str(tmp_path / "l.rest.safetensors"), "--into", str(tmp_path / "unet"), "-o",
                    str(tmp_path / "merged")]) == 0
    on_disk = UNet2DConditionModel.from_pretrained(tmp_path / "merged").state_dict()
    for key, d in approx.items():
        ref = base[key] + d
        assert float((on_disk[key] - ref).abs().max()) <= 1e-6 * max(1.0, float(ref.abs().max())), key
    with pytest.raises(ValueError, match="rank"):
        delta_to_lora(delta, 0)


def _tiny_sd3_transformer(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
        pos_embed_max_size=16,
    ).eval()


def _lora_layers(model: torch.nn.Module) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, LoraLayer) for m in model.modules())


def test_lora_keys_follow_the_denoiser_role_and_every_layer_lands(tmp_path, setup):
    """A transformer's LoRA is ``transformer.``-prefixed (an SD3 pipeline skips ``unet.`` keys without a
    word): after ``pipe.load_lora_weights`` every exported layer carries a LoRA, and fused it adds ``B A``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from perflow.delta import base_model_info, save_delta

    teacher = _tiny_sd3_transformer(0)
    student = _tiny_sd3_transformer(0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=g))
    delta = extract_delta(student, teacher)
    save_delta(delta, tmp_path / "d.safetensors", {"base_model": base_model_info(teacher)})
    assert run_cli(["delta", "to-lora", "--delta", str(tmp_path / "d.safetensors"), "--rank", "4",
                    "-o", str(tmp_path / "l.safetensors")]) == 0
    with safe_open(str(tmp_path / "l.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") for k in keys)
    exported = {k.split(".", 1)[1].rsplit(".lora_", 1)[0] for k in keys}

    pipe = StableDiffusion3Pipeline(
        transformer=_tiny_sd3_transformer(0), scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )
    pipe.load_lora_weights(str(tmp_path / "l.safetensors"), adapter_name="perflow")
    assert _lora_layers(pipe.transformer) == len(exported) > 0
    pipe.fuse_lora(adapter_names=["perflow"])
    pipe.unload_lora_weights()
    low, _ = load_delta(tmp_path / "l.safetensors")  # B A per module, from the written factors
    got, base = pipe.transformer.state_dict(), teacher.state_dict()
    assert set(low) == {f"{m}.weight" for m in exported}
    for key, d in low.items():
        ref = base[key] + d
        assert float((got[key] - ref).abs().max()) <= 4 * float(ref.abs().max()) * 2.0**-24, key

    # a UNet's LoRA keeps the unet. prefix and lands layer for layer in an SD pipeline
    _, _, export = setup
    save_lora(export, str(tmp_path / "unet-lora.safetensors"))
    assert all(k.startswith("unet.") for k in export.lora)
    sd_pipe = tiny_sd15_pipeline()
    sd_pipe.load_lora_weights(str(tmp_path / "unet-lora.safetensors"), adapter_name="perflow")
    assert _lora_layers(sd_pipe.unet) == len(export.ranks)
