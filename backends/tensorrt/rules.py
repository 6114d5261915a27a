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
"""

from __future__ import annotations

from qgraph.quant import int8_act
from qgraph.rules import BackendRules, InputRule, OpRule

__all__ = ["INT8", "RULES", "OPSET", "WEIGHTED_KINDS"]

#: ONNX opset of the lowered model. INT8 Q/DQ needs 13 (per-axis scales); TensorRT 10 parses
#: standard ops up to opset 20, and 19+ is what FP8 Q/DQ needs, so one opset serves all formats.
OPSET = 20

#: Ops whose inputs TensorRT requires to be quantized together (checked by `qgraph inspect`).
WEIGHTED_KINDS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})

_ACT = InputRule(0, "activation")

INT8 = BackendRules(
    backend="tensorrt",
    precision="int8",
    activation=int8_act(),
    weight_dtype="int8",
    weighted_kinds=WEIGHTED_KINDS,
    ops={
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
    },
    float_reasons={
        "Softmax": "kept in float for accuracy; TensorRT's attention fusion handles it",
        "LayerNormalization": "normalisation runs in float in TensorRT",
        "BatchNormalization": "unfolded BatchNorm (fold-batchnorm refused it) runs in float",
        "Gelu": "activation: TensorRT fuses it into the preceding op's epilogue",
        "Relu": "activation: TensorRT fuses it into the preceding op's epilogue",
        "Silu": "activation: TensorRT fuses it into the preceding op's epilogue",
        "Sigmoid": "activation: runs in float",
        "Tanh": "activation: runs in float",
        "ReduceMean": "reduction runs in float",
        "Mul": "elementwise op runs in float",
        "Div": "elementwise op runs in float",
        "Sub": "elementwise op runs in float",
        "Gather": "embedding lookup runs in float",
        "Attention": "fused attention op has no place for Q/DQ inside",
    },
)

#: precision name → rule set.
RULES = {"int8": INT8}
