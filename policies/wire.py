"""Encoding of model weights for syft calls, and the checks on weights that cross it.

syft 0.9.5 only accepts plain Python types as per-call inputs and serialises nested lists slowly
(SYFT_NOTES.md), so weights travel as one base64 string of an uncompressed ``.npz``.

Incoming weights are bounded before anything is decoded: the string's length against what the
model's parameters can take, then each zip member's declared size and storage method (a
compressed member could be a decompression bomb), and only then numpy reads them.
"""

from __future__ import annotations

import base64
import io
import math
import zipfile
from typing import Any, Required, TypedDict

import numpy as np
import numpy.typing as npt

from policies.errors import WireError

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


# Sent instead of weights: "give me again the last round you released to this job". A site
# answers from its store, without training or charging (datasites.training.site_job).
REPLAY_LAST = "replay:last"


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
