"""Probe ``perflow delta`` / ``perflow eval`` / ``perflow demo`` with bad input and classify what happens.

Each case runs ``python -m perflow ...`` as a subprocess in a scratch folder of tiny models built
from config (no download) and is classified as

- **clean error**: exit status != 0, no ``Traceback`` and exactly one ``error:`` line on stderr
  (a progress bar before it is allowed);
- **traceback**: a Python traceback on stderr;
- **unclear error**: exit status != 0 without a traceback but not one ``error:`` line;
- **wrongly accepted**: exit status 0 for input that must be refused;
- **warned** / **silently accepted**: for the cases that must be accepted with a warning
  (a merge into a model whose config differs from the delta's teacher), exit 0 with or
  without a ``warning:`` line naming the difference.

Read-only and full-disk cases mount a 64 kB tmpfs in a private mount namespace
(``unshare -m``, as root); they are skipped where that is not possible.

    python benchmarks/probe_bad_input.py                   # probe this checkout
    python benchmarks/probe_bad_input.py --perflow-path /other/checkout --jobs 2 --output probe.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1] / "src"  # this checkout's package root (src layout)
sys.path.insert(0, str(REPO))  # the fixtures are built with this checkout's perflow


@dataclass
class Case:
    name: str
    argv: list
    expect: str = "error"  # "error": must be refused; "warning": accepted with a warning line
    mount: str | None = None  # "ro" or "full": the output lives on a tiny tmpfs mounted so
    timeout: int = 240


@dataclass
class Outcome:
    case: Case
    status: str
    rc: int | None
    line: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- fixtures


def _garbage(path: Path, n: int = 300) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(0).randbytes(n))
    return path


def _truncated(good: Path, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _empty(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def build_fixtures(root: Path) -> dict[str, Path]:
    """Tiny models, deltas and damaged copies of them under ``root``."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from perflow.delta import base_model_info, extract_delta, save_delta
    from perflow.scheduler import PeRFlowScheduler
    from perflow.tiny import tiny_sd15_unet
    from perflow.training.teachers import load_teacher
    from perflow.tiny import tiny_class_teacher

    f: dict[str, Path] = {}
    teacher = tiny_sd15_unet(0)
    student = tiny_sd15_unet(0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=g))
    f["unet"] = root / "unet"
    teacher.save_pretrained(f["unet"])
    f["student_unet"] = root / "student_unet"
    student.save_pretrained(f["student_unet"])
    delta = extract_delta(student, teacher)
    meta = {"base_model": base_model_info(teacher), "num_time_windows": 4, "prediction_type": "diff_eps",
            "scheduler_config": dict(PeRFlowScheduler(prediction_type="diff_eps").config)}
    f["delta"] = save_delta(delta, root / "delta.safetensors", meta)
    weights = f["unet"] / "diffusion_pytorch_model.safetensors"

    f["delta_pt"] = root / "delta.pt"
    shutil.copy(f["delta"], f["delta_pt"])
    f["empty"] = _empty(root / "empty.safetensors")
    f["truncated"] = _truncated(f["delta"], root / "truncated.safetensors")
    f["garbage"] = _garbage(root / "garbage.safetensors")
    f["ckpt"] = _garbage(root / "model.ckpt")
    f["bin"] = _garbage(root / "delta.bin")

    f["unet_corrupt"] = root / "unet_corrupt"
    shutil.copytree(f["unet"], f["unet_corrupt"])
    _truncated(weights, f["unet_corrupt"] / "diffusion_pytorch_model.safetensors")
    f["unet_noweights"] = root / "unet_noweights"
    f["unet_noweights"].mkdir()
    shutil.copy(f["unet"] / "config.json", f["unet_noweights"] / "config.json")
    f["unet_badconfig"] = root / "unet_badconfig"
    shutil.copytree(f["unet"], f["unet_badconfig"])
    (f["unet_badconfig"] / "config.json").write_text("{not json")
    f["unet_small"] = root / "unet_small"
    tiny_sd15_unet(0, cross_attention_dim=16).save_pretrained(f["unet_small"])
    config = {k: v for k, v in teacher.config.items() if not k.startswith("_")}
    f["unet_gelu"] = root / "unet_gelu"
    UNet2DConditionModel.from_config({**config, "act_fn": "gelu", "norm_eps": 1e-6}).save_pretrained(f["unet_gelu"])

    nan = dict(delta)
    nan["conv_in.weight"] = nan["conv_in.weight"].clone()
    nan["conv_in.weight"][0, 0, 0, 0] = float("nan")
    f["delta_nan"] = save_delta(nan, root / "delta_nan.safetensors", meta)
    f["kohya"] = root / "kohya.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3),
               "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 2, 1, 1)}, str(f["kohya"]))

    f["released2"] = root / "released2"
    as_unet = tiny_sd15_unet(0)
    as_unet.load_state_dict(delta)
    as_unet.save_pretrained(f["released2"] / "unet")
    as_unet.half().save_pretrained(f["released2"] / "unet", variant="fp16")

    f["student_badsched"] = root / "student_badsched"
    shutil.copytree(f["student_unet"], f["student_badsched"] / "unet")
    (f["student_badsched"] / "scheduler").mkdir()
    (f["student_badsched"] / "scheduler" / "scheduler_config.json").write_text("[1, 2")

    # cases that, wrongly accepted, would write into or delete the model get their own copies
    f["unet_nest"] = root / "nest" / "unet"
    shutil.copytree(f["unet"], f["unet_nest"])
    f["unet_holder"] = root / "holder"
    shutil.copytree(f["unet"], f["unet_holder"] / "unet")

    f["file"] = root / "a-regular-file"
    f["file"].write_text("not a folder")
    f["existing_out"] = root / "existing_out"
    f["existing_out"].mkdir()

    # class-conditional teachers and students for eval/demo
    def class_folder(path: Path, safe: bool = True) -> Path:
        tiny = tiny_class_teacher()
        tiny.unet.save_pretrained(path / "unet", safe_serialization=safe)
        tiny.label_encoder.save_pretrained(path / "label_encoder")
        (path / "scheduler").mkdir(parents=True)
        (path / "scheduler" / "scheduler_config.json").write_text(json.dumps({
            "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "set_alpha_to_one": False, "prediction_type": "epsilon"}))
        return path

    f["teacher_corrupt"] = class_folder(root / "teacher_corrupt")
    tw = f["teacher_corrupt"] / "unet" / "diffusion_pytorch_model.safetensors"
    _truncated(tw, tw)
    f["teacher_bin"] = class_folder(root / "teacher_bin", safe=False)

    def student_folder(path: Path, unet) -> Path:
        unet.save_pretrained(path / "unet")
        PeRFlowScheduler(prediction_type="diff_eps", num_time_windows=4).save_pretrained(path / "scheduler")
        return path

    digits = load_teacher("digits")
    f["student_other_keys"] = student_folder(root / "student_other_keys", tiny_class_teacher().unet)
    dconf = {k: v for k, v in digits.unet.config.items() if not k.startswith("_")}
    mish = UNet2DConditionModel.from_config({**dconf, "act_fn": "mish"})
    mish.load_state_dict(digits.unet.state_dict())
    f["student_other_act"] = student_folder(root / "student_other_act", mish)
    f["teacher_as_student"] = class_folder(root / "teacher_as_student")
    return f


def cases(f: dict[str, Path], out: Path) -> list[Case]:
    """The bad inputs; ``out`` is a fresh output location per case (never created beforehand)."""
    merge = ["delta", "merge", "--delta", f["delta"], "--into", f["unet"]]
    eval_small = ["--num-samples", "20", "--steps", "1", "--reference-steps", "2", "--baselines", "ddim", "--no-progress"]
    lora = ["delta", "to-lora", "--delta", f["delta"], "--rank", "2"]
    return [
        # perflow delta merge
        Case("merge: --delta missing", ["delta", "merge", "--delta", out / "nope.safetensors", "--into", f["unet"], "-o", out]),
        Case("merge: --delta not .safetensors (.pt)", ["delta", "merge", "--delta", f["delta_pt"], "--into", f["unet"], "-o", out]),
        Case("merge: --delta empty file", ["delta", "merge", "--delta", f["empty"], "--into", f["unet"], "-o", out]),
        Case("merge: --delta truncated", ["delta", "merge", "--delta", f["truncated"], "--into", f["unet"], "-o", out]),
        Case("merge: --delta garbage", ["delta", "merge", "--delta", f["garbage"], "--into", f["unet"], "-o", out]),
        Case("merge: --extra truncated", [*merge, "--extra", f["truncated"], "-o", out]),
        Case("merge: --extra repeats the delta's keys", [*merge, "--extra", f["delta"], "-o", out]),
        Case("merge: --delta holds NaN", ["delta", "merge", "--delta", f["delta_nan"], "--into", f["unet"], "-o", out]),
        Case("merge: --delta is a kohya LoRA", ["delta", "merge", "--delta", f["kohya"], "--into", f["unet"], "-o", out]),
        Case("merge: --into missing", ["delta", "merge", "--delta", f["delta"], "--into", out / "nope", "-o", out]),
        Case("merge: --into folder, truncated weights", ["delta", "merge", "--delta", f["delta"], "--into", f["unet_corrupt"], "-o", out]),
        Case("merge: --into folder without weights", ["delta", "merge", "--delta", f["delta"], "--into", f["unet_noweights"], "-o", out]),
        Case("merge: --into folder, config.json not JSON", ["delta", "merge", "--delta", f["delta"], "--into", f["unet_badconfig"], "-o", out]),
        Case("merge: --into single file, garbage", ["delta", "merge", "--delta", f["delta"], "--into", f["garbage"], "-o", out / "m.safetensors"]),
        Case("merge: --into .ckpt (pickle)", ["delta", "merge", "--delta", f["delta"], "--into", f["ckpt"], "-o", out / "m.safetensors"]),
        Case("merge: --into other shapes", ["delta", "merge", "--delta", f["delta"], "--into", f["unet_small"], "-o", out]),
        Case("merge: --into other config (act_fn, norm_eps)", ["delta", "merge", "--delta", f["delta"], "--into", f["unet_gelu"], "-o", out],
             expect="warning"),
        Case("merge: --scale nan", [*merge, "-o", out, "--scale", "nan"]),
        Case("merge: --scale inf", [*merge, "-o", out, "--scale=inf"]),
        Case("merge: --scale abc", [*merge, "-o", out, "--scale", "abc"]),
        Case("merge: -o inside --into", ["delta", "merge", "--delta", f["delta"], "--into", f["unet_nest"], "-o", f["unet_nest"] / "merged"]),
        Case("merge: -o holds --into (--overwrite)", ["delta", "merge", "--delta", f["delta"], "--into", f["unet_holder"] / "unet",
                                                      "-o", f["unet_holder"], "--overwrite"]),
        Case("merge: -o below a regular file", [*merge, "-o", f["file"] / "out"]),
        Case("merge: -o exists (no --overwrite)", [*merge, "-o", f["existing_out"]]),
        Case("merge: -o .safetensors for a folder model", [*merge, "-o", out / "m.safetensors"]),
        Case("merge: single file -o folder", ["delta", "merge", "--delta", f["delta"], "--into", f["delta"], "-o", out]),
        Case("merge: --variant on a single-file delta", [*merge, "-o", out, "--variant", "fp16"]),
        Case("merge: two-variant delta folder, no --variant", ["delta", "merge", "--delta", f["released2"], "--into", f["unet"], "-o", out]),
        Case("merge: --variant not in folder", ["delta", "merge", "--delta", f["released2"], "--variant", "bf16", "--into", f["unet"], "-o", out]),
        Case("merge: --unet-config missing", ["delta", "merge", "--delta", f["delta"], "--into", f["garbage"], "-o", out / "m.safetensors",
                                              "--unet-config", out / "nope.json"]),
        Case("merge: -o on a read-only mount", [*merge, "-o", "{mnt}/out"], mount="ro"),
        Case("merge: disk full", [*merge, "-o", "{mnt}/out"], mount="full"),
        # perflow delta extract
        Case("extract: --student missing", ["delta", "extract", "--student", out / "nope", "--teacher", f["unet"], "-o", out / "d.safetensors"]),
        Case("extract: other architectures", ["delta", "extract", "--student", f["unet_small"], "--teacher", f["unet"], "-o", out / "d.safetensors",
                                              "--num-time-windows", "4", "--prediction-type", "diff_eps"]),
        Case("extract: -o .pt", ["delta", "extract", "--student", f["student_unet"], "--teacher", f["unet"], "-o", out / "d.pt",
                                 "--num-time-windows", "4", "--prediction-type", "diff_eps"]),
        Case("extract: no PeRFlow scheduler, no flags", ["delta", "extract", "--student", f["student_unet"], "--teacher", f["unet"],
                                                         "-o", out / "d.safetensors"]),
        Case("extract: --window-boundaries not decreasing", ["delta", "extract", "--student", f["student_unet"], "--teacher", f["unet"],
                                                             "-o", out / "d.safetensors", "--prediction-type", "diff_eps",
                                                             "--window-boundaries", "1,0.3,0.6,0"]),
        Case("extract: --num-time-windows 0", ["delta", "extract", "--student", f["student_unet"], "--teacher", f["unet"],
                                               "-o", out / "d.safetensors", "--prediction-type", "diff_eps", "--num-time-windows", "0"]),
        Case("extract: student scheduler_config.json not JSON", ["delta", "extract", "--student", f["student_badsched"], "--teacher", f["unet"],
                                                                 "-o", out / "d.safetensors"]),
        Case("extract: truncated student weights", ["delta", "extract", "--student", f["unet_corrupt"], "--teacher", f["unet"],
                                                    "-o", out / "d.safetensors", "--num-time-windows", "4", "--prediction-type", "diff_eps"]),
        # perflow delta to-lora
        Case("to-lora: -o .pt", [*lora, "-o", out / "l.pt"]),
        Case("to-lora: --rest .bin", [*lora, "-o", out / "l.safetensors", "--rest", out / "r.bin"]),
        Case("to-lora: --rank 0", ["delta", "to-lora", "--delta", f["delta"], "--rank", "0", "-o", out / "l.safetensors"]),
        Case("to-lora: --rank -3", ["delta", "to-lora", "--delta", f["delta"], "--rank=-3", "-o", out / "l.safetensors"]),
        Case("to-lora: --delta truncated", ["delta", "to-lora", "--delta", f["truncated"], "--rank", "2", "-o", out / "l.safetensors"]),
        Case("to-lora: -o below a regular file", [*lora, "-o", f["file"] / "l.safetensors"]),
        Case("to-lora: disk full", ["delta", "to-lora", "--delta", f["delta"], "--rank", "4", "-o", "{mnt}/l.safetensors"], mount="full"),
        # perflow delta info
        Case("info: missing", ["delta", "info", out / "nope.safetensors"]),
        Case("info: truncated", ["delta", "info", f["truncated"]]),
        Case("info: empty", ["delta", "info", f["empty"]]),
        Case("info: a folder that is no delta", ["delta", "info", f["existing_out"]]),
        Case("info: a .bin file", ["delta", "info", f["bin"]]),
        Case("info: two-variant folder, no --variant", ["delta", "info", f["released2"]]),
        # perflow eval
        Case("eval: --output-dir below a regular file", ["eval", "--task", "toy2d", "--toy-steps", "1", "--num-samples", "2",
                                                         "--steps", "1", "--reference-steps", "2", "--output-dir", f["file"] / "r"]),
        Case("eval: --output-dir on a read-only mount", ["eval", "--task", "toy2d", "--toy-steps", "1", "--num-samples", "2",
                                                         "--steps", "1", "--reference-steps", "2", "--output-dir", "{mnt}/r"], mount="ro"),
        Case("eval: --perflow missing", ["eval", "--perflow", out / "nope", *eval_small]),
        Case("eval: student of another architecture", ["eval", "--perflow", f["student_other_keys"], *eval_small]),
        Case("eval: student of another config (act_fn)", ["eval", "--perflow", f["student_other_act"], *eval_small]),
        Case("eval: a teacher folder as --perflow", ["eval", "--perflow", f["teacher_as_student"], *eval_small]),
        Case("eval: --teacher missing", ["eval", "--teacher", out / "nope", *eval_small]),
        Case("eval: --teacher truncated weights", ["eval", "--teacher", f["teacher_corrupt"], *eval_small]),
        Case("eval: --teacher pickled .bin weights", ["eval", "--teacher", f["teacher_bin"], *eval_small]),
        Case("eval: --classifier missing", ["eval", "--classifier", out / "nope", *eval_small]),
        Case("eval: --steps 0", ["eval", "--steps", "0", "--num-samples", "20"]),
        Case("eval: --num-samples 1", ["eval", "--num-samples", "1"]),
        Case("eval: --baselines foo", ["eval", "--baselines", "foo", "--num-samples", "20", "--steps", "1", "--reference-steps", "2"]),
        Case("eval: --reference-steps below --steps", ["eval", "--steps", "4", "--reference-steps", "2", "--num-samples", "20"]),
        Case("eval: --task images without --prompts", ["eval", "--task", "images", "--teacher", f["unet"]]),
        Case("eval: --guidance-scale nan", ["eval", "--guidance-scale", "nan", *eval_small]),
        # perflow demo
        Case("demo: --output-dir below a regular file", ["demo", "--quick", "--output-dir", f["file"] / "demo"]),
        Case("demo: --output-dir on a read-only mount", ["demo", "--quick", "--output-dir", "{mnt}/demo"], mount="ro"),
        Case("demo: --max-steps 0", ["demo", "--quick", "--max-steps", "0", "--output-dir", out]),
        Case("demo: --threads 0", ["demo", "--quick", "--threads", "0", "--output-dir", out]),
        Case("demo: --teacher missing", ["demo", "--quick", "--teacher", out / "nope", "--output-dir", out]),
        Case("demo: --teacher truncated weights", ["demo", "--quick", "--teacher", f["teacher_corrupt"], "--output-dir", out]),
        Case("demo: --guidance-scale nan", ["demo", "--quick", "--guidance-scale", "nan", "--output-dir", out]),
    ]


# ----------------------------------------------------------------------------- running and classifying


def _can_mount(scratch: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    mnt = scratch / "probe-mount"
    mnt.mkdir(exist_ok=True)
    res = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {mnt}"], capture_output=True)
    return res.returncode == 0


def run_case(case: Case, scratch: Path, perflow_path: Path, can_mount: bool) -> Outcome:
    if case.mount and not can_mount:
        return Outcome(case, "skipped", None, "needs unshare -m and tmpfs mounts")
    mnt = scratch / "mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    argv = [str(a).replace("{mnt}", str(mnt)) for a in case.argv]
    cmd = [sys.executable, "-m", "perflow", *argv]
    if case.mount:
        options = "ro" if case.mount == "ro" else "rw"
        quoted = " ".join("'" + c.replace("'", "'\\''") + "'" for c in cmd)
        cmd = ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o {options},size=64k tmpfs {mnt} && exec {quoted}"]
    env = {**os.environ, "PYTHONPATH": str(perflow_path), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "error"}
    start = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=scratch, timeout=case.timeout)
    except subprocess.TimeoutExpired:
        return Outcome(case, "timeout", None, f"still running after {case.timeout} s", time.perf_counter() - start)
    seconds = time.perf_counter() - start
    return classify(case, res.returncode, res.stderr, seconds)


def classify(case: Case, rc: int, stderr: str, seconds: float) -> Outcome:
    errors = [line.strip() for line in stderr.splitlines() if "error:" in line]
    warns = [line.strip() for line in stderr.splitlines() if "warning:" in line.lower()]
    if "Traceback (most recent call last)" in stderr:
        last = [line for line in stderr.strip().splitlines() if line.strip()][-1:] or [""]
        return Outcome(case, "traceback", rc, last[0].strip(), seconds)
    if rc == 0:
        if case.expect == "warning":
            return Outcome(case, "warned" if warns else "silently accepted", rc, (warns or [""])[0], seconds)
        return Outcome(case, "wrongly accepted", rc, "exit 0", seconds)
    if len(errors) == 1:
        return Outcome(case, "clean error", rc, errors[0], seconds)
    return Outcome(case, "unclear error", rc, " / ".join(stderr.strip().splitlines()[-2:]), seconds)


def markdown(outcomes: list[Outcome]) -> str:
    rows = ["| # | case | outcome | exit | s | message |", "| --- | --- | --- | --- | --- | --- |"]
    for i, o in enumerate(outcomes, 1):
        msg = o.line.replace("|", "\\|")
        msg = msg if len(msg) <= 160 else msg[:157] + "..."
        rc = "" if o.rc is None else str(o.rc)
        rows.append(f"| {i} | {o.case.name} | {o.status} | {rc} | {o.seconds:.1f} | {msg} |")
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    order = ["clean error", "warned", "traceback", "unclear error", "wrongly accepted", "silently accepted",
             "timeout", "skipped"]
    summary = ", ".join(f"{k}: {counts[k]}" for k in order if k in counts)
    return "\n".join(rows) + f"\n\n{len(outcomes)} cases: {summary}\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--perflow-path", default=str(REPO), help="folder holding the perflow package the subprocesses import (PYTHONPATH): a checkout's src/, or an older checkout's root")
    p.add_argument("--jobs", type=int, default=2, help="cases run at once")
    p.add_argument("--only", default=None, help="run only the cases whose name contains this text")
    p.add_argument("--output", default=None, help="also write the table and counts to this Markdown file")
    args = p.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="perflow-probe-"))
    try:
        fixtures = build_fixtures(scratch / "fixtures")
        can_mount = _can_mount(scratch)
        todo = []
        for i, case in enumerate(cases(fixtures, Path("{out}"))):
            if args.only and args.only not in case.name:
                continue
            out = scratch / "outputs" / f"case{i:02d}"
            out.parent.mkdir(parents=True, exist_ok=True)
            case.argv = [str(a).replace("{out}", str(out)) for a in case.argv]
            todo.append((case, scratch / "runs" / f"case{i:02d}"))
        for _, folder in todo:
            folder.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            outcomes = list(pool.map(lambda t: run_case(t[0], t[1], Path(args.perflow_path), can_mount), todo))
        text = markdown(outcomes)
        print(text)
        if args.output:
            Path(args.output).write_text(f"perflow bad-input probe ({args.perflow_path})\n\n" + text)
        bad = sum(o.status in ("traceback", "unclear error", "wrongly accepted", "silently accepted", "timeout")
                  for o in outcomes)
        return 1 if bad else 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
