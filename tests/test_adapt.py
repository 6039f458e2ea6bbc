"""``perflow delta adapt``: a short PeRFlow run on the target, started from target + delta, that resumes
exactly after an interruption, and refuses what it cannot do."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from perflow.delta import base_model_info, extract_delta
from perflow.targets import Target
from perflow.tiny import tiny_class_teacher
from perflow.training.safety import TrainingInterrupted
from test_training import _digits

pytestmark = pytest.mark.usefixtures("one_thread")
TRAIN = dict(batch_size=8, num_solver_steps=2, learning_rate=1e-3, lr_warmup_steps=0, tracker="none", ema_decay=0.9,
             log_every=1)
EVAL = {"spacings": ("trailing",), "baselines": ("ddim", "dpmsolver++"), "batch_size": 20}


def _delta():
    """A delta learned on the tiny teacher (here: a small perturbation), with its metadata."""
    teacher = tiny_class_teacher()
    student = tiny_class_teacher().unet
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=g))
    meta = {"base_model": base_model_info(teacher.unet, name="tiny"), "num_time_windows": 4, "prediction_type": "diff_eps"}
    return extract_delta(student, teacher.unet), meta


def _adapt(out, callback=None, resume=False, name="tiny fine-tune", budget_steps=6):
    from perflow.training.adapt import adapt_delta

    target = Target(teacher=tiny_class_teacher(seed=1), name=name)  # same architecture, other weights
    return adapt_delta(_delta(), target, out, config="digits", budget_steps=budget_steps, check_every=2, num_samples=20,
                       reference_steps=8, dataset=_digits(64), resume=resume, eval_kwargs=EVAL, callback=callback,
                       progress=False, **TRAIN)


def test_adapt_resumes_exactly_after_an_interrupt(tmp_path):
    full = _adapt(tmp_path / "full")
    assert [c["step"] for c in full.checks] == [0, 2, 4, 6] and full.steps == 6  # ran to the budget
    assert all(c["beats"] == (c["paired_mse"] < full.baseline["paired_mse"]) for c in full.checks)

    def stop_at_3(step, loss):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted):
        _adapt(tmp_path / "cut", callback=stop_at_3)
    saved = json.loads((tmp_path / "cut" / "adapt.json").read_text())
    assert [c["step"] for c in saved["checks"]] == [0, 2]
    with pytest.raises(ValueError, match="holds an adaptation"):
        _adapt(tmp_path / "cut")
    with pytest.raises(ValueError, match=r"changed settings \['target'\]"):
        _adapt(tmp_path / "cut", resume=True, name="another model")
    resumed = _adapt(tmp_path / "cut", resume=True)
    assert resumed.checks == full.checks and resumed.baseline == full.baseline
    a, b = load_file(str(full.delta)), load_file(str(resumed.delta))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the adapted delta is student - target: merged into the target it gives the exported student
    student = load_file(str(tmp_path / "cut" / "run" / "unet" / "diffusion_pytorch_model.safetensors"))
    target = tiny_class_teacher(seed=1).unet.state_dict()
    k = "conv_in.weight"
    torch.testing.assert_close(target[k] + b[k], student[k], rtol=0, atol=1e-6)


def test_adapt_starts_from_target_plus_delta(tmp_path):
    from perflow.training.adapt import adapt_delta
    from diffusers import UNet2DConditionModel

    delta, meta = _delta()
    target = Target(teacher=tiny_class_teacher(seed=1), name="t")
    with pytest.raises(ValueError, match="budget_steps"):
        adapt_delta((delta, meta), target, tmp_path, budget_steps=0)
    from perflow.training.adapt import _save_init

    _save_init(target, delta, meta, tmp_path / "init")
    init = UNet2DConditionModel.from_pretrained(tmp_path / "init").state_dict()
    base = tiny_class_teacher(seed=1).unet.state_dict()
    assert all(torch.equal(init[k], base[k] + delta[k]) for k in delta)
    _save_init(target, delta, meta, tmp_path / "half", 0.5)  # --delta-scale 0.5
    half = UNet2DConditionModel.from_pretrained(tmp_path / "half").state_dict()
    assert all(torch.equal(half[k], (base[k].double() + 0.5 * delta[k].double()).float()) for k in delta)


def test_adaptation_trains_on_the_deltas_own_windows_and_parameterization(tmp_path):
    """The recipe's windows are not the delta's: the adaptation takes the delta's boundaries (explicit, or K equal
    windows even where the recipe would shorten the last one) and prediction type, so the adapted student's
    scheduler samples the windows it was trained on."""
    from perflow.scheduler import PeRFlowScheduler
    from perflow.training.adapt import adapt_delta, delta_windows

    assert delta_windows({"num_time_windows": 4, "prediction_type": "diff_eps"}) == dict(
        num_time_windows=4, window_boundaries=None, last_window_fraction=1.0, prediction_type="diff_eps")
    delta, meta = _delta()
    for name, meta_windows, expected in (
        ("explicit", {"window_boundaries": [1.0, 0.6, 0.3, 0.1, 0.0]}, [1.0, 0.6, 0.3, 0.1, 0.0]),
        ("equal", {}, [1.0, 0.75, 0.5, 0.25, 0.0]),
    ):
        adapt_delta((delta, {**meta, **meta_windows}), Target(teacher=tiny_class_teacher(seed=1), name="t"),
                    tmp_path / name, config="digits", budget_steps=1, check_every=1, num_samples=20, reference_steps=8,
                    dataset=_digits(64), eval_kwargs=EVAL, progress=False,
                    **{**TRAIN, "last_window_fraction": 0.6, "num_solver_steps": 1})
        sched = PeRFlowScheduler.from_pretrained(tmp_path / name / "run" / "scheduler")
        assert sched.boundaries.tolist() == expected and sched.config.prediction_type == "diff_eps"


def test_a_budget_that_is_not_a_multiple_of_the_checks_can_be_extended(tmp_path):
    """The run checkpoints at its last step, so a larger budget continues from there instead of retraining."""
    short = _adapt(tmp_path / "a", budget_steps=3)
    assert [c["step"] for c in short.checks] == [0, 2, 3]
    assert (tmp_path / "a" / "run" / "checkpoints" / "checkpoint-3").is_dir()
    longer = _adapt(tmp_path / "a", budget_steps=4, resume=True)
    assert [c["step"] for c in longer.checks] == [0, 2, 3, 4] and longer.checks[:3] == short.checks


def _cli_adapt(out, delta, *extra):
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src"
    cmd = [sys.executable, "-m", "perflow", "delta", "adapt", "--delta", str(delta), "--target", "digits",
           "--output-dir", str(out), "--budget-steps", "6", "--check-every", "2", "--num-samples", "20",
           "--reference-steps", "8", "--batch-size", "20", "--threads", "1", "--set", "batch_size=8",
           "--set", "num_solver_steps=2", "--set", "learning_rate=1e-3", "--set", "lr_warmup_steps=0",
           "--set", "tracker=none", "--set", "progress=false", "--set", "ema_decay=0.9", *extra]
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_cli_adapt_killed_with_sigkill_resumes_to_the_same_delta(tmp_path):
    """SIGKILL (no handler runs) once the run's checkpoint-4 exists; `--resume` finishes it; the checks and the
    adapted delta equal an uninterrupted CLI run's."""
    import time

    from perflow.delta import save_delta
    from perflow.training.teachers import load_teacher

    teacher = load_teacher("digits")
    g = torch.Generator().manual_seed(0)
    delta = {k: 1e-4 * torch.randn(v.shape, generator=g) for k, v in teacher.unet.state_dict().items()}
    save_delta(delta, tmp_path / "delta.safetensors", {"base_model": base_model_info(teacher.unet, name="digits"),
                                                      "num_time_windows": 4, "prediction_type": "diff_eps"})
    full = _cli_adapt(tmp_path / "full", tmp_path / "delta.safetensors")
    _, err = full.communicate(timeout=600)
    assert full.returncode in (0, 1), err
    cut = _cli_adapt(tmp_path / "cut", tmp_path / "delta.safetensors")
    ckpt = tmp_path / "cut" / "run" / "checkpoints" / "checkpoint-4"
    while not ckpt.is_dir():
        assert cut.poll() is None, cut.stderr.read()
        time.sleep(0.05)
    cut.kill()
    cut.communicate(timeout=60)
    again = _cli_adapt(tmp_path / "cut", tmp_path / "delta.safetensors", "--resume")
    _, err = again.communicate(timeout=600)
    assert again.returncode == full.returncode, err
    a = json.loads((tmp_path / "full" / "adapt.json").read_text())
    b = json.loads((tmp_path / "cut" / "adapt.json").read_text())
    assert a["checks"] == b["checks"] and [c["step"] for c in a["checks"]][-1] == 6
    da = load_file(str(tmp_path / "full" / "run" / "delta.safetensors"))
    db = load_file(str(tmp_path / "cut" / "run" / "delta.safetensors"))
    assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)


def test_a_first_chunk_that_fails_does_not_lock_the_folder(tmp_path):
    """A data mistake found only when training starts (after the baseline): the corrected command runs in the
    same folder, with or without --resume, since nothing was trained."""
    from perflow.training.adapt import adapt_delta

    target = Target(teacher=tiny_class_teacher(seed=1), name="tiny fine-tune")
    with pytest.raises(FileNotFoundError):
        adapt_delta(_delta(), target, tmp_path, config="digits", budget_steps=2, check_every=2, num_samples=20,
                    reference_steps=8, eval_kwargs=EVAL, progress=False, **{"data.path": str(tmp_path / "missing")}, **TRAIN)
    assert json.loads((tmp_path / "adapt.json").read_text())["checks"][-1]["step"] == 0
    done = _adapt(tmp_path, budget_steps=2)
    assert [c["step"] for c in done.checks] == [0, 2]


class _RandomPixels(torch.utils.data.Dataset):
    """``base``'s items (conditions) with random images in place of its zeros."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        item = dict(self.base[index])
        item["pixel_values"] = torch.rand(item["pixel_values"].shape, generator=torch.Generator().manual_seed(index)) * 2 - 1
        return item


def test_data_free_adaptation_reads_no_images(tmp_path):
    """``data_free``: every window starts at the student's own sampler state (``student_starts 1``), so the clean
    images are never read: the same conditions with random images in place of the zeros give the same delta,
    bit for bit; the training items are the evaluation's conditions (all classes, cycled)."""
    from perflow.training.adapt import adapt_delta, conditions_dataset

    teacher = tiny_class_teacher(seed=1)
    items = conditions_dataset(teacher, size=64)
    assert len(items) == 64 and [items[i]["label"] for i in range(12)] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert items[3]["pixel_values"].shape == (1, 8, 8) and not items[3]["pixel_values"].any()
    assert [conditions_dataset(teacher, labels=[7, 2], size=3)[i]["label"] for i in range(3)] == [7, 2, 7]

    def run(out, **kw):
        return adapt_delta(_delta(), Target(teacher=tiny_class_teacher(seed=1), name="t"), out, config="digits",
                           budget_steps=2, check_every=2, num_samples=20, reference_steps=8, eval_kwargs=EVAL,
                           progress=False, **kw, **TRAIN)

    free = run(tmp_path / "free", data_free=True)
    assert json.loads((tmp_path / "free" / "adapt.json").read_text())["settings"]["data_free"] is True
    noisy = run(tmp_path / "noisy", dataset=_RandomPixels(conditions_dataset(teacher)), student_starts=1.0)
    assert [c["step"] for c in free.checks] == [0, 2] and free.checks == noisy.checks
    a, b = load_file(str(free.delta)), load_file(str(noisy.delta))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().max() > 0 for k in a)  # it trained
    with pytest.raises(ValueError, match="reads no images"):
        run(tmp_path / "x", data_free=True, dataset=_digits(64))
    with pytest.raises(ValueError, match="student_starts 1, not 0.5"):
        run(tmp_path / "y", data_free=True, student_starts=0.5)


def test_conditions_dataset_follows_the_teachers_conditioning():
    from perflow.training.adapt import conditions_dataset
    from perflow.training.data import ConditionsDataset
    from perflow.training.teachers import as_teacher
    from perflow.tiny import tiny_sd15_pipeline

    sd = as_teacher(tiny_sd15_pipeline())
    with pytest.raises(ValueError, match="give --prompts"):
        conditions_dataset(sd)
    items = conditions_dataset(sd, prompts=["a cat", "a dog"], size=4)
    assert [items[i]["caption"] for i in range(3)] == ["a cat", "a dog", "a cat"] and "label" not in items[0]
    assert items[0]["pixel_values"].shape == (3, sd.resolution(None, "r"), sd.resolution(None, "r"))
    with pytest.raises(ValueError, match="labels or captions, not both"):
        ConditionsDataset(4, 1, 8, labels=[1], captions=["a"])
    plain = ConditionsDataset(2, 3, 4)  # an unconditional teacher: images only
    assert set(plain[1]) == {"pixel_values"}


def _controlnet_target(seed: int = 1):
    """A tiny class-conditional teacher (other weights than the delta's base) driven by a ControlNet that acts."""
    from diffusers import ControlNetModel

    from perflow.targets import ControlledUNet

    teacher = tiny_class_teacher(seed=seed)
    torch.manual_seed(5)
    cn = ControlNetModel.from_unet(teacher.unet, conditioning_channels=1, conditioning_embedding_out_channels=(16,))
    with torch.no_grad():  # from_unet zero-initialises the output convolutions: make the ControlNet act
        for p in cn.parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher.unet = ControlledUNet(teacher.unet, cn.eval().requires_grad_(False))
    controls = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    return Target(teacher=teacher, name="tiny + ControlNet", control_images=controls)


def test_controlnet_condition_runs_the_controlnet_as_the_controlled_unet_does():
    """Training on a ControlNet target keeps the UNet alone as the model: the condition runs the ControlNet and adds
    its residuals, the same output as the report's ControlledUNet; the training teacher's conditions carry the
    batch's control images, also in the null condition, and survive a move to another dtype."""
    from perflow.targets import controlnet_training_teacher, with_control

    target = _controlnet_target()
    controlled = target.teacher.unet
    trainer = controlnet_training_teacher(target.teacher)
    assert trainer.unet is controlled.unet and "controlnet" in trainer.modules() and target.teacher.unet is controlled
    batch = {"pixel_values": torch.zeros(3, 1, 8, 8), "label": torch.tensor([1, 4, 7]), "control_image": target.control_images[:3]}
    cond = trainer.condition(batch)
    z, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500, 900])
    with torch.no_grad():
        ours = cond.forward(controlled.unet, z, t)
        reference = with_control(target.teacher.condition(batch), batch["control_image"]).forward(controlled, z, t)
        plain = target.teacher.condition(batch).forward(controlled.unet, z, t)
    assert torch.equal(ours, reference) and not torch.allclose(ours, plain)  # the ControlNet acts
    null = trainer.uncond(cond)
    assert torch.equal(null.controlnet_cond, batch["control_image"]) and type(null) is type(cond)
    assert type(cond.to(dtype=torch.float64)).controlnet is controlled.controlnet
    with pytest.raises(ValueError, match="control image"):
        trainer.condition({k: v for k, v in batch.items() if k != "control_image"})


def test_a_delta_is_adapted_to_a_controlnet_target_data_free(tmp_path):
    """The UNet is trained with the ControlNet frozen in the loop, on the target's control images: the adapted delta
    covers the UNet only, the ControlNet is untouched, and the check samples target + delta with the ControlNet.
    With images it is refused (a ControlNet's training items are its control images)."""
    from perflow.training.adapt import adapt_delta

    target = _controlnet_target()
    cn_before = {k: v.clone() for k, v in target.teacher.unet.controlnet.state_dict().items()}
    with pytest.raises(ValueError, match="data-free"):
        adapt_delta(_delta(), target, tmp_path / "x", config="digits", budget_steps=2, check_every=2, num_samples=20,
                    reference_steps=8, dataset=_digits(64), eval_kwargs=EVAL, progress=False, **TRAIN)
    res = adapt_delta(_delta(), target, tmp_path / "cn", config="digits", budget_steps=4, check_every=2, num_samples=20,
                      reference_steps=8, data_free=True, eval_kwargs=EVAL, progress=False, **TRAIN)
    assert [c["step"] for c in res.checks][:2] == [0, 2] and res.delta is not None
    adapted = load_file(str(res.delta))
    unet_keys = set(target.teacher.unet.unet.state_dict())
    assert set(adapted) <= unet_keys and any(adapted[k].abs().max() > 0 for k in adapted)
    assert all(torch.equal(v, cn_before[k]) for k, v in target.teacher.unet.controlnet.state_dict().items())
    student = load_file(str(tmp_path / "cn" / "run" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(student) == unet_keys  # the exported student is the UNet alone
