"""``perflow eval --task teacher`` / ``evaluate_teacher`` on teachers of every kind that loads here,
its bad-input errors, and ``perflow train --help`` / the ``default`` recipe."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch

from perflow import PeRFlowScheduler

from cli_helpers import cli, error_line

FAST = ["--steps", "1", "4", "--reference-steps", "8", "--baselines", "ddim", "unipc", "--no-progress"]


def student_folder(path: Path, unet) -> Path:
    """A ``perflow train``-shaped student: the given UNet and a PeRFlow scheduler (K = 4)."""
    unet.save_pretrained(path / "unet")
    PeRFlowScheduler(prediction_type="ddim_eps", num_time_windows=4).save_pretrained(path / "scheduler")
    return path


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """The teacher task on the built-in digits teacher, with a PeRFlow student, through the CLI."""
    from perflow.training.teachers import load_teacher

    root = tmp_path_factory.mktemp("digits")
    student = student_folder(root / "student", load_teacher("digits").unet)
    from perflow.cli import main

    torch.set_num_threads(1)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["eval", "--task", "teacher", "--teacher", "digits", "--perflow", str(student),
                   "--num-samples", "20", *FAST, "--output-dir", str(root / "out")])
    assert rc == 0
    return json.loads((root / "out" / "teacher_eval.json").read_text()), (root / "out" / "teacher_eval.md").read_text()


def test_digits_teacher_rows_metrics_and_best_spacing(digits_run):
    from perflow.evaluation.samplers import TIMESTEP_SPACINGS

    data, md = digits_run
    rows, meta = data["rows"], data["meta"]
    ref = [r for r in rows if r["kind"] == "reference"]
    assert len(ref) == 1 and ref[0]["paired_mse"] == 0.0 and ref[0]["sw_ref"] == 0.0
    names = {(r["sampler"], r["steps"]) for r in rows if r["kind"] != "reference"}
    assert names == {(s, n) for s in ("perflow (K=4)", "teacher ddim", "teacher unipc") for n in (1, 4)}
    for r in rows:
        # the digits teacher: classifier accuracy, FD to held-out digits, sliced W2 to them and to the reference
        assert {"accuracy", "fd", "sw_ref", "sw_ref_se", "sw_real", "paired_mse"} <= set(r), r
    for r in (r for r in rows if r["kind"] == "baseline"):
        tried = r["spacing_paired_mse"]
        assert set(tried) == set(TIMESTEP_SPACINGS) and r["spacing"] in TIMESTEP_SPACINGS
        assert r["paired_mse"] == min(tried.values()) == tried[r["spacing"]]
    # the reference has more steps than any compared sampler (a DDIM at its own step count would be the
    # reference itself, error exactly 0): every spacing of the 4-step DDIM is some distance from it
    ddim4 = next(r for r in rows if r["sampler"] == "teacher ddim" and r["steps"] == 4 and r["kind"] == "baseline")
    assert meta["reference_steps"] == 8 and min(ddim4["spacing_paired_mse"].values()) > 0
    assert meta["teacher_conditioning"] == "class" and meta["num_real_reference"] == 359
    assert meta["sw_ref_floor"] > 0 and meta["command"].startswith("perflow eval --task teacher --teacher digits")
    assert "timestep spacing" in md and "sliced W2 to teacher ref" in md
    # the per-sample errors: median and p99 columns, and every paired-MSE finding against a baseline gives the
    # paired difference, whose mean is the difference of the two rows' means (so the errors kept for a baseline
    # are those of the spacing its row reports)
    for r in rows:
        if r["kind"] != "reference":
            assert 0 <= r["paired_mse_p50"] <= r["paired_mse_p99"], r
    for n in (1, 4):
        student = next(r for r in rows if r["sampler"] == "perflow (K=4)" and r["steps"] == n)
        line = next(x for x in md.splitlines() if x.startswith(f"- perflow (K=4) at {n} steps: paired_mse"))
        for base in ("teacher ddim", "teacher unipc"):
            other = next(r for r in rows if r["sampler"] == base and r["steps"] == n)
            diff = f"difference {student['paired_mse'] - other['paired_mse']:+.2g} ± "
            assert (f"{base} (" in line) == (diff in line), (line, diff)
        assert "over 20 paired samples" in line, line


def test_sliced_w2_se_is_zero_for_identical_sets_and_positive_otherwise():
    from perflow.evaluation.metrics import sliced_wasserstein
    from perflow.evaluation.teacher_eval import bootstrap_se

    x = torch.randn(30, 5, generator=torch.Generator().manual_seed(0))
    y = x + 0.5 * torch.randn(30, 5, generator=torch.Generator().manual_seed(1))
    assert bootstrap_se(lambda i: sliced_wasserstein(x[i], x[i], 16), 30, 10) == 0.0
    assert bootstrap_se(lambda i: sliced_wasserstein(x[i], y[i], 16), 30, 10) > 0.0


def test_python_api_on_the_photos_teacher_with_given_labels(one_thread):
    """A v-prediction RGB class teacher of the suite; labels as given; no classifier: no accuracy."""
    from perflow.evaluation import EvalResult
    from perflow.evaluation.teacher_eval import TeacherEvalConfig, evaluate_teacher

    try:
        result = evaluate_teacher(TeacherEvalConfig(
            teacher="photos", labels=[0, 3], num_samples=20, steps=(1,), reference_steps=2, baselines=("ddim",),
            spacings=("trailing", "linspace"), bootstrap=4), progress=False)
    except FileNotFoundError as err:
        pytest.skip(f"the photos teacher is not shipped here: {err}")
    assert isinstance(result, EvalResult)
    assert all("accuracy" not in r and "sw_real" in r for r in result.rows)
    assert result.meta["config"]["labels"] == [0, 3] and result.meta["resolution"] == 16
    assert "--labels 0 3" in result.meta["command"] and "--spacings trailing linspace" in result.meta["command"]
    assert result.previews["teacher ddim@1"].shape == (20, 3, 16, 16)


def test_faces_unconditional_teacher_where_it_loads(one_thread, capsys):
    """The unconditional DDPMPipeline teacher, once ``load_teacher`` reads it (skipped until then)."""
    from perflow.evaluation.teacher_eval import TeacherEvalConfig, evaluate_teacher, resolve_teacher

    try:
        teacher, _, _ = resolve_teacher("faces")
    except (FileNotFoundError, ValueError, OSError) as err:
        pytest.skip(f"the faces (UNet2DModel) teacher does not load on this branch: {err}")
    result = evaluate_teacher(TeacherEvalConfig(
        teacher="faces", num_samples=20, steps=(1,), reference_steps=2, baselines=("ddim",), bootstrap=4), progress=False)
    assert result.meta["teacher_conditioning"] == "none" and "sw_real" in result.rows[0]
    rc, _, err = cli(["eval", "--task", "teacher", "--teacher", "faces", "--guidance-scale", "3", "--num-samples", "20",
                      *FAST], capsys)
    assert rc == 2 and "unconditional" in error_line(err)


def test_tiny_sd_pipeline_with_prompts(tmp_path, one_thread):
    from perflow.evaluation.teacher_eval import TeacherEvalConfig, evaluate_teacher
    from perflow.tiny import tiny_sd15_pipeline

    tiny_sd15_pipeline().save_pretrained(tmp_path / "sd")
    student = student_folder(tmp_path / "student", tiny_sd15_pipeline().unet)
    cfg = TeacherEvalConfig(teacher=str(tmp_path / "sd"), perflow=str(student), prompts=["a cat", "a dog"],
                            num_samples=20, steps=(1,), reference_steps=2, baselines=("dpmsolver++",),
                            spacings=("trailing",), batch_size=20, bootstrap=4, flow_steps=4)
    result = evaluate_teacher(cfg, progress=False)
    assert result.meta["teacher_conditioning"] == "text" and result.meta["guidance_scale"] == 7.5
    assert {r["sampler"] for r in result.rows} == {"teacher ddim", "teacher dpmsolver++", "perflow (K=4)"}
    assert all("accuracy" not in r and "sw_real" not in r for r in result.rows)
    assert "--prompts 'a cat' 'a dog'" in result.meta["command"]
    with pytest.raises(ValueError, match="--prompts"):
        evaluate_teacher(TeacherEvalConfig(teacher=str(tmp_path / "sd"), num_samples=20), progress=False)


# ----------------------------------------------------------------------------- bad input: one line, exit 2


def test_a_student_of_another_architecture_is_one_line(tmp_path, capsys):
    from diffusers import UNet2DModel

    from perflow.tiny import tiny_class_teacher

    narrow = student_folder(tmp_path / "narrow", tiny_class_teacher().unet)  # other widths
    uncond = student_folder(tmp_path / "uncond", UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4))
    for folder, needle in ((narrow, "block_out_channels"), (uncond, "is a UNet2DModel")):
        rc, out, err = cli(["eval", "--task", "teacher", "--teacher", "digits", "--perflow", folder,
                            "--num-samples", "20", *FAST], capsys)
        line = error_line(err)
        assert rc == 2 and needle in line and "--teacher" in line and "| sampler" not in out


def test_a_teacher_that_does_not_load_is_one_line(tmp_path, capsys):
    (tmp_path / "half" / "unet").mkdir(parents=True)
    for teacher, needle in ((tmp_path / "missing", "is not a folder"), (tmp_path / "half", "label_encoder")):
        rc, _, err = cli(["eval", "--task", "teacher", "--teacher", teacher, "--num-samples", "20", *FAST], capsys)
        assert rc == 2 and needle in error_line(err)


@pytest.mark.parametrize("args, needle", [
    (["--num-samples", "5"], "at least 20"),
    (["--num-samples", "20", "--prompts", "a cat"], "--prompts is for text-conditioned teachers"),
    (["--num-samples", "20", "--spacings", "uniform"], "spacings"),
    (["--num-samples", "20", "--device", "nodevice"], "--device 'nodevice' is not usable here"),
    (["--num-samples", "20", "--reference-steps", "4"], "must exceed the largest step count 4"),
    (["--num-samples", "20", "--resolution", "7"], "--resolution 7 does not fit the teacher's denoiser"),
])
def test_bad_teacher_task_options_are_one_line(args, needle, capsys):
    rc, _, err = cli(["eval", "--task", "teacher", "--teacher", "digits", *FAST, *args], capsys)
    assert rc == 2 and needle in error_line(err)


# ----------------------------------------------------------------------------- perflow train --help and recipes


def _train_help_defaults() -> dict[str, str]:
    """``{"section.field": text after "(default: "}`` of every field flag of ``perflow train``."""
    from perflow.cli import build_parser

    import argparse

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    train = sub.choices["train"]
    out = {}
    for action in train._actions:
        m = re.search(r"\(default: (.*)\)$", action.help or "")
        if m and "." in action.dest:
            out[action.dest] = m.group(1).replace("%%", "%")
    return out


def test_train_help_shows_what_print_config_resolves_without_config(capsys):
    import yaml

    rc, out, _ = cli(["train", "--print-config"], capsys)
    resolved = yaml.safe_load(out)
    shown = _train_help_defaults()
    expected = {f"{s}.{k}": repr(v) for s, fields in resolved.items() for k, v in fields.items()}
    assert rc == 0 and shown == expected


def test_default_recipe_resolves_to_the_schema_defaults_plus_its_own_values(capsys):
    from importlib import resources

    import yaml

    from perflow.training.config import TrainConfig
    from perflow.training.config_io import coerce, field_index, load_config, recipe_names

    assert "default" in recipe_names()
    recipe = yaml.safe_load((resources.files("perflow") / "recipes" / "default.yaml").read_text()) or {}
    given = {f"{s}.{k}": v for s, fields in recipe.items() for k, v in fields.items()}
    index = field_index()
    assert set(given) <= set(index)
    resolved, schema = load_config("default").to_dict(), TrainConfig().to_dict()
    for key, (section, f, tp) in index.items():
        want = coerce(key, tp, given[key]) if key in given else schema[section][f.name]
        assert resolved[section][f.name] == want, key
    rc, out, _ = cli(["train", "--help"], capsys)
    assert rc == 0 and re.search(r"recipe name\s+\(default, digits,", out)
    rc, out, _ = cli(["train", "--config", "default", "--print-config"], capsys)
    assert rc == 0 and yaml.safe_load(out) == resolved


def test_the_ddim_baseline_clips_only_where_the_teachers_config_says_so():
    """A scheduler config without ``clip_sample`` (PNDM's) is sampled unclipped, as the trainer's window solve
    reads it; DDPM's explicit ``clip_sample: true`` is kept."""
    from diffusers import DDPMScheduler, PNDMScheduler

    from perflow.evaluation.samplers import baseline_scheduler
    from perflow.training.teachers import teacher_clip_sample

    pndm, ddpm = dict(PNDMScheduler().config), dict(DDPMScheduler(clip_sample=True).config)
    assert "clip_sample" not in pndm
    assert baseline_scheduler("ddim", pndm).config.clip_sample is False and teacher_clip_sample(pndm) is None
    assert baseline_scheduler("ddim", ddpm).config.clip_sample is True and teacher_clip_sample(ddpm) == 1.0


def test_a_student_of_another_noise_schedule_is_one_line(tmp_path, capsys):
    """Same architecture, another teacher's schedule: refused, not scored against the wrong reference."""
    from perflow.training.teachers import load_teacher

    folder = tmp_path / "other"
    load_teacher("digits").unet.save_pretrained(folder / "unet")
    PeRFlowScheduler(prediction_type="ddim_eps", num_time_windows=4, beta_schedule="squaredcos_cap_v2").save_pretrained(
        folder / "scheduler")
    rc, out, err = cli(["eval", "--task", "teacher", "--teacher", "digits", "--perflow", folder, "--num-samples", "20",
                        *FAST], capsys)
    line = error_line(err)
    assert rc == 2 and "follows another noise schedule" in line and "squaredcos_cap_v2" in line and "| sampler" not in out
