"""TensorRT backend: explicit-quantization QDQ ONNX (symmetric, zero-point 0, per-channel weights)."""

from qgraph.backends.tensorrt.check import InspectReport, inspect_model
from qgraph.backends.tensorrt.lower import FORMS, lower, lower_onnx, ort_runnable, required_opset
from qgraph.backends.tensorrt.rules import (
    DEFAULT_PIPELINE,
    FP8,
    INT8,
    MXFP4,
    MXFP8,
    NVFP4,
    OPSET,
    REFERENCE_ONLY,
    RULES,
    W4A16,
    WEIGHTED_KINDS,
)

__all__ = [
    "DEFAULT_PIPELINE",
    "RULES",
    "REFERENCE_ONLY",
    "INT8",
    "FP8",
    "W4A16",
    "NVFP4",
    "MXFP8",
    "MXFP4",
    "OPSET",
    "WEIGHTED_KINDS",
    "FORMS",
    "lower",
    "lower_onnx",
    "ort_runnable",
    "required_opset",
    "inspect_model",
    "InspectReport",
]
