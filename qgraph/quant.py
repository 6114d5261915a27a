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

from qgraph import formats
from qgraph import qops  # also registers qgraph::fake_quant_fmt / fake_quant_dynamic

__all__ = ["QUANT_META", "FLOAT_META", "FALLBACK_META", "QSpec", "FakeQuant", "fake_quant", "int8_act", "int8_weight"]


#: fx ``node.meta`` keys of the quantization plan: {input index: QSpec}, and why a node stays float.
QUANT_META = "qgraph.quant"
FLOAT_META = "qgraph.float_reason"
#: fx ``node.meta`` key: why an op runs in its recipe's fallback precision.
FALLBACK_META = "qgraph.fallback"


@dataclasses.dataclass(frozen=True)
class QSpec:
    """How one tensor is quantized.

    Attributes:
        dtype: element type of the codes (a name in :data:`qgraph.formats.ELEMENTS`: ``int8``,
            ``uint8``, ``int4``, ``fp8_e4m3``, ``fp8_e5m2``, ``fp4_e2m1``).
        role: ``activation`` (range from calibration) or ``weight`` (range from the constant).
        axis: per-channel: the kept axis; blocked: the axis the blocks run along; None: one
            scale per tensor.
        symmetric: zero-point 0 and range [-amax, amax] (TensorRT requires it).
        block_size: elements per scale along ``axis`` (None: per tensor / per channel).
        scale_type: type of the (block) scales: ``float32``; ``fp8_e4m3`` (NVFP4: E4M3 block
            scales times an FP32 per-tensor scale); ``e8m0`` (MX: powers of two).
        dynamic: block scales computed at run time from the tensor itself (NVFP4 and MX
            activations); only the NVFP4 per-tensor scale is calibrated.
    """

    dtype: str = "int8"
    role: Literal["activation", "weight"] = "activation"
    axis: int | None = None
    symmetric: bool = True
    block_size: int | None = None
    scale_type: Literal["float32", "fp8_e4m3", "e8m0"] = "float32"
    dynamic: bool = False

    def __post_init__(self) -> None:
        formats.element(self.dtype)  # raises ValueError naming the known element types

    @property
    def element(self) -> formats.Element:
        return formats.ELEMENTS[self.dtype]

    @property
    def qmin(self) -> int:
        return int(self.element.qmin)

    @property
    def qmax(self) -> int:
        return int(self.element.qmax)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.int8 if self.dtype == "int8" else torch.uint8

    @property
    def is_int8(self) -> bool:
        """The classic INT8/UINT8 per-tensor/per-channel quantizer (``qgraph::fake_quant``)."""
        return self.dtype in ("int8", "uint8") and not self.block_size and not self.dynamic

    @property
    def needs_calibration(self) -> bool:
        """Activations whose scale (or NVFP4 global scale) comes from calibration data."""
        return self.role == "activation" and not (self.dynamic and self.scale_type == "e8m0")

    def describe(self) -> str:
        if self.block_size:
            gran = f"block {self.block_size}"
            if self.scale_type != "float32":
                gran += f" ({self.scale_type} scales)"
            if self.dynamic:
                gran += " dynamic"
        else:
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
    q = (x / s).round_()  # one temporary, updated in place: allocations dominate on CPU
    if bool(zero_point.any()):
        z = _broadcast(zero_point, x, axis).to(x.dtype)
        return q.add_(z).clamp_(qmin, qmax).sub_(z).mul_(s)
    return q.clamp_(qmin, qmax).mul_(s)


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
    """A quantizer on one graph edge: holds the spec and its scale buffers.

    Build one with :meth:`for_weight` or :meth:`for_activation`, which apply the format's
    scale rule. INT8/UINT8 specs run ``qgraph::fake_quant``; other static specs
    ``qgraph::fake_quant_fmt``; dynamic (NVFP4/MX activation) specs ``qgraph::fake_quant_dynamic``.

    Args:
        spec: the quantization spec.
        scale: positive scale: 0-d, 1-d (per channel) or blocked (the rank of the tensor).
        zero_point: integer zero-point of ``spec.dtype`` (INT8/UINT8 only), same shape as ``scale``.
        global_scale: the FP32 per-tensor scale of NVFP4 (other formats: 1).
    """

    def __init__(
        self,
        spec: QSpec,
        scale: Tensor,
        zero_point: Tensor | None = None,
        global_scale: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("scale", scale.detach().to(torch.float32).clone())
        if spec.is_int8:
            if zero_point is None:
                zero_point = torch.zeros_like(scale, dtype=spec.torch_dtype)
            self.register_buffer("zero_point", zero_point.to(spec.torch_dtype).clone())
        else:
            if global_scale is None:
                global_scale = torch.ones((), dtype=torch.float32)
            self.register_buffer("global_scale", global_scale.detach().to(torch.float32).clone())

    @classmethod
    def for_weight(cls, spec: QSpec, weight: Tensor) -> "FakeQuant":
        """The quantizer of a constant weight, its scales read off the weight itself."""
        w = weight.detach().to(torch.float32)
        block = spec.block_size or 0
        if spec.is_int8:
            amax = w.abs().max() if spec.axis is None else w.abs().movedim(spec.axis, 0).flatten(1).amax(1)
            return cls(spec, symmetric_scale(amax, spec))
        if spec.scale_type == "fp8_e4m3":
            block_scale, global_scale = qops.nvfp4_scales(w, axis=spec.axis, block_size=block)
            return cls(spec, block_scale, global_scale=global_scale)
        if spec.scale_type == "e8m0":
            return cls(spec, qops.mx_scales(w, spec.dtype, axis=spec.axis, block_size=block))
        return cls(spec, qops.absmax_scale(w, spec.dtype, spec.axis, block))

    @classmethod
    def for_activation(cls, spec: QSpec, amax: float | Tensor) -> "FakeQuant":
        """The quantizer of an activation whose calibrated clipping threshold is ``amax``."""
        amax = torch.as_tensor(amax, dtype=torch.float32)
        if spec.is_int8:
            return cls(spec, symmetric_scale(amax, spec))
        if spec.dynamic:  # block scales at run time; NVFP4 keeps a calibrated per-tensor scale
            one = torch.ones((), dtype=torch.float32)
            if spec.scale_type == "fp8_e4m3":
                return cls(spec, one, global_scale=qops.nvfp4_global_scale(amax))
            return cls(spec, one)
        return cls(spec, qops.scale_from_amax(amax, spec.dtype))

    def forward(self, x: Tensor) -> Tensor:
        spec = self.spec
        axis = spec.axis if spec.axis is not None else 0
        if spec.is_int8:
            return torch.ops.qgraph.fake_quant(x, self.scale, self.zero_point, axis, spec.qmin, spec.qmax)
        if spec.dynamic:
            return torch.ops.qgraph.fake_quant_dynamic(
                x, self.global_scale, spec.block_size, spec.dtype, spec.scale_type
            )
        return torch.ops.qgraph.fake_quant_fmt(
            x, self.scale, self.global_scale, axis, spec.block_size or 0, spec.dtype
        )

    def extra_repr(self) -> str:
        return self.spec.describe()


def symmetric_scale(amax: Tensor, spec: QSpec) -> Tensor:
    """Scale for a symmetric range [-amax, amax]: ``amax / qmax`` (127 for int8).

    Channels whose amax is 0 (all-zero weights), or so small that the scale would be subnormal,
    get scale 1.0: their codes are 0 whatever the scale, and TensorRT requires every scale to be
    positive.
    """
    amax = amax.detach().to(torch.float32)
    return qops.positive(amax / float(spec.qmax if spec.dtype == "int8" else 127))
