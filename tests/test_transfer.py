"""The transfer report (``perflow delta report``) on tiny SD1.5 pipelines: a fine-tuned copy, a base +
LoRA and a ControlNet pipeline, end to end; and the mismatches it must refuse in one line."""

from __future__ import annotations

import json

import pytest
import torch

from perflow.delta import base_model_info, extract_delta, save_delta
from perflow.tiny import tiny_controlnet, tiny_sd15_pipeline, tiny_sd15_unet

from delta_helpers import perturbed

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = dict(num_samples=20, reference_steps=12, resolution=16, batch_size=20, spacings=("trailing",))


def _save_pipe(pipe, folder):
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny SD1.5 base pipeline folder, a fine-tuned copy of it, and a delta learned on the base."""
    root = tmp_path_factory.mktemp("transfer")
    base = tiny_sd15_pipeline(0)
    _save_pipe(base, root / "base")
    tuned = tiny_sd15_pipeline(0)
    tuned.unet.load_state_dict(perturbed(base.unet, seed=3, size=2e-3).state_dict())
    _save_pipe(tuned, root / "finetune")
    student = perturbed(base.unet, seed=1, size=1e-3)
    meta = {"base_model": base_model_info(base.unet, name="tiny-sd15"), "num_time_windows": 4,
            "prediction_type": "diff_eps"}
    save_delta(extract_delta(student, base.unet), root / "delta.safetensors", meta)
    zero = {k: torch.zeros_like(v) for k, v in extract_delta(student, base.unet).items()}
    save_delta(zero, root / "zero_ddim_eps.safetensors", {**meta, "prediction_type": "ddim_eps"})
    return root, base


def _report(**kw):
    from perflow.evaluation.transfer import TransferConfig, transfer_report

    return transfer_report(TransferConfig(**{**FAST, **kw}), progress=False)


def test_report_on_a_fine_tuned_copy_writes_the_verdict_grid_and_json(sd, tmp_path):
    root, _ = sd
    out = tmp_path / "report"
    result = _report(delta=str(root / "delta.safetensors"), target=str(root / "finetune"), prompts=["a photo of a cat"],
                     steps=(4, 8), baselines=("ddim", "dpmsolver++", "unipc"), output_dir=str(out))
    names = {(r["sampler"], r["steps"]) for r in result.rows}
    for n in (4, 8):
        assert {("target + delta", n), ("target ddim", n), ("target dpmsolver++", n), ("target unipc", n)} <= names
    v = result.meta["verdict"]
    best = min(result.row(f"target {b}", 4)["paired_mse"] for b in ("ddim", "dpmsolver++", "unipc"))
    assert result.meta["transfers"] == (result.row("target + delta", 4)["paired_mse"] < best)
    assert f"{result.row('target + delta', 4)['paired_mse']:.4g}" in v and "straightness within windows" in v
    saved = json.loads((out / "transfer_report.json").read_text())
    assert saved["meta"]["verdict"] == v and (out / "transfer_grid.png").stat().st_size > 1000
    assert "Verdict:" in (out / "transfer_report.md").read_text()


def test_the_reports_paired_mse_is_what_diffusers_pipelines_give_from_the_same_noise(sd):
    """Independent path: the target pipeline with the delta merged and diffusers' own ``__call__`` (PeRFlow
    scheduler, 4 steps, CFG 7.5) against the target pipeline with trailing DDIM at the reference steps, both
    from the report's seeded noise: their MSE is the report's ``target + delta`` paired MSE."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from perflow.delta import merge_delta

    root, _ = sd
    prompts = ["a photo of a cat", "a red dog"]
    result = _report(delta=str(root / "delta.safetensors"), target=str(root / "finetune"), prompts=prompts,
                     steps=(4,), baselines=("ddim",), guidance_scale=7.5)
    n = FAST["num_samples"]
    noise = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cycled = [prompts[i % 2] for i in range(n)]

    def run(pipe, steps):
        out = pipe(cycled, latents=noise.clone(), num_inference_steps=steps, guidance_scale=7.5, height=16, width=16,
                   output_type="pt").images  # (N, 3, 16, 16) in [0, 1]
        return out * 2 - 1

    pipe = StableDiffusionPipeline.from_pretrained(root / "finetune", safety_checker=None).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    pipe.scheduler = DDIMScheduler.from_config({**config, "timestep_spacing": "trailing"})
    reference = run(pipe, FAST["reference_steps"])
    merge_delta(pipe, str(root / "delta.safetensors"))  # pipe.unet += delta; PeRFlow scheduler
    fast = run(pipe, 4)
    want = (fast.double() - reference.double()).pow(2).mean().item()
    got = result.row("target + delta", 4)["paired_mse"]
    assert want > 1e-4 and abs(got - want) <= 1e-4 * want, (got, want)


def _lora_file(unet, path, seed=5, rank=4, skip=None):
    """A peft LoRA (rank ``rank``, non-zero B) on the attention projections, saved in diffusers' format."""
    import copy

    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    u = copy.deepcopy(unet)
    u.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(seed)
    sd = {k: (torch.randn(v.shape, generator=g) * 0.05).contiguous() for k, v in get_peft_model_state_dict(u).items()}
    out = {f"unet.{k}": v for k, v in sd.items()}
    if skip:
        out = {k.replace(skip[0], skip[1]): v for k, v in out.items()}
    save_file(out, str(path))
    return sd


def test_report_on_a_base_plus_lora_fuses_the_lora_and_runs(sd, tmp_path):
    from perflow.targets import load_target

    root, base = sd
    lora = _lora_file(base.unet, tmp_path / "style.safetensors")
    target = load_target(None, base=str(root / "base"), lora=str(tmp_path / "style.safetensors"))
    # the fused weight is W + B A (alpha = r), computed here independently of peft
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    want = base.unet.state_dict()[f"{name}.weight"] + lora[f"{name}.lora_B.weight"] @ lora[f"{name}.lora_A.weight"]
    torch.testing.assert_close(target.teacher.unet.state_dict()[f"{name}.weight"], want, rtol=1e-5, atol=1e-6)
    assert set(target.teacher.unet.state_dict()) == set(base.unet.state_dict())  # fused and unloaded
    result = _report(delta=str(root / "delta.safetensors"), target=target, prompts=["a photo of a dog"], steps=(4,),
                     baselines=("ddim",))
    assert result.meta["target"].endswith("+ LoRA style.safetensors") and isinstance(result.meta["transfers"], bool)


def test_a_lora_is_fused_as_diffusers_loads_it_alpha_and_key_forms_included(sd, tmp_path):
    """``lora_alpha`` from the file's adapter metadata scales the update (``W + alpha / r B A``), and the older
    diffusers key form (``lora.down`` / ``lora.up``) in a LoRA folder is read as ``load_lora_weights`` reads it."""
    import copy

    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from perflow.targets import load_target

    root, base = sd
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    w = base.unet.state_dict()[f"{name}.weight"]
    for alpha, form in ((16, "peft"), (4, "diffusers")):
        u = copy.deepcopy(base.unet)
        config = LoraConfig(r=4, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        u.add_adapter(config)
        g = torch.Generator().manual_seed(alpha)
        sd_peft = {k: (torch.randn(v.shape, generator=g) * 0.05).contiguous() for k, v in get_peft_model_state_dict(u).items()}
        folder = tmp_path / f"lora-{form}"
        layers = sd_peft if form == "peft" else convert_state_dict_to_diffusers(sd_peft)
        meta = {**config.to_dict(), "target_modules": sorted(config.target_modules)} if form == "peft" else None
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, unet_lora_adapter_metadata=meta)
        target = load_target(None, base=str(root / "base"), lora=str(folder))
        want = w + (alpha / 4) * sd_peft[f"{name}.lora_B.weight"] @ sd_peft[f"{name}.lora_A.weight"]
        torch.testing.assert_close(target.teacher.unet.state_dict()[f"{name}.weight"], want, rtol=1e-5, atol=1e-6)


def _controlnet_pipe(tmp_path):
    """A tiny ``StableDiffusionControlNetPipeline`` folder on the base (a ControlNet that acts) and a folder of
    three control images."""
    from diffusers import StableDiffusionControlNetPipeline
    from PIL import Image

    pipe = tiny_sd15_pipeline(0)
    cn = tiny_controlnet(pipe.unet)
    with torch.no_grad():  # from_unet zero-initialises the output convolutions: make the ControlNet act
        for p in cn.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cpipe = StableDiffusionControlNetPipeline(**{k: getattr(pipe, k) for k in (
        "vae", "text_encoder", "tokenizer", "unet", "scheduler")}, controlnet=cn, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    _save_pipe(cpipe, tmp_path / "cn_pipe")
    images = tmp_path / "control"
    images.mkdir()
    for i in range(3):
        Image.fromarray((torch.rand(16, 16, 3) * 255).byte().numpy()).save(images / f"{i}.png")
    return tmp_path / "cn_pipe", images


def test_report_on_a_controlnet_pipeline_uses_the_controlnet(sd, tmp_path):
    from perflow.targets import load_target

    root, _ = sd
    folder, images = _controlnet_pipe(tmp_path)
    target = load_target(str(folder), control_images=str(images))
    ctrl = target.control_images[:2]
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 500])
    ehs = torch.randn(2, 16, 32)
    with torch.no_grad():
        plain = target.teacher.unet.unet(z, t, ehs).sample
        driven = target.teacher.unet(z, t, ehs, controlnet_cond=ctrl).sample
    assert (plain - driven).abs().max() > 1e-4  # the control image reaches the UNet
    result = _report(delta=str(root / "delta.safetensors"), target=target, prompts=["a photo of a cat"], steps=(4,),
                     baselines=("ddim",))
    assert result.meta["target"].endswith("+ ControlNet") and result.row("target + delta", 4)["paired_mse"] > 0


def test_cli_adapts_a_delta_to_a_controlnet_pipeline_data_free(sd, tmp_path, capsys):
    """``perflow delta adapt --data-free`` on a ControlNet pipeline folder: the UNet is trained with the ControlNet in
    the loop on the control images and prompts alone (no image folder), and the adapted delta covers the UNet only.
    Without ``--data-free`` it is refused in one line."""
    from safetensors.torch import load_file

    from perflow.cli import main

    root, base = sd
    folder, images = _controlnet_pipe(tmp_path)
    args = ["delta", "adapt", "--delta", str(root / "delta.safetensors"), "--target", str(folder), "--control-images",
            str(images), "--prompts", "a photo of a cat", "a red digit", "--resolution", "16", "--num-samples", "20",
            "--reference-steps", "8", "--budget-steps", "2", "--check-every", "2", "--threads", "1",
            "--set", "batch_size=4", "--set", "num_solver_steps=1", "--set", "tracker=none",
            "--set", "fidelity_check_every=0", "--set", "lr_warmup_steps=0"]
    code = main(args + ["--output-dir", str(tmp_path / "refused")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and "--data-free" in err[-1] and "Traceback" not in "\n".join(err), err
    code = main(args + ["--output-dir", str(tmp_path / "adapted"), "--data-free"])
    assert code in (0, 1), capsys.readouterr().err
    state = json.loads((tmp_path / "adapted" / "adapt.json").read_text())
    assert state["settings"]["data_free"] is True and [c["step"] for c in state["checks"]] == [0, 2]  # it trained
    adapted = load_file(str(tmp_path / "adapted" / "run" / "delta.safetensors"))
    assert set(adapted) <= set(base.unet.state_dict()) and any(v.abs().max() > 0 for v in adapted.values())


# ---- mismatches: one line, exit 2 -----------------------------------------------------------------------


def _cli(argv, capsys):
    from perflow.cli import main

    code = main(["delta", "report", "--num-samples", "20", "--reference-steps", "8", "--resolution", "16",
                 "--steps", "4", "--baselines", "ddim", "--spacings", "trailing", "--prompts", "a cat", *argv])
    text = capsys.readouterr().err
    assert "Traceback" not in text
    return code, [line for line in text.splitlines() if line.startswith("perflow delta:")]  # progress bars aside


def test_a_delta_of_another_architecture_is_refused(sd, tmp_path, capsys):
    root, _ = sd
    other = tiny_sd15_unet(0, cross_attention_dim=64)
    save_delta(extract_delta(perturbed_like(other), other), tmp_path / "other.safetensors",
               {"base_model": base_model_info(other), "num_time_windows": 4, "prediction_type": "diff_eps"})
    code, err = _cli(["--delta", str(tmp_path / "other.safetensors"), "--target", str(root / "finetune")], capsys)
    assert code == 2 and len(err) == 1 and "another base model (architecture differs)" in err[0], err


def perturbed_like(unet):
    import copy

    out = copy.deepcopy(unet)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(1e-3)
    return out


def test_a_delta_recording_other_base_weights_is_refused(sd, tmp_path, capsys):
    root, base = sd
    _save_pipe(tiny_sd15_pipeline(7), tmp_path / "other_base")  # same architecture, other weights
    _lora_file(base.unet, tmp_path / "style.safetensors")
    code, err = _cli(["--delta", str(root / "delta.safetensors"), "--base", str(tmp_path / "other_base"),
                      "--lora", str(tmp_path / "style.safetensors")], capsys)
    assert code == 2 and len(err) == 1 and "records base weights" in err[0], err


def test_a_lora_whose_keys_do_not_match_is_refused(sd, tmp_path, capsys):
    root, base = sd
    _lora_file(base.unet, tmp_path / "bad.safetensors", skip=("attn1.to_q", "attn1.to_query"))
    code, err = _cli(["--delta", str(root / "delta.safetensors"), "--base", str(root / "base"),
                      "--lora", str(tmp_path / "bad.safetensors")], capsys)
    assert code == 2 and len(err) == 1 and "keys do not match the target's UNet" in err[0] and "to_query" in err[0], err


def test_a_controlnet_of_another_base_is_refused(sd, tmp_path, capsys):
    root, _ = sd
    cn = tiny_controlnet(tiny_sd15_unet(0, cross_attention_dim=64))
    cn.save_pretrained(tmp_path / "cn", safe_serialization=True)
    code, err = _cli(["--delta", str(root / "delta.safetensors"), "--target", str(root / "finetune"),
                      "--controlnet", str(tmp_path / "cn"), "--control-images", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1 and "does not match the target's UNet" in err[0] and "cross_attention_dim" in err[0], err


def test_cli_report_prints_the_verdict_and_writes_the_files(sd, tmp_path, capsys):
    from perflow.cli import main

    root, _ = sd
    code = main(["delta", "report", "--delta", str(root / "delta.safetensors"), "--target", str(root / "finetune"),
                 "--num-samples", "20", "--reference-steps", "8", "--resolution", "16", "--steps", "4",
                 "--baselines", "ddim", "--spacings", "trailing", "--prompts", "a cat", "--threads", "1",
                 "--output-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0 and "| target + delta | 4 |" in out
    verdict = [line for line in out.splitlines() if line.startswith("perflow delta report: the delta ")]
    saved = json.loads((tmp_path / "out" / "transfer_report.json").read_text())
    assert verdict == [f"perflow delta report: {saved['meta']['verdict']}"]
    assert saved["meta"]["command"].startswith("perflow delta report --delta ")


def test_a_single_file_target_with_its_base_loads_the_fine_tuned_unet(sd, tmp_path):
    from perflow.delta.formats import unet_to_ldm_state_dict
    from perflow.io import save_safetensors
    from perflow.targets import load_target
    from perflow.training.teachers import load_teacher

    root, base = sd
    tuned = load_teacher(str(root / "finetune")).unet
    save_safetensors(unet_to_ldm_state_dict(tuned.state_dict(), dict(tuned.config)), tmp_path / "model.safetensors")
    target = load_target(str(tmp_path / "model.safetensors"), base=str(root / "base"))
    got, want = target.teacher.unet.state_dict(), tuned.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(got["conv_in.weight"], base.unet.state_dict()["conv_in.weight"])  # not the base's
    with pytest.raises(ValueError, match="give --base"):
        load_target(str(tmp_path / "model.safetensors"))
