"""Number formats as data, with a numpy reference implementation (ml_dtypes types).

An :class:`Element` is the type of one quantized value (INT8, INT4, FP8 E4M3/E5M2, FP4 E2M1).
A *scaling scheme* says how values are divided before they are rounded to the element type:

* one float32 scale per tensor, or per channel (``axis`` is the kept axis);
* one float32 scale per block of ``block_size`` values along ``axis`` (INT4 weights; ONNX
  blocked quantization, opset 21: the last block may be a partial one);
* NVFP4: FP4 E2M1 elements, blocks of 16, an FP8 E4M3 scale per block and an FP32 scale per
  tensor (:func:`nvfp4_scales`);
* MX (OCP Microscaling v1.0): FP8/FP4 elements, blocks of 32, one E8M0 power-of-two scale per
  block (:func:`mx_scales`).

Quantize is ONNX ``QuantizeLinear``: ``y = x / scale`` in float32, round half to even, add the
zero-point (integers), saturate to the element's range. Dequantize is ``(q - zp) * scale``.
The torch kernels in :mod:`qgraph.qops` compute the same codes; the property tests hold the two,
onnxruntime and ``onnx.reference`` to that.

Scale rules (all float32 arithmetic, in this order, so numpy, torch and ONNX agree bit for bit):

* integer, per tensor/channel/block: ``amax / qmax`` (127 for INT8, 7 for INT4: codes stay in
  [-qmax, qmax] up to rounding; -128/-8 are reachable only by saturation);
* integer, asymmetric (:func:`affine_scale`, per tensor or channel): the range [min, max] widened to
  hold 0, ``scale = max / (qmax - qmin) - min / (qmax - qmin)`` (divided first, so huge ranges do
  not overflow), ``zero_point = clip(round(qmin - min / scale))``;
* FP8: ``amax / 448`` (E4M3) or ``amax / 57344`` (E5M2);
* NVFP4: ``s_g = amax / 2688`` (6·448), ``s_b = E4M3(clip(block_amax / (6·s_g), 2^-9, 448))``,
  elements ``E2M1(x / (s_b·s_g))``;
* a scale (or NVFP4 ``s_g``) that would be zero or subnormal — amax 0, or a tensor whose values
  are all below ~1e-36 — is 1 instead: every code is then 0, scales stay positive normal floats
  (TensorRT needs positive scales; runtimes may flush subnormals), and ``x / scale`` never
  divides by zero;
* MX: the OCP rule ``e = floor(log2(block_amax)) - emax(element)`` (emax: E4M3 8, E5M2 15,
  E2M1 2), clipped to [-127, 127], elements saturate; an all-zero block gets e = -127. Why the
  spec's rule: it is what the OCP Microscaling v1.0 spec defines, so codes and scales match any
  conformant encoder; it puts the block's largest value in the element's top binade (full
  precision for the values that matter most). The alternative, ModelOpt's and cuDNN's
  ``ceil(log2(amax / max_element))``, never saturates but picks one exponent higher whenever
  ``block_amax / 2**floor(log2(block_amax))`` exceeds ``max_element / 2**emax`` (E4M3: amax in
  (448·2^k, 512·2^k)), doubling the step of the whole block to spare the top ~12%; the two rules
  agree on every other block.

Non-finite inputs: FP8 keeps NaN and saturates ±inf to ±max (ONNX ``saturate=1``). Integer and
FP4 elements have no NaN code and implementations disagree on it (onnxruntime and
``onnx.reference`` differ for INT4 ±inf), so qgraph refuses NaN/inf calibration data and the
reference defines NaN → NaN only for FP8.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import ml_dtypes
import numpy as np
import onnx

__all__ = [
    "Element",
    "ELEMENTS",
    "element",
    "element_of",
    "expand_scale",
    "quantize",
    "dequantize",
    "absmax_scale",
    "affine_scale",
    "block_amax",
    "nvfp4_scales",
    "mx_scales",
    "pack_4bit",
    "unpack_4bit",
    "NVFP4_BLOCK",
    "MX_BLOCK",
]

#: NVFP4 and MX block sizes (elements per scale).
NVFP4_BLOCK = 16
MX_BLOCK = 32
#: smallest E4M3 subnormal and largest E4M3 value: the range of an NVFP4 block scale.
_E4M3_MIN, _E4M3_MAX = np.float32(2.0**-9), np.float32(448.0)


@dataclasses.dataclass(frozen=True)
class Element:
    """The type of one quantized value.

    Attributes:
        name: ``int8``, ``uint8``, ``int4``, ``uint4``, ``fp8_e4m3``, ``fp8_e5m2``, ``fp4_e2m1``.
        kind: ``int`` (rounded to integers, zero-point allowed) or ``float`` (a minifloat).
        bits: storage bits (4 or 8).
        qmin / qmax: the code range (integers) or ±largest finite value (floats).
        emax: exponent of the largest binade (floats; used by the MX scale rule).
        np_dtype: the numpy / ml_dtypes type of the codes.
        onnx_type: the ONNX ``TensorProto`` element type.
    """

    name: str
    kind: Literal["int", "float"]
    bits: int
    qmin: float
    qmax: float
    emax: int
    np_dtype: type
    onnx_type: int

    @property
    def max_abs(self) -> float:
        """The magnitude a symmetric scale maps amax to (127, 7, 448, 57344, 6)."""
        return float(self.qmax)


_T = onnx.TensorProto
ELEMENTS: dict[str, Element] = {
    e.name: e
    for e in (
        Element("int8", "int", 8, -128, 127, 0, np.int8, _T.INT8),
        Element("uint8", "int", 8, 0, 255, 0, np.uint8, _T.UINT8),
        Element("int4", "int", 4, -8, 7, 0, ml_dtypes.int4, _T.INT4),
        Element("uint4", "int", 4, 0, 15, 0, ml_dtypes.uint4, _T.UINT4),
        Element("fp8_e4m3", "float", 8, -448.0, 448.0, 8, ml_dtypes.float8_e4m3fn, _T.FLOAT8E4M3FN),
        Element("fp8_e5m2", "float", 8, -57344.0, 57344.0, 15, ml_dtypes.float8_e5m2, _T.FLOAT8E5M2),
        Element("fp4_e2m1", "float", 4, -6.0, 6.0, 2, ml_dtypes.float4_e2m1fn, _T.FLOAT4E2M1),
    )
}


def element(name: str) -> Element:
    """The element type called ``name``; ValueError listing the known ones otherwise."""
    try:
        return ELEMENTS[name]
    except KeyError:
        raise ValueError(f"unknown element type {name!r} (known: {', '.join(ELEMENTS)})") from None


def element_of(codes: np.ndarray) -> Element | None:
    """The element type whose numpy type ``codes`` has (None for float32 and other types)."""
    return _BY_DTYPE.get(np.asarray(codes).dtype)


_BY_DTYPE = {np.dtype(e.np_dtype): e for e in ELEMENTS.values()}


def expand_scale(
    scale: np.ndarray, shape: tuple[int, ...], axis: int | None, block_size: int | None
) -> np.ndarray:
    """Broadcast a per-tensor, per-axis or blocked scale (or zero-point) to ``shape``.

    Blocked: ``scale.shape[axis] == ceil(shape[axis] / block_size)``; the last block may be partial.
    """
    scale = np.asarray(scale)
    if scale.ndim == 0:
        return scale
    axis = axis % len(shape)
    if block_size:
        return np.repeat(scale, block_size, axis=axis).take(range(shape[axis]), axis=axis)
    view = [1] * len(shape)
    view[axis] = -1
    return scale.reshape(view)


def quantize(
    x: np.ndarray,
    scale: np.ndarray,
    elem: Element | str,
    zero_point: np.ndarray | None = None,
    axis: int | None = None,
    block_size: int | None = None,
) -> np.ndarray:
    """ONNX ``QuantizeLinear``: codes of ``elem``'s numpy type (``saturate=1`` for floats)."""
    elem = element(elem) if isinstance(elem, str) else elem
    x = np.asarray(x, np.float32)
    y = x / expand_scale(np.asarray(scale, np.float32), x.shape, axis, block_size)
    if elem.kind == "int":
        zp = 0 if zero_point is None else expand_scale(zero_point, x.shape, axis, block_size)
        with np.errstate(invalid="ignore"):
            q = np.clip(np.rint(y) + np.asarray(zp, np.float32), elem.qmin, elem.qmax)
        return q.astype(elem.np_dtype)
    # minifloats: saturate (NaN stays NaN), then ml_dtypes rounds half to even
    return np.clip(y, elem.qmin, elem.qmax).astype(elem.np_dtype)


def dequantize(
    codes: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None = None,
    axis: int | None = None,
    block_size: int | None = None,
) -> np.ndarray:
    """ONNX ``DequantizeLinear`` to float32: ``(codes - zero_point) * scale``."""
    q = np.asarray(codes).astype(np.float32)
    if zero_point is not None:
        q = q - expand_scale(np.asarray(zero_point).astype(np.float32), q.shape, axis, block_size)
    return q * expand_scale(np.asarray(scale, np.float32), q.shape, axis, block_size)


def block_amax(x: np.ndarray, axis: int, block_size: int) -> np.ndarray:
    """max |x| of every block of ``block_size`` along ``axis`` (shape: that axis → #blocks)."""
    x = np.moveaxis(np.abs(np.asarray(x, np.float32)), axis, -1)
    n = x.shape[-1]
    pad = -n % block_size
    if pad:
        x = np.concatenate([x, np.zeros(x.shape[:-1] + (pad,), np.float32)], axis=-1)
    amax = x.reshape(x.shape[:-1] + (-1, block_size)).max(axis=-1)
    return np.moveaxis(amax, -1, axis)


def absmax_scale(
    x: np.ndarray, elem: Element | str, axis: int | None = None, block_size: int | None = None
) -> np.ndarray:
    """Symmetric scale ``amax / max_abs`` per tensor (axis None), per channel or per block."""
    elem = element(elem) if isinstance(elem, str) else elem
    x = np.abs(np.asarray(x, np.float32))
    if axis is None:
        amax = x.max() if x.size else np.float32(0)
    elif block_size:
        amax = block_amax(x, axis, block_size)
    else:
        amax = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1).max(axis=1)
    return _positive(np.asarray(amax, np.float32) / np.float32(elem.max_abs))


def affine_scale(
    x: np.ndarray, elem: Element | str, axis: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric (scale, zero_point) of an integer element, per tensor or per channel on ``axis``.

    The range is [min(x, 0), max(x, 0)] so that 0 is exact; the zero-point has ``elem``'s type.
    """
    elem = element(elem) if isinstance(elem, str) else elem
    x = np.asarray(x, np.float32)
    flat = x.reshape(1, -1) if axis is None else np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
    lo = np.minimum(flat.min(axis=1), np.float32(0))
    hi = np.maximum(flat.max(axis=1), np.float32(0))
    steps = np.float32(elem.qmax - elem.qmin)
    scale = _positive(hi / steps - lo / steps)  # divided first: hi - lo can overflow float32
    zp = np.clip(np.rint(np.float32(elem.qmin) - lo / scale), elem.qmin, elem.qmax).astype(elem.np_dtype)
    return (scale[0], zp[0]) if axis is None else (scale, zp)


def _positive(scale: np.ndarray) -> np.ndarray:
    """Scales below the smallest normal float32 (zero included) become 1."""
    scale = np.asarray(scale, np.float32)
    return np.where(scale >= np.finfo(np.float32).tiny, scale, np.float32(1)).astype(np.float32)


def nvfp4_scales(
    x: np.ndarray, global_amax: float | None = None, axis: int = -1, block_size: int = NVFP4_BLOCK
) -> tuple[np.ndarray, np.float32]:
    """NVFP4 scales of ``x``: (E4M3 block scales, FP32 global scale).

    ``global_amax`` defaults to max |x| (weights); for activations it comes from calibration.
    The effective scale of a block is the float32 product ``s_b * s_g`` (what two chained
    ``DequantizeLinear`` compute).
    """
    amax = np.float32(np.abs(x).max() if global_amax is None else global_amax)
    s_g = np.float32(_positive(amax / np.float32(6 * 448)))
    ratio = block_amax(x, axis, block_size) / (np.float32(6) * s_g)
    s_b = np.clip(ratio, _E4M3_MIN, _E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
    return s_b, s_g


def mx_scales(
    x: np.ndarray, elem: Element | str, axis: int = -1, block_size: int = MX_BLOCK
) -> np.ndarray:
    """OCP MX shared scales of ``x`` as E8M0 (``ml_dtypes.float8_e8m0fnu``) per block."""
    elem = element(elem) if isinstance(elem, str) else elem
    amax = block_amax(x, axis, block_size)
    _, exp = np.frexp(amax)  # amax = m * 2**exp, m in [0.5, 1): floor(log2(amax)) = exp - 1
    e = np.where(amax > 0, exp.astype(np.int32) - 1 - elem.emax, -127)
    e = np.clip(e, -127, 127)
    return np.ldexp(np.float32(1), e).astype(np.float32).astype(ml_dtypes.float8_e8m0fnu)


def pack_4bit(codes: np.ndarray) -> bytes:
    """Pack 4-bit codes two per byte, the first element in the low nibble (ONNX's layout)."""
    nibbles = np.asarray(codes).reshape(-1).view(np.uint8) & 0x0F
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_4bit(data: bytes, count: int, elem: Element | str) -> np.ndarray:
    """Inverse of :func:`pack_4bit`: ``count`` codes of ``elem``'s 4-bit type."""
    elem = element(elem) if isinstance(elem, str) else elem
    packed = np.frombuffer(data, np.uint8)
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(-1)[:count]
    if elem.name == "int4":  # sign-extend two's complement nibbles
        return np.where(nibbles > 7, nibbles.astype(np.int16) - 16, nibbles).astype(elem.np_dtype)
    return nibbles.astype(np.uint8).view(elem.np_dtype) if elem.name != "uint4" else nibbles.astype(elem.np_dtype)
