"""Fusion report: which weighted ops of a QDQ model onnxruntime's CPU provider runs as int8 kernels.

The model is loaded in an onnxruntime session with every graph optimisation on (what a user gets
by default), the optimised graph is saved, and each Conv/ConvTranspose/Gemm/MatMul of the input is
looked up in it by name (ORT keeps the node's name, adding ``_token_<n>`` when it changes the
layout). A weighted op that did not become an int8 kernel gets the reason read off the input
graph: an input not quantized, int8 (not uint8) activations, a float bias, no quantized output
where ``QLinearConv`` needs one.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from qgraph._errors import first_line
from qgraph.backends._onnx import const_array

__all__ = ["FusionReport", "inspect_model", "INT8_KERNELS"]

#: Op types of onnxruntime's CPU int8 kernels (ONNX and com.microsoft domains).
INT8_KERNELS = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "MatMulIntegerToFloat",
        "QGemm",
        "MatMulInteger",
        "ConvInteger",
        "DynamicQuantizeMatMul",
        "QLinearAdd",
        "QLinearMul",
        "QLinearConcat",
        "QLinearAveragePool",
        "QLinearGlobalAveragePool",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearSoftmax",
        "QLinearReduceMean",
    }
)

_WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_WEIGHTED_KERNELS = frozenset(
    {"QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul"}
)


@dataclasses.dataclass
class FusionReport:
    """What ``qgraph inspect --backend onnxruntime`` found.

    Attributes:
        weighted: per weighted op of the input, ``(name, op_type, kernel)``: the int8 kernel ORT
            runs it as, or ``""`` when it stays float.
        reasons: weighted op name → why it stayed float.
        kernels: int8 kernel op type → count in the optimised graph.
        op_counts: op type → count in the optimised graph.
        violations: problems that stop ORT from running the model at all.
        warnings: legal but costly leftovers (Q/DQ that still run as separate ops).
    """

    weighted: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    reasons: dict[str, str] = dataclasses.field(default_factory=dict)
    kernels: dict[str, int] = dataclasses.field(default_factory=dict)
    op_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    violations: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def quantized_weighted(self) -> int:
        """Weighted ops that run as int8 kernels."""
        return sum(1 for _, _, kernel in self.weighted if kernel)

    def headline(self) -> str:
        n = len(self.weighted)
        return f"onnxruntime: {self.quantized_weighted}/{n} weighted ops run as int8 kernels"

    def summary(self) -> str:
        lines = [self.headline()]
        lines.append(
            "int8 kernels: " + (", ".join(f"{k}×{v}" for k, v in sorted(self.kernels.items())) or "none")
        )
        for name, op, kernel in self.weighted:
            lines.append(f"  {name} ({op}): {kernel or 'float — ' + self.reasons.get(name, '?')}")
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"VIOLATION: {v}" for v in self.violations]
        return "\n".join(lines)


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose nodes all have unique names (ORT's optimised graph is matched by name)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    taken = {node.name for node in copy.graph.node if node.name}
    seen: set[str] = set()
    for i, node in enumerate(copy.graph.node):
        if not node.name or node.name in seen:
            name, k = f"{node.op_type}_{i}", 0
            while name in taken:
                k += 1
                name = f"{node.op_type}_{i}_{k}"
            node.name = name
            taken.add(name)
        seen.add(node.name)
    return copy


def _optimized(model: onnx.ModelProto) -> onnx.ModelProto:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        options.optimized_model_filepath = str(path)
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(str(path))


def inspect_model(model: onnx.ModelProto) -> FusionReport:
    """Run ORT's optimiser on ``model`` and report per weighted op whether it became an int8 kernel."""
    model = _named(model)
    report = FusionReport()
    try:
        optimized = _optimized(model)
    except Exception as exc:  # onnxruntime refusing the model
        report.violations.append(f"onnxruntime cannot load the model: {first_line(exc)}")
        return report
    by_name: dict[str, str] = {}
    for node in optimized.graph.node:
        by_name[node.name] = node.op_type
        base, sep, _ = node.name.partition("_token_")
        if sep:
            by_name.setdefault(base, node.op_type)
    counts = Counter(node.op_type for node in optimized.graph.node)
    report.op_counts = dict(counts)
    report.kernels = {k: v for k, v in counts.items() if k in INT8_KERNELS}
    graph = ir.serde.deserialize_model(model).graph
    for node in graph:
        if node.op_type not in _WEIGHTED or node.domain not in ("", "ai.onnx"):
            continue
        kernel = by_name.get(node.name, "")
        kernel = kernel if kernel in _WEIGHTED_KERNELS else ""
        report.weighted.append((node.name, node.op_type, kernel))
        if not kernel:
            report.reasons[node.name] = _why_float(node)
    left = counts.get("QuantizeLinear", 0) + counts.get("DequantizeLinear", 0)
    if left:
        report.warnings.append(
            f"{left} QuantizeLinear/DequantizeLinear still run as separate ops after optimisation "
            "(each is a pass over its tensor)"
        )
    return report


def _dq(value: ir.Value | None) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == "DequantizeLinear" else None


def _why_float(node: ir.Node) -> str:
    """Why ORT's QDQ selectors did not take this weighted op (read off the input graph)."""
    if node.op_type == "ConvTranspose":
        return "onnxruntime's CPU provider has no int8 ConvTranspose kernel"
    sources = [_dq(v) for v in node.inputs[:2]]
    for index, dq in enumerate(sources):
        if dq is None:
            return f"input {index} is not quantized (no DequantizeLinear before it)"
    for dq in sources:
        if const_array(dq.inputs[0]) is None:  # an activation
            zp = const_array(dq.inputs[2]) if len(dq.inputs) > 2 else None
            if zp is not None and zp.dtype == np.int8:
                return (
                    "int8 activations: the CPU int8 kernels take uint8 activations "
                    "(lower with --backend onnxruntime)"
                )
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
    if node.op_type in ("Conv", "Gemm") and has_bias and _dq(node.inputs[2]) is None:
        return f"float bias: the int8 {node.op_type} kernel takes an int32 bias"
    if node.op_type == "Conv" and node.outputs[0].is_graph_output():
        return "its output is a float model output (QLinearConv's output is quantized)"
    if node.op_type == "Conv":
        users = [u.node.op_type for u in node.outputs[0].uses()]
        if users != ["QuantizeLinear"]:
            return (
                "its output is not quantized: QLinearConv needs one QuantizeLinear after the Conv "
                "(the plan gives it none; onnxruntime rules quantize the inputs of a block's Add)"
            )
    return "onnxruntime's QDQ selectors did not match it"
