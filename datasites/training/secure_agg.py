"""The site's half of secure aggregation (``policies.secagg``): keys, checks, mask, sign, unmask.

A secure job's calls carry one of four messages instead of bare weights
(``policies.wire.SecAggCall``), decoded once where the call enters (``site_job``):

* ``hello``: the site's X25519 key for this job, signed with its identity key. No data is read.
* ``mask``: a training round. Before anything is charged the site checks the participant list
  the researcher relays: every entry signed by its identity key, every fingerprint among the
  peers the admin approved, this site itself present with its own key, at least k of them
  (policy ``min_aggregation_sites``), no label used before. After training it returns only the
  masked vector of its clipped update.
* ``sign``: the site signs the round's survivor set, one set per round label.
* ``unmask``: given the survivor set and every survivor's signature over it, the site reveals its
  self-mask seed and its pair seeds with the participants that dropped, for that round only.

Every refusal raises :class:`Refused`, which ``site_job`` audits.
"""

from __future__ import annotations

import os
import secrets
from typing import Any, TypedDict

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from datasites.errors import Refused
from datasites.training.job_state import JobState
from policies import secagg
from policies.compression import flatten
from policies.errors import WireError
from policies.plan import JobSpec
from policies.wire import (
    Participant,
    RoundReply,
    SecAggMask,
    SecAggSign,
    SecAggUnmask,
    Weights,
)


class MaskedVector(TypedDict):
    """A site's masked update for one round (merged into its ``RoundReply``)."""

    masked: str
    label: str


class SecureSite:
    """One site's keys and round state for one approved job (stored in ``job_state``)."""

    def __init__(self, state: JobState, code_id: str, spec: JobSpec, identity_hex: str) -> None:
        self.state, self.code_id, self.spec = state, code_id, spec
        self.identity = secagg.identity_of(identity_hex)
        self.identity_public = secagg.public_bytes(self.identity.public_key())
        self.me = secagg.fingerprint(self.identity_public)
        self.tag = secagg.job_tag(spec.to_dict())
        self._keys: dict[str, dict[str, str]] = {}  # this round's participants, as checked

    def hello(self) -> RoundReply:
        key = self._x25519()
        public = secagg.public_bytes(key.public_key())
        message = secagg.key_message(self.tag, self.me, public)
        return {
            "status": "ok",
            "secagg": {
                "site": self.me,
                "identity": secagg.b64(self.identity_public),
                "key": secagg.b64(public),
                "signature": secagg.b64(self.identity.sign(message)),
            },
        }

    def check_round(self, call: SecAggMask, min_sites: int) -> dict[str, bytes]:
        """Refuse a round whose participant list is not the approved peers' signed keys; else
        the pair seeds with every other participant. Runs before anything is charged."""
        label = call.label
        keys: dict[str, bytes] = {}
        for entry in call.participants:
            site, key = self._checked_entry(entry)
            if site in keys:
                raise Refused(f"participant {site[:12]} is listed twice; nothing ran")
            if key in keys.values():  # a colluder claiming an honest peer's key (red team)
                raise Refused(f"participant {site[:12]} relays another site's key; nothing ran")
            keys[site] = key
            self._keys[site] = {"identity": entry.identity, "key": key.hex()}
        mine = secagg.public_bytes(self._x25519().public_key())
        if keys.get(self.me) != mine:
            raise Refused("this site is not in the participant list with its own key; nothing ran")
        if len(keys) < min_sites:
            raise Refused(
                f"{len(keys)} participant(s), fewer than the {min_sites} this dataset's policy "
                "requires for secure aggregation; nothing ran"
            )
        claim = secrets.token_hex(8)  # this call's, atomically: a label masks once
        if self._claim(f"label:{label}", {"by": claim})["by"] != claim:
            raise Refused(f"round label {label!r} was used before; nothing ran")
        private = self._x25519()
        return {
            site: secagg.pair_seed(private, key, self.tag, label, self.me, site)
            for site, key in keys.items()
            if site != self.me
        }

    def masked_reply(
        self, call: SecAggMask, seeds: dict[str, bytes], trained: Weights, sent: Weights | None
    ) -> MaskedVector:
        """The masked vector of this round's clipped update; the seeds stay here."""
        label = call.label
        trainable = self.spec.trainable
        base = sent or {n: np.zeros(s, np.float32) for n, s in trainable.items()}
        delta = flatten({n: trained[n] - base[n] for n in trainable}, trainable)
        rng = np.random.default_rng(int.from_bytes(os.urandom(32), "little"))
        quantized = secagg.quantize(delta, self.spec.plan.aggregation.update_norm_bound, rng)
        return self._masked(label, quantized, seeds)

    def masked_integers(
        self, call: SecAggMask, seeds: dict[str, bytes], noised_sum: np.ndarray
    ) -> MaskedVector:
        """Distributed DP: the masked vector of this site's noised integer gradient sum
        (``datasites.training.distributed``), taken modulo 2^32."""
        size = sum(int(np.prod(s)) for s in self.spec.trainable.values())
        vector = np.asarray(noised_sum)
        if vector.shape != (size,) or vector.dtype != np.int64:
            raise WireError(f"a distributed round's sum must be {size} integers")
        quantized = (vector % secagg.MODULUS).astype(np.uint32)
        return self._masked(call.label, quantized, seeds)

    def _masked(self, label: str, quantized: np.ndarray, seeds: dict[str, bytes]) -> MaskedVector:
        self_seed = os.urandom(32)
        masked = secagg.mask(quantized, self_seed, seeds, self.me)
        participants = sorted([*seeds, self.me])
        self._put(
            f"round:{label}",
            {"self_seed": self_seed.hex(), "participants": participants, "keys": self._keys},
        )
        return {"masked": secagg.encode_vector(masked), "label": label}

    def sign(self, call: SecAggSign, min_sites: int) -> RoundReply:
        label, survivors = self._survivors(call.label, call.survivors, min_sites)
        signed = self._claim(f"signed:{label}", {"survivors": survivors})
        if signed["survivors"] != survivors:
            raise Refused(
                f"this site already signed another survivor set for round {label!r}; refused"
            )
        message = secagg.survivors_message(self.tag, label, survivors)
        return {"status": "ok", "signature": secagg.b64(self.identity.sign(message))}

    def unmask(self, call: SecAggUnmask, min_sites: int) -> RoundReply:
        label, survivors = self._survivors(call.label, call.survivors, min_sites)
        signed = self._get(f"signed:{label}")
        if signed is None or signed["survivors"] != survivors:
            raise Refused("this site did not sign that survivor set for the round; refused")
        round_state = self._get(f"round:{label}")
        if round_state is None:  # _survivors refused that already
            raise Refused(f"this site masked nothing for round {label!r}")
        # identities and keys as this site checked them when it masked, never as relayed now
        # (red team: a "dropped" colluder relaying a victim's key at unmask got the survivors'
        # pair seeds with the victim)
        stored = round_state.get("keys") or {}
        identities = {site: _unb64(e["identity"], 32) for site, e in stored.items()}
        signatures = call.signatures
        message = secagg.survivors_message(self.tag, label, survivors)
        for site in survivors:
            identity = identities.get(site)
            signature = signatures.get(site)
            if (
                identity is None
                or signature is None
                or not secagg.verify(identity, _unb64(signature), message)
            ):
                raise Refused(f"survivor {site[:12]} did not sign the survivor set; refused")
        private = self._x25519()
        keys = {site: bytes.fromhex(e["key"]) for site, e in stored.items()}
        gone = [site for site in round_state["participants"] if site not in survivors]
        if any(site not in keys for site in gone):
            raise Refused("this site holds no key for a dropped participant; refused")
        dropped = {
            site: secagg.b64(secagg.pair_seed(private, keys[site], self.tag, label, self.me, site))
            for site in gone
        }
        return {
            "status": "ok",
            "self_seed": secagg.b64(bytes.fromhex(round_state["self_seed"])),
            "dropped": dropped,
        }

    def _survivors(
        self, label: str, listed: tuple[str, ...], min_sites: int
    ) -> tuple[str, list[str]]:
        round_state = self._get(f"round:{label}")
        if round_state is None:
            raise Refused(f"this site masked nothing for round {label!r}")
        survivors = sorted(set(listed))
        if self.me not in survivors:
            raise Refused("this site is not in the survivor set; refused")
        if not set(survivors) <= set(round_state["participants"]):
            raise Refused("the survivor set names sites that were not in the round; refused")
        if len(survivors) < min_sites:
            raise Refused(
                f"{len(survivors)} survivor(s), fewer than the {min_sites} the policy requires; "
                "refused"
            )
        return label, survivors

    def _checked_entry(self, entry: Participant) -> tuple[str, bytes]:
        identity = _unb64(entry.identity, 32)
        key = _unb64(entry.key, 32)
        site = entry.site
        if secagg.fingerprint(identity) != site:
            raise Refused(f"participant {site[:12]}: its identity key has another fingerprint")
        if site not in self.spec.plan.aggregation.peers:
            raise Refused(
                f"participant {site[:12]} is not among the job's approved peers; nothing ran"
            )
        message = secagg.key_message(self.tag, site, key)
        if not secagg.verify(identity, _unb64(entry.signature), message):
            raise Refused(f"participant {site[:12]}: the key's signature does not verify")
        return site, key

    def _x25519(self) -> X25519PrivateKey:
        stored = self._get("key")
        if stored is None:  # first use: one key per job even when two hellos overlap
            raw = X25519PrivateKey.generate().private_bytes(
                Encoding.Raw, PrivateFormat.Raw, NoEncryption()
            )
            stored = self._claim("key", {"x25519": raw.hex()})
        return X25519PrivateKey.from_private_bytes(bytes.fromhex(stored["x25519"]))

    def _get(self, kind: str) -> dict[str, Any] | None:
        return self.state.detail(self.code_id, f"secagg/{kind}")

    def _put(self, kind: str, detail: dict[str, Any]) -> None:
        self.state.put_detail(self.code_id, f"secagg/{kind}", detail)

    def _claim(self, kind: str, detail: dict[str, Any]) -> dict[str, Any]:
        return self.state.claim(self.code_id, f"secagg/{kind}", detail)


def _unb64(text: Any, size: int | None = None) -> bytes:
    try:
        return secagg.unb64(text, size)
    except WireError as exc:
        raise Refused(str(exc)) from exc
