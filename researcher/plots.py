"""PNG plots of a run: accuracy and epsilon per round per site."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator, ScalarFormatter  # noqa: E402

PLOTS = (
    (
        "val_accuracy",
        "accuracy.png",
        "accuracy",
        "Accuracy per round: each site's DP validation release, and your test split",
    ),
    (
        "epsilon_spent",
        "epsilon.png",
        "epsilon spent (all your jobs on the dataset)",
        "Privacy budget spent at each site: totals across jobs, whole plan charged at round 1",
    ),
)


def plot_run(history: list[dict[str, Any]], run_dir: Path) -> list[Path]:
    """Write accuracy.png and epsilon.png into ``run_dir``; return their paths."""
    paths = []
    for fname, fig in figures(history):
        path = Path(run_dir) / fname
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def figures(history: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """(file name, matplotlib figure) of each plot; the caller saves and closes them."""
    sites = sorted({s for h in history for s in h["sites"]})
    out = []
    for key, fname, label, title in PLOTS:
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        colours = {}
        for site in sites:
            pts = _points(history, site, key)
            if pts:
                (line,) = ax.plot(*zip(*pts, strict=True), marker="o", label=site)
                colours[site] = line.get_color()
        if key == "val_accuracy":
            _test_line(ax, history)
        else:
            _budget_lines(ax, history, colours)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        formatter = ScalarFormatter(useOffset=False)  # no "+1.055e1" above the axis
        formatter.set_scientific(False)
        ax.yaxis.set_major_formatter(formatter)
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # beside it
        fig.tight_layout()
        out.append((fname, fig))
    return out


def _points(history: list[dict[str, Any]], site: str, key: str) -> list[tuple[int, float]]:
    return [
        (h["round"], h["sites"][site][key])
        for h in history
        if site in h["sites"] and h["sites"][site].get(key) is not None
    ]


def _test_line(ax: Any, history: list[dict[str, Any]]) -> None:
    pts = [(h["round"], h["test_accuracy"]) for h in history if h.get("test_accuracy") is not None]
    if pts:
        ax.plot(*zip(*pts, strict=True), marker="s", color="black", label="global model, test")


def _budget_lines(ax: Any, history: list[dict[str, Any]], colours: dict[str, str]) -> None:
    """Each site's total budget (from its last reply), dashed, in the site's colour."""
    for site, colour in colours.items():
        totals = [
            h["privacy"][site].get("epsilon_total") for h in history if site in h.get("privacy", {})
        ]
        total = next((t for t in reversed(totals) if t is not None), None)
        if total is not None:
            ax.axhline(total, linestyle="--", color=colour, label=f"{site} budget")
