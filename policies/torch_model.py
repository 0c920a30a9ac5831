"""Model spec <-> torch: the one builder both sides use, and the researcher's converter.

``build`` is the only way a datasite turns a job into an ``nn.Module``: every class it
instantiates is torch's own (or ``Residual``/``SpecModel`` below), with arguments already
bounded by ``policies.modelspec.parse``. ``to_spec`` runs at the researcher, on the
researcher's own ``nn.Sequential``, and refuses what the spec cannot say (a custom ``forward``,
a buffer, a hook, an unknown layer), naming the layer.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import torch
from torch import nn

from policies.errors import PlanError
from policies.modelspec import CONTAINERS, LAYERS, REFUSED, ModelSpec, parse
from policies.wire import Weights


class Residual(nn.Module):
    """``x + body(x)``: the one container with a forward of its own, written by the project."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        body: torch.Tensor = self.body(x)
        return x + body


class SpecModel(nn.Sequential):
    """The top-level model a site builds; feeds integer codes to a leading Embedding."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__(*layers)
        self.index_input = bool(layers) and type(layers[0]) is nn.Embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.index_input:  # never an IndexError whose occurrence depends on private values
            top = cast(nn.Embedding, self[0]).num_embeddings - 1
            x = torch.nan_to_num(x, nan=0.0, posinf=top, neginf=0.0).clamp(0, top).long()
        # torch leaves Sequential.forward unannotated (untyped_calls_exclude misses super())
        out: torch.Tensor = super().forward(x)  # type: ignore[no-untyped-call]
        return out


def build(spec: ModelSpec | dict[str, Any]) -> SpecModel:
    """The site's own ``nn.Module`` for a spec; its parameters are exactly ``spec.parameters``."""
    if not isinstance(spec, ModelSpec):
        spec = parse(spec)
    model = SpecModel(*(_module(layer) for layer in spec.layers))
    built = {k: tuple(p.shape) for k, p in model.named_parameters()}
    if built != spec.parameters:  # the arithmetic the review showed must be what trains
        raise PlanError(f"builder and spec disagree on parameters: {built} != {spec.parameters}")
    return model


def _module(layer: dict[str, Any]) -> nn.Module:
    kind = layer["type"]
    if kind == "Sequential":
        return nn.Sequential(*(_module(x) for x in layer["layers"]))
    if kind == "Residual":
        return Residual(*(_module(x) for x in layer["layers"]))
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in layer.items() if k != "type"}
    if kind in ("MaxPool1d", "MaxPool2d", "AvgPool1d", "AvgPool2d") and args["stride"] is None:
        args.pop("stride")
    module: nn.Module = getattr(nn, kind)(**args)
    return module


def weights_of(model: nn.Module) -> Weights:
    """Trainable parameters only, by the names the builder gives them: what may leave a site."""
    return {
        name.removeprefix("_module."): p.detach().cpu().numpy().astype(np.float32)
        for name, p in model.named_parameters()
    }


def load(model: nn.Module, weights: Weights) -> nn.Module:
    """Copy named arrays into the model's parameters (names and shapes checked by the caller)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(torch.as_tensor(value, dtype=params[name].dtype))
    return model


# ---------------------------------------------------------------------------------------------
# researcher side: nn.Module -> spec


def to_spec(module: nn.Module, input_shape: tuple[int, ...] | list[int]) -> dict[str, Any]:
    """The spec dict of a researcher's model, or PlanError naming the layer that cannot go."""
    if not isinstance(module, nn.Module):  # say, a make_model that returns nothing
        raise PlanError(
            "the model must be an nn.Module, a list of layer dicts or a spec dict, "
            f"not {type(module).__name__}"
        )
    if type(module) in (nn.Sequential, SpecModel):
        layers = [_layer(child, str(i)) for i, child in enumerate(cast(nn.Sequential, module))]
    else:
        layers = [_layer(module, "0")]
    spec = {"input": [int(n) for n in input_shape], "layers": layers}
    parse(spec)  # shapes and bounds, with the same messages the site would give
    return spec


def _layer(m: nn.Module, path: str) -> dict[str, Any]:
    kind = type(m).__name__
    if kind in REFUSED:
        raise PlanError(f"layer {path} ({kind}) is refused: it {REFUSED[kind]}")
    if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks:
        raise PlanError(f"layer {path} ({kind}) has hooks; hooks cannot be sent to a datasite")
    if type(m) is nn.Sequential:
        return {"type": "Sequential", "layers": [_layer(c, f"{path}.{i}") for i, c in enumerate(m)]}
    if type(m) is Residual:
        return {
            "type": "Residual",
            "layers": [_layer(c, f"{path}.body.{i}") for i, c in enumerate(m.body)],
        }
    if kind not in LAYERS or type(m) is not getattr(nn, kind, None):
        raise PlanError(
            f"layer {path} ({kind}) is not a torch layer on the site's allowlist: a custom module "
            f"(its own forward) cannot be sent; use {', '.join(sorted(LAYERS))}, "
            f"{', '.join(CONTAINERS)}"
        )
    if any(True for _ in m.buffers(recurse=False)):
        names = ", ".join(n for n, _ in m.named_buffers(recurse=False))
        raise PlanError(f"layer {path} ({kind}) holds buffers ({names}); buffers cannot leave")
    if any(not p.requires_grad for p in m.parameters(recurse=False)):
        raise PlanError(f"layer {path} ({kind}) has frozen parameters, which a job cannot carry")
    return {"type": kind, **_ARGS.get(kind, _no_args)(m, f"layer {path} ({kind})")}


def _no_args(m: nn.Module, where: str) -> dict[str, Any]:
    if isinstance(m, nn.GELU) and m.approximate != "none":
        raise PlanError(f"{where}: only approximate='none' is supported")
    return {}


def _need(where: str, ok: bool, what: str) -> None:
    if not ok:
        raise PlanError(f"{where}: {what}")


def _ints(v: Any) -> list[int]:
    return [int(x) for x in (v if isinstance(v, tuple | list) else (v,))]


def _conv(m: nn.Conv1d | nn.Conv2d, where: str) -> dict[str, Any]:
    _need(where, m.groups == 1, "groups must be 1")
    _need(where, m.padding_mode == "zeros", "padding_mode must be 'zeros'")
    _need(where, not isinstance(m.padding, str), "padding must be numbers, not a string")
    return {
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "kernel_size": _ints(m.kernel_size),
        "stride": _ints(m.stride),
        "padding": _ints(m.padding),
        "dilation": _ints(m.dilation),
        "bias": m.bias is not None,
    }


def _pool(
    m: nn.MaxPool1d | nn.MaxPool2d | nn.AvgPool1d | nn.AvgPool2d, where: str
) -> dict[str, Any]:
    _need(where, not m.ceil_mode, "ceil_mode is not supported")
    if isinstance(m, nn.MaxPool1d | nn.MaxPool2d):
        _need(where, _ints(m.dilation) in ([1], [1, 1]) and not m.return_indices, "plain pool only")
    else:
        _need(where, m.count_include_pad, "count_include_pad must stay True")
    return {
        "kernel_size": _ints(m.kernel_size),
        "stride": _ints(m.stride),
        "padding": _ints(m.padding),
    }


def _softmax(m: nn.Softmax | nn.LogSoftmax, where: str) -> dict[str, Any]:
    _need(where, m.dim == -1, "dim must be -1 (the last dimension of a row)")
    return {"dim": -1}


def _embedding(m: nn.Embedding, where: str) -> dict[str, Any]:
    ok = m.padding_idx is None and m.max_norm is None and not m.sparse
    _need(where, ok, "padding_idx, max_norm and sparse are not supported")
    return {"num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim}


def _layer_norm(m: nn.LayerNorm, where: str) -> dict[str, Any]:
    _need(where, not m.elementwise_affine or m.bias is not None, "bias=False is not supported")
    return {
        "normalized_shape": list(m.normalized_shape),
        "eps": m.eps,
        "elementwise_affine": m.elementwise_affine,
    }


_ARGS: dict[str, Any] = {
    "Linear": lambda m, w: {
        "in_features": m.in_features,
        "out_features": m.out_features,
        "bias": m.bias is not None,
    },
    "Conv1d": _conv,
    "Conv2d": _conv,
    "LeakyReLU": lambda m, w: {"negative_slope": float(m.negative_slope)},
    "Softmax": _softmax,
    "LogSoftmax": _softmax,
    "Dropout": lambda m, w: {"p": float(m.p)},
    "Flatten": lambda m, w: {"start_dim": m.start_dim, "end_dim": m.end_dim},
    "Unflatten": lambda m, w: {"dim": m.dim, "unflattened_size": list(m.unflattened_size)},
    "MaxPool1d": _pool,
    "MaxPool2d": _pool,
    "AvgPool1d": _pool,
    "AvgPool2d": _pool,
    "AdaptiveAvgPool1d": lambda m, w: {"output_size": _ints(m.output_size)},
    "AdaptiveAvgPool2d": lambda m, w: {"output_size": _ints(m.output_size)},
    "LayerNorm": _layer_norm,
    "GroupNorm": lambda m, w: {
        "num_groups": m.num_groups,
        "num_channels": m.num_channels,
        "eps": m.eps,
        "affine": m.affine,
    },
    "Embedding": _embedding,
}
