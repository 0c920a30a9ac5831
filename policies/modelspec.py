"""The declarative model a job carries: layers from the site's allowlist, as plain data.

No researcher code runs at a datasite. A model is a dict::

    {"input": [30], "layers": [
        {"type": "Linear", "in_features": 30, "out_features": 16},
        {"type": "ReLU"},
        {"type": "Residual", "layers": [{"type": "Linear", "in_features": 16, "out_features": 16}]},
        {"type": "Linear", "in_features": 16, "out_features": 2},
    ]}

This module is torch-free on purpose: the review parses and bounds a spec, infers every layer's
output shape and counts parameters by arithmetic, without building or running anything. The
site builds the ``nn.Module`` with its own code (``policies.torch_model``).

Why an allowlist and not a denylist: DP-SGD's guarantee holds only if what is released is a
function of the clipped, noised gradients. A layer with running statistics (BatchNorm) or one
that mixes the rows of a batch breaks per-sample clipping silently, and a custom ``forward`` can
do anything; every layer here acts on one row at a time and has parameters only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from policies.errors import PlanError

MAX_LAYERS = 64  # layers in the whole spec, containers included
MAX_DEPTH = 4  # nesting of Sequential/Residual
MAX_DIM = 65_536  # any feature, channel or embedding size
MAX_KERNEL = 15
MAX_ACTIVATIONS = 2_000_000  # numbers one row produces in any layer (memory per row)
MAX_PARAMETERS = 50_000_000  # a hard cap beside each dataset policy's own limit

REFUSED = {
    "BatchNorm1d": "keeps running statistics and mixes the rows of a batch",
    "BatchNorm2d": "keeps running statistics and mixes the rows of a batch",
    "BatchNorm3d": "keeps running statistics and mixes the rows of a batch",
    "SyncBatchNorm": "keeps running statistics and mixes the rows of a batch",
    "InstanceNorm1d": "may keep running statistics (buffers that leave unnoised)",
    "InstanceNorm2d": "may keep running statistics (buffers that leave unnoised)",
    "LazyLinear": "has no fixed shape to review",
}

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Arg:
    """One constructor argument: its kind, bounds and default (``...`` means required)."""

    kind: str  # int | float | bool | ints (int or list of 1-2 ints) | shape (list of ints)
    low: float = 0
    high: float = MAX_DIM
    default: Any = ...


_CONV = {
    "in_channels": Arg("int", 1),
    "out_channels": Arg("int", 1),
    "kernel_size": Arg("ints", 1, MAX_KERNEL),
    "stride": Arg("ints", 1, MAX_KERNEL, 1),
    "padding": Arg("ints", 0, MAX_KERNEL, 0),
    "dilation": Arg("ints", 1, MAX_KERNEL, 1),
    "bias": Arg("bool", default=True),
}
_POOL = {
    "kernel_size": Arg("ints", 1, MAX_KERNEL),
    "stride": Arg("ints", 1, MAX_KERNEL, None),
    "padding": Arg("ints", 0, MAX_KERNEL, 0),
}
_NONE: dict[str, Arg] = {}

LAYERS: dict[str, dict[str, Arg]] = {
    "Linear": {
        "in_features": Arg("int", 1),
        "out_features": Arg("int", 1),
        "bias": Arg("bool", default=True),
    },
    "Conv1d": _CONV,
    "Conv2d": _CONV,
    "ReLU": _NONE,
    "LeakyReLU": {"negative_slope": Arg("float", 0.0, 1.0, 0.01)},
    "GELU": _NONE,
    "SiLU": _NONE,
    "Tanh": _NONE,
    "Sigmoid": _NONE,
    "Softmax": {"dim": Arg("int", -1, -1, -1)},
    "LogSoftmax": {"dim": Arg("int", -1, -1, -1)},
    "Dropout": {"p": Arg("float", 0.0, 0.99, 0.5)},
    "Flatten": {"start_dim": Arg("int", 1, 1, 1), "end_dim": Arg("int", -1, -1, -1)},
    "Unflatten": {"dim": Arg("int", 1, 1, 1), "unflattened_size": Arg("shape", 1)},
    "MaxPool1d": _POOL,
    "MaxPool2d": _POOL,
    "AvgPool1d": _POOL,
    "AvgPool2d": _POOL,
    "AdaptiveAvgPool1d": {"output_size": Arg("ints", 1, 4096)},
    "AdaptiveAvgPool2d": {"output_size": Arg("ints", 1, 4096)},
    "LayerNorm": {
        "normalized_shape": Arg("shape", 1),
        "eps": Arg("float", 1e-12, 1.0, 1e-5),
        "elementwise_affine": Arg("bool", default=True),
    },
    "GroupNorm": {
        "num_groups": Arg("int", 1),
        "num_channels": Arg("int", 1),
        "eps": Arg("float", 1e-12, 1.0, 1e-5),
        "affine": Arg("bool", default=True),
    },
    "Embedding": {"num_embeddings": Arg("int", 1, 1_000_000), "embedding_dim": Arg("int", 1)},
}
CONTAINERS = ("Sequential", "Residual")
SPATIAL = {"Conv1d": 1, "Conv2d": 2, "MaxPool1d": 1, "MaxPool2d": 2, "AvgPool1d": 1}
SPATIAL |= {"AvgPool2d": 2, "AdaptiveAvgPool1d": 1, "AdaptiveAvgPool2d": 2}


@dataclass(frozen=True)
class LayerRow:
    """One line of the architecture table the review shows."""

    path: str
    type: str
    output_shape: Shape
    parameters: int


@dataclass(frozen=True)
class ModelSpec:
    """A parsed, bounded model: normalised layer dicts, input shape, and what they imply."""

    input: Shape
    layers: tuple[dict[str, Any], ...]
    rows: tuple[LayerRow, ...]
    parameters: dict[str, Shape]  # trainable tensors by the name the site's builder gives them

    @property
    def output(self) -> Shape:
        return self.rows[-1].output_shape if self.rows else self.input

    @property
    def n_parameters(self) -> int:
        return sum(math.prod(s) for s in self.parameters.values())

    def to_dict(self) -> dict[str, Any]:
        return {"input": list(self.input), "layers": [dict(x) for x in self.layers]}

    def table(self) -> list[dict[str, Any]]:
        return [
            {
                "layer": r.path,
                "type": r.type,
                "output": list(r.output_shape),
                "params": r.parameters,
            }
            for r in self.rows
        ]


def parse(data: Any) -> ModelSpec:
    """Validate a model dict; raises PlanError naming the layer and the limit it breaks.

    Cost is bounded by ``MAX_LAYERS`` whatever was submitted: sizes are checked before any
    walk, and nothing is allocated per parameter.
    """
    if not isinstance(data, dict) or set(data) != {"input", "layers"}:
        raise PlanError("model must be a dict with exactly 'input' and 'layers'")
    shape = _shape_arg("model input", data["input"], 1)
    if len(shape) > 3:
        raise PlanError("model input has more than 3 dimensions")
    _count_layers(data["layers"], 0, [0])
    walker = _Walker()
    layers = walker.sequence(data["layers"], shape, "", top=True)
    spec = ModelSpec(shape, tuple(layers), tuple(walker.rows), dict(walker.params))
    if spec.n_parameters > MAX_PARAMETERS:
        raise PlanError(f"model has {spec.n_parameters} parameters, above {MAX_PARAMETERS}")
    if not spec.parameters:
        raise PlanError("model has no trainable layer")
    return spec


def _count_layers(layers: Any, depth: int, seen: list[int]) -> None:
    if not isinstance(layers, list):
        raise PlanError("model 'layers' must be a list")
    if depth > MAX_DEPTH:
        raise PlanError(f"model nests containers deeper than {MAX_DEPTH}")
    for layer in layers:
        seen[0] += 1
        if seen[0] > MAX_LAYERS:
            raise PlanError(f"model has more than {MAX_LAYERS} layers")
        if isinstance(layer, dict) and layer.get("type") in CONTAINERS:
            _count_layers(layer.get("layers"), depth + 1, seen)


class _Walker:
    def __init__(self) -> None:
        self.rows: list[LayerRow] = []
        self.params: dict[str, Shape] = {}

    def sequence(
        self, layers: list[Any], shape: Shape, prefix: str, top: bool = False
    ) -> list[Any]:
        out = []
        for i, layer in enumerate(layers):
            path = f"{prefix}{i}"
            if not isinstance(layer, dict) or not isinstance(layer.get("type"), str):
                raise PlanError(f"layer {path}: must be a dict with a 'type'")
            kind = layer["type"]
            if kind == "Embedding" and not (top and i == 0):
                raise PlanError(f"layer {path} (Embedding): only allowed as the first layer")
            if kind in CONTAINERS:
                norm, shape = self.container(layer, shape, path)
            else:
                norm, shape = self.leaf(layer, shape, path)
            out.append(norm)
        return out

    def container(
        self, layer: dict[str, Any], shape: Shape, path: str
    ) -> tuple[dict[str, Any], Shape]:
        kind = layer["type"]
        if set(layer) != {"type", "layers"}:
            raise PlanError(f"layer {path} ({kind}): takes only 'layers'")
        inner_prefix = f"{path}.body." if kind == "Residual" else f"{path}."
        inner = self.sequence(layer["layers"], shape, inner_prefix)
        out_shape = self.rows[-1].output_shape if inner else shape
        if kind == "Residual" and out_shape != shape:
            raise PlanError(
                f"layer {path} (Residual): its body maps {list(shape)} to {list(out_shape)}; "
                "a residual needs the same shape out as in"
            )
        self.rows.append(LayerRow(path, kind, out_shape, 0))
        return {"type": kind, "layers": inner}, out_shape

    def leaf(self, layer: dict[str, Any], shape: Shape, path: str) -> tuple[dict[str, Any], Shape]:
        kind = layer["type"]
        if kind in REFUSED:
            raise PlanError(f"layer {path} ({kind}) is refused: it {REFUSED[kind]}")
        if kind not in LAYERS:
            raise PlanError(
                f"layer {path}: {kind!r} is not on the site's allowlist "
                f"({', '.join(sorted(LAYERS))}, Sequential, Residual)"
            )
        args = _args(kind, {k: v for k, v in layer.items() if k != "type"}, path)
        out_shape, params = _infer(kind, args, shape, path)
        for name, pshape in params.items():
            self.params[f"{path}.{name}"] = pshape
        if math.prod(out_shape) > MAX_ACTIVATIONS:
            raise PlanError(
                f"layer {path} ({kind}) produces {math.prod(out_shape)} numbers per row, "
                f"above {MAX_ACTIVATIONS}"
            )
        n = sum(math.prod(s) for s in params.values())
        self.rows.append(LayerRow(path, kind, out_shape, n))
        return {"type": kind, **args}, out_shape


def _args(kind: str, given: dict[str, Any], path: str) -> dict[str, Any]:
    schema = LAYERS[kind]
    unknown = sorted(set(given) - set(schema))
    if unknown:
        raise PlanError(f"layer {path} ({kind}): unknown argument(s) {', '.join(unknown)}")
    out = {}
    for name, arg in schema.items():
        if name not in given:
            if arg.default is ...:
                raise PlanError(f"layer {path} ({kind}): argument {name} is required")
            out[name] = arg.default
            continue
        out[name] = _value(f"layer {path} ({kind}) {name}", given[name], arg, kind)
    return out


def _value(where: str, value: Any, arg: Arg, kind: str) -> Any:
    if value is None and arg.default is None:
        return None
    if arg.kind == "bool":
        if not isinstance(value, bool):
            raise PlanError(f"{where} must be true or false, got {value!r}")
        return value
    if arg.kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PlanError(f"{where} must be a number, got {value!r}")
        if not (math.isfinite(value) and arg.low <= value <= arg.high):
            raise PlanError(f"{where} must be in [{arg.low}, {arg.high}], got {value!r}")
        return float(value)
    if arg.kind == "int":
        return _int(where, value, arg)
    if arg.kind == "shape":
        return list(_shape_arg(where, value, arg.low))
    # "ints": one int, or one per spatial dimension
    n = SPATIAL.get(kind, 1)
    values = list(value) if isinstance(value, list | tuple) else [value]
    values = values * n if len(values) == 1 else values
    if len(values) != n:
        raise PlanError(f"{where} must be one integer or {n}, got {value!r}")
    ints = [_int(where, v, arg) for v in values]
    return ints


def _int(where: str, value: Any, arg: Arg) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(f"{where} must be an integer, got {value!r}")
    if not arg.low <= value <= arg.high:
        raise PlanError(f"{where} must be in [{arg.low:g}, {arg.high:g}], got {value}")
    return int(value)


def _shape_arg(where: str, value: Any, low: float) -> Shape:
    if not isinstance(value, list | tuple) or not 1 <= len(value) <= 4:
        raise PlanError(f"{where} must be a list of 1 to 4 integers, got {value!r}")
    return tuple(_int(where, v, Arg("int", low)) for v in value)


def _infer(kind: str, a: dict[str, Any], shape: Shape, path: str) -> tuple[Shape, dict[str, Shape]]:
    """Output shape (per row) and trainable parameter shapes of one layer."""
    where = f"layer {path} ({kind})"
    if kind == "Linear":
        if shape[-1] != a["in_features"]:
            raise PlanError(f"{where} expects {a['in_features']} features, gets {list(shape)}")
        params: dict[str, Shape] = {"weight": (a["out_features"], a["in_features"])}
        if a["bias"]:
            params["bias"] = (a["out_features"],)
        return (*shape[:-1], a["out_features"]), params
    if kind in ("Conv1d", "Conv2d"):
        return _conv(where, a, shape, SPATIAL[kind])
    if kind in ("MaxPool1d", "MaxPool2d", "AvgPool1d", "AvgPool2d"):
        return _pool(where, a, shape, SPATIAL[kind]), {}
    if kind in ("AdaptiveAvgPool1d", "AdaptiveAvgPool2d"):
        n = SPATIAL[kind]
        _need_dims(where, shape, n + 1)
        return (shape[0], *a["output_size"]), {}
    if kind == "Flatten":
        return (math.prod(shape),), {}
    if kind == "Unflatten":
        if len(shape) != 1 or math.prod(a["unflattened_size"]) != shape[0]:
            raise PlanError(f"{where} cannot turn {list(shape)} into {a['unflattened_size']}")
        return tuple(a["unflattened_size"]), {}
    if kind == "LayerNorm":
        norm = tuple(a["normalized_shape"])
        if shape[-len(norm) :] != norm:
            raise PlanError(f"{where} normalises {list(norm)} but gets {list(shape)}")
        affine = {"weight": norm, "bias": norm} if a["elementwise_affine"] else {}
        return shape, affine
    if kind == "GroupNorm":
        c, g = a["num_channels"], a["num_groups"]
        if shape[0] != c or c % g:
            raise PlanError(f"{where}: {c} channels in {g} groups does not fit {list(shape)}")
        return shape, ({"weight": (c,), "bias": (c,)} if a["affine"] else {})
    if kind == "Embedding":
        if len(shape) != 1:
            raise PlanError(f"{where} takes a flat row of integer codes, gets {list(shape)}")
        return (shape[0], a["embedding_dim"]), {"weight": (a["num_embeddings"], a["embedding_dim"])}
    return shape, {}  # activations, Softmax/LogSoftmax on the last dimension, Dropout


def _need_dims(where: str, shape: Shape, n: int) -> None:
    if len(shape) != n:
        raise PlanError(f"{where} needs input of {n} dimensions per row, gets {list(shape)}")


def _conv(where: str, a: dict[str, Any], shape: Shape, n: int) -> tuple[Shape, dict[str, Shape]]:
    _need_dims(where, shape, n + 1)
    if shape[0] != a["in_channels"]:
        raise PlanError(f"{where} expects {a['in_channels']} channels, gets {list(shape)}")
    sizes = []
    for length, k, s, p, d in zip(
        shape[1:], a["kernel_size"], a["stride"], a["padding"], a["dilation"], strict=True
    ):
        out = (length + 2 * p - d * (k - 1) - 1) // s + 1
        if out < 1:
            raise PlanError(f"{where}: kernel {k} does not fit input {list(shape)}")
        sizes.append(out)
    params = {"weight": (a["out_channels"], a["in_channels"], *a["kernel_size"])}
    if a["bias"]:
        params["bias"] = (a["out_channels"],)
    return (a["out_channels"], *sizes), params


def _pool(where: str, a: dict[str, Any], shape: Shape, n: int) -> Shape:
    _need_dims(where, shape, n + 1)
    stride = a["stride"] or a["kernel_size"]
    sizes = []
    for length, k, s, p in zip(shape[1:], a["kernel_size"], stride, a["padding"], strict=True):
        if 2 * p > k:
            raise PlanError(f"{where}: padding {p} is more than half the kernel {k}")
        out = (length + 2 * p - k) // s + 1
        if out < 1:
            raise PlanError(f"{where}: kernel {k} does not fit input {list(shape)}")
        sizes.append(out)
    return (shape[0], *sizes)


def iter_layers(layers: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every leaf layer of a normalised spec, depth first."""
    for layer in layers:
        if layer["type"] in CONTAINERS:
            yield from iter_layers(layer["layers"])
        else:
            yield layer
