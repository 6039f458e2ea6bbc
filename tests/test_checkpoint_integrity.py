"""Damaged checkpoints and interrupted adaptations: bytes damaged at an unchanged size are found by the
sha256 each checkpoint records, ``--resume latest`` falls back past them, a named damaged checkpoint or a
damaged ``adapt.json`` is one line naming the file, and ``perflow delta adapt`` stops on a signal with one
line giving the command that continues it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import cli, error_line
from perflow.tiny import tiny_class_teacher
from perflow.training import train
from perflow.training.checkpoint import CheckpointError, CheckpointWriteError, verify_checkpoint
from perflow.training.safety import TrainingInterrupted
from test_training import _digits, _fast

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = dict(max_steps=6, checkpoint_every=3, keep_checkpoints=3)
STUDENT = Path("unet") / "diffusion_pytorch_model.safetensors"


def _run(out, **kw):
    return train("digits", teacher=tiny_class_teacher(), dataset=_digits(64), **_fast(out, **{**RUN, **kw}))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A finished 6-step run with checkpoint-3 and checkpoint-6 (copied by each test, never changed)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("reference") / "run"
        _run(out)
    finally:
        torch.set_num_threads(before)
    return out


CLI_RUN = ["train", "--config", "digits", "--batch_size", "8", "--num_solver_steps", "2", "--learning_rate", "1e-3",
           "--lr_warmup_steps", "0", "--ema_decay", "0.9", "--save_delta", "false", "--window_weights", "none",
           "--max_steps", "6", "--checkpoint_every", "3", "--keep_checkpoints", "3", "--validation_every", "0",
           "--progress", "false", "--tracker", "none", "--threads", "1"]


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory):
    """The same, run by ``perflow train`` (the built-in digits teacher), for the command's own errors."""
    from perflow.cli import main

    before = torch.get_num_threads()
    try:
        out = tmp_path_factory.mktemp("cli_reference") / "run"
        assert main([*CLI_RUN, "--output_dir", str(out)]) == 0
    finally:
        torch.set_num_threads(before)
    return out


def _copy(reference: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    return out


def _ckpt(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"checkpoint-{step}"


def _flip(f: Path, start: int = -1000, n: int = 64) -> None:
    """Invert ``n`` bytes of ``f`` at ``start`` (from the end when negative): damaged, the size unchanged."""
    data = bytearray(f.read_bytes())
    size = f.stat().st_size
    i = start % len(data)
    data[i:i + n] = bytes(b ^ 0xFF for b in data[i:i + n])
    f.write_bytes(bytes(data))
    assert f.stat().st_size == size


def _edit_state(ckpt: Path, edit) -> None:
    f = ckpt / "perflow_state.json"
    state = json.loads(f.read_text())
    edit(state)
    f.write_text(json.dumps(state))


def _same_student(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / STUDENT)), load_file(str(b / STUDENT))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _train_cli(out: Path, resume: str, capsys) -> tuple[int, str]:
    """``perflow train ... --resume RESUME`` into ``out`` (with the settings of ``cli_reference``)."""
    rc, _, err = cli([*CLI_RUN, "--output_dir", out, "--resume", resume], capsys)
    return rc, err


# ---- 1. damage at an unchanged size ------------------------------------------------------------------------

def test_damaged_bytes_of_unchanged_size_fall_back_to_an_intact_checkpoint(reference, tmp_path, capsys):
    out = _copy(reference, tmp_path)
    state = json.loads((_ckpt(out, 6) / "perflow_state.json").read_text())
    assert set(state["sha256"]) == set(state["files"])  # every file's hash is recorded
    _flip(_ckpt(out, 6) / "model.safetensors")  # weights of the newest checkpoint, same size
    assert "model.safetensors differs from the sha256" in verify_checkpoint(_ckpt(out, 6))
    with pytest.raises(CheckpointError, match=r"checkpoint-6 is damaged \(model.safetensors differs from the sha256"):
        _run(out, resume=str(_ckpt(out, 6)))  # an explicitly named checkpoint is never swapped
    _run(out, resume="latest")  # latest: resumes from checkpoint-3 and retrains steps 4-6
    assert "resuming from checkpoint-3 instead: checkpoint-6 is damaged (model.safetensors" in capsys.readouterr().out
    assert _same_student(out, reference)  # the exported student is the uninterrupted run's
    assert verify_checkpoint(_ckpt(out, 6)) is None  # the damaged checkpoint was written again


def test_a_named_checkpoint_damaged_at_its_size_is_one_line_naming_the_file(cli_reference, tmp_path, capsys):
    out = _copy(cli_reference, tmp_path)
    _flip(_ckpt(out, 6) / "model.safetensors")
    rc, err = _train_cli(out, str(_ckpt(out, 6)), capsys)
    line = error_line(err)
    assert rc == 2 and "checkpoint-6 is damaged (model.safetensors differs from the sha256" in line
    assert "resume from an older one" in line


def test_checkpoints_without_recorded_hashes_still_resume(reference, tmp_path, capsys):
    out = _copy(reference, tmp_path)
    shutil.rmtree(_ckpt(out, 6))
    _edit_state(_ckpt(out, 3), lambda s: s.pop("sha256", None))  # as written before hashes were recorded
    assert verify_checkpoint(_ckpt(out, 3)) is None
    _run(out, resume="latest")
    assert "resumed from" in capsys.readouterr().out
    assert _same_student(out, reference)
    assert "sha256" in json.loads((_ckpt(out, 6) / "perflow_state.json").read_text())


def test_a_step_that_is_not_the_folders_is_refused(reference, tmp_path, capsys):
    out = _copy(reference, tmp_path)
    _edit_state(_ckpt(out, 6), lambda s: s.update(global_step=3))
    with pytest.raises(CheckpointError, match=r"checkpoint-6 is damaged \(perflow_state.json is for step 3, not step 6"):
        _run(out, resume=str(_ckpt(out, 6)))
    _run(out, resume="latest")
    assert "resuming from checkpoint-3 instead: checkpoint-6 is damaged (perflow_state.json is for step 3" in \
        capsys.readouterr().out
    assert _same_student(out, reference)


# ---- 2. an unreadable perflow_state.json is not another run's files ----------------------------------------

def test_an_unreadable_newest_state_falls_back_instead_of_refusing_the_folder(reference, tmp_path, capsys):
    out = _copy(reference, tmp_path)
    (_ckpt(out, 6) / "perflow_state.json").write_text("{garbage")
    _run(out, resume="latest")  # before the fix: "holds another run's files (checkpoints/checkpoint-6)"
    assert "resuming from checkpoint-3 instead: checkpoint-6 is damaged (perflow_state.json is missing or unreadable)" \
        in capsys.readouterr().out
    assert _same_student(out, reference)
    assert verify_checkpoint(_ckpt(out, 6)) is None  # replaced when the run reached step 6


# ---- 3. damaged files are named --------------------------------------------------------------------------------

@pytest.mark.parametrize("damage,expected", [
    (lambda c: _edit_state(c, lambda s: s.pop("micro_step")), "perflow_state.json has no micro_step"),
    (lambda c: _edit_state(c, lambda s: s.update(global_step="twenty")),
     "perflow_state.json has global_step 'twenty', not a step count"),
    (lambda c: _edit_state(c, lambda s: s.update(losses="many")), "perflow_state.json has losses 'many'"),
    (lambda c: _edit_state(c, lambda s: s.update(global_step=3)), "perflow_state.json is for step 3, not step 6"),
    (lambda c: _flip(c / "optimizer.bin", 5000), "optimizer.bin differs from the sha256"),
    (lambda c: (c / "optimizer.bin").write_bytes(os.urandom((c / "optimizer.bin").stat().st_size)),
     "optimizer.bin is not a torch file"),
    (lambda c: (_edit_state(c, lambda s: s.pop("sha256")),  # an older checkpoint: no hashes to compare
                (c / "scheduler.bin").write_bytes(b"\x80" * (c / "scheduler.bin").stat().st_size)),
     "scheduler.bin is not a torch file"),
], ids=["no-micro-step", "step-not-a-number", "losses-not-a-list", "another-step", "optimizer-bytes", "optimizer-garbage",
        "scheduler-garbage-no-hashes"])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(cli_reference, tmp_path, capsys, damage, expected):
    out = _copy(cli_reference, tmp_path)
    damage(_ckpt(out, 6))
    rc, err = _train_cli(out, str(_ckpt(out, 6)), capsys)
    line = error_line(err)
    assert rc == 2 and f"checkpoint-6 is damaged ({expected}" in line, line


def test_a_file_that_passes_the_checks_but_cannot_be_loaded_is_named(reference, tmp_path):
    out = _copy(reference, tmp_path)
    ckpt = _ckpt(out, 6)
    _edit_state(ckpt, lambda s: s.pop("sha256"))  # an older checkpoint: nothing records the bytes
    _flip(ckpt / "scheduler.bin", 200, 200)  # inside the zip: sizes and structure unchanged
    assert verify_checkpoint(ckpt) is None
    with pytest.raises(CheckpointError, match=r"checkpoint .*checkpoint-6 is damaged \(scheduler.bin cannot be loaded: "
                                              r".*\); delete that folder and resume with --resume latest") as info:
        _run(out, resume=str(ckpt))
    assert "\n" not in str(info.value)


# ---- 3. a damaged adapt.json --------------------------------------------------------------------------------

def _adapt_args(out: Path, *extra) -> list:
    return ["delta", "adapt", "--delta", out.parent / "delta.safetensors", "--target", "digits", "--output-dir", out,
            "--threads", "1", *extra]


@pytest.mark.parametrize("key", ["checks", "baseline"])
def test_a_damaged_adapt_json_is_one_line_naming_it(tmp_path, capsys, key):
    out = tmp_path / "adapt"
    out.mkdir()
    state = {"settings": {}, "baseline": {"solver": "target ddim", "paired_mse": 0.1},
             "checks": [{"step": 0, "paired_mse": 0.2, "beats": False}], "seconds": 1.0}
    del state[key]
    (out / "adapt.json").write_text(json.dumps(state))
    rc, _, err = cli(_adapt_args(out, "--resume"), capsys)
    line = error_line(err)
    assert rc == 2 and f"adapt.json' is damaged (no {key}" in line and "another --output-dir" in line, line


# ---- 4, 5. an interrupted adaptation: one line, the flag form of --resume, the shell's exit code ---------------

def test_an_interrupted_adaptation_says_how_to_continue_it(tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "adapt" / "run" / "checkpoints" / "checkpoint-4"

    def stopped(*args, **kwargs):
        raise TrainingInterrupted(signal.SIGTERM, 4, ckpt)

    monkeypatch.setattr("perflow.training.adapt.adapt_delta", stopped)
    rc, _, err = cli(_adapt_args(tmp_path / "adapt"), capsys)
    assert rc == 143 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("perflow delta adapt: stopped by SIGTERM after step 4; checkpoint saved in")
    assert line.endswith("; continue with the same command plus --resume") and line.count("continue with") == 1
    assert "--resume latest" not in line  # adapt's --resume is a flag


class _Killed(Exception):
    """What the test's own SIGTERM handler raises (so that the old code, without a handler, fails a test
    instead of killing the test process)."""


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_outside_a_training_chunk_is_one_line(tmp_path, capsys, monkeypatch, signum, code):
    def measuring(*args, **kwargs):  # the baseline or a fidelity check: no trainer handlers installed
        os.kill(os.getpid(), signum)
        time.sleep(5)
        raise AssertionError("the signal did not stop the adaptation")

    def guard(s, frame):
        raise _Killed

    monkeypatch.setattr("perflow.training.adapt.adapt_delta", measuring)
    previous = signal.signal(signal.SIGTERM, guard)
    try:
        rc, _, err = cli(_adapt_args(tmp_path / "adapt"), capsys)
    except (KeyboardInterrupt, _Killed) as raw:
        pytest.fail(f"{type(raw).__name__} escaped perflow delta adapt")
    finally:
        assert signal.getsignal(signal.SIGTERM) is guard  # the previous handler is back
        signal.signal(signal.SIGTERM, previous)
    assert rc == code and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    assert line.startswith(f"perflow delta adapt: stopped by {name}") and line.endswith(
        "; continue with the same command plus --resume"), line


# ---- 6. a refused adaptation leaves no folder -------------------------------------------------------------

def test_refused_settings_create_no_output_folder(tmp_path):
    from perflow.targets import Target
    from perflow.training.adapt import adapt_delta
    from test_adapt import EVAL, _delta

    out = tmp_path / "new" / "adapt"
    with pytest.raises(ValueError, match="num_samples=16 is too few"):
        adapt_delta(_delta(), Target(teacher=tiny_class_teacher(seed=1), name="t"), out, num_samples=16,
                    reference_steps=8, eval_kwargs=EVAL, progress=False)
    assert not out.exists() and not out.parent.exists()


# ---- 7. a full disk under torch.save -------------------------------------------------------------------------

def test_a_full_disk_under_torch_save_says_so(tmp_path, monkeypatch):
    import collections

    real_save, real_usage = torch.save, shutil.disk_usage
    failed = []
    usage = collections.namedtuple("usage", "total used free")

    def save(obj, f, *args, **kwargs):
        if "checkpoint-6" in str(f) and str(f).endswith("optimizer.bin"):
            failed.append(f)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4480 vs 4372")
        return real_save(obj, f, *args, **kwargs)

    def disk_usage(path):  # the disk is full once the write failed
        return usage(2**30, 2**30 - 3 * 2**20, 3 * 2**20) if failed else real_usage(path)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    with pytest.raises(CheckpointWriteError, match=r"could not write .*checkpoint-6: \[enforce fail at inline_container.cc"
                                                   r":672\] \. unexpected pos 4480 vs 4372: most likely no space left on the device "
                                                   r"\(3 MiB free there\); free space and resume with --resume latest"):
        _run(tmp_path)
    assert failed and not (tmp_path / "checkpoints" / ".tmp-checkpoint-6").exists()

    # with room to spare the same error is not called a full disk
    failed.clear()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**39, 2**39))
    with pytest.raises(CheckpointWriteError) as info:
        _run(tmp_path / "roomy")
    assert failed and "no space left" not in str(info.value) and "524288 MiB free there" in str(info.value)
