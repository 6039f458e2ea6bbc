"""Runs that fail safely: non-finite numbers, signals, shared output folders, changed settings on
resume, bad files and checkpoints, channel counts, leftovers, permissions, logs, config errors."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from perflow.training import train
from perflow.training.checkpoint import CheckpointError, CheckpointWriteError, verify_checkpoint
from perflow.training.data import BadImageError, ImageFolderDataset, collate
from perflow.training.outdir import OutputDirError, OutputLock
from perflow.training.safety import NonFiniteError, TrainingInterrupted
from perflow.tiny import tiny_class_teacher
from test_training import _digits, _fast

pytestmark = pytest.mark.usefixtures("one_thread")
SRC = Path(__file__).resolve().parents[1] / "src"  # the checkout's package root (src layout)


def _run(out, data=None, teacher=None, **kw):
    return train("digits", teacher=teacher or tiny_class_teacher(), dataset=data if data is not None else _digits(64),
                 **_fast(out, **kw))


def _ckpts(out) -> list[str]:
    root = Path(out) / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- non-finite loss -------------------------------------------------------------------------------

def test_nonfinite_loss_stops_before_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    # lr 10 with a linear warm-up: finite steps first, then NaN (before the fix: the run went on to step 12,
    # its checkpoints, student and delta all NaN, and rotation (keep 1) deleted every finite checkpoint)
    with pytest.raises(NonFiniteError, match=r"non-finite loss nan at step \d+; stopped before applying it") as info:
        _run(tmp_path, max_steps=12, learning_rate=10.0, lr_scheduler="linear", lr_warmup_steps=5,
             checkpoint_every=1, keep_checkpoints=1, save_delta=True)
    step = int(re.search(r"at step (\d+)", str(info.value)).group(1))
    assert 1 < step <= 12 and "learning rate too high" in str(info.value) and "\n" not in str(info.value)
    assert _ckpts(tmp_path) == [f"checkpoint-{step - 1}"]  # the last finite one is kept
    ckpt = _weights(tmp_path / "checkpoints" / f"checkpoint-{step - 1}")
    assert all(bool(torch.isfinite(v).all()) for v in ckpt.values())
    assert not (tmp_path / "unet").exists() and not (tmp_path / "delta.safetensors").exists()


class _PoisonedDigits(torch.utils.data.Dataset):
    """Digits with NaN pixels in one item: a bad batch."""

    def __init__(self, bad: int):
        self.base, self.bad = _digits(64), bad

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        item = dict(self.base[i])
        if i == self.bad:
            item["pixel_values"] = torch.full_like(item["pixel_values"], float("nan"))
        return item


def test_a_nonfinite_batch_is_skipped_up_to_the_configured_count(tmp_path):
    first = int(torch.randperm(64, generator=torch.Generator().manual_seed(0))[0])  # in the first batch (seed 0)
    with pytest.raises(NonFiniteError, match="at step 1;.*bad data .the batch holds NaN/inf pixels"):
        _run(tmp_path / "stop", data=_PoisonedDigits(first), max_steps=3)
    result = _run(tmp_path / "skip", data=_PoisonedDigits(first), max_steps=3, max_nonfinite_skips=1,
                  checkpoint_every=1)
    assert result.global_step == 3 and result.nonfinite_skips == 1 and all(np.isfinite(result.losses))
    assert len(result.losses) == 3
    summary = json.loads((tmp_path / "skip" / "perflow_training.json").read_text())
    assert summary["nonfinite_skips"] == 1


# ---- signals -----------------------------------------------------------------------------------------

def _signal_at(step: int, *signums: int):
    def callback(s, loss):
        if s == step:
            for signum in signums:
                os.kill(os.getpid(), signum)
    return callback


def test_sigterm_saves_a_checkpoint_at_the_step_boundary_and_the_resume_is_exact(tmp_path):
    kw = dict(max_steps=6, checkpoint_every=0, lr_scheduler="cosine", lr_warmup_steps=2)
    full = _run(tmp_path / "full", **kw)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as info:
        train("digits", teacher=tiny_class_teacher(), dataset=_digits(64), callback=_signal_at(3, signal.SIGTERM),
              **_fast(tmp_path / "cut", **kw))
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers restored
    assert info.value.exit_code == 143 and info.value.step == 4  # the request is seen at the next step's sync
    assert _ckpts(tmp_path / "cut") == ["checkpoint-4"]  # saved although checkpoint_every is 0
    resumed = _run(tmp_path / "cut", resume="latest", **kw)
    assert resumed.losses == full.losses
    assert _same(full.student.state_dict(), resumed.student.state_dict())


def test_a_second_signal_stops_at_once_without_saving(tmp_path):
    with pytest.raises(TrainingInterrupted) as info:
        train("digits", teacher=tiny_class_teacher(), dataset=_digits(64),
              callback=_signal_at(3, signal.SIGINT, signal.SIGINT), **_fast(tmp_path, max_steps=6, checkpoint_every=2))
    assert info.value.at_once and info.value.checkpoint is None and info.value.exit_code == 130
    assert _ckpts(tmp_path) == ["checkpoint-2"]


def _cli(out, *args, **popen):
    cmd = [sys.executable, "-m", "perflow", "train", "--config", "digits", "--batch_size", "8", "--num_solver_steps", "2",
           "--learning_rate", "1e-3", "--output_dir", str(out), "--tracker", "none", "--progress", "false",
           "--validation_every", "0", "--save_delta", "false", *args]
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _stop_mid_run(out, signum, after_step, *args) -> int:
    """Start ``perflow train`` for 1000 steps, send ``signum`` once a checkpoint past ``after_step`` exists;
    check the exit code and the one-line message; returns the step the run saved."""
    import time

    proc = _cli(out, "--max_steps", "1000", "--checkpoint_every", "2", *args)
    while not any(int(n.split("-")[1]) > after_step for n in _ckpts(out) if n.startswith("checkpoint-")):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(rf"perflow train: stopped by {signal.Signals(signum).name} after step (\d+); checkpoint saved in "
                        r".*; continue with --resume latest", last), err
    assert "Traceback" not in err
    step = int(re.search(r"after step (\d+)", last).group(1))
    assert f"checkpoint-{step}" in _ckpts(out)
    return step


@pytest.mark.slow
def test_cli_sigterm_and_sigint_mid_run_then_resume_match_an_uninterrupted_run(tmp_path):
    out = tmp_path / "cut"
    first = _stop_mid_run(out, signal.SIGTERM, 0)
    second = _stop_mid_run(out, signal.SIGINT, first, "--resume", "latest")
    total = second + 2
    proc = _cli(out, "--max_steps", str(total), "--checkpoint_every", "2", "--resume", "latest")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    full = train("digits", **_fast(tmp_path / "full", max_steps=total, save_delta=False, ema_decay=0.99))
    from diffusers import UNet2DConditionModel

    resumed = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    assert _same(full.student.state_dict(), resumed)
    summary = json.loads((out / "perflow_training.json").read_text())
    assert summary["config"]["training"]["max_steps"] == total  # recorded truthfully


# ---- output folders ----------------------------------------------------------------------------------

def test_a_locked_output_folder_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    with OutputLock(tmp_path):
        with pytest.raises(OutputDirError, match=rf"{re.escape(str(tmp_path))}.* in use by another perflow run \(pid {os.getpid()} "):
            _run(tmp_path, max_steps=1, teacher="/no/such/teacher")  # refused before the teacher loads
    (tmp_path / ".perflow.lock").write_text("pid 999999 on elsewhere\n")  # left by a killed run: no flock held
    assert _run(tmp_path, max_steps=1).global_step == 1


def test_a_new_run_refuses_another_runs_folder_unless_resuming_or_overwriting(tmp_path):
    first = _run(tmp_path, max_steps=2, checkpoint_every=2)
    with pytest.raises(OutputDirError, match=r"holds another run's files \(checkpoints/checkpoint-2, unet.*--resume latest.*--overwrite true"):
        _run(tmp_path, max_steps=2, checkpoint_every=2)
    assert _run(tmp_path, max_steps=3, checkpoint_every=2, resume="latest").run_id == first.run_id
    state = json.loads((tmp_path / "checkpoints" / "checkpoint-2" / "perflow_state.json").read_text())
    assert state["run_id"] == first.run_id
    again = _run(tmp_path, max_steps=1, overwrite=True)
    assert again.run_id != first.run_id and _ckpts(tmp_path) == []
    assert json.loads((tmp_path / "perflow_training.json").read_text())["run_id"] == again.run_id
    # a run finished without checkpoints is not silently replaced by "--resume latest" either
    with pytest.raises(OutputDirError, match="no checkpoint to resume .* --overwrite true"):
        _run(tmp_path, max_steps=1, resume="latest")


def test_rotation_keeps_other_runs_and_the_new_checkpoint():
    """Before: rotation kept the newest ``keep`` by step number over every run, so a run writing
    checkpoint-2 next to another run's checkpoint-100 deleted its own new checkpoint at once."""
    import tempfile

    from accelerate import Accelerator

    from perflow.training.checkpoint import save_checkpoint

    with tempfile.TemporaryDirectory() as d:
        other = Path(d) / "checkpoints" / "checkpoint-100"
        other.mkdir(parents=True)
        (other / "perflow_state.json").write_text(json.dumps({"run_id": "A"}))
        acc = Accelerator(cpu=True)
        model = acc.prepare(torch.nn.Linear(2, 2))
        gen = torch.Generator().manual_seed(0)
        for step in (2, 4):
            save_checkpoint(acc, d, step, {"run_id": "B"}, None, ["weight", "bias"], gen, keep=1, run_ids=("B",))
        assert _ckpts(d) == ["checkpoint-100", "checkpoint-4"]
        del model


# ---- resume with changed settings ----------------------------------------------------------------------

def test_resume_refuses_changed_meaning_and_records_allowed_changes(tmp_path):
    _run(tmp_path, max_steps=4, checkpoint_every=2, log_every=10)
    with pytest.raises(CheckpointError, match=r"training.learning_rate 0.001 -> 0.01"):
        _run(tmp_path, max_steps=6, checkpoint_every=2, resume="latest", learning_rate=1e-2)
    with pytest.raises(CheckpointError, match=r"perflow.num_time_windows 4 -> 2, training.batch_size 8 -> 4, training.seed 0 -> 1"):
        _run(tmp_path, max_steps=6, checkpoint_every=2, resume="latest", seed=1, batch_size=4, num_time_windows=2)
    result = _run(tmp_path, max_steps=6, checkpoint_every=3, resume="latest", log_every=3, keep_checkpoints=3)
    assert result.global_step == 6
    saved = json.loads((tmp_path / "checkpoints" / "checkpoint-6" / "perflow_state.json").read_text())["config"]
    summary = json.loads((tmp_path / "perflow_training.json").read_text())["config"]
    for cfg in (saved, summary):
        assert cfg["training"]["max_steps"] == 6 and cfg["output"]["log_every"] == 3 and cfg["output"]["checkpoint_every"] == 3


# ---- damaged checkpoints and images ---------------------------------------------------------------------

def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, capsys):
    kw = dict(max_steps=6, checkpoint_every=2, keep_checkpoints=3)
    full = _run(tmp_path / "full", **kw)

    def cut(step, loss):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train("digits", teacher=tiny_class_teacher(), dataset=_digits(64), callback=cut, **_fast(tmp_path / "cut", **kw))
    weights = tmp_path / "cut" / "checkpoints" / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a truncated newest checkpoint
    resumed = _run(tmp_path / "cut", resume="latest", **kw)
    out = capsys.readouterr().out
    assert "resuming from checkpoint-2 instead: checkpoint-4 is damaged (model.safetensors has" in out
    assert resumed.losses == full.losses and _same(full.student.state_dict(), resumed.student.state_dict())
    weights.write_bytes(weights.read_bytes()[:100])  # the resumed run re-wrote checkpoint-4; damage it again
    with pytest.raises(CheckpointError, match=r"checkpoint .*checkpoint-4 is damaged \(model.safetensors has 100 of"):
        _run(tmp_path / "cut", resume=str(weights.parent), **kw)  # an explicit checkpoint is never swapped silently


def test_verify_checkpoint_without_a_size_record(tmp_path):
    _run(tmp_path, max_steps=2, checkpoint_every=2)
    ckpt = tmp_path / "checkpoints" / "checkpoint-2"
    state = json.loads((ckpt / "perflow_state.json").read_text())
    del state["files"]  # as written before sizes were recorded: the file structure is checked
    (ckpt / "perflow_state.json").write_text(json.dumps(state))
    assert verify_checkpoint(ckpt) is None
    for name, problem in (("optimizer.bin", "truncated"), ("ema.safetensors", "truncated")):
        data = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(data[: len(data) - 100])
        assert problem in verify_checkpoint(ckpt)
        (ckpt / name).write_bytes(data)
    (ckpt / "perflow_state.json").write_text('{"global_step": ')
    assert "unreadable" in verify_checkpoint(ckpt)


@pytest.fixture()
def folder_with_a_bad_png(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    root.mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    good = (root / "03.png").read_bytes()
    (root / "03.png").write_bytes(good[: len(good) // 2])  # truncated
    return root


def test_an_unreadable_image_is_skipped_or_named(folder_with_a_bad_png, tmp_path):
    ds = ImageFolderDataset(folder_with_a_bad_png, resolution=8)
    item = ds[3]
    assert torch.equal(item["pixel_values"], ds[4]["pixel_values"]) and "03.png" in item["bad_images"][0]
    data = {"data": {"source": "imagefolder", "path": str(folder_with_a_bad_png), "resolution": 8}}
    result = train(data, teacher=tiny_class_teacher(), **_fast(tmp_path / "skip", max_steps=4, batch_size=4,
                                                                caption_free=True))
    assert result.global_step == 4 and len(result.bad_images) == 1 and "03.png" in result.bad_images[0]
    assert "03.png" in json.loads((tmp_path / "skip" / "perflow_training.json").read_text())["bad_images"][0]
    for workers in (0, 1):  # from a DataLoader worker too, the error stays one line
        with pytest.raises(BadImageError, match=r"^data: cannot read .*03\.png .*data.on_bad_image skip$") as info:
            train(data, teacher=tiny_class_teacher(), **_fast(tmp_path / f"error{workers}", max_steps=4, batch_size=4,
                                                               caption_free=True, on_bad_image="error", num_workers=workers))
        assert "\n" not in str(info.value)


# ---- channels ---------------------------------------------------------------------------------------------

def test_images_follow_the_teachers_channel_count(folder_with_a_bad_png, tmp_path):
    (folder_with_a_bad_png / "03.png").unlink()
    grey = ImageFolderDataset(folder_with_a_bad_png, resolution=8, channels=1)
    assert grey[0]["pixel_values"].shape == (1, 8, 8)
    data = {"data": {"source": "imagefolder", "path": str(folder_with_a_bad_png), "resolution": 8}}
    result = train(data, teacher=tiny_class_teacher(channels=1), **_fast(tmp_path / "a", max_steps=1, batch_size=4,
                                                                         caption_free=True))
    assert result.global_step == 1
    rgb = [{"pixel_values": torch.zeros(3, 8, 8), "label": 0}] * 16
    with pytest.raises(ValueError, match="the dataset's images have 3 channels but the teacher takes 1"):
        _run(tmp_path / "b", data=rgb, max_steps=1)


# ---- leftovers, permissions, logs ----------------------------------------------------------------------------

def test_leftovers_are_removed_and_files_follow_the_umask(tmp_path, capsys):
    out = tmp_path / "run"
    for d in (".tmp-unet.abcd1234", ".unet.k2j3h4g5", "checkpoints/.tmp-checkpoint-8"):
        (out / d).mkdir(parents=True)
        (out / d / "x.safetensors").write_bytes(b"partial")
    (out / ".delta.safetensors.ab_cd123.tmp").write_bytes(b"partial")
    (out / ".tmpAbC123").write_bytes(b"partial")
    mask = os.umask(0o027)
    try:
        _run(out, max_steps=2, checkpoint_every=2, save_delta=True, validation_every=2)
    finally:
        os.umask(mask)
    assert "removed leftovers of an interrupted run" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".perflow.lock"]
    assert _ckpts(out) == ["checkpoint-2"]
    for p in [out / "unet", out / "checkpoints" / "checkpoint-2", out / "validation"]:
        assert p.stat().st_mode & 0o777 == 0o750, p
    for p in [out / "unet" / "diffusion_pytorch_model.safetensors", out / "delta.safetensors", out / "perflow_training.json",
              out / "checkpoints" / "checkpoint-2" / "model.safetensors", out / "validation" / "step-0000002.png"]:
        assert p.stat().st_mode & 0o777 == 0o640, p


def _tensorboard_steps(logdir: Path, tag: str) -> list[int]:
    """Steps of ``tag`` as TensorBoard shows them: event files in order, a ``SessionLog.START`` at step ``s``
    (``SummaryWriter(purge_step=s)``) discards what was logged at steps >= ``s`` before it."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog

    def order(p: Path) -> tuple[int, int]:  # events.out.tfevents.<time>.<host>.<pid>.<counter>
        m = re.fullmatch(r"events\.out\.tfevents\.(\d+)\..*\.(\d+)", p.name)
        return int(m.group(1)), int(m.group(2))

    steps: list[int] = []
    for f in sorted(logdir.glob("events.out.tfevents.*"), key=order):
        for ev in EventFileLoader(str(f)).Load():
            if ev.HasField("session_log") and ev.session_log.status == SessionLog.START:
                steps = [s for s in steps if s < ev.step]
            elif ev.HasField("summary") and any(v.tag == tag for v in ev.summary.value):
                steps.append(ev.step)
    return steps


def test_tensorboard_does_not_repeat_steps_after_a_resume(tmp_path):
    kw = dict(max_steps=6, checkpoint_every=3, tracker="tensorboard", log_every=1)

    def cut(step, loss):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train("digits", teacher=tiny_class_teacher(), dataset=_digits(64), callback=cut, **_fast(tmp_path, **kw))
    _run(tmp_path, resume="latest", **kw)
    assert _tensorboard_steps(tmp_path / "logs" / "perflow", "loss") == [1, 2, 3, 4, 5, 6]


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def save_file(tensors, path, *a, **k):
        calls.append(path)
        if "checkpoint-4" in str(path):
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(CheckpointWriteError, match=r"could not write .*checkpoint-4: \[Errno 28\] No space left on device \(\d+ MiB free there\); free space") as info:
        _run(tmp_path, max_steps=6, checkpoint_every=2)
    assert "\n" not in str(info.value)
    assert _ckpts(tmp_path) == ["checkpoint-2"] and verify_checkpoint(tmp_path / "checkpoints" / "checkpoint-2") is None


# ---- captions -----------------------------------------------------------------------------------------------

def test_a_missing_caption_is_the_null_caption_for_that_row_only(monkeypatch):
    batch = collate([{"pixel_values": torch.zeros(3, 4, 4), "caption": "a cat"}, {"pixel_values": torch.zeros(3, 4, 4)}])
    assert batch["caption"] == ["a cat", ""] and batch["caption_missing"].tolist() == [False, True]
    from perflow.tiny import tiny_sd15_pipeline
    from perflow.training import load_config
    from perflow.training import loop
    from perflow.training.teachers import as_teacher

    seen = {}
    real = loop.guided_teacher_denoiser

    def spy(unet, cond, uncond, dropped, *a):
        seen["dropped"] = dropped.tolist()
        return real(unet, cond, uncond, dropped, *a)

    monkeypatch.setattr(loop, "guided_teacher_denoiser", spy)
    cfg = load_config("sd15", {"data.path": "x", "caption_dropout": 0.0, "num_solver_steps": 1, "resolution": 16})
    teacher = as_teacher(tiny_sd15_pipeline(seed=0))
    batch = collate([{"pixel_values": torch.zeros(3, 16, 16), "caption": "a cat"}, {"pixel_values": torch.zeros(3, 16, 16)}])
    b = loop.boundaries_of(cfg)
    from perflow.schedule import DiscreteVPSchedule
    from perflow.time_sampling import make_time_sampler

    loop.training_loss(batch, cfg, teacher, teacher.unet, b, DiscreteVPSchedule(teacher.alphas_cumprod),
                       make_time_sampler("uniform", b), torch.Generator().manual_seed(0), torch.device("cpu"))
    assert seen["dropped"] == [False, True]  # unconditional for teacher and student, the captioned row untouched


def test_missing_captions_in_shards_are_counted(tmp_path):
    from PIL import Image

    from perflow.tiny import tiny_sd15_pipeline

    shard = tmp_path / "shard-000.tar"
    rng = np.random.default_rng(0)
    with tarfile.open(shard, "w") as tar:
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
            tar.add(tmp_path / f"{i}.png", arcname=f"{i:04d}.png")
            if i != 2:
                (tmp_path / f"{i}.txt").write_text(f"caption {i}")
                tar.add(tmp_path / f"{i}.txt", arcname=f"{i:04d}.txt")
    result = train({"data": {"source": "webdataset", "path": str(shard), "resolution": 16}}, teacher=tiny_sd15_pipeline(seed=0),
                   **_fast(tmp_path / "out", max_steps=2, batch_size=4, save_pipeline=False))
    assert result.missing_captions == 2  # the caption-less sample is in both (full-data) batches
    assert json.loads((tmp_path / "out" / "perflow_training.json").read_text())["missing_captions"] == 2


# ---- config and CLI errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("checkpoint_every", -1), ("validation_every", -5), ("max_grad_norm", -1.0),
                                         ("huber_c", -0.1), ("log_every", 0), ("max_grad_norm", float("nan"))])
def test_config_refuses_bad_numbers(field, value):
    from perflow.training import load_config

    with pytest.raises(ValueError, match=rf"\.{field} must be >= "):
        load_config("digits", {field: value})


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    from perflow.training import load_config

    bad = tmp_path / "run.yaml"
    bad.write_text("training:\n  max_steps: 5\n   batch_size: 4\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad))}, line 3: invalid YAML: mapping values are not allowed"):
        load_config(bad)


def test_an_unusable_output_path_is_refused_before_the_teacher_loads(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match=r"lies below .*file, which is a regular file"):
        _run(tmp_path / "file" / "out", max_steps=1, teacher="/no/such/teacher")
    try:
        os.makedirs("/sys/perflow-probe")
    except OSError:
        pass
    else:  # pragma: no cover - a writable /sys: nothing read-only to test with
        os.rmdir("/sys/perflow-probe")
        pytest.skip("/sys is writable here")
    with pytest.raises(OutputDirError, match=r"'/sys/perflow-probe/out' cannot be created"):
        _run("/sys/perflow-probe/out", max_steps=1, teacher="/no/such/teacher")


def test_cli_errors_are_one_line(tmp_path, capsys):
    from perflow.cli import main

    common = ["train", "--config", "digits", "--max_steps", "8", "--batch_size", "8", "--num_solver_steps", "2",
              "--tracker", "none", "--progress", "false", "--validation_every", "0"]
    code = main(common + ["--output_dir", str(tmp_path / "nan"), "--learning_rate", "100", "--checkpoint_every", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("perflow train: error: non-finite loss") and "\n" not in err
    assert main(common + ["--output_dir", str(tmp_path / "x"), "--log_every", "0"]) == 2
    assert capsys.readouterr().err.strip() == "perflow train: error: output.log_every must be >= 1, got 0"


@pytest.mark.parametrize("checkpoint_every, advice", [
    (0, "run it again with --overwrite true (this run kept no checkpoints: checkpoint_every 0)"),
    (1, "rerun with --resume latest (the checkpoints are intact)"),
])
def test_a_full_disk_at_export_gives_advice_that_works(tmp_path, monkeypatch, checkpoint_every, advice):
    """Without checkpoints, "--resume latest (the checkpoints are intact)" could not work."""
    import perflow.training.export as export
    from perflow.training.outdir import OutputDirError

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "export_student", full)
    with pytest.raises(OutputDirError) as err:
        _run(tmp_path / "run", max_steps=1, checkpoint_every=checkpoint_every)
    message = str(err.value)
    assert message.endswith("free space and " + advice) and message.count("free") == 1
