"""The one string argument of a job call, as typed messages (``policies.wire.RoundCall``).

A site decodes a call once, where it enters; what is not one of the messages, to the last
field, is a WireError before anything else reads it. An attacker holds a plain syft client and
can send any string at all.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from policies import secagg
from policies.errors import WireError
from policies.wire import (
    Participant,
    ReplayLast,
    SecAggHello,
    SecAggMask,
    SecAggSign,
    SecAggUnmask,
    TrainRound,
    decode_call,
    encode_weights,
    max_call_length,
)

SHAPES = {"0.weight": (2, 3), "0.bias": (2,)}
BLOB = encode_weights({n: np.zeros(s, np.float32) for n, s in SHAPES.items()})


def _participant(seed: str) -> Participant:
    identity = secagg.identity_of(seed)
    public = secagg.public_bytes(identity.public_key())
    key = b"k" * 32
    signed = identity.sign(secagg.key_message("tag", secagg.fingerprint(public), key))
    return Participant(
        secagg.fingerprint(public), secagg.b64(public), secagg.b64(key), secagg.b64(signed)
    )


A, B = _participant("11" * 32), _participant("22" * 32)
MESSAGES = [
    TrainRound(),
    TrainRound(BLOB),
    ReplayLast(),
    SecAggHello(),
    SecAggMask("r1-abc", BLOB, (A, B)),
    SecAggSign("r1-abc", (A.site, B.site)),
    SecAggUnmask("r1-abc", (A.site, B.site), {A.site: A.signature, B.site: B.signature}),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_decodes_to_itself(message) -> None:  # noqa: ANN001
    assert decode_call(message.encode(), SHAPES) == message


def test_a_plain_round_is_its_bare_weights_blob_and_the_others_are_tagged() -> None:
    """The format of every plain round since the first: a blob, or "" for the model's start."""
    assert TrainRound(BLOB).encode() == BLOB
    assert TrainRound.of(None).encode() == ""
    assert ":" not in BLOB
    tags = {m.encode().partition(":")[0] for m in MESSAGES if not isinstance(m, TrainRound)}
    assert len(tags) == 2  # one for the replay, one for every secure-aggregation phase


def _secagg(body: object) -> str:
    tag = SecAggHello().encode().partition(":")[0]
    return f"{tag}:{json.dumps(body)}"


def _mask(**change: object) -> dict:
    return {**json.loads(SecAggMask("r1", BLOB, (A, B)).encode().partition(":")[2]), **change}


REPLAY_TAG = ReplayLast().encode().partition(":")[0]
GARBAGE = {
    "not a string": 12,
    "bytes": BLOB.encode(),
    "no such replay": f"{REPLAY_TAG}:first",
    "empty replay": f"{REPLAY_TAG}:",
    "unknown tag": "exfiltrate:rows",
    "a tag that only looks close": f"{REPLAY_TAG.upper()}:last",
    "not base64": "weights!",
    "JSON without a tag": '{"phase": "hello"}',
    "empty envelope": _secagg("")[:-2],
    "not JSON": _secagg("")[:-2] + "{phase",
    "a list": _secagg([]),
    "no phase": _secagg({}),
    "unknown phase": _secagg({"phase": "reveal"}),
    "unhashable phase": _secagg({"phase": ["hello"]}),
    "hello with a rider": _secagg({"phase": "hello", "sql": "select *"}),
    "mask without participants": _secagg({"phase": "mask", "label": "r1", "weights": BLOB}),
    "mask label with a path": _secagg(_mask(label="../../etc")),
    "mask label too long": _secagg(_mask(label="r" * 65)),
    "mask label not a string": _secagg(_mask(label=1)),
    "mask weights not base64": _secagg(_mask(weights="@@")),
    "participants not a list": _secagg(_mask(participants={"a": 1})),
    "65 participants": _secagg(_mask(participants=[A.to_dict()] * 65)),
    "participant with a rider": _secagg(_mask(participants=[{**A.to_dict(), "x": "1"}])),
    "participant missing its key": _secagg(
        _mask(participants=[{k: v for k, v in A.to_dict().items() if k != "key"}])
    ),
    "participant key not a string": _secagg(_mask(participants=[{**A.to_dict(), "key": 7}])),
    "participant key huge": _secagg(_mask(participants=[{**A.to_dict(), "key": "A" * 4000}])),
    "participant site not a fingerprint": _secagg(
        _mask(participants=[{**A.to_dict(), "site": "alice"}])
    ),
    "sign survivors not fingerprints": _secagg(
        {"phase": "sign", "label": "r1", "survivors": ["alice"]}
    ),
    "sign survivors a string": _secagg({"phase": "sign", "label": "r1", "survivors": A.site}),
    "sign 65 survivors": _secagg({"phase": "sign", "label": "r1", "survivors": [A.site] * 65}),
    "unmask relaying keys": _secagg(
        {
            "phase": "unmask",
            "label": "r1",
            "survivors": [A.site],
            "signatures": {},
            "participants": [A.to_dict()],
        }
    ),
    "unmask signatures a list": _secagg(
        {"phase": "unmask", "label": "r1", "survivors": [A.site], "signatures": [A.signature]}
    ),
    "unmask signature not base64": _secagg(
        {"phase": "unmask", "label": "r1", "survivors": [A.site], "signatures": {A.site: "$"}}
    ),
    "deeply nested JSON": _secagg("")[:-2] + "[" * 5000 + "]" * 5000,
    "oversized blob": "A" * (max_call_length(SHAPES) + 1),
    "oversized envelope": _secagg(_mask(weights="A" * max_call_length(SHAPES))),
}


@pytest.mark.parametrize("call", GARBAGE.values(), ids=GARBAGE.keys())
def test_anything_else_is_a_wire_error(call) -> None:  # noqa: ANN001
    with pytest.raises(WireError):
        decode_call(call, SHAPES)


def test_an_oversized_call_is_refused_before_it_is_parsed(monkeypatch) -> None:
    """Its length is checked first: json never sees it."""
    import policies.wire

    def parsed(text: str) -> object:
        raise AssertionError("an oversized envelope was parsed")

    monkeypatch.setattr(policies.wire.json, "loads", parsed)
    with pytest.raises(WireError, match="refused unread"):
        decode_call(GARBAGE["oversized envelope"], SHAPES)


def test_the_researcher_cannot_build_a_malformed_message() -> None:
    """The types check their fields when they are made, on either side of the wire."""
    with pytest.raises(WireError):
        SecAggSign("a label with spaces", (A.site,))
    with pytest.raises(WireError):
        SecAggMask("r1", BLOB, (A,) * 65)
    with pytest.raises(WireError):
        TrainRound("not:base64")
    with pytest.raises(WireError):
        Participant.from_dict({"site": A.site})
