"""annotate: QSpecs on graph edges from the TensorRT INT8 rule data; never edits the graph."""

from __future__ import annotations

import collections
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qgraph
from qgraph.backends.tensorrt import INT8
from qgraph.examples.zoo import make
from qgraph.graph import op_kind
from qgraph.passes import Annotate, FoldBatchNorm
from qgraph.quant import QSpec

QUANT = "qgraph.quant"
FLOAT = "qgraph.float_reason"
ACT = QSpec("int8", "activation", None)


def _w(axis: int) -> QSpec:
    return QSpec("int8", "weight", axis)


def _plan(gm: torch.fx.GraphModule) -> dict[str, dict[int, QSpec]]:
    return {n.name: n.meta[QUANT] for n in gm.graph.nodes if QUANT in n.meta}


def _reasons(gm: torch.fx.GraphModule) -> dict[str, str]:
    return {n.name: n.meta[FLOAT] for n in gm.graph.nodes if FLOAT in n.meta}


def _quantized_kinds(gm: torch.fx.GraphModule) -> dict[str, int]:
    return dict(collections.Counter(op_kind(n) for n in gm.graph.nodes if QUANT in n.meta))


def _folded(name: str) -> tuple[torch.fx.GraphModule, torch.Tensor, nn.Module]:
    model, x = make(name)
    gm = qgraph.capture(model, (x,))
    FoldBatchNorm()(gm)
    return gm, x, model


# --- 1. census / golden plan ------------------------------------------------------------------


def test_rescnn_census():
    gm, _, _ = _folded("rescnn")
    result = Annotate(INT8)(gm)
    assert result.modified
    assert dict(result.counts) == {"quantized": 11, "float": 5}
    assert _quantized_kinds(gm) == {
        "Conv": 6, "Gemm": 1, "MaxPool": 1, "GlobalAveragePool": 1, "Add": 2
    }
    reasons = _reasons(gm)
    assert len(reasons) == 5
    assert all(op_kind(n) == "Relu" for n in gm.graph.nodes if n.name in reasons)
    assert set(reasons.values()) == {
        "activation: TensorRT fuses it into the preceding op's epilogue (tensorrt int8)"
    }
    for n in gm.graph.nodes:
        if op_kind(n) in ("Conv", "Gemm"):
            assert n.meta[QUANT] == {0: ACT, 1: _w(0)}, n.name


def test_rescnn_residual_adds_quantize_the_identity_branch():
    gm, _, _ = _folded("rescnn")
    Annotate(INT8)(gm)
    adds = [n for n in gm.graph.nodes if op_kind(n) == "Add"]
    assert [n.name for n in adds] == ["add", "add_1"]
    # add = conv2d_2 + max-pool identity: the identity (input 1) gets Q/DQ
    assert op_kind(adds[0].args[0]) == "Conv" and op_kind(adds[0].args[1]) == "MaxPool"
    assert adds[0].meta[QUANT] == {1: ACT}
    # add_1 = conv2d_5 + downsample conv: both weighted, rule says input 1
    assert op_kind(adds[1].args[0]) == op_kind(adds[1].args[1]) == "Conv"
    assert adds[1].meta[QUANT] == {1: ACT}


def test_transformer_plan_golden():
    gm, _, _ = _folded("transformer")
    result = Annotate(INT8)(gm)
    assert dict(result.counts) == {"quantized": 6, "float": 12}
    assert _plan(gm) == {
        "linear": {0: ACT, 1: _w(0)},
        "matmul": {0: ACT, 1: ACT},  # q @ k^T: both activations
        "matmul_1": {0: ACT, 1: ACT},  # att @ v
        "linear_1": {0: ACT, 1: _w(0)},
        "linear_2": {0: ACT, 1: _w(0)},
        "linear_3": {0: ACT, 1: _w(0)},
    }
    reasons = _reasons(gm)
    # the residual Adds feed LayerNorm / the model output: no int8 output to fuse into
    assert reasons["add"] == reasons["add_1"] == "its output feeds float ops (no int8 output for the Add to fuse into)"
    assert reasons["softmax"].startswith("kept in float for accuracy")
    assert reasons["layer_norm"] == "normalisation runs in float in TensorRT (tensorrt int8)"
    assert reasons["split"] == "split.Tensor: not an op qgraph knows"
    # data movement (reshape/transpose) is neither quantized nor reported as float
    for n in gm.graph.nodes:
        if op_kind(n) in ("Reshape", "Transpose"):
            assert QUANT not in n.meta and FLOAT not in n.meta


def test_matmul_with_constant_operand_gets_weight_spec_on_last_axis():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 5))

        def forward(self, x):
            return torch.matmul(x, self.w)

    gm = qgraph.capture(M().eval(), (torch.randn(2, 4, 8),))
    Annotate(INT8)(gm)
    assert _plan(gm) == {"matmul": {0: ACT, 1: _w(1)}}  # (K, N): per-column scales on axis 1


# --- 2. numerics: annotate is pure data, outputs bit-identical --------------------------------


@pytest.mark.parametrize("name", ["rescnn", "transformer"])
def test_outputs_identical_and_graph_text_unchanged(name):
    gm, x, _ = _folded(name)
    x2 = torch.randn(5, *x.shape[1:])
    before = [gm(x), gm(x2)]
    text, code = str(gm.graph), gm.code
    Annotate(INT8)(gm)
    assert str(gm.graph) == text and gm.code == code
    after = [gm(x), gm(x2)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


# --- 3. idempotence ---------------------------------------------------------------------------


def test_second_run_is_a_no_op():
    gm, _, _ = _folded("rescnn")
    first = Annotate(INT8)(gm)
    plan, reasons, text = copy.deepcopy(_plan(gm)), dict(_reasons(gm)), str(gm.graph)
    again = Annotate(INT8)(gm)
    assert again.modified is False
    assert dict(again.counts) == dict(first.counts)  # counts describe the plan, not the change
    assert _plan(gm) == plan and _reasons(gm) == reasons and str(gm.graph) == text


# --- 4. near misses that stay in float, with a reason ----------------------------------------


class _Negatives(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.register_buffer("shift", torch.randn(3, 1, 1))
        self.up = nn.ConvTranspose2d(4, 4, 3, groups=2)
        self.up1 = nn.ConvTranspose2d(4, 4, 3)

    def forward(self, img, w, a, b, img4):
        c = F.conv2d(img, w)  # weight is a graph input
        s = a + b  # neither side is a quantized weighted op
        k = self.conv(img) + self.shift  # adds a constant
        g = self.up(img4)  # grouped ConvTranspose
        u = self.up1(img4)  # groups=1: quantized (the positive twin)
        return c, s, k, g, u


@pytest.fixture(scope="module")
def _negatives_graph():
    torch.manual_seed(0)
    args = (
        torch.randn(2, 3, 5, 5),
        torch.randn(3, 3, 1, 1),
        torch.randn(2, 8),
        torch.randn(2, 8),
        torch.randn(2, 4, 5, 5),
    )
    return qgraph.capture(_Negatives().eval(), args), args


def test_negatives_stay_float_with_reason(_negatives_graph):
    gm, args = copy.deepcopy(_negatives_graph[0]), _negatives_graph[1]
    before = gm(*args)
    Annotate(INT8)(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    expected_float = {
        "conv2d": "weight is not a constant",
        "add": "no quantized Conv/Gemm output to fuse the Add into",
        "add_1": "adds a constant",
        "conv_transpose2d": "groups=2 (per-channel weight scales need groups<=1)",
    }
    for name, reason in expected_float.items():
        assert QUANT not in nodes[name].meta, name
        assert nodes[name].meta[FLOAT] == reason
    # the near misses' positive twins are quantized
    assert nodes["conv2d_1"].meta[QUANT] == {0: ACT, 1: _w(0)}
    assert nodes["conv_transpose2d_1"].meta[QUANT] == {0: ACT, 1: _w(1)}  # ConvTranspose: axis 1
    assert FLOAT not in nodes["conv2d_1"].meta
    after = gm(*args)
    assert all(torch.equal(p, q) for p, q in zip(before, after))


def test_reason_cleared_when_plan_changes(_negatives_graph):
    """A node float under one rule set and quantized under another keeps no stale reason."""
    gm = copy.deepcopy(_negatives_graph[0])
    no_conv_rules = type(INT8)(
        backend="test", precision="int8", activation=INT8.activation,
        weight=INT8.weight, ops={}, weighted_kinds=INT8.weighted_kinds,
    )
    assert Annotate(no_conv_rules)(gm).modified
    conv = next(n for n in gm.graph.nodes if n.name == "conv2d_1")
    assert conv.meta[FLOAT] == "no rule for it (test int8)" and QUANT not in conv.meta
    assert Annotate(INT8)(gm).modified
    assert conv.meta[QUANT] == {0: ACT, 1: _w(0)} and FLOAT not in conv.meta


# --- 5. verifier ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rescnn", "depthwise", "transformer", "mlp"])
def test_verify_after_annotate(name):
    gm, _, _ = _folded(name)
    Annotate(INT8)(gm)
    qgraph.verify(gm)
    assert _plan(gm)  # every zoo model gets some quantized edges


# --- recipes: overrides, unsupported op/format pairs, fallback ----------------------------------


def _zoo(name: str):
    from qgraph import capture
    from qgraph.examples.zoo import make

    model, x = make(name)
    return capture(model, (x,))


def test_nvfp4_on_conv_is_an_error_naming_the_node():
    from qgraph import PreconditionError
    from qgraph.backends.tensorrt import NVFP4

    with pytest.raises(PreconditionError, match=r"conv2d \(Conv\): nvfp4 is not supported here: TensorRT runs NVFP4 on GEMMs"):
        Annotate(NVFP4)(_zoo("rescnn"))


def test_fallback_runs_unsupported_ops_in_the_fallback_recipe():
    from qgraph.backends.tensorrt import FP8, NVFP4
    from qgraph.quant import FALLBACK_META

    gm = _zoo("rescnn")
    assert Annotate(NVFP4, fallback=FP8)(gm).modified
    convs = [n for n in gm.graph.nodes if n.name.startswith("conv2d")]
    gemm = next(n for n in gm.graph.nodes if n.name == "linear")
    assert convs and all(n.meta[QUANT][1].dtype == "fp8_e4m3" and FALLBACK_META in n.meta for n in convs)
    assert gemm.meta[QUANT][1].dtype == "fp4_e2m1" and gemm.meta[QUANT][1].block_size == 16
    assert gemm.meta[QUANT][0].dynamic and FALLBACK_META not in gemm.meta
    assert not Annotate(NVFP4, fallback=FP8)(gm).modified  # idempotent


def test_overrides_first_last_and_patterns():
    from qgraph import PreconditionError
    from qgraph.backends.tensorrt import FP8, INT8

    gm = _zoo("mlp")
    Annotate(FP8, overrides=[("@first", None), ("@last", INT8)])(gm)
    linears = [n for n in gm.graph.nodes if n.name.startswith("linear")]
    assert QUANT not in linears[0].meta and "override '@first'" in linears[0].meta[FLOAT]
    assert linears[1].meta[QUANT][1].dtype == "fp8_e4m3"
    assert linears[2].meta[QUANT][1].dtype == "int8"
    Annotate(FP8, overrides=[("net.2", None)])(gm)  # module path, fnmatch
    assert QUANT not in linears[1].meta and QUANT in linears[0].meta
    Annotate(FP8, overrides=[("@node:linear_1", INT8)])(gm)  # that node's name, exactly
    assert [n.meta[QUANT][1].dtype for n in linears] == ["fp8_e4m3", "int8", "fp8_e4m3"]
    with pytest.raises(PreconditionError, match=r"override pattern\(s\) '@node:linear_\*' match no op"):
        Annotate(FP8, overrides=[("@node:linear_*", None)])(gm)  # no wildcards: an exact name
    with pytest.raises(PreconditionError, match="'@node:net.2' match no op"):
        Annotate(FP8, overrides=[("@node:net.2", None)])(gm)  # never a module path


def test_block_size_that_does_not_divide_is_refused_or_falls_back():
    import dataclasses

    from qgraph import PreconditionError
    from qgraph.backends.tensorrt import W4A16

    gm = _zoo("mlp")  # K = 64 and 128: blocks of 128 do not divide the first layer
    with pytest.raises(PreconditionError, match="reduction dim 64 of the weight is not a multiple of the block size 128"):
        Annotate(W4A16)(gm)
    Annotate(W4A16, fallback="float")(gm)
    linears = [n for n in gm.graph.nodes if n.name.startswith("linear")]
    assert "fallback to float" in linears[0].meta[FLOAT]
    assert linears[1].meta[QUANT] == {1: dataclasses.replace(W4A16.weight, axis=1)}
