"""Encoding of model weights for syft calls.

syft 0.9.5 only accepts plain Python types as per-call inputs and serialises nested lists slowly
(SYFT_NOTES.md), so weights travel as one base64 string of an uncompressed ``.npz``.
"""

from __future__ import annotations

import base64
import io
import zipfile

import numpy as np

from policies.errors import WireError

Weights = dict[str, np.ndarray]


def encode_weights(weights: Weights) -> str:
    """Pack named arrays into a base64 ``.npz`` string."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v, dtype=np.float32) for k, v in weights.items()})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_weights(blob: str) -> Weights:
    """Unpack a string made by :func:`encode_weights`; pickled objects are never loaded."""
    try:
        raw = base64.b64decode(blob.encode("ascii"), validate=True)
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, UnicodeEncodeError) as exc:
        raise WireError(f"weights are not a valid base64 .npz: {exc}") from exc


def check_shapes(weights: Weights, expected: dict[str, tuple[int, ...]]) -> None:
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
