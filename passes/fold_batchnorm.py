"""Fold an eval-mode BatchNorm into the Conv, ConvTranspose or Linear that feeds it.

With ``f = gamma / sqrt(running_var + eps)`` per output channel::

    W' = W * f          (broadcast on the output-channel axis: 0 for Conv/Linear, 1 for ConvTranspose)
    b' = (b - mean) * f + beta

Rewrite cases:
  * ``batch_norm(conv(x, W, b))`` with ``training=False`` → ``conv(x, W', b')``
  * the same after ``conv_transpose`` (groups handled per group) and ``linear``.

Refused (left unchanged): a BatchNorm in training mode; a producer with other users; a weight or
bias that is not a constant or is read by another node (a shared weight); BN statistics that are
not constants.

On an ONNX model (onnx-ir) the same fold applies to ``BatchNormalization`` after ``Conv``,
``ConvTranspose`` or ``Gemm`` (whose ``B`` may be stored (K, N)), with the same refusals; this is
what real exported models at opset 11-12 carry.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import torch
import torch.fx

from qgraph._pass import Pass, PassResult
from qgraph.graph import constant_value, is_constant, op_kind, set_attr, unique_attr_name
from qgraph.onnx_graph import add_initializer, drop_unused_initializers
from qgraph.passes._util import delete_unused_attrs

__all__ = ["FoldBatchNorm"]

logger = logging.getLogger(__name__)

_BN = torch.ops.aten.batch_norm.default
_BIAS_INDEX = 2  # conv*, conv_transpose*, linear: (input, weight, bias, ...)


class FoldBatchNorm(Pass):
    """Fold eval-mode BatchNorm into the preceding weighted op. Counts: ``folded``."""

    name = "fold-batchnorm"
    graphs = ("fx", "onnx")

    def call(self, graph: torch.fx.GraphModule | ir.Model) -> PassResult:
        if isinstance(graph, ir.Model):
            folded = sum(_try_fold_onnx(graph.graph, n) for n in list(graph.graph) if n.op_type == "BatchNormalization")
            if folded:
                drop_unused_initializers(graph.graph)  # the BatchNorm statistics
            return PassResult(graph, modified=folded > 0, counts={"folded": folded})
        folded = 0
        for node in list(graph.graph.nodes):
            if node.op == "call_function" and node.target is _BN:
                folded += self._try_fold(graph, node)
        if folded:
            graph.graph.eliminate_dead_code()
            delete_unused_attrs(graph, _all_attr_targets(graph))
            graph.recompile()
        return PassResult(graph, modified=folded > 0, counts={"folded": folded})

    def _try_fold(self, gm: torch.fx.GraphModule, bn: torch.fx.Node) -> bool:
        why = _refusal(gm, bn)
        if why:
            logger.debug("not folding %s: %s", bn.name, why)
            return False
        producer = bn.args[0]
        w_node = producer.args[1]
        b_node = producer.args[_BIAS_INDEX] if len(producer.args) > _BIAS_INDEX else None
        weight = constant_value(gm, w_node).detach()
        bias = constant_value(gm, b_node).detach() if b_node is not None else None
        gamma, beta, mean, var = (constant_value(gm, n).detach() if n is not None else None for n in bn.args[1:5])
        groups = _transpose_groups(producer) if op_kind(producer) == "ConvTranspose" else None
        new_w, new_b = _folded(weight, bias, gamma, beta, mean, var, bn.args[7], groups)
        set_attr(gm, w_node.target, torch.nn.Parameter(new_w, requires_grad=False))
        if b_node is not None:
            set_attr(gm, b_node.target, torch.nn.Parameter(new_b, requires_grad=False))
        else:
            target = w_node.target.rsplit(".", 1)[0] + ".bias" if "." in w_node.target else ""
            if not target or _attr_exists(gm, target):
                target = unique_attr_name(gm, f"{w_node.target}_bias")
            set_attr(gm, target, torch.nn.Parameter(new_b, requires_grad=False))
            with gm.graph.inserting_before(producer):
                b_node = gm.graph.get_attr(target)
            args = list(producer.args) + [None] * (_BIAS_INDEX + 1 - len(producer.args))
            args[_BIAS_INDEX] = b_node
            producer.args = tuple(args)
        bn.replace_all_uses_with(producer)
        gm.graph.erase_node(bn)
        return True


def _attr_exists(gm: torch.nn.Module, target: str) -> bool:
    obj = gm
    for part in target.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _all_attr_targets(gm: torch.fx.GraphModule) -> set[str]:
    return {name for name, _ in gm.named_parameters()} | {name for name, _ in gm.named_buffers()}


def _refusal(gm: torch.fx.GraphModule, bn: torch.fx.Node) -> str:
    """Why this BatchNorm cannot be folded, or '' if it can."""
    producer, gamma, beta, mean, var, training = bn.args[:6]
    if training:
        return "BatchNorm is in training mode"
    if not isinstance(producer, torch.fx.Node) or op_kind(producer) not in (
        "Conv",
        "ConvTranspose",
        "Gemm",
    ):
        return "input is not a Conv, ConvTranspose or Linear"
    if len(producer.users) != 1:
        return f"{producer.name} has other users"
    if not all(is_constant(t) for t in (mean, var)) or not all(
        t is None or is_constant(t) for t in (gamma, beta)
    ):
        return "BatchNorm parameters are not constants"
    w_node = producer.args[1]
    b_node = producer.args[_BIAS_INDEX] if len(producer.args) > _BIAS_INDEX else None
    for const in (w_node, b_node):
        if const is None:
            continue
        if not is_constant(const):
            return "weight or bias is not a constant"
        readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == const.target]
        if len(const.users) != 1 or len(readers) != 1:
            return f"{const.target} is shared with another op"
    return ""


def _folded(weight, bias, gamma, beta, mean, var, eps: float, transpose_groups: int | None):  # noqa: ANN001, ANN202
    """(W', b') of the module docstring, in float64; ``transpose_groups``: None for Conv/Linear
    (output channels on axis 0), the group count for ConvTranspose (axis 1, per group)."""
    f = torch.rsqrt(var.to(torch.float64) + eps)
    if gamma is not None:
        f = f * gamma.to(torch.float64)
    shift = -mean.to(torch.float64) * f
    if beta is not None:
        shift = shift + beta.to(torch.float64)
    new_b = shift if bias is None else bias.to(torch.float64) * f + shift
    w = weight.to(torch.float64)
    if transpose_groups is not None:
        groups = transpose_groups
        # weight (C_in, C_out/groups, k...): output channel g*C_out/groups + j sits at [g*C_in/groups + i, j]
        w = w.reshape(groups, w.shape[0] // groups, *w.shape[1:])
        fshape = (groups, 1, w.shape[2]) + (1,) * (w.dim() - 3)
        w = (w * f.reshape(fshape)).reshape(weight.shape)
    else:
        w = w * f.reshape((-1,) + (1,) * (w.dim() - 1))
    return w.to(weight.dtype), new_b.to(weight.dtype)


def _transpose_groups(node: torch.fx.Node) -> int:
    # conv_transpose{1,2,3}d.input(input, weight, bias, stride, padding, output_padding, groups, dilation)
    if len(node.args) > 6:
        return int(node.args[6])
    return int(node.kwargs.get("groups", 1))


def _try_fold_onnx(graph: ir.Graph, bn: ir.Node) -> bool:
    """ONNX: ``BatchNormalization(Conv|ConvTranspose|Gemm(x, W, b))`` → ``Conv(x, W', b')``."""
    why = _refusal_onnx(bn)
    if why:
        logger.debug("not folding %s: %s", bn.name, why)
        return False
    producer = bn.inputs[0].producer()
    w_value = producer.inputs[1]
    b_value = producer.inputs[2] if len(producer.inputs) > 2 else None
    tensor = lambda v: torch.from_numpy(np.array(v.const_value.numpy())) if v is not None else None  # noqa: E731
    weight = tensor(w_value)
    transposed = producer.op_type == "Gemm" and not producer.attributes.get_int("transB", 0)
    if transposed:
        weight = weight.t()  # Gemm B (K, N): fold on N, then store it back as (K, N)
    groups = producer.attributes.get_int("group", 1) if producer.op_type == "ConvTranspose" else None
    eps = bn.attributes.get_float("epsilon", 1e-5)
    new_w, new_b = _folded(weight, tensor(b_value), *(tensor(v) for v in bn.inputs[1:5]), eps, groups)
    new_w = new_w.t() if transposed else new_w
    w_value.const_value = ir.Tensor(new_w.contiguous().numpy(), name=w_value.name)
    if b_value is not None:
        b_value.const_value = ir.Tensor(new_b.numpy(), name=b_value.name)
    else:
        bias = add_initializer(graph, f"{w_value.name}_bias", new_b.numpy())
        producer.resize_inputs(3)
        producer.replace_input_with(2, bias)
    out, folded = bn.outputs[0], producer.outputs[0]
    folded.shape = out.shape
    if out.is_graph_output():  # the model's output keeps its name
        out.name, folded.name = f"{out.name}_unfolded", out.name
    out.replace_all_uses_with(folded, replace_graph_outputs=True)
    graph.remove(bn, safe=True)
    return True


def _refusal_onnx(bn: ir.Node) -> str:
    """Why an ONNX BatchNormalization cannot be folded, or '' if it can."""
    if bn.attributes.get_int("training_mode", 0) or len(bn.outputs) > 1:
        return "BatchNormalization in training mode"
    producer = bn.inputs[0].producer()
    if producer is None or producer.op_type not in ("Conv", "ConvTranspose", "Gemm") or producer.domain not in ("", "ai.onnx"):
        return "input is not a Conv, ConvTranspose or Gemm"
    if len(list(producer.outputs[0].uses())) != 1 or producer.outputs[0].is_graph_output():
        return f"{producer.name} has other readers"
    if producer.op_type == "Gemm" and (producer.attributes.get_int("transA", 0) or producer.attributes.get_float("beta", 1.0) != 1.0):
        return "Gemm with transA or beta != 1"
    if any(v is None or v.const_value is None for v in bn.inputs[1:5]):
        return "BatchNormalization parameters are not constants"
    for const in producer.inputs[1:3]:
        if const is not None and (const.const_value is None or len(list(const.uses())) != 1 or const.is_graph_output()):
            return "weight or bias is not a constant of its own"
    return ""
