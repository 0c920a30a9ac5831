"""PNG plots of a run: accuracy and epsilon per round per site."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_run(history: list[dict[str, Any]], run_dir: Path) -> list[Path]:
    """Write accuracy.png and epsilon.png into ``run_dir``; return their paths."""
    sites = sorted({s for h in history for s in h["sites"]})
    paths = []
    for key, fname, label in (
        ("val_accuracy", "accuracy.png", "accuracy"),
        ("epsilon_spent", "epsilon.png", "epsilon spent"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for site in sites:
            pts = [
                (h["round"], h["sites"][site].get(key))
                for h in history
                if site in h["sites"] and h["sites"][site].get(key) is not None
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"{site}")
        if key == "val_accuracy":
            pts = [
                (h["round"], h["test_accuracy"])
                for h in history
                if h.get("test_accuracy") is not None
            ]
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    marker="s",
                    color="black",
                    label="global model, test split",
                )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = Path(run_dir) / fname
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
