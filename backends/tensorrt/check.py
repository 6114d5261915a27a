"""Check any QDQ ONNX model against TensorRT's explicit-quantization rules.

Works on models whoever made them. Reports, per weighted op (Conv, ConvTranspose, Gemm, MatMul),
whether all its inputs are dequantized, and lists rule violations:

* an op TensorRT's parser does not support (QLinear*, ConvInteger, MatMulInteger,
  DynamicQuantizeLinear, com.microsoft Q ops);
* a non-zero or non-constant zero-point, a non-positive / non-finite / non-constant scale,
  a uint8 code type;
* a weighted op with only some inputs quantized;
* a per-channel activation, or a weight quantized on the wrong axis.

Low-precision formats: FP8 codes, blocked INT4 weight-only GEMMs, NVFP4 (FP4 codes whose scale is
a DequantizeLinear of E4M3 block scales by an FP32 scale, activations from ``trt::TRT_FP4DynamicQuantize``)
and MXFP8 (``trt::TRT_MXFP8DequantizeLinear`` of E8M0 scales). Block formats must feed GEMMs only,
blocked along the reduction axis; a dynamic quantizer needs a 2-D/3-D input.

Warnings (legal but probably not intended): per-tensor weights; a Q/DQ pair whose output feeds
only float ops (Q/DQ on the output of a weighted op); a weighted op left in float.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir

from qgraph.backends._onnx import const_array, const_or_dequantized

__all__ = ["InspectReport", "inspect_model"]

_WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_QUANTIZED_INPUT_OPS = _WEIGHTED + ("Add", "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean", "Concat")
_FORBIDDEN = ("ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "QGemm")
_INT_TYPES = (ir.DataType.INT8, ir.DataType.UINT8)
_DQ_OPS = ("DequantizeLinear", "TRT_MXFP8DequantizeLinear")
_DYNAMIC_Q = ("TRT_FP4DynamicQuantize", "TRT_MXFP8DynamicQuantize")
_GEMMS = ("Gemm", "MatMul")


@dataclasses.dataclass
class InspectReport:
    """What ``qgraph inspect`` found.

    Attributes:
        weighted: per weighted op, ``(name, op_type, quantized)``.
        op_counts: op_type → count over the whole graph.
        violations: broken TensorRT rules (an empty list means the model is TensorRT-ready).
        warnings: legal but probably unintended placements.
    """

    weighted: list[tuple[str, str, bool]] = dataclasses.field(default_factory=list)
    op_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    violations: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def quantized_weighted(self) -> int:
        return sum(1 for _, _, q in self.weighted if q)

    def headline(self) -> str:
        q, n = self.quantized_weighted, len(self.weighted)
        verdict = "OK" if not self.violations else f"{len(self.violations)} violation(s)"
        return f"tensorrt rules: {verdict} ({q}/{n} weighted ops quantized)"

    def summary(self) -> str:
        q = self.quantized_weighted
        lines = [
            f"weighted ops: {len(self.weighted)} ({q} quantized, {len(self.weighted) - q} float)",
            f"QuantizeLinear: {self.op_counts.get('QuantizeLinear', 0)}, "
            f"DequantizeLinear: {self.op_counts.get('DequantizeLinear', 0)}"
            + "".join(f", {op}: {n}" for op, n in sorted(self.op_counts.items()) if op.startswith("TRT_")),
        ]
        lines += [f"float: {name} ({op})" for name, op, quant in self.weighted if not quant]
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"VIOLATION: {v}" for v in self.violations]
        lines.append(
            "TensorRT rules: OK" if not self.violations else f"TensorRT rules: {len(self.violations)} violation(s)"
        )
        return "\n".join(lines)


def _producer(value: ir.Value | None) -> ir.Node | None:
    return value.producer() if value is not None else None


def _is_constant_input(value: ir.Value | None) -> bool:
    """A weight: an initializer, or a DequantizeLinear of an initializer / Q of an initializer."""
    node = _producer(value)
    if node is None or node.op_type not in _DQ_OPS:
        return const_array(value) is not None
    source = node.inputs[0]
    q = _producer(source)
    if q is not None and q.op_type == "QuantizeLinear":
        source = q.inputs[0]
    return const_array(source) is not None


def _weight_axis(node: ir.Node, rank: int, index: int) -> int:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = node.attributes.get("transB")
        return 0 if trans_b is not None and trans_b.as_int() else 1
    # MatMul: a right operand (K, N) has its output channels last, a left one (M, K) on axis -2
    return rank - 1 if index == 1 else rank - 2


def _weight_rank(deq: ir.Node) -> int:
    """Rank of a dequantized weight, read off its constant (shape info may be missing)."""
    source = deq.inputs[0]
    q = _producer(source)
    if q is not None and q.op_type == "QuantizeLinear":
        source = q.inputs[0]
    const = const_array(source)
    if const is not None:
        return const.ndim
    return len(deq.outputs[0].shape) if deq.outputs[0].shape is not None else 2


def inspect_model(model: onnx.ModelProto) -> InspectReport:
    """Inspect a QDQ ONNX model for TensorRT; see the module docstring for the checks."""
    graph = ir.serde.deserialize_model(model).graph
    report = InspectReport()
    for i, node in enumerate(graph):
        if not node.name:
            node.name = f"{node.op_type}#{i}"
        report.op_counts[node.op_type] = report.op_counts.get(node.op_type, 0) + 1
        if node.op_type.startswith("QLinear") or node.op_type in _FORBIDDEN:
            report.violations.append(f"{node.name}: {node.op_type} is not supported by TensorRT's parser")
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            _check_qdq(node, report)
        if node.op_type in _DQ_OPS and node.attributes.get("block_size") is not None:
            _check_blocked(node, report)
        if node.op_type in _DYNAMIC_Q:
            _check_dynamic(node, report)
        if node.op_type in _WEIGHTED:
            _check_weighted(node, report)
    return report


def _check_blocked(node: ir.Node, report: InspectReport) -> None:
    """Block formats (INT4, NVFP4, MXFP8) run on GEMMs only (TensorRT has no such Conv kernels)."""
    for use in node.outputs[0].uses():
        user = use.node
        if user.op_type in _DQ_OPS:
            continue  # an NVFP4 scale chain
        if user.op_type == "Transpose" and all(u.node.op_type in _GEMMS for u in user.outputs[0].uses()):
            continue  # a linear layer's (N, K) weight, transposed for the MatMul
        if user.op_type not in _GEMMS:
            report.violations.append(
                f"{node.name}: block-quantized values feed {user.op_type} {user.name or ''}".rstrip()
                + " (TensorRT runs block formats on Gemm/MatMul only)"
            )


def _check_dynamic(node: ir.Node, report: InspectReport) -> None:
    shape = node.inputs[0].shape
    if shape is not None and len(shape) not in (2, 3):
        report.violations.append(f"{node.name}: {node.op_type} needs a 2-D or 3-D input, got rank {len(shape)}")
    if node.op_type == "TRT_FP4DynamicQuantize":
        scale = const_array(node.inputs[1] if len(node.inputs) > 1 else None)
        if scale is None or scale.size != 1 or not (np.isfinite(scale).all() and (scale > 0).all()):
            report.violations.append(f"{node.name}: the global scale must be one positive constant")


def _dynamic_scale(value: ir.Value | None) -> bool:
    """A run-time block scale: DequantizeLinear of a TRT dynamic quantizer's block scales."""
    node = _producer(value)
    if node is None or node.op_type != "DequantizeLinear":
        return False
    source = _producer(node.inputs[0])
    return source is not None and source.op_type in _DYNAMIC_Q and const_array(node.inputs[1]) is not None


def _check_qdq(node: ir.Node, report: InspectReport) -> None:
    scale_value = node.inputs[1] if len(node.inputs) > 1 else None
    scale = const_or_dequantized(scale_value)
    if scale is None and _dynamic_scale(scale_value):
        return
    if scale is None:
        report.violations.append(f"{node.name}: scale is not a constant")
    elif not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        report.violations.append(f"{node.name}: scale has non-positive or non-finite values")
    zp_value = node.inputs[2] if len(node.inputs) > 2 else None
    if zp_value is not None:
        zp = const_array(zp_value)
        if zp is None:
            report.violations.append(f"{node.name}: zero-point is not a constant")
        elif np.any(zp.astype(np.float64) != 0):
            report.violations.append(f"{node.name}: zero-point is not 0 (TensorRT is symmetric)")
    zp_const = const_array(zp_value)
    if zp_const is not None:
        uint8 = zp_const.dtype == np.uint8
    else:
        code_type = (node.outputs[0] if node.op_type == "QuantizeLinear" else node.inputs[0]).dtype
        # with no zero-point and no output_dtype the spec's default code type is uint8
        uint8 = code_type == ir.DataType.UINT8 or (code_type is None and zp_value is None)
    if uint8:
        report.violations.append(f"{node.name}: uint8 codes (TensorRT needs int8 or FP8)")
    if node.op_type == "DequantizeLinear" and node.inputs[0].const_value is None:
        users = [u.node.op_type for u in node.outputs[0].uses()]
        if users and not any(u in _QUANTIZED_INPUT_OPS + _DQ_OPS for u in users):
            report.warnings.append(
                f"{node.name}: Q/DQ output feeds only float ops ({', '.join(sorted(set(users)))})"
            )


def _source_dq(value: ir.Value | None) -> tuple[ir.Node | None, list[int] | None]:
    """The DequantizeLinear behind a GEMM input, and the Transpose perm between them if any.

    Block-quantized weights of ``linear`` layers stay (N, K) with a Transpose before the MatMul,
    the layout ModelOpt exports for NVFP4/MXFP8.
    """
    node = _producer(value)
    if node is not None and node.op_type == "Transpose":
        inner = _producer(node.inputs[0])
        if inner is None or inner.op_type not in _DQ_OPS or inner.attributes.get("block_size") is None:
            return None, None
        attr = node.attributes.get("perm")
        rank = len(inner.outputs[0].shape) if inner.outputs[0].shape is not None else 2
        return inner, list(attr.as_ints()) if attr is not None else list(range(rank))[::-1]
    if node is not None and node.op_type in _DQ_OPS:
        return node, None
    return None, None


def _check_weighted(node: ir.Node, report: InspectReport) -> None:
    inputs = node.inputs[:2]
    sources = [_source_dq(v) for v in inputs]
    dq = [deq is not None for deq, _ in sources]
    weight_only = [
        deq is not None and _is_constant_input(deq.outputs[0]) and deq.attributes.get("block_size") is not None
        for deq, _ in sources
    ]
    quantized = (all(dq) and len(dq) == 2) or any(weight_only)
    report.weighted.append((node.name, node.op_type, quantized))
    if any(dq) and not all(dq) and not any(weight_only):
        report.violations.append(f"{node.name}: {node.op_type} has only some inputs quantized")
        return
    if not quantized:
        report.warnings.append(f"{node.name}: {node.op_type} left in float")
        return
    for index, (value, (deq, perm)) in enumerate(zip(inputs, sources)):
        if deq is None:
            continue  # the float activation of a weight-only GEMM
        if deq.attributes.get("block_size") is not None:
            _check_block_axis(node, deq, perm, index, report)
            continue
        scale = const_array(deq.inputs[1])
        per_channel = scale is not None and scale.size > 1
        if not _is_constant_input(value):
            if per_channel:
                report.violations.append(f"{node.name}: activation {value.name} is per-channel")
            continue
        if not per_channel:
            report.warnings.append(f"{node.name}: weight {value.name} is per-tensor")
            continue
        rank = _weight_rank(deq)
        axis_attr = deq.attributes.get("axis")
        axis = (axis_attr.as_int() if axis_attr is not None else 1) % rank
        expected = _weight_axis(node, rank, index)
        if axis != expected:
            report.violations.append(
                f"{node.name}: weight {value.name} quantized on axis {axis}, "
                f"expected the output-channel axis {expected}"
            )


def _check_block_axis(
    node: ir.Node, deq: ir.Node, perm: list[int] | None, index: int, report: InspectReport
) -> None:
    """Blocks must run along the reduction axis (K) of the GEMM (seen through a Transpose)."""
    shape = deq.outputs[0].shape
    rank = len(shape) if shape is not None else _weight_rank(deq)
    axis_attr = deq.attributes.get("axis")
    axis = (axis_attr.as_int() if axis_attr is not None else 1) % rank
    if _is_constant_input(deq.outputs[0]):
        channel = _weight_axis(node, rank, index)
        expected = (1 - channel) % rank if rank == 2 else rank - 1
    else:
        expected = rank - 1  # activations: blocks on the last axis (K of the left operand)
    if perm is not None:
        expected = perm[expected]  # the GEMM sees the transposed tensor
    if axis != expected:
        report.violations.append(
            f"{node.name}: {deq.outputs[0].name} is blocked along axis {axis}, "
            f"expected the reduction axis {expected}"
        )
