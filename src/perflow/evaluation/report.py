"""Results as JSON and a Markdown table (written atomically), with the command that made them."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from perflow.io import write_text

from .harness import EvalResult

COLUMNS = (
    ("sampler", "sampler", "{}"),
    ("steps", "steps", "{}"),
    ("nfe", "model evals", "{}"),
    ("fd", "FD to real (lower)", "{:.3f}"),
    ("paired_mse", "MSE to teacher ref (lower)", "{:.4f}"),
    ("paired_mse_p50", "its median", "{:.4f}"),
    ("paired_mse_p99", "its p99", "{:.4f}"),
    ("sw", "sliced W2 to data (lower)", "{:.4f}"),
    ("sw_ref", "sliced W2 to teacher ref (lower)", "{:.4f}"),
    ("sw_ref_se", "±", "{:.4f}"),
    ("sw_real", "sliced W2 to real (lower)", "{:.4f}"),
    ("fd_ref", "FD to teacher ref (lower)", "{:.3f}"),
    ("accuracy", "label accuracy", "{:.3f}"),
    ("clip_score", "CLIP score", "{:.2f}"),
    ("spacing", "timestep spacing", "{}"),
)
VERDICT_METRICS = ("fd", "paired_mse", "sw", "sw_ref", "sw_real", "fd_ref")
"""Columns (lower is better) the findings compare PeRFlow with the baselines on."""


def command_line(argv: list[str] | None = None, program: str | None = None) -> str:
    """The command that is running, quoted for a shell.

    ``program`` + ``argv`` when given (the CLI passes ``"perflow"`` and its arguments), else
    ``sys.argv`` (with ``perflow`` for the installed entry point or ``python -m perflow``)."""
    if program is not None:
        argv = [program, *(argv or [])]
    else:
        argv = list(sys.argv if argv is None else argv)
        if argv and Path(argv[0]).name in ("perflow", "__main__.py"):
            argv[0] = "perflow"
    return " ".join(shlex.quote(a) for a in argv)


def _fmt(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def markdown_table(rows: list[dict]) -> str:
    """A Markdown table of ``rows`` (reference first, then by steps); columns no row has are left out."""
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    head = "| " + " | ".join(title for _, title, _ in cols) + " |"
    sep = "| " + " | ".join("---" for _ in cols) + " |"
    ordered = sorted(rows, key=lambda r: (r["kind"] != "reference", r["steps"]))
    body = ["| " + " | ".join(_fmt(r, k, f) for k, _, f in cols) + " |" for r in ordered]
    return "\n".join([head, sep, *body])


def straightness_table(meta: dict) -> str:
    """Markdown table of the flows' straightness (``meta["straightness"]``), or ``""``."""
    entries = meta.get("straightness")
    if not entries:
        return ""
    windows = ", ".join(f"{b:g}" for b in meta.get("straightness_windows", []))
    lines = [
        f"| flow (sampled with) | straightness, whole range | straightness within windows [{windows}] |",
        "| --- | --- | --- |",
    ]
    for name, v in entries.items():
        lines.append(f"| {name} | {v['whole_range']:.4f} | {v['within_windows']:.4f} |")
    return "\n".join(lines)


def verdicts(result: EvalResult) -> list[str]:
    """Plain statements answering: does PeRFlow at 4 steps beat every baseline on both metrics,
    and does it improve from 4 to 8 steps? (Only for the step counts that were run.)"""
    rows = result.rows
    lines = []
    perflow = sorted({r["sampler"] for r in rows if r["kind"] == "perflow"})
    others = sorted({r["sampler"] for r in rows if r["kind"] in ("baseline", "reflow")})
    for p in perflow:
        for n in sorted({r["steps"] for r in rows if r["sampler"] == p}):
            pr = result.row(p, n)
            for metric in VERDICT_METRICS:
                if metric not in pr:
                    continue
                worse = [o for o in others if _has(result, o, n, metric) and result.row(o, n)[metric] <= pr[metric]]
                if worse:
                    lines.append(
                        f"{p} at {n} steps: {metric} {pr[metric]:.4g} is NOT better than "
                        + ", ".join(f"{o} ({result.row(o, n)[metric]:.4g}{_paired(result, p, o, n, metric)})" for o in worse)
                    )
                else:
                    rivals = [o for o in others if _has(result, o, n, metric)]
                    closest = min(rivals, key=lambda o: result.row(o, n)[metric]) if rivals else None
                    paired = _paired(result, p, closest, n, metric) if closest else ""
                    margin = f" (closest: {closest} {result.row(closest, n)[metric]:.4g}{paired})" if paired else ""
                    lines.append(f"{p} at {n} steps: {metric} {pr[metric]:.4g} is better than every baseline at {n} model evaluations{margin}")
        if _has(result, p, 4, "paired_mse") and _has(result, p, 8, "paired_mse"):
            a, b = result.row(p, 4), result.row(p, 8)
            for metric in [m for m in VERDICT_METRICS if m in a and m in b]:
                trend = "improves" if b[metric] < a[metric] else "does NOT improve"
                lines.append(f"{p} {trend} from 4 to 8 steps on {metric}: {a[metric]:.4g} -> {b[metric]:.4g}")
    return lines


def _paired(result: EvalResult, sampler: str, other: str, steps: int, metric: str) -> str:
    """``"; difference +0.0011 ± 0.0004 over 256 paired samples"`` for a paired-MSE comparison whose per-sample
    errors were kept (:func:`perflow.evaluation.metrics.paired_difference`), else ``""``."""
    a, b = (result.paired_errors.get(f"{s}@{steps}") for s in (sampler, other))
    if metric != "paired_mse" or a is None or b is None or a.shape != b.shape:
        return ""
    from .metrics import paired_difference

    d, se = paired_difference(a, b)
    return f"; difference {d:+.2g} ± {se:.2g} over {a.numel()} paired samples"


def _has(result: EvalResult, sampler: str, steps: int, metric: str) -> bool:
    try:
        return metric in result.row(sampler, steps)
    except KeyError:
        return False


def markdown_report(result: EvalResult, title: str = "PeRFlow evaluation") -> str:
    """Title, command, setting, the table and the verdicts."""
    meta = result.meta
    cfg = meta.get("config", {})
    lines = [f"# {title}", "", "Produced by:", "", "```", meta.get("command", ""), "```", ""]
    setting = []
    if cfg:
        labels = "balanced labels, " if "fd_real_train_vs_test" in meta else ""
        setting.append(
            f"{cfg.get('num_samples')} samples ({labels}seed {cfg.get('seed')}), "
            f"guidance scale {cfg.get('guidance_scale')}, reference: teacher DDIM {meta.get('reference_steps')} steps; "
            "the same initial noise and condition for every sampler."
        )
    if "fd_real_train_vs_test" in meta:
        setting.append(
            f"FD floor (real train digits vs the {meta.get('num_real_reference')} held-out digits): "
            f"{meta['fd_real_train_vs_test']:.3f}; digit classifier held-out accuracy: {meta['classifier_test_accuracy']:.4f}."
        )
    for extra in meta.get("notes", []):
        setting.append(extra)
    lines += setting + ["", markdown_table(result.rows), ""]
    st = straightness_table(meta)
    if st:
        lines += [
            "Flow straightness (0 = straight at constant speed, i.e. one Euler step per segment is exact; "
            "fine trajectories of each model's own flow):", "", st, "",
        ]
    v = verdicts(result)
    if v:
        lines += ["Findings:", ""] + [f"- {s}" for s in v] + [""]
    return "\n".join(lines)


def write_results(result: EvalResult, json_path: str | Path, md_path: str | Path | None = None, title: str = "PeRFlow evaluation") -> None:
    """Write ``result`` as JSON (and a Markdown report), each atomically."""
    write_text(json_path, json.dumps(result.to_json_dict(), indent=2, sort_keys=False) + "\n")
    if md_path is not None:
        write_text(md_path, markdown_report(result, title))
