"""TensorRT explicit-quantization rules, as data (TensorRT developer guide, "Explicit Quantization").

* Q/DQ on every input of Conv, ConvTranspose, Gemm and MatMul: activations per tensor, weights per
  output channel (axis 0 for Conv OIHW and Linear (out, in); axis 1 for ConvTranspose; the last
  axis of a constant right MatMul operand (K, N), axis -2 of a constant left one (M, K)).
* Symmetric, zero-point 0; no Q/DQ on the outputs of weighted ops by default.
* Residual Add after a weighted op: Q/DQ on the *other* (identity) input so the Add fuses into the
  weighted op with an int8 output.
* Pooling: Q/DQ on its input so TensorRT runs it in int8 (MaxPool commutes with quantization;
  AveragePool fuses as DQ→AvgPool→Q).
* Everything else runs in float; TensorRT fuses what it can around the Q/DQ.

Recipes (one :class:`~qgraph.rules.BackendRules` each, selected by name):

| recipe | weights | activations | ops | opset |
|---|---|---|---|---|
| ``int8`` | INT8 per channel | INT8 per tensor | Conv, ConvTranspose, Gemm, MatMul, residual Add, pooling | 20 |
| ``fp8`` | FP8 E4M3 per channel (amax/448) | FP8 E4M3 per tensor | as int8 | 20 |
| ``w4a16`` | INT4 blocks of 128 on K (amax/7) | float | Gemm, MatMul with a constant right operand | 21 |
| ``nvfp4`` | NVFP4 (E2M1, blocks of 16, E4M3 + FP32 scales) | NVFP4 dynamic per block | Gemm, MatMul | 23 |
| ``mxfp8`` | MXFP8 (E4M3, blocks of 32, E8M0) | MXFP8 dynamic per block | Gemm, MatMul | 21 |
| ``mxfp4`` | MXFP4 (E2M1, blocks of 32, E8M0) | MXFP4 dynamic per block | Gemm, MatMul | 21 |

TensorRT runs INT4, NVFP4 and MX formats on GEMMs only ("TensorRT only supports FP8 and INT8 for
convolution", ModelOpt's torch_onnx example); its dynamic block quantizers take 2-D/3-D inputs
blocked on the last axis. An op outside that is an error naming the node, or, when the user
allows fallback, runs in the recipe's ``fallback`` precision (FP8 as ModelOpt does; float for
w4a16). TensorRT has no MXFP4 path at all (its FP4 quantizer takes only E4M3 block scales), so
``mxfp4`` lowers to its onnxruntime reference form only.
"""

from __future__ import annotations

import dataclasses

from qgraph.quant import QSpec, int8_act, int8_weight
from qgraph.rules import BackendRules, InputRule, OpRule

__all__ = [
    "INT8",
    "FP8",
    "W4A16",
    "NVFP4",
    "MXFP8",
    "MXFP4",
    "RULES",
    "REFERENCE_ONLY",
    "OPSET",
    "WEIGHTED_KINDS",
    "DEFAULT_PIPELINE",
]

#: ONNX opset of the INT8 and FP8 lowerings. INT8 Q/DQ needs 13 (per-axis scales); TensorRT 10
#: parses standard ops up to opset 20, and 19+ is what FP8 Q/DQ needs, so one opset serves both.
OPSET = 20

#: Ops whose inputs TensorRT requires to be quantized together (checked by `qgraph inspect`).
WEIGHTED_KINDS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})

_ACT = InputRule(0, "activation")

_FLOAT_REASONS = {
    "Softmax": "kept in float for accuracy; TensorRT's attention fusion handles it",
    "LayerNormalization": "normalisation runs in float in TensorRT",
    "BatchNormalization": "unfolded BatchNorm (fold-batchnorm refused it) runs in float",
    "Gelu": "activation: TensorRT fuses it into the preceding op's epilogue",
    "Relu": "activation: TensorRT fuses it into the preceding op's epilogue",
    "Clip": "activation: TensorRT fuses it into the preceding op's epilogue",
    "Silu": "activation: TensorRT fuses it into the preceding op's epilogue",
    "Sigmoid": "activation: runs in float",
    "Tanh": "activation: runs in float",
    "ReduceMean": "reduction runs in float",
    "Mul": "elementwise op runs in float",
    "Div": "elementwise op runs in float",
    "Sub": "elementwise op runs in float",
    "Gather": "embedding lookup runs in float",
    "Attention": "fused attention op has no place for Q/DQ inside",
}

_PER_CHANNEL_OPS = {
    "Conv": OpRule(inputs=(_ACT, InputRule(1, "weight", weight_axis=0))),
    "ConvTranspose": OpRule(inputs=(_ACT, InputRule(1, "weight", weight_axis=1)), max_groups=1),
    "Gemm": OpRule(inputs=(_ACT, InputRule(1, "weight", weight_axis=0))),
    "MatMul": OpRule(
        # a constant left operand W (M, K) has its output channels on axis -2; a right one
        # W (K, N) on axis -1 (rank-1 constants get one scale: see annotate)
        inputs=(InputRule(0, "either", weight_axis=-2), InputRule(1, "either", weight_axis=-1))
    ),
    "Add": OpRule(residual=True),
    "MaxPool": OpRule(inputs=(_ACT,)),
    "AveragePool": OpRule(inputs=(_ACT,)),
    "GlobalAveragePool": OpRule(inputs=(_ACT,)),
}

INT8 = BackendRules(
    backend="tensorrt",
    precision="int8",
    activation=int8_act(),
    weight=int8_weight(None),
    weighted_kinds=WEIGHTED_KINDS,
    ops=_PER_CHANNEL_OPS,
    float_reasons=_FLOAT_REASONS,
)

FP8 = dataclasses.replace(
    INT8,
    precision="fp8",
    activation=QSpec("fp8_e4m3", "activation"),
    weight=QSpec("fp8_e4m3", "weight"),
)


def _gemm_only(why: str, with_activation: bool) -> dict[str, OpRule]:
    """Block formats: Gemm and MatMul with a constant right operand; Conv is unsupported."""
    weight = (InputRule(1, "weight", weight_axis=0),)
    matmul_weight = (InputRule(1, "weight", weight_axis=-1),)
    act = (_ACT,) if with_activation else ()
    return {
        "Gemm": OpRule(inputs=act + weight),
        "MatMul": OpRule(inputs=act + matmul_weight),
        "Conv": OpRule(unsupported=why),
        "ConvTranspose": OpRule(unsupported=why),
    }


_BLOCK_FLOAT_REASONS = {
    **_FLOAT_REASONS,
    "Add": "block formats quantize GEMM inputs only",
    "MaxPool": "block formats quantize GEMM inputs only",
    "AveragePool": "block formats quantize GEMM inputs only",
    "GlobalAveragePool": "block formats quantize GEMM inputs only",
}

W4A16 = BackendRules(
    backend="tensorrt",
    precision="w4a16",
    activation=None,
    weight=QSpec("int4", "weight", block_size=128),
    weighted_kinds=WEIGHTED_KINDS,
    ops=_gemm_only("TensorRT's INT4 weight-only quantization runs on GEMMs only", False),
    float_reasons=_BLOCK_FLOAT_REASONS,
)

def _block_recipe(precision: str, element: str, block: int, scale_type: str, why: str) -> BackendRules:
    """A block-scaled W4A4/W8A8 recipe: both GEMM inputs in ``element``, activations dynamic."""
    return BackendRules(
        backend="tensorrt",
        precision=precision,
        activation=QSpec(element, "activation", -1, block_size=block, scale_type=scale_type, dynamic=True),
        weight=QSpec(element, "weight", block_size=block, scale_type=scale_type),
        weighted_kinds=WEIGHTED_KINDS,
        ops=_gemm_only(why, True),
        float_reasons=_BLOCK_FLOAT_REASONS,
        fallback=FP8,
    )


NVFP4 = _block_recipe("nvfp4", "fp4_e2m1", 16, "fp8_e4m3", "TensorRT runs NVFP4 on GEMMs (Gemm/MatMul) only")
MXFP8 = _block_recipe("mxfp8", "fp8_e4m3", 32, "e8m0", "TensorRT runs MXFP8 on GEMMs (Gemm/MatMul) only")
MXFP4 = _block_recipe("mxfp4", "fp4_e2m1", 32, "e8m0", "block formats run on GEMMs (Gemm/MatMul) only")

#: The PTQ pipeline ``qgraph lower --backend tensorrt`` runs. SmoothQuant (INT8 recipes only) at
#: alpha 0.8 with GELU outputs: TensorRT's symmetric INT8 activations waste half their range on
#: GELU's [-0.17, amax] output, and smoothing the FFN down projection's input recovers it
#: (all-MiniLM-L6-v2, every GEMM in INT8: cosine 0.983 → 0.997; alpha 0.5 gives 0.93).
DEFAULT_PIPELINE = (
    "fold-batchnorm,smooth-quant(alpha=0.8,gelu=true),annotate,insert-observers(calibrator={calibrator}),"
    "calibrate,insert-qdq"
)

#: recipes with no TensorRT deploy form → why (they lower to the reference form only).
REFERENCE_ONLY = {
    "mxfp4": "TensorRT has no MXFP4 path (its FP4 quantizer takes E4M3 block scales only): "
    "use precision nvfp4, or write the onnxruntime reference form (--form reference)",
}

#: precision name → rule set (the recipes ``--precision`` selects).
RULES = {r.precision: r for r in (INT8, FP8, W4A16, NVFP4, MXFP8, MXFP4)}
