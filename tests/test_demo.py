"""The demo end to end (reduced size), the evaluation harness and `perflow eval`."""

import json

import pytest
import torch

from perflow.cli import main as cli_main


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """`perflow demo --quick`, through the CLI (the README's main command, reduced)."""
    out = tmp_path_factory.mktemp("demo")
    rc = cli_main(["demo", "--quick", "--output-dir", str(out), "--no-progress"])
    return out, rc


@pytest.mark.slow
def test_quick_demo_writes_tables_and_pictures(quick_demo):
    out, rc = quick_demo
    assert rc == 0
    for name in ("digits_1steps.png", "digits_4steps.png", "digits_8steps.png", "digits_perflow_vs_ddim.png",
                 "toy2d_trajectories.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    rows = json.loads((out / "digits_results.json").read_text())["rows"]
    got = {(r["sampler"], r["steps"]) for r in rows}
    for sampler in ("perflow (K=4)", "reflow (K=1)", "teacher ddim", "teacher dpmsolver++", "teacher unipc"):
        for n in (1, 2, 4, 8):
            assert (sampler, n) in got
    for r in rows:
        assert r["nfe"] == r["steps"]
        assert r["fd"] >= 0 and r["paired_mse"] >= 0 and 0 <= r["accuracy"] <= 1
    md = (out / "digits_results.md").read_text()
    assert "| perflow (K=4) | 4 | 4 |" in md and "perflow demo --quick" in md
    toy = json.loads((out / "toy2d_results.json").read_text())
    assert {r["sampler"] for r in toy["rows"]} >= {"perflow (K=4)", "reflow (K=1)", "teacher ddim"}
    assert all(r["sw"] > 0 for r in toy["rows"])
    assert (out / "perflow_student" / "unet").is_dir() and (out / "reflow_student" / "scheduler").is_dir()


@pytest.mark.slow
def test_cli_eval_on_a_trained_student(quick_demo, tmp_path, capsys):
    out, _ = quick_demo
    rc = cli_main([
        "eval", "--perflow", str(out / "perflow_student"), "--num-samples", "20", "--steps", "1", "4",
        "--baselines", "ddim", "--reference-steps", "8", "--output-dir", str(tmp_path), "--no-progress",
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| perflow (K=4) | 4 | 4 |" in printed and "perflow eval --perflow" in printed
    data = json.loads((tmp_path / "digits_eval.json").read_text())
    assert {(r["sampler"], r["steps"]) for r in data["rows"]} == {
        ("teacher ddim", 8), ("perflow (K=4)", 1), ("perflow (K=4)", 4), ("teacher ddim", 1), ("teacher ddim", 4),
    }


def test_cli_eval_errors_name_the_problem(tmp_path, capsys):
    assert cli_main(["eval", "--perflow", str(tmp_path / "missing"), "--num-samples", "20", "--no-progress"]) == 2
    assert "no PeRFlow student" in capsys.readouterr().err
    assert cli_main(["eval", "--task", "images", "--teacher", str(tmp_path)]) == 2
    assert "--prompts" in capsys.readouterr().err


def test_harness_gives_every_sampler_the_same_noise():
    """Two identical samplers must score identically, and the teacher's own DDIM converges to its
    reference as steps grow (exact analytic teacher, no training)."""
    from perflow.builtin.gaussian_mixture import default_mixture
    from perflow.evaluation.harness import Sampler, compare_samplers
    from perflow.evaluation.samplers import baseline_scheduler
    from perflow.evaluation.toy2d import sd_alphas_cumprod, teacher_scheduler_config

    gmm = default_mixture()
    fn = gmm.denoiser(sd_alphas_cumprod())
    cfg = teacher_scheduler_config()
    make = lambda: baseline_scheduler("ddim", cfg)  # noqa: E731
    noise = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    res = compare_samplers([Sampler("a", fn, make), Sampler("b", fn, make)], Sampler("ref", fn, make, "reference"),
                           noise, steps=(2, 8, 32), reference_steps=256, progress=False)
    for n in (2, 8, 32):
        assert res.row("a", n)["paired_mse"] == res.row("b", n)["paired_mse"]
    mse = [res.row("a", n)["paired_mse"] for n in (2, 8, 32)]
    assert mse[0] > mse[1] > mse[2]


def test_harness_measures_straightness_in_the_students_own_windows():
    """Flow straightness within windows uses the PeRFlow sampler's windows (its scheduler's boundaries), not 4 equal
    ones: the within-window figure equals metrics.straightness over those boundaries."""
    from perflow.builtin.gaussian_mixture import default_mixture
    from perflow.evaluation import metrics
    from perflow.evaluation.harness import Sampler, compare_samplers
    from perflow.evaluation.samplers import baseline_scheduler, sample
    from perflow.evaluation.toy2d import sd_alphas_cumprod, teacher_scheduler_config
    from perflow.scheduler import PeRFlowScheduler

    gmm = default_mixture()
    fn = gmm.denoiser(sd_alphas_cumprod())
    cfg = teacher_scheduler_config()
    windows = [1.0, 0.75, 0.5, 0.15, 0.0]
    make = lambda: PeRFlowScheduler.from_config(cfg, prediction_type="ddim_eps", window_boundaries=windows)  # noqa: E731
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    student = lambda z, t: fn(z, t.clamp(max=999))  # noqa: E731 - any flow will do; the scheduler starts at t T = 1000
    res = compare_samplers([Sampler("p", student, make, "perflow")], Sampler("ref", fn, lambda: baseline_scheduler("ddim", cfg),
                           "reference"), noise, steps=(4,), reference_steps=16, flow_steps=16, progress=False)
    assert res.meta["straightness_windows"] == windows
    traj = sample(student, make(), noise, 16, return_trajectory=True)
    want = metrics.straightness(traj.trajectory, traj.times, torch.tensor(windows, dtype=torch.float64))
    assert res.meta["straightness"]["p (16 steps)"]["within_windows"] == pytest.approx(want, rel=1e-9)


def test_image_harness_on_a_tiny_sd_pipeline(tmp_path):
    """FID (a TorchScript feature net given by path), paired MSE and the PeRFlow scheduler on a tiny SD1.5."""
    from PIL import Image

    from perflow.evaluation.images import ImageEvalConfig, evaluate_images
    from perflow.scheduler import PeRFlowScheduler
    from perflow.tiny import tiny_sd15_pipeline

    pipe = tiny_sd15_pipeline()
    pipe.save_pretrained(tmp_path / "teacher")
    pipe.unet.save_pretrained(tmp_path / "student" / "unet")
    PeRFlowScheduler.from_config(pipe.scheduler.config, prediction_type="ddim_eps").save_pretrained(tmp_path / "student" / "scheduler")

    class Features(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 5, stride=8)

        def forward(self, x):
            return self.conv(x)

    torch.jit.save(torch.jit.script(Features()), str(tmp_path / "inception.pt"))
    (tmp_path / "real").mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).byte().numpy()).save(tmp_path / "real" / f"{i}.png")
    cfg = ImageEvalConfig(
        teacher=str(tmp_path / "teacher"), prompts=["a cat", "a dog"], perflow=str(tmp_path / "student"),
        real_images=str(tmp_path / "real"), inception=str(tmp_path / "inception.pt"), steps=(1, 2),
        baselines=("ddim",), num_samples=4, reference_steps=4, batch_size=2,
    )
    res = evaluate_images(cfg, progress=False)
    assert {(r["sampler"], r["steps"]) for r in res.rows} == {
        ("teacher ddim", 4), ("perflow (K=4)", 1), ("perflow (K=4)", 2), ("teacher ddim", 1), ("teacher ddim", 2)}
    assert all(r["fd"] >= 0 for r in res.rows) and res.row("teacher ddim", 4)["paired_mse"] == 0.0
    with pytest.raises(FileNotFoundError, match="TorchScript InceptionV3"):
        evaluate_images(ImageEvalConfig(teacher=str(tmp_path / "teacher"), prompts=["x"], inception=str(tmp_path / "nope.pt")))
    with pytest.raises(FileNotFoundError, match="CLIP"):
        evaluate_images(ImageEvalConfig(teacher=str(tmp_path / "teacher"), prompts=["x"], clip=str(tmp_path)))


def test_digits_evaluator_lives_in_its_own_module_and_reads_the_teacher_scheduler_config(tmp_path):
    """``evaluate_digits`` & co. are public from :mod:`perflow.evaluation` and come from
    :mod:`perflow.evaluation.digits`; the teacher's scheduler config is the shipped JSON file."""
    import perflow.evaluation as ev
    from perflow.builtin.digits import digits_teacher_path
    from perflow.evaluation import digits

    for name in ("DigitsEvalConfig", "evaluate_digits", "class_model_fn"):
        assert getattr(ev, name) is getattr(digits, name)
    shipped = json.loads((digits_teacher_path() / "scheduler" / "scheduler_config.json").read_text())
    assert digits.teacher_scheduler_config("digits") == shipped
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        digits.teacher_scheduler_config(str(tmp_path))


def test_real_images_for_fid_are_resized_and_centre_cropped(tmp_path):
    """``load_real_images`` (through the training loader): short side to R (bicubic), centre crop,
    ``[-1, 1]``; checked against PIL done by hand, bit for bit, on odd sizes and modes."""
    import numpy as np
    from PIL import Image

    from perflow.evaluation.images import load_real_images

    rng = np.random.default_rng(0)
    expected = []
    for i, (w, h, mode) in enumerate([(23, 17, "RGB"), (16, 40, "L"), (30, 30, "RGBA")]):
        im = Image.fromarray(rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8).squeeze(-1) if mode == "L"
                             else rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8), mode)
        im.save(tmp_path / f"{i}.png")
        rgb = im.convert("RGB")
        s = 12 / min(w, h)
        rgb = rgb.resize((max(12, round(w * s)), max(12, round(h * s))), Image.BICUBIC)
        left, top = (rgb.width - 12) // 2, (rgb.height - 12) // 2
        arr = np.asarray(rgb.crop((left, top, left + 12, top + 12)), dtype=np.uint8)
        expected.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1)
    (tmp_path / "notes.txt").write_text("not an image")
    out = load_real_images(tmp_path, 12)
    assert out.shape == (3, 3, 12, 12) and out.dtype == torch.float32
    assert torch.equal(out, torch.stack(expected))
    assert load_real_images(tmp_path, 12, limit=2).shape[0] == 2
    with pytest.raises(FileNotFoundError, match="at least 2 real images"):
        load_real_images(tmp_path / "missing", 12)
