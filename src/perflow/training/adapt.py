"""Adapting a delta to a target it does not transfer to: a short PeRFlow run on the target itself.

:func:`adapt_delta` is :func:`perflow.training.train` with the target as the teacher and the student
started from target + delta (``model.student_init``), in chunks of ``check_every`` steps. After each
chunk the exported student is sampled at 4 steps and its paired MSE to the target's own
``reference_steps``-step DDIM output is compared with the target's best own solver at 4 evaluations
(DDIM, DPM-Solver++, UniPC, each at its best timestep spacing), measured once at the start by
:func:`perflow.evaluation.transfer.transfer_report`. It stops when the student wins, or at
``budget_steps``. The result is the trainer's ``delta.safetensors``: ``student - target``, a delta for
that target. The run trains on the delta's own windows and parameterization (its recorded boundaries, or K
equal windows, and prediction type; :func:`delta_windows`), whatever the recipe's placement.

Without the target's training data (a downloaded LoRA or checkpoint), ``data_free=True`` (CLI ``--data-free``)
starts every window where the student's own K-step sampler reaches it from noise (``student_starts 1``), which
reads no clean image; the training items are then only the conditions (:func:`conditions_dataset`). A
ControlNet target adapts data-free, on its control images: the UNet is trained with the frozen ControlNet in
the loop (:func:`perflow.targets.controlnet_training_teacher`) and the adapted delta covers the UNet alone.

Files in ``output_dir``: ``adapt.json`` (settings, the baseline, every check), ``init/`` (target +
delta, the student's start) and ``run/`` (the trainer's output folder: checkpoints, ``unet/``,
``scheduler/``, ``delta.safetensors``). An interrupted adaptation continues with ``resume=True``
(CLI ``--resume``): the trainer resumes from its newest checkpoint bit for bit, and checks already
made are kept, so the result equals an uninterrupted run's.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

STATE_FILE = "adapt.json"


@dataclass
class AdaptResult:
    """What :func:`adapt_delta` returns."""

    output_dir: Path
    delta: Path | None
    """The adapted delta (``run/delta.safetensors``); None when the given delta already beat the solvers."""
    steps: int
    """PeRFlow training steps spent."""
    reached: bool
    """Whether the 4-step paired MSE beat the target's best 4-evaluation solver."""
    baseline: dict
    checks: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def adapt_delta(
    delta: Any,
    target: Any,
    output_dir: str | Path,
    config: Any = "digits",
    budget_steps: int = 100,
    check_every: int = 25,
    num_samples: int = 128,
    reference_steps: int = 100,
    dataset: Any = None,
    data_free: bool = False,
    resume: bool = False,
    eval_kwargs: dict | None = None,
    callback: Callable[[int, float], None] | None = None,
    progress: bool = True,
    **overrides: Any,
) -> AdaptResult:
    """Adapt ``delta`` to ``target`` (a folder, a built-in name or a :class:`~perflow.targets.Target`).

    ``config`` and ``overrides`` are :func:`~perflow.training.train`'s (the recipe of the original run;
    data through ``data.*`` or ``dataset``); the output folder, the student's start, checkpointing and
    exports are set here. ``eval_kwargs`` go to :class:`~perflow.evaluation.transfer.TransferConfig`
    (``labels``, ``prompts``, ``guidance_scale``, ``baselines``, ``spacings``, ``seed``, ``batch_size``, ...).

    ``window_weights`` defaults to ``none`` here (pass it in ``overrides`` to change that): the recipe's
    ``auto`` measures the weights at the start of every ``train`` call, i.e. at every check, and on the
    digits teacher that measurement alone costs about as much CPU as 10 adaptation steps. Likewise
    ``solver_step_allocation`` defaults to ``equal`` and ``ema_ramp`` to ``true`` here (what the committed transfer
    benchmark measured).

    ``data_free``: adapt without images (a downloaded LoRA or checkpoint whose training data the user does not
    have): every window starts where the student's own K-step sampler reaches it from noise
    (``student_starts 1``, set here), which reads no clean sample, and the training items are only the
    conditions (:func:`conditions_dataset`: the labels or prompts of ``eval_kwargs``, all classes by default).
    """
    from perflow.evaluation.teacher_eval import TeacherEvalConfig, evaluate_teacher
    from perflow.evaluation.transfer import TransferConfig, read_delta, resolve_target, transfer_report
    from perflow.io import write_text
    from perflow.targets import ControlledUNet, check_delta_fits, controlnet_training_teacher

    from .loop import train

    if budget_steps < 1 or check_every < 1:
        raise ValueError(f"budget_steps and check_every must be >= 1, got {budget_steps} and {check_every}")
    from perflow.io import check_output_path

    out = check_output_path(output_dir, folder=True).resolve()  # an unusable folder: one line, before any work
    state_path = out / STATE_FILE
    eval_kwargs = dict(eval_kwargs or {})
    overrides = {"window_weights": "none", "solver_step_allocation": "equal", "ema_ramp": True, **overrides}
    if data_free:
        if dataset is not None or any(k == "data" or k.startswith("data.") for k in overrides):
            raise ValueError("data-free adaptation reads no images: drop the training data (dataset, data.*) or data_free")
        if float(overrides.get("student_starts", 1.0)) != 1.0:
            raise ValueError("data-free adaptation starts every window at the student's own sampler state: it needs "
                             f"student_starts 1, not {overrides['student_starts']}")
        overrides["student_starts"] = 1.0
    settings = {"delta": _describe(delta), "target": _describe(target),
                "delta_scale": float(eval_kwargs.get("delta_scale", 1.0)), "config": str(config),
                "check_every": check_every, "num_samples": num_samples, "reference_steps": reference_steps,
                "overrides": {k: str(v) for k, v in sorted(overrides.items())},
                "eval": {k: str(v) for k, v in sorted(eval_kwargs.items())}}
    if data_free:
        settings["data_free"] = True  # only when set: an adapt.json written before the option still resumes
    state = _read_state(state_path)
    if state is not None and len(state["checks"]) == 1 and not state["checks"][0]["beats"] \
            and not (out / "run" / "checkpoints").is_dir() and (state["settings"] != settings or not resume):
        # only the baseline was measured (the first training chunk failed, e.g. on a data setting): nothing
        # trained is lost by starting over, so a corrected command is not locked out of its own folder
        print(f"{str(out)!r} holds only the baseline of an adaptation that trained nothing; starting it again")
        state = None
    if state is not None and not resume:
        raise ValueError(f"{str(out)!r} holds an adaptation ({STATE_FILE}); continue it with --resume "
                         "(resume=True) or choose another --output-dir")
    if state is not None and state["settings"] != settings:
        changed = sorted(k for k in set(settings) | set(state["settings"]) if settings.get(k) != state["settings"].get(k))
        raise ValueError(f"cannot resume the adaptation in {str(out)!r} with changed settings {changed}: "
                         "use its settings (adapt.json) or another --output-dir")
    tgt = resolve_target(TransferConfig(delta=delta, target=target, **{k: v for k, v in eval_kwargs.items()
                                                                          if k in _TARGET_KEYS}))
    controlled = isinstance(tgt.teacher.unet, ControlledUNet)
    if controlled and not data_free:
        raise ValueError("a delta is adapted to a ControlNet target data-free (--data-free, data_free=True): its "
                         "control images (--control-images) and conditions are the training items")
    if controlled and tgt.control_images is None:
        raise ValueError("a ControlNet target needs its control images (--control-images) to adapt to")
    tensors, meta = read_delta(delta, eval_kwargs.get("delta_extra"))
    check_delta_fits(tensors, meta, tgt.teacher.unet, tgt.base)
    if data_free:
        dataset = conditions_dataset(tgt.teacher, labels=eval_kwargs.get("labels"), prompts=eval_kwargs.get("prompts"),
                                     resolution=eval_kwargs.get("resolution"), controls=tgt.control_images)
    train_teacher = controlnet_training_teacher(tgt.teacher) if controlled else tgt.teacher
    started = time.perf_counter()
    if state is None:
        report_kw = {k: v for k, v in eval_kwargs.items() if k not in _TARGET_KEYS and k != "delta_extra"}
        first = transfer_report(TransferConfig(delta=(tensors, meta), target=tgt, steps=(4,), num_samples=num_samples,
                                               reference_steps=reference_steps, **report_kw), progress=progress)
        out.mkdir(parents=True, exist_ok=True)  # after the baseline: settings it refuses leave no empty folder
        best = next(c for c in first.meta["comparisons"] if c["steps"] == 4 and c["metric"] == "paired_mse")
        state = {"settings": settings, "baseline": {"solver": best["best_solver"], "paired_mse": best["best_solver_value"]},
                 "checks": [{"step": 0, "paired_mse": best["delta"], "beats": best["delta_wins"]}], "seconds": 0.0}
        _save_init(tgt, tensors, meta, out / "init", settings["delta_scale"])
        write_text(state_path, json.dumps(state, indent=1))
    own = delta_windows(meta)  # the delta's windows and parameterization: what its scheduler samples
    replaced = sorted(k for k in own if k in overrides and overrides[k] != own[k])
    if replaced:
        print(f"adapting on the delta's own {', '.join(f'{k}={own[k]!r}' for k in replaced)} "
              f"(not {', '.join(f'{k}={overrides[k]!r}' for k in replaced)}): its scheduler samples those windows")
    train_overrides = {**overrides, **own}
    checks = state["checks"]
    while not checks[-1]["beats"] and checks[-1]["step"] < budget_steps:
        step = min(checks[-1]["step"] + check_every, budget_steps)
        run_dir = out / "run"
        resume_run = "latest" if (run_dir / "checkpoints").is_dir() else None
        train(config, teacher=train_teacher, dataset=dataset, callback=callback, **{
            **train_overrides, "max_steps": step, "output_dir": str(run_dir), "resume": resume_run,
            "student_init": str(out / "init"), "checkpoint_every": check_every, "save_pipeline": False,
            "save_delta": True, "validation_every": 0, "progress": progress,
        })
        row = evaluate_teacher(TeacherEvalConfig(
            teacher=tgt.teacher, perflow=_adapted_student(tgt, run_dir) if controlled else str(run_dir), steps=(4,),
            baselines=(), num_samples=num_samples, reference_steps=reference_steps, control_images=tgt.control_images,
            **{k: v for k, v in eval_kwargs.items() if k in _EVAL_KEYS}), progress=False).rows
        mse = next(r["paired_mse"] for r in row if r["kind"] == "perflow")
        checks.append({"step": step, "paired_mse": mse, "beats": mse < state["baseline"]["paired_mse"]})
        state["seconds"] = state.get("seconds", 0.0) + time.perf_counter() - started
        started = time.perf_counter()
        write_text(state_path, json.dumps(state, indent=1))
    steps = checks[-1]["step"]
    return AdaptResult(output_dir=out, delta=(out / "run" / "delta.safetensors") if steps else None, steps=steps,
                       reached=checks[-1]["beats"], baseline=state["baseline"], checks=checks,
                       seconds=state.get("seconds", 0.0))


def conditions_dataset(teacher: Any, labels: list[int] | None = None, prompts: list[str] | None = None,
                       resolution: int | None = None, controls: Any = None, size: int = 1024) -> Any:
    """The training items of a data-free run on ``teacher``: zero images at its resolution (``resolution`` or its
    own) with the conditions the evaluation samples (:func:`perflow.evaluation.teacher_eval.sample_conditions`:
    ``labels`` cycled, all classes by default; ``prompts`` cycled, required for a text teacher; none for an
    unconditional one), and a ControlNet target's control images ``controls`` cycled alongside, ``size`` items
    (:class:`perflow.training.data.ConditionsDataset`)."""
    from perflow.evaluation.teacher_eval import TeacherEvalConfig, conditioning, sample_conditions

    from .data import ConditionsDataset
    from .loop import image_channels

    conds = sample_conditions(teacher, TeacherEvalConfig(teacher=teacher, labels=labels, prompts=prompts, num_samples=size))
    kind = conditioning(teacher)
    return ConditionsDataset(size, image_channels(teacher), teacher.resolution(resolution, "--resolution"),
                             labels=conds if kind == "class" else None, captions=conds if kind == "text" else None,
                             controls=controls)


def delta_windows(meta: dict) -> dict:
    """The training settings that make an adaptation's windows and parameterization the delta's own (its
    metadata): explicit ``window_boundaries``, or ``num_time_windows`` equal windows; and ``prediction_type``.
    A recipe's other placement would train the student on windows its scheduler does not sample."""
    out: dict = {}
    if meta.get("window_boundaries"):
        out["window_boundaries"] = [float(v) for v in meta["window_boundaries"]]
    elif meta.get("num_time_windows"):
        out.update(num_time_windows=int(meta["num_time_windows"]), window_boundaries=None, last_window_fraction=1.0)
    if meta.get("prediction_type"):
        out["prediction_type"] = str(meta["prediction_type"])
    return out


_TARGET_KEYS = ("base", "lora", "lora_scale", "controlnet", "control_images", "conditioning_scale")
_EVAL_KEYS = ("labels", "prompts", "guidance_scale", "seed", "batch_size", "resolution", "classifier")


def _read_state(path: Path) -> dict | None:
    """``adapt.json``, or None when there is none; a damaged one is a ``ValueError`` naming it and what to do."""
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except ValueError as err:  # not UTF-8, not JSON
        state, problem = None, f"not valid JSON: {err}"
    else:
        problem = _state_problem(state) if isinstance(state, dict) else f"a JSON {type(state).__name__}, not an object"
    if problem:
        raise ValueError(f"{str(path)!r} is damaged ({problem}); {_FRESH.format(out=str(path.parent))}")
    return state


_FRESH = ("the adaptation cannot continue without it: start it afresh in another --output-dir (or delete {out!r} "
          "and run the command again)")


def _state_problem(state: dict) -> str | None:
    """What ``adapt.json`` lacks (the settings, the baseline, the checks made), or None."""
    from .checkpoint import _is_count as count, _is_number as number

    if not isinstance(state.get("settings"), dict):
        return "no settings"
    base = state.get("baseline")
    if not isinstance(base, dict) or not number(base.get("paired_mse")) or not isinstance(base.get("solver"), str):
        return "no baseline solver and paired_mse"
    checks = state.get("checks")
    if not isinstance(checks, list) or not checks:
        return "no checks"
    for c in checks:
        if not (isinstance(c, dict) and count(c.get("step")) and number(c.get("paired_mse")) and isinstance(c.get("beats"), bool)):
            return f"a check is not a step, paired_mse and beats: {str(c)[:60]}"
    if not number(state.get("seconds", 0.0)):
        return "seconds is not a number"
    return None


def _describe(thing: Any) -> str:
    """How ``adapt.json`` records a delta or target: a path resolved (so a relative and an absolute path to the
    same file agree), a built-in name as given, an in-memory object by its name."""
    if isinstance(thing, tuple):
        return "tensors"
    if isinstance(thing, (str, Path)):
        return str(Path(thing).resolve()) if Path(thing).exists() else str(thing)
    return str(getattr(thing, "name", type(thing).__name__))


def _adapted_student(target, run_dir: Path):
    """The run's student as the target runs it: target + the run's delta (a ControlNet target's UNet, the
    ControlNet unchanged), sampled with the run's PeRFlow scheduler."""
    from perflow.delta import load_delta
    from perflow.evaluation.transfer import accelerated_student

    return accelerated_student(target, *load_delta(run_dir / "delta.safetensors"))


def _save_init(target, delta: dict, meta: dict, folder: Path, scale: float = 1.0) -> None:
    """``folder``: a diffusers UNet folder of target + ``scale`` delta (the student's start), written atomically
    (a ControlNet target's UNet: the ControlNet is not trained)."""
    import copy

    from perflow.delta import merge_delta
    from perflow.io import atomic_folder
    from perflow.targets import base_unet

    unet = merge_delta(copy.deepcopy(base_unet(target.teacher.unet)), delta, scale=scale, metadata=meta)
    with atomic_folder(folder, overwrite=True) as tmp:
        unet.save_pretrained(tmp, safe_serialization=True)


__all__ = ["AdaptResult", "adapt_delta", "conditions_dataset", "STATE_FILE"]
