"""The researcher's half of secure aggregation (``policies.secagg``): relay, sum, unmask.

The researcher never holds a site's update: it relays the sites' signed keys, sums the masked
vectors modulo 2^32, and asks the survivors for exactly what removes the masks from the *sum*.
Each round's mean update is ``sum / |survivors|``: a fixed, equal weight per site. Sites do not
weight by rows because a weight the researcher relayed could single one site out (weights of 0
for all but a victim), and a row-weighted sum grows with the tables, coarsening the fixed point.

Strategies that need each site's update (median, trimmed mean) cannot run on a sum and are
refused; FedAvg and the server optimizers work on the mean; norm bounding is done by the sites
themselves (``update_norm_bound``).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from policies import secagg, skellam
from policies.compression import unflatten
from policies.errors import WireError
from policies.plan import JobSpec
from policies.wire import (
    Participant,
    RoundCall,
    RoundReply,
    SecAggHello,
    SecAggMask,
    SecAggSign,
    SecAggUnmask,
    Weights,
    encode_weights,
)
from researcher.errors import SiteError
from researcher.site import Site, fan_out
from researcher.strategy import Update

NEEDS_EACH_UPDATE = ("median", "trimmed-mean")


def check_strategy(name: str) -> None:
    if name in NEEDS_EACH_UPDATE:
        raise SiteError(
            f"strategy {name!r} needs each site's update, and secure aggregation shows only "
            "their sum; use fedavg, fedavgm, fedadam, fedyogi or norm-bounded"
        )


def collect_keys(
    pool: ThreadPoolExecutor, links: list[Site], spec: JobSpec
) -> dict[str, Participant]:
    """Each site's signed X25519 key for this job, checked here too: a site sending a key its
    identity did not sign, or a fingerprint outside the job's peers, is left out."""
    replies, _ = fan_out(pool, links, _caller(spec, SecAggHello()), None)
    entries: dict[str, Participant] = {}
    for name, reply in replies.items():
        entry = _valid(reply.get("secagg"), spec) if reply.get("status") == "ok" else None
        if entry is not None:
            entries[name] = entry
    return entries


def _valid(reply: object, spec: JobSpec) -> Participant | None:
    try:
        entry = Participant.from_dict(reply)
        identity = secagg.unb64(entry.identity, 32)
        key = secagg.unb64(entry.key, 32)
        signature = secagg.unb64(entry.signature)
    except WireError:
        return None
    site = entry.site
    valid = (
        secagg.fingerprint(identity) == site
        and site in spec.plan.aggregation.peers
        and secagg.verify(
            identity, signature, secagg.key_message(secagg.job_tag(spec.to_dict()), site, key)
        )
    )
    return entry if valid else None


def links_call(link: Site, spec: JobSpec, call: RoundCall) -> RoundReply:
    return link.call(spec, call)


def _caller(spec: JobSpec, call: RoundCall) -> Callable[[Site], RoundReply]:
    """``call`` at one site, once: a step of the protocol is not retried."""
    return lambda link: links_call(link, spec, call)


def secure_round(  # noqa: PLR0913
    pool: ThreadPoolExecutor,
    links: list[Site],
    spec: JobSpec,
    entries: dict[str, Participant],
    round_no: int,
    sent: Weights,
    min_sites: int,
    timeout_s: float,
) -> tuple[list[Update], dict[str, str]]:
    """One masked round: mask at every site, survivors sign, survivors unmask the sum.

    Returns one Update per survivor, each holding the same mean model (its own n, metrics and
    privacy figures), so every strategy and the run's history work unchanged.
    """
    label = f"r{round_no}-{secrets.token_hex(6)}"
    live = [link for link in links if link.name in entries]
    mask = SecAggMask(label, encode_weights(sent), tuple(entries.values()))
    masks = _all(pool, live, spec, mask, timeout_s)
    skipped = {
        link.name: "no signed key for secure aggregation"
        for link in links
        if link.name not in entries
    }
    replies = {}
    for name, reply in masks.items():
        if isinstance(reply, str) or reply.get("status") != "ok" or "masked" not in reply:
            skipped[name] = (
                reply if isinstance(reply, str) else f"{reply.get('status')}: {reply.get('reason')}"
            )
        else:
            replies[name] = reply
    if len(replies) < max(min_sites, 2):
        raise SiteError(
            f"round {round_no}: {len(replies)} site(s) masked, fewer than needed; skipped: {skipped}"
        )
    survivors = tuple(sorted(entries[name].site for name in replies))
    kept = [link for link in live if link.name in replies]
    signed = _all(pool, kept, spec, SecAggSign(label, survivors), timeout_s)
    if any(not isinstance(r, dict) or r.get("status") != "ok" for r in signed.values()):
        raise SiteError(f"round {round_no}: a survivor would not sign the survivor set: {signed}")
    signatures = {entries[n].site: str(r.get("signature")) for n, r in signed.items()}
    try:
        unmask = SecAggUnmask(label, survivors, signatures)
    except WireError as exc:
        raise SiteError(f"round {round_no}: a survivor's signature is malformed: {exc}") from exc
    opened = _all(pool, kept, spec, unmask, timeout_s)
    if any(not isinstance(r, dict) or r.get("status") != "ok" for r in opened.values()):
        raise SiteError(f"round {round_no}: a survivor would not unmask: {opened}")
    mean = _mean_update(spec, replies, opened, entries, survivors)
    model = {**sent, **{k: (sent[k] + v).astype(np.float32) for k, v in mean.items()}}
    updates = [
        Update(
            name,
            model,
            int(reply["n"]),
            reply.get("metrics", {}),
            {
                **reply.get("privacy", {}),
                "aggregation": "secure",
                "dp": spec.plan.dp.mode.value,
                "survivors": len(survivors),
            },
            int(reply.get("round", 0)),
        )
        for name, reply in sorted(replies.items())
    ]
    return updates, skipped


def _mean_update(
    spec: JobSpec,
    replies: dict[str, dict],
    opened: dict[str, Any],
    entries: dict[str, Participant],
    survivors: tuple[str, ...],
) -> Weights:
    trainable = spec.trainable
    size = sum(int(np.prod(s)) for s in trainable.values())
    try:
        masked = [secagg.decode_vector(r["masked"], size) for r in replies.values()]
        self_seeds = [secagg.unb64(o["self_seed"], 32) for o in opened.values()]
        dropped = [
            (entries[name].site, gone, secagg.unb64(seed, 32))
            for name, o in opened.items()
            for gone, seed in o.get("dropped", {}).items()
        ]
    except (KeyError, WireError) as exc:
        raise SiteError(f"a secure-aggregation reply is malformed: {exc}") from exc
    total = secagg.unmask_sum(masked, self_seeds, dropped)
    if spec.plan.dp.distributed:  # one central DP-SGD step: -lr times the noisy mean gradient
        rows = sum(int(r["n"]) for r in replies.values()) * float(spec.plan.dp.sample_rate or 0.0)
        gamma = skellam.scale(spec.plan.dp.max_grad_norm, size, spec.plan.batch_size)
        step = -spec.plan.learning_rate * skellam.gradient(total, gamma, rows)
        return unflatten(step, trainable)
    mean = secagg.dequantize(total, spec.plan.aggregation.update_norm_bound) / len(survivors)
    return unflatten(mean, trainable)


def _all(
    pool: ThreadPoolExecutor, links: list[Site], spec: JobSpec, call: RoundCall, timeout_s: float
) -> dict[str, Any]:
    """One call per site in parallel: its reply, or a line saying why there is none."""
    replies, failed = fan_out(pool, links, _caller(spec, call), timeout_s)
    return {**failed, **replies}


__all__ = ["check_strategy", "collect_keys", "secure_round"]
