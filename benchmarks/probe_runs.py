"""Probe how `perflow train` runs fail: NaN, signals, kills, shared folders, changed settings on resume.

Every probe runs the real CLI (`python -m perflow train`) in a subprocess on the built-in digits
teacher with tiny settings, and the script prints one table row per probe: what happened, and
whether that is what a safe trainer should do.

    python benchmarks/probe_runs.py                       # this checkout, 10 random SIGKILLs
    python benchmarks/probe_runs.py --kills 3 --seed 1
    python benchmarks/probe_runs.py --repo /path/to/other/checkout   # e.g. an older version, for comparison

Probes:
- nan: `--learning_rate 1` with a warm-up: exit code, whether a finite checkpoint is left, whether
  non-finite weights were exported;
- sigterm / sigint: the signal mid-run (after the first checkpoint), then `--resume latest`: exit
  codes, the one-line message, and whether the final weights equal an uninterrupted run's;
- sigkill: SIGKILL at random moments `--kills` times (each followed by `--resume latest`), then a
  resume to the end; final weights compared to the uninterrupted run, leftovers counted;
- two-runs: a second run into a folder while the first one trains; a new run into a finished folder;
- resume-changes: `--resume latest` with a changed learning rate / seed / batch size / K (should be
  refused) and with a changed max_steps / log_every (accepted and recorded);
- truncated: the newest checkpoint truncated, then `--resume latest`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASE = ["--config", "digits", "--batch_size", "8", "--num_solver_steps", "2", "--tracker", "none",
        "--progress", "false", "--validation_every", "0", "--save_delta", "false", "--learning_rate", "1e-3"]


class Runner:
    def __init__(self, repo: Path):
        self.repo = repo
        src = repo / "src" if (repo / "src" / "perflow").is_dir() else repo  # src layout, or an older checkout
        self.env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")

    def start(self, out: Path, *args: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "perflow", "train", *BASE, "--output_dir", str(out.absolute()), *args]
        # cwd: `python -m` puts the working directory first on sys.path, before PYTHONPATH
        return subprocess.Popen(cmd, env=self.env, cwd=self.repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def run(self, out: Path, *args: str) -> tuple[int, str]:
        proc = self.start(out, *args)
        _, err = proc.communicate(timeout=900)
        return proc.returncode, last_line(err)


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:400] if lines else ""


def checkpoints(out: Path) -> list[int]:
    root = out / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in root.glob("checkpoint-*")) if root.is_dir() else []


def wait_for_checkpoint(proc: subprocess.Popen, out: Path, after: int = 0, timeout: float = 300) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if any(s > after for s in checkpoints(out)):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def weights(folder: Path):
    from safetensors.torch import load_file

    f = folder / "diffusion_pytorch_model.safetensors"
    return load_file(str(f)) if f.is_file() else None


def same_weights(a: Path, b: Path) -> bool | None:
    import torch

    wa, wb = weights(a), weights(b)
    if wa is None or wb is None:
        return None
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def all_finite(folder: Path) -> bool | None:
    import torch
    from safetensors.torch import load_file

    files = list(folder.glob("*.safetensors"))
    if not files:
        return None
    return all(bool(torch.isfinite(t).all()) for f in files for t in load_file(str(f)).values())


def leftovers(out: Path) -> list[str]:
    found = []
    for folder in (out, out / "checkpoints"):
        if folder.is_dir():
            found += [p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != ".perflow.lock"]
    return found


def probe_nan(r: Runner, work: Path) -> list[tuple]:
    out = work / "nan"
    code, msg = r.run(out, "--max_steps", "12", "--checkpoint_every", "2", "--keep_checkpoints", "2",
                      "--learning_rate", "1", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "10")
    kept = checkpoints(out)
    finite = [s for s in kept if all_finite(out / "checkpoints" / f"checkpoint-{s}")]
    exported = all_finite(out / "unet")
    outcome = (f"exit {code}; checkpoints {kept}, finite {finite}; unet exported: "
               f"{'no' if exported is None else ('finite' if exported else 'NaN')}; '{msg[:90]}'")
    ok = code != 0 and kept and finite == kept and exported is None
    return [("nan (lr 1, warm-up 10)", "exit != 0, last finite checkpoint kept, nothing NaN exported", outcome, ok)]


def probe_signal(r: Runner, work: Path, signum: int, reference: Path, total: int) -> list[tuple]:
    name = signal.Signals(signum).name
    out = work / name.lower()
    proc = r.start(out, "--max_steps", str(total), "--checkpoint_every", "2")
    if not wait_for_checkpoint(proc, out):
        proc.kill()
        return [(f"{name} mid-run", "", "run ended before its first checkpoint", False)]
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    saved = checkpoints(out)
    code2, msg2 = r.run(out, "--max_steps", str(total), "--checkpoint_every", "2", "--resume", "latest")
    equal = same_weights(out / "unet", reference / "unet")
    tb = "Traceback" in err
    outcome = (f"exit {proc.returncode} ({len(err.strip().splitlines())} stderr lines{', traceback' if tb else ''}), "
               f"checkpoints {saved}; resume exit {code2}; final = uninterrupted: {equal}")
    ok = proc.returncode == 128 + signum and not tb and code2 == 0 and equal is True
    return [(f"{name} mid-run, then resume", f"exit {128 + signum}, checkpoint, one line; resume exact", outcome, ok)]


def probe_double_sigint(r: Runner, work: Path) -> list[tuple]:
    out = work / "double-sigint"
    proc = r.start(out, "--max_steps", "1000", "--checkpoint_every", "2")
    if not wait_for_checkpoint(proc, out):
        proc.kill()
        return [("2 x SIGINT", "", "run ended early", False)]
    before = checkpoints(out)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    t0 = time.time()
    _, err = proc.communicate(timeout=300)
    outcome = (f"exit {proc.returncode} after {time.time() - t0:.2f} s, {len(err.strip().splitlines())} stderr lines, "
               f"checkpoints {before} -> {checkpoints(out)}")
    ok = proc.returncode == 130 and "Traceback" not in err
    return [("2 x SIGINT", "exit 130 at once, no traceback", outcome, ok)]


def probe_sigkill(r: Runner, work: Path, reference: Path, total: int, kills: int, rng: random.Random) -> list[tuple]:
    """Kill times: calibrated on one full run (start-up ``T0`` until the first checkpoint, then ``T1`` of
    training and export), each attempt is killed after ``U(T0 / 2, T0 + 3 T1 / kills)``, so the kills land
    in start-up, steps, checkpoint writes and (late on) the export, and the run needs all of them."""
    out = work / "sigkill"
    args = ("--max_steps", str(total), "--checkpoint_every", "2", "--resume", "latest")
    t0 = time.time()
    proc = r.start(out, *args)
    wait_for_checkpoint(proc, out)
    first = time.time() - t0
    proc.communicate(timeout=900)
    rest = time.time() - t0 - first
    shutil.rmtree(out)
    seen_leftovers, finished, steps = 0, [], []
    for _ in range(kills):
        proc = r.start(out, *args)
        t0, delay = time.time(), rng.uniform(first / 2, first + 3 * rest / kills)
        while time.time() - t0 < delay and proc.poll() is None:
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        else:
            finished.append(proc.returncode)
        proc.communicate(timeout=300)
        seen_leftovers += len(leftovers(out))
        steps.append(max(checkpoints(out), default=0))
    code, msg = r.run(out, *args)
    equal = same_weights(out / "unet", reference / "unet")
    outcome = (f"{kills} kills, newest checkpoint after each: {steps} ({len(finished)} runs ended first); leftovers "
               f"seen after the kills: {seen_leftovers}, after the last run: {len(leftovers(out))}; last exit {code}; "
               f"final = uninterrupted: {equal}")
    ok = code == 0 and equal is True and not leftovers(out)
    return [(f"SIGKILL x {kills} at random, resume", "final weights exact, no leftovers", outcome, ok)]


def probe_two_runs(r: Runner, work: Path) -> list[tuple]:
    rows = []
    out = work / "shared"
    first = r.start(out, "--max_steps", "1000", "--checkpoint_every", "2")
    wait_for_checkpoint(first, out)
    code, msg = r.run(out, "--max_steps", "4", "--checkpoint_every", "2", "--resume", "latest")
    rows.append(("2nd run while the 1st trains", "refused, naming folder and pid", f"exit {code}; '{msg[:100]}'",
                 code != 0 and "in use" in msg and str(first.pid) in msg))
    first.send_signal(signal.SIGKILL)
    first.communicate()
    code, msg = r.run(out, "--max_steps", "4", "--checkpoint_every", "2")
    rows.append(("new run into a used folder", "refused unless --resume/--overwrite", f"exit {code}; '{msg[:100]}'",
                 code != 0))
    code, msg = r.run(out, "--max_steps", str(max(checkpoints(out)) + 1), "--checkpoint_every", "2", "--resume", "latest")
    rows.append(("resume after the holder was killed", "stale lock taken over", f"exit {code}", code == 0))
    return rows


def probe_resume_changes(r: Runner, work: Path) -> list[tuple]:
    out = work / "changes"
    r.run(out, "--max_steps", "4", "--checkpoint_every", "2")
    rows = []
    for flag, value in (("--learning_rate", "1e-2"), ("--seed", "1"), ("--batch_size", "4"), ("--num_time_windows", "2")):
        code, msg = r.run(out, "--max_steps", "6", "--checkpoint_every", "2", "--resume", "latest", flag, value)
        rows.append((f"resume with {flag} {value}", "refused, naming the field",
                     f"exit {code}; '{msg.split('changed settings: ')[-1].split(';')[0][:80]}'",
                     code != 0 and flag.lstrip("-") in msg))
    code, msg = r.run(out, "--max_steps", "6", "--checkpoint_every", "2", "--resume", "latest", "--log_every", "3")
    summary = json.loads((out / "perflow_training.json").read_text()) if (out / "perflow_training.json").is_file() else {}
    rec = summary.get("config", {})
    recorded = rec.get("training", {}).get("max_steps") == 6 and rec.get("output", {}).get("log_every") == 3
    rows.append(("resume with --max_steps 6 --log_every 3", "accepted, recorded", f"exit {code}; recorded: {recorded}",
                 code == 0 and recorded))
    return rows


def probe_truncated(r: Runner, work: Path) -> list[tuple]:
    out = work / "truncated"
    r.run(out, "--max_steps", "4", "--checkpoint_every", "2")
    newest = out / "checkpoints" / f"checkpoint-{max(checkpoints(out))}" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    proc = r.start(out, "--max_steps", "6", "--checkpoint_every", "2", "--resume", "latest")
    o, err = proc.communicate(timeout=900)
    said = next((ln for ln in o.splitlines() if "instead" in ln), "")
    return [("newest checkpoint truncated, resume", "falls back to the newest intact one, says so",
             f"exit {proc.returncode}; '{said[:100] or last_line(err)[:100]}'", proc.returncode == 0 and bool(said))]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]), help="checkout whose perflow is probed")
    p.add_argument("--kills", type=int, default=10, help="SIGKILLs in the kill probe")
    p.add_argument("--steps", type=int, default=40, help="steps of the signal and kill probes")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    p.add_argument("--work-dir", default=None, help="where the runs go (default: a temporary folder, removed)")
    p.add_argument("--only", default=None, help="comma list of probes: nan,signals,kill,two-runs,changes,truncated")
    args = p.parse_args(argv)

    r = Runner(Path(args.repo).resolve())
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="perflow-probe-"))
    only = set(args.only.split(",")) if args.only else None
    want = lambda name: only is None or name in only  # noqa: E731
    rows: list[tuple] = []
    t0 = time.time()
    try:
        reference = work / "reference"
        if want("signals") or want("kill"):
            r.run(reference, "--max_steps", str(args.steps), "--checkpoint_every", "0")
        if want("nan"):
            rows += probe_nan(r, work)
        if want("signals"):
            rows += probe_signal(r, work, signal.SIGTERM, reference, args.steps)
            rows += probe_signal(r, work, signal.SIGINT, reference, args.steps)
            rows += probe_double_sigint(r, work)
        if want("kill"):
            rows += probe_sigkill(r, work, reference, args.steps, args.kills, random.Random(args.seed))
        if want("two-runs"):
            rows += probe_two_runs(r, work)
        if want("changes"):
            rows += probe_resume_changes(r, work)
        if want("truncated"):
            rows += probe_truncated(r, work)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nperflow at {args.repo}; {time.time() - t0:.0f} s\n")
    print("| probe | wanted | outcome | ok |")
    print("| --- | --- | --- | --- |")
    for probe, wanted, outcome, ok in rows:
        print(f"| {probe} | {wanted} | {outcome.replace('|', '/')} | {'yes' if ok else '**no**'} |")


if __name__ == "__main__":
    main()
