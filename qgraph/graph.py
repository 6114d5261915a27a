"""Helpers over torch.fx graphs from ``torch.export``: op kinds, constants, attributes.

qgraph names operations by *op kind* — the ONNX operator a node lowers to (``Conv``, ``Gemm``,
``MatMul``, ``Add``, ``MaxPool`` ...). Backend rules are written over op kinds, so the same rule
data can later be applied to graphs that come from an ONNX file.
"""

from __future__ import annotations

import copy

import torch
import torch.fx

__all__ = [
    "OP_KINDS",
    "op_kind",
    "get_attr",
    "set_attr",
    "is_constant",
    "constant_value",
    "unique_attr_name",
    "node_label",
    "sharing_copy",
]

_aten = torch.ops.aten

#: aten overload packet → op kind. One explicit table; nodes not listed have no kind.
OP_KINDS: dict[object, str] = {
    _aten.conv1d: "Conv",
    _aten.conv2d: "Conv",
    _aten.conv3d: "Conv",
    _aten.conv_transpose1d: "ConvTranspose",
    _aten.conv_transpose2d: "ConvTranspose",
    _aten.conv_transpose3d: "ConvTranspose",
    _aten.linear: "Gemm",
    _aten.matmul: "MatMul",
    _aten.mm: "MatMul",
    _aten.bmm: "MatMul",
    _aten.add: "Add",
    _aten.add_: "Add",
    _aten.max_pool1d: "MaxPool",
    _aten.max_pool2d: "MaxPool",
    _aten.max_pool3d: "MaxPool",
    _aten.avg_pool1d: "AveragePool",
    _aten.avg_pool2d: "AveragePool",
    _aten.avg_pool3d: "AveragePool",
    _aten.adaptive_avg_pool1d: "GlobalAveragePool",
    _aten.adaptive_avg_pool2d: "GlobalAveragePool",
    _aten.adaptive_avg_pool3d: "GlobalAveragePool",
    _aten.mean: "ReduceMean",
    _aten.batch_norm: "BatchNormalization",
    _aten.layer_norm: "LayerNormalization",
    _aten.relu: "Relu",
    _aten.relu_: "Relu",
    _aten.hardtanh: "Clip",
    _aten.hardtanh_: "Clip",
    _aten.clamp: "Clip",
    _aten.gelu: "Gelu",
    _aten.silu: "Silu",
    _aten.sigmoid: "Sigmoid",
    _aten.tanh: "Tanh",
    _aten.softmax: "Softmax",
    _aten._softmax: "Softmax",
    _aten.scaled_dot_product_attention: "Attention",
    _aten.mul: "Mul",
    _aten.div: "Div",
    _aten.sub: "Sub",
    _aten.cat: "Concat",
    _aten.flatten: "Flatten",
    _aten.view: "Reshape",
    _aten.reshape: "Reshape",
    _aten.transpose: "Transpose",
    _aten.permute: "Transpose",
    _aten.t: "Transpose",
    _aten.contiguous: "Identity",
    _aten.dropout: "Identity",
    _aten.embedding: "Gather",
}

#: Ops that only move or view data; summaries do not list them as "left in float".
DATA_MOVEMENT = frozenset({"Flatten", "Reshape", "Transpose", "Identity", "Concat"})


def op_kind(node: torch.fx.Node) -> str | None:
    """The op kind of a ``call_function`` node, or None if qgraph does not know it."""
    if node.op != "call_function":
        return None
    packet = getattr(node.target, "overloadpacket", None)
    kind = OP_KINDS.get(packet) if packet is not None else None
    if kind == "ConvTranspose" or (packet is _aten.convolution and node.args[6]):
        return "ConvTranspose"
    if packet is _aten.convolution:
        return "Conv"
    return kind


def node_label(node: torch.fx.Node) -> str:
    """A short human label: ``conv2d_1 (Conv)``."""
    kind = op_kind(node)
    return f"{node.name} ({kind})" if kind else node.name


def get_attr(gm: torch.nn.Module, target: str) -> torch.Tensor:
    """The tensor or module at a dotted attribute path of ``gm``."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_attr(gm: torch.nn.Module, target: str, value: torch.Tensor | torch.nn.Module) -> None:
    """Set a dotted attribute; tensors become parameters if they need grad, else buffers."""
    *path, last = target.split(".")
    owner = gm
    for part in path:
        owner = getattr(owner, part)
    if isinstance(value, torch.nn.Module):
        owner.add_module(last, value)
        return
    if hasattr(owner, last):
        delattr(owner, last)
    if isinstance(value, torch.nn.Parameter):
        owner.register_parameter(last, value)
    else:
        owner.register_buffer(last, value)


def sharing_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph and meta that shares its submodules,
    parameters and buffers: edits to the graph or top-level attributes (what qgraph's passes
    add, replace or delete) leave ``gm`` as it was, and no tensor is copied (a deep copy would
    double a large model). A pass that writes into a shared tensor or module writes into
    ``gm``'s."""
    new = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph), gm.__class__.__name__)
    new.meta = dict(gm.meta)  # top-level keys only
    new.training = gm.training
    return new


def unique_attr_name(gm: torch.nn.Module, base: str) -> str:
    """A top-level attribute name of ``gm`` that is free, derived from ``base``."""
    base = base.replace(".", "_")
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def is_constant(node: object) -> bool:
    """True for a ``get_attr`` node holding a tensor (a parameter or buffer)."""
    return isinstance(node, torch.fx.Node) and node.op == "get_attr"


def constant_value(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor:
    """The tensor behind a ``get_attr`` node."""
    return get_attr(gm, node.target)
