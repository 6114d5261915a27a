"""onnxruntime backend: the INT8 plan as QDQ ONNX that ORT's CPU provider fuses into int8 kernels."""

from qgraph.backends.onnxruntime.fusion import INT8_KERNELS, FusionReport, inspect_model
from qgraph.backends.onnxruntime.lower import FORMS, REFERENCE_ONLY, lower, lower_onnx, ort_runnable, to_onnxruntime
from qgraph.backends.onnxruntime.rules import DEFAULT_PIPELINE, INT8, OPSET, RULES, WEIGHTED_KINDS

__all__ = [
    "RULES",
    "DEFAULT_PIPELINE",
    "INT8",
    "OPSET",
    "WEIGHTED_KINDS",
    "FORMS",
    "REFERENCE_ONLY",
    "lower",
    "lower_onnx",
    "to_onnxruntime",
    "ort_runnable",
    "inspect_model",
    "FusionReport",
    "INT8_KERNELS",
]
