"""Number formats: the numpy reference (:mod:`qgraph.formats`) against the torch kernels and
custom ops (:mod:`qgraph.qops`), onnxruntime and ``onnx.reference``, bit for bit.

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

# numpy warns about the overflow / 0*inf / NaN casts that saturation edge cases produce on purpose
pytestmark = pytest.mark.filterwarnings(
    "ignore:(overflow|invalid value|divide by zero) encountered:RuntimeWarning"
)

SETTINGS = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
FAST = settings(max_examples=20, **SETTINGS)
MEDIUM = settings(max_examples=30, **SETTINGS)

SYMMETRIC = ["int8", "int4", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1"]
FP8 = ["fp8_e4m3", "fp8_e5m2"]
MX_ELEMENTS = ["fp8_e4m3", "fp8_e5m2", "fp4_e2m1"]
GRANULARITIES = ["tensor", "channel", "block"]
BLOCKS = [16, 32, 64, 128]
#: nonzero magnitudes below this are flushed to 0 by the generators (see module docstring)
TINY = np.float32(1e-40)
#: NVFP4's effective scale s_b * s_g underflows to 0 for a zero block below this tensor amax
NVFP4_MIN_AMAX = 2e-39

SPECIALS = [
    0.0,
    -0.0,
    1e-40,
    -1e-40,
    3e-39,
    -1.1754944e-38,
    0.25,
    -0.25,
    0.5,
    0.75,
    -1.25,
    1.75,
    2.5,
    -3.5,
    5.0,
    6.0,
    -7.5,
    127.5,
    -128.5,
    448.0,
    464.0,
    57344.0,
    61440.0,
    1e30,
    3e38,
    -3.4e38,
]


# --- generators -------------------------------------------------------------------------------


def _flush_tiny(x: np.ndarray) -> np.ndarray:
    tiny = (np.abs(x) < TINY) & (x != 0)
    return np.where(tiny, np.copysign(np.float32(0), x), x).astype(np.float32)


@st.composite
def _values(draw, shape: tuple[int, ...]) -> np.ndarray:
    """Finite float32 values of ``shape``: a dense random background (log-uniform magnitudes in a
    drawn binade window, or points of a fine binary grid so ties happen), exact zeros, and
    special values sprinkled in by hypothesis."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    lo = draw(st.integers(-136, 126))
    hi = min(lo + draw(st.integers(0, 24)), 126)
    if draw(st.sampled_from(["dense", "grid", "grid"])) == "dense":  # log-uniform magnitudes
        x = 2.0 ** rng.uniform(lo, hi + 1, shape) * rng.choice([-1.0, 1.0], shape)
    else:  # grid: k * 2**lo with an anchor at 256 * 2**lo, so that with a power-of-two scale
        # (see _factor) the quotients land on the element grids' rounding ties
        step = 2.0 ** min(max(lo, -140), 118)
        x = rng.integers(-256, 257, shape) * step
        x.reshape(-1)[rng.integers(x.size)] = rng.choice([-256.0, 256.0]) * step
    x = x.astype(np.float32)
    zero_frac = draw(st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0]))
    x[rng.random(shape) < zero_frac] = 0.0
    elements = st.sampled_from(SPECIALS) | st.floats(
        width=32, allow_nan=False, allow_infinity=False
    )
    if draw(st.booleans()):
        specials = draw(
            hnp.arrays(np.float32, shape, elements=elements, fill=st.just(np.float32(np.nan)))
        )
        x = np.where(np.isnan(specials), x, specials).astype(np.float32)
    return _flush_tiny(x)


@st.composite
def _layout(
    draw,
    granularity: str,
    *,
    max_rank: int = 3,
    block_sizes=BLOCKS,
    last_axis: bool = False,
    whole_blocks: bool = False,
    min_blocks: int = 1,
):
    """(shape, axis, block_size): axis None per tensor; block_size 0 unless blocked. Blocked axes
    have 0-2 whole blocks plus a tail (none when ``whole_blocks``), at least ``min_blocks``
    blocks."""
    rank = draw(st.integers(1, max_rank))
    if granularity == "tensor":
        return tuple(draw(st.lists(st.integers(1, 9), min_size=rank, max_size=rank))), None, 0
    axis = rank - 1 if last_axis else draw(st.integers(0, rank - 1))
    shape = draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank))
    if granularity == "channel":
        shape[axis] = draw(st.integers(1, 8))
        return tuple(shape), axis, 0
    bs = draw(st.sampled_from(block_sizes))
    if whole_blocks:
        shape[axis] = bs * draw(st.integers(1, 3))
    else:
        tail = draw(st.sampled_from([1, bs // 2, bs - 1]) | st.integers(0, bs - 1))
        shape[axis] = max(bs * draw(st.integers(0, 2)) + tail, bs * (min_blocks - 1) + 1)
    return tuple(shape), axis, bs


@st.composite
def _cases(draw, granularity: str, **layout):
    shape, axis, bs = draw(_layout(granularity, **layout))
    return draw(_values(shape)), axis, bs


def _factor():
    """Multiplier of an absmax scale: 1 (no saturation), < 1 (saturation), > 1, or ("pow2", j):
    the power of two at or below the scale times 2**j, so that grid inputs hit rounding ties."""
    pow2 = st.integers(-2, 4).map(lambda j: ("pow2", j))
    return st.one_of(pow2, pow2, st.sampled_from([1.0, 0.5, 0.3, 2.0**-20, 3.0]))


def _times(scale: np.ndarray, factor) -> np.ndarray:
    """scale * factor in float32, keeping the original where the product underflows to 0 or
    overflows."""
    s = np.asarray(scale, np.float32)
    if isinstance(factor, tuple):
        with np.errstate(over="ignore"):
            t = np.ldexp(np.float32(1), np.frexp(s)[1] - 1 + factor[1]).astype(np.float32)
    else:
        t = (s * np.float32(factor)).astype(np.float32)
    return np.where((t > 0) & np.isfinite(t), t, s).astype(np.float32)


# --- comparison helpers -----------------------------------------------------------------------


def _f32(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a).astype(np.float32)


def assert_bits_equal(got, want, what: str = "") -> None:
    """float32 arrays equal bit for bit (signed zeros too); NaN compared by position only."""
    got, want = _f32(got), _f32(want)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    gn, wn = np.isnan(got), np.isnan(want)
    bad = (gn != wn) | (~gn & ~wn & (got.view(np.uint32) != want.view(np.uint32)))
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(
            f"{what}: {bad.sum()} of {bad.size} differ; first at {i}: "
            f"got {got[i]!r} ({got.view(np.uint32)[i]:#010x}), "
            f"want {want[i]!r} ({want.view(np.uint32)[i]:#010x})"
        )


def assert_values_equal(got, want, what: str = "") -> None:
    """Arrays equal as values (-0.0 == 0.0); NaN compared by position."""
    got, want = _f32(got), _f32(want)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    bad = (np.isnan(got) != np.isnan(want)) | (~np.isnan(want) & (got != want))
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(
            f"{what}: {bad.sum()} of {bad.size} differ; first at {i}: "
            f"got {got[i]!r}, want {want[i]!r}"
        )


def assert_codes_equal(got, want, elem: str, what: str = "") -> None:
    if F.element(elem).kind == "int":
        assert_values_equal(got, want, what)
    else:
        assert_bits_equal(got, want, what)


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a, np.float32))


def _ref_block_amax(x: np.ndarray, axis: int, bs: int) -> np.ndarray:
    """max |x| per block by slicing, one block at a time (the tail is a block of its own)."""
    n = x.shape[axis]
    return np.concatenate(
        [
            np.abs(x.take(range(i, min(i + bs, n)), axis=axis)).max(axis=axis, keepdims=True)
            for i in range(0, n, bs)
        ],
        axis=axis,
    )


def _np_scale(x: np.ndarray, elem: str, axis, bs: int) -> np.ndarray:
    return F.absmax_scale(x, elem, axis=axis, block_size=bs or None)


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


def _fq(x, scale, gscale, axis, bs, elem, requires_grad=False):
    xt = _t(x).requires_grad_(requires_grad)
    y = torch.ops.qgraph.fake_quant_fmt(
        xt, _t(scale), torch.tensor(np.float32(gscale)), axis, bs, elem
    )
    return xt, y


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


# --- 3. ONNX QuantizeLinear / DequantizeLinear: onnxruntime and onnx.reference ----------------

_ONNX_INT = ["int8", "uint8", "int4", "uint4"]
_ONNX_ELEMS = _ONNX_INT + FP8


def _opsets(elem: str, granularity: str, op: str = "QuantizeLinear") -> list[int]:
    if granularity == "block" or elem in ("int4", "uint4"):
        return [21]
    if elem in FP8 or op == "DequantizeLinear":  # onnx.reference has DequantizeLinear 19+ only
        return [19, 21]
    return [13, 21]


def _qdq_model(op: str, opset: int, elem: str, shape, in_init, scale, zp, axis, bs):
    """One QuantizeLinear (float32 input "x") or DequantizeLinear (codes initializer "x"); without
    a zero-point, QuantizeLinear gets the ``output_dtype`` attribute (opset 21+)."""
    e = F.element(elem)
    inits = [numpy_helper.from_array(np.asarray(scale, np.float32), "s")]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "zp"))
    inputs = []
    if op == "QuantizeLinear":
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))]
        out_type = e.onnx_type
    else:
        inits.append(numpy_helper.from_array(in_init, "x"))
        out_type = TensorProto.FLOAT
    attrs = {"output_dtype": e.onnx_type} if zp is None and op == "QuantizeLinear" else {}
    if axis is not None:
        attrs["axis"] = axis
    if bs:
        attrs["block_size"] = bs
    node = helper.make_node(op, ["x", "s"] + (["zp"] if zp is not None else []), ["y"], **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        inputs,
        [helper.make_tensor_value_info("y", out_type, list(shape))],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def _ort_session(model):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _unpack_nibbles(raw: np.ndarray, count: int, signed: bool) -> np.ndarray:
    """Independent 4-bit unpacking (low nibble first), as int64."""
    n = np.stack([raw & 0x0F, raw >> 4], axis=-1).reshape(-1)[:count].astype(np.int64)
    return np.where(n > 7, n - 16, n) if signed else n


def _ort_quantize(model, x: np.ndarray, elem: str) -> np.ndarray:
    """onnxruntime's codes: float32 values (integers) or E4M3/E5M2 bytes viewed as the ml_dtypes
    type. The output is bound to a preallocated OrtValue and read as raw bytes (onnxruntime has
    no numpy type for E5M2 or packed INT4)."""
    e = F.element(elem)
    sess = _ort_session(model)
    io = sess.io_binding()
    io.bind_cpu_input("x", x)
    out = ort.OrtValue.ortvalue_from_shape_and_type(list(x.shape), e.onnx_type)
    io.bind_ortvalue_output("y", out)
    sess.run_with_iobinding(io)
    raw = np.frombuffer(ctypes.string_at(out.data_ptr(), out.tensor_size_in_bytes()), np.uint8)
    if elem == "fp4_e2m1":
        return (
            _unpack_nibbles(raw, x.size, False).astype(np.uint8).view(e.np_dtype).reshape(x.shape)
        )
    if e.bits == 4:
        return _unpack_nibbles(raw, x.size, elem == "int4").reshape(x.shape).astype(np.float32)
    return raw.view(e.np_dtype).reshape(x.shape)


@st.composite
def _onnx_case(draw, elem: str, granularity: str, nonfinite: bool):
    """x, scale (absmax scale times a factor, from the finite x), zero-point, axis, block size."""
    e = F.element(elem)
    shape, axis, bs = draw(_layout(granularity, min_blocks=2))
    x = draw(_values(shape))
    scale = _times(_np_scale(x, elem, axis, bs), draw(_factor()))
    if e.kind == "int":
        lo, hi = int(e.qmin), int(e.qmax)
        zp_vals = draw(hnp.arrays(np.int64, np.shape(scale), elements=st.integers(lo, hi)))
        if draw(st.booleans()):
            zp_vals = np.zeros_like(zp_vals) if lo < 0 else np.full_like(zp_vals, (hi + 1) // 2)
    else:
        zp_vals = np.zeros(np.shape(scale))
    zp = np.asarray(zp_vals).astype(e.np_dtype)
    if nonfinite:  # after the scale: scales stay finite
        bad = draw(
            st.lists(
                st.tuples(st.integers(0, x.size - 1), st.sampled_from([np.inf, -np.inf, np.nan])),
                min_size=1,
                max_size=3,
            )
        )
        x = x.copy()
        for i, v in bad:
            x.reshape(-1)[i] = v
    return x, scale, zp, axis, bs


def _cases_onnx(op: str = "QuantizeLinear"):
    return [(el, g, v) for el in _ONNX_ELEMS for g in GRANULARITIES for v in _opsets(el, g, op)]


@pytest.mark.parametrize("elem, granularity, opset", _cases_onnx())
@settings(max_examples=15, **SETTINGS)
@given(data=st.data())
def test_quantize_linear_matches_onnxruntime_and_reference(elem, granularity, opset, data):
    """QuantizeLinear (saturate=1) of onnxruntime and of onnx.reference == formats.quantize, per
    tensor, per axis and blocked (opset 21, tails included), with typed zero-points (integers:
    random, minifloats: 0). FP8 inputs include ±inf (all three saturate to ±max) and NaN (all
    three keep NaN). Integer inputs are finite: onnxruntime saturates ±inf (INT8 and INT4:
    +inf → qmax) while onnx.reference casts them through int32 (INT8/INT4 +inf → qmin), so the
    two disagree and qgraph refuses non-finite calibration data."""
    x, scale, zp, axis, bs = data.draw(_onnx_case(elem, granularity, nonfinite=elem in FP8))
    want = F.quantize(x, scale, elem, zero_point=zp, axis=axis, block_size=bs or None)
    model = _qdq_model("QuantizeLinear", opset, elem, x.shape, None, scale, zp, axis, bs)
    ref = ReferenceEvaluator(model).run(None, {"x": x})[0]
    assert_codes_equal(ref.astype(np.float32), want.astype(np.float32), elem, "onnx.reference")
    got = _ort_quantize(model, x, elem)
    assert_codes_equal(got.astype(np.float32), want.astype(np.float32), elem, "onnxruntime")
    if elem in FP8:  # the FP8 bytes themselves, NaN aside (E5M2 NaN encodings differ)
        nan = np.isnan(x)
        np.testing.assert_array_equal(got.view(np.uint8)[~nan], want.view(np.uint8)[~nan])


@pytest.mark.parametrize("elem", FP8)
@pytest.mark.parametrize("opset", [19, 21])
def test_fp8_quantize_linear_inf_nan(elem, opset):
    """FP8: ±inf saturate to ±max (saturate=1), NaN stays NaN, values past max saturate, in
    formats.quantize, qops.quantize_codes, onnxruntime and onnx.reference alike."""
    mx = F.element(elem).qmax
    x = np.array([np.inf, -np.inf, np.nan, 1e30, -1e30, mx, 1.0, -0.0], np.float32)
    want = np.array([mx, -mx, np.nan, mx, -mx, mx, 1.0, -0.0], np.float32)
    zp = np.zeros((), F.element(elem).np_dtype)
    assert_bits_equal(F.quantize(x, np.float32(1), elem), want, "formats")
    assert_bits_equal(Q.quantize_codes(_t(x), torch.tensor(1.0), elem), want, "qops")
    model = _qdq_model("QuantizeLinear", opset, elem, x.shape, None, np.float32(1), zp, None, 0)
    assert_bits_equal(ReferenceEvaluator(model).run(None, {"x": x})[0], want, "onnx.reference")
    assert_bits_equal(_ort_quantize(model, x, elem), want, "onnxruntime")


@pytest.mark.parametrize("elem", ["int8", "int4"])
def test_integer_round_half_to_even(elem):
    """Integer ties go to the even integer, then saturate: formats, qops, the custom op,
    onnxruntime and onnx.reference alike."""
    x = np.array(
        [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 6.5, -7.5, 126.5, -127.5, 200.0, -200.0], np.float32
    )
    e = F.element(elem)
    want = np.clip(
        np.array([0, 2, 2, 0, -2, -2, 6, -8, 126, -128, 127, -128], np.float32), e.qmin, e.qmax
    )
    assert_values_equal(F.quantize(x, np.float32(1), elem).astype(np.float32), want, "formats")
    assert_values_equal(Q.quantize_codes(_t(x), torch.tensor(1.0), elem), want, "qops")
    _, y = _fq(x, np.float32(1), 1.0, 0, 0, elem)
    assert_values_equal(y, want, "fake_quant_fmt")
    model = _qdq_model(
        "QuantizeLinear", 21, elem, x.shape, None, np.float32(1), np.zeros((), e.np_dtype), None, 0
    )
    assert_values_equal(
        ReferenceEvaluator(model).run(None, {"x": x})[0].astype(np.float32), want, "onnx.reference"
    )
    assert_values_equal(_ort_quantize(model, x, elem), want, "onnxruntime")


@st.composite
def _dq_case(draw, elem: str, granularity: str):
    e = F.element(elem)
    shape, axis, bs = draw(_layout(granularity, min_blocks=2))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if e.kind == "int":
        codes = rng.integers(int(e.qmin), int(e.qmax) + 1, shape).astype(e.np_dtype)
    else:  # every byte, NaN (and E5M2 inf) included
        codes = rng.integers(0, 256, shape).astype(np.uint8).view(e.np_dtype)
    sshape = (
        ()
        if axis is None
        else (shape[axis],)
        if not bs
        else tuple(-(-n // bs) if i == axis else n for i, n in enumerate(shape))
    )
    scale = (2.0 ** rng.uniform(-30, 30, sshape)).astype(np.float32)
    if e.kind == "int":
        zp = rng.integers(int(e.qmin), int(e.qmax) + 1, sshape).astype(e.np_dtype)
    else:
        zp = np.zeros(sshape, e.np_dtype)
    return codes, scale, zp, axis, bs


@pytest.mark.parametrize("elem, granularity, opset", _cases_onnx("DequantizeLinear"))
@settings(max_examples=10, **SETTINGS)
@given(data=st.data())
def test_dequantize_linear_matches_onnxruntime_and_reference(elem, granularity, opset, data):
    """DequantizeLinear of onnxruntime and onnx.reference == formats.dequantize bit for bit, for
    every code (FP8: NaN codes give NaN, E5M2 ±inf codes give ±inf) and typed zero-points."""
    codes, scale, zp, axis, bs = data.draw(_dq_case(elem, granularity))
    want = F.dequantize(codes, scale, zero_point=zp, axis=axis, block_size=bs or None)
    model = _qdq_model("DequantizeLinear", opset, elem, codes.shape, codes, scale, zp, axis, bs)
    assert_bits_equal(ReferenceEvaluator(model).run(None, {})[0], want, "onnx.reference")
    assert_bits_equal(_ort_session(model).run(None, {})[0], want, "onnxruntime")


# --- 4. FP4 E2M1 and 4-bit packing --------------------------------------------------------------


@pytest.mark.parametrize("granularity", GRANULARITIES)
@FAST
@given(data=st.data())
def test_fp4_quantize_matches_onnx_reference_opset23(granularity, data):
    """formats.quantize to FP4 E2M1 == onnx.reference QuantizeLinear (opset 23) nibble for
    nibble, per tensor / axis / block (tails). With ``output_dtype`` (no zero-point) the codes are
    identical; with a FLOAT4E2M1 zero-point onnx.reference computes ``x / scale + 0.0`` before
    the cast (unlike its FP8 path), which turns an exact -0.0 quotient into +0: there only the
    magnitude is compared. onnxruntime (1.32) has no FP4 QuantizeLinear; should a later one
    have it, its codes are held to the same (output_dtype model)."""
    x, scale, zp, axis, bs = data.draw(_onnx_case("fp4_e2m1", granularity, nonfinite=False))
    want = F.quantize(x, scale, "fp4_e2m1", axis=axis, block_size=bs or None).view(np.uint8) & 0x0F
    for z in (None, zp):
        model = _qdq_model("QuantizeLinear", 23, "fp4_e2m1", x.shape, None, scale, z, axis, bs)
        ref = ReferenceEvaluator(model).run(None, {"x": x})[0]
        assert ref.dtype == ml_dtypes.float4_e2m1fn
        got, expected = ref.view(np.uint8) & 0x0F, want
        if z is not None:  # drop the sign bit where x / scale is exactly -0.0
            y = x / F.expand_scale(scale, x.shape, axis, bs or None)
            neg0 = (y == 0) & np.signbit(y)
            got, expected = np.where(neg0, got & 0x7, got), np.where(neg0, want & 0x7, want)
        np.testing.assert_array_equal(got, expected)
        if z is None and _ort_has_fp4():
            np.testing.assert_array_equal(
                _ort_quantize(model, x, "fp4_e2m1").view(np.uint8) & 0x0F, want
            )


@functools.cache
def _ort_has_fp4() -> bool:
    model = _qdq_model("QuantizeLinear", 23, "fp4_e2m1", (2,), None, np.float32(1), None, None, 0)
    try:
        _ort_session(model)
    except OrtNotImplemented:  # onnxruntime 1.32: no QuantizeLinear(23) kernel for FP4
        return False
    return True


_TIES = [
    (0.25, 0.0),
    (0.75, 1.0),
    (1.25, 1.0),
    (1.75, 2.0),
    (2.5, 2.0),
    (3.5, 4.0),
    (5.0, 4.0),
    (0.2500001, 0.5),
    (2.4999998, 2.0),
    (5.0000005, 6.0),
    (6.0, 6.0),
    (7.0, 6.0),
    (1e30, 6.0),
    (0.1, 0.0),
]


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_fp4_round_half_to_even_and_saturation(sign):
    """E2M1 ties go to the even code (0.25→0, 0.75→1, 1.25→1, 1.75→2, 2.5→2, 3.5→4, 5→4),
    just past a tie rounds away, and |x| ≥ 6 saturates to ±6, in formats.quantize,
    qops.round_to and onnx.reference (opset 23)."""
    x = np.float32(sign) * np.array([a for a, _ in _TIES], np.float32)
    want = np.float32(sign) * np.array(
        [b for _, b in _TIES], np.float32
    )  # -0.0 for negative ties to 0
    assert_bits_equal(F.quantize(x, np.float32(1), "fp4_e2m1").astype(np.float32), want, "formats")
    assert_bits_equal(Q.round_to(_t(x), "fp4_e2m1"), want, "qops")
    model = _qdq_model(
        "QuantizeLinear",
        23,
        "fp4_e2m1",
        x.shape,
        None,
        np.float32(1),
        np.zeros((), ml_dtypes.float4_e2m1fn),
        None,
        0,
    )
    assert_bits_equal(
        ReferenceEvaluator(model).run(None, {"x": x})[0].astype(np.float32), want, "onnx.reference"
    )


def test_fp4_grid_is_exactly_representable():
    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)
    for g in (grid, -grid):
        assert_bits_equal(F.quantize(g, np.float32(1), "fp4_e2m1").astype(np.float32), g)
        assert_bits_equal(Q.round_to(_t(g), "fp4_e2m1"), g)


_FOUR_BIT = {
    "fp4_e2m1": TensorProto.FLOAT4E2M1,
    "int4": TensorProto.INT4,
    "uint4": TensorProto.UINT4,
}


@st.composite
def _four_bit_codes(draw, elem: str):
    n = draw(st.integers(1, 65))
    nib = np.asarray(draw(hnp.arrays(np.uint8, (n,), elements=st.integers(0, 15))))
    if elem == "fp4_e2m1":
        return nib.view(ml_dtypes.float4_e2m1fn)
    vals = np.where(nib > 7, nib.astype(np.int16) - 16, nib) if elem == "int4" else nib
    return vals.astype(F.element(elem).np_dtype)


@pytest.mark.parametrize("elem", list(_FOUR_BIT))
@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_pack_4bit_matches_onnx_and_unpack_inverts(elem, data):
    """pack_4bit == raw_data of onnx.numpy_helper.from_array == onnx.helper.make_tensor's packed
    bytes (low nibble first), odd lengths padded with a zero nibble; unpack_4bit inverts it."""
    codes = data.draw(_four_bit_codes(elem))
    packed = F.pack_4bit(codes)
    nib = codes.view(np.uint8) & 0x0F
    assert len(packed) == (codes.size + 1) // 2
    raw = np.frombuffer(packed, np.uint8)
    np.testing.assert_array_equal(raw & 0x0F, nib[0::2])
    np.testing.assert_array_equal(raw[: codes.size // 2] >> 4, nib[1::2])
    if codes.size % 2:
        assert raw[-1] >> 4 == 0
    t = numpy_helper.from_array(codes, "c")
    assert t.data_type == _FOUR_BIT[elem]
    assert t.raw_data == packed
    vals = (
        codes.astype(np.float32).tolist() if elem == "fp4_e2m1" else codes.astype(np.int64).tolist()
    )
    mt = helper.make_tensor("c", _FOUR_BIT[elem], [codes.size], vals)
    assert bytes(mt.int32_data) == packed
    back = F.unpack_4bit(packed, codes.size, elem)
    assert back.dtype == F.element(elem).np_dtype and back.shape == (codes.size,)
    np.testing.assert_array_equal(back.view(np.uint8) & 0x0F, nib)
    if elem == "fp4_e2m1":
        assert_bits_equal(back.astype(np.float32), codes.astype(np.float32))
    else:
        np.testing.assert_array_equal(back.astype(np.int64), codes.astype(np.int64))


def test_pack_4bit_low_nibble_first():
    assert F.pack_4bit(np.array([1, 2, 3], ml_dtypes.int4)) == bytes([0x21, 0x03])
    assert F.pack_4bit(np.array([-1, 7], ml_dtypes.int4)) == bytes([0x7F])
    assert F.pack_4bit(np.array([0.5, -6.0], np.float32).astype(ml_dtypes.float4_e2m1fn)) == bytes(
        [0xF1]
    )


@settings(max_examples=25, **SETTINGS)
@given(codes=_four_bit_codes("fp4_e2m1"))
def test_fp4_initializer_packed_by_pack_4bit_is_read_back_by_onnx_reference(codes):
    """A FLOAT4E2M1 initializer whose raw_data is pack_4bit(codes) dequantizes (scale 1) in
    onnx.reference to exactly the codes' values, odd lengths and -0.0 included."""
    init = helper.make_tensor(
        "q", TensorProto.FLOAT4E2M1, [codes.size], F.pack_4bit(codes), raw=True
    )
    node = helper.make_node("DequantizeLinear", ["q", "s"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [codes.size])],
        initializer=[init, numpy_helper.from_array(np.float32(1), "s")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    onnx.checker.check_model(model)
    out = ReferenceEvaluator(model).run(None, {})[0]
    assert_bits_equal(out, codes.astype(np.float32), "onnx.reference")
    np.testing.assert_array_equal(
        numpy_helper.to_array(init).view(np.uint8) & 0x0F, codes.view(np.uint8) & 0x0F
    )


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
