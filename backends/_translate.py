"""ONNX translations of qgraph's fake-quant ops, used by ``torch.onnx.export``.

Two forms:

* **deploy** (what TensorRT parses): ``QuantizeLinear`` → ``DequantizeLinear`` with the format's
  element type (FP8 at opset 19+, blocked INT4 at 21+, FLOAT4E2M1 at 23+); NVFP4 activations as
  TensorRT's ``trt::TRT_FP4DynamicQuantize`` followed by a ``DequantizeLinear`` of the E4M3
  block scales by the FP32 global scale and a blocked ``DequantizeLinear`` of the FP4 codes; MXFP8
  activations as ``trt::TRT_MXFP8DynamicQuantize`` → ``trt::TRT_MXFP8DequantizeLinear``, MXFP8
  weights as FP8 codes with ``TRT_MXFP8DequantizeLinear`` of their E8M0 scales (uint8 bits).
  ``QuantizeLinear`` of constant weights is folded into code initializers afterwards.
* **reference** (what onnxruntime's CPU provider runs): the same computation with standard ops
  ORT implements. Dynamic NVFP4/MX quantizers become ReduceMax/Cast/Round subgraphs; FP4 E2M1
  rounding is done binade by binade with ``Round`` (half to even); weights are decoded to float
  before export (see :func:`qgraph.backends._onnx.decode_weights`).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
from onnxscript import opset20 as op20
from onnxscript import opset21 as op21
from onnxscript import opset23 as op23
from onnxscript.values import Opset

from qgraph.formats import element as _element

__all__ = ["deploy_table", "reference_table", "ensure_trt_schemas", "TRT_DOMAIN"]

TRT_DOMAIN = "trt"
_trt = Opset(TRT_DOMAIN, 1)
_T = onnx.TensorProto
_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def _trt_schemas() -> list[onnx.defs.OpSchema]:
    """Schemas of TensorRT's quantizer ops (domain ``trt``, version 1), as its ONNX parser reads them.

    ``TRT_FP4DynamicQuantize(x, global_scale) -> (fp4 codes, E4M3 block scales)``,
    ``TRT_MXFP8DynamicQuantize(x) -> (fp8 codes, E8M0 scales as uint8)`` and
    ``TRT_MXFP8DequantizeLinear(codes, e8m0_scales) -> float``; attributes axis, block_size and
    scale_type / output_dtype (TensorProto enums).
    """
    S = onnx.defs.OpSchema
    attr = lambda name, doc: S.Attribute(name, S.AttrType.INT, doc, required=False)  # noqa: E731
    param = S.FormalParameter
    return [
        S(
            "TRT_FP4DynamicQuantize", TRT_DOMAIN, 1, "NVFP4 dynamic block quantization (TensorRT).",
            inputs=[param("x", "T"), param("global_scale", "tensor(float)")],
            outputs=[param("y", "tensor(float4e2m1)"), param("block_scales", "tensor(float8e4m3fn)")],
            type_constraints=[("T", _FLOATS, "input")],
            attributes=[attr("axis", "blocked axis"), attr("block_size", "16"), attr("scale_type", "17 (E4M3)")],
        ),
        S(
            "TRT_MXFP8DynamicQuantize", TRT_DOMAIN, 1, "MXFP8 dynamic block quantization (TensorRT).",
            inputs=[param("x", "T")],
            outputs=[param("y", "tensor(float8e4m3fn)"), param("scales", "tensor(uint8)")],
            type_constraints=[("T", _FLOATS, "input")],
            attributes=[attr("axis", "blocked axis"), attr("block_size", "32"), attr("output_dtype", "17")],
        ),
        S(
            "TRT_MXFP8DequantizeLinear", TRT_DOMAIN, 1, "MXFP8 dequantization with E8M0 scales (TensorRT).",
            inputs=[param("x", "tensor(float8e4m3fn)"), param("scales", "tensor(uint8)")],
            outputs=[param("y", "T")],
            type_constraints=[("T", _FLOATS, "output")],
            attributes=[attr("axis", "blocked axis"), attr("block_size", "32"), attr("output_dtype", "1")],
        ),
    ]


def ensure_trt_schemas() -> None:
    """Register the ``trt`` schemas with onnx once, so onnxscript and the checker know them."""
    for schema in _trt_schemas():
        if not onnx.defs.has(schema.name, schema.domain):
            onnx.defs.register_schema(schema)


def _zero(elem_name: str, shape: tuple[int, ...]):  # noqa: ANN202 - an onnxscript value
    """A typed all-zero zero-point (QuantizeLinear infers its output type from it)."""
    elem = _element(elem_name)
    op = op23 if elem_name == "fp4_e2m1" else op21 if elem.bits == 4 else op20
    return op.Constant(value=ir.Tensor(np.zeros(shape, elem.np_dtype)))


def _shape(value) -> tuple[int, ...]:  # noqa: ANN001
    return tuple(int(d) for d in value.shape)


# --- deploy (TensorRT) --------------------------------------------------------------------------


def _fmt_deploy(x, scale, global_scale, axis: int, block_size: int, element: str, scale_type: str = "float32"):  # noqa: ANN001, ANN202, E501
    """Static quantizers, by scale type: float32 scales → standard Q/DQ; NVFP4 (``fp8_e4m3``) →
    E4M3 block scales times the FP32 global scale; MX (``e8m0``) → TensorRT's MXFP8 dequantizer."""
    op = op23 if element == "fp4_e2m1" else op21 if block_size else op20
    scale_shape = _shape(scale)
    kw = {"axis": axis} if scale_shape else {}
    if block_size:
        kw["block_size"] = block_size
    if scale_type == "fp8_e4m3":
        e4m3 = op.QuantizeLinear(scale, op.Constant(value_float=1.0), _zero("fp8_e4m3", ()))
        scale = op.DequantizeLinear(e4m3, global_scale)
    q = op.QuantizeLinear(x, scale, _zero(element, scale_shape), **kw)
    if scale_type == "e8m0":
        if element != "fp8_e4m3":
            raise NotImplementedError(f"TensorRT has no MX dequantizer for {element}")
        return _trt.TRT_MXFP8DequantizeLinear(q, scale, output_dtype=_T.FLOAT, **kw)
    if _element(element).kind == "float":
        return op.DequantizeLinear(q, scale, **kw)
    return op.DequantizeLinear(q, scale, _zero(element, scale_shape), **kw)


def _dynamic_deploy(x, global_scale, block_size: int, element: str, scale_type: str):  # noqa: ANN001, ANN202
    if scale_type == "fp8_e4m3":
        codes, block_scales = _trt.TRT_FP4DynamicQuantize(
            x, global_scale, axis=-1, block_size=block_size, scale_type=_T.FLOAT8E4M3FN, _num_outputs=2
        )
        scale = op23.DequantizeLinear(block_scales, global_scale)
        return op23.DequantizeLinear(codes, scale, axis=-1, block_size=block_size)
    codes, block_scales = _trt.TRT_MXFP8DynamicQuantize(
        x, axis=-1, block_size=block_size, output_dtype=_element(element).onnx_type, _num_outputs=2
    )
    return _trt.TRT_MXFP8DequantizeLinear(
        codes, block_scales, axis=-1, block_size=block_size, output_dtype=_T.FLOAT
    )


# --- reference (onnxruntime CPU) ----------------------------------------------------------------


def _round_ref(y, element: str):  # noqa: ANN001, ANN202
    """Round scaled values to ``element``'s grid with saturation, in standard ops."""
    op = op21
    elem = _element(element)
    if elem.kind == "int":
        return op.Clip(op.Round(y), op.Constant(value_float=elem.qmin), op.Constant(value_float=elem.qmax))
    lo, hi = op.Constant(value_float=elem.qmin), op.Constant(value_float=elem.qmax)
    if element != "fp4_e2m1":
        return op.Cast(op.Cast(op.Clip(y, lo, hi), to=elem.onnx_type), to=_T.FLOAT)
    a = op.Min(op.Abs(y), hi)
    half, two, four = (op.Constant(value_float=v) for v in (0.5, 2.0, 4.0))
    fine = op.Mul(op.Round(op.Mul(a, two)), half)  # step 0.5 below 2
    mid = op.Round(a)  # step 1 in [2, 4)
    coarse = op.Mul(op.Round(op.Mul(a, half)), two)  # step 2 in [4, 6]
    q = op.Where(op.Less(a, two), fine, op.Where(op.Less(a, four), mid, coarse))
    return op.Where(op.Less(y, op.Constant(value_float=0.0)), op.Neg(q), q)


def _fmt_reference(x, scale, global_scale, axis: int, block_size: int, element: str, scale_type: str = "float32"):  # noqa: ANN001, ANN202, E501
    """Static quantizers on activations (weights are decoded before export): FP8/INT Q/DQ."""
    if block_size or scale_type != "float32":  # no recipe quantizes activations this way
        raise NotImplementedError("static blocked activation quantizers have no reference form")
    return _fmt_deploy(x, scale, global_scale, axis, 0, element)


def _floor_log2(amax):  # noqa: ANN001, ANN202
    """floor(log2(amax)) for amax > 0, exact: a Log estimate corrected by comparing powers of two."""
    op = op21
    two = op.Constant(value_float=2.0)
    e = op.Floor(op.Div(op.Log(amax), op.Constant(value_float=math.log(2.0))))
    p = op.Pow(two, e)
    e = op.Sub(e, op.Cast(op.Greater(p, amax), to=_T.FLOAT))
    p = op.Pow(two, e)
    return op.Add(e, op.Cast(op.LessOrEqual(op.Mul(p, two), amax), to=_T.FLOAT))


def _dynamic_reference(x, global_scale, block_size: int, element: str, scale_type: str):  # noqa: ANN001, ANN202
    op = op21
    shape = op.Shape(x)
    blocks = op.Reshape(x, op.Constant(value_ints=[-1, block_size]))
    amax = op.ReduceMax(op.Abs(blocks), op.Constant(value_ints=[1]), keepdims=1)
    if scale_type == "fp8_e4m3":  # NVFP4
        ratio = op.Div(amax, op.Mul(global_scale, op.Constant(value_float=6.0)))
        clipped = op.Clip(ratio, op.Constant(value_float=2.0**-9), op.Constant(value_float=448.0))
        e4m3 = op.Cast(op.Cast(clipped, to=_T.FLOAT8E4M3FN), to=_T.FLOAT)
        scale = op.Mul(e4m3, global_scale)
    else:  # MX: 2 ** clip(floor(log2(amax)) - emax, -127, 127); all-zero blocks get 2 ** -127
        positive = op.Greater(amax, op.Constant(value_float=0.0))
        safe = op.Where(positive, amax, op.Constant(value_float=1.0))
        e = op.Sub(_floor_log2(safe), op.Constant(value_float=float(_element(element).emax)))
        e = op.Where(positive, e, op.Constant(value_float=-127.0))
        e = op.Clip(e, op.Constant(value_float=-127.0), op.Constant(value_float=127.0))
        scale = op.Pow(op.Constant(value_float=2.0), e)
    deq = op.Mul(_round_ref(op.Div(blocks, scale), element), scale)
    return op.Reshape(deq, shape)


def _int_fake_quant(x, scale, zero_point, axis: int, qmin: int, qmax: int):  # noqa: ANN001, ANN202
    op = op20
    if len(scale.shape) == 0:
        q = op.QuantizeLinear(x, scale, zero_point)
        return op.DequantizeLinear(q, scale, zero_point)
    q = op.QuantizeLinear(x, scale, zero_point, axis=axis)
    return op.DequantizeLinear(q, scale, zero_point, axis=axis)


def _table(fmt, dynamic) -> dict:  # noqa: ANN001
    from qgraph import qops, quant

    return {
        quant.fake_quant._opoverload: _int_fake_quant,
        qops.fake_quant_fmt._opoverload: fmt,
        qops.fake_quant_dynamic._opoverload: dynamic,
    }


def deploy_table() -> dict:
    """Translations for ``torch.onnx.export(custom_translation_table=...)``: the deploy form."""
    ensure_trt_schemas()
    return _table(_fmt_deploy, _dynamic_deploy)


def reference_table() -> dict:
    """Translations of the onnxruntime reference form."""
    return _table(_fmt_reference, _dynamic_reference)
