"""onnxruntime CPU rules, as data: the TensorRT INT8 plan plus what ORT's int8 kernels need.

onnxruntime's CPU provider turns QDQ groups into int8 kernels when a whole group is quantized
(its QDQ selectors): ``DQ(x), DQ(w), DQ(bias int32) → Conv → Q`` becomes ``QLinearConv``;
``DQ, DQ → MatMul`` becomes ``MatMulIntegerToFloat`` (float output) or ``QLinearMatMul``;
``DQ, DQ → Gemm`` becomes ``QGemm``; ``DQ, DQ → Add → Q`` becomes ``QLinearAdd``; Q/DQ around
MaxPool and data movement are dropped. Its fast GEMM needs **uint8 activations × int8 weights**
(u8×s8, VNNI); symmetric int8 activations mostly stay unfused (REFERENCE.md: 0.6–1.1× FP32).

So the plan is TensorRT's (INT8, per-channel weights, the same observers and ranges) with these
differences, all held as rule data:

* the ``Add`` rule: when every use of an Add's output is quantized (a ResNet block:
  ``Add → ReLU → next conv``), *both* of its inputs are quantized, so the Conv before it gets a
  quantized output (``QLinearConv``) and the Add becomes ``QLinearAdd``; otherwise (a transformer
  residual feeding LayerNorm) the Add stays float with float inputs: ORT has no kernel it would
  fuse into (TensorRT's residual rule would only add a Q/DQ round trip);
* ``MatMul`` of two activations (attention's q·kᵀ and p·v) stays float: it needs both operands
  and the softmax quantized per call, which costs more than its int8 GEMM saves (MiniLM);
* ``bounded_activation``: a value with a known lower bound (ReLU/ReLU6 0, GELU −0.17, pooled or
  reshaped) is quantized as uint8 over [low, amax] — after a ReLU twice TensorRT's steps on the
  same range, after a GELU nearly twice — and ORT drops the ReLU before it (the quantizer's clamp
  at 0 is the ReLU).

The lowering (:mod:`qgraph.backends.onnxruntime.lower`) then rewrites what ORT needs: int8
zero-point 0 → uint8 zero-point 128, quantizers moved before ReLU/Clip/Concat, linears as Gemms
on rows (all exact), and int32 biases (each within half a bias step). It lowers a TensorRT plan
as well: the same outputs as the TensorRT lowering, but for that bias rounding.
"""

from __future__ import annotations

import dataclasses

from qgraph.backends.tensorrt import rules as trt
from qgraph.quant import QSpec
from qgraph.rules import OpRule

__all__ = ["INT8", "RULES", "OPSET", "WEIGHTED_KINDS", "DEFAULT_PIPELINE"]

#: opset of the lowering (ORT runs Q/DQ at any opset ≥ 13; one opset with the TensorRT backend).
OPSET = trt.OPSET

WEIGHTED_KINDS = trt.WEIGHTED_KINDS

_FLOAT_REASONS = {
    **trt.INT8.float_reasons,
    "Relu": "activation: the quantizer after it moves before it; its clamp at zero is the ReLU",
    "Clip": "activation: the quantizer after it moves before it and clips the codes",
    "Gelu": "activation: runs in float between the int8 GEMMs",
    "LayerNormalization": "normalisation runs in float",
    "Softmax": "kept in float for accuracy",
    "Attention": "fused attention op has no place for Q/DQ inside",
}

INT8 = dataclasses.replace(
    trt.INT8,
    backend="onnxruntime",
    ops={
        **trt.INT8.ops,
        "Add": OpRule(int8_kernel=True),
        "MatMul": dataclasses.replace(
            trt.INT8.ops["MatMul"],
            needs_weight="a MatMul of two activations (attention) stays float: quantizing both "
            "operands costs more than its int8 GEMM saves on CPU",
        ),
    },
    float_reasons=_FLOAT_REASONS,
    bounded_activation=QSpec("uint8", "activation", symmetric=False),
)

#: The PTQ pipeline ``qgraph lower --backend onnxruntime`` runs unless given ``--pipeline``:
#: smooth-quant first (per-tensor INT8 activations after a LayerNorm lose its small channels;
#: MiniLM's embedding cosine 0.991 → 0.9956; a no-op on models without LayerNorm → Linear).
DEFAULT_PIPELINE = (
    "fold-batchnorm,smooth-quant,annotate,insert-observers(calibrator={calibrator}),calibrate,insert-qdq"
)

#: precision name → rule set (the recipes ``--precision`` selects).
RULES = {"int8": INT8}
