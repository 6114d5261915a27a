"""Replace calibrated observers with fake-quant nodes and quantize annotated weights.

Every :class:`~qgraph.observers.Observer` becomes a :class:`~qgraph.quant.FakeQuant` whose scale
comes from its calibrator's ``amax`` by the format's rule (``amax / 127`` for INT8, ``amax / 448``
for FP8, the NVFP4 per-tensor scale ``amax / 2688``). Every annotated constant weight edge gets a
``FakeQuant`` whose scales (per channel, per block, NVFP4 two-level, MX E8M0) are read off the
weight itself. Activations that need no calibration (MX: block scales at run time) get their
quantizer directly. The fake-quant ops (``qgraph::fake_quant``, ``qgraph::fake_quant_fmt``,
``qgraph::fake_quant_dynamic``) are what the backends export as Q/DQ computing the same codes.

On an ONNX model (onnx-ir) the pass writes the Q/DQ itself: a QuantizeLinear → DequantizeLinear
pair on each calibrated activation, and each quantized weight stored as codes (computed by
``qgraph.formats`` from the same scales) read by a DequantizeLinear. INT8/UINT8 and FP8 specs,
per tensor or per channel; block formats take the torch door.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch
import torch.fx

from qgraph._errors import PreconditionError
from qgraph._pass import Pass, PassResult
from qgraph.graph import constant_value, is_constant, unique_attr_name
from qgraph import formats
from qgraph.observers import Observer
from qgraph.onnx_graph import (
    OBSERVERS_META,
    SOURCE_META,
    add_initializer,
    drop_unused_initializers,
    is_dequantized,
    planned_edges,
)
from qgraph.passes._util import QUANT_META, insert_module_after, is_quantizer
from qgraph.quant import FakeQuant, QSpec

__all__ = ["InsertQDQ"]


class InsertQDQ(Pass):
    """Turn the calibrated plan into fake-quant nodes. Counts: ``activations``, ``weights``."""

    name = "insert-qdq"
    graphs = ("fx", "onnx")

    def requires(self, graph: torch.fx.GraphModule | ir.Model) -> None:
        if isinstance(graph, ir.Model):
            for (name, _), observer in graph.graph.meta.get(OBSERVERS_META, {}).items():
                if observer.batches == 0:
                    raise PreconditionError(f"the observer of {name} has seen no data: run `calibrate` first")
            return
        for name, module in graph.named_modules():
            if isinstance(module, Observer) and module.batches == 0:
                raise PreconditionError(f"observer {name} has seen no data: run `calibrate` first")

    def call(self, graph: torch.fx.GraphModule | ir.Model) -> PassResult:
        if isinstance(graph, ir.Model):
            return _call_onnx(graph)
        activations = self._replace_observers(graph)
        weights, dynamic = self._quantize_constants_and_dynamic(graph)
        activations += dynamic
        if activations or weights:
            graph.recompile()
        counts = {"activations": activations, "weights": weights}
        return PassResult(graph, activations + weights > 0, counts)

    def _replace_observers(self, gm: torch.fx.GraphModule) -> int:
        replaced = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            observer = gm.get_submodule(node.target)
            if not isinstance(observer, Observer):
                continue
            name = unique_attr_name(gm, node.target.replace("obs_", "fq_", 1))
            gm.add_module(name, FakeQuant.for_activation(observer.spec, observer.amax()))
            with gm.graph.inserting_before(node):
                fq_node = gm.graph.call_module(name, node.args)  # named after its module
            fq_node.meta = dict(node.meta)
            node.replace_all_uses_with(fq_node)
            gm.graph.erase_node(node)
            delattr(gm, node.target)
            replaced += 1
        return replaced

    def _quantize_constants_and_dynamic(self, gm: torch.fx.GraphModule) -> tuple[int, int]:
        """Quantizers of constant weights and of uncalibrated (MX) activations: (weights, dynamic)."""
        made: dict[tuple[torch.fx.Node, QSpec], torch.fx.Node] = {}
        dynamic = 0
        for node in list(gm.graph.nodes):
            for index, spec in (node.meta.get(QUANT_META) or {}).items():
                src = node.args[index]
                if spec.role == "weight" and is_constant(src):
                    quantizer, base = (lambda: FakeQuant.for_weight(spec, constant_value(gm, src))), src.target
                elif spec.role == "activation" and not spec.needs_calibration and not is_quantizer(gm, src):
                    quantizer, base = (lambda: FakeQuant.for_activation(spec, 0.0)), src.name
                    dynamic += (src, spec) not in made
                else:
                    continue
                key = (src, spec)
                if key not in made:
                    name = unique_attr_name(gm, f"fq_{base}")
                    made[key] = insert_module_after(gm, src, name, quantizer())
                node.update_arg(index, made[key])
        return len(made) - dynamic, dynamic


def _call_onnx(model: ir.Model) -> PassResult:
    """ONNX: a QuantizeLinear → DequantizeLinear pair on every calibrated activation edge, and
    weights stored as codes read by a DequantizeLinear; scales by the same rules as the torch
    graph's fake-quants (one pair per tensor and spec, shared by its readers)."""
    graph = model.graph
    graph.meta.pop(_NAMES, None)  # names are read afresh: the graph may have been edited
    graph.meta.pop(_NODE_NAMES, None)
    observers = graph.meta.get(OBSERVERS_META, {})
    made: dict[tuple[str, QSpec], ir.Value] = {}
    counts = {"activations": 0, "weights": 0}
    for node, index, value, spec in list(planned_edges(model)):
        if is_dequantized(value):
            continue
        key = (value.name, spec)
        if key not in made:
            if spec.block_size or spec.dynamic:
                raise PreconditionError(
                    f"input {index} of {node.name}: {spec.describe()} is not lowered from ONNX input "
                    "(block formats need the torch door: export a .pt2)"
                )
            if spec.role == "weight" and value.const_value is not None:
                fq = FakeQuant.for_weight(spec, torch.from_numpy(np.array(value.const_value.numpy(), np.float32)))
                made[key] = _dequantize_weight(graph, node, value, fq)
                counts["weights"] += 1
            elif key in observers:
                fq = FakeQuant.for_activation(spec, observers[key].amax())
                made[key] = _quantize_dequantize(graph, node, value, fq)
                counts["activations"] += 1
            else:
                raise PreconditionError(f"input {index} of {node.name} has no observer: run `insert-observers` first")
        node.replace_input_with(index, made[key])
    drop_unused_initializers(graph)  # float weights now read through their codes only
    graph.meta.pop(OBSERVERS_META, None)
    graph.meta.pop(_NAMES, None)
    graph.meta.pop(_NODE_NAMES, None)
    return PassResult(model, any(counts.values()), counts)


def _qparams(graph: ir.Graph, value: ir.Value, fq: FakeQuant) -> tuple[ir.Value, ir.Value, list[ir.Attr]]:
    """Scale and zero-point initializers for ``value``; the scale has ``value``'s float type
    (QuantizeLinear/DequantizeLinear take x and its scale in one type: float16 models)."""
    spec = fq.spec
    dtype = value.dtype.numpy() if value.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16) else np.float32
    scale = fq.scale_value().detach().numpy().astype(dtype)
    if dtype != np.float32:  # a scale rounded to 0 would be invalid
        scale = np.maximum(scale, np.array(np.finfo(np.float16).smallest_subnormal, dtype))
    if spec.is_int8:
        zero_point = fq.zero_point.numpy()
    else:
        zero_point = np.zeros(scale.shape, spec.element.np_dtype)
    attrs = [ir.AttrInt64("axis", spec.axis)] if spec.axis is not None and scale.ndim else []
    base = value.name
    return add_initializer(graph, f"{base}_scale", scale), add_initializer(graph, f"{base}_zero_point", zero_point), attrs


def _dequantize_weight(graph: ir.Graph, node: ir.Node, weight: ir.Value, fq: FakeQuant) -> ir.Value:
    scale, zero_point, attrs = _qparams(graph, weight, fq)
    codes = formats.quantize(  # with the scale as stored (float16 models: rounded to float16)
        weight.const_value.numpy().astype(np.float32), scale.const_value.numpy().astype(np.float32), fq.spec.element,
        zero_point.const_value.numpy(), fq.spec.axis,
    )
    code_value = add_initializer(graph, f"{weight.name}_quantized", codes)
    code_value.meta[SOURCE_META] = weight
    dq = ir.Node("", "DequantizeLinear", [code_value, scale, zero_point], attrs, name=_free_node_name(graph, f"{weight.name}_DequantizeLinear"))
    _name_output(graph, dq, weight, "dequantized")
    graph.insert_before(node, dq)
    return dq.outputs[0]


def _quantize_dequantize(graph: ir.Graph, node: ir.Node, value: ir.Value, fq: FakeQuant) -> ir.Value:
    scale, zero_point, attrs = _qparams(graph, value, fq)
    q = ir.Node("", "QuantizeLinear", [value, scale, zero_point], attrs, name=_free_node_name(graph, f"{value.name}_QuantizeLinear"))
    q.outputs[0].name = _free_value_name(graph, f"{value.name}_quantized")
    q.outputs[0].type = ir.TensorType(zero_point.dtype)
    q.outputs[0].shape = value.shape
    dq = ir.Node("", "DequantizeLinear", [q.outputs[0], scale, zero_point], attrs, name=_free_node_name(graph, f"{value.name}_DequantizeLinear"))
    _name_output(graph, dq, value, "dequantized")
    graph.insert_before(node, [q, dq])
    return dq.outputs[0]


def _name_output(graph: ir.Graph, dq: ir.Node, source: ir.Value, suffix: str) -> None:
    dq.outputs[0].name = _free_value_name(graph, f"{source.name}_{suffix}")
    dq.outputs[0].type = source.type or ir.TensorType(ir.DataType.FLOAT)
    dq.outputs[0].shape = source.shape


def _free_value_name(graph: ir.Graph, base: str) -> str:
    """``base``, or ``base_1``... if a value of the graph already has that name (a tensor
    quantized under two specs: an override, or a weight on two axes)."""
    taken = graph.meta.setdefault(_NAMES, {v.name for n in graph for v in n.outputs} | {v.name for v in graph.inputs} | set(graph.initializers))
    return _free(taken, base)


def _free_node_name(graph: ir.Graph, base: str) -> str:
    """A node name not used in ``graph`` yet (onnxruntime refuses two nodes of one name)."""
    return _free(graph.meta.setdefault(_NODE_NAMES, {n.name for n in graph if n.name}), base)


def _free(taken: set[str], base: str) -> str:
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


_NAMES = "qgraph.value_names"  # graph.meta: value names taken (during one insert-qdq run)
_NODE_NAMES = "qgraph.qdq_node_names"  # graph.meta: node names taken (during one insert-qdq run)
