"""The declarative model: parse bounds and refusals, shape and parameter arithmetic against the
torch builder, the researcher's converter, and bounded weight decoding."""

from __future__ import annotations

import base64
import io
import math
import time

import numpy as np
import pytest
import torch
from torch import nn

from policies.errors import PlanError, WireError
from policies.modelspec import MAX_LAYERS, parse
from policies.torch_model import Residual, build, to_spec
from policies.wire import decode_weights, encode_weights, max_encoded_length

MODELS = {
    "mlp": (nn.Sequential(nn.Linear(30, 16), nn.GELU(), nn.Dropout(0.1), nn.Linear(16, 2)), 30),
    "cnn": (
        nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 4, 3, padding=1, stride=1),
            nn.GroupNorm(2, 4),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.AvgPool2d(2, stride=1),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16, 10),
            nn.LogSoftmax(dim=-1),
        ),
        64,
    ),
    "conv1d": (
        nn.Sequential(
            nn.Unflatten(1, (2, 16)),
            nn.Conv1d(2, 3, 3, dilation=2),
            nn.AvgPool1d(2),
            nn.MaxPool1d(2),
            nn.AdaptiveAvgPool1d(2),
            nn.Flatten(),
            nn.Linear(6, 1),
            nn.Sigmoid(),
        ),
        32,
    ),
    "residual": (
        nn.Sequential(
            nn.Linear(8, 8),
            nn.LayerNorm(8),
            Residual(nn.Linear(8, 8), nn.Tanh()),
            nn.LeakyReLU(0.2),
            nn.Linear(8, 3),
            nn.Softmax(dim=-1),
        ),
        8,
    ),
    "embedding": (nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2)), 3),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_spec_arithmetic_matches_torch(name: str) -> None:
    module, width = MODELS[name]
    spec = parse(to_spec(module, [width]))
    model = build(spec)
    torch_params = {k: tuple(p.shape) for k, p in module.named_parameters()}
    assert spec.parameters == torch_params  # same names as the researcher's own module
    assert spec.n_parameters == sum(p.numel() for p in module.parameters())
    x = torch.randint(0, 10, (5, width)).float() if name == "embedding" else torch.randn(5, width)
    assert tuple(model(x).shape[1:]) == spec.output
    for row in spec.rows:
        assert row.parameters == sum(
            math.prod(s) for k, s in spec.parameters.items() if k.rsplit(".", 1)[0] == row.path
        )


def test_builder_output_equals_researcher_module_with_same_weights() -> None:
    module, width = MODELS["residual"]
    model = build(to_spec(module, [width]))
    model.load_state_dict(module.state_dict())
    x = torch.randn(4, width)
    assert torch.allclose(model.eval()(x), module.eval()(x))


@pytest.mark.parametrize(
    ("layers", "match"),
    [
        ([{"type": "BatchNorm1d", "num_features": 3}], "BatchNorm1d.*running statistics"),
        ([{"type": "Identity"}], "not on the site's allowlist"),
        ([{"type": "Linear", "in_features": 3, "out_features": 2, "x": 1}], "unknown argument"),
        ([{"type": "Linear", "in_features": 4, "out_features": 2}], "expects 4 features"),
        ([{"type": "Linear", "in_features": 3, "out_features": "2"}], "must be an integer"),
        ([{"type": "Linear", "in_features": 3, "out_features": True}], "must be an integer"),
        ([{"type": "Linear", "in_features": 3, "out_features": 10**6}], r"in \[1, 65536\]"),
        ([{"type": "Softmax", "dim": 0}], "dim"),
        ([{"type": "ReLU"}], "no trainable layer"),
        (
            [
                {
                    "type": "Residual",
                    "layers": [{"type": "Linear", "in_features": 3, "out_features": 2}],
                }
            ],
            "same shape",
        ),
        (
            [
                {"type": "Linear", "in_features": 3, "out_features": 3},
                {"type": "Embedding", "num_embeddings": 4, "embedding_dim": 2},
            ],
            "first layer",
        ),
        ([{"type": "ReLU"}] * (MAX_LAYERS + 1), "more than 64 layers"),
    ],
)
def test_parse_refuses_with_the_layer_named(layers: list, match: str) -> None:
    with pytest.raises(PlanError, match=match):
        parse({"input": [3], "layers": layers})


def test_parse_is_bounded_whatever_the_size() -> None:
    started = time.perf_counter()
    with pytest.raises(PlanError):
        parse({"input": [3], "layers": [{"type": "ReLU"}] * 10**6})
    deep: dict = {"type": "Sequential", "layers": []}
    node = deep
    for _ in range(500):
        child = {"type": "Sequential", "layers": []}
        node["layers"].append(child)
        node = child
    with pytest.raises(PlanError, match="deeper"):
        parse({"input": [3], "layers": [deep]})
    assert time.perf_counter() - started < 2.0


def test_converter_refuses_what_a_spec_cannot_say() -> None:
    class Custom(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(PlanError, match="layer 1 \\(Custom\\)"):
        to_spec(nn.Sequential(nn.Linear(3, 2), Custom()), [3])
    hooked = nn.Linear(3, 2)
    hooked.register_forward_hook(lambda *a: None)
    with pytest.raises(PlanError, match="hooks"):
        to_spec(nn.Sequential(hooked), [3])
    frozen = nn.Linear(3, 2)
    frozen.weight.requires_grad_(False)
    with pytest.raises(PlanError, match="frozen"):
        to_spec(frozen, [3])
    with pytest.raises(PlanError, match="groups"):
        to_spec(nn.Sequential(nn.Unflatten(1, (2, 2)), nn.Conv1d(2, 2, 1, groups=2)), [4])


SHAPES = {"0.weight": (8, 30), "0.bias": (8,)}


def _zeros() -> dict:
    return {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}


def test_weights_round_trip_and_bounds() -> None:
    blob = encode_weights(_zeros())
    assert len(blob) <= max_encoded_length(SHAPES)
    assert decode_weights(blob, SHAPES)["0.weight"].shape == (8, 30)
    with pytest.raises(WireError, match="refused before decoding"):
        decode_weights(blob + "A" * max_encoded_length(SHAPES), SHAPES)
    buf = io.BytesIO()
    np.savez_compressed(buf, **_zeros())
    with pytest.raises(WireError, match="compressed"):
        decode_weights(base64.b64encode(buf.getvalue()).decode(), SHAPES)
    for bad, match in (
        ({**_zeros(), "0.bias": np.full(8, np.nan, np.float32)}, "NaN"),
        ({**_zeros(), "0.bias": np.full(8, 1e5, np.float32)}, "norm"),
        ({"0.weight": np.zeros((8, 30), np.float32)}, "missing"),
    ):
        with pytest.raises(WireError, match=match):
            decode_weights(encode_weights(bad), SHAPES)


def test_embedding_indices_are_clamped_never_raised() -> None:
    """An IndexError whose occurrence depends on private values would be a free threshold query
    (red-team finding): out-of-range, negative and NaN codes are clamped instead."""
    spec = {
        "input": [3],
        "layers": [
            {"type": "Embedding", "num_embeddings": 5, "embedding_dim": 2},
            {"type": "Flatten"},
            {"type": "Linear", "in_features": 6, "out_features": 2},
        ],
    }
    model = build(spec)
    edge = model(torch.tensor([[4.0, 0.0, 0.0]]))
    wild = model(torch.tensor([[1e9, -5.0, float("nan")]]))
    assert torch.equal(edge, wild)


@pytest.mark.parametrize(
    "scaling",
    [
        {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1e-45]},
        {"mean": [0.0, 0.0, float("inf")], "std": [1.0, 1.0, 1.0]},
        {"mean": [0.0, 0.0], "std": [1.0, 1.0]},
        {"mean": [0.0, 0.0, "0"], "std": [1.0, 1.0, 1.0]},
    ],
)
def test_job_refuses_scaling_that_could_turn_rows_into_infinities(scaling: dict) -> None:
    from policies.plan import JobSpec, TrainingPlan

    model = {"input": [3], "layers": [{"type": "Linear", "in_features": 3, "out_features": 2}]}
    plan = TrainingPlan.of(noise_multiplier=1.0)
    JobSpec("j", "d", "t", model, plan, scaling={"mean": [0, 0, 0], "std": [1, 1, 1]})
    with pytest.raises(PlanError, match="scaling"):
        JobSpec("j", "d", "t", model, plan, scaling=scaling)
