"""Lower a fake-quantized fx graph to TensorRT-ready QDQ ONNX, or to its onnxruntime reference form."""

from __future__ import annotations

import torch
import torch.fx

from qgraph._errors import QGraphError
from qgraph.onnx_graph import internalize
from qgraph.backends import _onnx
from qgraph.backends.tensorrt.rules import OPSET, REFERENCE_ONLY
from qgraph.quant import FakeQuant, QSpec

__all__ = ["lower", "lower_onnx", "required_opset", "ort_runnable", "FORMS"]

#: ``deploy``: what TensorRT parses; ``reference``: standard ops onnxruntime's CPU provider runs.
FORMS = ("deploy", "reference")

#: The opset the reference form is written at: FP8 Cast/QuantizeLinear need 19, blocked INT4 21;
#: onnxruntime refuses Q/DQ at 23+ when the scale type differs from the input type.
REFERENCE_OPSET = 21


def _spec_opset(spec: QSpec) -> int:
    if spec.dtype == "fp4_e2m1":
        return 23  # FLOAT4E2M1 Q/DQ
    if spec.block_size:
        return 21  # blocked Q/DQ, INT4
    return OPSET  # INT8 (13+) and FP8 (19+): TensorRT 10's opset


def required_opset(gm: torch.fx.GraphModule) -> int:
    """The lowest opset that holds every quantizer of ``gm`` (20 for INT8/FP8, 21 INT4/MX, 23 FP4)."""
    specs = [m.spec for m in gm.modules() if isinstance(m, FakeQuant)]
    return max([OPSET] + [_spec_opset(s) for s in specs])


def ort_runnable(gm: torch.fx.GraphModule) -> bool:
    """Whether onnxruntime's CPU provider runs the deploy form (no FP4, no TensorRT custom ops)."""
    specs = [m.spec for m in gm.modules() if isinstance(m, FakeQuant)]
    return not any(s.dynamic or s.dtype == "fp4_e2m1" or s.scale_type == "e8m0" for s in specs)


def lower(
    gm: torch.fx.GraphModule, example_inputs: tuple[torch.Tensor, ...], form: str = "deploy"
) -> bytes:
    """Export ``gm`` (after ``insert-qdq``) as checked, serialized ONNX bytes.

    ``deploy``: INT8/FP8 weights stored as code initializers with per-channel ``DequantizeLinear``,
    INT4 blocked weights packed at opset 21, NVFP4 weights as FLOAT4E2M1 + E4M3 block scales +
    FP32 global scale through two chained ``DequantizeLinear`` (opset 23), dynamic NVFP4/MXFP8
    activations through TensorRT's ``trt`` custom ops; every zero-point is 0. ``reference``: the
    same numbers with standard ops and decoded float weights, runnable in onnxruntime.
    """
    if form not in FORMS:
        raise QGraphError(f"unknown form {form!r} (known: {', '.join(FORMS)})")
    specs = {m.spec for m in gm.modules() if isinstance(m, FakeQuant)}
    if form == "deploy" and any(s.scale_type == "e8m0" and s.dtype == "fp4_e2m1" for s in specs):
        raise QGraphError(REFERENCE_ONLY["mxfp4"])
    opset = required_opset(gm) if form == "deploy" else max(REFERENCE_OPSET, OPSET)
    if form == "reference" and all(s.is_int8 for s in specs):
        opset = OPSET  # nothing to rewrite: the INT8 deploy form is its own reference
    model = _onnx.export_onnx(gm, example_inputs, opset=opset, form=form)
    return _onnx.serialize(model)


def lower_onnx(model) -> bytes:  # noqa: ANN001 - an onnx_ir.Model after insert-qdq
    """An ONNX model quantized in place by the passes (the ONNX door) as TensorRT QDQ bytes.

    ``insert-qdq`` already wrote TensorRT's form (symmetric Q/DQ with zero-point 0, weight codes
    read by per-channel DequantizeLinear); this checks it with ``onnx.checker`` and serializes it
    deterministically. The model must be at an opset that holds its quantizers (13 for INT8
    per-channel scales, 19 for FP8: ``qgraph.onnx_graph.upgrade_opset``).
    """
    internalize(model)  # weights a large model kept on disk: one self-contained file
    return _onnx.serialize(model)
