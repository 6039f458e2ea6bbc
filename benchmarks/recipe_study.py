"""The recipe study: how fast a PeRFlow student learns on each built-in suite teacher, one setting at a time.

Trains a student of one suite teacher (``digits``, ``faces``, ``photos``) with the library's objective
(:func:`perflow.objective.reflow_example` + :func:`perflow.objective.batch_loss`, the trainer's own
functions) in a lean loop (no checkpoints, no logging), and at every ``--eval-every`` steps samples the
EMA student with the exported ``PeRFlowScheduler`` at 4 and 8 steps from fixed noise. Reports paired
MSE to the teacher's own 100-step DDIM output from the same noise and labels, and the sliced
Wasserstein distance (pixel space, 256 projections) to that reference set. The training-free solvers
(DDIM, DPM-Solver++ 2M, UniPC; each with its best of diffusers' leading / trailing / linspace spacings)
are measured on the same noise once per teacher and cached.

One JSON line per evaluation goes to ``--out`` (appended), with the settings, the step, the CPU-thread
wall-clock of training so far and the metrics. Example (the study's rows in docs/study.md)::

    python benchmarks/recipe_study.py --teacher photos --steps 400 --eval-every 100 --threads 1 \
        --set prediction_type=ddim_eps --tag ddim_eps --out benchmarks/results/study.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

DEFAULTS = dict(
    num_time_windows=4,
    boundaries="equal",  # equal | logsnr | comma list
    num_solver_steps=8,  # n per window, or one per window (comma list)
    solver_step_allocation="auto",  # auto | equal (the trainer's perflow.solver_step_allocation; rows before the fifth round: equal)
    prediction_type="ddim_eps",
    model_output_type="auto",
    loss="mse",  # mse | huber (pseudo-Huber sqrt(d^2 + c^2) - c on the raw output, as the trainer's training.loss)
    huber_c=0.001,
    loss_weighting="window_end",
    time_sampling="uniform",
    window_start_prob=0.5,
    batch_windows="mixed",  # mixed (each sample its own window) | single (one window per batch; the trainer's perflow.batch_windows)
    learning_rate=3e-5,
    lr_warmup_steps=0,
    lr_scheduler="constant",  # a diffusers scheduler name over the run's --steps (the trainer's training.lr_scheduler)
    ema_decay=0.99,
    batch_size=32,
    weight_decay=0.0,
    max_grad_norm=1.0,
    seed=0,
    clip_sample="auto",  # auto: the teacher's scheduler config (clip_sample, clip_sample_range); off
    start_from_noise="false",  # true: the first window starts from pure noise (the sampler's start)
    aligned_weight=0.0,  # ProReflow's aligned velocity loss (arXiv 2503.04824): + lambda mean_b (1 - cos(v_hat, v))
    student_starts=0.0,  # fraction of examples whose window starts at the EMA student's own K-step sampling state
    chain_loss="off",  # replace | add: the window end carried to t = 0 by the EMA student's own sampler (tenth round)
    x0_loss="off",  # on: the loss is |x0_T(z_e_hat, t_e) - x0_T(z_e, t_e)|^2, the window ends seen through the teacher's x0 prediction
    window_weights="auto",  # auto (the teacher's error gains, the trainer's default) | none | inv_abar (1 / abar(t_e)) | comma list
    keep_best=0,  # N > 0: every N steps the EMA student's K-step error to the teacher's window chain on the calibration batches; the best student is the one evaluated
)
SPACINGS = ("leading", "trailing", "linspace")


# ----------------------------------------------------------------------------- teachers


def load_suite(name: str):
    """(unet, label_encoder or None, scheduler config, teacher prediction type, batches)."""
    from perflow.builtin.suite import get_suite_teacher, suite_teacher_path
    from perflow.io import read_scheduler_config

    suite = get_suite_teacher(name)
    path = suite_teacher_path(name)
    config = read_scheduler_config(path, required=True)
    if suite.num_classes:
        from perflow.training.teachers import load_teacher

        t = load_teacher(str(path))
        return t.unet, t.label_encoder, config, t.prediction_type, suite.batches()
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(path / "unet").eval().requires_grad_(False)
    return unet, None, config, config.get("prediction_type", "epsilon"), suite.batches()


def denoiser(unet, label_encoder, labels):
    """``f(z, timestep) -> output`` of the teacher's architecture at the labels (no guidance)."""
    if label_encoder is None:
        return lambda z, ts: unet(z, ts).sample
    from perflow.denoisers import Condition, unet_denoiser

    with torch.no_grad():
        return unet_denoiser(unet, Condition(label_encoder(labels.long())))


def student_window_step(model, label_encoder, labels, scheduler):
    """``window_step(z, j, rows)`` for :func:`perflow.objective.sampler_window_starts`: the model's PeRFlow step across
    window ``j`` for the batch rows ``rows`` (their labels), ``scheduler`` set to one step per window."""
    def window_step(z, j, rows):
        ts = scheduler.timesteps[j]
        with torch.no_grad():
            out = denoiser(model, label_encoder, labels[rows] if labels is not None else None)(z, ts.expand(z.shape[0]))
        return scheduler.step(out, ts, z).prev_sample
    return window_step


# ----------------------------------------------------------------------------- evaluation set


def reference(name: str, unet, le, config, num: int) -> dict:
    """Fixed noise/labels, the 100-step DDIM reference and the best baseline per (solver, steps), cached in
    ``/tmp/study_<name>_<num>.pt`` (shared by every study script)."""
    cache = Path(f"/tmp/study_{name}_{num}.pt")
    if cache.is_file():
        return torch.load(cache)
    from perflow.evaluation import metrics
    from perflow.evaluation.samplers import baseline_scheduler, sample

    size, ch = unet.config.sample_size, unet.config.in_channels
    g = torch.Generator().manual_seed(1234)
    noise = torch.randn(num, ch, size, size, generator=g)
    labels = torch.arange(num) % le.null_label if le is not None else None
    fn = denoiser(unet, le, labels)
    with torch.no_grad():
        ref = sample(fn, baseline_scheduler("ddim", {**config, "timestep_spacing": "trailing"}), noise.clone(), 100).samples
        base = {}
        for solver in ("ddim", "dpmsolver++", "unipc"):
            for steps in (4, 8):
                best = None
                for spacing in SPACINGS:
                    sch = baseline_scheduler(solver, config)
                    sch = sch.__class__.from_config(sch.config, timestep_spacing=spacing)
                    out = sample(fn, sch, noise.clone(), steps).samples
                    row = dict(mse=metrics.paired_mse(out, ref), swd=metrics.sliced_wasserstein(out.flatten(1), ref.flatten(1)), spacing=spacing)
                    if best is None or row["mse"] < best["mse"]:
                        best = row
                base[f"{solver}@{steps}"] = best
    data = dict(noise=noise, labels=labels, ref=ref, baselines=base)
    torch.save(data, cache)
    return data


# ----------------------------------------------------------------------------- the study scripts' shared start

TEACHERS = ("digits", "faces", "photos")


def study_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with the arguments every study script takes: ``--teacher``, ``--num-eval``, ``--threads``."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--teacher", choices=TEACHERS, required=True)
    ap.add_argument("--num-eval", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    return ap


def best_baseline(baselines: dict, steps: int, metric: str = "mse") -> tuple[str, dict]:
    """``(solver, its row)`` of the best training-free solver at ``steps`` on ``metric`` (``mse`` or ``swd``)
    among the evaluation set's ``baselines`` (keys ``"<solver>@<steps>"``, rows ``{mse, swd, spacing}``)."""
    rows = {k.split("@")[0]: v for k, v in baselines.items() if k.endswith(f"@{steps}")}
    name = min(rows, key=lambda k: rows[k][metric])
    return name, rows[name]


def open_study(args: argparse.Namespace):
    """Set the thread count and load the suite teacher and the evaluation set:
    ``(unet, label_encoder, scheduler config, teacher prediction type, batches, reference data)``."""
    torch.set_num_threads(args.threads)
    unet, le, config, teacher_type, draw = load_suite(args.teacher)
    return unet, le, config, teacher_type, draw, reference(args.teacher, unet, le, config, args.num_eval)


# ----------------------------------------------------------------------------- windows


def logsnr_boundaries(alphas_cumprod: torch.Tensor, K: int) -> list[float]:
    """Boundaries equally spaced in log-SNR ``log(abar / (1 - abar))`` between t = 1 and t = 0 (on the index grid)."""
    ac = alphas_cumprod.double()
    T = ac.numel()
    lam = (ac / (1 - ac)).log()  # index 0 (t = 1/T .. 0) to T-1 (t = 1)
    targets = torch.linspace(lam[-1].item(), lam[0].item(), K + 1)
    out = [1.0]
    for v in targets[1:-1]:
        i = int((lam - v).abs().argmin())
        out.append((i + 1) / T)
    out.append(0.0)
    return out


# ----------------------------------------------------------------------------- training


def x0_space_loss(teach, ex, raw, schedule, teacher_type, sample_weight):
    """``mean_b w_b mean_i (x0_T(z_e_hat, t_e) - x0_T(z_e, t_e))^2``: the student's predicted window end and the
    teacher's, each through the teacher's clean-sample prediction at the window end (the identity at ``t_e = 0``);
    gradients flow through the teacher's network into ``z_e_hat`` (the teacher's weights stay frozen)."""
    from perflow.parameterization import window_end_from_output
    from perflow.solver import x0_eps_from_output

    z_hat = window_end_from_output(ex.student_output(raw).float(), ex.z_t, ex.t, ex.window)
    z_e = ex.z_e.float()
    d = (z_hat - z_e).square().flatten(1).mean(1)
    inner = (ex.t_e > 0).nonzero().flatten()
    if inner.numel():
        sch = schedule.to(dtype=torch.float32)
        te = ex.t_e[inner]
        rows_of = getattr(teach, "rows", None)  # a conditional teacher on these rows' conditions
        f = rows_of(inner) if rows_of is not None else teach
        a, sg = sch.alpha_sigma(te, z_hat[inner])

        def x0_of(z):
            return x0_eps_from_output(f(z, sch.timestep(te)).float(), z, a, sg, teacher_type)[0]

        with torch.no_grad():
            ref = x0_of(z_e[inner])
        d = d.index_put((inner,), (x0_of(z_hat[inner]) - ref).square().flatten(1).mean(1))
    if sample_weight is not None:
        d = d * sample_weight
    return d.mean()


def chain_term(ema, le, labels, chain, ex, raw, boundaries):
    """``mean_i (R_k(z_e_hat) - R_k(z_e))^2`` per example: the student's predicted window end and the teacher's,
    each carried to ``t = 0`` through the windows after the example's window ``k`` by the frozen EMA student's own
    K-step PeRFlow sampler ``R_k`` (``chain``, one step per window; the identity in the last window). Gradients flow
    through the EMA student's network into ``z_e_hat``, so an error counts by how much the sampler that will use
    the student carries it into the final sample (its Jacobian), not by its size at the window end."""
    from perflow.parameterization import window_end_from_output
    from perflow.windows import window_index

    a = window_end_from_output(ex.student_output(raw).float(), ex.z_t, ex.t, ex.window)
    b = ex.z_e.float()
    k = window_index(ex.t.double(), boundaries)
    for j in range(1, boundaries.numel() - 1):
        rows = torch.nonzero(k < j).flatten()
        if not rows.numel():
            continue
        ts = chain.timesteps[j]
        f = denoiser(ema, le, labels[rows] if labels is not None else None)
        a = a.index_put((rows,), chain.step(f(a[rows], ts.expand(rows.numel())), ts, a[rows]).prev_sample.float())
        with torch.no_grad():
            b = b.index_put((rows,), chain.step(f(b[rows], ts.expand(rows.numel())), ts, b[rows]).prev_sample.float())
    return (a - b).square().flatten(1).mean(1)


def run(args, s: dict) -> None:
    from perflow.evaluation import metrics
    from perflow.evaluation.samplers import sample
    from perflow.objective import batch_loss, reflow_example, sampler_window_starts, teacher_chain_end
    from perflow.parameterization import resolve_model_output_type
    from perflow.schedule import DiscreteVPSchedule
    from perflow.scheduler import PeRFlowScheduler
    from perflow.time_sampling import make_time_sampler
    from perflow.training.teachers import teacher_clip_sample
    from perflow.windows import resolve_boundaries, window_index

    unet, le, config, teacher_type, draw, data = open_study(args)
    schedule = DiscreteVPSchedule.from_config(config)
    K = int(s["num_time_windows"])
    if s["boundaries"] == "equal":
        bounds = None
    elif s["boundaries"] == "logsnr":
        bounds = logsnr_boundaries(schedule.alphas_cumprod, K)
    else:
        bounds = [float(v) for v in str(s["boundaries"]).split(",")]
    steps = [int(v) for v in str(s["num_solver_steps"]).split(",")]
    steps = steps[0] if len(steps) == 1 else steps
    boundaries = resolve_boundaries(K, bounds, schedule, steps, s["prediction_type"])
    mot = resolve_model_output_type(s["model_output_type"], s["prediction_type"], teacher_type)
    sched_cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    scheduler = PeRFlowScheduler.from_config(
        sched_cfg, prediction_type=s["prediction_type"], num_time_windows=boundaries.numel() - 1,
        window_boundaries=boundaries.tolist(), model_output_type=mot,
    )
    clip = teacher_clip_sample(config, args.teacher) if s["clip_sample"] == "auto" else None

    def calibration():
        """The trainer's calibration batches (perflow.training.loop._calibration_batches): (teacher, noise, labels) x 5."""
        from perflow.training.loop import CALIBRATION_BATCHES

        cal = torch.Generator().manual_seed(int(s["seed"]) * 1_000_003 + 104729)
        for _ in range(CALIBRATION_BATCHES):
            x_cal, l_cal = draw(cal, int(s["batch_size"]))
            yield denoiser(unet, le, l_cal), torch.randn(x_cal.shape, generator=cal), l_cal

    if s["solver_step_allocation"] == "auto" and isinstance(steps, int):  # as the trainer (loop.solver_steps_of)
        from perflow.objective import allocate_solver_steps, window_solve_errors
        from perflow.schedule import window_index_spans

        cal_cpu = time.process_time()
        errors = [window_solve_errors(den, noise, boundaries, schedule, steps, teacher_type, clip) for den, noise, _ in calibration()]
        steps = allocate_solver_steps(torch.stack(errors), steps, window_index_spans(boundaries, schedule.num_train_timesteps))
        print("window solve errors per batch", [[float(f"{v:.3g}") for v in e] for e in errors],
              f"-> teacher steps per window {steps} ({time.process_time() - cal_cpu:.1f} CPU s)", flush=True)
    ww = str(s["window_weights"])
    if ww == "none":
        window_w = None
    elif ww == "auto":  # as the trainer does (perflow.training.loop.window_weights_of)
        from perflow.objective import window_error_gains, window_weights_from_gains

        cal_cpu = time.process_time()
        per_batch = [window_error_gains(den, noise, boundaries, schedule, steps, teacher_type, clip) for den, noise, _ in calibration()]
        window_w = window_weights_from_gains(torch.stack(per_batch))
        print("window error gains per batch", [[round(float(v), 2) for v in g] for g in per_batch],
              f"({time.process_time() - cal_cpu:.1f} CPU s)", flush=True)
    elif ww == "inv_abar":
        a_e = schedule.alpha_sigma(boundaries[1:].double(), torch.zeros(K, dtype=torch.float64))[0].double().square()
        window_w = (1.0 / a_e) / (1.0 / a_e).mean()
    else:
        window_w = torch.tensor([float(v) for v in ww.split(",")], dtype=torch.float64)
        window_w = window_w / window_w.mean()
    if window_w is not None:
        print("window weights", [round(float(v), 3) for v in window_w], flush=True)
    time_sampler = make_time_sampler(s["time_sampling"], boundaries, window_start_prob=float(s["window_start_prob"]),
                                     batch_windows=s["batch_windows"])
    start = copy.deepcopy(unet)
    if args.init:  # a saved student (--save of an earlier run): the next stage of progressive reflow
        start.load_state_dict(torch.load(args.init, weights_only=True))
    student = copy.deepcopy(start).train().requires_grad_(True)
    ema = copy.deepcopy(start).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=float(s["learning_rate"]), weight_decay=float(s["weight_decay"]))
    warm = int(s["lr_warmup_steps"])
    if s["lr_scheduler"] == "constant":   # as before lr_scheduler existed: this exact schedule, so old rows repeat
        lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm) if warm else 1.0)
    else:
        from diffusers.optimization import get_scheduler

        lr_sched = get_scheduler(s["lr_scheduler"], opt, num_warmup_steps=warm, num_training_steps=args.steps)
    gen = torch.Generator().manual_seed(int(s["seed"]))
    decay = float(s["ema_decay"])
    p_starts = float(s["student_starts"])
    gen_starts = torch.Generator().manual_seed(int(s["seed"]) + 7919)
    chain = PeRFlowScheduler.from_config(scheduler.config)  # the student's own K-step sampler (student_starts)
    chain.set_timesteps(K)

    check_every = int(s["keep_best"])
    check_set, best = [], None  # best: (check error, step, EMA state dict)
    if check_every:
        cal_cpu = time.process_time()
        check_set = [(noise, labels, teacher_chain_end(den, noise, boundaries, schedule, steps, teacher_type, clip))
                     for den, noise, labels in calibration()]
        print(f"keep_best: the teacher's chain on {len(check_set)} calibration batches ({time.process_time() - cal_cpu:.1f} CPU s)", flush=True)

    def check_error(model) -> float:
        """Mean squared error of the model's K-step sample to the teacher's window chain on the calibration batches."""
        errs = []
        for noise, labels, ref in check_set:
            k = torch.full((noise.shape[0],), K)
            errs.append((sampler_window_starts(student_window_step(model, le, labels, chain), noise, k) - ref).square().mean().item())
        return sum(errs) / len(errs)

    if s["chain_loss"] not in ("off", "replace", "add"):
        raise SystemExit(f"chain_loss must be off, replace or add, got {s['chain_loss']!r}")
    if s["x0_loss"] not in ("on", "off"):
        raise SystemExit(f"x0_loss must be on or off, got {s['x0_loss']!r}")
    train_time = 0.0  # wall-clock seconds of the training steps (inflated when other jobs share the CPU)
    train_cpu = 0.0  # CPU seconds of this process in the training steps (robust to a shared CPU at --threads 1)
    base = {k: dict(mse=round(v["mse"], 6), swd=round(v["swd"], 5), spacing=v["spacing"]) for k, v in data["baselines"].items()}

    def evaluate(step: int) -> None:
        row = dict(teacher=args.teacher, tag=args.tag, step=step, train_s=round(train_time, 1), cpu_s=round(train_cpu, 1),
                   settings=s, baselines=base, solver_steps=steps)
        model = ema
        if best is not None:  # keep_best: the best checked student is what the run would export
            model = copy.deepcopy(ema)
            model.load_state_dict(best[2])
            row.update(best_step=best[1], check=round(best[0], 7))
        for evals in (4, 8):
            with torch.no_grad():
                out = sample(denoiser(model, le, data["labels"]), PeRFlowScheduler.from_config(scheduler.config),
                             data["noise"].clone(), evals).samples
            row[f"mse@{evals}"] = metrics.paired_mse(out, data["ref"])
            row[f"swd@{evals}"] = metrics.sliced_wasserstein(out.flatten(1), data["ref"].flatten(1))
        print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items() if k not in ("settings", "baselines")}), flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    if args.eval_init:
        evaluate(0)
    for step in range(1, args.steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        x0, labels = draw(gen, int(s["batch_size"]))
        teach = denoiser(unet, le, labels)
        start_states = None
        if p_starts:  # some windows start at the EMA student's own sampler states

            @torch.no_grad()
            def start_states(noise, t):
                mask = torch.rand(x0.shape[0], generator=gen_starts) < p_starts
                k = torch.where(mask, window_index(t, boundaries), 0)
                return sampler_window_starts(student_window_step(ema, le, labels, chain), noise, k), mask
        ex = reflow_example(teach, x0, boundaries, schedule, steps, s["prediction_type"],
                            teacher_type, generator=gen, time_sampler=time_sampler, model_output_type=mot,
                            clip_sample=clip, start_from_noise=str(s["start_from_noise"]).lower() == "true", start_states=start_states)
        sw = None
        if window_w is not None:
            sw = window_w[window_index(ex.t, boundaries)].float()
        raw = denoiser(student, le, labels)(ex.z_t, ex.timestep)  # one student evaluation for both terms
        if s["x0_loss"] == "on":  # instead of the window-end loss: errors weighted by how the teacher reads them
            loss = x0_space_loss(teach, ex, raw, schedule, teacher_type, sw)
        else:
            loss = batch_loss(lambda z, ts: raw, ex, s["loss"], float(s["huber_c"]), weighting=s["loss_weighting"],
                              sample_weight=sw)
        if s["chain_loss"] != "off":  # the window end's error as the student's own sampler carries it to t = 0
            d = chain_term(ema, le, labels, chain, ex, raw, boundaries)
            if s["chain_loss"] == "replace":
                loss = d.mean()
            else:  # add: the window-end loss plus the carried error of the windows before the last
                inner = window_index(ex.t.double(), boundaries) < K - 1
                loss = loss + (d * inner).mean()
        lam = float(s["aligned_weight"])
        if lam:
            from perflow.parameterization import velocity_from_output

            v_hat = velocity_from_output(ex.student_output(raw).float(), ex.z_t, ex.t, ex.window).flatten(1)
            v = velocity_from_output(ex.target.float(), ex.z_t, ex.t, ex.window).flatten(1)
            align = (1 - torch.nn.functional.cosine_similarity(v_hat, v, dim=1, eps=1e-8)).mean()
            if step == 1:
                print(f"step 1: mse term {loss.item():.3g}, alignment term {align.item():.3g}", flush=True)
            loss = loss + lam * align
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), float(s["max_grad_norm"]))
        opt.step()
        lr_sched.step()
        with torch.no_grad():
            for pe, ps in zip(ema.parameters(), student.parameters()):
                pe.lerp_(ps, 1.0 - decay)
        if check_every and step % check_every == 0:  # part of the training cost: counted in its time
            err = check_error(ema)
            if best is None or err < best[0]:
                best = (err, step, {k: v.detach().clone() for k, v in ema.state_dict().items()})
            print(f"step {step}: check {err:.6g} (best {best[0]:.6g} at step {best[1]})", flush=True)
        train_time += time.perf_counter() - t0
        train_cpu += time.process_time() - c0
        if not math.isfinite(loss.item()):
            raise SystemExit(f"non-finite loss at step {step}")
        if step % args.eval_every == 0 or step == args.steps:
            evaluate(step)
    if args.save:
        torch.save(best[2] if best is not None else ema.state_dict(), args.save)


def main() -> None:
    ap = study_parser(__doc__)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-init", action="store_true", help="also evaluate the untrained student")
    ap.add_argument("--set", nargs="*", default=[], help="settings KEY=VALUE over " + ", ".join(DEFAULTS))
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=None)
    ap.add_argument("--save", default=None, help="write the EMA student's state dict here (torch.save) at the end")
    ap.add_argument("--init", default=None, help="start the student (and its EMA) from a state dict written by --save "
                    "instead of the teacher: the next stage of progressive reflow (the targets still come from the teacher)")
    args = ap.parse_args()
    s = dict(DEFAULTS)
    for kv in args.set:
        k, _, v = kv.partition("=")
        if k not in DEFAULTS:
            raise SystemExit(f"unknown setting {k!r}; expected one of {sorted(DEFAULTS)}")
        s[k] = v
    run(args, s)


if __name__ == "__main__":
    main()
