"""The run's plots: the test-set line is drawn, the budget shown, no offset notation."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from researcher import plots


def test_plots_show_test_accuracy_budgets_and_plain_numbers(tmp_path: Path) -> None:
    history = [
        {
            "round": r,
            "test_accuracy": 0.8 + 0.02 * r,
            "sites": {
                "a": {"val_accuracy": 0.7, "epsilon_spent": 10.551},
                "b": {"epsilon_spent": 10.556},  # site metrics off: no accuracy from b
            },
            "privacy": {"a": {"epsilon_total": 12.0}, "b": {"epsilon_total": 11.0}},
        }
        for r in (1, 2, 3)
    ]
    paths = plots.plot_run(history, tmp_path)
    assert [p.name for p in paths] == ["accuracy.png", "epsilon.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    figures = [fig for _, fig in plots.figures(history)]
    accuracy, epsilon = (fig.axes[0] for fig in figures)
    assert "global model, test" in [t.get_text() for t in accuracy.get_legend().get_texts()]
    labels = [t.get_text() for t in epsilon.get_legend().get_texts()]
    assert {"a budget", "b budget"} <= set(labels)
    epsilon.figure.canvas.draw()
    assert epsilon.yaxis.get_offset_text().get_text() == ""  # no "+1.055e1"
    assert "totals across jobs" in epsilon.get_title()
    for fig in figures:
        plt.close(fig)
