"""Pictures: sample grids (one row per sampler) and 2-D trajectories (matplotlib, PNG, atomic)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from perflow.io import atomic_path


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_sample_grid(
    previews: dict[str, torch.Tensor],
    names: Sequence[str],
    path: str | Path,
    title: str = "",
    row_labels: Sequence[str] | None = None,
    max_columns: int = 20,
    invert: bool = True,
) -> Path:
    """One row per name in ``names`` (``previews[name]`` is ``(B, C, H, W)`` in ``[-1, 1]``, ``C`` 1 or 3), same
    columns (the same initial noise and label) in every row. Greyscale is shown inverted with ``invert`` (digits:
    ink dark on white), colour as it is."""
    plt = _figure()
    rows = []
    for name in names:
        imgs = previews[name][:max_columns].float().clamp(-1, 1)  # (B, C, H, W)
        imgs = imgs[:, :1] if imgs.shape[1] != 3 else imgs
        padded = torch.nn.functional.pad(imgs, (1, 1, 1, 1), value=-1.0)  # (B, C, H+2, W+2)
        rows.append(torch.cat(list(padded), dim=2))  # (C, H+2, B(W+2))
    width = max(r.shape[2] for r in rows)
    rows = [torch.nn.functional.pad(r, (0, width - r.shape[2]), value=-1.0) for r in rows]
    grid = torch.cat(rows, dim=1)  # (C, R(H+2), B(W+2))
    cell = rows[0].shape[1]
    fig_w = 2.5 + 0.4 * grid.shape[2] / cell
    fig, ax = plt.subplots(figsize=(fig_w, 0.45 * len(rows) + 0.8), dpi=110)
    if grid.shape[0] == 3:
        ax.imshow(((grid.permute(1, 2, 0) + 1) / 2).numpy(), interpolation="nearest")
    else:
        ax.imshow((-grid[0] if invert else grid[0]).numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_yticks([cell * (i + 0.5) for i in range(len(rows))])
    ax.set_yticklabels(row_labels or list(names), fontsize=8)
    ax.set_xticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return _save_png(fig, path)


def save_trajectory_plot(
    panels: Sequence[tuple[str, torch.Tensor, torch.Tensor]],
    path: str | Path,
    density: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    data: torch.Tensor | None = None,
    title: str = "",
) -> Path:
    """Side-by-side panels of 2-D trajectories.

    Each panel is ``(label, states (S+1, B, 2), marked (S+1,) bool)``: lines join the states from
    noise to data; ``marked`` states (e.g. window boundaries) get dots. ``density`` is
    ``(X, Y, log p)`` grids drawn as contours; ``data`` ``(M, 2)`` exact samples drawn faintly.
    """
    plt = _figure()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.4), dpi=110, squeeze=False)
    for ax, (label, states, marked) in zip(axes[0], panels):
        if density is not None:
            X, Y, logp = density
            ax.contour(X.numpy(), Y.numpy(), logp.exp().numpy(), levels=8, colors="tab:blue", linewidths=0.6, alpha=0.6)
        if data is not None:
            ax.scatter(data[:, 0], data[:, 1], s=1, c="tab:blue", alpha=0.15)
        s = states.float().numpy()  # (S+1, B, 2)
        for b in range(s.shape[1]):
            ax.plot(s[:, b, 0], s[:, b, 1], "-", color="tab:red", lw=0.7, alpha=0.8)
        m = marked.numpy().astype(bool)
        ax.scatter(s[m, :, 0].ravel(), s[m, :, 1].ravel(), s=5, c="black", zorder=3)
        ax.scatter(s[-1, :, 0], s[-1, :, 1], s=9, c="tab:green", zorder=4)
        ax.set_title(label, fontsize=8)
        ax.set_aspect("equal")
        ax.set_xlim(-3.2, 3.2)
        ax.set_ylim(-3.2, 3.2)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save_png(fig, path)


def _save_png(fig, path) -> Path:
    """Lay out ``fig``, write it to ``path`` as PNG atomically and close it."""
    plt = _figure()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)
