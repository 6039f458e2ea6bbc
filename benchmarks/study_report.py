"""Summarise the recipe study: curves, the budget figure per teacher, and a Markdown table.

Reads the JSON lines that ``benchmarks/recipe_study.py --out FILE`` appends (one row per evaluation:
teacher, tag, step, CPU-thread seconds of training so far, paired MSE and sliced Wasserstein at 4 and
8 steps, and the best training-free solver per step count measured on the same noise) and writes:

- ``<out>.md``: for each (teacher, tag), the last evaluation, the best solver at 4 and 8 steps, the
  first evaluated step (and training seconds) at which the student at 4 steps beats every 4-step
  solver on paired MSE *and* on sliced Wasserstein, and whether its 8-step paired MSE came within
  1.5x of the best 8-step solver's;
- ``<out>_curves.png``: paired MSE at 4 and 8 steps against training steps and against training
  seconds, one panel row per teacher, the best solver as a dashed line.

Example (the committed study, docs/study.md)::

    python benchmarks/study_report.py benchmarks/results/study.jsonl --out benchmarks/results/study
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from recipe_study import best_baseline


def load_rows(paths: list[str]) -> list[dict]:
    """Rows of every file; ``cpu_s`` (CPU seconds of training) falls back to ``train_s`` (wall-clock) in rows
    written before the study recorded CPU time."""
    rows = []
    for p in paths:
        for line in Path(p).read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                row["cpu_measured"] = "cpu_s" in row
                row.setdefault("cpu_s", row["train_s"])
                rows.append(row)
    return rows


def best_solver(row: dict, steps: int, metric: str) -> tuple[str, float]:
    """(solver, value) of the best training-free solver at ``steps`` on ``metric`` (mse or swd) of a row."""
    name, best = best_baseline(row["baselines"], steps, metric)
    return name, best[metric]


def budget(curve: list[dict]) -> dict:
    """The first evaluation at which 4 steps beat every 4-step solver on both metrics, and the 8-step ratio."""
    first = None
    for r in curve:
        if r["mse@4"] < best_solver(r, 4, "mse")[1] and r["swd@4"] < best_solver(r, 4, "swd")[1]:
            first = r
            break
    last = curve[-1]
    ratio8 = last["mse@8"] / best_solver(last, 8, "mse")[1]
    best8 = min(curve, key=lambda r: r["mse@8"])
    return dict(first=first, last=last, ratio8=ratio8, best_ratio8=best8["mse@8"] / best_solver(best8, 8, "mse")[1],
                best8_step=best8["step"])


def curves(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        out[(r["teacher"], r["tag"])].append(r)
    return {k: sorted(v, key=lambda r: r["step"]) for k, v in out.items()}


def table(groups: dict[tuple[str, str], list[dict]], command: str) -> str:
    lines = [
        "# Recipe study",
        "",
        f"Made by `{command}` from rows of `benchmarks/recipe_study.py` (commands in docs/study.md).",
        "Paired MSE / sliced Wasserstein (SW) to the teacher's 100-step DDIM output from the same noise and labels, "
        "256 samples. Solvers: DDIM, DPM-Solver++ 2M, UniPC, each at its best timestep spacing. "
        "'beats @4' is the first evaluated step at which PeRFlow at 4 steps is below every 4-step solver on both "
        "paired MSE and SW (training CPU seconds on one thread in brackets; CPU s is the process's CPU time in training steps, or the wall-clock time where a row predates CPU timing); '8 / best' is the 8-step paired MSE "
        "over the best 8-step solver's (target <= 1.5).",
        "",
        "| teacher | tag | steps | CPU s | MSE@4 | best solver MSE@4 | SW@4 | best solver SW@4 | beats @4 | MSE@8 | best solver MSE@8 | 8 / best |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (teacher, tag), c in sorted(groups.items()):
        b = budget(c)
        last = b["last"]
        s4, m4 = best_solver(last, 4, "mse")
        w4n, w4 = best_solver(last, 4, "swd")
        s8, m8 = best_solver(last, 8, "mse")
        first = b["first"]
        unit = "s" if last["cpu_measured"] else "s wall"
        beat = f"{first['step']} ({first['cpu_s']:.0f} {unit})" if first else "no"
        lines.append(
            f"| {teacher} | {tag} | {last['step']} | {last['cpu_s']:.0f}{'' if last['cpu_measured'] else ' (wall)'} | {last['mse@4']:.5f} | {m4:.5f} ({s4}) | "
            f"{last['swd@4']:.4f} | {w4:.4f} ({w4n}) | {beat} | {last['mse@8']:.5f} | {m8:.5f} ({s8}) | {b['ratio8']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(groups: dict[tuple[str, str], list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teachers = sorted({t for t, _ in groups})
    fig, axes = plt.subplots(len(teachers), 4, figsize=(24, 3.8 * len(teachers)), squeeze=False)
    colours = plt.get_cmap("tab20").colors
    for i, teacher in enumerate(teachers):
        tags = sorted(tag for t, tag in groups if t == teacher)
        for n, tag in enumerate(tags):  # one colour and line style per row of this teacher, the same in all 4 panels
            c = groups[(teacher, tag)]
            style = dict(color=colours[n % len(colours)], ls=("-", "--", ":")[n // len(colours) % 3], marker=".", label=tag)
            for j, (steps, xkey) in enumerate([(4, "step"), (8, "step"), (4, "cpu_s"), (8, "cpu_s")]):
                ax = axes[i][j]
                if xkey == "cpu_s" and not all(r["cpu_measured"] for r in c):
                    continue  # wall-clock on a shared machine is not comparable with CPU time
                ax.plot([r[xkey] for r in c], [r[f"mse@{steps}"] for r in c], **style)
        last = next(c for (t, _), c in groups.items() if t == teacher)[-1]
        for j, (steps, xkey) in enumerate([(4, "step"), (8, "step"), (4, "cpu_s"), (8, "cpu_s")]):
            ax = axes[i][j]
            name, value = best_solver(last, steps, "mse")
            ax.axhline(value, color="k", ls="--", lw=1, label=f"best solver ({name})")
            ax.set_yscale("log")
            ax.set_title(f"{teacher}: paired MSE at {steps} steps")
            ax.set_xlabel("training steps" if xkey == "step" else "training CPU seconds (1 thread)")
            ax.grid(alpha=0.3)
        handles, labels = axes[i][0].get_legend_handles_labels()  # the step panels show every row
        axes[i][3].legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rows", nargs="+", help="JSON-lines files written by recipe_study.py --out")
    ap.add_argument("--out", required=True, help="prefix: writes <out>.md and <out>_curves.png")
    ap.add_argument("--teachers", nargs="*", default=None, help="only these teachers")
    ap.add_argument("--tags", nargs="*", default=None, help="only these tags")
    args = ap.parse_args()
    rows = [r for r in load_rows(args.rows)
            if (args.teachers is None or r["teacher"] in args.teachers) and (args.tags is None or r["tag"] in args.tags)]
    if not rows:
        raise SystemExit("study_report: no rows (check the files and the --teachers/--tags filters)")
    groups = curves(rows)
    command = "python benchmarks/study_report.py " + " ".join(args.rows) + f" --out {args.out}"
    md = table(groups, command)
    Path(f"{args.out}.md").write_text(md)
    plot(groups, Path(f"{args.out}_curves.png"))
    print(md)


if __name__ == "__main__":
    main()
