"""Bring-your-own pixel-space teachers: DDPMPipeline and bare UNet2DModel folders (unconditional or
class_labels), image folders with a label column, clip_sample in the window solve, the exports."""

import json

import numpy as np
import pytest
import torch

from perflow.cli import main
from perflow.solver import solve_window, x0_eps_from_output
from perflow.schedule import DiscreteVPSchedule
from perflow.training.teachers import UNet2DTeacher, load_teacher

DDPM = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=True)


def tiny_unet2d(channels: int = 1, num_class_embeds: int | None = None, seed: int = 0, sample_size: int = 8):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=num_class_embeds,
    )


def write_images(root, n: int = 4, mode: str = "L", labels: list | None = None, size: int = 8):
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir()
    shape = (size, size) if mode == "L" else (size, size, 3)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / f"{i:02d}.png")
    if labels is not None:  # what perflow.builtin's photos export writes: file_name / label / text
        rows = [json.dumps({"file_name": f"{i:02d}.png", "label": lab, "text": f"class {lab}"}) for i, lab in enumerate(labels)]
        (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def ddpm_folder(path, unet=None, **schedule):
    from diffusers import DDPMPipeline, DDPMScheduler

    DDPMPipeline(unet=unet or tiny_unet2d(), scheduler=DDPMScheduler(**{**DDPM, **schedule})).save_pretrained(path)
    return path


def bare_unet_folder(path, unet, schedule: bool = True):
    from diffusers import DDPMScheduler

    unet.save_pretrained(path)
    if schedule:
        DDPMScheduler(**DDPM).save_pretrained(path)  # scheduler_config.json beside config.json
    return path


def train_args(teacher, images, out, *extra):
    return ["train", "--model.teacher", str(teacher), "--data.source", "imagefolder", "--data.path", str(images),
            "--resolution", "8", "--max_steps", "2", "--batch_size", "2", "--num_solver_steps", "2",
            "--output_dir", str(out), "--tracker", "none", "--progress", "false", "--checkpoint_every", "0", *extra]


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # diffusers' "Loading pipeline components" bar may come first
    assert line.startswith("perflow train: error: ") and "Traceback" not in err and err.count("error") == 1
    return line


# ---- DDPMPipeline folder, unconditional ------------------------------------------------------------

def test_ddpm_pipeline_teacher_trains_through_the_cli_and_exports_a_ddpm_pipeline(tmp_path, one_thread):
    from diffusers import DDPMPipeline

    from perflow.delta import load_delta, merge_delta
    from perflow.scheduler import PeRFlowScheduler

    teacher = ddpm_folder(tmp_path / "teacher")
    images = write_images(tmp_path / "images")  # greyscale, no metadata: caption-free
    out = tmp_path / "out"
    assert main(train_args(teacher, images, out, "--validation_every", "2")) == 0
    assert (out / "validation" / "step-0000002.png").is_file()
    pipe = DDPMPipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, PeRFlowScheduler) and pipe.scheduler.config.prediction_type == "ddim_eps"  # the default (auto) for a diffusion teacher
    images = pipe(num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 8, 8, 1) and np.isfinite(images).all()
    saved = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_teacher_sampling"] == {"clip_sample": 1.0, "thresholding": False, "thresholding_applied": False}
    # the delta turns the teacher's UNet2DModel into the student, exactly (fp32 sums of fp32 weights)
    delta, meta = load_delta(out / "delta.safetensors")
    assert meta["teacher_sampling"]["clip_sample"] == 1.0
    base = DDPMPipeline.from_pretrained(teacher).unet
    merged = merge_delta(base, delta, set_scheduler=False).state_dict()
    student = pipe.unet.state_dict()
    assert all(torch.allclose(merged[k], student[k], rtol=0, atol=1e-6) for k in student)


def test_the_teacher_and_an_image_folder_are_all_the_data_settings_needed(tmp_path, one_thread, capsys):
    """``perflow train --model.teacher DDPM_FOLDER --data.path IMAGES`` and nothing else about the data:
    the images (data.source auto -> imagefolder, not the built-in digits) at the teacher's own resolution
    (16 px here, from its sample_size; not a fixed default); the recorded config keeps ``auto``/unset so a
    resume matches. ``data.source digits`` beside a data.path is a one-line error, not a silent switch."""
    teacher = ddpm_folder(tmp_path / "teacher", unet=tiny_unet2d(sample_size=16))
    images = write_images(tmp_path / "images", size=20)
    out = tmp_path / "out"
    argv = ["train", "--model.teacher", str(teacher), "--data.path", str(images), "--max_steps", "1", "--batch_size", "2",
            "--num_solver_steps", "1", "--window_weights", "none", "--output_dir", str(out), "--tracker", "none",
            "--progress", "false", "--checkpoint_every", "0"]
    assert main(argv) == 0
    assert f"data: imagefolder {images} at 16 px (the teacher's own resolution)" in capsys.readouterr().out
    recorded = json.loads((out / "perflow_training.json").read_text())["config"]["data"]
    assert recorded["source"] == "auto" and recorded["resolution"] is None
    from diffusers import DDPMPipeline

    from perflow.scheduler import PeRFlowScheduler

    pipe = DDPMPipeline.from_pretrained(out)  # what the issue asks of this command's output
    assert isinstance(pipe.scheduler, PeRFlowScheduler)
    sample = pipe(num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert sample.shape == (1, 16, 16, 1) and np.isfinite(sample).all()
    line = one_line_error(capsys, argv[:5] + ["--data.source", "digits"] + argv[5:-6] + ["--output_dir", str(tmp_path / "o2")])
    assert "data.source 'digits' is the built-in digits and reads no data.path" in line


def test_builtin_faces_teacher_loads_by_name_and_trains(tmp_path, one_thread):
    from perflow.builtin.suite import suite_teacher_path
    from perflow.training import train
    from perflow.builtin.images import TensorImages

    teacher = load_teacher("faces")
    assert isinstance(teacher, UNet2DTeacher) and not teacher.conditional and teacher.clip_sample == 1.0
    assert load_teacher(suite_teacher_path("faces")).unet.config.sample_size == 16
    data = TensorImages(torch.rand(4, 1, 16, 16) * 2 - 1)
    result = train(teacher=teacher, dataset=data, max_steps=1, batch_size=2, num_solver_steps=1, resolution=16,
                   output_dir=str(tmp_path / "out"), tracker="none", progress=False, checkpoint_every=0, save_delta=False)
    assert result.global_step == 1 and np.isfinite(result.losses).all()


# ---- class-conditional UNet2DModel, label column --------------------------------------------------

def test_class_label_unet2d_reads_the_label_column_and_trains(tmp_path, one_thread):
    from perflow.training.data import ImageFolderDataset, LabelRange

    teacher = bare_unet_folder(tmp_path / "teacher", tiny_unet2d(num_class_embeds=3))
    images = write_images(tmp_path / "images", labels=[0, 1, 1, 0])
    item = ImageFolderDataset(images, resolution=8, channels=1, labels=LabelRange("label", 3, 2))[1]
    assert item["label"] == 1 and "caption" not in item
    t = load_teacher(teacher, null_label=2)
    cond = t.condition({"pixel_values": torch.zeros(2, 1, 8, 8), "label": torch.tensor([0, 1])})
    assert cond.unet_kwargs()["class_labels"].tolist() == [0, 1]
    assert t.drop(cond, torch.tensor([True, False])).class_labels.tolist() == [2, 1]  # dropped -> the null class
    with pytest.raises(ValueError, match=r"outside the teacher's classes 0\.\.2"):
        t.condition({"pixel_values": torch.zeros(1, 1, 8, 8), "label": torch.tensor([3])})
    out = tmp_path / "out"
    assert main(train_args(teacher, images, out, "--null_label", "2", "--cfg_mode", "fixed", "--guidance_scale", "2",
                           "--validation_every", "2")) == 0
    assert (out / "unet" / "config.json").is_file() and (out / "scheduler").is_dir()
    assert not (out / "model_index.json").exists()  # no diffusers pipeline passes class_labels to a UNet2DModel


def test_no_null_class_refuses_dropout_and_cfg_but_trains_without_them(tmp_path, capsys, one_thread):
    teacher = bare_unet_folder(tmp_path / "teacher", tiny_unet2d(num_class_embeds=2))
    images = write_images(tmp_path / "images", labels=[0, 1, 1, 0])
    err = one_line_error(capsys, train_args(teacher, images, tmp_path / "a"))  # caption_dropout 0.1 by default
    assert "data.caption_dropout 0.1" in err and "no null class" in err and "--null_label" in err
    err = one_line_error(capsys, train_args(teacher, images, tmp_path / "b", "--caption_dropout", "0", "--cfg_mode", "fixed"))
    assert "perflow.cfg_mode fixed" in err
    assert main(train_args(teacher, images, tmp_path / "c", "--caption_dropout", "0", "--validation_every", "2")) == 0


# ---- bad inputs: one line, exit 2 -------------------------------------------------------------------

def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    labelled = bare_unet_folder(tmp_path / "labelled", tiny_unet2d(num_class_embeds=3))
    bad_labels = write_images(tmp_path / "bad_labels", labels=[0, 1, 5, 0])
    err = one_line_error(capsys, train_args(labelled, bad_labels, tmp_path / "o1", "--caption_dropout", "0"))
    assert "metadata.jsonl:3" in err and "label 5" in err and "0..2" in err

    no_schedule = bare_unet_folder(tmp_path / "no_schedule", tiny_unet2d(), schedule=False)
    grey = write_images(tmp_path / "grey")
    err = one_line_error(capsys, train_args(no_schedule, grey, tmp_path / "o2"))
    assert "no noise schedule" in err and "scheduler_config.json" in err

    two_channels = ddpm_folder(tmp_path / "two_channels", tiny_unet2d(channels=2))
    err = one_line_error(capsys, train_args(two_channels, grey, tmp_path / "o3"))
    assert "2-channel images" in err

    from perflow.tiny import tiny_class_teacher

    other = tmp_path / "other_class"
    tiny_class_teacher().unet.save_pretrained(other)
    err = one_line_error(capsys, train_args(ddpm_folder(tmp_path / "t"), grey, tmp_path / "o4", "--student_init", str(other)))
    assert "UNet2DConditionModel" in err and "UNet2DModel" in err

    # the output folder is never the model the run reads (--overwrite would delete it) nor inside its data
    teacher = ddpm_folder(tmp_path / "keep")
    before = sorted(p.name for p in teacher.iterdir())
    err = one_line_error(capsys, train_args(teacher, grey, teacher, "--overwrite", "true"))
    assert "holds the model.teacher" in err and sorted(p.name for p in teacher.iterdir()) == before
    err = one_line_error(capsys, train_args(ddpm_folder(tmp_path / "t2"), grey, other, "--student_init", str(other),
                                            "--overwrite", "true"))
    assert "holds the model.student_init" in err and (other / "config.json").is_file()
    err = one_line_error(capsys, train_args(teacher, grey, grey / "runs"))
    assert "inside data.path" in err and not (grey / "runs").exists()


def test_student_init_loads_a_unet2dmodel(tmp_path):
    from perflow.training.loop import load_student_init

    ddpm_folder(tmp_path / "init", tiny_unet2d(seed=1))
    student = tiny_unet2d(seed=2)
    load_student_init(student, str(tmp_path / "init"))  # a pipeline folder: its unet/
    expected = tiny_unet2d(seed=1).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in student.state_dict().items())


def test_thresholding_is_warned_about_and_identity_embeddings_refused():
    with pytest.warns(UserWarning, match="thresholding"):
        UNet2DTeacher(tiny_unet2d(), {**DDPM, "thresholding": True})
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=4,
                       class_embed_type="identity")
    with pytest.raises(ValueError, match="identity.*embedding vectors"):
        UNet2DTeacher(unet, DDPM)


# ---- clip_sample in the window solve ----------------------------------------------------------------

def _schedule():
    return DiscreteVPSchedule.from_config(DDPM).to(dtype=torch.float64)


def test_clip_sample_clips_x0_in_each_ddim_step():
    """One step from t_s = 0.9 to t_e = 0.5 with a model predicting eps = -3 z: x0 = (z - s eps) / a
    leaves [-1, 1]; the clipped step is a_e clip(x0) + s_e eps (diffusers' DDIM step, eps kept)."""
    sched = _schedule()
    z = torch.linspace(-2, 2, 8, dtype=torch.float64).reshape(2, 1, 2, 2)
    t_s, t_e = torch.full((2,), 0.9, dtype=torch.float64), torch.full((2,), 0.5, dtype=torch.float64)
    den = lambda x, i: -3 * x  # noqa: E731
    (a_s, s_s), (a_e, s_e) = sched.alpha_sigma(t_s, z), sched.alpha_sigma(t_e, z)
    eps = -3 * z
    x0 = (z - s_s * eps) / a_s
    assert x0.abs().max() > 1.5
    expected = a_e * x0.clamp(-1, 1) + s_e * eps
    clipped = solve_window(den, z, t_s, t_e, 1, sched, "epsilon", clip_sample=1.0)
    torch.testing.assert_close(clipped, expected, rtol=1e-12, atol=1e-12)
    plain = solve_window(den, z, t_s, t_e, 1, sched, "epsilon")
    assert (clipped - plain).abs().max() > 0.1


def test_default_window_solve_is_bit_identical_to_the_unclipped_ddim_loop():
    """Default (and clip_sample=None): exactly the loop without clipping; a range no x0 reaches changes nothing."""
    sched = _schedule()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 1, 4, 4, generator=g)
    t_s, t_e = torch.tensor([1.0, 0.75, 0.5]), torch.tensor([0.75, 0.5, 0.25])
    den = lambda x, i: torch.tanh(x) * (i.view(-1, 1, 1, 1) / 1000)  # noqa: E731
    ref = z.clone()
    s32 = sched.to(dtype=torch.float32)
    for j in range(4):  # the solver's loop as it was before clip_sample existed
        ta = t_s.double() + (t_e.double() - t_s.double()) * (j / 4)
        tb = t_s.double() + (t_e.double() - t_s.double()) * ((j + 1) / 4)
        x0, eps = x0_eps_from_output(den(ref, s32.timestep(ta)), ref, *s32.alpha_sigma(ta, ref), "epsilon")
        ref = s32.marginal(x0, eps, tb)
    default = solve_window(den, z, t_s, t_e, 4, sched, "epsilon")
    assert torch.equal(default, ref) and torch.equal(solve_window(den, z, t_s, t_e, 4, sched, "epsilon", None), ref)
    assert torch.equal(solve_window(den, z, t_s, t_e, 4, sched, "epsilon", clip_sample=1e6), ref)


def test_sixteen_bit_images_keep_their_range():
    """A 16-bit greyscale PNG (mode I;16) is scaled to 8 bits, not clipped at 255 (PIL's convert would make it white)."""
    import io

    from PIL import Image

    from perflow.training.data import load_image

    ramp = np.linspace(0, 65535, 64).reshape(8, 8).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    for mode in ("L", "RGB"):
        x = load_image(buf.getvalue(), 8, True, False, np.random.default_rng(0), mode)["pixel_values"]
        want = torch.from_numpy(np.rint(ramp / 257.0).astype(np.float32)) / 127.5 - 1
        torch.testing.assert_close(x, want.expand_as(x), rtol=0, atol=1e-6)


def test_resolutions_the_teacher_cannot_take_are_one_line(tmp_path, capsys):
    teacher = ddpm_folder(tmp_path / "teacher")  # 8 px, two blocks: one downsampling
    grey = write_images(tmp_path / "grey")
    argv = train_args(teacher, grey, tmp_path / "o")
    argv[argv.index("--resolution") + 1] = "7"
    assert "--data.resolution 7 does not fit the teacher's denoiser: give a positive multiple of 2" in one_line_error(capsys, argv)
    wide = ddpm_folder(tmp_path / "wide", unet=tiny_unet2d(sample_size=8))
    cfg = json.loads((wide / "unet" / "config.json").read_text())
    (wide / "unet" / "config.json").write_text(json.dumps({**cfg, "sample_size": [8, 16]}))
    assert "non-square sample_size [8, 16]" in one_line_error(capsys, train_args(wide, grey, tmp_path / "o2"))


def test_a_beta_schedule_perflow_cannot_follow_is_one_line():
    from perflow.training.teachers import teacher_schedule

    with pytest.raises(ValueError, match="beta_schedule 'sigmoid' is not one of .* trained_betas"):
        teacher_schedule({"beta_schedule": "sigmoid"})


def test_resume_of_a_run_without_checkpoints_says_so(tmp_path, capsys, one_thread):
    teacher, grey, out = ddpm_folder(tmp_path / "teacher"), write_images(tmp_path / "grey"), tmp_path / "out"
    assert main(train_args(teacher, grey, out, "--window_weights", "none")) == 0  # checkpoint_every 0
    capsys.readouterr()
    err = one_line_error(capsys, train_args(teacher, grey, out, "--window_weights", "none", "--resume", "latest"))
    assert "no checkpoint to resume" in err and "--overwrite true" in err and "pass --resume latest" not in err


def test_class_subfolders_are_the_labels_without_metadata(tmp_path, capsys):
    """HF imagefolder's convention: ROOT/CLASS/x.png; integer folder names are those classes, others are
    numbered in sorted order; a flat folder for a class-conditional teacher is a one-line error."""
    from PIL import Image

    from perflow.training.data import ImageFolderDataset, LabelRange

    for root, names in ((tmp_path / "digits", ("2", "0")), (tmp_path / "named", ("dog", "cat"))):
        for name in names:
            (root / name).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(root / name / "a.png")
    got = ImageFolderDataset(tmp_path / "digits", 8, channels=1, labels=LabelRange(num_labels=3)).items
    assert sorted(got) == [("0/a.png", 0), ("2/a.png", 2)]
    got = ImageFolderDataset(tmp_path / "named", 8, channels=1, labels=LabelRange(num_labels=3)).items
    assert sorted(got) == [("cat/a.png", 0), ("dog/a.png", 1)]
    assert "cat -> 0, dog -> 1" in capsys.readouterr().out
    with pytest.raises(ValueError, match="2 is not one of the teacher's classes"):
        ImageFolderDataset(tmp_path / "digits", 8, channels=1, labels=LabelRange(num_labels=3, null_label=2))
    flat = write_images(tmp_path / "flat")
    with pytest.raises(ValueError, match="not all in class subfolders .* data.caption_free true"):
        ImageFolderDataset(flat, 8, channels=1, labels=LabelRange(num_labels=3))


def test_metadata_quirks_users_bring(tmp_path, capsys):
    """A spreadsheet's UTF-8 BOM is read; another encoding is one line naming the file; a null caption is a
    missing one (not the text "None"); an EXIF-rotated photo is trained the way it is shown."""
    from PIL import Image

    from perflow.training.data import ImageFolderDataset, load_image

    root = write_images(tmp_path / "bom", n=2)
    (root / "metadata.csv").write_bytes("file_name,text\n00.png,a cat\n01.png\n".encode("utf-8-sig"))
    write_images(tmp_path / "extra", n=1)
    (tmp_path / "extra" / "00.png").rename(root / "unlisted.png")
    ds = ImageFolderDataset(root, 8, channels=1)
    assert sorted(ds.items) == [("00.png", "a cat"), ("01.png", None)]
    assert "metadata.csv lists 2 of the 3 images" in capsys.readouterr().out
    assert "caption" not in ds[1] and ds[0]["caption"] == "a cat"
    (root / "metadata.csv").unlink()
    (root / "metadata.jsonl").write_bytes('{"file_name": "00.png", "text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match="metadata.jsonl is not UTF-8 text"):
        ImageFolderDataset(root, 8, channels=1)
    wide = np.zeros((20, 40), dtype=np.uint8)
    wide[:, :20] = 255  # left half white as stored; shown rotated by 90 degrees (Orientation 6: top half white)
    img = Image.fromarray(wide)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "phone.jpg", exif=exif, quality=100)
    x = load_image(str(tmp_path / "phone.jpg"), 20, True, False, np.random.default_rng(0), "L")["pixel_values"][0]
    assert load_image(str(tmp_path / "phone.jpg"), 20, True, False, np.random.default_rng(0), "L")["original_size"] == (40, 20)
    assert x[:10].mean() > 0.9 and x[12:].mean() < -0.9


def test_runs_never_destroy_their_inputs_or_leave_a_stale_delta(tmp_path, capsys, one_thread):
    teacher, grey = ddpm_folder(tmp_path / "teacher"), write_images(tmp_path / "grey")
    out = tmp_path / "out"
    args = ["--window_weights", "none", "--checkpoint_every", "1"]
    assert main(train_args(teacher, grey, out, *args)) == 0
    # the next stage of progressive reflow from OUT/unet into OUT itself: --overwrite would delete its start
    err = one_line_error(capsys, train_args(teacher, grey, out, *args, "--student_init", str(out / "unet"),
                                            "--overwrite", "true"))
    assert "holds the model.student_init" in err and (out / "unet" / "config.json").is_file()
    # a resume that no longer saves the delta removes the old one (it would not match the new student)
    assert main(train_args(teacher, grey, out, *args, "--resume", "latest", "--max_steps", "3", "--save_delta", "false")) == 0
    assert not (out / "delta.safetensors").exists()
    assert "output.output_dir is empty" in one_line_error(capsys, train_args(teacher, grey, "", *args))


def test_a_text_teacher_without_data_path_says_so(tmp_path):
    """Not the built-in 8-px greyscale digits silently (and then a channel-count error): the fix is data.path."""
    from perflow.tiny import tiny_sd15_pipeline
    from perflow.training import train

    with pytest.raises(ValueError, match="needs captioned images: give --data.path"):
        train(None, teacher=tiny_sd15_pipeline(), max_steps=1, output_dir=str(tmp_path / "o"), tracker="none",
              progress=False)
    assert not (tmp_path / "o" / "unet").exists()


def test_resume_refuses_data_that_changed(tmp_path, capsys, one_thread):
    """The checkpoint's data position only means the same images if the data set is the same size."""
    teacher, grey, out = ddpm_folder(tmp_path / "teacher"), write_images(tmp_path / "grey"), tmp_path / "out"
    args = ["--window_weights", "none", "--checkpoint_every", "1"]
    assert main(train_args(teacher, grey, out, *args)) == 0
    write_images(tmp_path / "more", n=2)
    for f in (tmp_path / "more").iterdir():
        f.rename(grey / f"new-{f.name}")
    err = one_line_error(capsys, train_args(teacher, grey, out, *args, "--resume", "latest", "--max_steps", "3"))
    assert "the training data changed since checkpoint-2: 4 items then, 6 now" in err


def test_a_data_set_smaller_than_a_batch_is_refused_before_the_calibration(tmp_path, one_thread, capsys, monkeypatch):
    """The size check comes before the minutes the default recipe spends measuring the teacher (step allocation,
    window weights), not after them."""
    import perflow.training.loop as loop

    def calibration(*args, **kwargs):
        raise AssertionError("the calibration ran before the data set's size was checked")

    monkeypatch.setattr(loop, "solver_steps_of", calibration)
    monkeypatch.setattr(loop, "window_weights_of", calibration)
    teacher = ddpm_folder(tmp_path / "teacher")
    images = write_images(tmp_path / "images", n=3)
    argv = ["train", "--model.teacher", str(teacher), "--data.path", str(images), "--max_steps", "1", "--batch_size", "4",
            "--output_dir", str(tmp_path / "out"), "--tracker", "none", "--progress", "false"]
    line = one_line_error(capsys, argv)
    assert "the dataset has 3 items, fewer than one global batch of 4" in line and "lower training.batch_size" in line
