"""Quantization specs and the fake-quant operator shared by training, calibration and export.

A :class:`QSpec` is frozen data describing how one graph edge is quantized. The integer fake-quant
is one custom operator, ``torch.ops.qgraph.fake_quant``, that computes exactly what ONNX
``QuantizeLinear`` → ``DequantizeLinear`` computes (divide by the scale, round half to even, add the
zero-point, saturate to the integer range, subtract, multiply), so the torch graph and the exported
ONNX give the same codes. Its gradient is the straight-through estimator with the clipping mask.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import Tensor

__all__ = ["QUANT_META", "FLOAT_META", "QSpec", "FakeQuant", "fake_quant", "int8_act", "int8_weight"]


#: fx ``node.meta`` keys of the quantization plan: {input index: QSpec}, and why a node stays float.
QUANT_META = "qgraph.quant"
FLOAT_META = "qgraph.float_reason"


@dataclasses.dataclass(frozen=True)
class QSpec:
    """How one tensor is quantized.

    Attributes:
        dtype: integer type of the codes (``int8`` or ``uint8``).
        role: ``activation`` (range from calibration) or ``weight`` (range from the constant).
        axis: the per-channel axis, or None for one scale per tensor.
        symmetric: zero-point 0 and range [-amax, amax] (TensorRT requires it).
    """

    dtype: Literal["int8", "uint8"] = "int8"
    role: Literal["activation", "weight"] = "activation"
    axis: int | None = None
    symmetric: bool = True

    @property
    def qmin(self) -> int:
        return -128 if self.dtype == "int8" else 0

    @property
    def qmax(self) -> int:
        return 127 if self.dtype == "int8" else 255

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.int8 if self.dtype == "int8" else torch.uint8

    def describe(self) -> str:
        gran = "per-tensor" if self.axis is None else f"per-channel(axis={self.axis})"
        return f"{self.dtype} {gran}{'' if self.symmetric else ' asymmetric'}"


def int8_act() -> QSpec:
    """Symmetric INT8 activation, one scale per tensor."""
    return QSpec("int8", "activation", None)


def int8_weight(axis: int | None) -> QSpec:
    """Symmetric INT8 weight, per channel on ``axis`` (None: per tensor)."""
    return QSpec("int8", "weight", axis)


def _broadcast(param: Tensor, x: Tensor, axis: int) -> Tensor:
    if param.dim() == 0:
        return param
    shape = [1] * x.dim()
    shape[axis] = -1
    return param.reshape(shape)


@torch.library.custom_op("qgraph::fake_quant", mutates_args=())
def fake_quant(
    x: Tensor, scale: Tensor, zero_point: Tensor, axis: int, qmin: int, qmax: int
) -> Tensor:
    """Integer quantize-dequantize of ``x`` (ONNX QuantizeLinear→DequantizeLinear semantics).

    ``scale``/``zero_point`` are 0-d (per tensor) or 1-d along ``axis`` (per channel).
    """
    s = _broadcast(scale, x, axis).to(x.dtype)
    z = _broadcast(zero_point, x, axis).to(x.dtype)
    q = torch.clamp(torch.round(x / s) + z, qmin, qmax)
    return (q - z) * s


@fake_quant.register_fake
def _(x, scale, zero_point, axis, qmin, qmax):  # noqa: ANN001 - signature fixed by torch
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):  # noqa: ANN001
    x, scale, zero_point, axis, qmin, qmax = inputs
    s = _broadcast(scale, x, axis).to(x.dtype)
    z = _broadcast(zero_point, x, axis).to(x.dtype)
    unclipped = x / s + z
    # Straight-through estimator: gradient 1 where the value was not saturated, 0 outside.
    ctx.save_for_backward((unclipped >= qmin - 0.5) & (unclipped <= qmax + 0.5))


def _backward(ctx, grad):  # noqa: ANN001
    (mask,) = ctx.saved_tensors
    return grad * mask, None, None, None, None, None


fake_quant.register_autograd(_backward, setup_context=_setup_context)


class FakeQuant(torch.nn.Module):
    """A quantizer on one graph edge: holds the spec, the scale and zero-point buffers.

    Args:
        spec: the quantization spec.
        scale: positive scale, 0-d or 1-d (per channel).
        zero_point: integer zero-point of ``spec.dtype``, same shape as ``scale``.
    """

    def __init__(self, spec: QSpec, scale: Tensor, zero_point: Tensor | None = None) -> None:
        super().__init__()
        if zero_point is None:
            zero_point = torch.zeros_like(scale, dtype=spec.torch_dtype)
        self.spec = spec
        self.register_buffer("scale", scale.detach().to(torch.float32).clone())
        self.register_buffer("zero_point", zero_point.to(spec.torch_dtype).clone())

    def forward(self, x: Tensor) -> Tensor:
        axis = self.spec.axis if self.spec.axis is not None else 0
        return torch.ops.qgraph.fake_quant(
            x, self.scale, self.zero_point, axis, self.spec.qmin, self.spec.qmax
        )

    def extra_repr(self) -> str:
        return self.spec.describe()


def symmetric_scale(amax: Tensor, spec: QSpec) -> Tensor:
    """Scale for a symmetric range [-amax, amax]: ``amax / qmax`` (127 for int8).

    Channels whose amax is 0 (all-zero weights) get scale 1.0: their codes are 0 whatever the
    scale, and TensorRT requires every scale to be positive.
    """
    amax = amax.detach().to(torch.float32)
    scale = amax / float(spec.qmax if spec.dtype == "int8" else 127)
    return torch.where(amax > 0, scale, torch.ones_like(scale))
