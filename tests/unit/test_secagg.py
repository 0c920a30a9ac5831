"""Pairwise masking: masks cancel, dropouts are recovered, masked vectors look uniform."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from scipy import stats

from policies import secagg

JOB, LABEL = "job-1", "r1-abc"


def _sites(n: int) -> list[tuple[str, X25519PrivateKey]]:
    keys = [X25519PrivateKey.generate() for _ in range(n)]
    return [(f"{i:064x}", k) for i, k in enumerate(keys)]


def _masked(sites, updates, bound, rng):  # noqa: ANN001, ANN202
    pubs = {fp: secagg.public_bytes(k.public_key()) for fp, k in sites}
    out, selfs = [], []
    for (fp, key), x in zip(sites, updates, strict=True):
        seeds = {
            p: secagg.pair_seed(key, pub, JOB, LABEL, fp, p) for p, pub in pubs.items() if p != fp
        }
        b = rng.bytes(32)
        selfs.append(b)
        out.append(secagg.mask(secagg.quantize(x, bound, rng), b, seeds, fp))
    return out, selfs, pubs


def test_pair_seeds_agree_and_differ_per_round() -> None:
    (a, ka), (b, kb) = _sites(2)
    pa, pb = (secagg.public_bytes(k.public_key()) for k in (ka, kb))
    seed = secagg.pair_seed(ka, pb, JOB, LABEL, a, b)
    assert seed == secagg.pair_seed(kb, pa, JOB, LABEL, b, a)
    assert seed != secagg.pair_seed(ka, pb, JOB, "r2", a, b)
    # bound to the pair: the same key agreement under another site's name is another seed
    assert seed != secagg.pair_seed(ka, pb, JOB, LABEL, a, f"{9:064x}")
    assert seed != secagg.pair_seed(ka, pb, "another-job-tag", LABEL, a, b)


def test_the_job_tag_covers_the_whole_job() -> None:
    job = {"job_id": "j", "plan": {"noise_multiplier": 2.0, "peers": ["a", "b"]}}
    other = {"job_id": "j", "plan": {"noise_multiplier": 0.5, "peers": ["a", "b"]}}
    assert secagg.job_tag(job) == secagg.job_tag(dict(reversed(list(job.items()))))
    assert secagg.job_tag(job) != secagg.job_tag(other)


def test_the_masks_cancel_and_the_sum_is_the_sum_of_updates() -> None:
    rng = np.random.default_rng(0)
    sites = _sites(3)
    updates = [rng.normal(size=50) for _ in sites]
    masked, selfs, _ = _masked(sites, updates, 10.0, rng)
    total = secagg.dequantize(secagg.unmask_sum(masked, selfs, []), 10.0)
    step = 1 / (1 << secagg.fraction_bits(10.0))
    assert np.allclose(total, sum(updates), atol=3 * step)


def test_a_dropped_site_is_recovered_from_the_survivors_seeds() -> None:
    rng = np.random.default_rng(1)
    sites = _sites(3)
    updates = [rng.normal(size=20) for _ in sites]
    masked, selfs, pubs = _masked(sites, updates, 10.0, rng)
    (gone, _), survivors = sites[2], sites[:2]
    dropped = [
        (fp, gone, secagg.pair_seed(k, pubs[gone], JOB, LABEL, fp, gone)) for fp, k in survivors
    ]
    total = secagg.unmask_sum(masked[:2], selfs[:2], dropped)
    assert np.allclose(secagg.dequantize(total, 10.0), updates[0] + updates[1], atol=1e-5)


def test_quantization_clips_to_the_bound_and_rounds_without_bias() -> None:
    rng = np.random.default_rng(2)
    big = np.array([30.0, 40.0])  # norm 50, clipped to 10: [6, 8]
    back = secagg.dequantize(secagg.quantize(big, 10.0, rng), 10.0)
    assert back == pytest.approx([6.0, 8.0], abs=1e-5)
    x = np.full(20000, 1e-7)  # below one fixed-point step: only stochastic rounding keeps it
    assert secagg.dequantize(secagg.quantize(x, 10.0, rng), 10.0).mean() == pytest.approx(
        1e-7, rel=0.2
    )
    # the signed sum of MAX_SITES extreme updates does not wrap
    extreme = [secagg.quantize(np.array([-10.0]), 10.0, rng) for _ in range(secagg.MAX_SITES)]
    total = np.zeros(1, np.uint32)
    for q in extreme:
        total = total + q
    assert secagg.dequantize(total, 10.0)[0] == pytest.approx(-10.0 * secagg.MAX_SITES, rel=1e-6)


def test_a_masked_vector_is_indistinguishable_from_uniform() -> None:
    rng = np.random.default_rng(3)
    sites = _sites(2)
    updates = [np.zeros(20000), np.ones(20000) * 0.01]  # highly structured inputs
    masked, _, _ = _masked(sites, updates, 10.0, rng)
    for y in masked:
        assert stats.kstest(y / 2**32, "uniform").pvalue > 1e-3
        assert stats.chisquare(np.bincount(y & 0xFF, minlength=256)).pvalue > 1e-3


def test_signatures_bind_the_key_to_the_site_and_the_job() -> None:
    ident = secagg.identity_of("11" * 32)
    pub = secagg.public_bytes(ident.public_key())
    msg = secagg.key_message(JOB, secagg.fingerprint(pub), b"k" * 32)
    sig = ident.sign(msg)
    assert secagg.verify(pub, sig, msg)
    assert not secagg.verify(
        pub, sig, secagg.key_message("other-job", secagg.fingerprint(pub), b"k" * 32)
    )
    assert not secagg.verify(pub, b"\0" * 64, msg)


def test_a_claim_is_atomic_under_concurrent_callers(tmp_path) -> None:  # noqa: ANN001
    """Red team: two overlapping 'sign' calls both read 'not signed yet' and the site signed two
    survivor sets for one round, which exposed one site's update. A claim is one transaction."""
    import threading

    from datasites.ledger.store import SiteStore
    from datasites.training.job_state import JobState

    state = JobState(SiteStore(tmp_path / "site.db"))
    seen: list[dict] = []
    start = threading.Barrier(8)

    def claim(i: int) -> None:
        start.wait()
        seen.append(state.claim("code", "secagg:signed:r1", {"survivors": [f"set-{i}"]}))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 8 and all(s == seen[0] for s in seen)
    assert state.detail("code", "secagg:signed:r1") == seen[0]
