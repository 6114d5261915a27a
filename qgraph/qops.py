"""Torch kernels of the formats in :mod:`qgraph.formats`, and the fake-quant ops built on them.

The kernels compute exactly what the numpy reference computes (float32 arithmetic in the same
order, round half to even, saturation), on CPU or CUDA tensors:

* :func:`round_to` rounds already-scaled values to an element's grid (FP8 through torch's own
  ``float8`` types, or, traced by ``torch.compile``, the same rounding on the float32 bits; FP4
  E2M1 binade by binade; integers with ``torch.round``);
* :func:`absmax_scale`, :func:`nvfp4_scales`, :func:`mx_scales` are the scale rules;
* two custom ops carry formats through ``torch.export`` to the backends:

  - ``qgraph::fake_quant_fmt(x, scale, global_scale, axis, block_size, element)``: a static
    symmetric quantizer (per tensor, per channel on ``axis`` or per block along ``axis``; the
    effective scale is ``scale * global_scale``, the NVFP4 two-level form);
  - ``qgraph::fake_quant_dynamic(x, global_scale, block_size, element, scale_type)``: block
    scales computed at run time on the last axis (NVFP4 ``fp8_e4m3`` block scales, or MX ``e8m0``).

Both have a straight-through gradient, so they train: ``fake_quant_fmt`` passes it where a value
was inside the representable range and gives 0 where it saturated (and an LSQ gradient to a
scale that requires one); ``fake_quant_dynamic`` passes it for every finite value, including the
rare MX values that saturate at the top of a block under the OCP exponent rule. Both compute in
float32 whatever the input type.

Compiled kernels: every quantizer is a chain of elementwise torch ops, and on a CPU each op is a
pass over memory plus an allocation. :func:`use_compiled_kernels` (or ``QGRAPH_COMPILED_KERNELS=1``)
runs the forward and straight-through backward bodies through ``torch.compile`` (inductor), which
fuses each into one loop: 3–9× faster per quantizer, bit-identical results (tested), a few
seconds of compilation the first time each kernel is used (cached on disk by inductor). Off by
default: it needs a C++ compiler on CPU, and inference/export do not need the speed.

A whole training graph compiled with ``torch.compile(gm)`` goes further: there the quantizers are
:func:`traceable_twin` autograd Functions rather than custom ops, and inductor fuses each one
with the ops around it (``torch.export`` still sees the custom ops).
"""

from __future__ import annotations

import functools
import math
import os

import torch
from torch import Tensor

from qgraph import formats as fmt
from qgraph.formats import Element

__all__ = [
    "round_to",
    "expand",
    "block_amax",
    "absmax_scale",
    "affine_scale",
    "nvfp4_scales",
    "e4m3_ratio",
    "mx_scales",
    "fake_quant_fmt",
    "fake_quant_dynamic",
    "quantize_codes",
    "dequantize",
    "reduce_to_scale",
    "use_compiled_kernels",
    "kernel",
    "COMPILED_MIN_NUMEL",
    "ChannelView",
    "BlockView",
    "memory_order",
    "permute",
    "unpermute",
    "rows_order",
    "in_layout_of",
    "SCALE_TYPES",
]

#: Block-scale types of dynamic quantizers: NVFP4's E4M3 scale and MX's E8M0 power of two.
SCALE_TYPES = ("fp8_e4m3", "e8m0")
_TORCH_FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
_E4M3 = fmt.element("fp8_e4m3")


_compiled_kernels = os.environ.get("QGRAPH_COMPILED_KERNELS", "") == "1"
_COMPILED: dict = {}


def use_compiled_kernels(enabled: bool = True) -> bool:
    """Run the fake-quant kernels through ``torch.compile`` (fused loops) from now on, or stop.

    For QAT/QAD training speed; the results are bit-identical to the eager kernels. Returns the
    previous setting. Example::

        qgraph.qops.use_compiled_kernels()
        for batch in loader: ...  # each quantizer's forward and backward is one fused loop
    """
    global _compiled_kernels
    previous, _compiled_kernels = _compiled_kernels, bool(enabled)
    return previous


#: Below this many values a compiled kernel's call overhead (guards, ~60 µs) outweighs the fusion.
COMPILED_MIN_NUMEL = 1 << 16


def kernel(fn, numel: int):  # noqa: ANN001, ANN201 - returns fn or its compiled twin
    """``fn`` itself, or its ``torch.compile``'d version while compiled kernels are on and the
    tensor has at least :data:`COMPILED_MIN_NUMEL` values.

    Callers hand a kernel one layout per format (:class:`ChannelView`, blocks as (rows, blocks,
    size)), so each compiles a handful of times, not once per tensor shape and stride.
    """
    if not _compiled_kernels or numel < COMPILED_MIN_NUMEL or torch.compiler.is_compiling():
        return fn  # inside a graph torch.compile traces, the raw body: inductor fuses it there
    compiled = _COMPILED.get(fn)
    if compiled is None:
        # not fullgraph: past dynamo's recompile limit a new layout runs eagerly instead of failing
        inner = torch.compile(fn, dynamic=True)

        @functools.wraps(fn)
        def compiled(*args):  # noqa: ANN002, ANN202
            if torch.is_grad_enabled():  # a backward with create_graph=True: keep the eager graph
                return fn(*args)
            # detached: no requires_grad or view-of-a-base guards (each would be a recompile)
            args = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
            with torch.no_grad():
                return inner(*args)

        _COMPILED[fn] = compiled
    return compiled


def traceable_twin(name: str, impl, setup_context, backward):  # noqa: ANN001, ANN201
    """An ``autograd.Function`` computing what a custom op computes, with its autograd formula.

    Custom ops are opaque to ``torch.compile``: in a compiled training graph each quantizer would
    stay a call of its own, with its passes over memory. While torch.compile traces a graph,
    :class:`qgraph.quant.FakeQuant` calls these twins instead, whose bodies are the same torch
    ops, so inductor fuses each quantizer into the ops around it, forward and backward.
    ``torch.export`` keeps the custom ops (one node per quantizer, what the backends lower).
    """
    twin = type(name, (torch.autograd.Function,), {
        "forward": staticmethod(impl),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
    })
    return twin.apply


def memory_order(x: Tensor) -> tuple[int, ...] | None:
    """The permutation that makes ``x`` contiguous when it is a transposed view of a contiguous
    tensor (attention's ``q.transpose(1, 2)``); None when it is contiguous already or not dense.

    A per-tensor quantizer is elementwise, so it can run on the permuted (contiguous) view and
    give its result back in ``x``'s layout, as eager torch does, instead of copying ``x``.
    """
    if x.is_contiguous():
        return None
    order = tuple(sorted(range(x.dim()), key=lambda d: (-x.stride(d), -x.shape[d])))
    return order if x.permute(order).is_contiguous() else None


def permute(x: Tensor, order: tuple[int, ...] | None) -> Tensor:
    """``x`` in the order of :func:`memory_order` (itself for None)."""
    return x if order is None else x.permute(order)


def unpermute(x: Tensor, order: tuple[int, ...] | None) -> Tensor:
    """Undo :func:`permute`."""
    return x if order is None else x.permute(tuple(sorted(range(len(order)), key=order.__getitem__)))


class ChannelView:
    """``x`` as (before, channels, after) in its memory order — the one layout a compiled kernel
    sees for a per-channel quantizer on ``axis`` — or as (1, 1, n) for a per-tensor one.

    A transposed view is not copied (:func:`memory_order`), and :meth:`back` returns results in
    ``x``'s layout, as eager torch does. Parameters (scale, zero point) become (1, channels, 1) or
    (1, 1, 1); :meth:`of` puts another tensor of x's shape (a gradient) in the same view.
    """

    def __init__(self, x: Tensor, axis: int, per_channel: bool) -> None:
        self.order = memory_order(x)
        xm = permute(x, self.order)
        self.shape = xm.shape
        if per_channel:
            a = axis % x.dim() if self.order is None else self.order.index(axis % x.dim())
            self.view = (math.prod(xm.shape[:a]), xm.shape[a], math.prod(xm.shape[a + 1 :]))
        else:
            self.view = (1, 1, x.numel())
        self.x = xm.reshape(self.view)

    def of(self, t: Tensor) -> Tensor:
        return permute(t, self.order).reshape(self.view)

    @staticmethod
    def param(p: Tensor) -> Tensor:
        return p.reshape(1, -1, 1) if p.dim() else p.reshape(1, 1, 1)

    def back(self, y: Tensor) -> Tensor:
        return unpermute(y.reshape(self.shape), self.order)


def rows_order(x: Tensor) -> tuple[int, ...] | None:
    """:func:`memory_order` if it keeps the last axis last (blocks along it stay contiguous)."""
    order = memory_order(x)
    return order if order is not None and order[-1] == x.dim() - 1 else None


class BlockView:
    """``x`` as (rows, blocks, block_size) in its memory order, for a quantizer with whole blocks
    on the last axis (:meth:`fits`) — the one layout a compiled blocked kernel sees — and its
    block scale ``s`` (x's rank, blocks on the last axis) as (rows, blocks, 1): broadcast per
    block, not expanded to x's size. :meth:`of` and :meth:`back` as in :class:`ChannelView`.
    """

    @staticmethod
    def fits(x: Tensor, axis: int, block_size: int) -> bool:
        return bool(block_size) and axis % x.dim() == x.dim() - 1 and x.shape[-1] % block_size == 0

    def __init__(self, x: Tensor, s: Tensor, block_size: int) -> None:
        self.order = rows_order(x)  # a view transposed in its leading axes: no copy
        xm = permute(x, self.order)
        self.shape = xm.shape
        self.x = xm.reshape(-1, x.shape[-1] // block_size, block_size)
        self.s = permute(s.expand(*x.shape[:-1], s.shape[-1]), self.order).reshape(self.x.shape[0], -1, 1)

    def of(self, t: Tensor) -> Tensor:
        return permute(t, self.order).reshape(self.x.shape)

    def back(self, y: Tensor) -> Tensor:
        return unpermute(y.reshape(self.shape), self.order)


def in_layout_of(out: Tensor, x: Tensor) -> Tensor:
    """``out`` (x's shape) with the strides ``torch.empty_like(x)`` has, which is what the ops'
    fake kernels promise to ``torch.compile``/``torch.export``: x's own strides for a dense
    (possibly transposed) x, contiguous otherwise. Copies only when the layouts differ."""
    order = memory_order(x)
    if order is None:
        return out.contiguous()
    if out.stride() == x.stride():
        return out
    return unpermute(permute(out, order).contiguous(), order)


def _round_e2m1_(y: Tensor) -> Tensor:
    """Round to FP4 E2M1 (0, 0.5, 1, 1.5, 2, 3, 4, 6), half to even, saturating at ±6.

    In each binade the grid is evenly spaced (step 0.5 below 2, 1 in [2, 4), 2 in [4, 6]) and
    the even code is the even multiple of the step, so ``round(a / step) * step`` is exact RNE;
    ``1 / step`` is 2 ** ((a < 2) + (a < 4) - 1). Returns a new tensor; ``y`` is left as it is.
    """
    a = y.abs().clamp_(max=6.0)
    if torch.compiler.is_compiling():  # fused: selects beat exp2 (2x); eagerly the reverse (1.4x)
        inv_step = torch.where(a < 2.0, 2.0, torch.where(a < 4.0, 1.0, 0.5))
    else:
        inv_step = (a < 2.0).to(a.dtype).add_((a < 4.0).to(a.dtype)).exp2_().mul_(0.5)
    return a.mul_(inv_step).round_().div_(inv_step).copysign_(y)


#: FP8 layouts: (mantissa bits, exponent of the smallest normal binade).
_FP8_LAYOUT = {"fp8_e4m3": (3, -6), "fp8_e5m2": (2, -14)}


def _round_fp8_bits(y: Tensor, elem: Element) -> Tensor:
    """Round float32 ``y`` to an FP8 grid (half to even, saturating at ±max) in float32 and int32
    arithmetic: what a cast to torch's float8 type computes, as ops inductor vectorizes (the cast
    compiles to one scalar conversion per value: about 2x slower on a CPU).

    A normal value keeps ``mantissa`` of float32's 23 fraction bits: add half an ulp of the
    target, less one, plus the lowest kept bit (ties to even), then clear the dropped bits; a carry
    moves it into the next binade, as it should. Below the smallest normal the grid is evenly
    spaced, ``2 ** (emin - mantissa)``, and scaling by a power of two is exact. NaN takes the
    second branch and stays NaN; the sign is put back last, so -0 stays -0.
    """
    mantissa, emin = _FP8_LAYOUT[elem.name]
    a = y.abs().clamp_(max=elem.qmax)
    drop = 23 - mantissa
    bits = a.view(torch.int32)
    normal = ((bits + ((1 << (drop - 1)) - 1) + ((bits >> drop) & 1)) & -(1 << drop)).view(torch.float32)
    spacing = 2.0 ** (emin - mantissa)
    subnormal = (a * (1.0 / spacing)).round_().mul_(spacing)
    return torch.where(a >= 2.0**emin, normal, subnormal).copysign_(y)


def _round_(y: Tensor, elem: Element) -> Tensor:
    """:func:`round_to`, overwriting ``y`` where it can (the caller owns ``y``)."""
    if elem.kind == "int":
        return y.round_().clamp_(elem.qmin, elem.qmax)
    if elem.name in _TORCH_FP8:
        if torch.compiler.is_compiling() and y.dtype == torch.float32:  # eagerly the cast is faster
            return _round_fp8_bits(y, elem)
        y.clamp_(elem.qmin, elem.qmax)
        return y.copy_(y.to(_TORCH_FP8[elem.name]))
    return _round_e2m1_(y)


def round_to(y: Tensor, elem: Element | str) -> Tensor:
    """Round scaled values to ``elem``'s grid with saturation (ONNX ``saturate=1``), as floats."""
    elem = fmt.element(elem) if isinstance(elem, str) else elem
    return _round_(y.clone(), elem)


def expand(scale: Tensor, x: Tensor, axis: int, block_size: int) -> Tensor:
    """Broadcast a per-tensor (0-d), per-axis (1-d) or blocked (rank of x) scale against ``x``."""
    if scale.dim() == 0:
        return scale
    axis = axis % x.dim()
    if block_size:
        return scale.repeat_interleave(block_size, dim=axis).narrow(axis, 0, x.shape[axis])
    view = [1] * x.dim()
    view[axis] = -1
    return scale.reshape(view)


def _blocks(x: Tensor, axis: int, block_size: int) -> Tensor:
    """``x`` with ``axis`` moved last, zero-padded to whole blocks, as (..., blocks, block_size)."""
    x = x.movedim(axis, -1)
    pad = -x.shape[-1] % block_size
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, block_size)


def block_amax(x: Tensor, axis: int, block_size: int) -> Tensor:
    """max |x| per block of ``block_size`` along ``axis`` (that axis becomes #blocks)."""
    return _blocks(x.detach().abs(), axis, block_size).amax(dim=-1).movedim(-1, axis)


def absmax_scale(x: Tensor, elem: Element | str, axis: int | None = None, block_size: int = 0) -> Tensor:
    """Symmetric float32 scale ``amax / max_abs`` per tensor, channel or block; amax 0 → 1."""
    elem = fmt.element(elem) if isinstance(elem, str) else elem
    x = x.detach().to(torch.float32).abs()
    if axis is None:
        amax = x.max() if x.numel() else torch.zeros((), dtype=torch.float32)
    elif block_size:
        amax = block_amax(x, axis, block_size)
    else:
        amax = x.movedim(axis, 0).reshape(x.shape[axis], -1).amax(dim=1)
    return scale_from_amax(amax, elem)


def affine_scale(x: Tensor, elem: Element | str, axis: int | None = None) -> tuple[Tensor, Tensor]:
    """Asymmetric (scale, zero_point as a float tensor) of an integer element; see
    :func:`qgraph.formats.affine_scale`."""
    elem = fmt.element(elem) if isinstance(elem, str) else elem
    x = x.detach().to(torch.float32)
    flat = x.reshape(1, -1) if axis is None else x.movedim(axis, 0).reshape(x.shape[axis], -1)
    lo = flat.amin(dim=1).clamp(max=0.0)
    hi = flat.amax(dim=1).clamp(min=0.0)
    steps = float(elem.qmax - elem.qmin)
    scale = positive(hi / steps - lo / steps)  # divided first: hi - lo can overflow float32
    zp = torch.round(elem.qmin - lo / scale).clamp(elem.qmin, elem.qmax)
    return (scale[0], zp[0]) if axis is None else (scale, zp)


def positive(scale: Tensor) -> Tensor:
    """Scales below the smallest normal float32 (zero included) become 1 (see qgraph.formats)."""
    return torch.where(scale >= torch.finfo(torch.float32).tiny, scale, torch.ones_like(scale))


def scale_from_amax(amax: Tensor, elem: Element | str) -> Tensor:
    """``amax / max_abs`` in float32; 1 where that is zero or subnormal (scales must be positive)."""
    elem = fmt.element(elem) if isinstance(elem, str) else elem
    return positive(amax.detach().to(torch.float32) / elem.max_abs)


def nvfp4_global_scale(amax: Tensor) -> Tensor:
    """NVFP4 per-tensor scale ``amax / (6 * 448)`` (1 for an all-zero or all-subnormal tensor)."""
    return positive(amax.detach().to(torch.float32) / 2688.0)


def e4m3_ratio(ratio: Tensor) -> Tensor:
    """NVFP4 block scales (as multiples of the global scale) on the E4M3 grid: clamped to
    [2**-9, 448] (E4M3's smallest subnormal and largest value), rounded half to even."""
    return _round_(ratio.to(torch.float32).clamp(2.0**-9, 448.0), _E4M3)


def _nvfp4_block_scale(block_amax_: Tensor, global_scale: Tensor) -> Tensor:
    return e4m3_ratio(block_amax_ / (global_scale * 6.0))


def nvfp4_scales(
    x: Tensor, global_amax: Tensor | None = None, axis: int = -1, block_size: int = 16
) -> tuple[Tensor, Tensor]:
    """(E4M3 block scales as float32 values, FP32 global scale); see :func:`qgraph.formats.nvfp4_scales`."""
    x = x.detach().to(torch.float32)
    if global_amax is None:  # QAT refreshes a tracked weight's scales every step: one fused kernel
        return kernel(_nvfp4_scales_of, x.numel())(x, axis, block_size)
    blocks = block_amax(x, axis, block_size)
    s_g = nvfp4_global_scale(torch.as_tensor(global_amax, dtype=torch.float32))
    return _nvfp4_block_scale(blocks, s_g), s_g


def _nvfp4_scales_of(x: Tensor, axis: int, block_size: int) -> tuple[Tensor, Tensor]:
    blocks = block_amax(x, axis, block_size)
    s_g = nvfp4_global_scale(blocks.max())  # the tensor's amax is the largest block amax: one |x| pass
    return _nvfp4_block_scale(blocks, s_g), s_g


def _mx_scale(block_amax_: Tensor, elem: Element) -> Tensor:
    _, exp = torch.frexp(block_amax_)  # amax = m * 2**exp, m in [0.5, 1)
    e = torch.where(block_amax_ > 0, exp - 1 - elem.emax, torch.full_like(exp, -127)).clamp(-127, 127)
    return torch.ldexp(torch.ones_like(block_amax_), e)


def mx_scales(x: Tensor, elem: Element | str, axis: int = -1, block_size: int = 32) -> Tensor:
    """OCP MX block scales (powers of two, float32); see :func:`qgraph.formats.mx_scales`."""
    elem = fmt.element(elem) if isinstance(elem, str) else elem
    return _mx_scale(block_amax(x.detach().to(torch.float32), axis, block_size), elem)


def quantize_codes(
    x: Tensor,
    scale: Tensor,
    elem: Element | str,
    axis: int = 0,
    block_size: int = 0,
    global_scale: Tensor | None = None,
) -> Tensor:
    """Codes of a symmetric static quantizer, as float values on ``elem``'s grid."""
    s = scale if global_scale is None else scale * global_scale
    elem = fmt.element(elem) if isinstance(elem, str) else elem
    return _round_(x / expand(s.to(x.dtype), x, axis, block_size), elem)


def dequantize(
    codes: Tensor,
    scale: Tensor,
    axis: int = 0,
    block_size: int = 0,
    global_scale: Tensor | None = None,
) -> Tensor:
    """``codes * scale`` (times ``global_scale`` for NVFP4) in float32, as DequantizeLinear."""
    s = scale if global_scale is None else scale * global_scale
    codes = codes.to(torch.float32)
    return codes * expand(s.to(torch.float32), codes, axis, block_size)


def reduce_to_scale(grad: Tensor, scale: Tensor, axis: int, block_size: int) -> Tensor:
    """Sum an elementwise gradient to the shape of its (per-tensor, per-axis or blocked) scale."""
    if scale.dim() == 0:
        return grad.sum()
    axis = axis % grad.dim()
    if block_size:
        summed = _blocks(grad, axis, block_size).sum(dim=-1).movedim(-1, axis)
        return summed.reshape(scale.shape)
    return grad.movedim(axis, 0).reshape(grad.shape[axis], -1).sum(dim=1).reshape(scale.shape)


# --- custom ops ---------------------------------------------------------------------------------


def _fake_quant_fmt(
    x: Tensor,
    scale: Tensor,
    global_scale: Tensor,
    axis: int,
    block_size: int,
    element: str,
    scale_type: str = "float32",
) -> Tensor:
    """Static symmetric quantize-dequantize of ``x`` to ``element`` (zero-point 0).

    ``scale`` is 0-d (per tensor), 1-d on ``axis`` (per channel) or of x's rank with
    ``ceil(n / block_size)`` on ``axis`` (blocked); the effective scale is ``scale * global_scale``.
    ``scale_type`` says what the scale values are (``float32``; ``fp8_e4m3``: NVFP4 block scales;
    ``e8m0``: MX powers of two): the arithmetic is the same, the backends store them differently.
    Computed in float32 whatever the input type, so the codes are the ONNX codes; the result is
    cast back to ``x``'s type.
    """
    elem = fmt.element(element)
    s = (scale * global_scale).to(torch.float32)
    if BlockView.fits(x, axis, block_size):
        view = BlockView(x, s, block_size)
        out = view.back(kernel(_fmt_forward, x.numel())(view.x, view.s, elem))
    elif block_size:  # blocks on another axis or a partial tail block: weights, small
        out = _fmt_forward(x, expand(s, x, axis, block_size), elem)
    else:
        view = ChannelView(x, axis, s.dim() > 0)
        out = view.back(kernel(_fmt_forward, x.numel())(view.x, view.param(s), elem))
    return in_layout_of(out, x)


fake_quant_fmt = torch.library.custom_op("qgraph::fake_quant_fmt", mutates_args=())(_fake_quant_fmt)


def _fmt_forward(x: Tensor, s: Tensor, elem: Element) -> Tensor:
    # one temporary, rounded in place: allocation, not arithmetic, is what costs on CPU
    return _round_(x.to(torch.float32) / s, elem).mul_(s).to(x.dtype)


@fake_quant_fmt.register_fake
def _(x, scale, global_scale, axis, block_size, element, scale_type="float32"):  # noqa: ANN001
    return torch.empty_like(x)


def _fmt_setup(ctx, inputs, output):  # noqa: ANN001
    x, scale, global_scale, axis, block_size, name = inputs[:6]
    ctx.axis, ctx.block_size, ctx.element = axis, block_size, name
    ctx.save_for_backward(x, scale, global_scale)


def _ste_backward(ctx, grad):  # noqa: ANN001
    """STE for x (0 where a value saturated); LSQ gradient for a scale that requires grad:
    ``(R(v) - v) * global_scale`` inside the range, ``R(v) * global_scale`` outside."""
    x, scale, global_scale = ctx.saved_tensors
    elem = fmt.element(ctx.element)
    lo, hi = (elem.qmin - 0.5, elem.qmax + 0.5) if elem.kind == "int" else (elem.qmin, elem.qmax)
    s = (scale * global_scale).to(torch.float32)
    if not ctx.needs_input_grad[1] and not ctx.block_size:  # plain STE: one fused loop if compiled
        view = ChannelView(x, ctx.axis, s.dim() > 0)
        grad_x = kernel(_fmt_ste, x.numel())(view.of(grad), view.x, view.param(s), lo, hi)
        return (view.back(grad_x),) + (None,) * 6
    if not ctx.needs_input_grad[1] and BlockView.fits(x, ctx.axis, ctx.block_size):  # the forward's layout
        view = BlockView(x, s, ctx.block_size)
        grad_x = kernel(_block_ste, x.numel())(view.of(grad), view.x, view.s, lo, hi)
        return (view.back(grad_x),) + (None,) * 6
    s = expand(s, x, ctx.axis, ctx.block_size)
    v = x.to(torch.float32) / s
    inside = (v >= lo) & (v <= hi)
    grad_x = (grad * inside).to(grad.dtype) if ctx.needs_input_grad[0] else None
    grad_s = None
    if ctx.needs_input_grad[1]:
        per_element = grad.to(torch.float32) * (_round_(v.clone(), elem) - v * inside) * global_scale
        grad_s = reduce_to_scale(per_element, scale, ctx.axis, ctx.block_size)
    return grad_x, grad_s, None, None, None, None, None


fake_quant_fmt.register_autograd(_ste_backward, setup_context=_fmt_setup)


def _fmt_ste(grad: Tensor, x: Tensor, s: Tensor, lo: float, hi: float) -> Tensor:
    """``grad`` where ``lo <= x / s <= hi``, 0 elsewhere."""
    v = x.to(torch.float32) / s
    return (grad * ((v >= lo) & (v <= hi))).to(grad.dtype)


def _block_ste(grad: Tensor, x: Tensor, s: Tensor, lo: float, hi: float) -> Tensor:
    """:func:`_fmt_ste` on (rows, blocks, block_size) blocks: a kernel of its own, so its layout
    does not count towards the recompile limit of the per-channel one."""
    return _fmt_ste(grad, x, s, lo, hi)


def dynamic_scales(x: Tensor, global_scale: Tensor, block_size: int, elem: Element, scale_type: str) -> Tensor:
    """Run-time block scales of ``x`` on its last axis, shape (..., blocks, 1)."""
    amax = _blocks(x.detach().abs().to(torch.float32), -1, block_size).amax(dim=-1, keepdim=True)
    if scale_type == "fp8_e4m3":  # NVFP4: block scale relative to the calibrated global scale
        return _nvfp4_block_scale(amax, global_scale) * global_scale
    return _mx_scale(amax, elem)


def _fake_quant_dynamic(
    x: Tensor, global_scale: Tensor, block_size: int, element: str, scale_type: str
) -> Tensor:
    """Quantize-dequantize with block scales computed from ``x`` itself, blocks on the last axis.

    ``scale_type`` ``fp8_e4m3`` is NVFP4 (the block scale is an E4M3 multiple of the calibrated
    ``global_scale``); ``e8m0`` is MX (``global_scale`` is ignored).
    """
    if x.numel() == 0:
        return torch.empty_like(x)
    order = rows_order(x)  # a view transposed in its leading axes: no copy
    xm = permute(x, order)
    rows = xm.reshape(-1, x.shape[-1])
    out = kernel(_dynamic_forward, x.numel())(rows, global_scale, block_size, fmt.element(element), scale_type)
    return in_layout_of(unpermute(out.reshape(xm.shape), order), x)


fake_quant_dynamic = torch.library.custom_op("qgraph::fake_quant_dynamic", mutates_args=())(_fake_quant_dynamic)


def _dynamic_forward(x: Tensor, global_scale: Tensor, block_size: int, elem: Element, scale_type: str) -> Tensor:
    n = x.shape[-1]
    s = dynamic_scales(x, global_scale, block_size, elem, scale_type)
    xb = _blocks(x.to(torch.float32), -1, block_size)
    out = _round_(xb / s, elem).mul_(s).to(x.dtype)
    return out.reshape(*out.shape[:-2], -1)[..., :n]


@fake_quant_dynamic.register_fake
def _(x, global_scale, block_size, element, scale_type):  # noqa: ANN001
    return torch.empty_like(x)


def _dynamic_setup(ctx, inputs, output):  # noqa: ANN001
    x = inputs[0]
    # the gradient is masked where x is not finite. A mask costs a pass and a byte per value; on
    # a CPU one reduction (no allocation) shows the usual case, every value finite, needs none
    # (an overflowing sum only costs the mask); on an accelerator that check would be a sync.
    # only a plain CPU tensor has data to look at (fake, functional and DTensor subclasses do not)
    plain = type(x) in (torch.Tensor, torch.nn.Parameter) and x.device.type == "cpu"
    if plain and not torch.compiler.is_compiling() and bool(torch.isfinite(x.sum())):
        ctx.save_for_backward(None)
    else:
        ctx.save_for_backward(torch.isfinite(x))  # a mask, not x: x may be changed in place


def _masked(grad: Tensor, mask: Tensor) -> Tensor:
    return grad * mask


def _dynamic_backward(ctx, grad):  # noqa: ANN001
    (finite,) = ctx.saved_tensors
    grad_x = grad if finite is None else kernel(_masked, grad.numel())(grad, finite)
    return (grad_x,) + (None,) * 4


fake_quant_dynamic.register_autograd(_dynamic_backward, setup_context=_dynamic_setup)

fake_quant_fmt_traceable = traceable_twin("FakeQuantFmt", _fake_quant_fmt, _fmt_setup, _ste_backward)
fake_quant_dynamic_traceable = traceable_twin("FakeQuantDynamic", _fake_quant_dynamic, _dynamic_setup, _dynamic_backward)
