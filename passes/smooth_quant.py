"""Move activation outliers from a LayerNorm's output into the weights that read it (SmoothQuant).

Per-tensor INT8 activations lose the small channels when a few channels are large (transformer
LayerNorm outputs: MiniLM's channel 99 reaches 28 where the median channel reaches 1.9). With
``a_j`` the calibrated max |x| of channel j and ``w_j`` the max |W[:, j]| over every Linear that
reads the LayerNorm (Xiao et al., 2023)::

    s_j = a_j^alpha / w_j^(1 - alpha)
    LayerNorm weight, bias  /=  s          (the LayerNorm now outputs x / s)
    Linear weight[:, j]     *=  s_j        (each Linear reading it: W (x / s) s = W x)
    other readers (a residual Add) read  (x / s) * s  through a new Mul

so the float function is unchanged (to rounding) while the quantized activation ``x / s`` has
flatter channels and the weights, quantized per output channel, absorb the difference.

Rewrite case: ``layer_norm(x, [C], weight, bias)`` with constant, unshared weight and bias whose
output is read by at least one ``linear`` (as its input, with a constant, unshared weight).
Refused (left unchanged): a LayerNorm already smoothed; one with quantizers already on its
output (run this before ``annotate``); normalisation over more than the last axis.

With ``gelu=True`` a GELU read by Linears is smoothed too: its output cannot absorb ``1/s``, so
the Linears read ``gelu(x) * (1/s)`` through a new Mul (TensorRT fuses it into the GELU). On an
ONNX model (onnx-ir) the same rewrites apply to LayerNormalization / Gelu → MatMul or Gemm with
a constant weight; the channel ranges come from onnxruntime.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir
import torch
import torch.fx
from tqdm.auto import tqdm

from qgraph._errors import QGraphError, first_line
from qgraph._pass import Pass, PassResult
from qgraph.graph import constant_value, is_constant, op_kind, set_attr, unique_attr_name
from qgraph.onnx_graph import add_initializer, session
from qgraph.passes._util import batch_args

__all__ = ["SmoothQuant", "SMOOTHED_META"]

logger = logging.getLogger(__name__)

#: node.meta key set on a LayerNorm this pass smoothed (a second run leaves it alone).
SMOOTHED_META = "qgraph.smoothed"

_LN_WEIGHT, _LN_BIAS = 2, 3  # layer_norm(input, normalized_shape, weight, bias, eps, ...)


class SmoothQuant(Pass):
    """Fold per-channel smoothing factors into LayerNorm → Linear pairs. Counts: ``smoothed``.

    Args:
        data: calibration batches (as for ``calibrate``): the per-channel ranges come from them.
        alpha: migration strength in [0, 1]: 0 leaves activations alone, 1 moves all of their
            range into the weights; 0.5 is the paper's default.
        gelu: also smooth GELU outputs read by Linears/MatMuls (a transformer's FFN down
            projection), through a ``Mul`` by ``1/s`` before them: for symmetric INT8
            activations (TensorRT), whose half range GELU's [-0.17, amax] output wastes.
        progress: show a progress bar while collecting ranges.
        rules: the recipe the plan will use (a pipeline passes it): smoothing serves per-tensor
            INT8 activations, so for any other recipe (FP8, block formats, weight-only) the pass
            does nothing. None: smooth.
    """

    name = "smooth-quant"
    graphs = ("fx", "onnx")
    context_keys = ("data", "progress", "rules")

    def __init__(
        self, data: Iterable = (), alpha: float = 0.5, gelu: bool = False, progress: bool = False, rules=None,  # noqa: ANN001
    ) -> None:
        if not 0.0 <= float(alpha) <= 1.0:
            raise QGraphError(f"smooth-quant: alpha must be in [0, 1], got {alpha}")
        if not isinstance(gelu, (bool, np.bool_)):
            raise QGraphError(f"smooth-quant: gelu must be true or false, got {gelu!r}")
        self.data = data
        self.alpha = float(alpha)
        self.gelu = bool(gelu)
        self.progress = progress
        act = getattr(rules, "activation", None)
        self.enabled = rules is None or (act is not None and act.is_int8 and not act.dynamic)

    def options(self) -> dict[str, object]:
        opts: dict[str, object] = {}
        if self.alpha != 0.5:
            opts["alpha"] = self.alpha
        if self.gelu:
            opts["gelu"] = True
        return opts

    def _factors(self, amax: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        """``s_j`` from the activation's channel ranges and the (in, *) weights reading it."""
        w_max = torch.stack([w.abs().reshape(w.shape[0], -1).amax(1) for w in weights]).amax(0).clamp(min=1e-5)
        a_max = amax.to(torch.float64).clamp(min=1e-5)
        return (a_max.pow(self.alpha) / w_max.pow(1.0 - self.alpha)).clamp(1e-5, 1e5)

    def _check_data(self) -> None:
        if iter(self.data) is self.data:
            raise QGraphError(
                "smooth-quant reads the calibration data before calibrate does: pass a list or "
                "another re-iterable collection of batches, not a one-shot iterator"
            )

    def call(self, graph: torch.fx.GraphModule | ir.Model) -> PassResult:
        if not self.enabled:
            return PassResult(graph, False, {"smoothed": 0})
        if isinstance(graph, ir.Model):
            return self._call_onnx(graph)
        pairs = _pairs(graph.graph.nodes, lambda node: _candidates(graph, node, self.gelu))
        if not pairs:
            return PassResult(graph, False, {"smoothed": 0})
        self._check_data()
        ranges = self._channel_ranges(graph, list(pairs))
        for norm, linears in pairs.items():
            self._smooth(graph, norm, linears, ranges[norm])
        graph.recompile()
        return PassResult(graph, True, {"smoothed": len(pairs)})

    def _channel_ranges(self, gm: torch.fx.GraphModule, watch: list[torch.fx.Node]) -> dict:
        recorder = _ChannelMax(gm, set(watch))
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        batches = 0
        with torch.no_grad():
            for batch in tqdm(self.data, desc="smoothing", unit="batch", disable=not self.progress):
                try:
                    recorder.run(*batch_args(batch, names))
                except QGraphError:
                    raise
                except Exception as exc:
                    raise QGraphError(f"the model failed on calibration batch {batches}: {first_line(exc)}") from None
                batches += 1
        if not batches:
            raise QGraphError("smooth-quant needs calibration data (it is empty)")
        return recorder.amax

    def _smooth(self, gm, norm, linears, amax) -> None:  # noqa: ANN001 - private helper
        weights = [constant_value(gm, lin.args[1]).detach().to(torch.float64) for lin in linears]
        s = self._factors(amax, [w.t() for w in weights])  # linear weights are (out, in)
        for lin, w in zip(linears, weights):
            old = constant_value(gm, lin.args[1])
            set_attr(gm, lin.args[1].target, torch.nn.Parameter((w * s).to(old.dtype), requires_grad=False))
        norm.meta[SMOOTHED_META] = True
        if op_kind(norm) == "Gelu":  # linears read gelu(x) / s through a Mul; other readers gelu(x)
            scaled = self._constant_mul(gm, norm, 1.0 / s)
            for lin in linears:
                lin.replace_input_with(norm, scaled)
            return
        for index in (_LN_WEIGHT, _LN_BIAS):
            const = norm.args[index]
            value = constant_value(gm, const).detach()
            set_attr(gm, const.target, torch.nn.Parameter((value.to(torch.float64) / s).to(value.dtype), requires_grad=False))
        others = [u for u in norm.users if u not in linears]
        if others:
            restored = self._constant_mul(gm, norm, s)
            for user in others:
                user.replace_input_with(norm, restored)

    @staticmethod
    def _constant_mul(gm: torch.fx.GraphModule, node: torch.fx.Node, factor: torch.Tensor) -> torch.fx.Node:
        """A new ``mul(node, factor)`` right after ``node`` (its users are left to the caller)."""
        target = unique_attr_name(gm, f"{node.name}_smoothing")
        set_attr(gm, target, factor.to(torch.float32))
        with gm.graph.inserting_after(node):
            const = gm.graph.get_attr(target)
        with gm.graph.inserting_after(const):
            mul = gm.graph.call_function(torch.ops.aten.mul.Tensor, (node, const))
        mul.meta = {k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", "nn_module_stack", "stack_trace")}
        return mul

    def _call_onnx(self, model: ir.Model) -> PassResult:
        """ONNX: the same rewrite on an onnx-ir model (MatMul weights (K, N) scaled per row K);
        the channel ranges come from onnxruntime with the smoothed tensors as extra outputs."""
        pairs = _pairs(model.graph, lambda node: _onnx_candidates(node, self.gelu))
        if not pairs:
            return PassResult(model, False, {"smoothed": 0})
        self._check_data()
        ranges = self._onnx_channel_ranges(model, [n.outputs[0] for n in pairs])
        for node, readers in pairs.items():
            self._smooth_onnx(model.graph, node, readers, ranges[node.outputs[0].name])
        return PassResult(model, True, {"smoothed": len(pairs)})

    def _onnx_channel_ranges(self, model: ir.Model, values: list[ir.Value]) -> dict[str, torch.Tensor]:
        names = [v.name for v in model.graph.inputs]
        amax: dict[str, torch.Tensor] = {}
        batches = 0
        with session(model, values) as sess:
            for batch in tqdm(self.data, desc="smoothing", unit="batch", disable=not self.progress):
                feeds = {n: np.asarray(t) for n, t in zip(names, batch_args(batch, names))}
                try:
                    outs = sess.run([v.name for v in values], feeds)
                except Exception as exc:
                    raise QGraphError(f"the model failed on calibration batch {batches}: {first_line(exc)}") from None
                for value, out in zip(values, outs):
                    a = torch.from_numpy(out).abs().reshape(-1, out.shape[-1]).amax(0).to(torch.float32)
                    amax[value.name] = a if value.name not in amax else torch.maximum(amax[value.name], a)
                batches += 1
        if not batches:
            raise QGraphError("smooth-quant needs calibration data (it is empty)")
        return amax

    def _smooth_onnx(self, graph: ir.Graph, node: ir.Node, readers: list[ir.Node], amax: torch.Tensor) -> None:
        x = node.outputs[0]
        weights = [
            torch.from_numpy(np.array(_weight_in_out(r, r.inputs[1].const_value.numpy()), np.float64)) for r in readers
        ]
        s = self._factors(amax, weights).numpy()  # weights as (in, out)
        dtype = x.dtype.numpy() if x.dtype is not None else np.float32  # float16 models stay float16
        for reader, w in zip(readers, weights):
            value = reader.inputs[1]
            old = value.const_value.numpy().dtype
            scaled = _weight_in_out(reader, w.numpy() * s[:, None])  # back to the stored layout
            value.const_value = ir.Tensor(np.ascontiguousarray(scaled).astype(old), name=value.name)
        node.meta[SMOOTHED_META] = True
        if node.op_type == "Gelu":
            scaled = _onnx_mul(graph, node, (1.0 / s).astype(dtype))
            for reader in readers:
                reader.replace_input_with(0, scaled)
            return
        for index in (1, 2):  # exporters merge equal constants (fresh LayerNorms share 1s and 0s): own copies
            value = node.inputs[index]
            array = value.const_value.numpy()
            scaled = (array.astype(np.float64) / s).astype(array.dtype)
            node.replace_input_with(index, add_initializer(graph, f"{value.name}_smoothed", scaled))
            if not value.uses() and not value.is_graph_output():
                graph.initializers.pop(value.name)
        others = [(use.node, use.idx) for use in x.uses() if use.node not in readers]
        if others or x.is_graph_output():
            restored = _onnx_mul(graph, node, s.astype(dtype))
            for user, idx in others:
                user.replace_input_with(idx, restored)
            if x.is_graph_output():
                graph.outputs[graph.outputs.index(x)] = restored
                x.name, restored.name = f"{x.name}_smoothed", x.name


def _pairs(nodes: Iterable, candidates) -> dict:  # noqa: ANN001 - node -> (readers, why not)
    """{smoothable node: the Linears/MatMuls reading it}; why the others are not, in the debug log."""
    pairs = {}
    for node in nodes:
        readers, why = candidates(node)
        if readers:
            pairs[node] = readers
        elif why:
            logger.debug("not smoothing %s: %s", node.name, why)
    return pairs


def _candidates(gm: torch.fx.GraphModule, node: torch.fx.Node, gelu: bool) -> tuple[list[torch.fx.Node], str]:
    """(the Linears reading a smoothable LayerNorm or GELU, '') or ([], why not)."""
    if op_kind(node) not in ("LayerNormalization", "Gelu") or (op_kind(node) == "Gelu" and not gelu):
        return [], ""
    if node.meta.get(SMOOTHED_META):
        return [], "already smoothed"
    if any(u.op == "call_module" for u in node.users):
        return [], "its output is already observed or quantized (run smooth-quant before annotate)"
    if op_kind(node) == "Gelu":
        return _linear_readers(gm, node)
    if len(node.args) <= _LN_BIAS or len(node.args[1]) != 1:
        return [], "not a LayerNorm over the last axis with weight and bias"
    for index in (_LN_WEIGHT, _LN_BIAS):
        if not _own_constant(gm, node.args[index], node):
            return [], "weight or bias is not a constant of its own"
    return _linear_readers(gm, node)


def _linear_readers(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[list[torch.fx.Node], str]:
    linears = [
        u for u in node.users
        if op_kind(u) == "Gemm" and u.args[0] is node and _own_constant(gm, u.args[1], u)
    ]
    return (linears, "") if linears else ([], "no Linear reads it")


def _onnx_candidates(node: ir.Node, gelu: bool) -> tuple[list[ir.Node], str]:
    """(the MatMuls reading a smoothable LayerNormalization or Gelu, '') or ([], why not)."""
    if node.op_type not in ("LayerNormalization", "Gelu") or node.domain not in ("", "ai.onnx"):
        return [], ""
    if node.op_type == "Gelu" and not gelu:
        return [], ""
    if node.meta.get(SMOOTHED_META):
        return [], "already smoothed"
    x = node.outputs[0]
    if any(use.node.op_type == "QuantizeLinear" for use in x.uses()):
        return [], "its output is already quantized (run smooth-quant before insert-qdq)"
    if node.op_type == "LayerNormalization":
        if node.attributes.get_int("axis", -1) not in (-1, len(x.shape or ()) - 1) or len(node.inputs) < 3:
            return [], "not a LayerNormalization over the last axis with scale and bias"
        if not all(v is not None and v.const_value is not None for v in node.inputs[1:3]):
            return [], "scale or bias is not a constant"
    readers = [use.node for use in x.uses() if use.idx == 0 and _onnx_linear(use.node)]
    return (list(dict.fromkeys(readers)), "") if readers else ([], "no MatMul/Gemm with a constant weight reads it")


def _onnx_linear(node: ir.Node) -> bool:
    """A MatMul or Gemm (no transA) whose weight B is a 2-D constant of its own."""
    if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return False
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        return False
    w = node.inputs[1]
    return _onnx_own_constant(w, node) and len(w.const_value.shape) == 2


def _weight_in_out(node: ir.Node, w: np.ndarray) -> np.ndarray:
    """The weight of a MatMul/Gemm as (in, out): a Gemm with transB stores it (out, in)."""
    return w.T if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else w


def _onnx_own_constant(value: ir.Value | None, reader: ir.Node) -> bool:
    return value is not None and value.const_value is not None and {u.node for u in value.uses()} == {reader}


def _onnx_mul(graph: ir.Graph, node: ir.Node, factor: np.ndarray) -> ir.Value:
    """A new ``Mul(node's output, factor)`` right after ``node``."""
    x = node.outputs[0]
    const = add_initializer(graph, f"{x.name}_smoothing", factor)
    mul = ir.Node("", "Mul", [x, const], name=f"{node.name}_smoothing")
    mul.outputs[0].name = f"{x.name}_smoothing_out"
    mul.outputs[0].type, mul.outputs[0].shape = x.type, x.shape
    graph.insert_after(node, mul)
    return mul.outputs[0]


def _own_constant(gm: torch.fx.GraphModule, const: object, user: torch.fx.Node) -> bool:
    if not is_constant(const) or list(const.users) != [user]:
        return False
    return sum(1 for n in gm.graph.nodes if n.op == "get_attr" and n.target == const.target) == 1


class _ChannelMax(torch.fx.Interpreter):
    """Runs the graph and keeps the per-channel (last axis) max |x| of the watched nodes."""

    def __init__(self, gm: torch.fx.GraphModule, watch: set[torch.fx.Node]) -> None:
        super().__init__(gm)
        self.watch = watch
        self.amax: dict[torch.fx.Node, torch.Tensor] = {}

    def run_node(self, n: torch.fx.Node):  # noqa: ANN201 - whatever the node returns
        out = super().run_node(n)
        if n in self.watch:
            a = out.detach().abs().reshape(-1, out.shape[-1]).amax(0).to(torch.float32)
            self.amax[n] = a if n not in self.amax else torch.maximum(self.amax[n], a)
        return out
