"""Pictures of a training run: the loss curve `potstill train` saves next to the student, and the
demo's side-by-side of two students. matplotlib's Agg canvas only (no display, no pyplot state)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

LOSS_CURVE_FILE = "loss_curve.png"

# The logged loss parts (trainer `log`), in the order they are drawn, with their labels.
LOSS_PARTS = (
    ("loss", "total loss"),
    ("kd", "KD"),
    ("ce", "cross-entropy"),
    ("hidden", "hidden states"),
    ("relation", "relation"),
    ("rationale_task", "rationale task"),
    ("answer_task", "answer task"),
)


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _series(log_history: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for entry in log_history:
        value = entry.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value) and "step" in entry:
            steps.append(float(entry["step"]))
            values.append(float(value))
    return steps, values


def _eval_keys(log_history: Sequence[dict[str, Any]]) -> list[str]:
    """Evaluation metrics logged during training (`eval_loss`, `eval_kd_loss`, ...), losses only."""
    keys = {k for e in log_history for k in e if k.startswith("eval_") and k.endswith("loss")}
    return sorted(keys)


def draw_losses(ax: Any, log_history: Sequence[dict[str, Any]], final_eval: dict[str, Any] | None = None,
                *, prefix: str = "", color: str | None = None, parts: bool = True) -> bool:
    """Draw the logged loss parts against the optimizer step; evaluation points as markers.
    Returns whether anything was drawn."""
    drawn = False
    styles = iter(("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1)), (0, (1, 1))))
    for key, label in LOSS_PARTS if parts else LOSS_PARTS[:1]:
        steps, values = _series(log_history, key)
        if steps:
            ax.plot(steps, values, linestyle=next(styles), linewidth=1.4 if key == "loss" else 1.0,
                    label=f"{prefix}{label}", color=color)
            drawn = True
    for key in _eval_keys(log_history):
        steps, values = _series(log_history, key)
        if steps:
            ax.plot(steps, values, "o", markersize=5, label=f"{prefix}{key} (held out)", color=color)
            drawn = True
    if final_eval and isinstance(final_eval.get("kd_loss"), (int, float)) and log_history:
        last = max((float(e["step"]) for e in log_history if "step" in e), default=None)
        if last is not None:
            ax.plot([last], [final_eval["kd_loss"]], "D", markersize=6, label=f"{prefix}held-out kd_loss (final)",
                    color=color)
            drawn = True
    return drawn


def _finish(ax: Any, title: str) -> None:
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if y > 0]
    if ys and max(ys) / min(ys) > 30:  # parts of very different size (hidden MSE next to KL): log scale
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    legend_outside(ax)
    ax.set_title(title, fontsize=10)


def legend_outside(ax: Any, fontsize: float = 8) -> None:
    """The legend right of the axes, where it covers no curve (constrained layout makes room for it)."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=fontsize)


def _save(fig: Any, path: str) -> None:
    tmp = f"{path}.partial.png"
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


def write_loss_curve(path: str, log_history: Sequence[dict[str, Any]], final_eval: dict[str, Any] | None = None,
                     title: str = "training losses") -> bool:
    """The loss parts of a run against the step, as a PNG at `path`. Returns False when the run logged
    no loss (fewer steps than --logging-steps): the picture then says so."""
    fig, drawn = loss_curve_figure(log_history, final_eval, title)
    _save(fig, path)
    return drawn


def loss_curve_figure(log_history: Sequence[dict[str, Any]], final_eval: dict[str, Any] | None = None,
                      title: str = "training losses") -> tuple[Any, bool]:
    """The figure `write_loss_curve` saves, and whether any loss was drawn."""
    fig = _figure(8.0, 4.5)
    ax = fig.subplots()
    drawn = draw_losses(ax, log_history, final_eval)
    if drawn:
        _finish(ax, title)
    else:
        _nothing_logged(ax, title)
    return fig, drawn


def _nothing_logged(ax: Any, title: str = "") -> None:
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    ax.text(0.5, 0.5, "no loss was logged: the run had fewer steps than --logging-steps",
            ha="center", va="center", fontsize=11, transform=ax.transAxes)


def write_comparison(path: str, curves: dict[str, Sequence[dict[str, Any]]], table: list[list[str]],
                     columns: list[str], accuracy: dict[str, float]) -> None:
    """The demo's picture: each student's logged loss curve, the held-out accuracy of every model as
    bars, and the results table under them."""
    _save(comparison_figure(curves, table, columns, accuracy), path)


def comparison_figure(curves: dict[str, Sequence[dict[str, Any]]], table: list[list[str]],
                      columns: list[str], accuracy: dict[str, float]) -> Any:
    """The figure `write_comparison` saves."""
    from matplotlib.gridspec import GridSpec

    fig = _figure(11.0, 6.4)
    fig.suptitle("potstill demo: two students of one size, trained from the teacher's store", fontsize=12)
    grid = GridSpec(2, 2, figure=fig, height_ratios=[3, 1.3], width_ratios=[1.6, 1])
    ax = fig.add_subplot(grid[0, 0])
    colors = ("#3b6ea5", "#c0504d", "#4f8f4f", "#8064a2")
    if not any(_series(history, "loss")[0] for history in curves.values()):
        _nothing_logged(ax)
    for (label, history), color in zip(curves.items(), colors, strict=False):
        steps, values = _series(history, "loss")
        ax.plot(steps, values, color=color, linewidth=1.5, label=f"{label}: total loss")
        for key, part in (("kd", "KD"), ("ce", "cross-entropy")):
            s, v = _series(history, key)
            if s and v != values:
                ax.plot(s, v, color=color, linewidth=1.0, linestyle="--" if key == "kd" else ":", label=f"{label}: {part}")
    if ax.get_lines():
        _finish(ax, "training losses of the two students")
    bars = fig.add_subplot(grid[0, 1])
    names = list(accuracy)
    # a model with a curve keeps its curve's colour; the others (the teacher) are grey
    curve_colour = dict(zip(curves, colors, strict=False))
    bar_colours = [curve_colour.get(n, "#8c8c8c") for n in names[::-1]]
    shown = bars.barh(names[::-1], [100 * accuracy[n] for n in names[::-1]], color=bar_colours)
    bars.bar_label(shown, labels=[f"{100 * accuracy[n]:.1f}%" for n in names[::-1]], padding=3, fontsize=9)
    bars.set_xlim(0, 115)
    bars.set_xlabel("held-out accuracy (%)")
    bars.set_ylabel("model")
    bars.set_title("held-out accuracy", fontsize=10)
    tab = fig.add_subplot(grid[1, :])
    tab.axis("off")
    drawn = tab.table(cellText=table, colLabels=columns, loc="center", cellLoc="left", colLoc="left")
    drawn.auto_set_font_size(False)
    drawn.set_fontsize(9)
    drawn.auto_set_column_width(list(range(len(columns))))  # every cell as wide as its longest text
    drawn.scale(1, 1.35)
    return fig
