"""Number formats: the numpy reference (:mod:`qgraph.formats`) against the torch kernels and
custom ops (:mod:`qgraph.qops`), bit for bit (onnxruntime and ``onnx.reference``:
tests/test_formats_onnx.py).

Comparisons are exact. Codes of minifloat elements are compared as bit patterns (signed zeros
included); NaN is compared by position only, because implementations pick different NaN
encodings (E5M2: ml_dtypes writes 0x7E, onnxruntime 0x7F). Integer codes are compared as
values: torch carries codes as floats, where ``round(-0.3)`` is ``-0.0``.

Inputs are float32 arrays of random shapes mixing exact zeros, subnormals (down to 1e-40),
values on the element grids (ties), large values (up to 3e38) and, where a test says so,
±inf/NaN. Magnitudes in (0, 1e-40) are flushed to zero by the generators; the regression tests
at the end of the file cover tensors that small (their scales used to underflow to 0; a scale
that would be zero or subnormal is now 1).
"""

from __future__ import annotations

import ctypes
import functools
import math

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as OrtNotImplemented

from qgraph import formats as F
from qgraph import qops as Q

from _format_cases import *  # noqa: F401,F403 - strategies and comparison helpers
from _format_cases import _cases, _f32, _fq, _factor, _flush_tiny, _layout, _np_scale, _ref_block_amax, _t, _times, _values  # noqa: F401

# numpy warns about the overflow / 0*inf / NaN casts that saturation edge cases produce on purpose
pytestmark = pytest.mark.filterwarnings(
    "ignore:(overflow|invalid value|divide by zero) encountered:RuntimeWarning"
)



# --- 1. torch kernels == numpy reference ------------------------------------------------------


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("elem", SYMMETRIC)
@MEDIUM
@given(data=st.data())
def test_absmax_scale_and_codes_torch_vs_numpy(elem, granularity, data):
    """qops.absmax_scale == formats.absmax_scale (float32 bits), and qops.quantize_codes ==
    formats.quantize cast to float32, per tensor, per channel and per block (with tails)."""
    x, axis, bs = data.draw(_cases(granularity))
    s_np = _np_scale(x, elem, axis, bs)
    s_t = Q.absmax_scale(_t(x), elem, axis=axis, block_size=bs)
    assert_bits_equal(s_t, s_np, "scale")
    assert (s_np > 0).all() and np.isfinite(s_np).all()
    if granularity == "block":
        assert s_np.shape[axis] == -(-x.shape[axis] // bs)
    scale = _times(s_np, data.draw(_factor(), label="factor"))
    want = F.quantize(x, scale, elem, axis=axis, block_size=bs or None)
    assert want.dtype == F.element(elem).np_dtype
    got = Q.quantize_codes(_t(x), _t(scale), elem, axis=axis or 0, block_size=bs)
    assert_codes_equal(got, want.astype(np.float32), elem, "codes")


@MEDIUM
@given(data=st.data())
def test_nvfp4_scales_and_codes_torch_vs_numpy(data):
    """NVFP4: E4M3 block scales and the FP32 global scale agree bit for bit (global amax from the
    tensor, or a calibrated one, possibly smaller than max|x|), the global scale is amax / 2688,
    block scales lie in [2^-9, 448], and the E2M1 codes under block_scale * global_scale agree."""
    x, axis, bs = data.draw(_cases("block", block_sizes=[16, 16, 32, 64]))
    amax = np.float32(np.abs(x).max())
    gmode = data.draw(st.sampled_from([None, 1.0, 0.25, 4.0]), label="global_amax")
    with np.errstate(over="ignore"):
        g_amax = None if gmode is None else np.float32(amax * np.float32(gmode))
    assume(
        NVFP4_MIN_AMAX <= (amax if g_amax is None else g_amax) < np.inf
    )  # see the xfail test below
    s_b, s_g = F.nvfp4_scales(x, global_amax=g_amax, axis=axis, block_size=bs)
    assert s_b.dtype == ml_dtypes.float8_e4m3fn and s_g.dtype == np.float32
    raw = np.float32((amax if g_amax is None else g_amax) / np.float32(2688))
    assert s_g == (raw if raw >= np.finfo(np.float32).tiny else np.float32(1))  # never subnormal
    sb32 = s_b.astype(np.float32)
    assert ((sb32 >= 2.0**-9) & (sb32 <= 448)).all()
    t_sb, t_sg = Q.nvfp4_scales(
        _t(x), None if g_amax is None else torch.tensor(g_amax), axis=axis, block_size=bs
    )
    assert_bits_equal(t_sb, sb32, "block scales")
    assert_bits_equal(t_sg, s_g, "global scale")
    eff = (sb32 * s_g).astype(np.float32)
    assert (eff > 0).all()
    want = F.quantize(x, eff, "fp4_e2m1", axis=axis, block_size=bs)
    got = Q.quantize_codes(_t(x), t_sb, "fp4_e2m1", axis=axis, block_size=bs, global_scale=t_sg)
    assert_bits_equal(got, want.astype(np.float32), "codes")


@pytest.mark.parametrize("elem", MX_ELEMENTS)
@MEDIUM
@given(data=st.data())
def test_mx_scales_and_codes_torch_vs_numpy(elem, data):
    """MX: the E8M0 scale is 2^e, e = clip(floor(log2(block amax)) - emax, -127, 127) (-127 for
    an all-zero block; floor(log2) computed independently in float64), torch == numpy, the
    largest element of every unclipped nonzero block has |x / scale| in [2^emax, 2^(emax+1)),
    and the codes agree."""
    x, axis, bs = data.draw(_cases("block", block_sizes=[32, 32, 16, 64, 128]))
    e_ = F.element(elem)
    s = F.mx_scales(x, elem, axis=axis, block_size=bs)
    assert s.dtype == ml_dtypes.float8_e8m0fnu
    amax = F.block_amax(x, axis, bs)
    np.testing.assert_array_equal(amax, _ref_block_amax(x, axis, bs))
    floor_log2 = np.vectorize(lambda a: math.frexp(float(a))[1] - 1 if a > 0 else -(10**6))(amax)
    e = np.clip(np.where(amax > 0, floor_log2 - e_.emax, -127), -127, 127)
    np.testing.assert_array_equal(s.view(np.uint8).astype(np.int64), e + 127)  # E8M0 bias 127
    s32 = s.astype(np.float32)
    assert_bits_equal(Q.mx_scales(_t(x), elem, axis=axis, block_size=bs), s32, "scales")
    ratio = amax / s32  # exact: s32 is a power of two
    live = (amax > 0) & (e > -127)
    assert ((ratio[live] >= 2.0**e_.emax) & (ratio[live] < 2.0 ** (e_.emax + 1))).all()
    want = F.quantize(x, s32, elem, axis=axis, block_size=bs)
    got = Q.quantize_codes(_t(x), _t(s32), elem, axis=axis, block_size=bs)
    assert_bits_equal(got, want.astype(np.float32), "codes")


def test_block_amax_tail_is_its_own_block():
    x = np.arange(1, 21, dtype=np.float32).reshape(1, 20)
    np.testing.assert_array_equal(F.block_amax(x, 1, 16), [[16, 20]])
    np.testing.assert_array_equal(Q.block_amax(_t(x), 1, 16).numpy(), [[16, 20]])
    np.testing.assert_array_equal(F.block_amax(x.T, 0, 16), [[16], [20]])


# --- 2. custom ops ----------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("elem", SYMMETRIC)
@FAST
@given(data=st.data())
def test_fake_quant_fmt_is_numpy_dequantize_quantize(elem, granularity, data):
    """fake_quant_fmt(x, scale, 1, axis, block_size, elem) == dequantize(quantize(x)) (integers:
    as values, since torch yields -0.0 where numpy yields +0.0; minifloats: bit for bit)."""
    x, axis, bs = data.draw(_cases(granularity))
    scale = _times(_np_scale(x, elem, axis, bs), data.draw(_factor(), label="factor"))
    want = F.dequantize(
        F.quantize(x, scale, elem, axis=axis, block_size=bs or None),
        scale,
        axis=axis,
        block_size=bs or None,
    )
    _, got = _fq(x, scale, 1.0, axis or 0, bs, elem)
    assert_codes_equal(got, want, elem, "fake_quant_fmt")


@FAST
@given(data=st.data())
def test_fake_quant_fmt_nvfp4_static(data):
    """Static NVFP4 through fake_quant_fmt (scale = E4M3 block scales, global_scale = s_g) ==
    numpy with the float32 product s_b * s_g as the scale."""
    x, axis, bs = data.draw(_cases("block", block_sizes=[16]))
    assume(np.abs(x).max() >= NVFP4_MIN_AMAX)
    s_b, s_g = F.nvfp4_scales(x, axis=axis, block_size=bs)
    eff = (s_b.astype(np.float32) * s_g).astype(np.float32)
    want = F.dequantize(
        F.quantize(x, eff, "fp4_e2m1", axis=axis, block_size=bs), eff, axis=axis, block_size=bs
    )
    _, got = _fq(x, s_b.astype(np.float32), s_g, axis, bs, "fp4_e2m1")
    assert_bits_equal(got, want, "fake_quant_fmt nvfp4")


@MEDIUM
@given(data=st.data())
def test_fake_quant_dynamic_nvfp4(data):
    """fake_quant_dynamic(x, s_g, bs, 'fp4_e2m1', 'fp8_e4m3') == numpy NVFP4 built from
    formats.nvfp4_scales along the last axis (global scale from max|x| or a calibrated amax)."""
    x, _, bs = data.draw(
        _cases("block", last_axis=True, whole_blocks=True, block_sizes=[16, 16, 32, 64, 128])
    )
    amax = np.float32(np.abs(x).max())
    with np.errstate(over="ignore"):
        g_amax = np.float32(
            amax * np.float32(data.draw(st.sampled_from([1.0, 0.25, 4.0]), label="g"))
        )
    assume(NVFP4_MIN_AMAX <= g_amax < np.inf)
    s_b, s_g = F.nvfp4_scales(x, global_amax=g_amax, axis=-1, block_size=bs)
    eff = (s_b.astype(np.float32) * s_g).astype(np.float32)
    want = F.dequantize(
        F.quantize(x, eff, "fp4_e2m1", axis=-1, block_size=bs), eff, axis=-1, block_size=bs
    )
    got = torch.ops.qgraph.fake_quant_dynamic(_t(x), torch.tensor(s_g), bs, "fp4_e2m1", "fp8_e4m3")
    assert_bits_equal(got, want, "fake_quant_dynamic nvfp4")


@pytest.mark.parametrize("elem", MX_ELEMENTS)
@MEDIUM
@given(data=st.data())
def test_fake_quant_dynamic_mx(elem, data):
    """fake_quant_dynamic(x, 1, bs, elem, 'e8m0') == numpy MX built from formats.mx_scales along
    the last axis; the global scale is ignored."""
    x, _, bs = data.draw(
        _cases("block", last_axis=True, whole_blocks=True, block_sizes=[32, 32, 16, 64, 128])
    )
    s = F.mx_scales(x, elem, axis=-1, block_size=bs).astype(np.float32)
    want = F.dequantize(F.quantize(x, s, elem, axis=-1, block_size=bs), s, axis=-1, block_size=bs)
    g = torch.tensor(np.float32(data.draw(st.sampled_from([1.0, 0.37, 1e6]), label="global")))
    got = torch.ops.qgraph.fake_quant_dynamic(_t(x), g, bs, elem, "e8m0")
    assert_bits_equal(got, want, "fake_quant_dynamic mx")


def _ste_mask(x, scale, axis, bs, elem) -> np.ndarray:
    """Where the straight-through gradient passes: x / scale inside [qmin - 0.5, qmax + 0.5]
    for integers (the values that round into range), inside [qmin, qmax] for minifloats."""
    e = F.element(elem)
    y = x / F.expand_scale(scale, x.shape, axis, bs or None)
    lo, hi = (e.qmin - 0.5, e.qmax + 0.5) if e.kind == "int" else (e.qmin, e.qmax)
    return ((y >= lo) & (y <= hi)).astype(np.float32)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("elem", SYMMETRIC)
@settings(max_examples=12, **SETTINGS)
@given(data=st.data())
def test_fake_quant_fmt_ste_gradient(elem, granularity, data):
    """d/dx sum(fake_quant_fmt(x)) is exactly 1 where x / scale is in range and exactly 0 where
    it is beyond the element's range (scales shrunk so that some values saturate)."""
    x, axis, bs = data.draw(_cases(granularity))
    scale = _times(
        _np_scale(x, elem, axis, bs),
        data.draw(st.sampled_from([1.0, 0.5, 0.1, 2.0**-20, ("pow2", 0)])),
    )
    xt, y = _fq(x, scale, 1.0, axis or 0, bs, elem, requires_grad=True)
    y.sum().backward()
    want = _ste_mask(x, scale, axis or 0, bs, elem)
    assert_bits_equal(xt.grad, want, "grad")
    # inside |x/scale| <= max the gradient is 1
    yv = np.abs(x / F.expand_scale(scale, x.shape, axis or 0, bs or None))
    assert (xt.grad.numpy()[yv <= F.element(elem).qmax] == 1).all()


@pytest.mark.parametrize(
    "elem, y, grad",
    [
        (
            "int8",
            [0.0, 127.0, 127.4, 127.5, 127.6, -128.4, -128.5, -128.6, 1e30],
            [1, 1, 1, 1, 0, 1, 1, 0, 0],
        ),
        ("int4", [7.4, 7.6, -8.5, -8.6, -3.0], [1, 0, 1, 0, 1]),
        ("fp8_e4m3", [448.0, 449.0, -448.0, -449.0, 1e30, 1e-40], [1, 0, 1, 0, 0, 1]),
        ("fp8_e5m2", [57344.0, 57345.0, -60000.0, 1.0], [1, 0, 0, 1]),
        ("fp4_e2m1", [6.0, 6.01, -6.0, -6.5, 0.25], [1, 0, 1, 0, 1]),
    ],
)
def test_ste_gradient_examples(elem, y, grad):
    """Scale 1: the gradient is cut exactly past the element's max (integers: past qmax + 0.5,
    below qmin - 0.5)."""
    xt, out = _fq(np.array(y, np.float32), np.float32(1), 1.0, 0, 0, elem, requires_grad=True)
    out.sum().backward()
    assert xt.grad.tolist() == [float(g) for g in grad]


def test_fake_quant_dynamic_gradient_is_one_for_finite():
    x = _t([[0.1, -3.0, 1e30, 0.0] * 8]).requires_grad_(True)
    torch.ops.qgraph.fake_quant_dynamic(
        x, torch.tensor(1.0), 32, "fp8_e4m3", "e8m0"
    ).sum().backward()
    assert (x.grad == 1).all()


@pytest.mark.parametrize("special", [float("inf"), float("-inf"), float("nan"), None])
def test_fake_quant_dynamic_gradient_is_zero_where_x_is_not_finite(special):
    """The mask is only built when some value is not finite (or the sum overflows: all 3e38s)."""
    row = [0.5, -2.0, 3e38, 3e38] * 8
    if special is not None:
        row[1] = special
    x = _t([row]).requires_grad_(True)
    torch.ops.qgraph.fake_quant_dynamic(x, torch.tensor(1.0), 16, "fp4_e2m1", "fp8_e4m3").sum().backward()
    expected = torch.ones_like(x)
    if special is not None:
        expected[0, 1] = 0.0
    assert torch.equal(x.grad, expected)


# --- tiny tensors: scales never underflow (regressions found by this file) ---------------------


def test_absmax_scale_positive_and_codes_agree_for_subnormal_amax():
    """x = [1e-44, 0, -1e-44, 0], INT8 per tensor: amax / 127 underflows, so the scale is 1 and
    every code 0 in both implementations (it used to be scale 0, codes NaN in torch, 0 in numpy)."""
    x = np.array([1e-44, 0.0, -1e-44, 0.0], np.float32)
    s_np = F.absmax_scale(x, "int8")
    s_t = Q.absmax_scale(_t(x), "int8")
    assert_bits_equal(s_t, s_np, "scale")  # holds: both are 0.0
    want = F.quantize(x, s_np, "int8")
    got = Q.quantize_codes(_t(x), s_t, "int8")
    assert_values_equal(got, want.astype(np.float32), "codes")
    assert s_np > 0, f"scale {s_np!r} for amax 1e-44"


def test_nvfp4_zero_block_in_subnormal_tensor():
    """x (1, 32): 1e-40 in the first block of 16, zeros in the second: s_g would be subnormal and
    s_b * s_g zero; the global scale becomes 1, effective scales stay positive, codes agree."""
    x = np.zeros((1, 32), np.float32)
    x[0, :16] = 1e-40
    s_b, s_g = F.nvfp4_scales(x)
    eff = (s_b.astype(np.float32) * s_g).astype(np.float32)
    want = F.quantize(x, eff, "fp4_e2m1", axis=-1, block_size=16)
    t_sb, t_sg = Q.nvfp4_scales(_t(x))
    got = Q.quantize_codes(_t(x), t_sb, "fp4_e2m1", axis=-1, block_size=16, global_scale=t_sg)
    assert_bits_equal(got, want.astype(np.float32), "codes")
    assert (eff > 0).all(), f"effective scales {eff}"


@pytest.mark.parametrize("elem", ["int8", "int4", "fp8_e4m3", "fp4_e2m1"])
def test_torch_dequantize_matches_numpy(elem):
    """qops.dequantize is DequantizeLinear: codes times the (blocked, two-level) scale, float32."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 40)).astype(np.float32)
    scale = F.absmax_scale(x, elem, axis=1, block_size=16)
    codes = F.quantize(x, scale, elem, axis=1, block_size=16)
    want = F.dequantize(codes, scale, axis=1, block_size=16)
    got = Q.dequantize(_t(codes.astype(np.float32)), _t(scale), axis=1, block_size=16)
    assert_bits_equal(got, want, "dequantized")
    g = np.float32(0.37)
    want = F.dequantize(codes, (scale * g).astype(np.float32), axis=1, block_size=16)
    got = Q.dequantize(_t(codes.astype(np.float32)), _t(scale), 1, 16, torch.tensor(g))
    assert_bits_equal(got, want, "two-level")


@pytest.mark.parametrize("elem", ["int8", "uint8", "int4", "uint4"])
@MEDIUM
@given(data=st.data())
def test_affine_scale_torch_vs_numpy_and_onnx(elem, data):
    """Asymmetric INT: (scale, zero-point) agree bit for bit; 0 is exactly representable; torch
    codes with that zero-point equal numpy's; the largest value reaches the top code."""
    x, axis, _ = data.draw(_cases(data.draw(st.sampled_from(["tensor", "channel"]), label="gran")))
    scale, zp = F.affine_scale(x, elem, axis)
    t_scale, t_zp = Q.affine_scale(_t(x), elem, axis)
    assert_bits_equal(t_scale, np.asarray(scale, np.float32), "scale")
    assert_values_equal(t_zp, np.asarray(zp).astype(np.float32), "zero-point")
    e = F.element(elem)
    zero = F.quantize(np.zeros_like(x), scale, elem, zp, axis)
    assert (F.dequantize(zero, scale, zp, axis) == 0).all()
    codes = F.quantize(x, scale, elem, zp, axis)
    # torch: the INT8-style fake-quant arithmetic with the zero-point, ONNX's order of operations
    s_b, z_b = (t_scale, t_zp) if axis is None else (
        t_scale.reshape([-1 if i == axis else 1 for i in range(x.ndim)]),
        t_zp.reshape([-1 if i == axis else 1 for i in range(x.ndim)]),
    )
    t_codes = torch.clamp(torch.round(_t(x) / s_b) + z_b, e.qmin, e.qmax)
    assert_values_equal(t_codes, codes.astype(np.float32), "codes")
    # the range is covered: max and min map to the ends of the code range, up to rounding
    finite = x[np.isfinite(x)]
    if finite.size and finite.max() > 1e-30:  # (tinier ranges get scale 1: all codes at zp)
        assert codes.astype(np.int32).max() >= e.qmax - 1
