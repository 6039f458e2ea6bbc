"""The teacher suite: faces and photos data, export to an image folder, the shipped weights, training."""

import json

import numpy as np
import pytest
import torch

from perflow.builtin.faces import faces_tensors, load_faces_dataset
from perflow.builtin.images import split_indices
from perflow.builtin.photos import NUM_CLASSES, PHOTOS, photos_tensors, random_crops
from perflow.builtin.suite import export_dataset, get_suite_teacher, main, suite_teacher_path

# ----------------------------------------------------------------------------- data


def test_split_rule_is_the_digits_one():
    from perflow.builtin.digits import digits_tensors

    x_all, _ = digits_tensors("all")
    for split in ("train", "test"):
        assert torch.equal(x_all[split_indices(1797, split)], digits_tensors(split)[0])


def test_faces_splits_shapes_and_mirrors():
    train, test, every = faces_tensors("train"), faces_tensors("test"), faces_tensors("all")
    assert train.shape == (80, 1, 16, 16) and test.shape == (20, 1, 16, 16) and train.dtype == torch.float32
    assert train.min() >= -1 and train.max() <= 1 and every.min() < -0.9 and every.max() > 0.9
    assert torch.equal(torch.cat([train, test]).flatten(1).sort(0).values, every.flatten(1).sort(0).values)
    mirrored = faces_tensors("test", mirrored=True)
    assert torch.equal(mirrored[:20], test) and torch.equal(mirrored[20:], test.flip(-1))
    assert faces_tensors("test", image_size=24).shape == (20, 1, 24, 24)
    item = load_faces_dataset("test")[0]
    assert set(item) == {"pixel_values"} and torch.equal(item["pixel_values"], test[0])
    with pytest.raises(ValueError, match="split"):
        faces_tensors("validation")
    with pytest.raises(ValueError, match="image_size"):
        faces_tensors("train", image_size=4)


def test_photos_test_split_is_fixed_balanced_crops():
    x, y = photos_tensors("test")
    assert x.shape == (64 * NUM_CLASSES, 3, 16, 16) and NUM_CLASSES == len(PHOTOS) == 9
    assert torch.equal(y, torch.arange(9).repeat_interleave(64))
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(photos_tensors("test")[0], x)  # fixed
    # crops differ within a class, and the nine photos differ on average (mean colour per class)
    assert (x[:64].flatten(1).std(0) > 0.05).float().mean() > 0.9
    means = torch.stack([x[y == c].mean((0, 2, 3)) for c in range(9)])  # (9, 3)
    assert torch.cdist(means, means).add(torch.eye(9)).min() > 0.01
    with pytest.raises(ValueError, match="split"):
        photos_tensors("all")
    with pytest.raises(ValueError, match="image_size"):
        random_crops(torch.zeros(2, dtype=torch.long), torch.Generator(), image_size=128)


def test_export_writes_folders_perflow_train_reads(tmp_path):
    from perflow.training.data import ImageFolderDataset

    out = export_dataset("faces", tmp_path / "faces", split="test")
    ds = ImageFolderDataset(out, resolution=16)
    faces = faces_tensors("test")
    assert len(ds) == 20 and not (out / "metadata.jsonl").exists()
    # greyscale PNGs come back as three equal channels, quantised to 1/127.5
    px = ds[3]["pixel_values"]
    assert px.shape == (3, 16, 16) and (px - faces[3]).abs().max() <= 0.5 / 127.5 + 1e-6

    main(["export", "--dataset", "photos", "--split", "test", "--out", str(tmp_path / "photos")])
    rows = [json.loads(line) for line in (tmp_path / "photos" / "metadata.jsonl").read_text().splitlines()]
    x, y = photos_tensors("test")
    assert len(rows) == 576 and [r["label"] for r in rows] == y.tolist()
    assert rows[70]["text"] == PHOTOS[1] and rows[70]["file_name"] == "00070.png"
    item = ImageFolderDataset(tmp_path / "photos", resolution=16)[70]
    assert item["caption"] == "chelsea" and (item["pixel_values"] - x[70]).abs().max() <= 0.5 / 127.5 + 1e-6

    with pytest.raises(ValueError, match="not an empty folder"):
        export_dataset("faces", out)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--dataset", "faces", "--out", str(out)])
    assert exit_info.value.code == 2


# ----------------------------------------------------------------------------- shipped weights


def test_shipped_faces_teacher_is_a_ddpm_pipeline(one_thread):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    pipe = DDPMPipeline.from_pretrained(suite_teacher_path("faces"))
    assert isinstance(pipe.unet, UNet2DModel) and isinstance(pipe.scheduler, DDPMScheduler)
    cfg = pipe.scheduler.config
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps) == ("linear", 1e-4, 0.02, 1000)
    assert cfg.prediction_type == "epsilon" and cfg.clip_sample is True
    assert pipe.unet.config.in_channels == 1 and pipe.unet.config.sample_size == 16
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=4, num_inference_steps=10, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (4, 16, 16, 1) and np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_shipped_photos_teacher_samples_look_like_the_photo_asked_for(one_thread):
    """Loads through perflow's ``load_teacher``; 20-step DDIM samples for each photo label are closer
    (in pixels) to a real crop of that photo than of any other photo, most of the time: chance is 1/9,
    a label-blind teacher scores about that, and one trained only 40 steps (right mean colours, no
    structure) scored 0.48; the shipped teacher 1.0."""
    from perflow.evaluation.digits import class_model_fn
    from perflow.evaluation.samplers import baseline_scheduler, sample
    from perflow.training.teachers import load_teacher

    path = suite_teacher_path("photos")
    teacher = load_teacher(path)
    assert teacher.kind == "class" and teacher.prediction_type == "v_prediction" and teacher.null_label == 9
    assert teacher.unet.config.in_channels == 3 and teacher.unet.config.sample_size == 16
    labels = torch.arange(27) % 9
    noise = torch.randn(27, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    fn = class_model_fn(teacher.unet, teacher.label_encoder, labels, guidance_scale=1.0)
    out = sample(fn, baseline_scheduler("ddim", config), noise, 20).samples
    assert torch.isfinite(out).all()
    real, real_labels = photos_tensors("test")
    nearest = torch.cdist(out.clamp(-1, 1).flatten(1), real.flatten(1)).argmin(1)
    accuracy = (real_labels[nearest] == labels).float().mean().item()
    assert accuracy >= 0.8, f"nearest-real-crop class accuracy {accuracy}"


# ----------------------------------------------------------------------------- training


def test_train_teacher_writes_loadable_folders(tmp_path, one_thread):
    from diffusers import DDPMPipeline

    from perflow.builtin.train_teacher import train_teacher
    from perflow.training.teachers import load_teacher

    faces = train_teacher("faces", tmp_path / "faces", max_steps=1, batch_size=2, progress=False)
    assert DDPMPipeline.from_pretrained(faces).unet.config.in_channels == 1
    photos = train_teacher("photos", tmp_path / "photos", max_steps=1, batch_size=2, progress=False)
    assert load_teacher(photos).prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="unknown built-in teacher"):
        get_suite_teacher("cifar")


def test_v_prediction_target_is_sqrt_abar_eps_minus_sqrt_one_minus_abar_x0():
    from perflow.builtin.train_teacher import teacher_target

    sched = get_suite_teacher("photos").scheduler()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 3, 4, 4, generator=g), torch.randn(3, 3, 4, 4, generator=g)
    i = torch.tensor([0, 500, 999])
    a = sched.alphas_cumprod[i].view(-1, 1, 1, 1)
    torch.testing.assert_close(teacher_target(sched, x0, eps, i), a.sqrt() * eps - (1 - a).sqrt() * x0)
    assert teacher_target(get_suite_teacher("faces").scheduler(), x0, eps, i) is eps
