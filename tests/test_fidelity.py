"""The student's own sampler inside training: window starts from its states, the fidelity check, keep_best."""

from __future__ import annotations

import json

import pytest
import torch

from perflow.denoisers import unet_denoiser
from perflow.solver import solve_window
from perflow.tiny import tiny_class_teacher
from perflow.training import train
from perflow.training.export import perflow_scheduler
from perflow.training.fidelity import BestStudent, FidelityCheck, sampler_states
from perflow.windows import resolve_boundaries

pytestmark = pytest.mark.usefixtures("one_thread")


def _digits(n: int = 64):
    from perflow.builtin.digits import load_digits_dataset

    ds = load_digits_dataset("train", 8)
    return torch.utils.data.Subset(ds, list(range(n)))


def _fast(tmp_path, **kw):
    base = dict(batch_size=8, num_solver_steps=2, learning_rate=1e-3, output_dir=str(tmp_path), checkpoint_every=0,
                validation_every=0, tracker="none", progress=False, save_delta=False, ema_decay=0.9,
                window_weights="none", solver_step_allocation="equal")
    base.update(kw)
    return base


def _setup(K: int = 4, batch: int = 6, seed: int = 0):
    teacher = tiny_class_teacher(seed=seed)
    boundaries = resolve_boundaries(K)
    scheduler = perflow_scheduler(teacher, "ddim_eps", boundaries, K, teacher.prediction_type)
    scheduler.set_timesteps(K)
    g = torch.Generator().manual_seed(seed + 1)
    cond = teacher.encode_labels(torch.arange(batch) % 10)
    noise = torch.randn(batch, 1, 8, 8, generator=g)
    student = tiny_class_teacher(seed=seed + 5).unet  # any network of the teacher's architecture
    return teacher, boundaries, scheduler, cond, noise, student


@torch.no_grad()
def _manual_sampler(student, cond, scheduler, z, steps: int) -> torch.Tensor:
    """``steps`` steps of the PeRFlow sampler, written out: z <- scheduler.step(student(z, t), t, z)."""
    for ts in scheduler.timesteps[:steps]:
        out = cond.forward(student, z, ts.expand(z.shape[0]).float())
        z = scheduler.step(out.float(), ts, z).prev_sample
    return z


def test_sampler_states_are_the_samplers_state_at_each_rows_window_start():
    _, _, scheduler, cond, noise, student = _setup()
    k = torch.tensor([0, 1, 2, 3, 4, 2])
    got = sampler_states(student, cond, scheduler, noise, k)
    for b in range(len(k)):
        row = torch.tensor([b])
        want = _manual_sampler(student, cond.select(row), scheduler, noise[row], int(k[b]))
        torch.testing.assert_close(got[row], want, rtol=1e-4, atol=2e-5)  # float32: a row alone vs in a batch
    assert torch.equal(got[0], noise[0])  # k = 0: the noise itself


def test_fidelity_check_is_the_k_step_samples_error_to_the_teachers_chain():
    teacher, boundaries, scheduler, cond, noise, student = _setup()
    den = unet_denoiser(teacher.unet, cond)
    check = FidelityCheck.build([(den, noise, teacher.schedule, cond)], boundaries, [3, 2, 2, 1],
                                teacher.prediction_type, None, scheduler)
    z = _manual_sampler(student, cond, scheduler, noise, 4)
    ref = noise
    for j, n in enumerate([3, 2, 2, 1]):  # the teacher's window solves, written out
        t_s, t_e = (torch.full((len(noise),), float(boundaries[i]), dtype=torch.float64) for i in (j, j + 1))
        ref = solve_window(den, ref, t_s, t_e, n, teacher.schedule, teacher.prediction_type, None)
    want = (z.double() - ref.double()).square().mean().item()
    assert check.error(student) == pytest.approx(want, rel=1e-5)
    assert check.error(teacher.unet) != pytest.approx(want, rel=1e-3)  # it measures the model it is given


def test_best_student_keeps_the_lowest_error_and_its_weights():
    best = BestStudent()
    w = torch.nn.Linear(2, 2)
    assert best.offer(10, 0.5, w.named_parameters())
    kept = {n: p.clone() for n, p in w.named_parameters()}
    with torch.no_grad():
        w.weight.add_(1.0)
    assert not best.offer(20, 0.6, w.named_parameters())
    assert not best.offer(30, 0.5, w.named_parameters())  # a tie keeps the earlier student
    assert best.step == 10 and best.error == 0.5 and best.history == [[10, 0.5], [20, 0.6], [30, 0.5]]
    assert all(torch.equal(best.weights[n], kept[n]) for n in kept)
    again = BestStudent()
    again.restore(json.loads(json.dumps(best.state())), best.weights)
    assert again.state() == best.state()


def _scripted_errors(monkeypatch, errors: list[float]):
    """FidelityCheck.error returns these values in order (the first is the untrained student's)."""
    calls = iter(errors)
    monkeypatch.setattr(FidelityCheck, "error", lambda self, model: next(calls))


def test_keep_best_exports_the_best_checked_student_and_resumes_it(tmp_path, monkeypatch):
    """With checks at steps 2 and 4 and the step-2 student the better, the export is the EMA student of step 2,
    bit for bit the student of a 2-step run; a run cut at step 3 and resumed restores the kept student from
    its checkpoint and exports it too (with window starts from the student's sampler, whose resume is exact);
    keep_best false exports the last step."""
    data = _digits()
    kw = dict(fidelity_check_every=2, student_starts=0.5)
    _scripted_errors(monkeypatch, [1.0, 0.5])
    short = train("digits", teacher=tiny_class_teacher(), dataset=data, **_fast(tmp_path / "short", max_steps=2, **kw))
    _scripted_errors(monkeypatch, [1.0, 0.5, 0.9])
    full = train("digits", teacher=tiny_class_teacher(), dataset=data, **_fast(tmp_path / "full", max_steps=4, **kw))
    want = short.student.state_dict()
    assert all(torch.equal(want[k], v) for k, v in full.student.state_dict().items())
    summary = json.loads((tmp_path / "full" / "perflow_training.json").read_text())
    assert summary["best_step"] == 2 and summary["exported_step"] == 2
    assert summary["fidelity"] == [[0, 1.0], [2, 0.5], [4, 0.9]]
    from diffusers import UNet2DConditionModel

    exported = UNet2DConditionModel.from_pretrained(tmp_path / "full" / "unet").state_dict()
    assert all(torch.equal(want[k], v) for k, v in exported.items())

    class Crash(RuntimeError):
        pass

    def crash(step, loss):
        if step == 3:
            raise Crash()

    _scripted_errors(monkeypatch, [1.0, 0.5])
    with pytest.raises(Crash):
        train("digits", teacher=tiny_class_teacher(), dataset=data, callback=crash,
              **_fast(tmp_path / "cut", max_steps=4, checkpoint_every=2, **kw))
    _scripted_errors(monkeypatch, [0.9])  # a resumed run does not check the untrained student again
    resumed = train("digits", teacher=tiny_class_teacher(), dataset=data, resume="latest",
                    **_fast(tmp_path / "cut", max_steps=4, checkpoint_every=2, **kw))
    assert resumed.losses == full.losses
    assert all(torch.equal(want[k], v) for k, v in resumed.student.state_dict().items())
    assert json.loads((tmp_path / "cut" / "perflow_training.json").read_text())["fidelity"] == summary["fidelity"]

    _scripted_errors(monkeypatch, [1.0, 0.5, 0.9])
    last = train("digits", teacher=tiny_class_teacher(), dataset=data,
                 **_fast(tmp_path / "last", max_steps=4, keep_best=False, **kw))
    assert any(not torch.equal(want[k], v) for k, v in last.student.state_dict().items())
    assert json.loads((tmp_path / "last" / "perflow_training.json").read_text())["exported_step"] == 4


def test_a_checkpoint_missing_its_best_student_is_refused_by_name(tmp_path, monkeypatch):
    from perflow.training.checkpoint import CheckpointError

    data = _digits()
    _scripted_errors(monkeypatch, [1.0, 0.5])
    train("digits", teacher=tiny_class_teacher(), dataset=data,
          **_fast(tmp_path, max_steps=2, checkpoint_every=2, fidelity_check_every=2))
    ckpt = tmp_path / "checkpoints" / "checkpoint-2"
    state = json.loads((ckpt / "perflow_state.json").read_text())
    assert state["best_step"] == 2
    (ckpt / "best_student.safetensors").unlink()
    with pytest.raises(CheckpointError, match="best_student.safetensors"):
        train("digits", teacher=tiny_class_teacher(), dataset=data, resume=str(ckpt),
              **_fast(tmp_path, max_steps=4, checkpoint_every=2, fidelity_check_every=2))


def test_window_starts_from_the_students_sampler_in_the_training_loss(monkeypatch):
    """perflow.student_starts p: t and the noise are drawn as reflow_example draws them, a fraction p of the rows
    starts its window at the student's sampler state there; p = 0 leaves the loss and its randomness as before."""
    import perflow.training.loop as loop
    from perflow.training import load_config
    from perflow.training.data import collate
    from perflow.time_sampling import make_time_sampler
    from perflow.windows import window_index

    teacher = tiny_class_teacher()
    cfg = loop.with_parameterization(load_config("digits", dict(batch_size=16, num_solver_steps=2)), teacher)
    b = loop.boundaries_of(cfg)
    sampler = make_time_sampler("uniform", b, window_start_prob=0.5)
    batch = collate([_digits()[i] for i in range(16)])
    scheduler = perflow_scheduler(teacher, cfg.perflow.prediction_type, b, 4, teacher.prediction_type)
    scheduler.set_timesteps(4)
    student = tiny_class_teacher(seed=3).unet

    given = {}

    def own(cond, noise, k):
        given["cond"] = cond  # the student's condition after caption dropout
        return sampler_states(student, cond, scheduler, noise, k)

    def loss(p, starts_fn):
        cfg.perflow.student_starts = p
        return loop.training_loss(batch, cfg, teacher, student, b, teacher.schedule, sampler,
                                  torch.Generator().manual_seed(7), torch.device("cpu"), None, starts_fn).item()

    assert loss(0.0, own) == loss(0.0, None)
    seen = {}
    real = loop.reflow_example

    def spy(*args, **kwargs):  # record what the loss's start_states gives reflow_example for the drawn noise and t
        inner = kwargs["start_states"]

        def recorded(noise, t):
            starts, mask = inner(noise, t) if inner is not None else (None, None)
            seen.update(noise=noise, t=t, starts=starts, starts_mask=mask)
            return starts, mask
        return real(*args, **{**kwargs, "start_states": recorded if inner is not None else None})

    monkeypatch.setattr(loop, "reflow_example", spy)
    value = loss(1.0, own)
    assert value != loss(0.0, None)
    mask, starts, noise, t = seen["starts_mask"], seen["starts"], seen["noise"], seen["t"]
    assert bool(mask.all())
    k = window_index(t, b)
    assert len(set(k.tolist())) > 1
    for r in range(16):
        row = torch.tensor([r])
        want = _manual_sampler(student, given["cond"].select(row), scheduler, noise[row], int(k[r]))
        torch.testing.assert_close(starts[row], want, rtol=1e-4, atol=2e-5)  # float32: a row alone vs in a batch
    loss(0.5, own)
    assert 0 < int(seen["starts_mask"].sum()) < 16


def test_student_ema_holds_its_decay_from_the_second_step_unless_ramped():
    """training.ema_ramp false (the default, the recipe study's EMA): the decay is ema_decay from the second
    optimizer step on; true: diffusers' ramp min(ema_decay, (1 + s) / (10 + s)) with s = step - 1."""
    from perflow.training.config import OptimConfig
    from perflow.training.loop import student_ema

    params = [torch.nn.Parameter(torch.zeros(3))]
    flat = student_ema(params, OptimConfig(ema_decay=0.99))
    assert OptimConfig().ema_ramp is False
    assert flat.get_decay(1) == 0.0 and all(flat.get_decay(s) == 0.99 for s in (2, 10, 350, 5000))
    ramp = student_ema(params, OptimConfig(ema_decay=0.99, ema_ramp=True))
    assert ramp.get_decay(2) == pytest.approx(2 / 11, rel=1e-15) and ramp.get_decay(351) == pytest.approx(351 / 360, rel=1e-15)
    assert ramp.get_decay(5000) == 0.99
    assert student_ema(params, OptimConfig(ema_decay=0.0)) is None
