"""The trainer: loss goes down, resume is bit-exact, outputs load, data, config and CLI."""

from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from perflow.training import TrainConfig, load_config, train
from perflow.training.config_io import from_dict
from perflow.training.data import ImageFolderDataset, ResumableBatchSampler, TarShardDataset
from perflow.objective import reflow_loss, window_end_weight
from perflow.schedule import DiscreteVPSchedule
from perflow.training.loop import boundaries_of, training_loss, with_parameterization
from perflow.tiny import tiny_class_teacher
from perflow.time_sampling import make_time_sampler, u_shaped_fraction


pytestmark = pytest.mark.usefixtures("one_thread")


def _digits(n: int = 256):
    from perflow.builtin.digits import load_digits_dataset

    ds = load_digits_dataset("train", 8)
    return torch.utils.data.Subset(ds, list(range(n)))


def _fast(tmp_path, **kw):
    base = dict(
        batch_size=8, num_solver_steps=2, learning_rate=1e-3, lr_warmup_steps=0, output_dir=str(tmp_path),
        checkpoint_every=0, validation_every=0, tracker="none", progress=False, save_delta=False, ema_decay=0.9,
    )
    base.update(kw)
    return base


@torch.no_grad()
def _eval_loss(student, teacher, cfg: TrainConfig, batch) -> float:
    """The objective on a fixed batch (fixed t, noise, dropout: a seeded generator)."""
    cfg = with_parameterization(cfg, teacher)  # prediction_type auto: the teacher's default, as the trainer does
    b = boundaries_of(cfg)
    sampler = make_time_sampler(cfg.perflow.time_sampling, b, window_start_prob=cfg.perflow.window_start_prob)
    g = torch.Generator().manual_seed(123)
    return training_loss(batch, cfg, teacher, student, b, DiscreteVPSchedule(teacher.alphas_cumprod), sampler, g,
                         torch.device("cpu")).item()


@pytest.mark.slow
@pytest.mark.parametrize("weighting", ["none", "window_end", "default recipe"])
def test_training_lowers_the_objective(tmp_path, weighting):
    teacher = tiny_class_teacher(seed=0)
    data = _digits(512)
    # the paper's setting (diff_eps, t uniform) with either weighting, and the default recipe
    defaults = TrainConfig().training
    paper = dict(learning_rate=defaults.learning_rate, ema_decay=defaults.ema_decay) if weighting == "default recipe" else dict(
        loss_weighting=weighting, prediction_type="diff_eps", window_start_prob=0.0, window_weights="none")
    cfg = load_config("digits", _fast(tmp_path, max_steps=120, batch_size=16, **paper))
    from perflow.training.data import collate

    held = collate([data[i] for i in range(256)])
    result = train(cfg, teacher=teacher, dataset=data)
    # the objective the run trained: with solver_step_allocation auto its teacher steps per window are the ones it
    # measured and recorded (not n in each window)
    cfg.perflow.num_solver_steps = json.loads((tmp_path / "perflow_training.json").read_text())["solver_steps"]
    before = _eval_loss(teacher.unet, teacher, cfg, held)
    after = _eval_loss(result.student, teacher, cfg, held)
    assert result.global_step == 120 and len(result.losses) == 120
    # the paper's plain MSE drops by well over a third in 120 steps; the window-end weighting puts most
    # weight on samples near window starts, the hardest to fit, so only a decrease is asserted for it
    # (what it is for, a better few-step sampler, is checked below and in benchmarks/digits_eval.py);
    # the default recipe's ddim_eps student starts as the teacher's DDIM, at a far lower loss
    assert after < (0.7 if weighting == "none" else 1.0) * before, (before, after)
    assert result.teacher_evals_per_sample == 2
    # and the 4-step student moved towards the teacher's own ODE solution from the same noise
    from perflow.training.validation import trajectory_error

    cond = teacher.encode_labels(torch.arange(64) % 10)
    errs = [trajectory_error(m, teacher, result.scheduler, cond, (64, 1, 8, 8), 4, 8, torch.Generator().manual_seed(0))
            for m in (teacher.unet, result.student)]
    assert errs[1] < errs[0], errs


def test_data_source_auto_follows_the_path(tmp_path):
    """``data.source: auto``: tar shards (a .tar, a brace list, a glob, a folder of only .tar files) ->
    webdataset; any other path (a folder of images) -> imagefolder; no path -> the built-in digits;
    an explicit source is kept."""
    from perflow.training.data import resolve_source

    images, shards = tmp_path / "images", tmp_path / "shards"
    images.mkdir()
    shards.mkdir()
    (images / "a.png").write_bytes(b"")
    (shards / "s-000.tar").write_bytes(b"")
    assert resolve_source("auto", None) == "digits"
    assert resolve_source("auto", str(images)) == "imagefolder"
    assert resolve_source("auto", str(shards)) == "webdataset"
    for spec in ("data/s-{000..009}.tar", "data/*.tar", "one.tar"):
        assert resolve_source("auto", spec) == "webdataset"
    assert resolve_source("imagefolder", str(shards)) == "imagefolder"
    (shards / "b.png").write_bytes(b"")  # images beside the shards: an image folder
    assert resolve_source("auto", str(shards)) == "imagefolder"


def test_batch_windows_single_puts_each_training_batch_in_one_window(tmp_path, monkeypatch):
    """``perflow.batch_windows: single`` reaches the trainer: every batch's times lie in one window, and over
    the run more than one window is trained; ``mixed`` (the default) mixes windows inside a batch."""
    import perflow.training.loop as loop
    from perflow.windows import window_index

    seen = []
    real = loop.reflow_example

    def spy(*args, **kwargs):
        ex = real(*args, **kwargs)
        seen.append(window_index(ex.t, ex.t.new_tensor([1.0, 0.75, 0.5, 0.25, 0.0])))
        return ex

    monkeypatch.setattr(loop, "reflow_example", spy)
    for mode in ("single", "mixed"):
        seen.clear()
        train("digits", teacher=tiny_class_teacher(), dataset=_digits(64), window_weights="none",
              solver_step_allocation="equal", batch_windows=mode, last_window_fraction=1.0,
              **_fast(tmp_path / mode, max_steps=8))
        one_window = [bool((j == j[0]).all()) for j in seen]
        if mode == "single":
            assert all(one_window) and len({int(j[0]) for j in seen}) > 1
        else:
            assert not all(one_window)


def test_last_window_fraction_places_the_windows_the_student_is_trained_and_sampled_on(tmp_path):
    """``perflow.last_window_fraction`` reaches the trainer (its boundaries) and the exported scheduler; explicit
    ``window_boundaries`` win over it; a value outside (0, 1] is refused before anything loads."""
    from perflow.scheduler import PeRFlowScheduler

    cfg = TrainConfig()
    assert boundaries_of(cfg).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]  # the default: equal windows
    cfg.perflow.last_window_fraction = 0.6
    assert boundaries_of(cfg).tolist() == [1.0, 0.75, 0.5, 0.15, 0.0]
    cfg.perflow.window_boundaries = [1.0, 0.5, 0.2, 0.1, 0.0]
    assert boundaries_of(cfg).tolist() == [1.0, 0.5, 0.2, 0.1, 0.0]
    train("digits", teacher=tiny_class_teacher(), dataset=_digits(32), window_weights="none", last_window_fraction=0.6,
          **_fast(tmp_path / "run", max_steps=1))
    assert PeRFlowScheduler.from_pretrained(tmp_path / "run" / "scheduler").boundaries.tolist() == [1.0, 0.75, 0.5, 0.15, 0.0]
    with pytest.raises(ValueError, match="last_window_fraction"):
        train("digits", teacher=tiny_class_teacher(), dataset=_digits(32), last_window_fraction=0.0,
              **_fast(tmp_path / "bad", max_steps=1))


def test_resume_reproduces_the_uninterrupted_run_bit_exactly(tmp_path, monkeypatch):
    """A run cut after a checkpoint and resumed matches the uninterrupted one bit for bit; with
    ``window_weights: auto`` the resumed run reads the weights its checkpoint recorded (measuring them
    again is refused here) and both runs record them in ``perflow_training.json``."""
    import perflow.objective
    from safetensors.torch import load_file

    kw = dict(max_steps=6, checkpoint_every=3, lr_scheduler="cosine", lr_warmup_steps=2, time_sampling="u_shaped",
              caption_dropout=0.3, keep_checkpoints=5, window_weights="auto")
    data = _digits(64)
    full = train("digits", teacher=tiny_class_teacher(), dataset=data, **_fast(tmp_path / "full", **kw))

    class Crash(RuntimeError):
        pass

    def crash(step, loss):
        if step == 4:  # after the step-3 checkpoint, mid-way to the next one
            raise Crash()

    with pytest.raises(Crash):
        train("digits", teacher=tiny_class_teacher(), dataset=data, callback=crash, **_fast(tmp_path / "cut", **kw))
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["checkpoint-3"]

    def no_measuring(*args, **kwargs):
        raise AssertionError("a resumed run measured the window weights again")

    monkeypatch.setattr(perflow.objective, "window_error_gains", no_measuring)
    resumed = train("digits", teacher=tiny_class_teacher(), dataset=data, resume="latest", **_fast(tmp_path / "cut", **kw))
    assert resumed.global_step == 6
    weights = json.loads((tmp_path / "full" / "perflow_training.json").read_text())["window_weights"]
    assert len(weights) == 4 and weights != [1.0] * 4
    assert json.loads((tmp_path / "cut" / "perflow_training.json").read_text())["window_weights"] == weights
    assert resumed.losses == full.losses
    raw_full = load_file(str(tmp_path / "full" / "checkpoints" / "checkpoint-6" / "model.safetensors"))
    raw_cut = load_file(str(tmp_path / "cut" / "checkpoints" / "checkpoint-6" / "model.safetensors"))
    assert raw_full.keys() == raw_cut.keys()
    assert all(torch.equal(raw_full[k], raw_cut[k]) for k in raw_full)
    ema_full, ema_cut = full.student.state_dict(), resumed.student.state_dict()
    assert all(torch.equal(ema_full[k], ema_cut[k]) for k in ema_full)
    # and training did change the weights (the comparison is not vacuous)
    teacher_sd = tiny_class_teacher().unet.state_dict()
    assert any(not torch.equal(teacher_sd[k], raw_full[k]) for k in raw_full)


def test_outputs_unet_scheduler_delta_and_validation(tmp_path):
    from diffusers import UNet2DConditionModel

    from perflow.delta import load_delta
    from perflow.scheduler import PeRFlowScheduler

    teacher = tiny_class_teacher()
    result = train(
        "digits", teacher=teacher, dataset=_digits(64),
        **_fast(tmp_path, max_steps=2, save_delta=True, validation_every=2, num_time_windows=2,
                prediction_type="velocity"),
    )
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    for k, v in result.student.state_dict().items():
        assert torch.equal(unet.state_dict()[k], v)
    sched = PeRFlowScheduler.from_pretrained(tmp_path / "scheduler")
    assert sched.config.num_time_windows == 2 and sched.config.prediction_type == "velocity"
    assert sched.config.beta_schedule == "scaled_linear"
    delta, meta = load_delta(tmp_path / "delta.safetensors")
    assert meta["num_time_windows"] == 2 and meta["prediction_type"] == "velocity" and meta["cfg_mode"] == "sync"
    teacher_sd = teacher.unet.state_dict()
    for k, v in unet.state_dict().items():
        torch.testing.assert_close(teacher_sd[k].float() + delta[k], v, rtol=0, atol=1e-6)
    assert (tmp_path / "validation" / "step-0000002.png").is_file()
    assert (tmp_path / "label_encoder" / "config.json").is_file()
    summary = json.loads((tmp_path / "perflow_training.json").read_text())
    assert summary["global_step"] == 2

    # a next stage (progressive reflow, K = 2 -> 1) starts from this student, not the teacher
    stage2 = train("digits", teacher=tiny_class_teacher(), dataset=_digits(64), student_init=str(tmp_path),
                   **_fast(tmp_path / "k1", max_steps=1, num_time_windows=1, prediction_type="velocity",
                           learning_rate=0.0, ema_decay=0.0, save_delta=True))
    for k, v in stage2.student.state_dict().items():
        assert torch.equal(v, unet.state_dict()[k])  # lr 0: the student is still the loaded init
    delta2, _ = load_delta(tmp_path / "k1" / "delta.safetensors")
    torch.testing.assert_close(delta2, delta, rtol=0, atol=1e-6)  # the delta stays relative to the teacher


@pytest.fixture()
def image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    root.mkdir()
    lines = []
    for i, (w, h) in enumerate([(24, 20), (20, 30), (16, 16), (40, 18)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
        lines.append(json.dumps({"file_name": f"{i:02d}.png", "text": f"a photo of a cat {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_image_folder_and_tar_shards_agree(image_folder, tmp_path):
    folder = ImageFolderDataset(image_folder, resolution=16)
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, caption in folder.items:
            key = Path(name).stem
            tar.add(image_folder / name, arcname=f"{key}.png")
            txt = tmp_path / f"{key}.txt"
            txt.write_text(caption)
            tar.add(txt, arcname=f"{key}.txt")
    tars = TarShardDataset(str(tmp_path / "shard-{000..000}.tar"), resolution=16)
    assert len(tars) == len(folder) == 4
    for i in range(4):
        a, b = folder[i], tars[i]
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["caption"] == b["caption"]
        assert a["pixel_values"].shape == (3, 16, 16) and a["pixel_values"].abs().max() <= 1
    item = folder[1]  # 20 x 30 (w x h): resized to 16 x 24, centre crop starts 4 rows down
    assert item["original_size"] == (30, 20) and item["crop_top_left"] == (4, 0)


def test_sampler_positions_and_ranks():
    s0 = ResumableBatchSampler(20, 3, num_replicas=2, rank=0, seed=5)
    s1 = ResumableBatchSampler(20, 3, num_replicas=2, rank=1, seed=5)
    assert s0.batches_per_epoch == 3
    it0, it1 = iter(s0), iter(s1)
    first = [(next(it0), next(it1)) for _ in range(6)]
    epoch0 = {i for a, b in first[:3] for i, _ in a + b}
    assert len(epoch0) == 18  # ranks and batches are disjoint within an epoch
    assert first[3][0][0][1] == 1  # the fourth micro-step is in epoch 1
    resumed = iter(ResumableBatchSampler(20, 3, num_replicas=2, rank=1, seed=5, start=4))
    assert next(resumed) == first[4][1]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableBatchSampler(5, 3, num_replicas=2)


def test_sd15_tiny_pipeline_cfg_fixed_trains_and_exports_a_pipeline(image_folder, tmp_path):
    from diffusers import DiffusionPipeline

    from perflow.scheduler import PeRFlowScheduler
    from perflow.tiny import tiny_sd15_pipeline

    pipe = tiny_sd15_pipeline(seed=0)
    out = tmp_path / "out"
    result = train(
        {"data": {"source": "imagefolder", "path": str(image_folder), "resolution": 16}},
        teacher=pipe,
        **_fast(out, max_steps=2, batch_size=2, cfg_mode="fixed", guidance_scale=4.0, prediction_type="ddim_eps",
                caption_dropout=0.5, checkpoint_every=1, save_delta=True),
    )
    assert result.teacher_evals_per_sample == 4  # 2 solver steps x (cond, uncond)
    loaded = DiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert isinstance(loaded.scheduler, PeRFlowScheduler)
    assert loaded.scheduler.config.prediction_type == "ddim_eps"
    for k, v in result.student.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[k], v)
    images = loaded("a photo of a cat", num_inference_steps=4, guidance_scale=1.5, height=16, width=16,
                    output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()


def test_bf16_mixed_precision_keeps_fp32_master_weights(tmp_path):
    from perflow.delta import load_delta

    result = train("digits", teacher=tiny_class_teacher(), dataset=_digits(32),
                   **_fast(tmp_path, max_steps=2, mixed_precision="bf16", ema_decay=0.0, save_delta=True))
    assert all(p.dtype == torch.float32 for p in result.student.parameters())
    assert result.teacher.dtype == torch.bfloat16
    assert all(np.isfinite(result.losses))
    # the delta is taken against the teacher's own fp32 weights, not its bf16 training copy
    delta, _ = load_delta(tmp_path / "delta.safetensors")
    original = tiny_class_teacher().unet.state_dict()
    for k, v in result.student.state_dict().items():
        torch.testing.assert_close(original[k] + delta[k], v, rtol=0, atol=1e-6)


def test_fp16_on_the_cpu_says_it_trains_in_float32(tmp_path, capsys):
    """accelerate applies no fp16 autocast on the CPU: the run is float32, and says so."""
    result = train("digits", teacher=tiny_class_teacher(), dataset=_digits(32),
                   **_fast(tmp_path, max_steps=1, mixed_precision="fp16", ema_decay=0.0))
    assert result.teacher.dtype == torch.float32
    assert "mixed_precision fp16 has no effect on the CPU" in capsys.readouterr().out


def test_window_end_weight_measures_the_window_end_error():
    from perflow.objective import ReflowExample
    from loose_window_args import window_end_from_output
    from perflow.windows import Window, window_coefficients

    teacher = tiny_class_teacher()
    ac = teacher.alphas_cumprod
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0.9, 0.6, 0.3, 0.05], dtype=torch.float64)
    t_s = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
    t_e = t_s - 0.25
    z_s, z_e, pred, target = (torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(4))
    ex = ReflowExample(None, None, target, t, t_s, t_e, z_s, z_e)
    lam, eta = window_coefficients(t_s, t_e, ac, "diff_eps")
    w = window_end_weight(ex.t, Window(ex.t_s, ex.t_e, lam, eta, "diff_eps")).double()
    z = z_s  # any point: the weight does not depend on z
    err = window_end_from_output(pred, z, t, t_s, t_e, lam, eta) - window_end_from_output(target, z, t, t_s, t_e, lam, eta)
    torch.testing.assert_close(reflow_loss(pred, target, "mse", 0.0, w.float()).double(),
                               err.square().flatten(1).mean(1).mean(), rtol=1e-5, atol=0)


def test_u_shaped_time_sampler():
    b = torch.tensor([1.0, 0.6, 0.1, 0.0], dtype=torch.float64)
    sampler = make_time_sampler("u_shaped", b, 4.0)
    t = sampler(20000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert t.dtype == torch.float64 and bool(((t >= 0) & (t <= 1)).all())
    # windows are picked in proportion to their lengths (0.4, 0.5, 0.1); 3-sigma binomial bounds
    for lo, hi, p in ((0.6, 1.0, 0.4), (0.1, 0.6, 0.5), (0.0, 0.1, 0.1)):
        frac = ((t > lo) & (t <= hi)).double().mean().item()
        assert abs(frac - p) < 3 * (p * (1 - p) / t.numel()) ** 0.5 + 1e-3
    # the within-window position follows CDF F(u) = (sinh(a(u - 1/2)) + sinh(a/2)) / (2 sinh(a/2))
    u = ((1.0 - t[t > 0.6]) / 0.4).sort().values
    a = 4.0
    F = (torch.sinh(a * (u - 0.5)) + np.sinh(a / 2)) / (2 * np.sinh(a / 2))
    ecdf = torch.arange(1, u.numel() + 1, dtype=torch.float64) / u.numel()
    assert (F - ecdf).abs().max() < 1.63 / u.numel() ** 0.5  # Kolmogorov-Smirnov at the 1 % level
    r = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(u_shaped_fraction(r, 1e-9 + 0.0), r)


def test_config_files_flags_and_errors(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[training]\nmax_steps = 7\n[perflow]\nwindow_boundaries = [1.0, 0.5, 0.2, 0.0]\n')
    cfg = load_config(toml, {"batch_size": "4", "output.tracker": "none", "data.center_crop": "false"})
    assert cfg.training.max_steps == 7 and cfg.training.batch_size == 4 and cfg.data.center_crop is False
    assert cfg.perflow.num_time_windows == 3
    with pytest.raises(ValueError, match="unknown config field 'max_step'"):
        load_config(toml, {"max_step": 3})
    with pytest.raises(ValueError, match="training.max_steps: expected int"):
        load_config(toml, {"max_steps": "many"})
    with pytest.raises(ValueError, match="perflow.prediction_type must be one of"):
        load_config("digits", {"prediction_type": "epsilon"})
    with pytest.raises(ValueError, match="needs data.path"):
        load_config("digits", {"data.source": "imagefolder"})
    with pytest.raises(FileNotFoundError, match="recipes"):
        load_config("no-such-recipe")
    for name in ("digits", "sd15", "sd21", "sdxl"):
        assert isinstance(from_dict({}), TrainConfig) and load_config(name, {"data.path": "x"}).perflow.num_time_windows == 4


def test_cli_parses_every_field_with_and_without_section(capsys):
    from perflow.cli import train as cli_train

    parser = argparse.ArgumentParser(prog="perflow")
    cli_train.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--config", "digits", "--max_steps", "5", "--perflow.num_solver_steps", "3",
                              "--print-config"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "max_steps: 5" in printed and "num_solver_steps: 3" in printed
    help_text = parser._subparsers._group_actions[0].choices["train"].format_help()
    assert "--training.max_steps" in help_text and "--resume" in help_text and "accelerate launch" in help_text


def test_load_teacher_folders(tmp_path):
    from perflow.tiny import tiny_sd15_pipeline
    from perflow.training import ClassConditionalTeacher, SDTeacher, load_teacher

    pipe = tiny_sd15_pipeline(seed=0, prediction_type="v_prediction")
    pipe.save_pretrained(tmp_path / "sd21ish")
    teacher = load_teacher(tmp_path / "sd21ish")
    assert isinstance(teacher, SDTeacher) and teacher.prediction_type == "v_prediction"
    torch.testing.assert_close(teacher.alphas_cumprod.float(), pipe.scheduler.alphas_cumprod)

    tiny = tiny_class_teacher()
    folder = tmp_path / "class"
    tiny.unet.save_pretrained(folder / "unet")
    tiny.label_encoder.save_pretrained(folder / "label_encoder")
    from diffusers import DDIMScheduler

    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(folder / "scheduler")
    loaded = load_teacher(folder)
    assert isinstance(loaded, ClassConditionalTeacher) and loaded.null_label == 10 and loaded.vae is None
    assert all(torch.equal(a, b) for a, b in zip(loaded.unet.state_dict().values(), tiny.unet.state_dict().values()))

    with pytest.raises(FileNotFoundError, match="label_encoder"):
        (tmp_path / "half" / "unet").mkdir(parents=True)
        load_teacher(tmp_path / "half")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_teacher(tmp_path / "nothing-here")


def test_sd21_style_velocity_student_from_a_pipeline_folder(image_folder, tmp_path):
    from perflow.tiny import tiny_sd15_pipeline

    tiny_sd15_pipeline(seed=1, prediction_type="v_prediction").save_pretrained(tmp_path / "teacher")
    out = tmp_path / "out"
    result = train(
        "sd21", teacher=None,
        **{"model.teacher": str(tmp_path / "teacher"), "data.source": "imagefolder", "data.path": str(image_folder),
           "resolution": 16, "num_workers": 0, "mixed_precision": "no", "gradient_checkpointing": True,
           "gradient_accumulation_steps": 2, **_fast(out, max_steps=2, batch_size=2, validation_every=2,
                                                    validation_prompts=["a cat", ""])},
    )
    assert result.teacher.prediction_type == "v_prediction" and result.scheduler.config.prediction_type == "velocity"
    assert result.global_step == 2 and (out / "validation" / "step-0000002.png").is_file()
    assert (out / "model_index.json").is_file() and (out / "text_encoder").is_dir()


def test_sdxl_cfg_fixed_smoke(image_folder, tmp_path):
    from diffusers import DiffusionPipeline

    from perflow.tiny import tiny_sdxl_pipeline

    out = tmp_path / "out"
    result = train(
        {"data": {"source": "imagefolder", "path": str(image_folder), "resolution": 16}},
        teacher=tiny_sdxl_pipeline(seed=0),
        **_fast(out, max_steps=2, batch_size=2, cfg_mode="fixed", guidance_scale=7.5, prediction_type="ddim_eps",
                num_solver_steps=2, caption_dropout=0.5, validation_every=2, validation_prompts=["a cat"]),
    )
    assert all(np.isfinite(result.losses)) and result.teacher_evals_per_sample == 4
    loaded = DiffusionPipeline.from_pretrained(out)
    assert type(loaded).__name__ == "StableDiffusionXLPipeline"
    assert type(loaded.scheduler).__name__ == "PeRFlowScheduler"


def test_caption_free_validation_samples_the_null_condition_without_guidance(tmp_path, monkeypatch):
    """An unconditional run's grid shows what the student learned: the null condition, guidance 1,
    CAPTION_FREE_GRID samples (not the class prompts at the conditional runs' guidance 2)."""
    from perflow.training import validation
    from perflow.training.loop import CAPTION_FREE_GRID

    seen = {}
    real = validation.sample_student

    def spy(student, scheduler, cond, uncond, shape, steps, w, gen):
        seen.update(cond=cond.encoder_hidden_states.clone(), uncond=uncond.encoder_hidden_states.clone(),
                    shape=shape, w=w)
        return real(student, scheduler, cond, uncond, shape, steps, w, gen)

    monkeypatch.setattr(validation, "sample_student", spy)
    train("digits", teacher=tiny_class_teacher(), dataset=_digits(64),
          **_fast(tmp_path, max_steps=1, validation_every=1, caption_free=True))
    assert seen["w"] == 1.0 and seen["shape"][0] == CAPTION_FREE_GRID
    assert torch.equal(seen["cond"], seen["uncond"])
    assert (tmp_path / "validation" / "step-0000001.png").is_file()


def test_prediction_type_auto_is_the_teachers_default_and_checkpoints_keep_auto(tmp_path):
    """``perflow.prediction_type: auto`` trains ``ddim_eps`` on a diffusion teacher (the exported scheduler says
    so), while the run's checkpoints record ``auto`` as given, so ``--resume latest`` with the same settings matches."""
    teacher = tiny_class_teacher(seed=0)
    cfg = load_config("digits", _fast(tmp_path / "run", max_steps=2, batch_size=4, checkpoint_every=1))
    assert cfg.perflow.prediction_type == "auto"
    assert with_parameterization(cfg, teacher).perflow.prediction_type == teacher.default_parameterization == "ddim_eps"
    train(cfg, teacher=teacher, dataset=_digits(16))
    sched = json.loads((tmp_path / "run" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "ddim_eps"
    resumed = load_config("digits", _fast(tmp_path / "run", max_steps=3, batch_size=4, checkpoint_every=1, resume="latest"))
    assert train(resumed, teacher=teacher, dataset=_digits(16)).global_step == 3


def test_window_weights_auto_none_and_explicit(tmp_path):
    """``training.window_weights``: ``auto`` measures the teacher's per-window error gains once (the same
    weights on every call, so a resumed run matches), ``none`` is no weighting, an explicit list is used as
    given, and each multiplies the loss of its window's samples."""
    from perflow.training.data import collate
    from perflow.training.loop import window_weights_of

    teacher = tiny_class_teacher(seed=0)
    data = _digits(64)
    cfg = with_parameterization(load_config("digits", _fast(tmp_path)), teacher)
    b = boundaries_of(cfg)
    auto = window_weights_of(cfg, teacher, data, b, torch.device("cpu"))
    assert auto.shape == (4,) and float(auto.mean()) == pytest.approx(1.0) and bool((auto > 0).all())
    torch.testing.assert_close(window_weights_of(cfg, teacher, data, b, torch.device("cpu")), auto, rtol=0, atol=0)
    cfg.training.window_weights = "none"
    assert window_weights_of(cfg, teacher, data, b, torch.device("cpu")) is None
    cfg.training.window_weights = "1,2,3,4"
    torch.testing.assert_close(window_weights_of(cfg, teacher, data, b, torch.device("cpu")),
                               torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    batch = collate([data[i] for i in range(16)])
    schedule = DiscreteVPSchedule(teacher.alphas_cumprod)
    sampler = make_time_sampler(cfg.perflow.time_sampling, b, window_start_prob=cfg.perflow.window_start_prob)

    def loss(weights):
        return training_loss(batch, cfg, teacher, teacher.unet, b, schedule, sampler, torch.Generator().manual_seed(5),
                             torch.device("cpu"), weights).item()

    plain = loss(None)
    assert loss(torch.ones(4, dtype=torch.float64)) == pytest.approx(plain, rel=1e-6)
    assert loss(torch.full((4,), 3.0, dtype=torch.float64)) == pytest.approx(3 * plain, rel=1e-6)
    for bad in ("1,2", "1,2,0,4", "often"):
        with pytest.raises(ValueError, match="training.window_weights must be 'auto', 'none' or 4 positive numbers"):
            load_config("digits", {"window_weights": bad})


def test_solver_step_allocation_auto_spreads_the_same_budget_and_a_resume_reuses_it(tmp_path, monkeypatch, capsys):
    """``perflow.solver_step_allocation: auto`` measures each window's solve error on the teacher once and spreads the
    same ``n K`` teacher steps (:func:`perflow.objective.allocate_solver_steps`); the run records them, and a
    resumed run reads them instead of measuring again; a list of steps is used as given."""
    import json

    import perflow.objective as objective
    from perflow.objective import allocate_solver_steps, window_solve_errors
    from perflow.training.loop import _calibration_batches, solver_steps_of

    teacher = tiny_class_teacher(seed=0)
    data = _digits(64)
    cfg = with_parameterization(load_config("digits", _fast(tmp_path, num_solver_steps=4, solver_step_allocation="auto")),
                                teacher)
    b = boundaries_of(cfg)
    steps = solver_steps_of(cfg, teacher, data, b, torch.device("cpu"))
    assert len(steps) == 4 and sum(steps) == 16 and min(steps) >= 2
    errors = torch.stack([window_solve_errors(den, noise, b, schedule, 4, teacher.prediction_type, teacher.clip_sample)
                          for den, noise, schedule, _ in _calibration_batches(cfg, teacher, data, torch.device("cpu"), "", False)])
    assert steps == allocate_solver_steps(errors, 4, [250, 250, 250, 250])
    cfg.perflow.solver_step_allocation = "equal"
    assert solver_steps_of(cfg, teacher, data, b, torch.device("cpu")) == 4
    cfg.perflow.num_solver_steps = [3, 1, 1, 2]
    assert solver_steps_of(cfg, teacher, data, b, torch.device("cpu")) == [3, 1, 1, 2]

    run = tmp_path / "run"
    result = train("digits", teacher=teacher, dataset=data,
                   **_fast(run, max_steps=2, num_solver_steps=4, solver_step_allocation="auto", checkpoint_every=1))
    assert f"teacher steps per window (auto, 4 x 4 in all): {steps}" in capsys.readouterr().out
    assert json.loads((run / "perflow_training.json").read_text())["solver_steps"] == steps
    assert np.isfinite(result.losses).all()

    def measured_again(*args, **kwargs):
        raise AssertionError("a resumed run measured the window solve errors again")

    monkeypatch.setattr(objective, "window_solve_errors", measured_again)
    resumed = train("digits", teacher=teacher, dataset=data,
                    **_fast(run, max_steps=3, num_solver_steps=4, solver_step_allocation="auto", checkpoint_every=1,
                            resume="latest"))
    assert resumed.global_step == 3
    assert json.loads((run / "perflow_training.json").read_text())["solver_steps"] == steps


def test_calibration_measures_the_global_batch_whatever_its_split(tmp_path):
    """Two processes at batch 16 calibrate on the same 32 samples as one process at batch 32 (the window
    weights differed by 22 % between the two before)."""
    from perflow.training.loop import window_weights_of

    teacher = tiny_class_teacher(seed=0)
    data = _digits(200)
    one = with_parameterization(load_config("digits", _fast(tmp_path, batch_size=32)), teacher)
    two = with_parameterization(load_config("digits", _fast(tmp_path, batch_size=16)), teacher)
    b = boundaries_of(one)
    whole = window_weights_of(one, teacher, data, b, torch.device("cpu"))
    torch.testing.assert_close(window_weights_of(two, teacher, data, b, torch.device("cpu"), num_processes=2), whole,
                               rtol=0, atol=0)
    assert not torch.equal(window_weights_of(two, teacher, data, b, torch.device("cpu")), whole)


def test_lr_warmup_steps_warm_up_the_constant_scheduler(tmp_path):
    """diffusers' ``constant`` ignores ``num_warmup_steps``: the recipes' warm-up did nothing."""
    from perflow.training.loop import lr_scheduler_name
    from diffusers.optimization import get_scheduler

    cfg = load_config("digits", _fast(tmp_path, lr_warmup_steps=10))
    assert lr_scheduler_name(cfg.training) == "constant_with_warmup"
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_scheduler(lr_scheduler_name(cfg.training), opt, num_warmup_steps=10, num_training_steps=100)
    assert opt.param_groups[0]["lr"] == 0.0
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    cfg.training.lr_warmup_steps = 0
    assert lr_scheduler_name(cfg.training) == "constant"
    cfg.training.lr_scheduler, cfg.training.lr_warmup_steps = "cosine", 10
    assert lr_scheduler_name(cfg.training) == "cosine"


def test_calibration_on_a_data_set_smaller_than_the_global_batch(tmp_path):
    """With gradient accumulation the global batch can exceed a small data set: calibration takes all of it."""
    from perflow.training.loop import solver_steps_of, window_weights_of

    teacher = tiny_class_teacher(seed=0)
    data = _digits(12)
    cfg = with_parameterization(load_config("digits", _fast(tmp_path, batch_size=8, gradient_accumulation_steps=2,
                                                            num_solver_steps=2)), teacher)
    b = boundaries_of(cfg)
    assert window_weights_of(cfg, teacher, data, b, torch.device("cpu")).shape == (4,)
    assert sum(solver_steps_of(cfg, teacher, data, b, torch.device("cpu"))) == 8
