"""Encoding of model weights for syft calls, and the checks on weights that cross it.

syft 0.9.5 only accepts plain Python types as per-call inputs and serialises nested lists slowly
(SYFT_NOTES.md), so weights travel as one base64 string of an uncompressed ``.npz``.

Incoming weights are bounded before anything is decoded: the string's length against what the
model's parameters can take, then each zip member's declared size and storage method (a
compressed member could be a decompression bomb), and only then numpy reads them.

A job call has one string argument (syft's ``weights``), and it carries one of several
protocols. Each is a typed message here (:data:`RoundCall`): :class:`TrainRound`,
:class:`ReplayLast`, and the four phases of secure aggregation. The researcher builds them and
calls ``encode()``; a site calls :func:`decode_call` once, where the call enters, and dispatches
on the type. On the wire a training round is its bare weights blob (base64 never holds a
``:``), and every other message is ``TAG:BODY``; the tags are spelt in this module only.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Required, TypedDict

import numpy as np
import numpy.typing as npt

from policies.errors import WireError
from policies.secagg import MAX_SITES

Weights = dict[str, npt.NDArray[np.floating[Any]]]
Shapes = dict[str, tuple[int, ...]]
MAX_TENSOR_NORM = 1e4  # L2 norm of any one incoming tensor
_NPY_HEADER = 512  # generous bound on one .npy member's header
_ZIP_PER_MEMBER = 256  # zip local + central headers, name included


def encode_weights(weights: Weights) -> str:
    """Pack named arrays into a base64 ``.npz`` string (float32, stored, not compressed)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v, dtype=np.float32) for k, v in weights.items()})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def max_encoded_length(expected: Shapes) -> int:
    """The longest base64 string that weights of these shapes can honestly be."""
    raw = sum(
        4 * math.prod(s) + _NPY_HEADER + _ZIP_PER_MEMBER + 2 * len(n) for n, s in expected.items()
    )
    return 4 * (raw + 22 + 2) // 3 + 4


def decode_weights(blob: str, expected: Shapes | None = None) -> Weights:
    """Unpack a string made by :func:`encode_weights`; pickled objects are never loaded.

    With ``expected`` (names and shapes from the model spec), sizes are checked before any
    byte is decoded, and the result is checked with :func:`check_weights`.
    """
    if not isinstance(blob, str):
        raise WireError(f"weights must be a base64 string, got {type(blob).__name__}")
    if expected is not None and len(blob) > max_encoded_length(expected):
        raise WireError(
            f"weights are {len(blob)} characters, more than the model's "
            f"{max_encoded_length(expected)}: refused before decoding"
        )
    try:
        raw = base64.b64decode(blob.encode("ascii"), validate=True)
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            if expected is not None:
                _check_members(archive, expected)
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            weights = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, UnicodeEncodeError) as exc:
        raise WireError(f"weights are not a valid base64 .npz: {exc}") from exc
    if expected is not None:
        check_weights(weights, expected)
    return weights


def _check_members(archive: zipfile.ZipFile, expected: Shapes) -> None:
    members = archive.infolist()
    names = {m.filename.removesuffix(".npy") for m in members}
    if len(members) != len(expected) or names != set(expected):
        check_shapes({n: np.empty(0) for n in names}, expected)  # names the missing/extra ones
    for m in members:
        if m.compress_type != zipfile.ZIP_STORED:
            raise WireError(f"weight {m.filename!r} is compressed; only stored .npz is accepted")
        limit = 4 * math.prod(expected[m.filename.removesuffix(".npy")]) + _NPY_HEADER
        if m.file_size > limit:
            raise WireError(f"weight {m.filename!r} declares {m.file_size} bytes, over {limit}")


def check_shapes(weights: Weights, expected: Shapes) -> None:
    """Raise unless ``weights`` has exactly the expected names and shapes and finite values."""
    if set(weights) != set(expected):
        missing = sorted(set(expected) - set(weights))
        extra = sorted(set(weights) - set(expected))
        raise WireError(f"weight names differ from the model: missing {missing}, extra {extra}")
    for name, shape in expected.items():
        got = tuple(weights[name].shape)
        if got != tuple(shape):
            raise WireError(f"weight {name!r} has shape {got}, the model declares {tuple(shape)}")
        if not np.all(np.isfinite(weights[name])):
            raise WireError(f"weight {name!r} holds NaN or infinite values")


def check_weights(weights: Weights, expected: Shapes) -> None:
    """Names, shapes, dtype float32, finite values and a bounded norm for every tensor."""
    check_shapes(weights, expected)
    for name, value in weights.items():
        if value.dtype != np.float32:
            raise WireError(f"weight {name!r} is {value.dtype}, not float32")
        norm = float(np.linalg.norm(value.astype(np.float64)))
        if norm > MAX_TENSOR_NORM:
            raise WireError(f"weight {name!r} has norm {norm:.3g}, above {MAX_TENSOR_NORM:g}")


# ---------------------------------------------------------------------------------------------
# Round calls: what the one string argument of a job call carries

_REPLAY_TAG, _SECAGG_TAG = "replay", "secagg"  # the wire's tags: spelt here and nowhere else
_REPLAY_BODY = "last"
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")  # a weights blob, or "" for the model's own start
_LABEL = re.compile(r"[A-Za-z0-9_-]{1,64}")
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")  # policies.secagg.fingerprint
_KEY_FIELD = 128  # longest base64 identity key, X25519 key or signature (44 and 88 are real)
_ENTRY = 1024  # bound on one site's share of an envelope (participant, survivor, signature)


def max_call_length(shapes: Shapes) -> int:
    """The longest call a job of this model can honestly make: its weights blob, plus a
    secure-aggregation envelope for :data:`~policies.secagg.MAX_SITES` sites."""
    return max_encoded_length(shapes) + MAX_SITES * _ENTRY


def _blob(value: object, what: str) -> str:
    if not isinstance(value, str) or not _BASE64.fullmatch(value):
        raise WireError(f"{what} must be a base64 weights string")
    return value


def _label(value: object) -> str:
    if not isinstance(value, str) or not _LABEL.fullmatch(value):
        raise WireError("a round label is 1-64 letters, digits, '-' or '_'")
    return value


def _fingerprints(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or len(value) > MAX_SITES:
        raise WireError(f"{what} must be a list of at most {MAX_SITES} sites")
    return tuple(_fingerprint(site, f"each of {what}") for site in value)


def _fingerprint(value: object, what: str) -> str:
    if not isinstance(value, str) or not _FINGERPRINT.fullmatch(value):
        raise WireError(f"{what} must be a site fingerprint (64 hex digits)")
    return value


def _key_field(value: object, what: str) -> str:
    if not isinstance(value, str) or len(value) > _KEY_FIELD or not _BASE64.fullmatch(value):
        raise WireError(f"{what} must be base64 of at most {_KEY_FIELD} characters")
    return value


@dataclass(frozen=True)
class TrainRound:
    """Train one round from these global weights: an :func:`encode_weights` blob, or "" for
    the model's own initialisation at the site."""

    weights: str = ""

    def __post_init__(self) -> None:
        _blob(self.weights, "a training round's weights")

    @classmethod
    def of(cls, weights: Weights | None) -> TrainRound:
        return cls(encode_weights(weights) if weights is not None else "")

    def encode(self) -> str:
        return self.weights  # bare: the format of every plain round since the first


@dataclass(frozen=True)
class ReplayLast:
    """Give again the last reply this job was released: the site neither trains nor charges."""

    def encode(self) -> str:
        return f"{_REPLAY_TAG}:{_REPLAY_BODY}"


@dataclass(frozen=True)
class Participant:
    """One site's X25519 key for a job, signed by its identity key (its ``hello`` reply)."""

    site: str
    identity: str
    key: str
    signature: str

    def __post_init__(self) -> None:
        _fingerprint(self.site, "a participant's site")
        _key_field(self.identity, "a participant's identity")
        _key_field(self.key, "a participant's key")
        _key_field(self.signature, "a participant's signature")

    @classmethod
    def from_dict(cls, value: object) -> Participant:
        fields = ("site", "identity", "key", "signature")
        if not isinstance(value, dict) or set(value) != set(fields):
            raise WireError("a participant entry holds exactly site, identity, key and signature")
        return cls(*(value[f] for f in fields))

    def to_dict(self) -> dict[str, str]:
        return {
            "site": self.site,
            "identity": self.identity,
            "key": self.key,
            "signature": self.signature,
        }


class _SecAgg:
    """A phase of secure aggregation (``policies.secagg``): ``secagg:{json}`` on the wire."""

    phase: ClassVar[str]

    def body(self) -> dict[str, Any]:
        return {}

    def encode(self) -> str:
        return f"{_SECAGG_TAG}:" + json.dumps({"phase": self.phase, **self.body()})


@dataclass(frozen=True)
class SecAggHello(_SecAgg):
    """Ask for the site's X25519 key for this job. No row is read."""

    phase: ClassVar[str] = "hello"


@dataclass(frozen=True)
class SecAggMask(_SecAgg):
    """A training round under secure aggregation: train from ``weights``, mask the update
    with every participant's pair seed for round ``label``."""

    phase: ClassVar[str] = "mask"
    label: str
    weights: str
    participants: tuple[Participant, ...]

    def __post_init__(self) -> None:
        _label(self.label)
        _blob(self.weights, "a masked round's weights")
        if not isinstance(self.participants, tuple) or len(self.participants) > MAX_SITES:
            raise WireError(f"the participant list must hold at most {MAX_SITES} sites")
        if not all(isinstance(p, Participant) for p in self.participants):
            raise WireError("the participant list must hold participant entries")

    def body(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "weights": self.weights,
            "participants": [p.to_dict() for p in self.participants],
        }


@dataclass(frozen=True)
class SecAggSign(_SecAgg):
    """Sign the survivor set of round ``label`` (one set per label, ever)."""

    phase: ClassVar[str] = "sign"
    label: str
    survivors: tuple[str, ...]

    def __post_init__(self) -> None:
        _label(self.label)
        _fingerprints(self.survivors, "the survivor set")

    def body(self) -> dict[str, Any]:
        return {"label": self.label, "survivors": list(self.survivors)}


@dataclass(frozen=True)
class SecAggUnmask(_SecAgg):
    """Reveal the self-mask seed and the dropped sites' pair seeds of round ``label``, given
    every survivor's signature over the survivor set. Carries no keys: a site unmasks with the
    ones it checked when it masked."""

    phase: ClassVar[str] = "unmask"
    label: str
    survivors: tuple[str, ...]
    signatures: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _label(self.label)
        _fingerprints(self.survivors, "the survivor set")
        if not isinstance(self.signatures, Mapping):
            raise WireError("the signatures must map survivors to signatures")
        _fingerprints(list(self.signatures), "the signatures")
        for signature in self.signatures.values():
            _key_field(signature, "a survivor's signature")

    def body(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "survivors": list(self.survivors),
            "signatures": dict(self.signatures),
        }


SecAggCall = SecAggHello | SecAggMask | SecAggSign | SecAggUnmask
RoundCall = TrainRound | ReplayLast | SecAggCall


def decode_call(text: object, shapes: Shapes) -> RoundCall:
    """The message a job call carries, or WireError: an unknown tag or phase, a field too many
    or too few, a wrong type, or a call longer than a job of this model can make (checked
    before anything is parsed). ``shapes``: the approved model's parameters."""
    if not isinstance(text, str):
        raise WireError(f"a round call must be a string, got {type(text).__name__}")
    limit = max_call_length(shapes)
    if len(text) > limit:
        raise WireError(f"a round call of {len(text)} characters, over {limit}: refused unread")
    tag, colon, body = text.partition(":")
    if not colon:
        return TrainRound(text)
    if tag == _REPLAY_TAG and body == _REPLAY_BODY:
        return ReplayLast()
    if tag == _SECAGG_TAG:
        return _decode_secagg(body)
    raise WireError(f"unknown round call {tag[:16]!r}:...")


def _decode_secagg(body: str) -> SecAggCall:
    try:
        message = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise WireError("a secure-aggregation envelope is not JSON") from exc
    if not isinstance(message, dict):
        raise WireError("a secure-aggregation envelope must be a JSON object")
    phase = message.pop("phase", None)
    kinds: dict[str, tuple[str, ...]] = {
        "hello": (),
        "mask": ("label", "weights", "participants"),
        "sign": ("label", "survivors"),
        "unmask": ("label", "survivors", "signatures"),
    }
    if not isinstance(phase, str) or phase not in kinds:
        raise WireError(f"a secure-aggregation phase is one of {', '.join(map(str, kinds))}")
    if set(message) != set(kinds[phase]):
        fields = ", ".join(("phase", *kinds[phase]))
        raise WireError(f"a secure-aggregation {phase} holds exactly: {fields}")
    if phase == "hello":
        return SecAggHello()
    if phase == "mask":
        entries = message["participants"]
        if not isinstance(entries, list) or len(entries) > MAX_SITES:
            raise WireError(f"the participant list must hold at most {MAX_SITES} sites")
        participants = tuple(Participant.from_dict(e) for e in entries)
        return SecAggMask(message["label"], message["weights"], participants)
    survivors = _fingerprints(message["survivors"], "the survivor set")
    if phase == "sign":
        return SecAggSign(message["label"], survivors)
    if not isinstance(message["signatures"], dict):
        raise WireError("the signatures must map survivors to signatures")
    return SecAggUnmask(message["label"], survivors, message["signatures"])


class RoundReply(TypedDict, total=False):
    """What one call of an approved job returns over syft (``run_job``): plain values only.

    ``status`` is "ok"; "failed" or "refused" with one fixed ``reason`` line; or "mock" (syft's
    pass over the mock twin). An ok round carries ``round``, ``n``, ``metrics``, ``privacy``
    and one of: ``weights`` (an :func:`encode_weights` blob), ``update`` and its
    ``compression``, or under secure aggregation ``masked`` and its ``label``. A fine-tuning
    pass says ``personalized`` and sends no weights; a replay of the last release says
    ``replayed``; a dry run on a mock says ``mode`` and gives the model's ``shapes``. The
    other secure-aggregation phases answer ``secagg`` (hello), ``signature`` (sign), or
    ``self_seed`` and ``dropped`` (unmask)."""

    status: Required[str]
    reason: str
    round: int
    n: int
    metrics: dict[str, float]
    privacy: dict[str, Any]
    weights: str
    update: str
    compression: str
    masked: str
    label: str
    personalized: bool
    replayed: bool
    secagg: dict[str, str]
    signature: str
    self_seed: str
    dropped: dict[str, str]
    mode: str
    shapes: dict[str, list[int]]


def frozen_digest(weights: Weights, names: list[str]) -> str:
    """SHA-256 over the named tensors (name, shape, float32 bytes) in sorted order.

    The job carries the digest of its initial weights' frozen layers; a site compares every
    round's incoming frozen tensors with it, so frozen layers cannot change during a job.
    """
    import hashlib

    h = hashlib.sha256()
    for name in sorted(names):
        value = np.ascontiguousarray(weights[name], dtype=np.float32)
        h.update(f"{name}:{value.shape};".encode())
        h.update(value.tobytes())
    return h.hexdigest()
