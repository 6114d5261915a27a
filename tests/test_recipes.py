"""Every recipe on the test zoo: deploy form (checker, TensorRT rules, stored codes) and the
onnxruntime reference form (runs, reproduces torch fake-quant)."""

from __future__ import annotations

import dataclasses
import functools

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch

from qgraph import QGraphError, Sequential, capture
from qgraph.backends import tensorrt
from qgraph.examples.zoo import ZOO, make
from qgraph.graph import get_attr
from qgraph.parity import check_parity
from qgraph.passes import Annotate, Calibrate, FoldBatchNorm, InsertObservers, InsertQDQ
from qgraph.quant import FakeQuant

from _deploy_form import decoded_weights, trt_ops

RECIPES = ("fp8", "w4a16", "nvfp4", "mxfp8", "mxfp4")
DEPLOYABLE = ("fp8", "w4a16", "nvfp4", "mxfp8")
GEMM_ONLY = ("mlp", "transformer")


def _rules(precision: str):
    rules = tensorrt.RULES[precision]
    if precision == "w4a16":  # the zoo's layers are 32-128 wide: blocks of 32 let every GEMM take INT4
        rules = dataclasses.replace(rules, weight=dataclasses.replace(rules.weight, block_size=32))
    return rules


@functools.cache
def quantized(name: str, precision: str):
    """(fake-quant graph, calibration batches) of a zoo model under a recipe, with fallback."""
    model, x = make(name)
    gm = capture(model, (x,))
    g = torch.Generator().manual_seed(3)
    calib = [torch.randn(16, *x.shape[1:], generator=g) for _ in range(3)]
    rules = _rules(precision)
    fallback = rules.fallback or "float"
    Sequential(
        [FoldBatchNorm(), Annotate(rules, fallback=fallback), InsertObservers("max"), Calibrate(calib), InsertQDQ()]
    )(gm)
    return gm, calib


@functools.cache
def lowered(name: str, precision: str, form: str) -> bytes:
    gm, calib = quantized(name, precision)
    return tensorrt.lower(gm, (calib[0],), form=form)


@pytest.mark.parametrize("precision", DEPLOYABLE)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_deploy_form_checker_and_tensorrt_rules(name, precision):
    proto = onnx.load_from_string(lowered(name, precision, "deploy"))
    onnx.checker.check_model(proto, full_check=True)
    opset = {o.domain: o.version for o in proto.opset_import}
    assert opset[""] == {"fp8": 20, "w4a16": 21, "nvfp4": 23, "mxfp8": 21}[precision]
    report = tensorrt.inspect_model(proto)
    assert report.violations == []
    if precision == "w4a16":  # weight-only INT4 runs on GEMMs with constant weights only
        assert report.quantized_weighted >= 1
        assert all(op in ("Conv", "MatMul") for _, op, q in report.weighted if not q)
    else:  # the rest quantize every weighted op (Conv falls back to FP8)
        assert report.weighted and report.quantized_weighted == len(report.weighted)


@pytest.mark.parametrize("precision", RECIPES)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_reference_form_reproduces_fake_quant(name, precision):
    """ORT runs the reference form and matches torch: to float rounding (1e-6 of the output range)
    on GEMM-only graphs; conv graphs within 1% of the output range (oneDNN and MLAS sum convolutions in different orders, which
    can move a value across an FP8 rounding boundary of a later quantizer)."""
    gm, calib = quantized(name, precision)
    data = lowered(name, precision, "reference")
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    report = check_parity(gm, data, (calib[1],))
    assert report.max_relative <= (1e-6 if name in GEMM_ONLY else 0.01), report.summary()


@pytest.mark.parametrize("precision", ("fp8", "w4a16"))
@pytest.mark.parametrize("name", sorted(ZOO))
def test_ort_runs_the_deploy_form_of_standard_formats(name, precision):
    gm, calib = quantized(name, precision)
    report = check_parity(gm, lowered(name, precision, "deploy"), (calib[1],))
    assert report.max_relative <= (1e-6 if name in GEMM_ONLY else 0.01), report.summary()


@pytest.mark.parametrize("precision", DEPLOYABLE)
@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_deployed_weight_codes_decode_to_the_trained_weights(name, precision):
    """Codes are computed once: decoding the stored initializers gives torch's fake-quant weights."""
    gm, _ = quantized(name, precision)
    want = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), FakeQuant):
            module = gm.get_submodule(node.target)
            if module.spec.role == "weight":
                with torch.no_grad():
                    want.append(module(get_attr(gm, node.args[0].target)).numpy())
    got = decoded_weights(onnx.load_from_string(lowered(name, precision, "deploy")))
    assert len(got) == len(want) > 0
    for w in want:
        assert any(g.shape == w.shape and np.array_equal(g, w) or g.shape == w.T.shape and np.array_equal(g, w.T)
                   for g in got), f"no stored weight decodes to the {w.shape} torch weight"


def test_stored_types_per_recipe():
    types = {}
    for precision in DEPLOYABLE:
        proto = onnx.load_from_string(lowered("mlp", precision, "deploy"))
        types[precision] = {i.data_type for i in proto.graph.initializer}
    T = onnx.TensorProto
    assert T.FLOAT8E4M3FN in types["fp8"]
    assert T.INT4 in types["w4a16"]
    assert {T.FLOAT4E2M1, T.FLOAT8E4M3FN} <= types["nvfp4"]
    assert {T.FLOAT8E4M3FN, T.UINT8} <= types["mxfp8"]
    nv = onnx.load_from_string(lowered("mlp", "nvfp4", "deploy"))
    ops = [n.op_type for n in nv.graph.node]
    assert ops.count("TRT_FP4DynamicQuantize") == 3
    assert all(n.domain == "trt" for n in nv.graph.node if n.op_type.startswith("TRT_"))


def test_deploy_and_reference_are_deterministic():
    gm, calib = quantized("transformer", "nvfp4")
    for form in ("deploy", "reference"):
        assert tensorrt.lower(gm, (calib[0],), form=form) == tensorrt.lower(gm, (calib[0],), form=form)


def test_mxfp4_has_no_tensorrt_deploy_form():
    gm, calib = quantized("mlp", "mxfp4")
    with pytest.raises(QGraphError, match="no MXFP4 path"):
        tensorrt.lower(gm, (calib[0],))


def test_inspect_flags_block_formats_outside_gemms():
    """qgraph inspect on a hand-made model: NVFP4 weights feeding a Conv break TensorRT's rules."""
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    w = np.ones((4, 16, 1, 1), ml_dtypes.float4_e2m1fn)
    nodes = [
        helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], axis=1, block_size=16),
        helper.make_node("Conv", ["x", "wd"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", T.FLOAT, [1, 16, 4, 4])],
        [helper.make_tensor_value_info("y", T.FLOAT, [1, 4, 4, 4])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.ones((4, 1, 1, 1), np.float32), "s")],
    )
    report = tensorrt.inspect_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))
    assert any("block-quantized values feed Conv" in v for v in report.violations), report.summary()


# --- the deploy form itself, run by onnx.reference with TensorRT's ops written from their spec ----


@pytest.mark.parametrize("precision", ["nvfp4", "mxfp8"])
@pytest.mark.parametrize("name", ["mlp", "transformer", "rescnn"])
def test_deploy_form_computes_the_fake_quant_model(name, precision):
    """The TensorRT form itself (FP4/E4M3/E8M0 initializers, trt ops) evaluated by onnx.reference
    with the TensorRT ops implemented from their spec equals torch to float rounding."""
    from onnx.reference import ReferenceEvaluator

    gm, calib = quantized(name, precision)
    sess = ReferenceEvaluator(onnx.load_from_string(lowered(name, precision, "deploy")), new_ops=trt_ops())
    x = calib[1][:4]
    got = sess.run(None, {sess.input_names[0]: x.numpy()})[0]
    with torch.no_grad():
        want = gm(x).numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_override_with_fallback_uses_the_override_recipes_fallback():
    """--override 'conv*=nvfp4' --fallback: the convs fall back to NVFP4's fallback (FP8), not to
    the main recipe's (INT8 has none)."""
    model, x = make("rescnn")
    gm = capture(model, (x,))
    FoldBatchNorm()(gm)
    Annotate(tensorrt.INT8, overrides=[("conv*", tensorrt.NVFP4)], fallback=True)(gm)
    convs = [n for n in gm.graph.nodes if n.name.startswith("conv2d")]
    assert convs and all(n.meta["qgraph.quant"][1].dtype == "fp8_e4m3" for n in convs)
    assert all(n.meta["qgraph.fallback"].startswith("fp8: TensorRT runs NVFP4") for n in convs)


def test_float32_scaled_block_formats_lower_to_standard_qdq():
    """A blocked FP8 weight with float32 scales (no recipe, the Python API) exports as standard
    blocked Q/DQ at opset 21 and its stored codes decode to the torch weights."""
    rules = dataclasses.replace(
        tensorrt.FP8, precision="fp8-block", weight=dataclasses.replace(tensorrt.FP8.weight, block_size=32)
    )
    model, x = make("mlp")
    gm = capture(model, (x,))
    calib = [torch.randn(8, 64, generator=torch.Generator().manual_seed(6))]
    Sequential([Annotate(rules), InsertObservers(), Calibrate(calib), InsertQDQ()])(gm)
    proto = onnx.load_from_string(tensorrt.lower(gm, (calib[0],)))
    assert not any(n.op_type.startswith("TRT_") for n in proto.graph.node)
    report = check_parity(gm, proto.SerializeToString(), (calib[0],))
    assert report.max_relative <= 1e-6, report.summary()
