"""Red team: distributed DP over secure aggregation (plan ``dp = "distributed"``).

Each test drives the real site code in-process (``SecureSite``, ``distributed_step``, the
accountant). Each test reproduced a leak found by the red team (they were strict xfails); each now
passes because the site refuses, and stays as the regression test.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from datasites.errors import Refused
from datasites.ledger.store import SiteStore
from datasites.training.job_state import JobState
from datasites.training.secure_agg import SecureSite
from policies import secagg, skellam
from policies.accounting import Mechanism, epsilon
from policies.engine.distributed import SUM, distributed_step
from policies.engine.round_task import RoundTask
from policies.errors import PlanError, WireError
from policies.modelspec import parse
from policies.plan import JobSpec, TrainingPlan
from policies.privacy import job_privacy
from policies.wire import Participant, SecAggMask, SecAggSign, SecAggUnmask, decode_call
from tests.unit.distributed_job import MODEL, small_table, start_weights

SEEDS = ("11" * 32, "22" * 32, "33" * 32)


def _fingerprint(seed_hex: str) -> str:
    ident = secagg.identity_of(seed_hex)
    return secagg.fingerprint(secagg.public_bytes(ident.public_key()))


PEERS = tuple(_fingerprint(s) for s in SEEDS)


def _mask(label: str, entries: list[dict]) -> SecAggMask:
    return SecAggMask(label, "", tuple(Participant.from_dict(e) for e in entries))


def _plan(**kw) -> TrainingPlan:  # noqa: ANN003
    fields = {
        "aggregation": "secure",
        "dp": "distributed",
        "peers": PEERS,
        "site_metrics": False,
        "noise_multiplier": 2.0,
        "sample_rate": 1.0,
        "batch_size": 50,
        "standardize": False,
        "max_grad_norm": 0.5,
        "rounds": 50,
        **kw,
    }
    return TrainingPlan.of(**fields)


def _one_round(sites, specs, label, data, weights, fewest, floors=(0.0, 0.0, 0.0)):  # noqa: ANN001, ANN202, PLR0913
    """mask, sign, unmask at every site with the real SecureSite code; the researcher's sum.
    ``floors``: each site's policy min_noise_multiplier, applied as ``site_job._run`` does."""
    entries = [s.hello()["secagg"] for s in sites]
    env = _mask(label, entries)
    masked = []
    for i, (site, spec) in enumerate(zip(sites, specs, strict=True)):
        seeds = site.check_round(env, fewest)
        x, y = data[i]
        noise = job_privacy(spec, len(x), min_noise=floors[i]).noise_multiplier
        task = RoundTask(spec.model, spec.plan.to_dict(), x.copy(), y, 0, None, weights, noise)
        out = distributed_step(task)
        masked.append(site.masked_integers(env, seeds, out.weights[SUM]))
    survivors = tuple(sorted(PEERS))
    sign = SecAggSign(label, survivors)
    signatures = {s.me: s.sign(sign, fewest)["signature"] for s in sites}
    unmask = SecAggUnmask(label, survivors, signatures)
    opened = [s.unmask(unmask, fewest) for s in sites]
    size = sum(int(np.prod(s)) for s in specs[0].trainable.values())
    total = secagg.unmask_sum(
        [secagg.decode_vector(m["masked"], size) for m in masked],
        [secagg.unb64(o["self_seed"], 32) for o in opened],
        [],
    )
    return skellam.signed(total)


def test_peers_running_another_plan_under_the_same_job_id_cut_the_victims_noise(tmp_path):
    job_id = "f" * 32
    victim = JobSpec("dist", "t", "label", MODEL, _plan(), job_id=job_id)
    # what the other two sites approved: the same job_id, the same peers, a plan their own policy
    # accepts (noise at the default policy's min 0.5), whose noise in integer units is tiny
    other = JobSpec(
        "dist",
        "t",
        "label",
        MODEL,
        _plan(noise_multiplier=0.5, batch_size=65_536, sample_rate=1e-9),
        job_id=job_id,
    )
    specs = [victim, other, other]
    sites = [
        SecureSite(JobState(SiteStore(tmp_path / f"s{i}.db")), "code", spec, seed)
        for i, (spec, seed) in enumerate(zip(specs, SEEDS, strict=True))
    ]
    data = [small_table(50, 0), small_table(50, 1), small_table(50, 2)]
    weights = start_weights()
    fewest = victim.plan.survivors_needed
    privacy = job_privacy(victim, 50)
    accounted = (privacy.noise_multiplier * privacy.l2) ** 2  # the total the ledger charged for
    totals = []
    try:
        for r in range(30):
            totals.append(_one_round(sites, specs, f"r{r}", data, weights, fewest))
    except Refused:
        return  # fixed: a site refuses to mask with peers that approved another plan
    measured = np.stack(totals).var(axis=0, ddof=1).mean()  # victim's signal is fixed at q = 1
    real_sigma = math.sqrt(measured) / privacy.l2
    real = epsilon([Mechanism(real_sigma, 1.0, 50, privacy.l2, privacy.l1)], 1e-5)
    assert measured >= 0.8 * accounted, (
        f"noise variance {measured:.3g} in the unmasked sum, the victim charged for "
        f"{accounted:.3g}: real sigma {real_sigma:.2f} vs {privacy.noise_multiplier:.2f}, "
        f"real epsilon {real:.2f} vs charged {privacy.epsilon_job:.2f}"
    )


BIG = parse(
    {
        "input": [1100],
        "layers": [
            {"type": "Linear", "in_features": 1100, "out_features": 1000},
            {"type": "ReLU"},
            {"type": "Linear", "in_features": 1000, "out_features": 1},
        ],
    }
).to_dict()


def test_skellam_shares_at_a_huge_mean_keep_the_parity_of_the_gradient_sum():
    """Was a leak (medium): numpy's Poisson sampler returns only even numbers for a mean at or
    above 2^53, so the parity of every coordinate of the gradient sum left unnoised. Such a
    share is now refused before anything runs (and the trainer refuses it too)."""
    plan = TrainingPlan.of(
        aggregation="secure",
        dp="distributed",
        peers=PEERS[:2],
        min_sites=2,
        colluding_sites=1,  # one honest share: the whole variance at each site
        site_metrics=False,
        noise_multiplier=1000.0,
        sample_rate=1.0,
        batch_size=1,
        standardize=False,
        loss="mse",
        rounds=1,
    )
    spec = JobSpec("big", "t", "label", BIG, plan)
    with pytest.raises(PlanError, match="Poisson mean"):
        job_privacy(spec, 1)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1, 1100)).astype(np.float32)
    task = RoundTask(spec.model, plan.to_dict(), x, x[:, 0], 0, None, None, 1000.0)
    with pytest.raises(ValueError, match="Skellam share"):
        distributed_step(task)


def test_a_sites_noise_floor_raises_its_own_share_only_but_is_charged_as_the_total():
    """Was free epsilon (medium): a site whose policy floor was above the plan's noise raised
    its own share only, yet charged as if the whole sum carried it. Now the plan is refused at
    that site (review and runtime both compute ``job_privacy``), and every site that runs it
    adds a share of the one total the plan fixes."""
    spec = JobSpec("dist", "t", "label", MODEL, _plan(noise_multiplier=None, target_epsilon=30.0))
    planned = job_privacy(spec, 50, min_noise=0.5)
    assert planned.noise_multiplier < 3.0
    with pytest.raises(PlanError, match="below this dataset's floor"):
        job_privacy(spec, 50, min_noise=3.0)
    assert job_privacy(spec, 50, min_noise=0.1).noise_multiplier == planned.noise_multiplier


def test_a_colluder_reusing_an_honest_peers_key_unmasks_one_sites_noised_sum(tmp_path):
    colluder_seed, victim_seed, honest_seed = SEEDS  # fingerprints sort in this order
    x_fp, a_fp, b_fp = (_fingerprint(s) for s in SEEDS)
    assert x_fp < a_fp < b_fp
    plan = _plan(colluding_sites=1)  # 3 peers, 1 may collude: each site adds 1/2 of the noise
    spec = JobSpec("dist", "t", "label", MODEL, plan)
    a = SecureSite(JobState(SiteStore(tmp_path / "a.db")), "code", spec, victim_seed)
    b = SecureSite(JobState(SiteStore(tmp_path / "b.db")), "code", spec, honest_seed)
    colluder = secagg.identity_of(colluder_seed)
    entry_a, entry_b = a.hello()["secagg"], b.hello()["secagg"]
    b_key = secagg.unb64(entry_b["key"], 32)
    fake = {  # the colluder's identity vouches for B's X25519 key
        "site": x_fp,
        "identity": secagg.b64(secagg.public_bytes(colluder.public_key())),
        "key": entry_b["key"],
        "signature": secagg.b64(
            colluder.sign(secagg.key_message(secagg.job_tag(spec.to_dict()), x_fp, b_key))
        ),
    }
    env = _mask("r1", [entry_a, entry_b, fake])
    privacy = job_privacy(spec, 50)
    x, y = small_table(50, 0)
    try:
        sums = {}
        masked = {}
        for name, site, (xs, ys) in (("a", a, (x, y)), ("b", b, small_table(50, 1))):
            seeds = site.check_round(env, plan.survivors_needed)
            task = RoundTask(
                spec.model,
                plan.to_dict(),
                xs.copy(),
                ys,
                0,
                None,
                start_weights(),
                privacy.noise_multiplier,
            )
            sums[name] = distributed_step(task).weights[SUM]
            masked[name] = site.masked_integers(env, seeds, sums[name])
        survivors = tuple(sorted([x_fp, a_fp, b_fp]))
        sign = SecAggSign("r1", survivors)
        message = secagg.survivors_message(secagg.job_tag(spec.to_dict()), "r1", survivors)
        signatures = {
            a_fp: a.sign(sign, plan.survivors_needed)["signature"],
            b_fp: b.sign(sign, plan.survivors_needed)["signature"],
            x_fp: secagg.b64(colluder.sign(message)),
        }
        opened = a.unmask(SecAggUnmask("r1", survivors, signatures), plan.survivors_needed)
    except Refused:
        return  # fixed: a duplicated key (or a pair seed bound to both sites) is refused
    size = sum(int(np.prod(s)) for s in spec.trainable.values())
    y_a = secagg.decode_vector(masked["a"]["masked"], size)
    self_mask = secagg.prg(secagg.unb64(opened["self_seed"], 32), size)
    recovered = skellam.signed(y_a - self_mask)
    share = (privacy.noise_multiplier * privacy.l2) ** 2 / plan.honest_sites
    assert not np.array_equal(recovered, sums["a"]), (
        f"the researcher holds site A's own noised sum, noise variance {share:.3g} of the "
        f"{(privacy.noise_multiplier * privacy.l2) ** 2:.3g} its ledger charged for"
    )


def test_a_dropped_colluders_relayed_key_at_unmask_reveals_honest_pair_seeds(tmp_path):
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    seeds = (*SEEDS, "44" * 32)
    fps = [_fingerprint(s) for s in seeds]
    a_fp, b_fp, c_fp, x_fp = fps
    # 4 peers, rounds of 3, 1 may collude: each site adds 1/2 of the noise
    plan = _plan(peers=tuple(fps), min_sites=3, colluding_sites=1)
    spec = JobSpec("dist", "t", "label", MODEL, plan)
    fewest = plan.survivors_needed
    honest = [
        SecureSite(JobState(SiteStore(tmp_path / f"s{i}.db")), "code", spec, seed)
        for i, seed in enumerate(seeds[:3])
    ]
    a = honest[0]
    colluder = secagg.identity_of(seeds[3])
    x_ident = secagg.b64(secagg.public_bytes(colluder.public_key()))

    def colluder_entry(key: bytes) -> dict:
        message = secagg.key_message(secagg.job_tag(spec.to_dict()), x_fp, key)
        return {
            "site": x_fp,
            "identity": x_ident,
            "key": secagg.b64(key),
            "signature": secagg.b64(colluder.sign(message)),
        }

    x_key = secagg.public_bytes(X25519PrivateKey.generate().public_key())
    entries = [s.hello()["secagg"] for s in honest]
    env = _mask("r1", [*entries, colluder_entry(x_key)])
    privacy = job_privacy(spec, 50)
    sums, masked = {}, {}
    for i, site in enumerate(honest):
        pair = site.check_round(env, fewest)
        xs, ys = small_table(50, i)
        task = RoundTask(
            spec.model,
            plan.to_dict(),
            xs.copy(),
            ys,
            0,
            None,
            start_weights(),
            privacy.noise_multiplier,
        )
        sums[site.me] = distributed_step(task).weights[SUM]
        masked[site.me] = site.masked_integers(env, pair, sums[site.me])
    survivors = tuple(sorted([a_fp, b_fp, c_fp]))  # the colluder "dropped"
    sign = SecAggSign("r1", survivors)
    signatures = {s.me: s.sign(sign, fewest)["signature"] for s in honest}
    unmask = SecAggUnmask("r1", survivors, signatures)
    a_key = secagg.unb64(entries[0]["key"], 32)
    lying = [*entries, colluder_entry(a_key)]  # the colluder now vouches for A's key
    # an unmask message has no field for keys: relaying the lie is refused on the wire...
    tag, _, body = unmask.encode().partition(":")
    relayed = {**json.loads(body), "participants": lying}
    with pytest.raises(WireError, match="holds exactly"):
        decode_call(f"{tag}:{json.dumps(relayed)}", spec.architecture.parameters)
    # ...and the sites unmask with the keys they checked when they masked
    opened_a = a.unmask(unmask, fewest)
    pair_with_a = {s.me: s.unmask(unmask, fewest)["dropped"][x_fp] for s in honest[1:]}
    size = sum(int(np.prod(s)) for s in spec.trainable.values())
    y_a = secagg.decode_vector(masked[a_fp]["masked"], size)
    strip = secagg.mask(
        np.zeros(size, np.uint32),
        secagg.unb64(opened_a["self_seed"], 32),
        {
            x_fp: secagg.unb64(opened_a["dropped"][x_fp], 32),  # the colluder's own
            **{fp: secagg.unb64(seed, 32) for fp, seed in pair_with_a.items()},
        },
        a_fp,
    )
    recovered = skellam.signed(y_a - strip)
    assert not np.array_equal(recovered, sums[a_fp]), (
        "the researcher holds site A's own noised sum, with half the noise its ledger charged"
    )
