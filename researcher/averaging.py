"""The model a run hands back: the mean of the global models of its last half of rounds.

Why: under DP-SGD the global model does not settle; every round's noise moves it, and where
the last round happens to leave it is one draw from a cloud around the optimum. Averaging the
iterates (Polyak-Ruppert averaging; De et al. 2022 average the parameters of their DP-SGD runs
for the same reason) keeps the cloud's centre. It is post-processing of what the sites already
released, so it costs no budget, and the sites still train from the plain global model: only
the model the researcher evaluates and keeps is averaged. The first half of the rounds is left
out, since the model is still far from where it ends.

Measured in process (issue 25, docs/benchmarks.md): on the hospital demo with a split per run,
0.937 -> 0.945 (30 runs); on ``scripts/bench --utility``'s wine, iris and digits, +0.4, +0.9
and -0.2 points (60 runs each): within the noise, and never a loss beyond it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from policies.wire import Weights

TAIL = 0.5  # the share of the rounds, from the end, whose global models are averaged
TAIL_FILE = "tail.npz"  # the running sum and its count, for a resumed run


def first_averaged(rounds: int) -> int:
    """The first round whose global model is in the average: 5 rounds average 3-5, 20 average
    11-20, a single round is its own."""
    return rounds - max(1, math.ceil(rounds * TAIL)) + 1


class TailAverage:
    """The running mean of the global models from round :func:`first_averaged` on."""

    def __init__(self, rounds: int) -> None:
        self.start = first_averaged(rounds)
        self.total: dict[str, np.ndarray] = {}
        self.count = 0

    def add(self, round_no: int, weights: Weights) -> Weights:
        """Take round ``round_no``'s global model in; the model the run hands back so far."""
        if round_no >= self.start:
            for name, value in weights.items():
                value = np.asarray(value, dtype=np.float64)
                self.total[name] = self.total[name] + value if name in self.total else value.copy()
            self.count += 1
        return self.model(weights)

    def model(self, weights: Weights) -> Weights:
        """The average so far, or ``weights`` (the global model) before the window opens."""
        if not self.count:
            return weights
        return {
            name: (total / self.count).astype(np.asarray(weights[name]).dtype)
            for name, total in self.total.items()
        }

    def save(self, run_dir: Path) -> None:
        tmp = Path(run_dir) / (TAIL_FILE + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, count=np.int64(self.count), **{f"w|{k}": v for k, v in self.total.items()})
        os.replace(tmp, Path(run_dir) / TAIL_FILE)

    def load(self, run_dir: Path, done: int) -> None:
        """The sum saved after round ``done``; a run saved before averaging existed (no file,
        or a count that does not match) starts its average afresh."""
        path = Path(run_dir) / TAIL_FILE
        if not path.exists():
            return
        with np.load(path, allow_pickle=False) as npz:
            count = int(npz["count"])
            total = {k[2:]: npz[k] for k in npz.files if k.startswith("w|")}
        if count == max(0, done - self.start + 1):
            self.total, self.count = total, count
