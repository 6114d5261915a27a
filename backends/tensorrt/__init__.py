"""TensorRT backend: explicit-quantization QDQ ONNX (symmetric, zero-point 0, per-channel weights)."""

from qgraph.backends.tensorrt.check import InspectReport, inspect_model
from qgraph.backends.tensorrt.lower import lower
from qgraph.backends.tensorrt.rules import INT8, OPSET, RULES

__all__ = ["RULES", "INT8", "OPSET", "lower", "inspect_model", "InspectReport"]
