"""Tables never cut what an admin must read (issue 26: ``pen…``, ``round=3.…`` at 80 columns)."""

from __future__ import annotations

import io

from rich.console import Console

from policies import console


def _columns(text: str, n: int) -> list[str]:
    """Each column's cells of the table body joined over their folded lines."""
    joined = [""] * n
    for line in text.splitlines():
        if line.startswith("│"):
            cells = line.strip("│").split("│")
            for i, cell in enumerate(cells[:n]):
                joined[i] += cell.strip()
    return joined


def test_no_cell_is_cut_at_80_columns(monkeypatch) -> None:
    narrow = Console(width=80, record=True, file=io.StringIO())
    monkeypatch.setattr(console, "out", narrow)
    row = [
        "3f2a9c1e8b7d4a60",
        "fedsite_job_41193c7f",
        "2026-12-06 18:12:34",
        "a.very.long.researcher.address@university-hospital.example.org",
        "pending",
        "breast-cancer",
        "failed",
        "budget: round=3.000 of epsilon_total=3.200, dataset cap 10.000 (6.8 left)",
    ]
    cols = ["id", "job", "submitted (UTC)", "researcher", "status", "dataset", "report", "why"]
    console.table("requests", cols, [row], whole=("id",))
    text = narrow.export_text()
    assert "…" not in text
    got = _columns(text, len(cols))
    for value, shown in zip(row, got, strict=True):  # whole, if folded over lines
        assert shown.replace(" ", "") == value.replace(" ", ""), (value, shown)
