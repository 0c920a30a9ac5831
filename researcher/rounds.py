"""The federated round loop: global weights out to every site in parallel, updates back, averaged.

Faults: a site that times out, errors or refuses is skipped for the round with a warning; the
round goes on when at least ``min_sites`` replied (by default every site: a quorum of all), else
the run stops with a clear error. The run ends with a per-site summary (``site_summary``).
Connection failures are retried with backoff (a call that never reached the site spends nothing).
After every round the global weights, the round number and the metrics are checkpointed in the
run directory, so ``resume`` continues from there.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from policies.compression import decompress
from policies.errors import WireError
from policies.plan import MIN_STD, JobSpec
from policies.scaling import apply as apply_scaling
from policies.scaling import blank_inputs, floored_std, weak_inputs
from policies.wire import (
    Participant,
    ReplayLast,
    RoundCall,
    RoundReply,
    TrainRound,
    check_weights,
    decode_weights,
)
from researcher import model as local_model
from researcher.averaging import TailAverage
from researcher.errors import SiteError, Unreachable
from researcher.evaluation import DEFAULT_PRECISION, held_out_metrics
from researcher.federation import Federation
from researcher.site import Site, fan_out
from researcher.sites import SyftSite
from researcher.strategy import FedAvg, Strategy, Update, Weights, strategy_config

log = logging.getLogger("researcher.rounds")
TEST_COLUMNS = ("roc_auc", "pr_auc", "balanced_accuracy", "recall_at_precision")
RETRIES = 3


@dataclass
class RoundRecord:
    round: int
    updates: list[Update]
    skipped: dict[str, str]
    test_accuracy: float | None
    seconds: float
    # the researcher's exact test metrics (researcher.evaluation): accuracy, and for a binary
    # model ROC-AUC, PR-AUC, balanced accuracy, recall at the chosen precision
    test_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class RunResult:
    run_dir: Path
    weights: Weights  # the model handed back: the tail average (researcher.averaging)
    rounds: list[dict[str, Any]]
    last: RoundRecord | None = None
    # per site: rounds taken and missed (with why) and epsilon spent; see ``site_summary``
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Every site took every round of the run."""
        return all(s["rounds_missed"] == 0 for s in self.sites.values())


def call_with_retry(link: Site, spec: JobSpec, call: RoundCall, backoff: float = 0.5) -> RoundReply:
    """One call; a dropped or refused connection is retried with backoff (it spent nothing)."""
    for attempt in range(RETRIES):
        try:
            return link.call(spec, call)
        except Unreachable:
            link.drop()
            if attempt == RETRIES - 1:
                raise
            time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")


OUTLIER_RATIO = 10.0
PERSONALIZED_FILE = "personalized.json"  # each site's DP metrics of its fine-tuned model
STRATEGY_FILE = "strategy.json"  # the run's strategy, by name and parameters


def pooled_scaling(
    metas: list[dict[str, Any]], one_hot: list[bool] | None = None
) -> dict[str, list[float]] | None:
    """Federation-wide feature mean, std and range from each site's published ones.

    The published statistics come from DP releases; on a small site a column's range can miss
    (the noise hid it). Per feature: a site whose range is weak (no decade stood clear of the
    noise, ``datasites.data.mock``) is left out where another site found or declared one; and,
    with three sites or more, a site whose std is more than ``OUTLIER_RATIO`` times off the
    median is left out. ``one_hot`` marks inputs that are category shares: no outlier rule there
    (a category held at one site alone is no miss of the noise), every site counts. The range is
    the union of the kept sites' ranges, and the std is floored by it (``policies.scaling``), so
    that every input, clamped to the range, scales to at most ``STD_FLOOR_DIVISOR``.
    """
    usable = [m for m in metas if m.get("feature_mean") and m.get("rows")]
    if not usable:
        return None
    n = np.array([m["rows"] for m in usable], dtype=np.float64)[:, None]
    mu = np.array([m["feature_mean"] for m in usable])
    sd = np.array([m["feature_std"] for m in usable])
    n = n * _strong(usable, mu.shape[1])
    if len(usable) >= 3:
        n = n * _not_outliers(usable, sd, one_hot)
    n = np.where(n.sum(0) > 0, n, 1.0)  # every site left out of an input: all count again
    mean = (n * mu).sum(0) / n.sum(0)
    var = (n * (sd**2 + mu**2)).sum(0) / n.sum(0) - mean**2
    std = np.sqrt(np.maximum(var, 0.0))
    ranged = all(m.get("feature_low") and m.get("feature_high") for m in usable)
    if not ranged:
        return {"mean": mean.tolist(), "std": np.where(std > MIN_STD, std, 1.0).tolist()}
    kept = n > 0
    low = np.where(kept, np.array([m["feature_low"] for m in usable]), np.inf).min(0)
    high = np.where(kept, np.array([m["feature_high"] for m in usable]), -np.inf).max(0)
    mean = np.clip(mean, low, high)
    return {
        "mean": mean.tolist(),
        "std": floored_std(std, low, high).tolist(),
        "low": low.tolist(),
        "high": high.tolist(),
    }


def _not_outliers(
    metas: list[dict[str, Any]], sd: np.ndarray, one_hot: list[bool] | None
) -> np.ndarray:
    """Per site and input, 0 where the site's std is ``OUTLIER_RATIO`` off the median of the
    sites whose range holds more than zeros (``policies.scaling.zero_only``): a site blank in a
    column is no witness to its spread. An input with fewer than three such sites keeps all."""
    if all(m.get("feature_low") and m.get("feature_high") for m in metas):
        blank = np.array([blank_inputs(m, sd.shape[1]) for m in metas], dtype=bool)
    else:
        blank = np.zeros(sd.shape, dtype=bool)
    witnesses = np.where(blank, np.nan, sd)
    counted = (~blank).sum(0)
    median = np.nanmedian(np.where(counted >= 3, witnesses, sd), axis=0)
    ratio = np.maximum(sd, MIN_STD) / np.maximum(median, MIN_STD)
    keep = (ratio < OUTLIER_RATIO) & (ratio > 1 / OUTLIER_RATIO)
    keep |= (counted < 3)[None, :] | blank
    if one_hot is not None:
        keep |= np.asarray(one_hot, dtype=bool)[None, :]
    return keep


def _strong(metas: list[dict[str, Any]], width: int) -> np.ndarray:
    """Per site and input, 0 where the site's range is weak and another site's is not."""
    rows = []
    for m in metas:
        if m.get("feature_weak") is not None:
            rows.append(m["feature_weak"])
        else:
            own = weak_inputs(m) if m.get("schema") else []
            rows.append(own if len(own) == width else [False] * width)
    weak = np.array(rows, dtype=bool).reshape(len(metas), width)
    some_strong = (~weak).any(axis=0)
    return np.where(weak & some_strong[None, :], 0.0, 1.0)


def initial_weights(spec: JobSpec) -> Weights:
    """A fresh model's weights, built here from the job's spec (no site is asked)."""
    return local_model.weights_of(local_model.build(spec))


class Checkpoint:
    """state.json + global.npz + metrics.csv in the run directory, each replaced atomically."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    def save(self, spec: JobSpec, round_no: int, weights: Weights, history: list[dict]) -> None:
        tmp = self.dir / "global.npz.tmp"
        with open(tmp, "wb") as fh:
            np.savez(fh, **weights)
        os.replace(tmp, self.dir / "global.npz")
        _write(
            self.dir / "state.json",
            json.dumps({"round": round_no, "job": spec.to_dict(), "history": history}, indent=2),
        )
        self._metrics_csv(history)

    def save_strategy(self, strategy: Strategy) -> None:
        """The strategy's own state (server momentum, Adam moments), so a resume continues it."""
        arrays = strategy.state() if hasattr(strategy, "state") else {}
        tmp = self.dir / "strategy.npz.tmp"
        with open(tmp, "wb") as fh:
            np.savez(fh, **{f"{strategy.name}|{k}": v for k, v in arrays.items()})
        os.replace(tmp, self.dir / "strategy.npz")
        _write(self.dir / STRATEGY_FILE, json.dumps(strategy_config(strategy)))

    @staticmethod
    def strategy_in(run_dir: Path) -> dict[str, Any] | None:
        """The name and parameters of the strategy the run in ``run_dir`` was trained with
        (None before its first round), so that a resume goes on with it. Creates nothing."""
        path = Path(run_dir) / STRATEGY_FILE
        return dict(json.loads(path.read_text())) if path.exists() else None

    def load_strategy(self, strategy: Strategy) -> None:
        path = self.dir / "strategy.npz"
        if not path.exists() or not hasattr(strategy, "load_state"):
            return
        with np.load(path, allow_pickle=False) as npz:
            prefix = f"{strategy.name}|"
            mine = {k[len(prefix) :]: npz[k] for k in npz.files if k.startswith(prefix)}
        strategy.load_state(mine)  # another strategy's state is ignored: this one starts fresh

    def load(self) -> tuple[JobSpec, int, Weights, list[dict]]:
        state = json.loads((self.dir / "state.json").read_text())
        with np.load(self.dir / "global.npz", allow_pickle=False) as npz:
            weights = {k: npz[k] for k in npz.files}
        return JobSpec.from_dict(state["job"]), state["round"], weights, state["history"]

    def exists(self) -> bool:
        return (self.dir / "state.json").exists()

    def _metrics_csv(self, history: list[dict]) -> None:
        cols = [
            "round",
            "site",
            "n",
            "val_loss",
            "val_accuracy",
            "epsilon_spent",
            "test_accuracy",
            *(f"test_{k}" for k in TEST_COLUMNS),
        ]
        tmp = self.dir / "metrics.csv.tmp"
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
            writer.writeheader()
            for h in history:
                for site, m in h["sites"].items():
                    writer.writerow({"round": h["round"], "site": site, **m})
                tests = {f"test_{k}": v for k, v in (h.get("test_metrics") or {}).items()}
                writer.writerow(
                    {
                        "round": h["round"],
                        "site": "global",
                        "test_accuracy": h.get("test_accuracy"),
                        **tests,
                    }
                )
        os.replace(tmp, self.dir / "metrics.csv")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_federation(  # noqa: PLR0913
    fed: Federation | None,
    spec: JobSpec,
    run_dir: Path,
    *,
    sites: Sequence[Site] | None = None,
    retry_backoff: float = 0.5,
    min_sites: int | None = None,
    timeout_s: float = 300.0,
    strategy: Strategy | None = None,
    test: tuple[np.ndarray, np.ndarray] | None = None,
    test_precision: float = DEFAULT_PRECISION,
    resume: bool = False,
    on_round: Callable[[RoundRecord], None] | None = None,
    initial: Weights | None = None,
) -> RunResult:
    """Train ``spec`` for its planned rounds across every approved site of ``fed`` (over syft),
    or across ``sites`` (any :class:`researcher.site.Site`, such as in-process ones).

    ``initial``: the starting global weights (transfer learning: pre-trained on the mocks or on
    public data); by default a fresh model. A plan that personalizes ends with the sites'
    fine-tuning pass: the models stay at the sites, their DP metrics land in ``personalized``.
    """
    strategy = strategy or FedAvg()
    ckpt = Checkpoint(run_dir)
    if sites is None:
        if fed is None:
            raise SiteError("run_federation needs a federation or a list of sites")
        sites = [SyftSite(login) for login in fed.sites]
    links = list(sites)
    # a quorum of every site unless the caller accepts fewer: a site that drops out is an error
    # the researcher sees, not a run that quietly trains on the others
    min_sites = len(links) if min_sites is None else min_sites
    if resume and ckpt.exists():
        spec, done, weights, history = ckpt.load()
        ckpt.load_strategy(strategy)
    else:
        done, history = 0, []
        start = initial if initial is not None else initial_weights(spec)
        weights = strategy.initialize(start)
    tail = TailAverage(spec.plan.rounds)
    if resume:
        tail.load(ckpt.dir, done)
    last = None
    # after an interruption a site may have released a round this client never received;
    # a masked round is not replayed (its unmasking needs the round's survivors again)
    recover = _site_rounds(history) if resume and not spec.plan.aggregation.secure else None
    with ThreadPoolExecutor(max_workers=len(links)) as pool:
        entries = _secure_keys(pool, links, spec, strategy) if spec.plan.aggregation.secure else {}
        for round_no in range(done + 1, spec.plan.rounds + 1):
            limits = (min_sites, timeout_s, retry_backoff)
            if spec.plan.aggregation.secure:
                last = _masked_round(
                    pool, links, spec, strategy, entries, round_no, weights, limits
                )
            else:
                last = _one_round(pool, links, spec, strategy, round_no, weights, limits, recover)
            recover = None
            weights = strategy.aggregate(round_no, last.updates, weights, last.skipped)
            # the test split scores the model the run would hand back now: the tail average
            last.test_metrics = _test_metrics(
                spec, tail.add(round_no, weights), test, test_precision
            )
            last.test_accuracy = last.test_metrics.get("accuracy")
            history.append(_history_row(last))
            tail.save(ckpt.dir)
            ckpt.save(spec, round_no, weights, history)
            # after the round: a crash in between resumes with the previous moments (one round's
            # momentum lost), never with this round's counted twice
            ckpt.save_strategy(strategy)
            if on_round:
                on_round(last)
        personalized = ckpt.dir / PERSONALIZED_FILE
        if spec.plan.algorithm.personalizes and not personalized.exists():
            passed = _personalize(pool, links, spec, weights, min_sites, timeout_s)
            _write(personalized, json.dumps(passed, indent=2))
    final = tail.model(weights)
    _save_final(run_dir, spec, final)
    summary = site_summary(history, [link.name for link in links])
    return RunResult(Path(run_dir), final, history, last, summary)


def site_summary(history: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, Any]]:
    """Per site, over a run's rounds: how many it took, how many it missed and why, and the
    epsilon its ledger reported spent after its last round."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        taken = [row for row in history if name in row.get("sites", {})]
        reasons: dict[str, int] = {}
        for row in history:
            why = row.get("skipped", {}).get(name)
            if why is not None:
                reasons[why] = reasons.get(why, 0) + 1
            elif name not in row.get("sites", {}):
                reasons["no reply"] = reasons.get("no reply", 0) + 1
        spent = [row["sites"][name].get("epsilon_spent") for row in taken]
        out[name] = {
            "rounds_taken": len(taken),
            "rounds_missed": len(history) - len(taken),
            "missed_because": reasons,
            "epsilon_spent": next((e for e in reversed(spent) if e is not None), None),
        }
    return out


def _personalize(
    pool: ThreadPoolExecutor,
    links: list[Site],
    spec: JobSpec,
    weights: Weights,
    min_sites: int,
    timeout_s: float,
) -> dict[str, Any]:
    """The fine-tuning pass: each site tunes the plan's layers from the final global weights
    and keeps the model; what comes back is its DP validation metrics only."""
    call = TrainRound.of(weights)
    replies, skipped = fan_out(
        pool, links, lambda link: call_with_retry(link, spec, call), timeout_s
    )
    sites: dict[str, dict[str, Any]] = {}
    for name, reply in replies.items():
        if reply.get("status") != "ok" or not reply.get("personalized"):
            skipped[name] = f"{reply.get('status')}: {reply.get('reason')}"
            continue
        sites[name] = {"n": int(reply["n"]), **reply.get("metrics", {})}
    if len(sites) < min_sites:
        raise SiteError(f"personalization: only {len(sites)} site(s) replied; skipped: {skipped}")
    return {"sites": sites, "skipped": skipped}


def _secure_keys(
    pool: ThreadPoolExecutor, links: list[Site], spec: JobSpec, strategy: Strategy
) -> dict[str, Participant]:
    from researcher import secure

    secure.check_strategy(strategy.name)
    entries = secure.collect_keys(pool, links, spec)
    if len(entries) < 2:
        raise SiteError(
            f"secure aggregation: only {len(entries)} site(s) sent a signed key for this job"
        )
    return entries


def _masked_round(  # noqa: PLR0913
    pool: ThreadPoolExecutor,
    links: list[Site],
    spec: JobSpec,
    strategy: Strategy,
    entries: dict[str, Participant],
    round_no: int,
    weights: Weights,
    limits: tuple[int, float, float],
) -> RoundRecord:
    from researcher import secure

    started = time.perf_counter()
    sent = strategy.configure_round(round_no, weights)
    updates, skipped = secure.secure_round(
        pool, links, spec, entries, round_no, sent, limits[0], limits[1]
    )
    for name, why in skipped.items():
        log.warning("round %d: skipped %s: %s", round_no, name, why)
    return RoundRecord(round_no, updates, skipped, None, time.perf_counter() - started)


def _site_rounds(history: list[dict[str, Any]]) -> dict[str, int]:
    """Per site, the last of its own round numbers that this run has aggregated."""
    out: dict[str, int] = {}
    for row in history:
        for site, n in row.get("site_rounds", {}).items():
            out[site] = max(out.get(site, 0), int(n))
    return out


def call_or_recover(
    link: Site, spec: JobSpec, call: RoundCall, aggregated: int | None, backoff: float = 0.5
) -> RoundReply:
    """One round at one site; when resuming (``aggregated`` is the site's last round this run
    used), first ask for the site's last released reply and take it if it is newer: that
    round trained on these same global weights before the interruption, and was charged."""
    if aggregated is not None:
        reply = call_with_retry(link, spec, ReplayLast(), backoff)
        if reply.get("status") == "ok" and int(reply.get("round", 0)) > aggregated:
            return reply
    return call_with_retry(link, spec, call, backoff)


def _one_round(
    pool: ThreadPoolExecutor,
    links: list[Site],
    spec: JobSpec,
    strategy: Strategy,
    round_no: int,
    weights: Weights,
    limits: tuple[int, float, float],
    recover: dict[str, int] | None,
) -> RoundRecord:
    """One round at every site in parallel; ``limits`` = (min_sites, timeout_s, backoff)."""
    min_sites, timeout_s, backoff = limits
    started = time.perf_counter()
    sent = strategy.configure_round(round_no, weights)
    call = TrainRound.of(sent)

    def work(link: Site) -> RoundReply:
        aggregated = None if recover is None else recover.get(link.name, 0)
        return call_or_recover(link, spec, call, aggregated, backoff)

    replies, skipped = fan_out(pool, links, work, timeout_s)
    updates: list[Update] = []
    for name, reply in replies.items():
        if reply.get("status") != "ok":
            skipped[name] = f"{reply.get('status')}: {reply.get('reason')}"
            continue
        try:
            site_weights = weights_of_reply(reply, spec, sent)
        except WireError as exc:
            skipped[name] = f"unreadable update: {exc}"
            continue
        updates.append(
            Update(
                name,
                site_weights,
                int(reply["n"]),
                reply.get("metrics", {}),
                reply.get("privacy", {}),
                int(reply.get("round", 0)),
            )
        )
    for name, why in skipped.items():
        log.warning("round %d: skipped %s: %s", round_no, name, why)
    if len(updates) < min_sites:
        raise SiteError(
            f"round {round_no}: only {len(updates)} site(s) replied, fewer than "
            f"min_sites={min_sites} (by default every site; --min-sites N accepts fewer); "
            f"skipped: {skipped}"
        )
    updates.sort(key=lambda u: u.site)
    return RoundRecord(round_no, updates, skipped, None, time.perf_counter() - started)


def weights_of_reply(reply: RoundReply, spec: JobSpec, sent: Weights) -> Weights:
    """A site's model after its round: what it returned, on top of the weights it was sent.

    Frozen layers never come back and keep the sent values; a compressed reply is an update
    from the sent weights (``policies.compression``); a plain one holds the trained tensors.
    """
    trainable = spec.trainable
    if "update" in reply:
        kind = reply.get("compression")
        if kind != spec.plan.aggregation.compression:
            raise WireError(
                f"the site compressed with {kind!r}, the plan says "
                f"{spec.plan.aggregation.compression.value!r}"
            )
        delta = decompress(reply["update"], trainable, kind, spec.plan.aggregation.topk_fraction)
        with np.errstate(over="ignore", invalid="ignore"):
            returned = {n: (sent[n] + delta[n]).astype(np.float32) for n in trainable}
        check_weights(returned, trainable)  # finite, bounded: as plain weights are (red team)
    else:
        returned = decode_weights(reply["weights"], trainable)
    return {**sent, **returned}


def _test_metrics(spec: JobSpec, weights: Weights, test: Any, precision: float) -> dict[str, float]:
    """The global model on the researcher's own test rows, exactly (they are not private)."""
    if test is None:
        return {}
    x, y = test
    # the inputs a site's round trains on (policies.engine.round_task): the one scaling function
    x = apply_scaling(
        np.array(x, dtype=np.float32), spec.scaling if spec.plan.standardize else None
    )
    model = local_model.load(local_model.build(spec), weights)
    return held_out_metrics(model, x, y, spec.plan.loss, precision)


def _history_row(rec: RoundRecord) -> dict[str, Any]:
    return {
        "round": rec.round,
        "seconds": rec.seconds,
        "test_accuracy": rec.test_accuracy,
        "test_metrics": rec.test_metrics,
        "skipped": rec.skipped,
        "sites": {
            u.site: {"n": u.n, **u.metrics, "epsilon_spent": u.privacy.get("epsilon_spent")}
            for u in rec.updates
        },
        "privacy": {u.site: u.privacy for u in rec.updates},
        "site_rounds": {u.site: u.site_round for u in rec.updates},
    }


def _save_final(run_dir: Path, spec: JobSpec, weights: Weights) -> None:
    import torch

    torch.save({k: torch.as_tensor(v) for k, v in weights.items()}, Path(run_dir) / "model.pt")
    _write(Path(run_dir) / "job.json", json.dumps(spec.to_dict(), indent=2))
