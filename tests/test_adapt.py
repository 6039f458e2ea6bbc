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


def _adapt(out, callback=None, resume=False):
    from perflow.training.adapt import adapt_delta

    target = Target(teacher=tiny_class_teacher(seed=1), name="tiny fine-tune")  # same architecture, other weights
    return adapt_delta(_delta(), target, out, config="digits", budget_steps=6, check_every=2, num_samples=20,
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
