"""Lower an INT8 plan to the QDQ form onnxruntime's CPU provider fuses into int8 kernels.

The graph is exported like the TensorRT lowering (``qgraph.backends._onnx``: weight codes as int8
per-channel initializers, the same scales), then five onnx-ir rewrites give ORT what its int8
kernels need:

1. **uint8 activations.** Every activation QuantizeLinear/DequantizeLinear with int8 codes moves to
   uint8 with the zero-point raised by 128 (symmetric int8 → zero-point 128). ``q_u8 = q_s8 + 128``
   for every value and the dequantized values are equal: exact.
2. **Quantizers before ReLU/Clip.** ``Relu → Q`` becomes ``Q → Clip(codes)``: the quantizer takes
   the ReLU's input and the ReLU runs on the codes (``max(q, zero_point)``; a ``Clip(lo, hi)``
   clips the codes to ``zp + round(lo/s)``, ``zp + round(hi/s)``). Rounding and saturation are
   monotonic, so the codes are identical: exact. The Conv/Add before it now has a quantized
   output, which is what ``QLinearConv``/``QLinearAdd`` need. Likewise ``Concat → Q`` becomes a
   ``Q`` (the same scale) on every input and a Concat of codes: exact, and the Convs that feed it
   become ``QLinearConv``.
3. **GEMMs on rows.** A quantized activation of rank ≥ 3 read only by MatMuls with a constant
   weight (a transformer's ``linear``) is reshaped to ``(rows, K)`` before its quantizer, each
   MatMul (with the bias Add after it) becomes a Gemm, and a Reshape restores the shape: ORT runs
   ``DQ → Gemm`` as ``QGemm`` (prepacked weights, the bias inside), where ``DQ → MatMul`` became
   ``MatMulIntegerToFloat`` plus a separate bias Add (MiniLM: about 5 ms of 120 saved). Per-tensor
   quantization commutes with the reshape: exact.
4. **Reshape pairs.** ``Reshape(Reshape(x, a), b)`` with a constant ``b`` free of 0s is
   ``Reshape(x, b)`` (the rows rewrite leaves such pairs at attention's head split): one node less
   for ORT to run, exact.
5. **int32 biases.** A Conv/Gemm with dequantized input and weight gets its float bias as
   ``DequantizeLinear(int32 codes, s_x · s_w)`` (what ``QLinearConv``/``QGemm`` take). Not exact:
   each bias moves by at most half of ``s_x · s_w`` (far below one output step); a bias whose
   codes would overflow int32 stays float.

So the onnxruntime and TensorRT lowerings of one plan compute the same values up to that bias
rounding, and float summation order once ORT runs fused int8 kernels.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
import torch
import torch.fx

from qgraph._errors import QGraphError
from qgraph.onnx_graph import internalize
from qgraph.backends import _onnx
from qgraph.backends._onnx import const_array
from qgraph.backends.onnxruntime.rules import OPSET
from qgraph.quant import FakeQuant

__all__ = ["lower", "lower_onnx", "to_onnxruntime", "ort_runnable", "FORMS", "REFERENCE_ONLY"]

#: onnxruntime runs what it is given: the deploy form is its own reference.
FORMS = ("deploy",)

#: recipes with no deploy form (none: every INT8 plan lowers).
REFERENCE_ONLY: dict[str, str] = {}

_INT32 = np.iinfo(np.int32)


def ort_runnable(gm: torch.fx.GraphModule) -> bool:  # noqa: ARG001 - same contract as tensorrt
    """onnxruntime runs every lowering of this backend."""
    return True


def lower(gm: torch.fx.GraphModule, example_inputs: tuple[torch.Tensor, ...], form: str = "deploy") -> bytes:
    """Export ``gm`` (after ``insert-qdq``, INT8 quantizers only) as ORT-fusable QDQ ONNX bytes.

    Any INT8 plan lowers (a TensorRT plan too: Convs without a quantized output then stay float
    in ORT; ``qgraph inspect --backend onnxruntime`` says which and why).
    """
    if form not in FORMS:
        raise QGraphError(f"unknown form {form!r} for onnxruntime (known: {', '.join(FORMS)})")
    other = sorted({m.spec.describe() for m in gm.modules() if isinstance(m, FakeQuant) and not m.spec.is_int8})
    if other:
        raise QGraphError(
            f"the onnxruntime backend lowers INT8 plans only (its CPU int8 kernels); this graph has {other[0]}"
        )
    model = _onnx.export_onnx(gm, example_inputs, opset=OPSET, form="deploy")
    to_onnxruntime(model)
    return _onnx.serialize(model)


def lower_onnx(model: ir.Model) -> bytes:
    """An ONNX model quantized in place by the passes (the ONNX door, INT8 plan) as ORT-fusable
    QDQ bytes: the rewrites of the module docstring, then a checked, deterministic serialization."""
    other = sorted({
        str(v.const_value.dtype) for n in model.graph if n.op_type == "DequantizeLinear"
        for v in n.inputs[2:3] if v is not None and v.const_value is not None
        and v.const_value.dtype not in (ir.DataType.INT8, ir.DataType.UINT8)
    })
    if other:
        raise QGraphError(
            f"the onnxruntime backend lowers INT8 plans only (its CPU int8 kernels); this model has {other[0]} Q/DQ"
        )
    to_onnxruntime(model)
    internalize(model)  # weights a large model kept on disk: one self-contained file
    return _onnx.serialize(model)


def to_onnxruntime(model: ir.Model) -> dict[str, int]:
    """The rewrites of the module docstring, in place; returns how many of each were made."""
    graph = model.graph
    graph.meta.pop(_NAMES, None)  # node names are read afresh: the graph may have been edited
    counts = {
        "uint8 activations": _activations_to_uint8(graph),
        "quantizers moved before ReLU/Clip": _quantize_before_activations(graph),
        "MatMuls as Gemms on rows": _gemms_on_rows(graph),
        "quantizers moved before Concat": _quantize_concat_inputs(graph),
    }
    # the quantizers a Concat split off may now sit after a ReLU/Clip (Conv → ReLU → Q_i → Concat)
    counts["quantizers moved before ReLU/Clip"] += _quantize_before_activations(graph)
    counts["int32 biases"] = _int32_biases(graph)
    counts["Reshape pairs collapsed"] = _collapse_reshapes(graph)
    graph.meta.pop(_NAMES, None)
    ir_passes.RemoveUnusedNodesPass()(model)
    return counts


_NAMES = "qgraph.node_names"  # graph.meta key: the node names taken, during to_onnxruntime


def _node_name(graph: ir.Graph, base: str) -> str:
    """A node name not used in ``graph`` yet (ORT refuses two nodes of one name)."""
    taken = graph.meta.setdefault(_NAMES, {n.name for n in graph if n.name})
    name, i = base or "node", 0
    while name in taken:
        i += 1
        name = f"{base or 'node'}_{i}"
    taken.add(name)
    return name


def _is_op(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx")


def _activations_to_uint8(graph: ir.Graph) -> int:
    """int8 activation Q/DQ → uint8 with zero-point + 128 (exact)."""
    new_zero_points: dict[tuple, ir.Value] = {}
    changed = 0
    for q in list(graph):
        if not _is_op(q, "QuantizeLinear") or len(q.inputs) < 3 or const_array(q.inputs[0]) is not None:
            continue
        zp = const_array(q.inputs[2])
        if zp is None or zp.dtype != np.int8:
            continue
        if q.outputs[0].is_graph_output():
            continue  # the model's output type stays as it is
        shifted = (zp.astype(np.int16) + 128).astype(np.uint8)
        key = (shifted.shape, shifted.tobytes())
        if key not in new_zero_points:
            new_zero_points[key] = _onnx.add_initializer(graph, "zero_point_u8", shifted)
        u8 = new_zero_points[key]
        dequantizers = [use.node for use in q.outputs[0].uses()]
        if not all(_is_op(d, "DequantizeLinear") and d.inputs[2] is q.inputs[2] for d in dequantizers):
            continue  # codes read by something other than their DequantizeLinear: keep int8
        q.replace_input_with(2, u8)
        q.outputs[0].type = ir.TensorType(ir.DataType.UINT8)
        for d in dequantizers:
            d.replace_input_with(2, u8)
        changed += 1
    return changed


def _code_bound(bound: np.ndarray | None, scale: np.float32, zp: int, qmin: int, qmax: int, default: int) -> int:
    if bound is None:
        return default
    code = np.round(np.float32(bound.reshape(())) / scale) + zp  # what QuantizeLinear computes
    return int(np.clip(code, qmin, qmax))


def _quantize_before_activations(graph: ir.Graph) -> int:
    """``Relu/Clip → Q`` → ``Q → Clip(codes)`` where the quantizer is per tensor (exact)."""
    moved = 0
    for act in list(graph):
        if not (_is_op(act, "Relu") or _is_op(act, "Clip")) or act.outputs[0].is_graph_output():
            continue
        uses = list(act.outputs[0].uses())
        if len(uses) != 1 or not _is_op(uses[0].node, "QuantizeLinear") or uses[0].idx != 0:
            continue
        q = uses[0].node
        if q.outputs[0].is_graph_output():
            continue  # the model's output would keep the unclipped codes
        scale = const_array(q.inputs[1])
        zp = const_array(q.inputs[2]) if len(q.inputs) > 2 else None
        if scale is None or zp is None or scale.size != 1 or zp.size != 1 or zp.dtype.kind not in "iu":
            continue
        if _is_op(act, "Relu"):
            bounds: list[np.ndarray | None] = [np.zeros((), np.float32), None]
        else:
            extra = list(act.inputs[1:3]) + [None] * (3 - len(act.inputs))
            bounds = [const_array(v) if v is not None else None for v in extra[:2]]
            if any(v is not None and b is None for v, b in zip(extra[:2], bounds)):
                continue  # a bound computed at run time
        info = np.iinfo(zp.dtype)
        s, z = np.float32(scale.reshape(())), int(zp.reshape(()))
        lo = _code_bound(bounds[0], s, z, info.min, info.max, info.min)
        hi = _code_bound(bounds[1], s, z, info.min, info.max, info.max)
        q.replace_input_with(0, act.inputs[0])
        readers = list(q.outputs[0].uses())
        if lo > info.min or hi < info.max:
            lo_value = _onnx.add_initializer(graph, f"{act.name or 'act'}_code_min", np.array(lo, zp.dtype))
            hi_value = _onnx.add_initializer(graph, f"{act.name or 'act'}_code_max", np.array(hi, zp.dtype))
            clip = ir.Node("", "Clip", [q.outputs[0], lo_value, hi_value], name=_node_name(graph, f"{act.name}_codes"))
            clip.outputs[0].name = f"{q.outputs[0].name}_clipped"
            clip.outputs[0].type = q.outputs[0].type
            clip.outputs[0].shape = q.outputs[0].shape
            graph.insert_after(q, clip)
            for use in readers:
                use.node.replace_input_with(use.idx, clip.outputs[0])
        graph.remove(act, safe=True)
        moved += 1
    return moved


def _quantize_concat_inputs(graph: ir.Graph) -> int:
    """``Concat → Q`` → ``Q`` on every input, ``Concat`` of the codes (one scale: exact).

    The ops that make the inputs (Convs) then have quantized outputs, what ``QLinearConv`` needs,
    and the Concat moves codes instead of floats.
    """
    moved = 0
    for cat in list(graph):
        if not _is_op(cat, "Concat") or cat.outputs[0].is_graph_output():
            continue
        uses = list(cat.outputs[0].uses())
        if len(uses) != 1 or not _is_op(uses[0].node, "QuantizeLinear") or uses[0].idx != 0:
            continue
        q = uses[0].node
        scale = const_array(q.inputs[1])
        if scale is None or scale.size != 1 or len(q.inputs) < 3 or const_array(q.inputs[2]) is None:
            continue
        if q.outputs[0].is_graph_output():
            continue
        for index, value in enumerate(list(cat.inputs)):
            part = ir.Node("", "QuantizeLinear", [value, q.inputs[1], q.inputs[2]], name=_node_name(graph, f"{q.name}_{index}"))
            part.outputs[0].name = f"{q.outputs[0].name}_{index}"
            part.outputs[0].type = q.outputs[0].type
            part.outputs[0].shape = value.shape
            graph.insert_before(cat, part)
            cat.replace_input_with(index, part.outputs[0])
        cat.outputs[0].type = q.outputs[0].type
        q.outputs[0].replace_all_uses_with(cat.outputs[0])
        graph.remove(q, safe=True)
        moved += 1
    return moved


def _weight_matmul(node: ir.Node, activation: ir.Value) -> bool:
    """``MatMul(activation, DequantizeLinear(constant (K, N) codes))`` quantized per column."""
    if not _is_op(node, "MatMul") or node.inputs[0] is not activation or node.outputs[0].is_graph_output():
        return False
    dq = node.inputs[1].producer()
    codes = const_array(dq.inputs[0]) if _is_op(dq, "DequantizeLinear") else None
    if codes is None or codes.ndim != 2:
        return False
    scale = const_array(dq.inputs[1])
    axis = dq.attributes.get("axis")
    return scale is not None and (scale.size == 1 or (axis is not None and axis.as_int() % 2 == 1))


def _bias_add(matmul: ir.Node, n: int) -> tuple[ir.Node | None, ir.Value | None]:
    """The ``Add`` of a constant (N,) bias that is the MatMul's only reader, and the bias."""
    uses = list(matmul.outputs[0].uses())
    if len(uses) != 1 or not _is_op(uses[0].node, "Add") or uses[0].node.outputs[0].is_graph_output():
        return None, None
    add = uses[0].node
    bias = add.inputs[1 - uses[0].idx]
    array = const_array(bias)
    if array is None or array.shape != (n,) or array.dtype != np.float32:
        return None, None
    return add, bias


def _gemms_on_rows(graph: ir.Graph) -> int:
    """Rank ≥ 3 activations read only by weight MatMuls → ``(rows, K)`` Gemms (exact; see above)."""
    changed = 0
    for q in list(graph):
        dq = _row_quantizable(q)
        if dq is None:
            continue
        x = q.inputs[0]
        matmuls = [use.node for use in dq.outputs[0].uses()]
        rows = ir.Node("", "Reshape", [x, _onnx.add_initializer(graph, "rows_shape", np.array([-1, x.shape[-1]], np.int64))],
                       name=_node_name(graph, f"{q.name}_rows"))
        rows.outputs[0].name = f"{x.name}_rows"
        rows.outputs[0].type = x.type
        graph.insert_before(q, rows)
        q.replace_input_with(0, rows.outputs[0])
        for use in q.outputs[0].uses():  # the Clip on codes, if any
            use.node.outputs[0].shape = None
        q.outputs[0].shape = dq.outputs[0].shape = None  # now (rows, K)
        lead = _leading_shape(graph, x, q)
        for matmul in matmuls:
            _matmul_to_gemm(graph, matmul, dq.outputs[0], lead)
            changed += 1
    return changed


def _row_quantizable(q: ir.Node) -> ir.Node | None:
    """The DequantizeLinear after a per-tensor ``q`` of a rank ≥ 3 value with a static last dim
    whose every reader is a weight MatMul, or None."""
    if not _is_op(q, "QuantizeLinear") or len(q.inputs) < 3:
        return None
    shape, scale = q.inputs[0].shape, const_array(q.inputs[1])
    if shape is None or len(shape) < 3 or not isinstance(shape[-1], int) or scale is None or scale.size != 1:
        return None
    readers = [use.node for use in q.outputs[0].uses()]
    if len(readers) == 1 and _is_op(readers[0], "Clip"):  # a ReLU on the codes: elementwise, fine
        readers = [use.node for use in readers[0].outputs[0].uses()]
    if len(readers) != 1 or not _is_op(readers[0], "DequantizeLinear"):
        return None
    matmuls = [use.node for use in readers[0].outputs[0].uses()]
    if not matmuls or not all(_weight_matmul(m, readers[0].outputs[0]) for m in matmuls):
        return None
    return readers[0]


def _matmul_to_gemm(graph: ir.Graph, matmul: ir.Node, rows: ir.Value, lead: np.ndarray | ir.Value) -> None:
    """``MatMul(x, W) [+ bias]`` → ``Reshape(Gemm(rows, W [, bias]), x's shape with N last)``."""
    n = int(const_array(matmul.inputs[1].producer().inputs[0]).shape[1])
    add, bias = _bias_add(matmul, n)
    gemm = ir.Node("", "Gemm", [rows, matmul.inputs[1]] + ([bias] if bias is not None else []), name=matmul.name)
    gemm.outputs[0].name = f"{matmul.outputs[0].name}_rows"
    gemm.outputs[0].type = matmul.outputs[0].type
    last = add if add is not None else matmul
    graph.insert_before(last, gemm)
    back = ir.Node("", "Reshape", [gemm.outputs[0], _concat_shape(graph, lead, n, gemm)],
                   name=_node_name(graph, f"{matmul.name}_unrows"))
    back.outputs[0].type = last.outputs[0].type
    back.outputs[0].shape = last.outputs[0].shape  # ORT's later fusions need it
    graph.insert_before(last, back)
    last.outputs[0].replace_all_uses_with(back.outputs[0])
    for old in (add, matmul):
        if old is not None:
            graph.remove(old, safe=True)


def _leading_shape(graph: ir.Graph, x: ir.Value, before: ir.Node) -> np.ndarray | ir.Value:
    """x's dims but the last: a constant when they are static past the batch, else ``Shape(x)[:-1]``."""
    dims = list(x.shape)[:-1]
    if all(isinstance(d, int) for d in dims[1:]):
        return np.array([-1, *dims[1:]], np.int64)
    shape = ir.Node("", "Shape", [x], attributes=[ir.AttrInt64("end", -1)], name=_node_name(graph, f"{before.name}_lead"))
    shape.outputs[0].name = f"{x.name}_lead_shape"
    shape.outputs[0].type = ir.TensorType(ir.DataType.INT64)
    graph.insert_before(before, shape)
    return shape.outputs[0]


def _concat_shape(graph: ir.Graph, lead: np.ndarray | ir.Value, n: int, before: ir.Node) -> ir.Value:
    if isinstance(lead, np.ndarray):
        return _onnx.add_initializer(graph, "unrows_shape", np.append(lead, n).astype(np.int64))
    cat = ir.Node("", "Concat", [lead, _onnx.add_initializer(graph, "unrows_n", np.array([n], np.int64))],
                  attributes=[ir.AttrInt64("axis", 0)], name=_node_name(graph, f"{before.name}_shape"))
    cat.outputs[0].name = f"{before.name}_shape"
    cat.outputs[0].type = ir.TensorType(ir.DataType.INT64)
    graph.insert_before(before, cat)
    return cat.outputs[0]


def _collapse_reshapes(graph: ir.Graph) -> int:
    """``Reshape(Reshape(x, a), b)`` → ``Reshape(x, b)`` when ``b`` is a constant without 0s (so
    it does not copy dims of the middle value) and nothing else reads the middle value: the rows
    rewrite leaves such pairs around the heads of attention, and ORT runs every node it is given."""
    collapsed = 0
    for node in list(graph):
        if not _is_op(node, "Reshape") or len(node.inputs) < 2:
            continue
        first = node.inputs[0].producer()
        target = const_array(node.inputs[1])
        if not _is_op(first, "Reshape") or target is None or (target == 0).any():
            continue
        if len(first.outputs[0].uses()) != 1 or first.outputs[0].is_graph_output():
            continue
        node.replace_input_with(0, first.inputs[0])
        graph.remove(first, safe=True)
        collapsed += 1
    return collapsed


def _int32_biases(graph: ir.Graph) -> int:
    """Float bias of a Conv/Gemm with quantized input and weight → DequantizeLinear(int32)."""
    changed = 0
    for node in list(graph):
        if not (_is_op(node, "Conv") or _is_op(node, "Gemm")) or len(node.inputs) < 3 or node.inputs[2] is None:
            continue
        bias = const_array(node.inputs[2])
        x_dq, w_dq = node.inputs[0].producer(), node.inputs[1].producer()
        if bias is None or bias.dtype != np.float32 or bias.ndim != 1:
            continue
        if not (_is_op(x_dq, "DequantizeLinear") and _is_op(w_dq, "DequantizeLinear")):
            continue
        sx, sw = const_array(x_dq.inputs[1]), const_array(w_dq.inputs[1])
        if sx is None or sw is None or sx.size != 1 or sw.size not in (1, bias.size):
            continue
        scale = np.ascontiguousarray(np.broadcast_to(sx.astype(np.float32) * sw.astype(np.float32), bias.shape))
        codes = np.round(bias.astype(np.float64) / scale.astype(np.float64))
        if not (np.isfinite(codes).all() and (np.abs(codes) <= _INT32.max).all()):
            continue  # the bias does not fit int32 at this scale: it stays float
        base = node.inputs[2].name or f"{node.name}_bias"
        inputs = [
            _onnx.add_initializer(graph, f"{base}_int32", codes.astype(np.int32)),
            _onnx.add_initializer(graph, f"{base}_scale", scale),
            _onnx.add_initializer(graph, f"{base}_zero_point", np.zeros(bias.shape, np.int32)),
        ]
        dq = ir.Node("", "DequantizeLinear", inputs, attributes=[ir.AttrInt64("axis", 0)], name=_node_name(graph, f"{node.name}_bias_dq"))
        dq.outputs[0].name = f"{base}_dequantized"
        dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        dq.outputs[0].shape = ir.Shape(bias.shape)
        graph.insert_before(node, dq)
        node.replace_input_with(2, dq.outputs[0])
        changed += 1
    return changed
