"""Number formats against onnxruntime's and ``onnx.reference``'s QuantizeLinear/DequantizeLinear
(INT8/UINT8/INT4/UINT4 per tensor, per axis and blocked; FP8 with ±inf/NaN), FP4 E2M1 rounding
against ``onnx.reference`` at opset 23 (onnxruntime has no FP4), and 4-bit packing (low nibble
first). Exact comparisons, as in tests/test_formats.py.
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

from _format_cases import *  # noqa: F401,F403
from _format_cases import _cases, _f32, _fq, _factor, _flush_tiny, _layout, _np_scale, _ref_block_amax, _t, _times, _values  # noqa: F401

# numpy warns about the overflow / 0*inf / NaN casts that saturation edge cases produce on purpose
pytestmark = pytest.mark.filterwarnings(
    "ignore:(overflow|invalid value|divide by zero) encountered:RuntimeWarning"
)



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


