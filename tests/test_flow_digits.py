"""The built-in flow-matching teacher ``flow_digits``: shipped weights, its training, `perflow train`, eval, demo."""

import json

import pytest
import torch

from perflow.builtin.suite import get_suite_teacher, suite_teacher_path
from perflow.cli import main as cli_main


@pytest.fixture(scope="module")
def teacher():
    from perflow.training.teachers import load_teacher

    return load_teacher("flow_digits")


def test_shipped_teacher_is_a_small_class_conditional_sd3_transformer(teacher):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from perflow.training.flow_teachers import LabelFlowTeacher

    path = suite_teacher_path("flow_digits")
    assert {p.name for p in path.iterdir()} >= {"transformer", "scheduler", "label_encoder"}
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 10e6 and not list(path.rglob("*.bin"))
    assert isinstance(teacher, LabelFlowTeacher) and isinstance(teacher.unet, SD3Transformer2DModel)
    assert teacher.denoiser_name == "transformer" and teacher.prediction_type == "flow_prediction"
    assert teacher.schedule_config["schedule_kind"] == "flow_matching" and teacher.schedule.shift == 2.0
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler")
    assert sched.config.shift == get_suite_teacher("flow_digits").schedule["shift"]
    assert teacher.null_label == 10 and teacher.default_prompts() == list(range(10))


@torch.no_grad()
def test_shipped_teacher_samples_the_requested_digits(teacher):
    from perflow.builtin.classifier import load_digit_classifier
    from perflow.denoisers import unet_denoiser
    from perflow.evaluation.samplers import baseline_scheduler, sample

    labels = torch.arange(50) % 10
    noise = torch.randn(50, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    fn = unet_denoiser(teacher.unet, teacher.encode_labels(labels))
    x = sample(fn, baseline_scheduler("ddim", teacher.schedule_config), noise, 20).samples
    assert x.shape == (50, 1, 8, 8) and torch.isfinite(x).all()
    accuracy = (load_digit_classifier()(x.clamp(-1, 1)).argmax(-1) == labels).float().mean().item()
    assert accuracy >= 0.8  # the 50-step figure on 1000 samples is in benchmarks/results/flow_digits_eval.md


def test_training_script_trains_the_flow_teacher(tmp_path):
    from perflow.builtin.train_teacher import main
    from perflow.training.teachers import load_teacher

    main(["--teacher", "flow_digits", "--max-steps", "2", "--batch-size", "8", "--output-dir", str(tmp_path / "t")])
    t = load_teacher(str(tmp_path / "t"))
    assert type(t).__name__ == "LabelFlowTeacher"
    assert json.loads((tmp_path / "t" / "scheduler" / "scheduler_config.json").read_text())["shift"] == 2.0


def test_perflow_train_on_the_flow_teacher_and_sample(tmp_path, teacher):
    from perflow.denoisers import unet_denoiser
    from perflow.evaluation.samplers import sample
    from perflow.evaluation.students import load_student
    from perflow.scheduler import PeRFlowScheduler

    out = tmp_path / "student"
    rc = cli_main(["train", "--config", "flow_digits", "--training.max_steps", "2", "--training.batch_size", "8",
                   "--perflow.num_solver_steps", "2", "--output.output_dir", str(out), "--output.checkpoint_every", "0"])
    assert rc == 0
    assert (out / "transformer").is_dir() and (out / "label_encoder").is_dir()
    st = load_student(out, teacher)
    sched = st.make_scheduler()
    assert isinstance(sched, PeRFlowScheduler) and sched.is_flow_matching
    assert sched.config.prediction_type == "velocity" and sched.config.num_time_windows == 4
    labels = torch.arange(10)
    noise = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x = sample(unet_denoiser(st.unet, teacher.encode_labels(labels)), sched, noise, 4).samples
    assert x.shape == (10, 1, 8, 8) and torch.isfinite(x).all()
    assert cli_main(["train", "--config", "flow_digits", "--perflow.prediction_type", "diff_eps", "--training.max_steps",
                     "1", "--output.output_dir", str(tmp_path / "bad")]) == 2


def test_flow_baselines_are_diffusers_flow_modes(teacher):
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    from perflow.evaluation.samplers import baseline_scheduler

    cfg = dict(teacher.schedule_config)
    assert isinstance(baseline_scheduler("ddim", cfg), FlowMatchEulerDiscreteScheduler)
    for name, cls in (("dpmsolver++", DPMSolverMultistepScheduler), ("unipc", UniPCMultistepScheduler)):
        s = baseline_scheduler(name, cfg)
        assert isinstance(s, cls) and s.config.use_flow_sigmas and s.config.prediction_type == "flow_prediction"
        assert s.config.flow_shift == 2.0
        s.set_timesteps(4)
        assert len(s.timesteps) == 4 and float(s.sigmas[-1]) == 0.0


@pytest.mark.slow
def test_quick_demo_with_the_flow_stage(tmp_path):
    out = tmp_path / "demo"
    rc = cli_main(["demo", "--quick", "--flow", "--no-reflow-baseline", "--output-dir", str(out), "--no-progress"])
    assert rc == 0
    rows = json.loads((out / "flow_digits_results.json").read_text())["rows"]
    got = {(r["sampler"], r["steps"]) for r in rows}
    for sampler in ("perflow (K=4)", "teacher ddim", "teacher dpmsolver++", "teacher unipc"):
        for n in (1, 2, 4, 8):
            assert (sampler, n) in got
    assert all(r["fd"] >= 0 and 0 <= r["accuracy"] <= 1 for r in rows)
    assert (out / "flow_digits_perflow_vs_euler.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "flow_perflow_student" / "transformer").is_dir()
