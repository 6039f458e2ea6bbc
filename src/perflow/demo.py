"""``perflow demo``: see PeRFlow turn a many-step diffusion model into a few-step one, on a CPU.

Stages (each with a progress bar), all offline:

1. load the built-in digits teacher (a class-conditional ``UNet2DConditionModel``, epsilon
   prediction, SD's noise schedule);
2. accelerate it with PeRFlow (``K = 4`` windows) with the project's trainer
   (:func:`perflow.training.train`), and train the whole-range reflow baseline (``K = 1``,
   InstaFlow-style) with the same budget;
3. evaluate at 1, 2, 4 and 8 model evaluations against the teacher with DDIM,
   DPM-Solver++ and UniPC, the teacher's 100-step DDIM output being the reference
   (:func:`perflow.evaluation.evaluate_digits`), and draw sample grids;
4. the analytic 2-D case: a Gaussian-mixture teacher with an exact epsilon-prediction, MLP
   students trained with the same objective (:func:`perflow.objective.reflow_example`), and a
   picture of the teacher's curved trajectories beside PeRFlow's piecewise-straight ones.

With ``flow=True`` (``perflow demo --flow``) a last stage does the same for the built-in
flow-matching teacher ``flow_digits`` (a class-conditional ``SD3Transformer2DModel``): PeRFlow
(``K = 4``, velocity, the ``flow_digits`` recipe) against the teacher with
``FlowMatchEulerDiscreteScheduler`` and DPM-Solver++ / UniPC in their flow modes, the teacher's
100-step Euler output being the reference (:func:`perflow.evaluation.teacher_eval.evaluate_teacher`).

Outputs go to ``output_dir``: ``digits_results.{json,md}``, ``toy2d_results.{json,md}``,
``digits_{N}steps.png``, ``digits_perflow_vs_ddim.png``, ``toy2d_trajectories.png``, and
the trained students (``perflow_student/``, ``reflow_student/``); with ``flow``, also
``flow_digits_results.{json,md}``, ``flow_digits_perflow_vs_euler.png`` and ``flow_perflow_student/``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

STEPS = (1, 2, 4, 8)


@dataclass
class DemoConfig:
    """Sizes of the demo. The defaults take 7.5 CPU minutes at one thread (docs/demo.md); ``quick()`` well under one."""

    output_dir: str = "perflow-demo"
    teacher: str = "digits"
    max_steps: int = 200
    """PeRFlow (and reflow baseline) training steps on the digits."""
    batch_size: int = 64
    num_solver_steps: int = 8
    """n, teacher DDIM steps per window when building targets."""
    solver_step_allocation: str = "equal"
    """n in every window, as the demo's figures (docs/demo.md) were measured; the default recipe's ``auto``
    spreads the same steps by measured error (docs/study.md, fifth round) at more CPU per step on this model."""
    learning_rate: float = 1e-4
    reflow_baseline: bool = True
    """Also train the whole-range (K = 1) reflow baseline with the same budget."""
    num_samples: int = 500
    reference_steps: int = 100
    guidance_scale: float = 1.0
    toy_steps: int = 600
    """Training steps of each 2-D MLP student."""
    toy_samples: int = 2000
    flow_steps: int = 32
    """Steps of the fine trajectories on which flow straightness is measured."""
    seed: int = 0
    progress: bool = True
    flow: bool = False
    """Also run the flow-matching stage on the built-in ``flow_digits`` teacher."""
    flow_max_steps: int = 150
    """PeRFlow training steps on the flow-matching teacher (batch ``batch_size``)."""

    @classmethod
    def quick(cls, **kw) -> "DemoConfig":
        """A reduced run (tests, smoke checks): tiny budgets, same code path."""
        base = cls(max_steps=2, batch_size=8, num_solver_steps=2, num_samples=30, reference_steps=16,
                   toy_steps=10, toy_samples=200, flow_steps=8, flow_max_steps=2)
        return replace(base, **kw)


def _train_student(cfg: DemoConfig, num_windows: int, out: Path, recipe: str = "digits"):
    from perflow.training import train

    flow = recipe == "flow_digits"
    return train(
        recipe,
        teacher="flow_digits" if flow else cfg.teacher,
        output_dir=str(out),
        max_steps=cfg.flow_max_steps if flow else cfg.max_steps,
        batch_size=cfg.batch_size,
        num_solver_steps=cfg.num_solver_steps,
        solver_step_allocation=cfg.solver_step_allocation,
        num_time_windows=num_windows,
        learning_rate=cfg.learning_rate,
        seed=cfg.seed,
        checkpoint_every=0,
        validation_every=0,
        tracker="none",
        save_delta=False,
        progress=cfg.progress,
        overwrite=True,  # the demo owns this folder: a re-run replaces its student
    )


def run_demo(cfg: DemoConfig, command: str | None = None) -> dict:
    """Run every stage; returns ``{"digits": EvalResult, "toy2d": EvalResult, "files": [...], "timings": {...}}``
    (and ``"flow_digits": EvalResult`` with ``cfg.flow``)."""
    from perflow.builtin.gaussian_mixture import default_mixture
    from perflow.evaluation.digits import DigitsEvalConfig, evaluate_digits
    from perflow.evaluation.plots import save_sample_grid, save_trajectory_plot
    from perflow.evaluation.report import command_line, markdown_report, markdown_table, verdicts, write_results
    from perflow.evaluation.toy2d import density_grid, evaluate_2d, train_2d_student

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    files: list[Path] = []
    cmd = command or command_line()
    say = print

    t0 = time.perf_counter()
    say(f"[1/4] PeRFlow (K=4) on the built-in digits teacher: {cfg.max_steps} steps, batch {cfg.batch_size}")
    _train_student(cfg, 4, out / "perflow_student")
    timings["train_perflow_s"] = time.perf_counter() - t0
    reflow_dir = None
    if cfg.reflow_baseline:
        t1 = time.perf_counter()
        say("[2/4] whole-range reflow baseline (K=1), same budget")
        _train_student(cfg, 1, out / "reflow_student")
        reflow_dir = str(out / "reflow_student")
        timings["train_reflow_s"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    say(f"[3/4] evaluating at {list(STEPS)} model evaluations against the teacher's {cfg.reference_steps}-step DDIM")
    ev = DigitsEvalConfig(
        perflow=str(out / "perflow_student"), reflow=reflow_dir, teacher=cfg.teacher, steps=STEPS,
        num_samples=cfg.num_samples, reference_steps=cfg.reference_steps, guidance_scale=cfg.guidance_scale, seed=cfg.seed,
        flow_steps=cfg.flow_steps,
    )
    digits = evaluate_digits(ev, progress=cfg.progress)
    digits.meta["command"] = cmd
    digits.meta["notes"] = [
        f"Demo budget: PeRFlow and reflow students trained {cfg.max_steps} steps at batch {cfg.batch_size} "
        f"with n={cfg.num_solver_steps} teacher DDIM steps per window (a short run; see benchmarks/ for a longer one)."
    ]
    ref = f"teacher ddim@{cfg.reference_steps}"
    for n in STEPS:
        names = [ref] + [k for k in digits.previews if k.endswith(f"@{n}") and not k.startswith(ref)]
        files.append(save_sample_grid(digits.previews, names, out / f"digits_{n}steps.png",
                                      title=f"{n} model evaluations, same noise and labels in every row"))
    pf = [k for k in digits.previews if k.startswith("perflow")]
    dd = [f"teacher ddim@{n}" for n in STEPS]
    files.append(save_sample_grid(digits.previews, [ref] + pf + dd, out / "digits_perflow_vs_ddim.png",
                                  title="PeRFlow vs the teacher's DDIM at 1, 2, 4, 8 steps"))
    write_results(digits, out / "digits_results.json", out / "digits_results.md", "PeRFlow demo: digits")
    files += [out / "digits_results.json", out / "digits_results.md"]
    timings["evaluate_digits_s"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    say("[4/4] analytic 2-D Gaussian mixture: exact teacher, MLP students trained with the same objective")
    gmm = default_mixture()
    students = {"perflow (K=4)": (train_2d_student(gmm, 4, cfg.toy_steps, seed=cfg.seed, progress=cfg.progress), "perflow")}
    students["reflow (K=1)"] = (train_2d_student(gmm, 1, cfg.toy_steps, seed=cfg.seed, progress=cfg.progress), "reflow")
    toy = evaluate_2d(students, gmm, STEPS, num_samples=cfg.toy_samples, reference_steps=cfg.reference_steps,
                      seed=cfg.seed, flow_steps=cfg.flow_steps, progress=cfg.progress)
    toy.meta["command"] = cmd
    toy.meta["notes"] = [
        f"{cfg.toy_samples} samples; sliced W2 floor (two exact sample sets): {toy.meta['sw_exact_vs_exact']:.4f}; "
        f"MLP students trained {cfg.toy_steps} steps at batch 1024."
    ]
    write_results(toy, out / "toy2d_results.json", out / "toy2d_results.md", "PeRFlow demo: 2-D Gaussian mixture")
    files += [out / "toy2d_results.json", out / "toy2d_results.md"]
    tr = toy.trajectories
    panels = [
        (f"teacher probability-flow ODE (DDIM {cfg.reference_steps} steps)", *tr[f"teacher ddim@{cfg.reference_steps}"]),
        (f"PeRFlow K=4 student's ODE ({cfg.flow_steps} Euler steps)", *tr[f"perflow (K=4)@{cfg.flow_steps}"]),
        ("PeRFlow K=4 sampled with 4 steps (one per window)", *tr["perflow (K=4)@4"]),
        (f"whole-range reflow K=1 ({cfg.flow_steps} Euler steps)", *tr[f"reflow (K=1)@{cfg.flow_steps}"]),
    ]
    panels = [(label, traj, _window_marks(times, cfg.reference_steps)) for label, traj, times in panels]
    files.append(save_trajectory_plot(panels, out / "toy2d_trajectories.png", density=density_grid(gmm),
                                      title="noise (t=1) -> data (t=0); dots: states at t = 1, 0.75, 0.5, 0.25 (and the end)"))
    timings["toy2d_s"] = time.perf_counter() - t1
    flow = None
    if cfg.flow:
        t1 = time.perf_counter()
        flow = _flow_stage(cfg, out, cmd, files, say)
        timings["flow_digits_s"] = time.perf_counter() - t1
    timings["total_s"] = time.perf_counter() - t0

    say("")
    say(markdown_report(digits, "PeRFlow demo: digits"))
    say("2-D Gaussian mixture (exact teacher):")
    say("")
    say(markdown_table(toy.rows))
    for line in verdicts(toy):
        say(f"- {line}")
    say("")
    if flow is not None:
        say(markdown_report(flow, FLOW_TITLE))
    say("stage times (s): " + ", ".join(f"{k[:-2]} {v:.0f}" for k, v in timings.items()))
    say("files:")
    for f in files:
        say(f"  {f}")
    digits.meta["timings"] = timings
    digits.meta["demo_config"] = asdict(cfg)
    write_results(digits, out / "digits_results.json")
    return {"digits": digits, "toy2d": toy, "files": files, "timings": timings,
            **({"flow_digits": flow} if flow is not None else {})}


FLOW_TITLE = "PeRFlow demo: flow-matching digits teacher (SD3 transformer)"


def _flow_stage(cfg: DemoConfig, out: Path, cmd: str, files: list[Path], say):
    """PeRFlow (K=4, velocity) on the built-in ``flow_digits`` teacher, evaluated against its flow-mode solvers."""
    from perflow.evaluation.plots import save_sample_grid
    from perflow.evaluation.report import write_results
    from perflow.evaluation.teacher_eval import TeacherEvalConfig, evaluate_teacher

    say(f"[flow] PeRFlow (K=4, velocity) on the flow-matching digits teacher: {cfg.flow_max_steps} steps, "
        f"batch {cfg.batch_size}; then Euler / DPM-Solver++ / UniPC (flow modes) at {list(STEPS)} evaluations")
    student = out / "flow_perflow_student"
    _train_student(cfg, 4, student, recipe="flow_digits")
    ev = TeacherEvalConfig(teacher="flow_digits", perflow=str(student), steps=STEPS, spacings=("trailing",),
                           num_samples=max(cfg.num_samples, 20), reference_steps=cfg.reference_steps,
                           guidance_scale=cfg.guidance_scale, seed=cfg.seed, flow_steps=cfg.flow_steps,
                           batch_size=max(cfg.num_samples, 20))
    result = evaluate_teacher(ev, progress=cfg.progress)
    result.meta["command"] = cmd
    result.meta["notes"] = result.meta.get("notes", []) + [
        f"Demo budget: the PeRFlow student trained {cfg.flow_max_steps} steps at batch {cfg.batch_size}, n="
        f"{cfg.num_solver_steps} teacher Euler steps per window. Row 'teacher ddim' is FlowMatchEulerDiscreteScheduler "
        "(Euler is DDIM on the linear path); the reference is its 100-step output."
    ]
    ref = f"teacher ddim@{cfg.reference_steps}"
    pf = [k for k in result.previews if k.startswith("perflow")]
    eu = [f"teacher ddim@{n}" for n in STEPS]
    files.append(save_sample_grid(result.previews, [ref] + pf + eu, out / "flow_digits_perflow_vs_euler.png",
                                  title="flow-matching teacher: PeRFlow vs Euler at 1, 2, 4, 8 steps"))
    write_results(result, out / "flow_digits_results.json", out / "flow_digits_results.md", FLOW_TITLE)
    files += [out / "flow_digits_results.json", out / "flow_digits_results.md"]
    return result


def _window_marks(times: torch.Tensor, reference_steps: int) -> torch.Tensor:
    """Which states to mark: those at the window boundaries 1, .75, .5, .25 and the last one."""
    t = times.to(torch.float64)
    marks = torch.zeros_like(t, dtype=torch.bool)
    for b in (1.0, 0.75, 0.5, 0.25):
        marks[(t - b).abs().argmin()] = True
    marks[-1] = True
    return marks
