"""Compressed updates: hand-computed cases, unbiasedness, error feedback, and hostile payloads."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

from policies.compression import compress, decompress, topk_count
from policies.errors import WireError

SHAPES = {"w": (2, 2), "b": (2,)}


def _delta(values: list[float]) -> dict[str, np.ndarray]:
    v = np.asarray(values, np.float32)
    return {"w": v[:4].reshape(2, 2), "b": v[4:]}


def test_int8_hand_case_and_scale_per_tensor() -> None:
    delta = _delta([1.27, -0.635, 0.0, 0.5, 0.002, -0.004])
    blob, residual = compress(delta, SHAPES, "int8", rng=np.random.default_rng(0))
    assert residual is None
    out = decompress(blob, SHAPES, "int8")
    # w: scale 1.27/127 = 0.01; 1.27 -> 127 exactly, -0.635 -> -64 or -63 (stochastic)
    assert out["w"][0, 0] == pytest.approx(1.27, abs=1e-6)
    assert out["w"][0, 1] in (pytest.approx(-0.64, abs=1e-6), pytest.approx(-0.63, abs=1e-6))
    assert out["w"][1, 0] == 0.0
    # b has its own scale 0.004/127: its small values are not flattened by w's scale
    assert out["b"][1] == pytest.approx(-0.004, abs=1e-9)
    assert np.all(np.abs(out["b"] - delta["b"]) <= 0.004 / 127 + 1e-9)


def test_int8_rounding_is_unbiased() -> None:
    delta = _delta([1.0, 0.3337, -0.2511, 0.0049, 0.7, -0.05])
    rng = np.random.default_rng(1)
    mean = {k: np.zeros(s) for k, s in SHAPES.items()}
    trials = 4000
    for _ in range(trials):
        out = decompress(compress(delta, SHAPES, "int8", rng=rng)[0], SHAPES, "int8")
        for k in mean:
            mean[k] += out[k] / trials
    # one rounding step is 1/127 of the tensor's max; the mean of 4000 is within ~4 sd of it
    assert np.allclose(mean["w"], delta["w"], atol=4 * (1 / 127) / np.sqrt(trials) + 1e-6)
    assert np.allclose(mean["b"], delta["b"], atol=4 * (0.7 / 127) / np.sqrt(trials) + 1e-6)


def test_topk_hand_case_with_error_feedback() -> None:
    shapes = {"v": (4,)}
    blob, residual = compress({"v": np.array([0.1, -0.5, 0.3, 0.05])}, shapes, "topk", 0.5)
    assert decompress(blob, shapes, "topk", 0.5)["v"].tolist() == pytest.approx([0, -0.5, 0.3, 0])
    assert residual.tolist() == pytest.approx([0.1, 0.0, 0.0, 0.05])
    # next round's update is zero: what was held back goes out now
    blob, residual = compress({"v": np.zeros(4)}, shapes, "topk", 0.5, residual)
    assert decompress(blob, shapes, "topk", 0.5)["v"].tolist() == pytest.approx([0.1, 0, 0, 0.05])
    assert residual.tolist() == pytest.approx([0, 0, 0, 0])


def test_topk_sends_ceil_fraction_and_the_sum_over_rounds_is_kept() -> None:
    assert topk_count(10, 0.1) == 1 and topk_count(11, 0.1) == 2 and topk_count(3, 0.01) == 1
    rng = np.random.default_rng(2)
    shapes = {"v": (50,)}
    sent, truth, residual = np.zeros(50), np.zeros(50), None
    for _ in range(20):
        d = rng.normal(size=50)
        truth += d
        blob, residual = compress({"v": d}, shapes, "topk", 0.2, residual)
        sent += decompress(blob, shapes, "topk", 0.2)["v"]
    # error feedback: everything not yet sent is exactly the residual
    assert np.allclose(sent + residual, truth, atol=1e-4)


def _npz(**arrays: np.ndarray) -> str:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize(
    ("blob", "kind", "match"),
    [
        (_npz(index=np.array([0, 9], np.uint32), value=np.ones(2, np.float32)), "topk", "inside"),
        (
            _npz(index=np.array([1, 1], np.uint32), value=np.ones(2, np.float32)),
            "topk",
            "increasing",
        ),
        (_npz(index=np.array([0, 1], np.int64), value=np.ones(2, np.float32)), "topk", "expected"),
        (
            _npz(index=np.array([0, 1], np.uint32), value=np.array([1, np.nan], np.float32)),
            "topk",
            "finite",
        ),
        (_npz(q=np.zeros(6, np.int8), scale=np.array([1, -1], np.float32)), "int8", "non-negative"),
        (_npz(q=np.zeros(7, np.int8), scale=np.ones(2, np.float32)), "int8", "expected"),
        ("not base64!", "int8", "valid"),
        ("A" * 100_000, "int8", "over"),
    ],
)
def test_a_hostile_compressed_update_is_refused(blob: str, kind: str, match: str) -> None:
    with pytest.raises(WireError, match=match):
        decompress(blob, SHAPES, kind, 0.3)


def test_the_researcher_rebuilds_each_site_model_from_what_it_sent() -> None:
    from policies.wire import encode_weights
    from researcher.job import make_job
    from researcher.rounds import weights_of_reply

    layers = [
        {"type": "Linear", "in_features": 2, "out_features": 2},
        {"type": "ReLU"},
        {"type": "Linear", "in_features": 2, "out_features": 1},
    ]
    sent = {
        "0.weight": np.ones((2, 2), np.float32),
        "0.bias": np.zeros(2, np.float32),
        "2.weight": np.full((1, 2), 2.0, np.float32),
        "2.bias": np.zeros(1, np.float32),
    }
    plan = {"rounds": 1, "noise_multiplier": 1.0, "loss": "mse"}
    frozen = make_job(layers, "d", "y", {**plan, "frozen": ["0"]}, n_features=2, initial=sent)
    trained = {
        "2.weight": np.array([[3.0, 4.0]], np.float32),
        "2.bias": np.array([0.5], np.float32),
    }
    got = weights_of_reply({"weights": encode_weights(trained)}, frozen, sent)
    assert got["0.weight"].tolist() == sent["0.weight"].tolist()  # never sent back: kept
    assert got["2.weight"].tolist() == [[3.0, 4.0]] and got["2.bias"].tolist() == [0.5]
    with pytest.raises(WireError, match="missing"):  # a site that returns a frozen layer
        weights_of_reply({"weights": encode_weights(sent)}, frozen, sent)

    topk = make_job(
        layers, "d", "y", {**plan, "compression": "topk", "topk_fraction": 0.2}, n_features=2
    )
    delta = {k: np.zeros_like(v) for k, v in sent.items()}
    delta["2.weight"] = np.array([[0.0, -1.5]], np.float32)
    delta["0.bias"] = np.array([0.25, 0.0], np.float32)
    blob, _ = compress(delta, topk.trainable, "topk", 0.2)  # k = ceil(0.2 * 9) = 2
    got = weights_of_reply({"update": blob, "compression": "topk"}, topk, sent)
    assert got["2.weight"].tolist() == [[2.0, 0.5]] and got["0.bias"].tolist() == [0.25, 0.0]
    with pytest.raises(WireError, match="the plan says"):
        weights_of_reply({"update": blob, "compression": "int8"}, topk, sent)


@pytest.mark.parametrize(
    ("kind", "arrays"),
    [
        ("int8", {"q": np.full(8, 127, np.int8), "scale": np.array([3e38, 1.0], np.float32)}),
        ("topk", {"index": np.array([0], np.uint32), "value": np.array([3e38], np.float32)}),
    ],
)
def test_a_reply_that_rebuilds_to_infinite_weights_is_refused(kind: str, arrays: dict) -> None:
    """Red team: finite payloads whose sum with the sent weights overflows float32 went into
    the global model; every site then refused the next round's weights."""
    from policies.compression import _pack
    from researcher.job import make_job
    from researcher.rounds import weights_of_reply

    layers = [{"type": "Linear", "in_features": 3, "out_features": 2}]
    plan = {"noise_multiplier": 1.0, "compression": kind, "topk_fraction": 0.1}
    spec = make_job(layers, "d", "y", plan, n_features=3)
    sent = {"0.weight": np.full((2, 3), 3e38, np.float32), "0.bias": np.zeros(2, np.float32)}
    with pytest.raises(WireError):
        weights_of_reply({"update": _pack(arrays), "compression": kind, "n": 10}, spec, sent)
