"""Lower a fake-quantized fx graph to TensorRT-ready QDQ ONNX."""

from __future__ import annotations

import torch
import torch.fx

from qgraph.backends import _onnx
from qgraph.backends.tensorrt.rules import OPSET

__all__ = ["lower"]


def lower(gm: torch.fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]) -> bytes:
    """Export ``gm`` (after ``insert-qdq``) as checked, serialized ONNX bytes at opset 20.

    Weights are stored as INT8 initializers with per-channel ``DequantizeLinear``; activations
    get per-tensor ``QuantizeLinear``/``DequantizeLinear`` pairs; every zero-point is 0.
    """
    model = _onnx.export_onnx(gm, example_inputs, opset=OPSET)
    return _onnx.serialize(model)
