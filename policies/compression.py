"""Compressed updates: what a site sends back instead of float32 weights, and how it is read.

A site trains, then releases ``delta = trained - incoming`` over the trainable parameters,
flattened in the spec's order into one vector:

* ``int8``: per tensor, scale = max|delta| / 127 and q = floor(delta / scale + U[0, 1)), so
  that E[q * scale] = delta (stochastic rounding, unbiased). 1 byte a number plus 4 per tensor.
* ``topk``: the k = ceil(fraction * size) entries of largest magnitude of ``delta + residual``,
  as (uint32 index, float32 value) pairs; what was not sent stays in the residual, kept at the
  site between rounds and added to the next round's delta (error feedback, Stich et al. 2018).

Both act on the DP release (the trained weights are already noised): choosing, rounding and
remembering after the noise is post-processing, so compression costs no epsilon. The rounding
noise needs no CSPRNG for the same reason.

The researcher rebuilds ``incoming + decompress(...)``; frozen parameters are never sent and are
filled from the weights the researcher itself sent.
"""

from __future__ import annotations

import base64
import io
import math
import zipfile
from typing import Any

import numpy as np
import numpy.typing as npt

from policies.errors import WireError
from policies.wire import Shapes, Weights

INT8, TOPK = "int8", "topk"


def flatten(weights: Weights, shapes: Shapes) -> npt.NDArray[np.float32]:
    return (
        np.concatenate([np.asarray(weights[n], np.float32).ravel() for n in shapes])
        if shapes
        else np.zeros(0, np.float32)
    )


def unflatten(vector: npt.NDArray[np.floating[Any]], shapes: Shapes) -> Weights:
    out, at = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        out[name] = vector[at : at + size].reshape(shape).astype(np.float32)
        at += size
    return out


def topk_count(size: int, fraction: float) -> int:
    return max(1, math.ceil(fraction * size)) if size else 0


def compress(
    delta: Weights,
    shapes: Shapes,
    kind: str,
    fraction: float = 0.1,
    residual: npt.NDArray[np.floating[Any]] | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[str, npt.NDArray[np.floating[Any]] | None]:
    """The encoded update, and the residual to keep for the next round (top-k only)."""
    rng = rng or np.random.default_rng()
    if kind == INT8:
        q, scales = [], []
        for name in shapes:
            d = np.asarray(delta[name], np.float64).ravel()
            scale = float(np.max(np.abs(d))) / 127.0 if d.size else 0.0
            if scale == 0.0 or not math.isfinite(scale):
                q.append(np.zeros(d.size, np.int8))
                scales.append(0.0)
                continue
            rounded = np.floor(d / scale + rng.random(d.size))
            q.append(np.clip(rounded, -127, 127).astype(np.int8))
            scales.append(scale)
        arrays: dict[str, npt.NDArray[Any]] = {
            "q": np.concatenate(q) if q else np.zeros(0, np.int8),
            "scale": np.asarray(scales, np.float32),
        }
        return _pack(arrays), None
    if kind == TOPK:
        acc = flatten(delta, shapes).astype(np.float64)
        if residual is not None and residual.shape == acc.shape:
            acc = acc + residual
        k = topk_count(acc.size, fraction)
        index = (
            np.sort(np.argpartition(np.abs(acc), acc.size - k)[acc.size - k :])
            if k
            else np.zeros(0, np.int64)
        )
        values = acc[index].astype(np.float32)
        left = acc.copy()
        left[index] -= values.astype(np.float64)  # float32 rounding stays in the residual too
        return _pack({"index": index.astype(np.uint32), "value": values}), left
    raise WireError(f"unknown compression {kind!r}")


def decompress(blob: str, shapes: Shapes, kind: str, fraction: float = 0.1) -> Weights:
    """The delta a site sent, checked against the trainable shapes before and after decoding."""
    size = sum(math.prod(s) for s in shapes.values())
    if kind == INT8:
        expected: dict[str, tuple[int, type[np.generic]]]
        expected = {"q": (size, np.int8), "scale": (len(shapes), np.float32)}
    elif kind == TOPK:
        k = topk_count(size, fraction)
        expected = {"index": (k, np.uint32), "value": (k, np.float32)}
    else:
        raise WireError(f"unknown compression {kind!r}")
    arrays = _unpack(blob, expected)
    if kind == INT8:
        scale = arrays["scale"].astype(np.float64)
        if not np.all(np.isfinite(scale)) or np.any(scale < 0):
            raise WireError("int8 scales must be finite and non-negative")
        per_number = np.repeat(scale, [math.prod(s) for s in shapes.values()])
        return unflatten(arrays["q"].astype(np.float64) * per_number, shapes)
    index, value = arrays["index"].astype(np.int64), arrays["value"]
    if index.size and (index.max() >= size or np.any(np.diff(index) <= 0)):
        raise WireError("top-k indices must be increasing and inside the model")
    if not np.all(np.isfinite(value)):
        raise WireError("top-k values must be finite")
    dense = np.zeros(size, np.float64)
    dense[index] = value
    return unflatten(dense, shapes)


def _pack(arrays: dict[str, npt.NDArray[Any]]) -> str:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _unpack(
    blob: str, expected: dict[str, tuple[int, type[np.generic]]]
) -> dict[str, npt.NDArray[Any]]:
    if not isinstance(blob, str):
        raise WireError("a compressed update must be a base64 string")
    limit = 4 * (sum(n * np.dtype(t).itemsize + 1024 for n, t in expected.values()) + 64) // 3
    if len(blob) > limit:
        raise WireError(f"compressed update of {len(blob)} characters, over {limit}")
    try:
        raw = base64.b64decode(blob.encode("ascii"), validate=True)
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            if any(m.compress_type != zipfile.ZIP_STORED for m in archive.infolist()):
                raise WireError("compressed update members must be stored, not deflated")
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, UnicodeEncodeError) as exc:
        raise WireError(f"compressed update is not a valid base64 .npz: {exc}") from exc
    if set(arrays) != set(expected):
        raise WireError(f"compressed update holds {sorted(arrays)}, expected {sorted(expected)}")
    for name, (n, dtype) in expected.items():
        if arrays[name].shape != (n,) or arrays[name].dtype != np.dtype(dtype):
            raise WireError(
                f"compressed update {name!r} is {arrays[name].dtype}{arrays[name].shape}, "
                f"expected {np.dtype(dtype)}({n},)"
            )
    return arrays
