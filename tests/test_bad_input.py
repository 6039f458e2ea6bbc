"""Bad input to the delta, eval and teacher code: one clear line naming the file and the fix, never a
traceback, and nothing wrongly accepted (issue 8, "Bad input")."""

from __future__ import annotations

import json
import os
import random
import shutil
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from perflow.delta import base_model_info, extract_delta, load_delta, merge_delta, save_delta
from perflow.scheduler import PeRFlowScheduler
from perflow.tiny import tiny_sd15_pipeline, tiny_sd15_unet

from cli_helpers import cli, error_line
from delta_helpers import perturbed

SRC = Path(__file__).resolve().parents[1] / "src"  # the checkout's package root (src layout)
HINT = "re-download or re-export it"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny UNet folder (the teacher), a delta learned on it with full metadata, and a good LoRA."""
    root = tmp_path_factory.mktemp("world")
    teacher = tiny_sd15_unet(0)
    student = perturbed(teacher)
    teacher.save_pretrained(root / "unet")
    delta = extract_delta(student, teacher)
    sched = PeRFlowScheduler(prediction_type="diff_eps", num_time_windows=4)
    save_delta(delta, root / "delta.safetensors",
               {"base_model": base_model_info(teacher), "num_time_windows": 4, "prediction_type": "diff_eps",
                "scheduler_config": dict(sched.config)})
    return {"root": root, "unet": root / "unet", "delta": root / "delta.safetensors", "teacher": teacher,
            "student": student, "delta_tensors": delta}


def corrupt(path: Path, kind: str, good: Path | None = None) -> Path:
    """Write a damaged safetensors file: empty, the first half of a good one, or random bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "empty":
        data = b""
    elif kind == "truncated":
        whole = good.read_bytes()
        data = whole[: len(whole) // 2]
    else:
        data = random.Random(0).randbytes(300)
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------- damaged safetensors


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage"])
def test_damaged_safetensors_anywhere_is_one_line_naming_the_file(world, tmp_path, capsys, kind):
    good_weights = world["unet"] / "diffusion_pytorch_model.safetensors"
    bad = corrupt(tmp_path / "bad.safetensors", kind, world["delta"])
    bad_unet = tmp_path / "bad_unet"
    shutil.copytree(world["unet"], bad_unet)
    corrupt(bad_unet / "diffusion_pytorch_model.safetensors", kind, good_weights)
    released = tmp_path / "released"
    released.mkdir()
    shutil.copy(world["unet"] / "config.json", released / "config.json")
    corrupt(released / "diffusion_pytorch_model.safetensors", kind, good_weights)
    out = tmp_path / "out"
    cases = {
        bad: [
            ["delta", "merge", "--delta", bad, "--into", world["unet"], "-o", out],
            ["delta", "merge", "--delta", world["delta"], "--extra", bad, "--into", world["unet"], "-o", out],
            ["delta", "merge", "--delta", world["delta"], "--into", bad, "-o", tmp_path / "o.safetensors",
             "--unet-config", world["unet"]],
            ["delta", "to-lora", "--delta", bad, "--rank", "2", "-o", tmp_path / "l.safetensors"],
            ["delta", "info", bad],
        ],
        bad_unet / "diffusion_pytorch_model.safetensors": [
            ["delta", "merge", "--delta", world["delta"], "--into", bad_unet, "-o", out],
            ["delta", "extract", "--student", bad_unet, "--teacher", world["unet"], "-o", tmp_path / "e.safetensors",
             "--num-time-windows", "4", "--prediction-type", "diff_eps"],
        ],
        released / "diffusion_pytorch_model.safetensors": [
            ["delta", "merge", "--delta", released, "--into", world["unet"], "-o", out],
            ["delta", "info", released],
        ],
    }
    for named, argvs in cases.items():
        for argv in argvs:
            rc, _, err = cli(argv, capsys)
            line = error_line(err)
            assert rc == 2 and str(named) in line and HINT in line, (argv, line)
    assert not out.exists() and not (tmp_path / "l.safetensors").exists()


def _class_teacher_folder(path: Path, teacher=None, safe: bool = True) -> Path:
    from perflow.tiny import tiny_class_teacher

    teacher = teacher or tiny_class_teacher()
    teacher.unet.save_pretrained(path / "unet", safe_serialization=safe)
    teacher.label_encoder.save_pretrained(path / "label_encoder")
    (path / "scheduler").mkdir(parents=True)
    config = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "set_alpha_to_one": False, "prediction_type": "epsilon"}
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return path


def test_damaged_teacher_and_student_init_weights_name_the_file(tmp_path, capsys):
    from perflow.training.loop import load_student_init
    from perflow.training.teachers import load_teacher
    from perflow.tiny import tiny_class_teacher

    folder = _class_teacher_folder(tmp_path / "teacher")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    corrupt(weights, "truncated", weights)
    with pytest.raises(ValueError, match=HINT) as err:
        load_teacher(folder)
    assert str(weights) in str(err.value)
    rc, _, stderr = cli(["eval", "--teacher", folder, "--num-samples", "20", "--steps", "1",
                         "--reference-steps", "2", "--baselines", "ddim"], capsys)
    assert rc == 2 and str(weights) in error_line(stderr)
    with pytest.raises(ValueError, match=HINT) as err:
        load_student_init(tiny_class_teacher().unet, str(folder))
    assert str(weights) in str(err.value)


# ----------------------------------------------------------------------------- unwritable outputs


def test_outputs_below_a_regular_file_are_refused_before_any_work(world, tmp_path, capsys, monkeypatch):
    import perflow.delta
    import perflow.evaluation.toy2d

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    calls = []
    real_load = perflow.delta.load_delta
    monkeypatch.setattr(perflow.delta, "load_delta", lambda *a, **k: calls.append(a) or real_load(*a, **k))
    monkeypatch.setattr(perflow.evaluation.toy2d, "train_2d_student", lambda *a, **k: calls.append("trained"))
    for argv in (
        ["delta", "merge", "--delta", world["delta"], "--into", world["unet"], "-o", blocker / "out"],
        ["delta", "to-lora", "--delta", world["delta"], "--rank", "2", "-o", blocker / "l.safetensors"],
        ["delta", "extract", "--student", world["unet"], "--teacher", world["unet"], "-o", blocker / "e.safetensors"],
        ["eval", "--task", "toy2d", "--output-dir", blocker / "results"],
        ["demo", "--quick", "--output-dir", blocker / "demo"],
    ):
        rc, _, err = cli(argv, capsys)
        line = error_line(err)
        assert rc == 2 and str(blocker) in line and "not a folder" in line, line
    assert calls == []  # refused before reading the delta, training or evaluating anything


def _unshare_available(tmp_path: Path) -> bool:
    mnt = tmp_path / "probe-mnt"
    mnt.mkdir()
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {mnt}"],
                           capture_output=True)
    return probe.returncode == 0


def _in_small_mount(tmp_path: Path, options: str, argv: list) -> subprocess.CompletedProcess:
    """Run ``perflow ARGV`` with ``tmp_path/mnt`` a 64 kB tmpfs (own mount namespace) mounted with ``options``."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cmd = " ".join(f"'{a}'" for a in [sys.executable, "-m", "perflow", *map(str, argv)])
    script = f"mount -t tmpfs -o {options},size=64k tmpfs {mnt} && {cmd}; rc=$?; ls -A {mnt}; exit $rc"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("case", ["full-merge", "full-lora", "read-only-merge", "read-only-eval"])
def test_full_disk_and_read_only_mount_are_one_line_errors(world, tmp_path, case):
    if not _unshare_available(tmp_path):
        pytest.skip("needs `unshare -m` and tmpfs mounts (a private mount namespace)")
    mnt = tmp_path / "mnt"
    options = "rw" if case.startswith("full") else "ro"
    argv = {
        "full-merge": ["delta", "merge", "--delta", world["delta"], "--into", world["unet"], "-o", mnt / "out"],
        "full-lora": ["delta", "to-lora", "--delta", world["delta"], "--rank", "4", "-o", mnt / "l.safetensors"],
        "read-only-merge": ["delta", "merge", "--delta", world["delta"], "--into", world["unet"], "-o", mnt / "out"],
        "read-only-eval": ["eval", "--task", "toy2d", "--toy-steps", "1", "--num-samples", "2", "--steps", "1",
                           "--reference-steps", "2", "--output-dir", mnt / "results"],
    }[case]
    res = _in_small_mount(tmp_path, options, argv)
    line = error_line(res.stderr)
    assert res.returncode == 2 and str(mnt) in line, res.stderr
    assert ("no space left" if options == "rw" else "read-only") in line, line
    leftovers = [n for n in res.stdout.splitlines() if n.startswith(".") or n in ("out", "l.safetensors")]
    assert leftovers == [], res.stdout  # nothing half-written is left on the full disk
    if case == "read-only-eval":
        assert "| sampler" not in res.stdout  # refused before the evaluation, not after it


# ----------------------------------------------------------------------------- errors in cli.main


@pytest.mark.parametrize("error, expected", [
    (OSError(28, "No space left on device", "/x/out.safetensors"), "'/x/out.safetensors': No space left on device"),
    (PermissionError(13, "Permission denied", "/root/secret"), "'/root/secret': Permission denied"),
    (IsADirectoryError(21, "Is a directory", "/tmp"), "'/tmp': Is a directory"),
])
def test_main_turns_os_and_safetensors_errors_into_one_line_but_keeps_bug_tracebacks(
    monkeypatch, capsys, error, expected
):
    import perflow.delta
    from safetensors import SafetensorError

    def raise_(exc):
        def f(*a, **k):
            raise exc
        return f

    monkeypatch.setattr(perflow.delta, "load_delta", raise_(error))
    rc, _, err = cli(["delta", "info", "x.safetensors"], capsys)
    assert rc == 2 and expected in error_line(err)
    monkeypatch.setattr(perflow.delta, "load_delta", raise_(SafetensorError("Error while deserializing header")))
    rc, _, err = cli(["delta", "info", "x.safetensors"], capsys)
    assert rc == 2 and "not a safetensors file" in error_line(err)
    for bug in (TypeError("a bug"), AttributeError("a bug"), OSError("no errno, no file: a bug")):
        monkeypatch.setattr(perflow.delta, "load_delta", raise_(bug))
        with pytest.raises(type(bug)):
            cli(["delta", "info", "x.safetensors"], capsys)


# ----------------------------------------------------------------------------- wrongly accepted


@pytest.mark.parametrize("scale", ["nan", "inf", "-inf"])
def test_non_finite_scale_is_refused(world, tmp_path, capsys, scale):
    rc, _, err = cli(["delta", "merge", "--delta", world["delta"], "--into", world["unet"], "-o", tmp_path / "o",
                      f"--scale={scale}"], capsys)
    assert rc == 2 and "finite" in err and not (tmp_path / "o").exists()
    from perflow.delta import merge_into_path

    for target in (world["teacher"].state_dict(), tiny_sd15_unet(0)):
        with pytest.raises(ValueError, match="finite"):
            merge_delta(target, world["delta_tensors"], scale=float(scale))
    with pytest.raises(ValueError, match="finite"):
        merge_into_path(world["unet"], world["delta"], tmp_path / "o", scale=float(scale))
    assert not (tmp_path / "o").exists()


def test_delta_with_nan_values_is_refused(world):
    broken = dict(world["delta_tensors"])
    broken["conv_in.weight"] = broken["conv_in.weight"].clone()
    broken["conv_in.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="conv_in.weight"):
        merge_delta(world["teacher"].state_dict(), broken)


def test_to_lora_requires_a_safetensors_output(world, tmp_path, capsys):
    from perflow.delta import delta_to_lora, save_lora

    for flag, value in (("-o", tmp_path / "x.pt"), ("--rest", tmp_path / "rest.bin")):
        extra = [] if flag == "-o" else ["-o", tmp_path / "x.safetensors"]
        rc, out, err = cli(["delta", "to-lora", "--delta", world["delta"], "--rank", "2", *extra, flag, value], capsys)
        assert rc == 2 and ".safetensors" in error_line(err) and "| r=" not in out  # before the SVD
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=".safetensors"):
        save_lora(delta_to_lora(world["delta_tensors"], 2, progress=False), str(tmp_path / "x.pt"))


def test_output_inside_the_model_folder_or_holding_it_is_refused(world, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(world["unet"], model)
    before = sorted(p.name for p in model.iterdir())
    rc, _, err = cli(["delta", "merge", "--delta", world["delta"], "--into", model, "-o", model / "merged"], capsys)
    assert rc == 2 and "inside the model folder" in error_line(err)
    assert sorted(p.name for p in model.iterdir()) == before
    rc, _, err = cli(["delta", "merge", "--delta", world["delta"], "--into", model, "-o", tmp_path, "--overwrite"],
                     capsys)
    assert rc == 2 and "would delete it" in error_line(err) and model.is_dir()


def test_merge_into_a_model_of_another_config_warns_naming_the_fields(world, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    from perflow.delta import merge_into_path

    config = {k: v for k, v in world["teacher"].config.items() if not k.startswith("_")}
    other = UNet2DConditionModel.from_config({**config, "act_fn": "gelu", "norm_eps": 1e-6})
    other.save_pretrained(tmp_path / "other")
    rc, _, err = cli(["delta", "merge", "--delta", world["delta"], "--into", tmp_path / "other",
                      "-o", tmp_path / "cli-out"], capsys)
    warning = [line for line in err.splitlines() if "warning:" in line]
    assert rc == 0 and len(warning) == 1 and "act_fn" in warning[0] and "norm_eps" in warning[0], err
    assert "'silu' (delta's teacher) vs 'gelu' (model)" in warning[0]
    with pytest.warns(UserWarning, match=r"\['act_fn', 'norm_eps'\]"):
        merge_into_path(tmp_path / "other", world["delta"], tmp_path / "lib-out")
    with warnings.catch_warnings():  # the teacher itself: no warning
        warnings.simplefilter("error")
        merge_into_path(world["unet"], world["delta"], tmp_path / "same-out")


def _student_folder(path: Path, unet) -> Path:
    unet.save_pretrained(path / "unet")
    PeRFlowScheduler(prediction_type="diff_eps", num_time_windows=4).save_pretrained(path / "scheduler")
    return path


def test_eval_refuses_a_student_of_another_architecture(tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    from perflow.evaluation.students import load_student
    from perflow.training.teachers import load_teacher
    from perflow.tiny import tiny_class_teacher

    digits = load_teacher("digits")
    other = _student_folder(tmp_path / "other-keys", tiny_class_teacher().unet)  # other widths and keys
    config = {k: v for k, v in digits.unet.config.items() if not k.startswith("_")}
    same_shapes = UNet2DConditionModel.from_config({**config, "act_fn": "mish"})
    same_shapes.load_state_dict(digits.unet.state_dict())
    act = _student_folder(tmp_path / "other-act", same_shapes)
    for folder, needle in ((other, "block_out_channels"), (act, "act_fn: 'mish' (student) vs 'silu' (teacher)")):
        with pytest.raises(ValueError, match="--teacher") as err:
            load_student(folder, digits)
        assert needle in str(err.value)
        rc, out, stderr = cli(["eval", "--perflow", folder, "--teacher", "digits", "--num-samples", "20",
                               "--steps", "1", "--reference-steps", "2", "--baselines", "ddim", "--no-progress"],
                              capsys)
        assert rc == 2 and needle in error_line(stderr) and "| sampler" not in out
    assert load_student(_student_folder(tmp_path / "good", digits.unet), digits).unet is not None


# ----------------------------------------------------------------------------- pickles only when asked


def test_pickled_teacher_weights_need_allow_pickle(tmp_path, one_thread):
    from perflow.training import load_config, train
    from perflow.training.teachers import as_teacher, load_teacher
    from perflow.tiny import tiny_class_teacher

    tiny = tiny_class_teacher()
    folder = _class_teacher_folder(tmp_path / "teacher", tiny, safe=False)
    assert (folder / "unet" / "diffusion_pytorch_model.bin").is_file()
    for load in (lambda: load_teacher(folder), lambda: as_teacher(str(folder))):
        with pytest.raises(ValueError, match="allow_pickle") as err:
            load()
        assert str(folder / "unet" / "diffusion_pytorch_model.bin") in str(err.value)
    loaded = load_teacher(folder, allow_pickle=True)
    assert all(torch.equal(loaded.unet.state_dict()[k], v) for k, v in tiny.unet.state_dict().items())

    assert load_config("digits", {"allow_pickle": "true"}).model.allow_pickle is True
    assert load_config("digits").model.allow_pickle is False
    fast = dict(teacher=str(folder), output_dir=str(tmp_path / "run"), max_steps=1, batch_size=4, num_solver_steps=1,
                checkpoint_every=0, validation_every=0, tracker="none", progress=False, save_delta=False)
    with pytest.raises(ValueError, match="allow_pickle"):
        train("digits", **fast)
    result = train("digits", **fast, allow_pickle=True)
    assert result.global_step == 1


# ----------------------------------------------------------------------------- scheduler configs without a class name


def test_scheduler_config_without_class_name_is_recognised(tmp_path):
    from perflow.delta import perflow_scheduler_from_metadata
    from perflow.delta.keys import is_perflow_scheduler_config

    sched = PeRFlowScheduler(prediction_type="velocity", window_boundaries=[1.0, 0.6, 0.3, 0.0])
    config = dict(sched.config)
    assert "_class_name" not in config and is_perflow_scheduler_config(config)
    for not_perflow in ({"_class_name": "DDIMScheduler", "prediction_type": "epsilon"},
                        {"prediction_type": "epsilon", "num_train_timesteps": 1000},
                        {"prediction_type": "velocity"}, None, "PeRFlowScheduler"):
        assert not is_perflow_scheduler_config(not_perflow)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "released SD1.5 recipe" fallback
        rebuilt = perflow_scheduler_from_metadata({"scheduler_config": config})
    assert rebuilt.config.prediction_type == "velocity" and rebuilt.boundaries.tolist() == [1.0, 0.6, 0.3, 0.0]

    # the docstring's recipe: scheduler_config=dict(scheduler.config); saved with its class name, merged right
    teacher = tiny_sd15_unet(0)
    delta = extract_delta(perturbed(teacher), teacher)
    save_delta(delta, tmp_path / "d.safetensors", {"scheduler_config": config})
    _, meta = load_delta(tmp_path / "d.safetensors")
    assert meta["scheduler_config"]["_class_name"] == "PeRFlowScheduler"
    pipe = tiny_sd15_pipeline()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge_delta(pipe, delta, metadata={"scheduler_config": config})
    assert (pipe.scheduler.config.prediction_type, pipe.scheduler.num_windows) == ("velocity", 3)
    assert pipe.scheduler.boundaries.tolist() == [1.0, 0.6, 0.3, 0.0]


# ----------------------------------------------------------------------------- weight variants of a delta folder


def test_delta_folder_with_two_variants_needs_variant(world, tmp_path, capsys):
    from perflow.delta import merge_into_path

    delta = world["delta_tensors"]
    as_unet = tiny_sd15_unet(0)
    as_unet.load_state_dict(delta)
    folder = tmp_path / "released" / "unet"
    as_unet.save_pretrained(folder)
    as_unet.half().save_pretrained(folder, variant="fp16")
    with pytest.raises(ValueError, match="variant") as err:
        load_delta(folder.parent)
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors", "--variant fp16"):
        assert name in str(err.value)
    half, meta = load_delta(folder.parent, variant="fp16")
    plain, _ = load_delta(folder.parent, variant="")
    assert meta["variant"] == "fp16" and all(v.dtype == torch.float16 for v in half.values())
    assert all(torch.equal(plain[k], delta[k]) for k in delta)
    with pytest.raises(ValueError, match="single file"):
        load_delta(world["delta"], variant="fp16")

    target = tiny_sd15_unet(0)
    merge_delta(target, folder.parent, variant="fp16")
    ref = world["teacher"].state_dict()
    assert all(torch.equal(target.state_dict()[k], ref[k] + half[k].float()) for k in half)
    with pytest.raises(ValueError, match="variant"):
        merge_delta(tiny_sd15_unet(0), folder.parent)
    with pytest.raises(ValueError, match="variant"):
        merge_into_path(world["unet"], folder.parent, tmp_path / "o1")

    rc, _, err = cli(["delta", "merge", "--delta", folder.parent, "--into", world["unet"], "-o", tmp_path / "o"],
                     capsys)
    assert rc == 2 and "--variant fp16" in error_line(err)
    rc, out, _ = cli(["delta", "merge", "--delta", folder.parent, "--variant", "fp16", "--into", world["unet"],
                      "-o", tmp_path / "o"], capsys)
    assert rc == 0 and "merged 208 tensors" in out
    rc, out, _ = cli(["delta", "info", folder.parent, "--variant", "fp16"], capsys)
    assert rc == 0 and "float16" in out


# ----------------------------------------------------------------------------- temporaries and permissions


def test_killed_merge_leaves_temporaries_that_the_next_run_removes(world, tmp_path):
    script = textwrap.dedent(f"""
        import os, signal
        import perflow.delta.formats as cf
        def killed(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)  # as if the machine killed the merge mid-write
        cf._write_model_weights = killed
        cf.merge_into_path({str(world['unet'])!r}, {str(world['delta'])!r}, {str(tmp_path / 'out')!r})
    """)
    res = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(SRC)},
                         capture_output=True, timeout=300)
    assert res.returncode == -9
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert len(stale) == 1 and stale[0].is_dir() and not (tmp_path / "out").exists()
    from perflow.delta import merge_into_path

    merge_into_path(world["unet"], world["delta"], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_outputs_get_the_permissions_of_the_umask(world, tmp_path):
    from perflow.delta import merge_into_path

    old = os.umask(0o022)
    try:
        merge_into_path(world["unet"], world["delta"], tmp_path / "merged")
        save_delta(world["delta_tensors"], tmp_path / "d.safetensors")
    finally:
        os.umask(old)

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    assert mode(tmp_path / "merged") == 0o755
    assert mode(tmp_path / "merged" / "diffusion_pytorch_model.safetensors") == 0o644
    assert mode(tmp_path / "d.safetensors") == 0o644


def test_extract_and_to_lora_never_overwrite_their_inputs_or_an_existing_file(world, tmp_path, capsys):
    """An existing output needs --overwrite; the command's own input is refused even with it (data loss)."""
    model = tmp_path / "model"
    shutil.copytree(world["unet"], model)
    weights = model / "diffusion_pytorch_model.safetensors"
    delta = tmp_path / "d.safetensors"
    shutil.copy(world["delta"], delta)
    before = {p: p.read_bytes() for p in (weights, delta)}
    extract = ["delta", "extract", "--student", model, "--teacher", model, "--num-time-windows", 4,
               "--prediction-type", "diff_eps"]
    for argv, words in (
        (extract + ["-o", weights, "--overwrite"], "would overwrite the input"),
        (["delta", "to-lora", "--delta", delta, "--rank", 2, "-o", delta, "--overwrite"], "would overwrite the input"),
        (["delta", "to-lora", "--delta", world["delta"], "--rank", 2, "-o", delta], "already exists; pass --overwrite"),
        (["delta", "to-lora", "--delta", world["delta"], "--rank", 2, "-o", tmp_path / "l.safetensors",
          "--rest", tmp_path / "l.safetensors"], "is the LoRA's own -o path"),
        (extract + ["-o", delta], "already exists; pass --overwrite"),
        (extract[:-4] + ["--window-boundaries", "1,0.5,0", "--num-time-windows", 4, "-o", tmp_path / "e.safetensors"],
         "K = 2, but --num-time-windows is 4"),
    ):
        rc, out, err = cli(argv, capsys)
        assert rc == 2 and words in error_line(err), (argv, err)
    assert all(p.read_bytes() == b for p, b in before.items())
    rc, _, err = cli(["delta", "to-lora", "--delta", world["delta"], "--rank", 2, "--report-ranks", "0,4",
                      "-o", tmp_path / "l.safetensors"], capsys)
    assert rc == 2 and "ranks are at least 1" in err
    rc, _, _ = cli(["delta", "to-lora", "--delta", world["delta"], "--rank", 2, "-o", delta, "--overwrite", "--no-rest"], capsys)
    assert rc == 0 and delta.read_bytes() != before[delta]  # --overwrite replaces a file that is not an input


@pytest.mark.parametrize("flag", ["--lora-scale", "--guidance-scale", "--conditioning-scale", "--delta-scale"])
def test_report_scales_must_be_finite(world, flag, capsys):
    rc, _, err = cli(["delta", "report", "--delta", world["delta"], "--target", "digits", flag, "nan"], capsys)
    assert rc == 2 and "expected a finite number" in err and "Traceback" not in err


def test_pickle_files_are_named_as_such_and_never_unpickled(tmp_path):
    """A torch.save file where safetensors belong (a LoRA, a single-file target): the error says it is a pickle,
    not a damaged download; a model folder with only pickle weights is refused before any library loads it."""
    from perflow.io import WeightsFileError, read_safetensors, require_safetensors

    torch.save({"w": torch.zeros(2)}, tmp_path / "lora.safetensors")
    with pytest.raises(WeightsFileError, match="is a pickle .* perflow never unpickles"):
        read_safetensors(tmp_path / "lora.safetensors")
    folder = tmp_path / "controlnet"
    folder.mkdir()
    torch.save({"w": torch.zeros(2)}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(WeightsFileError, match=r"holds only pickle weights \(diffusion_pytorch_model.bin\)"):
        require_safetensors(folder, "the ControlNet")


def test_merging_into_an_already_merged_pipeline_is_refused(world, tmp_path, capsys):
    pipe = tiny_sd15_pipeline()
    pipe.save_pretrained(tmp_path / "base")
    rc, _, _ = cli(["delta", "merge", "--delta", world["delta"], "--into", tmp_path / "base", "-o", tmp_path / "m1"], capsys)
    assert rc == 0
    rc, _, err = cli(["delta", "merge", "--delta", world["delta"], "--into", tmp_path / "m1", "-o", tmp_path / "m2"], capsys)
    assert rc == 2 and "already samples with the PeRFlow scheduler" in error_line(err) and not (tmp_path / "m2").exists()
    merge_delta(pipe, world["delta"])
    with pytest.warns(UserWarning, match="adds a second one"):
        merge_delta(pipe, world["delta"])


def test_a_whole_model_given_as_the_delta_is_refused(world, tmp_path, capsys):
    """Merging a model's weights as if they were student - teacher would double the target: refused, one line."""
    from perflow.delta import merge_into_path
    from perflow.delta.merge import delta_model_similarity
    from perflow.delta.keys import plan_merge

    teacher_sd = world["teacher"].state_dict()
    mapping = plan_merge(teacher_sd, teacher_sd)[0]
    size, cos = delta_model_similarity(teacher_sd, teacher_sd, mapping)
    assert size == pytest.approx(1.0, abs=1e-12) and cos == pytest.approx(1.0, abs=1e-12)
    size, cos = delta_model_similarity(teacher_sd, world["delta_tensors"], mapping)
    assert size < 0.1 and abs(cos) < 0.5  # a real weight difference (here 2 %): small and not along the weights
    for target in (teacher_sd, tiny_sd15_unet(0)):
        with pytest.raises(ValueError, match="whole model"):
            merge_delta(target, world["student"].state_dict())
    student_folder = tmp_path / "student"
    world["student"].save_pretrained(student_folder)
    single_file = student_folder / "diffusion_pytorch_model.safetensors"
    for i, given in enumerate((student_folder, single_file)):  # a model folder and a model file, each taken for a delta
        out = tmp_path / f"out-{i}"
        rc, _, err = cli(["delta", "merge", "--delta", given, "--into", world["unet"], "-o", out], capsys)
        line = error_line(err)
        assert rc == 2 and "whole model" in line and "perflow delta extract" in line and not out.exists()
        with pytest.raises(ValueError, match="whole model"):
            merge_into_path(world["unet"], given, tmp_path / "lib-out")
        assert not (tmp_path / "lib-out").exists()
    merged = merge_delta(teacher_sd, world["delta_tensors"], scale=2.0)  # a real delta, even scaled, merges
    assert torch.equal(merged["conv_in.weight"], teacher_sd["conv_in.weight"] + 2.0 * world["delta_tensors"]["conv_in.weight"])
