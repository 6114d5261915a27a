"""Shared hypothesis strategies and comparison helpers of the number-format property tests
(tests/test_formats.py, tests/test_formats_onnx.py); see their module docstrings."""

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


def _fq(x, scale, gscale, axis, bs, elem, requires_grad=False):
    xt = _t(x).requires_grad_(requires_grad)
    y = torch.ops.qgraph.fake_quant_fmt(
        xt, _t(scale), torch.tensor(np.float32(gscale)), axis, bs, elem
    )
    return xt, y
