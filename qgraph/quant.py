"""Quantization specs and the fake-quant operator shared by training, calibration and export.

A :class:`QSpec` is frozen data describing how one graph edge is quantized. The integer fake-quant
is one custom operator, ``torch.ops.qgraph.fake_quant``, that computes exactly what ONNX
``QuantizeLinear`` → ``DequantizeLinear`` computes (divide by the scale, round half to even, add the
zero-point, saturate to the integer range, subtract, multiply), so the torch graph and the exported
ONNX give the same codes. Its gradient is the straight-through estimator with the clipping mask.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import torch
from torch import Tensor

from qgraph import formats
from qgraph._errors import QGraphError
from qgraph.graph import get_attr
from qgraph import qops  # also registers qgraph::fake_quant_fmt / fake_quant_dynamic

__all__ = ["QUANT_META", "FLOAT_META", "FALLBACK_META", "prepare_for_export", "refresh_weight_scales", "QSpec", "FakeQuant", "fake_quant", "int8_act", "int8_weight"]


#: fx ``node.meta`` keys of the quantization plan: {input index: QSpec}, and why a node stays float.
logger = logging.getLogger(__name__)

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
        low: a lower bound the values cannot go below, known from the op that makes them
            (ReLU 0, GELU −0.17): an INT8/UINT8 activation then spans [low, amax] instead of
            [−amax, amax] — scale ``(amax − low) / (qmax − qmin)``, zero-point
            ``qmin + round(−low / scale)`` — twice the steps of a symmetric range for a ReLU.
    """

    dtype: str = "int8"
    role: Literal["activation", "weight"] = "activation"
    axis: int | None = None
    symmetric: bool = True
    block_size: int | None = None
    scale_type: Literal["float32", "fp8_e4m3", "e8m0"] = "float32"
    dynamic: bool = False
    low: float | None = None

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
    view = qops.ChannelView(x, axis, scale.dim() > 0)
    s = view.param(scale.to(torch.float32))
    if bool(zero_point.any()):
        z = view.param(zero_point.to(torch.float32))
        return view.back(qops.kernel(_affine_forward, x.numel())(view.x, s, z, qmin, qmax))
    return view.back(qops.kernel(_symmetric_forward, x.numel())(view.x, s, qmin, qmax))


def _symmetric_forward(x: Tensor, s: Tensor, qmin: int, qmax: int) -> Tensor:
    # float32 whatever x is (the ONNX codes); one temporary updated in place (allocation dominates)
    return (x.to(torch.float32) / s).round_().clamp_(qmin, qmax).mul_(s).to(x.dtype)


def _affine_forward(x: Tensor, s: Tensor, z: Tensor, qmin: int, qmax: int) -> Tensor:
    return (x.to(torch.float32) / s).round_().add_(z).clamp_(qmin, qmax).sub_(z).mul_(s).to(x.dtype)


def _inside(grad: Tensor, x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """``grad`` where ``lo <= x <= hi`` (the clipping range in x's units), 0 elsewhere."""
    return (grad * ((x >= lo) & (x <= hi))).to(grad.dtype)


@fake_quant.register_fake
def _(x, scale, zero_point, axis, qmin, qmax):  # noqa: ANN001 - signature fixed by torch
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):  # noqa: ANN001
    x, scale, zero_point, axis, qmin, qmax = inputs
    ctx.axis, ctx.qmin, ctx.qmax = axis, qmin, qmax
    ctx.save_for_backward(x, scale, zero_point)


def _backward(ctx, grad):  # noqa: ANN001
    """Straight-through estimator for x (1 where the value was not saturated, 0 outside); for a
    scale that requires grad, the LSQ gradient ``q - z - v`` inside the range, ``q - z`` outside
    (v = x / s, q the saturated code), summed to the scale's shape."""
    x, scale, zero_point = ctx.saved_tensors
    grad_x = grad_s = None
    if ctx.needs_input_grad[1]:  # LSQ needs v = x / s anyway
        s = _broadcast(scale, x, ctx.axis).to(torch.float32)
        z = _broadcast(zero_point, x, ctx.axis).to(torch.float32)
        v = x.to(torch.float32) / s
        inside = (v + z >= ctx.qmin - 0.5) & (v + z <= ctx.qmax + 0.5)
        q = torch.clamp(torch.round(v) + z, ctx.qmin, ctx.qmax)
        grad_s = qops.reduce_to_scale(grad * (q - z - v * inside), scale, ctx.axis, 0)
        grad_x = (grad * inside).to(grad.dtype) if ctx.needs_input_grad[0] else None
    elif ctx.needs_input_grad[0]:
        # the clipping range in x's units, per channel: two compares instead of a division
        view = qops.ChannelView(x, ctx.axis, scale.dim() > 0)
        s, z = view.param(scale.to(torch.float32)), view.param(zero_point.to(torch.float32))
        lo, hi = (ctx.qmin - 0.5 - z) * s, (ctx.qmax + 0.5 - z) * s
        grad_x = view.back(qops.kernel(_inside, x.numel())(view.of(grad), view.x, lo, hi))
    return grad_x, grad_s, None, None, None, None


fake_quant.register_autograd(_backward, setup_context=_setup_context)


def _fake_quant_traced(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int, qmin: int, qmax: int) -> Tensor:
    """``fake_quant`` without its branch on the zero-point's values (torch.compile would break
    the graph there): the affine formula, which with a zero-point of 0 gives the same values
    (an exact -0 comes out +0)."""
    view = qops.ChannelView(x, axis, scale.dim() > 0)
    s, z = view.param(scale.to(torch.float32)), view.param(zero_point.to(torch.float32))
    return view.back(_affine_forward(view.x, s, z, qmin, qmax))


_TRACEABLE = {
    "fake_quant": qops.traceable_twin("FakeQuantInt", _fake_quant_traced, _setup_context, _backward),
    "fake_quant_fmt": qops.fake_quant_fmt_traceable,
    "fake_quant_dynamic": qops.fake_quant_dynamic_traceable,
}


def _op(name: str):  # noqa: ANN202
    """A quantizer op: the custom op (eager runs, torch.export), or its autograd.Function twin
    while torch.compile traces a graph (see :func:`qgraph.qops.traceable_twin`)."""
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        return _TRACEABLE[name]
    return getattr(torch.ops.qgraph, name)


class FakeQuant(torch.nn.Module):
    """A quantizer on one graph edge: holds the spec and its scales (buffers; a learned scale is a
    parameter).

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
        # QAT state (see :meth:`configure_training`); all off for PTQ
        self.track_weight = False
        self.observe_steps = 0
        self.observed = 0

    @staticmethod
    def weight_scales(spec: QSpec, weight: Tensor) -> tuple[Tensor, Tensor | None]:
        """(scale, NVFP4 global scale or None) of a weight by its format's rule."""
        w = weight.detach().to(torch.float32)
        block = spec.block_size or 0
        if spec.is_int8:
            amax = w.abs().max() if spec.axis is None else w.abs().movedim(spec.axis, 0).flatten(1).amax(1)
            return symmetric_scale(amax, spec), None
        if spec.scale_type == "fp8_e4m3":
            return qops.nvfp4_scales(w, axis=spec.axis, block_size=block)
        if spec.scale_type == "e8m0":
            return qops.mx_scales(w, spec.dtype, axis=spec.axis, block_size=block), None
        return qops.absmax_scale(w, spec.dtype, spec.axis, block), None

    @classmethod
    def for_weight(cls, spec: QSpec, weight: Tensor) -> "FakeQuant":
        """The quantizer of a constant weight, its scales read off the weight itself."""
        scale, global_scale = cls.weight_scales(spec, weight)
        return cls(spec, scale, global_scale=global_scale)

    @property
    def learnable(self) -> bool:
        """Whether the scale is a trained parameter (LSQ)."""
        return isinstance(self.scale, torch.nn.Parameter)

    def configure_training(
        self, *, track_weight: bool = False, learn_scale: bool = False, observe_steps: int = 0
    ) -> bool:
        """Set the QAT behaviour; returns whether anything changed.

        Args:
            track_weight: (weights) recompute the scales from the current weight on every call,
                so the codes follow the weights as they train; what is exported is the scale of
                the final weights (:func:`refresh_weight_scales`).
            learn_scale: make the scale a parameter trained with the LSQ gradient, scaled by
                ``1 / sqrt(elements per scale * qmax)`` (Esser et al., 2020). Static quantizers:
                float32 scales (INT8, FP8, INT4; per tensor, channel or block) and NVFP4 weight
                block scales, which the forward rounds to E4M3 (the gradient passes straight
                through), so training sees what is deployed. Not dynamic quantizers (their
                block scales are computed from each input at run time) or MX's power-of-two
                block scales.
            observe_steps: (activations) keep widening the calibrated range with the running
                max |x| for this many training-mode calls.
        """
        if learn_scale and self.spec.dynamic:
            raise QGraphError(
                f"{self.spec.describe()}: its block scales are computed from each input at run time; "
                "there is no scale to learn"
            )
        if learn_scale and self.spec.scale_type not in LEARNABLE_SCALE_TYPES:
            raise QGraphError(f"{self.spec.describe()}: MX block scales (powers of two) cannot be learned")
        if learn_scale and (track_weight or observe_steps):
            raise QGraphError("a learned scale is neither tracked nor observed: pick one")
        changed = (self.track_weight, self.learnable, self.observe_steps) != (
            track_weight, learn_scale, observe_steps
        )
        self.track_weight, self.observe_steps = track_weight, observe_steps
        if learn_scale and not self.learnable:
            scale = self.scale.detach().clone()
            del self.scale
            # FSDP2 (fully_shard) shards no 0-d parameter: a per-tensor scale is learned as a
            # one-element vector, read back as a scalar (:meth:`scale_value`)
            self.scale = torch.nn.Parameter(scale.reshape(1) if scale.dim() == 0 else scale)
            # what calibration gave, to catch a learned scale the optimizer drove to ~0
            self.register_buffer("calibrated_scale", self.scale.detach().clone(), persistent=False)
        elif not learn_scale and self.learnable:
            scale = self.scale_value().detach().clone()
            del self.scale
            self.register_buffer("scale", scale)
        return changed

    def scale_value(self) -> Tensor:
        """The scale in its quantizer's shape: 0-d per tensor (a learned one is held as a
        one-element vector), 1-d per channel, blocked otherwise."""
        scale = self.scale
        return scale.reshape(()) if self.learnable and self.per_tensor else scale

    @property
    def per_tensor(self) -> bool:
        """Whether one scale covers the whole tensor (no axis, no blocks)."""
        return self.spec.axis is None and not self.spec.block_size

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        # a per-tensor scale saved learned (one-element vector) loads into a frozen one (0-d),
        # and the other way round
        key = prefix + "scale"
        saved = state_dict.get(key)
        if saved is not None and self.per_tensor and saved.numel() == 1 and saved.shape != self.scale.shape:
            state_dict[key] = saved.reshape(self.scale.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def refresh(self, weight: Tensor) -> None:
        """Recompute the scales from ``weight`` (weights tracked during QAT)."""
        scale, global_scale = self.weight_scales(self.spec, weight)
        self.scale.copy_(scale)
        if global_scale is not None:
            self.global_scale.copy_(global_scale)

    @torch.no_grad()
    def _observe(self, x: Tensor) -> None:
        """Widen the activation range with max |x| (the first ``observe_steps`` training calls)."""
        self.observed += 1
        amax = x.detach().abs().max().to(torch.float32)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank widens to the same range (DDP would otherwise keep rank 0's or diverge)
            torch.distributed.all_reduce(amax, op=torch.distributed.ReduceOp.MAX)
        spec = self.spec
        if spec.is_int8 and spec.low is not None:
            scale = torch.maximum(self.scale, bounded_range(amax, spec)[0])
            self.scale.copy_(scale)
            self.zero_point.copy_(bounded_zero_point(scale, spec))
        elif spec.is_int8:
            self.scale.copy_(torch.maximum(self.scale, symmetric_scale(amax, spec)))
        elif spec.dynamic and spec.scale_type == "fp8_e4m3":
            self.global_scale.copy_(torch.maximum(self.global_scale, qops.nvfp4_global_scale(amax)))
        elif not spec.dynamic:
            self.scale.copy_(torch.maximum(self.scale, qops.scale_from_amax(amax, spec.dtype)))

    @classmethod
    def for_activation(cls, spec: QSpec, amax: float | Tensor) -> "FakeQuant":
        """The quantizer of an activation whose calibrated clipping threshold is ``amax``."""
        amax = torch.as_tensor(amax, dtype=torch.float32)
        if spec.is_int8 and spec.low is not None:
            return cls(spec, *bounded_range(amax, spec))
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
        exporting = torch.compiler.is_exporting()
        observing = self.training and self.observed < self.observe_steps and not exporting
        tracking = self.track_weight and not exporting
        if observing:
            self._observe(x)
        if tracking:
            self.refresh(x)
        scale = self.scale_value()
        global_scale = getattr(self, "global_scale", None)
        if observing or tracking:
            # the buffers change again on the next call: the op must keep its own copies for
            # backward (two forwards before one backward would fail otherwise)
            scale = scale.clone()
            global_scale = global_scale.clone() if global_scale is not None else None
        if self.learnable and not exporting:
            scale = scale.clamp_min(_TINY)  # a learned scale stays positive (see prepare_for_export)
            if torch.is_grad_enabled():
                scale = _GradScale.apply(scale, (x.numel() / scale.numel() * spec.qmax) ** -0.5)
            if spec.scale_type == "fp8_e4m3":  # what TensorRT stores: E4M3 block scales
                scale = _E4M3Ratio.apply(scale)
        if spec.is_int8:
            return _op("fake_quant")(x, scale, self.zero_point, axis, spec.qmin, spec.qmax)
        if spec.dynamic:
            return _op("fake_quant_dynamic")(x, global_scale, spec.block_size, spec.dtype, spec.scale_type)
        return _op("fake_quant_fmt")(x, scale, global_scale, axis, spec.block_size or 0, spec.dtype, spec.scale_type)

    def extra_repr(self) -> str:
        return self.spec.describe()


#: smallest normal float32: the floor of a learned scale
_TINY = float(torch.finfo(torch.float32).tiny)

#: scale types a static quantizer can learn (LSQ): float32 scales, NVFP4's E4M3 block scales
LEARNABLE_SCALE_TYPES = ("float32", "fp8_e4m3")


class _E4M3Ratio(torch.autograd.Function):
    """NVFP4 block scales rounded to E4M3 (:func:`qgraph.qops.e4m3_ratio`); the gradient passes
    straight through the rounding and the clamp to [2**-9, 448] (a scale that crossed a bound
    can come back)."""

    @staticmethod
    def forward(ctx, ratio: Tensor) -> Tensor:  # noqa: ANN001
        return qops.e4m3_ratio(ratio)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        return grad


class _GradScale(torch.autograd.Function):
    """Identity whose gradient is multiplied by ``g`` (LSQ's gradient scale; the value is exact)."""

    @staticmethod
    def forward(ctx, scale: Tensor, g: float) -> Tensor:  # noqa: ANN001
        ctx.g = g
        return scale.view_as(scale)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        return grad * ctx.g, None


def prepare_for_export(gm: torch.nn.Module) -> int:
    """Bring every QAT quantizer's stored state to what the trained model computes.

    Tracked weight scales are recomputed from the final weights (the last optimizer step came
    after the last forward) and learned scales are clamped positive, as the forward clamps them;
    learned NVFP4 block scales are stored rounded to E4M3, as the forward rounds them (the model
    computes the same; training resumed afterwards starts from the rounded values).
    ``lower`` calls this. Returns how many tracked weight scales were refreshed.
    """
    with torch.no_grad():
        for name, module in gm.named_modules():
            if isinstance(module, FakeQuant) and module.learnable:
                calibrated = getattr(module, "calibrated_scale", None)
                if calibrated is not None and bool((module.scale <= 1e-3 * calibrated).any()):
                    logger.warning(
                        "learned scale of %s fell from %.3g to %.3g: its codes saturate; the "
                        "optimizer's step is too large for it (Adam moves every parameter by about "
                        "its learning rate per step: give scales their own, smaller rate)",
                        name, float(calibrated.min()), float(module.scale.min()),
                    )
                module.scale.clamp_(min=_TINY)
                if module.spec.scale_type == "fp8_e4m3":  # stored as the forward rounds it
                    module.scale.copy_(qops.e4m3_ratio(module.scale))
    return refresh_weight_scales(gm)


def refresh_weight_scales(gm: torch.nn.Module) -> int:
    """Recompute the scales of every weight-tracking quantizer from its current weight.

    Returns how many quantizers were refreshed.
    """
    import torch.fx

    refreshed = 0
    graph = getattr(gm, "graph", None)
    for node in graph.nodes if isinstance(graph, torch.fx.Graph) else ():
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        src = node.args[0]
        if isinstance(module, FakeQuant) and module.track_weight and getattr(src, "op", "") == "get_attr":
            module.refresh(get_attr(gm, src.target))
            refreshed += 1
    return refreshed



def bounded_range(amax: Tensor, spec: QSpec) -> tuple[Tensor, Tensor]:
    """(scale, zero-point) covering [min(spec.low, 0), amax] with every code of an INT8/UINT8
    spec (the range always holds 0: its code is the zero-point; a positive bound counts as 0)."""
    amax = amax.detach().to(torch.float32)
    scale = qops.positive((amax - min(spec.low, 0.0)).clamp(min=0) / float(spec.qmax - spec.qmin))
    return scale, bounded_zero_point(scale, spec)


def bounded_zero_point(scale: Tensor, spec: QSpec) -> Tensor:
    """The code of 0 when the lowest code stands for ``min(spec.low, 0)``."""
    z = spec.qmin + torch.round(-min(spec.low, 0.0) / scale)
    return z.clamp(spec.qmin, spec.qmax).to(spec.torch_dtype)


def symmetric_scale(amax: Tensor, spec: QSpec) -> Tensor:
    """Scale for a symmetric range [-amax, amax]: ``amax / qmax`` (127 for int8).

    Channels whose amax is 0 (all-zero weights), or so small that the scale would be subnormal,
    get scale 1.0: their codes are 0 whatever the scale, and TensorRT requires every scale to be
    positive.
    """
    amax = amax.detach().to(torch.float32)
    return qops.positive(amax / float(spec.qmax if spec.dtype == "int8" else 127))
