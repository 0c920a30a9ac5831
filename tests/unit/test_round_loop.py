"""The researcher's round loop against in-process sites (no syft, no HTTP): averaging, quorum,
timeouts, retries, resume, and the replay of a round the researcher lost.

Each ``LocalSite`` answers with the real site code path for a round: ``prepare_task`` checks the
call, ``run_task`` trains with DP-SGD, ``release`` shapes the reply. What needs syft (approvals,
the ledger behind HTTP, kill -9 of a server) stays in tests/integration.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from policies.engine.prepare import prepare_task, release
from policies.engine.round_task import run_task
from policies.plan import JobSpec, training_rows
from policies.wire import ReplayLast, decode_weights
from researcher.errors import SiteError, Unreachable
from researcher.job import make_job
from researcher.rounds import Checkpoint, run_federation
from researcher.site import InProcessSite
from researcher.strategy import FedAvg

LAYERS = [{"type": "Linear", "in_features": 3, "out_features": 2}]


def _table(seed: int, n: int = 120) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    frame = pd.DataFrame(x, columns=["a", "b", "c"])
    frame["y"] = (x[:, 0] + 0.3 * x[:, 1] > 0).astype(int)
    return frame


def _spec(rounds: int = 3) -> JobSpec:
    plan = {"rounds": rounds, "noise_multiplier": 1.0, "batch_size": 16, "site_metrics": False}
    return make_job(LAYERS, "d", "y", plan, n_features=3)


class LocalSite:
    """One site's handler: counts its rounds as a site does, keeps its last reply for replay."""

    def __init__(self, name: str, frame: pd.DataFrame) -> None:
        self.name, self.frame = name, frame
        self.trained = 0
        self.last: dict | None = None
        self.meta = {"rows": len(frame), "n_classes": 2, "target": "y"}

    def __call__(self, spec: JobSpec, weights: str) -> dict:
        if weights == ReplayLast().encode():
            return self.last or {"status": "refused", "reason": "nothing released yet"}
        if self.trained >= spec.plan.rounds:
            return {"status": "refused", "reason": "all rounds have run"}
        task = prepare_task(spec, self.frame, "y", weights, 1.0, 2, 7, None, len(self.frame))
        self.trained += 1
        output = run_task(task, _test_seed=self.trained)
        self.last, _ = release(spec, output, self.trained, task.weights)
        return self.last

    def site(self) -> InProcessSite:
        return InProcessSite(self.name, self.meta, self)


def _fedavg(record) -> np.ndarray:  # noqa: ANN001
    """A round's global weight matrix by hand: its updates' mean, weighted by their rows."""
    return np.average(
        np.stack([u.weights["0.weight"] for u in record.updates]),
        axis=0,
        weights=[u.n for u in record.updates],
    )


def _run(sites, run_dir: Path, **kw):  # noqa: ANN001, ANN202
    return run_federation(None, kw.pop("spec", _spec()), run_dir, sites=sites, **kw)


def test_fedavg_of_real_site_rounds_is_the_row_weighted_mean(tmp_path: Path) -> None:
    locals_ = [LocalSite(n, _table(i, 80 + 40 * i)) for i, n in enumerate("abc")]
    seen = []
    result = _run([s.site() for s in locals_], tmp_path, on_round=seen.append)
    assert [len(r.updates) for r in seen] == [3, 3, 3] and all(s.trained == 3 for s in locals_)
    last = seen[-1]
    expected = _fedavg(last)
    # the global model the sites train from next is the row-weighted mean of the last round
    with np.load(result.run_dir / "global.npz") as npz:
        np.testing.assert_allclose(npz["0.weight"], expected, rtol=1e-6)
    # the model handed back is the mean of the last half of the rounds' global models (2, 3)
    tail = (_fedavg(seen[1]) + expected) / 2
    np.testing.assert_allclose(result.weights["0.weight"], tail, rtol=1e-5)
    plan = _spec().plan
    assert [u.n for u in last.updates] == [training_rows(n, plan) for n in (80, 120, 160)]


def test_a_refusing_and_a_failing_site_are_skipped_while_the_quorum_holds(tmp_path: Path) -> None:
    def refuses(spec, weights):  # noqa: ANN001, ANN202
        return {"status": "refused", "reason": "out of budget"}

    def fails(spec, weights):  # noqa: ANN001, ANN202
        raise SiteError("c: the job failed")

    sites = [
        LocalSite("a", _table(0)).site(),
        InProcessSite("b", {}, refuses),
        InProcessSite("c", {}, fails),
    ]
    seen = []
    _run(sites, tmp_path, min_sites=1, on_round=seen.append, spec=_spec(1))
    assert [u.site for u in seen[0].updates] == ["a"]
    assert seen[0].skipped == {"b": "refused: out of budget", "c": "c: the job failed"}
    sites[0] = LocalSite("a", _table(0)).site()  # a fresh site: the first ran its one round
    with pytest.raises(SiteError, match="only 1 site\\(s\\) replied, fewer than min_sites=2"):
        _run(sites, tmp_path / "again", min_sites=2, spec=_spec(1))


def test_every_site_is_needed_by_default_and_the_summary_counts_missed_rounds(
    tmp_path: Path,
) -> None:
    """Issue 26: a site that went down was passed over silently (default --min-sites 1, exit 0,
    no word of the 16 rounds it missed). Now a round waits for every site unless the caller
    accepts fewer, and the run's per-site summary says who missed what, and why."""

    def down_in_round_2(site: LocalSite):  # noqa: ANN202
        def handler(spec, weights):  # noqa: ANN001, ANN202
            if site.trained == 1 and weights != ReplayLast().encode():
                site.trained += 1  # the round is used up at the site, as a crash after it
                raise SiteError("b: no datasite answers")
            return site(spec, weights)

        return InProcessSite("b", site.meta, handler)

    sites = [LocalSite("a", _table(0)).site(), down_in_round_2(LocalSite("b", _table(1)))]
    with pytest.raises(SiteError, match="by default every site"):
        _run(sites, tmp_path / "all", spec=_spec(3))
    sites = [LocalSite("a", _table(0)).site(), down_in_round_2(LocalSite("b", _table(1)))]
    result = _run(sites, tmp_path / "some", min_sites=1, spec=_spec(3))
    assert not result.complete
    assert result.sites["a"]["rounds_taken"] == 3 and result.sites["a"]["rounds_missed"] == 0
    b = result.sites["b"]
    assert (b["rounds_taken"], b["rounds_missed"]) == (2, 1)
    assert b["missed_because"] == {"b: no datasite answers": 1}
    full = _run([LocalSite(n, _table(i)).site() for i, n in enumerate("ab")], tmp_path / "ok")
    assert full.complete and {s["rounds_taken"] for s in full.sites.values()} == {3}


def test_a_site_that_does_not_answer_in_time_is_skipped(tmp_path: Path) -> None:
    import threading

    released = threading.Event()

    def slow(spec, weights):  # noqa: ANN001, ANN202
        released.wait(10)  # answers only after the round has gone on without it
        return {"status": "refused", "reason": "too late anyway"}

    seen = []

    def on_round(rec) -> None:  # noqa: ANN001
        seen.append(rec)
        released.set()

    sites = [LocalSite("a", _table(0)).site(), InProcessSite("slow", {}, slow)]
    try:
        _run(sites, tmp_path, timeout_s=2.0, min_sites=1, on_round=on_round, spec=_spec(1))
    finally:
        released.set()
    assert seen[0].skipped == {"slow": "timed out after 2s"} and len(seen[0].updates) == 1


def test_a_dropped_connection_is_retried_and_the_link_reopened(tmp_path: Path) -> None:
    site = LocalSite("a", _table(0))
    calls = {"n": 0}

    def flaky(spec, weights):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] <= 2:
            raise Unreachable("a: no datasite answers")
        return site(spec, weights)

    link = InProcessSite("a", site.meta, flaky)
    seen = []
    _run([link], tmp_path, on_round=seen.append, spec=_spec(1), retry_backoff=0.01)
    assert calls["n"] == 3 and link.drops == 2 and len(seen[0].updates) == 1


def test_resume_continues_from_the_checkpoint(tmp_path: Path) -> None:
    class Crash(Exception):
        pass

    locals_ = [LocalSite(n, _table(i)) for i, n in enumerate("ab")]

    def crash_after_2(rec) -> None:  # noqa: ANN001
        if rec.round == 2:
            raise Crash

    with pytest.raises(Crash):
        _run([s.site() for s in locals_], tmp_path, on_round=crash_after_2)
    spec, done, weights, history = Checkpoint(tmp_path).load()
    assert done == 2 and [h["round"] for h in history] == [1, 2]
    seen = []
    result = _run([s.site() for s in locals_], tmp_path, resume=True, on_round=seen.append)
    assert [r.round for r in seen] == [3] and len(result.rounds) == 3
    assert all(s.trained == 3 for s in locals_) and (tmp_path / "model.pt").exists()


def test_a_round_released_but_never_received_is_replayed_not_retrained(tmp_path: Path) -> None:
    """The researcher stops after a site released round 2 but before aggregating it: on
    resume, the site's stored reply is taken, and the site trains only the rounds left."""
    site = LocalSite("a", _table(0))
    link = site.site()
    spec = _spec(3)

    class Lost(Exception):
        pass

    def lose_round_2(rec) -> None:  # noqa: ANN001
        if rec.round == 1:
            site(spec, "")  # round 2 trains and is released at the site; the reply is lost
            raise Lost

    with pytest.raises(Lost):
        run_federation(None, spec, tmp_path, sites=[link], on_round=lose_round_2)
    assert site.trained == 2
    lost = decode_weights(site.last["weights"])
    seen = []
    run_federation(None, spec, tmp_path, sites=[link], resume=True, on_round=seen.append)
    assert [r.round for r in seen] == [2, 3] and site.trained == 3
    np.testing.assert_array_equal(seen[0].updates[0].weights["0.weight"], lost["0.weight"])
    assert FedAvg().aggregate(2, seen[0].updates, lost)["0.weight"].shape == (2, 3)


def test_a_resumed_run_continues_the_server_optimizer_state(tmp_path: Path) -> None:
    """FedAdam's moments are checkpointed after each round, and a resume starts round 3 from
    round 2's moments, not from zero (they restarted before)."""
    from researcher.strategy import FedAdam

    class Crash(Exception):
        pass

    class Recording(FedAdam):
        seen: dict = {}

        def aggregate(self, round_no, results, current, failures=None):  # noqa: ANN001, ANN201
            Recording.seen[round_no] = {k: np.array(v) for k, v in self.m.items()}
            return super().aggregate(round_no, results, current, failures)

    def crash_after_2(rec) -> None:  # noqa: ANN001
        if rec.round == 2:
            raise Crash

    locals_ = [LocalSite(n, _table(i)) for i, n in enumerate("ab")]
    first = Recording()
    with pytest.raises(Crash):
        run_federation(
            None,
            _spec(3),
            tmp_path,
            sites=[s.site() for s in locals_],
            strategy=first,
            on_round=crash_after_2,
        )
    after_2 = {k: np.array(v) for k, v in first.m.items()}
    assert after_2 and all(np.abs(v).sum() > 0 for v in after_2.values())
    run_federation(
        None,
        _spec(3),
        tmp_path,
        sites=[s.site() for s in locals_],
        strategy=Recording(),
        resume=True,
    )
    for k, v in after_2.items():  # round 3 began where round 2 left the moments
        np.testing.assert_array_equal(Recording.seen[3][k], v)


def test_one_fan_out_gives_replies_and_a_line_per_missing_site_in_the_sites_order() -> None:
    """``fan_out`` is the round loop's, personalization's and secure aggregation's: a reply, a
    site's own error, or a timeout (its connection dropped), keyed and ordered by site; a bug
    (not a SiteError) is raised, never counted as a site that did not answer."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from researcher.site import fan_out

    release_slow = threading.Event()

    def slow(spec, weights):  # noqa: ANN001, ANN202
        release_slow.wait(10)
        return {"status": "ok"}

    def refusing(spec, weights):  # noqa: ANN001, ANN202
        raise SiteError("b: login refused")

    sites = [
        InProcessSite("slow", {}, slow),
        InProcessSite("b", {}, refusing),
        InProcessSite("a", {}, lambda spec, weights: {"status": "ok", "n": 3}),
    ]
    spec = _spec(1)
    with ThreadPoolExecutor(max_workers=3) as pool:
        try:
            replies, failed = fan_out(pool, sites, lambda s: s.call(spec, ReplayLast()), 1.0)
        finally:
            release_slow.set()
        assert replies == {"a": {"status": "ok", "n": 3}}
        assert list(failed.items()) == [("slow", "timed out after 1s"), ("b", "b: login refused")]
        assert [s.drops for s in sites] == [1, 0, 0]  # only the site that timed out

        def bug(site):  # noqa: ANN001, ANN202
            raise KeyError("a bug here")

        with pytest.raises(KeyError):
            fan_out(pool, sites[2:], bug, None)
