"""Read a float ONNX model (as exported from PyTorch) into qgraph's torch graph.

Each ONNX node becomes one call of the equivalent torch function in an fx graph whose constants
(initializers) are parameters and buffers under their ONNX names; the result is then captured with
``torch.export`` like any PyTorch model, so every pass, rule and backend applies unchanged. The op
set covered is what ``torch.onnx.export`` emits for CNNs, MLPs and transformer encoders (opset 11
and up); a model with any other op is refused with a message naming the op.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch
import torch.fx
import torch.nn.functional as F

from qgraph._errors import InputError, first_line

__all__ = ["load_onnx", "SUPPORTED_OPS"]


def _attr(node: ir.Node, name: str, default=None):  # noqa: ANN001, ANN202
    a = node.attributes.get(name)
    if a is None:
        return default
    return a.value if not isinstance(a.value, ir.TensorProtocol) else a.value.numpy()


def _pads(node: ir.Node, dims: int) -> list[int]:
    pads = list(_attr(node, "pads", [0] * 2 * dims))
    if pads[:dims] != pads[dims:]:
        raise InputError(f"node {node.name}: asymmetric pads {pads} are not supported")
    if _attr(node, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        raise InputError(f"node {node.name}: auto_pad is not supported")
    return pads[:dims]


def _conv(node, x, w, b=None):  # noqa: ANN001, ANN202
    dims = w.dim() - 2
    fn = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    return fn(x, w, b, list(_attr(node, "strides", [1] * dims)), _pads(node, dims),
              list(_attr(node, "dilations", [1] * dims)), _attr(node, "group", 1))


def _conv_transpose(node, x, w, b=None):  # noqa: ANN001, ANN202
    dims = w.dim() - 2
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
    return fn(x, w, b, list(_attr(node, "strides", [1] * dims)), _pads(node, dims),
              list(_attr(node, "output_padding", [0] * dims)), _attr(node, "group", 1),
              list(_attr(node, "dilations", [1] * dims)))


def _gemm(node, a, b, c=None):  # noqa: ANN001, ANN202
    if _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0 or _attr(node, "transA", 0):
        raise InputError(f"node {node.name}: Gemm with alpha/beta != 1 or transA is not supported")
    return F.linear(a, b, c) if _attr(node, "transB", 0) else F.linear(a, b.t(), c)


def _pool(node, x, kind):  # noqa: ANN001, ANN202
    dims = x.dim() - 2
    kernel = list(_attr(node, "kernel_shape"))
    stride = list(_attr(node, "strides", kernel))
    pads = _pads(node, dims)
    ceil = bool(_attr(node, "ceil_mode", 0))
    if kind == "max":
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[dims - 1]
        return fn(x, kernel, stride, pads, list(_attr(node, "dilations", [1] * dims)), ceil)
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[dims - 1]
    return fn(x, kernel, stride, pads, ceil, bool(_attr(node, "count_include_pad", 0)))


def _reduce_mean(node, x, axes=None):  # noqa: ANN001, ANN202
    axes = sorted(int(a) % x.dim() for a in _attr(node, "axes", axes if axes is not None else range(x.dim())))
    keep = bool(_attr(node, "keepdims", 1))
    if keep and x.dim() == 4 and axes == [2, 3]:
        return F.adaptive_avg_pool2d(x, 1)  # what torch.onnx writes for adaptive_avg_pool2d(x, 1)
    return torch.mean(x, axes, keepdim=keep)


def _reshape(node, x, shape):  # noqa: ANN001, ANN202
    shape = [int(s) for s in shape]
    if not _attr(node, "allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    if node.dynamic_batch and shape and isinstance(shape[0], int) and shape[0] > 0:
        if -1 in shape[1:]:
            raise InputError(
                f"node {node.name}: Reshape to {shape} fixes the batch at {shape[0]} although the "
                "model's batch is dynamic; re-export the model with a dynamic or a static batch"
            )
        shape[0] = -1  # a batch the exporter baked into a flatten-like reshape stays dynamic
    return torch.reshape(x, shape)


def _softmax(node, x):  # noqa: ANN001, ANN202
    if node.opset >= 13:
        return torch.softmax(x, _attr(node, "axis", -1))
    # opset < 13: softmax over all dims from `axis` (default 1) flattened together
    axis = _attr(node, "axis", 1) % x.dim()
    flat = torch.reshape(x, (*x.shape[:axis], -1))
    return torch.reshape(torch.softmax(flat, -1), x.shape)


def _flatten(node, x):  # noqa: ANN001, ANN202
    axis = _attr(node, "axis", 1)
    return torch.flatten(x, axis) if axis == 1 else torch.reshape(x, (math.prod(x.shape[:axis]), -1))


def _split(node, x, split=None):  # noqa: ANN001, ANN202
    axis = _attr(node, "axis", 0)
    sizes = _attr(node, "split", split)
    if sizes is None:
        return torch.chunk(x, _attr(node, "num_outputs", len(node.outputs)), axis)
    return torch.split(x, [int(s) for s in sizes], axis)


def _layer_norm(node, x, scale, bias=None):  # noqa: ANN001, ANN202
    axis = _attr(node, "axis", -1) % x.dim()
    return F.layer_norm(x, x.shape[axis:], scale, bias, _attr(node, "epsilon", 1e-5))


def _batch_norm(node, x, scale, bias, mean, var):  # noqa: ANN001, ANN202
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, _attr(node, "epsilon", 1e-5))


def _clip(node, x, lo=None, hi=None):  # noqa: ANN001, ANN202
    lo = _attr(node, "min", lo)
    hi = _attr(node, "max", hi)
    return torch.clamp(x, None if lo is None else float(lo), None if hi is None else float(hi))


def _gelu(node, x):  # noqa: ANN001, ANN202
    approx = _attr(node, "approximate", "none")
    return F.gelu(x, approximate=approx.decode() if isinstance(approx, bytes) else approx)


def _squeeze(node, x, axes=None):  # noqa: ANN001, ANN202
    axes = _attr(node, "axes", axes)
    return torch.squeeze(x, [int(a) for a in axes]) if axes is not None else torch.squeeze(x)


def _unsqueeze(node, x, axes=None):  # noqa: ANN001, ANN202
    out = x
    for a in sorted(int(a) % (x.dim() + len(axes)) for a in _attr(node, "axes", axes)):
        out = torch.unsqueeze(out, a)
    return out


#: ONNX op type → (function(node, *inputs), indices of inputs that must be constants read as lists).
SUPPORTED_OPS = {
    "Conv": (_conv, ()),
    "ConvTranspose": (_conv_transpose, ()),
    "Gemm": (_gemm, ()),
    "MatMul": (lambda n, a, b: torch.matmul(a, b), ()),
    "_Linear": (lambda n, x, w, b: F.linear(x, w, b), ()),
    "Add": (lambda n, a, b: torch.add(a, b), ()),
    "Sub": (lambda n, a, b: torch.sub(a, b), ()),
    "Mul": (lambda n, a, b: torch.mul(a, b), ()),
    "Div": (lambda n, a, b: torch.div(a, b), ()),
    "Relu": (lambda n, x: torch.relu(x), ()),
    "Sigmoid": (lambda n, x: torch.sigmoid(x), ()),
    "Tanh": (lambda n, x: torch.tanh(x), ()),
    "Erf": (lambda n, x: torch.erf(x), ()),
    "Gelu": (_gelu, ()),
    "Clip": (_clip, (1, 2)),
    "Softmax": (_softmax, ()),
    "MaxPool": (lambda n, x: _pool(n, x, "max"), ()),
    "AveragePool": (lambda n, x: _pool(n, x, "avg"), ()),
    "GlobalAveragePool": (lambda n, x: F.adaptive_avg_pool2d(x, 1) if x.dim() == 4 else torch.mean(x, list(range(2, x.dim())), keepdim=True), ()),
    "ReduceMean": (_reduce_mean, (1,)),
    "Reshape": (_reshape, (1,)),
    "Flatten": (_flatten, ()),
    "Transpose": (lambda n, x: x.permute(list(_attr(n, "perm", range(x.dim() - 1, -1, -1)))), ()),
    "Split": (_split, (1,)),
    "Concat": (lambda n, *xs: torch.cat(xs, _attr(n, "axis")), ()),
    "LayerNormalization": (_layer_norm, ()),
    "BatchNormalization": (_batch_norm, ()),
    "Identity": (lambda n, x: x, ()),
    "Squeeze": (_squeeze, (1,)),
    "Unsqueeze": (_unsqueeze, (1,)),
}


class _Node:
    """One ONNX node held as plain data (attributes by value), for the interpreter below."""

    def __init__(self, node: ir.Node, opset: int, dynamic_batch: bool) -> None:
        self.opset = opset
        self.dynamic_batch = dynamic_batch
        self.name = node.name or node.op_type
        self.op_type = node.op_type
        self.attributes = {k: _Attr(v.value) for k, v in node.attributes.items()}
        self.inputs = [v.name if v is not None else "" for v in node.inputs]
        self.outputs = [v.name for v in node.outputs]


class _Attr:
    def __init__(self, value: object) -> None:
        if isinstance(value, ir.TensorProtocol):
            value = value.numpy()
        elif isinstance(value, (list, tuple)):
            value = list(value)
        self.value = value


class _OnnxModule(torch.nn.Module):
    """Interprets the ONNX graph op by op; ``torch.export`` traces it into an ATen graph.

    Float initializers are parameters under their ONNX names (``stem.0.weight``); other constants
    are plain tensors or python lists (shapes, axes).
    """

    def __init__(self, graph: ir.Graph, opset: int) -> None:
        super().__init__()
        dynamic_batch = any(
            v.shape is not None and len(v.shape) and not isinstance(v.shape[0], int)
            for v in graph.inputs
            if v.const_value is None
        )
        self.input_names = [v.name for v in graph.inputs if v.const_value is None]
        self.output_names = [v.name for v in graph.outputs]
        self.nodes: list[_Node] = []
        self.consts: dict[str, np.ndarray] = {}
        self.params: dict[str, str] = {}
        for value in graph.initializers.values():
            self.consts[value.name] = np.array(value.const_value.numpy())
        for node in graph:
            if node.domain not in ("", "ai.onnx"):
                raise InputError(
                    f"node {node.name or node.op_type}: op {node.domain}::{node.op_type} is not supported "
                    "(custom-domain ops are not read)"
                )
            if node.op_type == "Constant":
                self.consts[node.outputs[0].name] = np.array(node.attributes["value"].as_tensor().numpy())
                continue
            if node.op_type not in SUPPORTED_OPS:
                raise InputError(
                    f"node {node.name or node.op_type}: ONNX op {node.op_type} is not supported by the "
                    f"ONNX reader (supported: {', '.join(sorted(SUPPORTED_OPS))})"
                )
            self.nodes.append(_Node(node, opset, dynamic_batch))
        self._fuse_linear()
        self._transpose_gemm_weights()
        for node in self.nodes:
            _, list_inputs = SUPPORTED_OPS[node.op_type]
            for i, name in enumerate(node.inputs):
                array = self.consts.get(name)
                if array is not None and i not in list_inputs and array.ndim > 0 and name not in self.params:
                    self.params[name] = _register(self, name, torch.from_numpy(array.copy()))

    def _fuse_linear(self) -> None:
        """MatMul(x, W) + Add(b) with constant W (K, N) and b (N,) → one ``linear`` (W stored (N, K)).

        This is how exporters write ``nn.Linear`` on 3-D inputs; read back as ``linear`` it gets
        the same plan (per-output-channel weight scales, fusable residual Adds) as the torch door.
        """
        uses: dict[str, int] = {}
        for node in self.nodes:
            for name in node.inputs:
                uses[name] = uses.get(name, 0) + 1
        for name in self.output_names:
            uses[name] = uses.get(name, 0) + 1
        by_input = {}
        for node in self.nodes:
            for name in node.inputs:
                by_input.setdefault(name, []).append(node)
        fused = []
        for node in self.nodes:
            if node in fused or node.op_type != "MatMul":
                continue
            w = self.consts.get(node.inputs[1])
            out = node.outputs[0]
            add = by_input.get(out, [None])[0]
            if w is None or w.ndim != 2 or uses.get(out) != 1 or add is None or add.op_type != "Add":
                continue
            b_name = add.inputs[1] if add.inputs[0] == out else add.inputs[0]
            b = self.consts.get(b_name)
            if b is None or b.shape != (w.shape[1],):
                continue
            weight_name = f"{node.inputs[1]}.T"
            self.consts[weight_name] = np.ascontiguousarray(w.T)
            node.op_type = "_Linear"
            node.inputs = [node.inputs[0], weight_name, b_name]
            node.outputs = add.outputs
            fused.append(add)
        self.nodes = [n for n in self.nodes if n not in fused]

    def _transpose_gemm_weights(self) -> None:
        """Gemm(A, B) with constant B and transB=0: store B transposed so it stays a constant."""
        for node in self.nodes:
            b = self.consts.get(node.inputs[1]) if node.op_type == "Gemm" else None
            if b is None or b.ndim != 2 or _attr(node, "transB", 0):
                continue
            name = f"{node.inputs[1]}.T"
            self.consts[name] = np.ascontiguousarray(b.T)
            node.inputs[1] = name
            node.attributes["transB"] = _Attr(1)

    def _value(self, env: dict, name: str, as_list: bool) -> object:
        if not name:
            return None
        if name in env:
            return env[name]
        if name in self.params and not as_list:
            return self.get_parameter(self.params[name]) if self.consts[name].dtype.kind == "f" else self.get_buffer(self.params[name])
        if name in self.consts:
            array = self.consts[name]
            return array.tolist() if array.ndim else array.item()
        raise InputError(f"value {name!r} is used before it is defined")

    def forward(self, *inputs: torch.Tensor) -> object:
        env: dict[str, object] = dict(zip(self.input_names, inputs))
        for node in self.nodes:
            fn, list_inputs = SUPPORTED_OPS[node.op_type]
            args = [self._value(env, n, i in list_inputs) for i, n in enumerate(node.inputs)]
            while args and args[-1] is None:
                args.pop()
            result = fn(node, *args)
            if len(node.outputs) == 1:
                env[node.outputs[0]] = result
            else:
                env.update(zip(node.outputs, result))
        outs = tuple(env[n] for n in self.output_names)
        return outs[0] if len(outs) == 1 else outs


def _py_name(name: str) -> str:
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return out if out and not out[0].isdigit() else f"v_{out}"


def _register(root: torch.nn.Module, onnx_name: str, tensor: torch.Tensor) -> str:
    """Register under the ONNX name (dots become submodules), returning the attribute path."""
    parts = ["".join(c if c.isalnum() or c == "_" else "_" for c in p) for p in onnx_name.split(".") if p]
    parts = parts or ["const"]
    owner = root
    for part in parts[:-1]:
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
        if not isinstance(owner, torch.nn.Module):
            return _register(root, "_".join(parts), tensor)
    leaf = parts[-1]
    while hasattr(owner, leaf):
        leaf += "_"
    if tensor.is_floating_point():
        owner.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=False))
    else:
        owner.register_buffer(leaf, tensor)
    return ".".join(parts[:-1] + [leaf])


def load_onnx(path: str | Path, batch: int = 2) -> torch.fx.GraphModule:
    """Read a float ONNX model into a private, torch.export-captured GraphModule.

    Raises:
        InputError: the file is not ONNX, is already quantized, or uses an op the reader lacks.
    """
    from qgraph.capture import INPUT_NAMES, OUTPUT_NAMES, capture

    path = Path(path)
    try:
        proto = onnx.load(str(path))
    except Exception:
        raise InputError(f"{path}: neither a torch.export .pt2 archive nor a valid ONNX model") from None
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise InputError(f"{path}: invalid ONNX model ({first_line(exc)})") from None
    if proto.opset_import and min(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) < 11:
        raise InputError(f"{path}: opset below 11 is not supported")
    quantized = [n.op_type for n in proto.graph.node if "Quantize" in n.op_type or n.op_type.startswith("QLinear")]
    if quantized:
        raise InputError(f"{path}: model is already quantized ({quantized[0]} found); pass a float model")
    model = ir.serde.deserialize_model(proto)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 11)
    module = _OnnxModule(model.graph, opset)
    examples, dynamic = [], []
    for value in model.graph.inputs:
        if value.const_value is not None:
            continue
        if value.dtype not in (ir.DataType.FLOAT, None):
            raise InputError(f"{path}: input {value.name} is {value.dtype}; only float inputs are supported")
        shape = list(value.shape or [])
        # symbolic dims stay dynamic; example sizes: batch 2, any other symbolic dim 3
        dims = [d if isinstance(d, int) else (batch if i == 0 else batch + 1) for i, d in enumerate(shape)]
        dynamic.append({i: torch.export.Dim.AUTO for i, d in enumerate(shape) if not isinstance(d, int)} or None)
        examples.append(torch.randn(dims))
    try:
        gm = capture(module, tuple(examples), dynamic_shapes=(tuple(dynamic),) if any(dynamic) else None)
    except Exception as exc:
        raise InputError(f"{path}: cannot capture the imported model ({first_line(exc)})") from None
    gm.meta[INPUT_NAMES] = list(module.input_names)
    gm.meta[OUTPUT_NAMES] = list(module.output_names)
    return gm
