"""Figures logged as run artifacts. Non-finite values are drawn, not dropped:
NaN cells are grey and +inf cells dark red in the heatmap; in the norm plot a
non-finite value is an 'x' on the top edge of the axes."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.ticker import LogFormatter, LogLocator  # noqa: E402

DPI = 80  # every run logs its plots to the store: 800 px wide is still readable in the MLflow UI


def fixed_margins(fig, left: float = 0.8, right: float = 0.2, bottom: float = 0.55, top: float = 0.4) -> None:
    """Margins in inches, set before drawing: ``tight_layout`` measures every text of the figure to
    find them, about 40% of a plot's time (issue 13: a run's fixed cost)."""
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height)


def label_inches(texts: Sequence[str], points: float) -> float:
    """Roughly how wide the longest of ``texts`` is in inches at font size ``points`` (DejaVu Sans
    averages about 0.6 em per character)."""
    return max((len(t) for t in texts), default=0) * 0.6 * points / 72


def plain_log(minor: bool = False) -> LogFormatter:
    """Log-axis tick labels as plain text (1e+03): matplotlib's default typesets each one with
    mathtext, which was half of a short run's plotting time."""
    return LogFormatter(labelOnlyBase=not minor, minor_thresholds=(2, 0.5))


def layer_heatmap(steps: Sequence[int], layers: List[str], grid: np.ndarray, path: Path,
                  explosion_step: Optional[int] = None, title: str = "") -> Path:
    """Per-layer gradient norms (rows: layers, columns: sampled steps), log colour scale."""
    fig, ax = plt.subplots(figsize=(10, max(3, 0.25 * len(layers) + 1.5)))
    fixed_margins(fig, left=0.25 + label_inches(layers, 7), right=0.3)
    data = np.asarray(grid, dtype=float).T if len(steps) else np.zeros((len(layers), 1))
    finite = data[np.isfinite(data) & (data > 0)]
    vmin, vmax = (finite.min(), finite.max()) if finite.size else (1e-8, 1.0)
    vmax = max(vmax, vmin * 10)
    # grey: NaN (and zeros, which a log scale cannot show); dark red: +inf
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey", over="darkred")
    shown = np.where(np.isposinf(data), vmax * 10, data)
    shown = np.ma.masked_where(~np.isfinite(shown) | (shown <= 0), shown)
    x = np.asarray(steps) if len(steps) else np.zeros(1)
    mesh = ax.pcolormesh(np.arange(len(x) + 1), np.arange(len(layers) + 1), shown, cmap=cmap,
                         norm=LogNorm(vmin=vmin, vmax=vmax), shading="flat")
    bar = fig.colorbar(mesh, ax=ax, label="gradient L2 norm (log)", extend="max", format=plain_log())
    bar.ax.yaxis.set_minor_locator(LogLocator(subs=(2, 5)))
    bar.ax.yaxis.set_minor_formatter(plain_log(minor=True))
    ax.set_yticks(np.arange(len(layers)) + 0.5)
    ax.set_yticklabels(layers, fontsize=7)
    ax.invert_yaxis()
    ticks = np.linspace(0, len(x) - 1, min(len(x), 8)).astype(int)
    ax.set_xticks(ticks + 0.5)
    ax.set_xticklabels([str(int(x[t])) for t in ticks])
    ax.set_xlabel("step")
    if explosion_step is not None and len(steps):
        col = int(np.searchsorted(x, explosion_step))
        ax.axvline(col + 0.5, color="red", ls="--", lw=1, label=f"explosion flagged @ {explosion_step}")
        ax.legend(loc="upper right", fontsize=7)
    ax.set_title(title or "per-layer gradient norm")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _plot_with_nonfinite(ax, steps, values, **kw):
    values = np.asarray(values, dtype=float)
    ax.plot(steps, np.where(np.isfinite(values), values, np.nan), **kw)
    bad = ~np.isfinite(values)
    if bad.any():  # on the top edge, whatever the y-limits end up being (x: data, y: axes fraction)
        ax.scatter(np.asarray(steps)[bad], np.ones(bad.sum()), marker="x", color=kw.get("color", "k"),
                   transform=ax.get_xaxis_transform(), clip_on=False, zorder=5,
                   label=f"{kw.get('label', '')} non-finite")


FAULT_COLORS = ("tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def fault_marks(ax, faults: Dict[str, List[Tuple[int, int]]]) -> None:
    """Each injected fault: a triangle on the top edge at every step it starts acting, and a
    shaded band over the steps it lasts (lr_spike, shift); one legend entry per fault."""
    for i, (name, spans) in enumerate(faults.items()):
        color = FAULT_COLORS[i % len(FAULT_COLORS)]
        if not spans:
            continue
        steps = sum(end - start for start, end in spans)
        ax.scatter([s for s, _ in spans], np.ones(len(spans)), marker="v", s=40, color=color, zorder=6,
                   transform=ax.get_xaxis_transform(), clip_on=False, label=f"fault {name} ({steps} steps)")
        for start, end in spans:
            if end - start > 1:
                ax.axvspan(start, end - 1, color=color, alpha=0.12, lw=0)


def norm_history(steps, pre, post, coef, skipped, threshold, path: Path, max_norm: Optional[float] = None,
                 explosion_step: Optional[int] = None, diverged_step: Optional[int] = None, title: str = "",
                 faults: Optional[Dict[str, List[Tuple[int, int]]]] = None) -> Path:
    """Global gradient norm before and after the stabilizers, with clip and skip events and the
    injected faults."""
    fig, ax = plt.subplots(figsize=(10, 4.5))
    fixed_margins(fig)
    steps = np.asarray(steps)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(plain_log())
    ax.yaxis.set_minor_formatter(plain_log(minor=True))
    ax.yaxis.set_minor_locator(LogLocator(subs=(2, 5)))  # matplotlib's 8 per decade: most of the tick work
    _plot_with_nonfinite(ax, steps, pre, color="tab:red", lw=0.8, label="grad/norm (before)")
    _plot_with_nonfinite(ax, steps, post, color="tab:blue", lw=0.8, label="grad/norm_after")
    thr = np.asarray(threshold, dtype=float)
    if np.isfinite(thr).any():
        ax.plot(steps, thr, color="tab:green", lw=0.8, ls=":", label="adaptive threshold")
    if max_norm is not None:
        ax.axhline(max_norm, color="tab:green", lw=0.8, ls="--", label=f"max_norm {max_norm:g}")
    clipped = np.asarray(coef) < 1.0
    if clipped.any():
        ax.scatter(steps[clipped], np.asarray(post)[clipped], s=6, color="tab:orange", zorder=4,
                   label=f"clipped ({clipped.sum()})")
    skip = np.asarray(skipped) > 0.5
    for s in steps[skip]:
        ax.axvline(s, color="purple", alpha=0.35, lw=0.8)
    if skip.any():
        ax.plot([], [], color="purple", alpha=0.35, label=f"skipped ({skip.sum()})")
    if explosion_step is not None:
        ax.axvline(explosion_step, color="red", ls="--", lw=1, label=f"explosion flagged @ {explosion_step}")
    if diverged_step is not None:
        ax.axvline(diverged_step, color="black", ls="-", lw=1.2, label=f"diverged @ {diverged_step}")
    fault_marks(ax, faults or {})
    ax.set_xlabel("step")
    ax.set_ylabel("global gradient L2 norm")
    ax.set_title(title or "gradient norm before / after stabilizers")
    ax.legend(fontsize=7, loc="best")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def confusion_matrix(matrix: np.ndarray, path: Path, title: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    fixed_margins(fig, left=0.6, right=0.6)
    im = ax.imshow(matrix, cmap="Blues")
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            v = int(matrix[i, j])
            ax.text(j, i, str(v), ha="center", va="center", fontsize=6,
                    color="white" if v > matrix.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_xticks(range(10))
    ax.set_yticks(range(10))
    ax.set_title(title or "test confusion matrix")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def sample_grid(images: np.ndarray, captions: List[str], path: Path, title: str = "") -> Path:
    """Images [k, 28, 28] in a grid, each with its caption (forensics: the samples behind a bad step)."""
    k = max(len(images), 1)
    cols = min(k, 8)
    rows = -(-k // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow(image, cmap="gray_r")
        ax.set_title(caption, fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
