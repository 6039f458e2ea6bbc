"""Denoiser adapters: conditions, CFG-sync vs CFG-fixed, caption dropout, SD/SDXL conditioning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from perflow.denoisers import Condition, guided_teacher_denoiser, unet_denoiser
from perflow.tiny import tiny_sd15_pipeline, tiny_sdxl_pipeline
from perflow.training.teachers import SDTeacher, SDXLTeacher, teacher_from_pipeline


pytestmark = pytest.mark.usefixtures("one_thread")


class ProbeUNet(nn.Module):
    """A fake conditional UNet whose output is a known function of its condition and input:
    ``out = z + mean(encoder_hidden_states) + 1e-3 t``."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, z, t, encoder_hidden_states, added_cond_kwargs=None, return_dict=False):
        c = encoder_hidden_states.float().mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return (z + c + 1e-3 * t.float().view(-1, 1, 1, 1) + self.w,)


def _conds(batch: int = 4):
    g = torch.Generator().manual_seed(0)
    cond = Condition(torch.randn(batch, 3, 5, generator=g) + 2.0)
    null = Condition(torch.randn(1, 3, 5, generator=g))
    return cond, null.repeat(batch)


def test_condition_where_cat_repeat():
    cond, uncond = _conds()
    mask = torch.tensor([True, False, True, False])
    mixed = cond.where(mask, uncond)
    assert torch.equal(mixed.encoder_hidden_states[0], uncond.encoder_hidden_states[0])
    assert torch.equal(mixed.encoder_hidden_states[1], cond.encoder_hidden_states[1])
    both = cond.cat(uncond)
    assert len(both) == 8 and torch.equal(both.encoder_hidden_states[4:], uncond.encoder_hidden_states)
    with pytest.raises(ValueError, match="batch-1"):
        cond.repeat(3)
    with pytest.raises(ValueError, match="missing on one side"):
        Condition(cond.encoder_hidden_states, torch.zeros(4, 2), torch.zeros(4, 6)).cat(cond)


def test_condition_tensors_is_public_and_in_field_order():
    cond, _ = _conds()
    sdxl = Condition(cond.encoder_hidden_states, torch.zeros(4, 2), torch.zeros(4, 6))
    assert list(cond.tensors()) == ["encoder_hidden_states", "text_embeds", "time_ids"]
    assert cond.tensors()["text_embeds"] is None and sdxl.tensors()["time_ids"] is sdxl.time_ids


def test_cfg_sync_uses_the_students_condition_at_scale_one():
    unet, (cond, uncond) = ProbeUNet(), _conds()
    z, i = torch.randn(4, 1, 2, 2), torch.tensor([999, 500, 10, 0])
    dropped = torch.tensor([False, True, False, False])
    cond_s = cond.where(dropped, uncond)
    out = guided_teacher_denoiser(unet, cond_s, uncond, dropped, "sync", guidance_scale=7.5)(z, i)
    expected = unet(z, i, cond_s.encoder_hidden_states)[0]
    torch.testing.assert_close(out, expected)
    # the dropped row sees the null condition, exactly like the student
    torch.testing.assert_close(out[1], unet(z, i, uncond.encoder_hidden_states)[0][1])


def test_cfg_fixed_guides_and_dropped_caption_is_unconditional():
    unet, (cond, uncond) = ProbeUNet(), _conds()
    z, i = torch.randn(4, 1, 2, 2), torch.tensor([999, 500, 10, 0])
    dropped = torch.tensor([False, True, False, True])
    cond_s = cond.where(dropped, uncond)
    w = 7.5
    out = guided_teacher_denoiser(unet, cond_s, uncond, dropped, "fixed", w)(z, i)
    e_c = unet(z, i, cond.encoder_hidden_states)[0]
    e_u = unet(z, i, uncond.encoder_hidden_states)[0]
    guided = e_u + w * (e_c - e_u)
    keep = ~dropped
    torch.testing.assert_close(out[keep], guided[keep])
    # a dropped caption: the unconditional teacher, not the guided target of the original caption
    torch.testing.assert_close(out[dropped], e_u[dropped])
    assert (out[dropped] - guided[dropped]).abs().min() > 1.0
    # all captions dropped: one unconditional evaluation
    all_dropped = torch.ones(4, dtype=torch.bool)
    out_all = guided_teacher_denoiser(unet, uncond, uncond, all_dropped, "fixed", w)(z, i)
    torch.testing.assert_close(out_all, e_u)
    with pytest.raises(ValueError, match="cfg_mode"):
        guided_teacher_denoiser(unet, cond, uncond, None, "always", w)


def test_unet_denoiser_per_sample_guidance():
    unet, (cond, uncond) = ProbeUNet(), _conds()
    z, i = torch.randn(4, 1, 2, 2), torch.full((4,), 300)
    w = torch.tensor([1.0, 2.0, 0.0, 5.0])
    out = unet_denoiser(unet, cond, uncond, w)(z, i)
    e_c, e_u = unet(z, i, cond.encoder_hidden_states)[0], unet(z, i, uncond.encoder_hidden_states)[0]
    torch.testing.assert_close(out, e_u + w.view(-1, 1, 1, 1) * (e_c - e_u))


@pytest.fixture(scope="module")
def sd_pipe():
    return tiny_sd15_pipeline(seed=0)


@pytest.fixture(scope="module")
def sdxl_pipe():
    return tiny_sdxl_pipeline(seed=0)


def test_sd_teacher_conditioning_matches_the_pipeline(sd_pipe):
    teacher = teacher_from_pipeline(sd_pipe)
    assert isinstance(teacher, SDTeacher) and teacher.prediction_type == "epsilon"
    captions = ["a photo of a cat", "a red dog"]
    cond = teacher.condition({"pixel_values": torch.zeros(2, 3, 16, 16), "caption": captions})
    pos, neg = sd_pipe.encode_prompt(captions, "cpu", 1, True, negative_prompt=["", ""])
    torch.testing.assert_close(cond.encoder_hidden_states, pos)
    torch.testing.assert_close(teacher.uncond(cond).encoder_hidden_states, neg)
    dropped = teacher.drop(cond, torch.tensor([False, True]))
    torch.testing.assert_close(dropped.encoder_hidden_states[1], neg[1])
    torch.testing.assert_close(dropped.encoder_hidden_states[0], pos[0])


def test_sd_teacher_guided_denoiser_matches_manual_cfg(sd_pipe):
    teacher = teacher_from_pipeline(sd_pipe)
    cond = teacher.condition({"pixel_values": torch.zeros(2, 3, 16, 16), "caption": ["a cat", "a dog"]})
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    i = torch.tensor([900, 300])
    out = guided_teacher_denoiser(teacher.unet, cond, teacher.uncond(cond), None, "fixed", 3.0)(z, i)
    with torch.no_grad():
        e_c = teacher.unet(z, i, encoder_hidden_states=cond.encoder_hidden_states).sample
        e_u = teacher.unet(z, i, encoder_hidden_states=teacher.uncond(cond).encoder_hidden_states).sample
    torch.testing.assert_close(out, e_u + 3.0 * (e_c - e_u), rtol=1e-4, atol=1e-5)


def test_sdxl_time_ids_from_real_image_sizes(sdxl_pipe):
    teacher = teacher_from_pipeline(sdxl_pipe)
    assert isinstance(teacher, SDXLTeacher)
    batch = {
        "pixel_values": torch.zeros(2, 3, 16, 16),
        "caption": ["a photo of a cat", "a blue painting"],
        "original_size": torch.tensor([[480, 640], [1024, 768]]),
        "crop_top_left": torch.tensor([[0, 5], [12, 0]]),
    }
    cond = teacher.condition(batch)
    proj = sdxl_pipe.text_encoder_2.config.projection_dim
    for b in range(2):
        expected = sdxl_pipe._get_add_time_ids(
            tuple(batch["original_size"][b].tolist()), tuple(batch["crop_top_left"][b].tolist()), (16, 16),
            dtype=torch.float32, text_encoder_projection_dim=proj,
        )
        torch.testing.assert_close(cond.time_ids[b: b + 1], expected)
    # text embeddings and the unconditional input, as the SDXL pipeline builds them
    pe, npe, pooled, npooled = sdxl_pipe.encode_prompt(batch["caption"], device="cpu", do_classifier_free_guidance=True)
    torch.testing.assert_close(cond.encoder_hidden_states, pe)
    torch.testing.assert_close(cond.text_embeds, pooled)
    unc = teacher.uncond(cond)
    torch.testing.assert_close(unc.encoder_hidden_states, npe)
    torch.testing.assert_close(unc.text_embeds, npooled)
    assert torch.equal(unc.time_ids, cond.time_ids)  # dropping the caption keeps the size conditioning
    # the UNet really sees the time ids: other sizes change the output
    z, i = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 500])
    out = unet_denoiser(teacher.unet, cond)(z, i)
    other = Condition(cond.encoder_hidden_states, cond.text_embeds, cond.time_ids + 64)
    assert (unet_denoiser(teacher.unet, other)(z, i) - out).abs().max() > 1e-4
    with pytest.raises(ValueError, match="original_size"):
        teacher.condition({"pixel_values": batch["pixel_values"], "caption": batch["caption"]})
