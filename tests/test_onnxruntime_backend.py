"""onnxruntime backend: the plan, the exact u8 rewrite, int32 biases, the fusion report, the CLI."""

from __future__ import annotations

import functools
import sys

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

import qgraph
from qgraph import Sequential, capture
from qgraph._errors import QGraphError
from qgraph.backends import _onnx, onnxruntime, tensorrt
from qgraph.examples.zoo import ZOO, make
from qgraph.parity import check_codes, check_parity
from qgraph.passes import Annotate, Calibrate, FoldBatchNorm, InsertObservers, InsertQDQ
from qgraph.quant import FLOAT_META, QUANT_META

ort_lower = sys.modules["qgraph.backends.onnxruntime.lower"]

#: zoo model → int8 kernels ORT runs after optimisation (every weighted op, and the block Adds).
EXPECTED_KERNELS = {
    "rescnn": {"QLinearConv": 6, "QGemm": 1, "QLinearAdd": 2},
    "depthwise": {"QLinearConv": 5, "QGemm": 1},
    "transformer": {"QGemm": 4},  # linears on (rows, K); the two attention MatMuls stay float (rule)
    "mlp": {"QGemm": 3},
}


@functools.cache
def planned(name: str, backend: str = "onnxruntime"):
    """(graph, batch) of a zoo model calibrated under ``backend``'s INT8 rules; cached."""
    model, _ = make(name)
    x = torch.randn((16, *ZOO[name][1]), generator=torch.Generator().manual_seed(3))
    gm = capture(model, (x[:4],))
    rules = onnxruntime.INT8 if backend == "onnxruntime" else tensorrt.INT8
    Sequential([FoldBatchNorm(), Annotate(rules), InsertObservers("max"), Calibrate([x[:8], x[8:]]), InsertQDQ()])(gm)
    return gm, x


@functools.cache
def lowered(name: str, backend: str = "onnxruntime") -> bytes:
    gm, x = planned(name, backend)
    return onnxruntime.lower(gm, (x[:2],))


def _run(data: bytes, x: torch.Tensor, optimize: bool = False) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_weighted_op_becomes_an_int8_kernel(name):
    report = onnxruntime.inspect_model(onnx.load_from_string(lowered(name)))
    assert report.violations == []
    floats = 2 if name == "transformer" else 0
    assert report.weighted and report.quantized_weighted == len(report.weighted) - floats, report.summary()
    assert all("not quantized" in why for why in report.reasons.values())
    for kernel, count in EXPECTED_KERNELS[name].items():
        assert report.kernels.get(kernel) == count, report.summary()


@pytest.mark.parametrize("name", sorted(ZOO))
def test_activations_are_uint8_weights_int8_per_channel(name):
    proto = onnx.load_from_string(lowered(name))
    onnx.checker.check_model(proto, full_check=True)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    zero_points = set()
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        codes = inits.get(node.input[0])
        if codes is None:  # an activation: signed int8 moved to 128, non-negative ones uint8 from 0
            zp = inits[node.input[2]]
            assert zp.dtype == np.uint8 and zp.size == 1
            zero_points.add(int(zp))
        elif codes.dtype == np.int8:  # a weight: per channel, zero-point 0
            assert inits[node.input[1]].size > 1 and not inits[node.input[2]].any()
        else:  # a bias: int32 codes at s_x * s_w
            assert codes.dtype == np.int32
    if name == "transformer":  # the GELU output spans [-0.17, amax]: a small zero point
        assert 128 in zero_points and any(0 < z < 128 for z in zero_points), zero_points
    else:  # ReLU outputs span [0, amax]
        assert zero_points == {0, 128}


@pytest.mark.parametrize("plan", ["onnxruntime", "tensorrt"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_uint8_rewrite_and_moved_quantizers_are_exact(name, plan):
    """Without the bias step, the ORT form computes bit-identical outputs to the TensorRT form
    (of either backend's plan)."""
    gm, x = planned(name, plan)
    trt_form = tensorrt.lower(gm, (x[:2],))
    model = ir.serde.deserialize_model(onnx.load_from_string(trt_form))
    assert ort_lower._activations_to_uint8(model.graph) > 0
    ort_lower._quantize_before_activations(model.graph)
    rewritten = _onnx.serialize(model)
    np.testing.assert_array_equal(_run(rewritten, x), _run(trt_form, x))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_same_outputs_as_tensorrt_lowering_of_the_plan(name):
    """The whole ORT form vs the TensorRT form of one plan: only the int32 bias rounding differs
    (at most half of s_x·s_w per bias); a value within that of a rounding boundary moves one code,
    and the layers after it can move a few (uint8 steps after a ReLU are half as wide)."""
    gm, x = planned(name)
    ours, theirs = _run(lowered(name), x), _run(tensorrt.lower(gm, (x[:2],)), x)
    assert np.abs(ours - theirs).max() <= 0.01 * np.abs(theirs).max()
    codes = check_codes(gm, lowered(name), (x,))
    assert codes.quantizer_mismatches == 0  # ORT's quantizers are torch's, moved or not
    assert codes.fraction_equal >= 0.98 and codes.max_diff <= 4, codes.summary()


def test_optimized_int8_kernels_match_torch_fake_quant():
    gm, x = planned("rescnn")
    report = check_parity(gm, lowered("rescnn"), (x,))  # ORT session with optimisations on
    assert report.max_relative <= 0.02, report.summary()


def test_bias_codes_are_int32_at_the_product_scale():
    proto = onnx.load_from_string(lowered("mlp"))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    gm, _ = planned("mlp")
    floats = {n: t.detach().numpy() for n, t in gm.named_parameters()} | {
        n: t.numpy() for n, t in gm.named_buffers()
    }
    biases = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0], np.zeros(0, np.int8)).dtype == np.int32]
    assert len(biases) == 3
    for node in biases:
        codes, scale = inits[node.input[0]], inits[node.input[1]]
        original = next(v for k, v in floats.items() if k.endswith("bias") and v.shape == codes.shape and np.allclose(v, codes * scale, atol=scale.max()))
        assert np.all(np.abs(codes * scale.astype(np.float64) - original) <= scale / 2 + 1e-12)


def test_bias_that_overflows_int32_stays_float():
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 20})
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 2]))
    graph.inputs.append(x)
    scale = _onnx.add_initializer(graph, "s", np.array(1e-6, np.float32))
    zp = _onnx.add_initializer(graph, "z", np.array(0, np.int8))
    w = _onnx.add_initializer(graph, "w", np.ones((2, 2), np.int8))
    ws = _onnx.add_initializer(graph, "ws", np.full(2, 1e-6, np.float32))
    wz = _onnx.add_initializer(graph, "wz", np.zeros(2, np.int8))
    b = _onnx.add_initializer(graph, "b", np.array([1.0, 1e6], np.float32))
    q = ir.Node("", "QuantizeLinear", [x, scale, zp])
    dq = ir.Node("", "DequantizeLinear", [q.outputs[0], scale, zp])
    wdq = ir.Node("", "DequantizeLinear", [w, ws, wz], attributes=[ir.AttrInt64("axis", 0)])
    gemm = ir.Node("", "Gemm", [dq.outputs[0], wdq.outputs[0], b], attributes=[ir.AttrInt64("transB", 1)])
    for node in (q, dq, wdq, gemm):
        graph.append(node)
    assert ort_lower._int32_biases(graph) == 0  # 1e6 / 1e-12 does not fit int32
    assert gemm.inputs[2] is b


def test_relu_and_relu6_leave_the_graph():
    """A ReLU/ReLU6 before a quantizer runs as the quantizer's clamp (uint8 from 0) or a Clip on
    codes; no float activation is left in the CNNs."""
    for name in ("rescnn", "depthwise", "mlp"):
        proto = onnx.load_from_string(lowered(name))
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
        assert not any(n.op_type == "Relu" for n in proto.graph.node)
        for clip in (n for n in proto.graph.node if n.op_type == "Clip"):
            lo, hi = (inits[i] for i in clip.input[1:3])
            assert lo.dtype == hi.dtype == np.uint8 and lo <= hi


def test_nonnegative_activations_get_uint8_from_zero():
    gm, _ = planned("rescnn")
    specs = [(n, s) for n in gm.graph.nodes for s in (n.meta.get(QUANT_META) or {}).values() if s.role == "activation"]
    unsigned = [n.name for n, s in specs if s.dtype == "uint8"]
    assert unsigned and len(unsigned) < len(specs)  # the input and the block's conv output stay int8
    trt_gm, _ = planned("rescnn", backend="tensorrt")
    assert all(s.dtype == "int8" for n in trt_gm.graph.nodes for s in (n.meta.get(QUANT_META) or {}).values())


def test_plan_quantizes_both_inputs_of_a_block_add_only_when_its_output_is_quantized():
    gm, _ = planned("rescnn")
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert adds and all(sorted(n.meta[QUANT_META]) == [0, 1] for n in adds)
    gm, _ = planned("transformer")  # residual Adds feed LayerNorm: float, no Q/DQ round trip
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert adds and not any(n.meta.get(QUANT_META) for n in adds)
    assert all("feeds float ops" in n.meta[FLOAT_META] for n in adds)
    matmuls = [n for n in gm.graph.nodes if n.op == "call_function" and "matmul" in str(n.target)]
    assert matmuls and all("two activations" in n.meta[FLOAT_META] for n in matmuls)


def test_tensorrt_plan_report_names_the_convs_left_float_and_why():
    report = onnxruntime.inspect_model(onnx.load_from_string(lowered("rescnn", backend="tensorrt")))
    left = [name for name, _, kernel in report.weighted if not kernel]
    assert 0 < len(left) < len(report.weighted)
    assert all("output is not quantized" in report.reasons[name] for name in left)
    assert "float —" in report.summary()


def test_tensorrt_form_report_says_activations_must_be_uint8():
    gm, x = planned("rescnn", backend="tensorrt")
    report = onnxruntime.inspect_model(onnx.load_from_string(tensorrt.lower(gm, (x[:2],))))
    assert any("uint8 activations" in why for why in report.reasons.values()), report.summary()


def test_non_int8_plans_are_refused():
    model, _ = make("mlp")
    x = torch.randn(8, 64)
    gm = capture(model, (x[:4],))
    Sequential([Annotate(tensorrt.FP8), InsertObservers("max"), Calibrate([x]), InsertQDQ()])(gm)
    with pytest.raises(QGraphError, match="INT8 plans only"):
        onnxruntime.lower(gm, (x[:2],))
    with pytest.raises(QGraphError, match="unknown form"):
        onnxruntime.lower(gm, (x[:2],), form="reference")


def test_lowering_is_deterministic():
    gm, x = planned("rescnn")
    assert onnxruntime.lower(gm, (x[:2],)) == lowered("rescnn")


def test_report_on_a_model_ort_cannot_load():
    proto = onnx.load_from_string(lowered("mlp"))
    proto.graph.node[0].op_type = "NoSuchOp"
    report = onnxruntime.inspect_model(proto)
    assert report.violations and "cannot load" in report.violations[0]


def _matmul_model(dynamic_seq: bool) -> bytes:
    """x (batch, seq, 8) → Q/DQ → MatMul(DQ(int8 (8, 4) per column)) → Add(bias) → y."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    seq = "seq" if dynamic_seq else 5
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "sx"),
        numpy_helper.from_array(np.array(128, np.uint8), "zx"),
        numpy_helper.from_array(rng.integers(-127, 128, (8, 4)).astype(np.int8), "w"),
        numpy_helper.from_array(rng.uniform(0.01, 0.02, 4).astype(np.float32), "sw"),
        numpy_helper.from_array(np.zeros(4, np.int8), "zw"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=1),
        helper.make_node("MatMul", ["xd", "wd"], ["m"], name="mm"),
        helper.make_node("Add", ["m", "b"], ["a"]),
        helper.make_node("Relu", ["a"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", seq, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", seq, 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]).SerializeToString()


@pytest.mark.parametrize("dynamic_seq", [False, True])
def test_weight_matmuls_become_gemms_on_rows(dynamic_seq):
    data = _matmul_model(dynamic_seq)
    model = ir.serde.deserialize_model(onnx.load_from_string(data))
    assert ort_lower._gemms_on_rows(model.graph) == 1
    ops = [n.op_type for n in model.graph]
    assert "MatMul" not in ops and "Add" not in ops and ops.count("Gemm") == 1  # bias in the Gemm
    assert ("Shape" in ops) == dynamic_seq  # static dims past the batch: a constant target shape
    rewritten = _onnx.serialize(model)
    for shape in ((2, 5, 8), (3, 5, 8)) if not dynamic_seq else ((2, 5, 8), (1, 7, 8)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
        np.testing.assert_allclose(_run(rewritten, x), _run(data, x), rtol=1e-6, atol=1e-6)
    assert ort_lower._int32_biases(model.graph) == 1  # what QGemm needs
    report = onnxruntime.inspect_model(onnx.load_from_string(_onnx.serialize(model)))
    assert report.weighted == [("mm", "Gemm", "QGemm")]


class _Branches(torch.nn.Module):
    """Two conv branches concatenated, ReLU, a conv (DenseNet-style); ``branch_relu``: each branch
    is activated before the Concat instead (Inception-style, ReLU and ReLU6)."""

    def __init__(self, branch_relu: bool = False) -> None:
        super().__init__()
        self.branch_relu = branch_relu
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(3, 8, 1)
        self.c = torch.nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branch_relu:
            return self.c(torch.cat([torch.relu(self.a(x)), torch.nn.functional.relu6(self.b(x))], dim=1))
        return self.c(torch.relu(torch.cat([self.a(x), self.b(x)], dim=1)))


@pytest.mark.parametrize("branch_relu", [False, True])
def test_concat_of_conv_outputs_moves_codes_and_every_conv_fuses(branch_relu):
    torch.manual_seed(0)
    model = _Branches(branch_relu).eval()
    x = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    gm = capture(model, (x[:4],))
    Sequential([Annotate(onnxruntime.INT8), InsertObservers("max"), Calibrate([x]), InsertQDQ()])(gm)
    data = onnxruntime.lower(gm, (x[:2],))
    proto = onnx.load_from_string(data)
    (cat,) = [n for n in proto.graph.node if n.op_type == "Concat"]
    producers = {o: n for n in proto.graph.node for o in n.output}
    for name in cat.input:  # codes: a quantizer, or a Clip on a quantizer's codes (a moved ReLU)
        node = producers[name]
        node = producers[node.input[0]] if node.op_type == "Clip" else node
        assert node.op_type == "QuantizeLinear"
    report = onnxruntime.inspect_model(proto)
    assert [k for _, _, k in report.weighted] == ["QLinearConv", "QLinearConv", ""], report.summary()
    assert "float model output" in report.reasons[report.weighted[2][0]]
    # exact apart from the int32 biases: compare with the TensorRT form, unoptimised
    trt_form = _run(tensorrt.lower(gm, (x[:2],)), x)
    assert np.abs(_run(data, x) - trt_form).max() <= 0.01 * np.abs(trt_form).max()
    model_ir = ir.serde.deserialize_model(onnx.load_from_string(tensorrt.lower(gm, (x[:2],))))
    ort_lower._activations_to_uint8(model_ir.graph)
    ort_lower._quantize_before_activations(model_ir.graph)
    assert ort_lower._quantize_concat_inputs(model_ir.graph) == 1
    assert ort_lower._quantize_before_activations(model_ir.graph) == (2 if branch_relu else 0)
    assert not any(n.op_type == "Relu" for n in model_ir.graph)
    np.testing.assert_array_equal(_run(_onnx.serialize(model_ir), x), trt_form)
    codes = check_codes(gm, data, (x,))  # the split quantizer is compared as one
    assert codes.quantizer_mismatches == 0 and codes.fraction_equal >= 0.98, codes.summary()


def test_positive_lower_bound_keeps_zero_in_the_range():
    """clamp(x, 2, 6) is bounded below by 2, but a range must hold 0 (its code is the zero point):
    the quantizer spans [0, amax], not [0, amax - 2]."""

    class Clamped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.clamp(self.a(x) * 4, 2.0, 6.0))

    torch.manual_seed(0)
    model, x = Clamped().eval(), torch.randn(64, 8, generator=torch.Generator().manual_seed(2))
    gm = capture(model, (x[:4],))
    Sequential([Annotate(onnxruntime.INT8), InsertObservers("max"), Calibrate([x]), InsertQDQ()])(gm)
    (fq,) = [m for m in gm.modules() if isinstance(m, qgraph.FakeQuant) and m.spec.low is not None]
    assert fq.spec.low == 0.0 and int(fq.zero_point) == 0 and abs(float(fq.scale) * 255 - 6.0) < 1e-5
    with torch.no_grad():
        assert (gm(x) - model(x)).abs().max() <= 0.05 * model(x).abs().max()


def test_add_stays_float_when_its_reader_is_kept_float_by_override():
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = (torch.nn.Conv2d(4, 4, 1) for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(torch.relu(self.a(x) + self.b(x)))

    x = torch.randn(2, 4, 5, 5)
    for overrides, both in (((), True), ((("c", None),), False)):
        gm = capture(Block().eval(), (x,))
        Annotate(onnxruntime.INT8, overrides=overrides)(gm)
        (add,) = [n for n in gm.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
        assert bool(add.meta.get(QUANT_META)) == both


def _unnamed_relu_chain() -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.int8(0), "z")]
    nodes, prev = [], "x"
    for i in range(2):  # the Relus have no names: the Clips made for them must still be unique
        nodes += [
            helper.make_node("Relu", [prev], [f"r{i}"]),
            helper.make_node("QuantizeLinear", [f"r{i}", "s", "z"], [f"q{i}"], name=f"q{i}"),
            helper.make_node("DequantizeLinear", [f"q{i}", "s", "z"], [f"d{i}"], name=f"d{i}"),
            helper.make_node("Neg", [f"d{i}"], [f"n{i}"], name=f"n{i}"),
        ]
        prev = f"n{i}"
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [2, 4])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_rewrites_of_an_external_model_give_unique_node_names_and_the_same_outputs():
    proto = _unnamed_relu_chain()
    model = ir.serde.deserialize_model(proto)
    counts = onnxruntime.to_onnxruntime(model)
    assert counts["uint8 activations"] == 2 and counts["quantizers moved before ReLU/Clip"] == 2
    data = _onnx.serialize(model)
    names = [n.name for n in onnx.load_from_string(data).graph.node]
    assert len(names) == len(set(names))
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0)) * 3
    np.testing.assert_array_equal(_run(data, x), _run(proto.SerializeToString(), x))


def test_report_names_unnamed_nodes_without_collisions():
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["a"], name="MatMul_2"),
            helper.make_node("Relu", ["a"], ["b"], name="r"),
            helper.make_node("MatMul", ["b", "W"], ["y"]),  # unnamed: would become MatMul_2
        ],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w],
    )
    report = onnxruntime.inspect_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
    assert report.violations == [] and len({name for name, _, _ in report.weighted}) == 2


def test_quantizer_that_makes_a_model_output_is_not_moved():
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.int8(0), "z")]
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="r"), helper.make_node("QuantizeLinear", ["r", "s", "z"], ["q"], name="q")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("q", TensorProto.INT8, [2, 4])], inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model = ir.serde.deserialize_model(proto)
    counts = onnxruntime.to_onnxruntime(model)
    assert counts["quantizers moved before ReLU/Clip"] == 0 and counts["uint8 activations"] == 0
    x = torch.tensor([[-1.0, -0.5, 0.3, 1.0]] * 2)
    np.testing.assert_array_equal(_run(_onnx.serialize(model), x), _run(proto.SerializeToString(), x))


def test_add_read_by_an_add_of_a_constant_stays_float():
    class AddConst(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(4, 4, 1), torch.nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu((self.a(x) + self.b(x)) + 1.0)

    gm = capture(AddConst().eval(), (torch.randn(2, 4, 5, 5),))
    Annotate(onnxruntime.INT8)(gm)
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert adds and not any(n.meta.get(QUANT_META) for n in adds)  # no QLinearAdd for either


def test_reshape_pairs_collapse_only_when_exact():
    from onnx import TensorProto, helper, numpy_helper

    def model(second: list[int]) -> onnx.ModelProto:
        inits = [numpy_helper.from_array(np.array([-1, 6], np.int64), "a"), numpy_helper.from_array(np.array(second, np.int64), "b")]
        graph = helper.make_graph(
            [helper.make_node("Reshape", ["x", "a"], ["m"], name="r1"), helper.make_node("Reshape", ["m", "b"], ["y"], name="r2")],
            "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])

    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    for second, collapses in (([4, 2, 3], True), ([0, 2, 3], False)):  # 0 copies the middle's dim
        proto = model(second)
        ir_model = ir.serde.deserialize_model(proto)
        assert ort_lower._collapse_reshapes(ir_model.graph) == int(collapses)
        if collapses:
            got = _run(ir.serde.serialize_model(ir_model).SerializeToString(), x)
            np.testing.assert_array_equal(got, _run(proto.SerializeToString(), x))
