"""The accountant's persistent cache: the same answers, kept only where only the owner can write.

The attacker here is another local account that plants small epsilons in a cache file it can
write, hoping a site's budget check reads them (free epsilon)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from policies import accounting, accounting_cache
from policies.accounting import Mechanism
from policies.errors import PlanError

HISTORY = (Mechanism(1.1, 0.02, 300), Mechanism(20.0, 1.0, 2))


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache file for this test, and no in-memory answer left from another."""
    path = tmp_path / "cache" / "accounting.sqlite"
    monkeypatch.setenv(accounting_cache.ENV, str(path))
    _forget_in_memory()
    yield path
    _forget_in_memory()
    accounting_cache._store.close()


def _forget_in_memory() -> None:
    for cached in (accounting._epsilon, accounting.noise_for_target, accounting._one_step_rdp):
        cached.cache_clear()


def _rows(path: Path, curves: bool = False) -> list[tuple[str, str]]:
    """The kept answers (single floats), or with ``curves`` the kept Renyi curves."""
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT key, value FROM answers").fetchall()
    return [(k, v) for k, v in rows if ("," in v) == curves]


def _counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the PRV accountant's real evaluations from here on."""
    calls: list[int] = []
    real = accounting._accountant

    def counting(name: str):  # noqa: ANN202
        calls.append(1)
        return real(name)

    monkeypatch.setattr(accounting, "_accountant", counting)
    return calls


def test_a_kept_answer_is_the_computed_one_and_is_not_computed_again(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cold = accounting.epsilon(HISTORY, 1e-5)
    assert cache.exists() and len(_rows(cache)) == 1
    assert oct(cache.stat().st_mode & 0o777) == "0o600"
    assert oct(cache.parent.stat().st_mode & 0o777) == "0o700"
    accounting._epsilon.cache_clear()  # as a fresh process would: only the file remembers
    calls = _counted(monkeypatch)
    assert accounting.epsilon(HISTORY, 1e-5) == cold  # bit for bit: stored as float.hex
    assert calls == []
    # a different history or delta is another key
    accounting.epsilon(HISTORY, 1e-6)
    assert calls and len(_rows(cache)) == 2


def test_noise_searches_are_kept_and_refusals_are_not(cache: Path) -> None:
    sigma = accounting.noise_for_target(3.0, 1e-5, 0.05, 200)
    accounting.noise_for_target.cache_clear()
    assert accounting.noise_for_target(3.0, 1e-5, 0.05, 200) == sigma
    kept = len(_rows(cache))
    for _ in range(2):  # a refusal is raised each time, never remembered as an answer
        with pytest.raises(PlanError):
            accounting.noise_for_target(1e-6, 1e-5, 1.0, 10, "rdp")
        accounting.noise_for_target.cache_clear()
    assert len(_rows(cache)) == kept


def _plant(path: Path, small: float) -> None:
    """Replace every kept answer with ``small``: what a poisoner would write."""
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE answers SET value = ?", (float(small).hex(),))


@pytest.mark.parametrize("mode", [0o666, 0o620, 0o602])
def test_planted_answers_in_a_file_others_may_write_are_never_read(cache: Path, mode: int) -> None:
    truth = accounting.epsilon(HISTORY, 1e-5)
    _plant(cache, 0.001)
    cache.chmod(mode)
    accounting._epsilon.cache_clear()
    accounting_cache._store.close()
    assert accounting.epsilon(HISTORY, 1e-5) == truth


def test_planted_answers_in_a_directory_others_may_write_are_never_read(cache: Path) -> None:
    truth = accounting.epsilon(HISTORY, 1e-5)
    _plant(cache, 0.001)
    cache.parent.chmod(0o777)  # another user could swap the file for their own
    accounting._epsilon.cache_clear()
    accounting_cache._store.close()
    assert accounting.epsilon(HISTORY, 1e-5) == truth


def test_a_file_of_another_owner_is_never_read(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    truth = accounting.epsilon(HISTORY, 1e-5)
    _plant(cache, 0.001)
    accounting._epsilon.cache_clear()
    accounting_cache._store.close()
    monkeypatch.setattr(os, "getuid", lambda: cache.stat().st_uid + 1)
    assert accounting.epsilon(HISTORY, 1e-5) == truth


def test_a_corrupt_file_or_switching_off_changes_nothing_but_time(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    truth = accounting.epsilon(HISTORY, 1e-5)
    accounting_cache._store.close()
    cache.write_bytes(b"not a database at all" * 100)
    accounting._epsilon.cache_clear()
    assert accounting.epsilon(HISTORY, 1e-5) == truth
    monkeypatch.setenv(accounting_cache.ENV, "off")
    accounting._epsilon.cache_clear()
    calls = _counted(monkeypatch)
    assert accounting.epsilon(HISTORY, 1e-5) == truth and calls


def test_answers_of_other_accounting_code_are_not_read(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    accounting.epsilon(HISTORY, 1e-5)
    _plant(cache, 0.001)
    accounting._epsilon.cache_clear()
    monkeypatch.setattr(accounting_cache, "code_version", lambda: "an older accountant")
    assert accounting.epsilon(HISTORY, 1e-5) > 0.1


def test_the_default_place_is_the_users_cache_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(accounting_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/srv/cache")
    assert accounting_cache.default_path() == Path("/srv/cache/fedsite/accounting.sqlite")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", "/home/ada")
    assert accounting_cache.default_path() == Path("/home/ada/.cache/fedsite/accounting.sqlite")
    monkeypatch.delenv("HOME")  # a trainer's scrubbed environment: no cache at all
    assert accounting_cache.default_path() is None


def test_numpy_numbers_share_their_python_twins_key_and_odd_arguments_are_computed(
    cache: Path,
) -> None:
    """np.int64 steps or np.float32 rates (what a computed plan may hold) are the numbers they
    stand for; an argument JSON cannot spell is computed and not kept, never an error."""
    import numpy as np

    from policies.accounting_cache import persistent

    history = (Mechanism(np.float64(1.1), np.float32(0.25), np.int64(30)),)
    plain = (Mechanism(1.1, float(np.float32(0.25)), 30),)
    first = accounting.epsilon(history, 1e-5)
    accounting._epsilon.cache_clear()  # the second answer must come from the file's one row
    assert accounting.epsilon(plain, 1e-5) == first
    assert len(_rows(cache)) == 1

    @persistent("test-odd")
    def odd(value: object) -> float:
        return 2.0

    assert odd(object()) == 2.0 and len(_rows(cache)) == 1


def test_a_cache_below_a_directory_others_may_write_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Red team, session 14: under a shared folder another user can swap the cache's directory
    between the check and the open, and plant a 0.001 where the truth is 1.8."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # writable by all, and not sticky as /tmp is
    path = shared / "fedsite" / "accounting.sqlite"
    monkeypatch.setenv(accounting_cache.ENV, str(path))
    accounting._epsilon.cache_clear()
    accounting_cache._store.close()
    try:
        accounting.epsilon(HISTORY, 1e-5)
        assert not path.exists()
        shared.chmod(0o1777)  # sticky: others may add entries, never rename or remove ours
        accounting._epsilon.cache_clear()
        accounting_cache._store.close()
        accounting.epsilon(HISTORY, 1e-5)
        assert path.exists() and len(_rows(path)) == 1
    finally:
        accounting._epsilon.cache_clear()
        accounting_cache._store.close()


@pytest.mark.parametrize("stored", ["garbage", "0.5", b"\x00\x01"])
def test_an_unreadable_kept_value_is_computed_again_never_raised(cache: Path, stored) -> None:  # noqa: ANN001
    """Red team: a value this code did not write (an older format, a hand edit) raised out of
    the cache, or read "0.5" as hex (0.3125)."""
    truth = accounting.epsilon(HISTORY, 1e-5)
    with sqlite3.connect(cache) as conn:
        conn.execute("UPDATE answers SET value = ?", (stored,))
    accounting._epsilon.cache_clear()
    assert accounting.epsilon(HISTORY, 1e-5) == truth


def test_the_file_stays_bounded_however_many_plans_are_sent(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Red team: researchers choose their plans, and each distinct one added a row for good."""
    from policies.accounting_cache import persistent

    monkeypatch.setattr(accounting_cache, "MAX_ROWS", 10)
    monkeypatch.setattr(accounting_cache, "PRUNE_EVERY", 1)

    @persistent("test-plans")
    def plan(n: int) -> float:
        return float(n)

    for n in range(40):
        assert plan(n) == n
    kept = _rows(cache)
    assert 5 <= len(kept) <= 10
    assert plan(39) == 39.0 and len(_rows(cache)) == len(kept)  # the newest is still kept


ORDERS = tuple(accounting._DEFAULT_ORDERS)


def test_a_kept_renyi_curve_is_the_computed_one_to_the_bit(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one-step curves are kept too: a run's processes ask for the same ones (the suite:
    half of 1,292 curve computations repeated another process's). Read back, a curve is Opacus'
    own, bit for bit, and so is every epsilon composed from it."""
    import numpy as np
    from opacus.accountants.analysis.rdp import compute_rdp

    opacus = np.asarray(compute_rdp(q=0.02, noise_multiplier=1.1, steps=1, orders=list(ORDERS)))
    truth = accounting.epsilon(HISTORY, 1e-5)
    assert len(_rows(cache, curves=True)) == 2  # one per (noise, rate) of the history
    _forget_in_memory()  # as a fresh process would: only the file remembers
    with sqlite3.connect(cache) as conn:  # the epsilon too: it is composed again
        conn.execute("DELETE FROM answers WHERE value NOT LIKE '%,%'")

    def never(*args: object) -> tuple[float, ...]:
        raise AssertionError("a kept curve was computed again")

    with monkeypatch.context() as patched:
        patched.setattr(accounting, "_one_step_rdp_computed", never)
        read = accounting._one_step_rdp(1.1, 0.02, ORDERS)
        assert read.dtype == np.float64 and read.tobytes() == opacus.tobytes()
        assert accounting.epsilon(HISTORY, 1e-5) == truth


@pytest.mark.parametrize("planted", ["0x1.0p-10", "0x1.0p-10,0.5", "garbage,1"])
def test_a_planted_or_unreadable_curve_is_computed_again(cache: Path, planted: str) -> None:
    """Red team: a curve of the wrong length (a tiny one would lower every epsilon composed
    from it), or one spelled otherwise than this code writes, is never used."""
    truth = accounting.epsilon(HISTORY, 1e-5)
    with sqlite3.connect(cache) as conn:
        conn.execute("DELETE FROM answers WHERE value NOT LIKE '%,%'")  # composed again
        conn.execute("UPDATE answers SET value = ?", (planted,))  # every kept curve
    _forget_in_memory()
    assert accounting.epsilon(HISTORY, 1e-5) == truth
