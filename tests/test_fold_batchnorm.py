"""fold-batchnorm: the five pass tests, the supported producers, and near misses it must refuse."""

from __future__ import annotations

import collections
import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qgraph
from qgraph.examples.zoo import make
from qgraph.passes import FoldBatchNorm

_BN = torch.ops.aten.batch_norm.default


def _census(gm: torch.fx.GraphModule) -> dict[str, int]:
    """call_function targets (aten overload names) → count."""
    return dict(
        collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
    )


def _randomize(bn: nn.modules.batchnorm._BatchNorm, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    n = bn.num_features
    bn.running_mean.copy_(torch.randn(n, generator=g))
    bn.running_var.copy_(torch.rand(n, generator=g) + 0.3)
    if bn.affine:
        bn.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
        bn.bias.data.copy_(torch.randn(n, generator=g))


def _assert_close_to_eager(y: torch.Tensor, ref: torch.Tensor) -> None:
    # structure-preserving rewrite: equal up to float32 rounding, 1e-5 of the output's scale
    y, ref = y.detach(), ref.detach()
    tol = 1e-5 * float(ref.abs().max())
    err = float((y - ref).abs().max())
    assert err <= tol, f"max |error| {err:.3g} > {tol:.3g}"


class _ProducerBN(nn.Module):
    def __init__(self, producer: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.op = producer
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.op(x)))


def _conv_bn(bias: bool = False) -> _ProducerBN:
    torch.manual_seed(0)
    m = _ProducerBN(nn.Conv2d(3, 4, 3, padding=1, bias=bias), nn.BatchNorm2d(4))
    _randomize(m.bn)
    return m.eval()


_CASES = {
    "conv2d-bias": (lambda: nn.Conv2d(3, 4, 3, padding=1), lambda: nn.BatchNorm2d(4), (3, 8, 8)),
    "conv2d-nobias": (
        lambda: nn.Conv2d(3, 4, 3, padding=1, bias=False), lambda: nn.BatchNorm2d(4), (3, 8, 8)
    ),
    "conv2d-depthwise": (
        lambda: nn.Conv2d(4, 4, 3, groups=4, bias=False), lambda: nn.BatchNorm2d(4), (4, 8, 8)
    ),
    "conv2d-bn-not-affine": (
        lambda: nn.Conv2d(3, 4, 3), lambda: nn.BatchNorm2d(4, affine=False), (3, 8, 8)
    ),
    "conv1d": (lambda: nn.Conv1d(3, 5, 3), lambda: nn.BatchNorm1d(5), (3, 16)),
    "convtranspose2d-g1": (
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2), lambda: nn.BatchNorm2d(6), (4, 5, 5)
    ),
    "convtranspose2d-g2": (
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2),
        lambda: nn.BatchNorm2d(6),
        (4, 5, 5),
    ),
    "convtranspose2d-g2-nobias": (
        lambda: nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False),
        lambda: nn.BatchNorm2d(6),
        (4, 5, 5),
    ),
    "linear-bn1d": (lambda: nn.Linear(5, 6), lambda: nn.BatchNorm1d(6), (5,)),
    "linear-nobias-bn1d": (lambda: nn.Linear(5, 6, bias=False), lambda: nn.BatchNorm1d(6), (5,)),
}


@pytest.mark.parametrize("case", sorted(_CASES))
def test_folds_and_matches_eager(case):
    make_op, make_bn, shape = _CASES[case]
    torch.manual_seed(1)
    model = _ProducerBN(make_op(), make_bn())
    _randomize(model.bn, seed=2)
    model.eval()
    x = torch.randn(3, *shape)
    gm = qgraph.capture(model, (x,))
    result = FoldBatchNorm()(gm)
    assert result.modified and dict(result.counts) == {"folded": 1}
    census = _census(gm)
    assert str(_BN) not in census
    assert sum(census.values()) == 2  # the producer and the relu, nothing else
    # the folded producer has a bias now, and the BatchNorm's tensors are gone from the module
    producer = next(
        n for n in gm.graph.nodes
        if n.op == "call_function" and n.target != torch.ops.aten.relu.default
    )
    assert producer.args[2] is not None and producer.args[2].op == "get_attr"
    assert not any(name.startswith("bn.") for name, _ in gm.named_parameters())
    assert not any(name.startswith("bn.") for name, _ in gm.named_buffers())
    qgraph.verify(gm)
    for batch in (3, 7):  # also on a batch size other than the captured one
        xb = torch.randn(batch, *shape)
        _assert_close_to_eager(gm(xb), model(xb))


def test_golden_graph_after_fold():
    gm = qgraph.capture(_conv_bn(bias=False), (torch.randn(2, 3, 8, 8),))
    FoldBatchNorm()(gm)
    lines = [
        f"{n.op} {n.target} ({', '.join(a.name for a in n.all_input_nodes)})"
        for n in gm.graph.nodes
    ]
    assert lines == [
        "get_attr op.weight ()",
        "placeholder x ()",
        "get_attr op.bias ()",  # new bias, next to the weight, inserted before its conv
        "call_function aten.conv2d.default (x, op_weight, op_bias)",
        "call_function aten.relu.default (conv2d)",
        "output output (relu)",
    ]
    assert not gm.op.bias.requires_grad


@pytest.mark.parametrize("name", ["rescnn", "depthwise"])
def test_zoo_census_and_numerics(name):
    model, x = make(name)
    gm = qgraph.capture(model, (x,))
    before = _census(gm)
    result = FoldBatchNorm()(gm)
    after = _census(gm)
    n_bn = before[str(_BN)]
    assert n_bn == {"rescnn": 6, "depthwise": 5}[name]
    assert result.counts["folded"] == n_bn
    assert str(_BN) not in after
    # nothing else changed: same op census minus the BatchNorms
    expected = {k: v for k, v in before.items() if k != str(_BN)}
    assert after == expected
    qgraph.verify(gm)
    _assert_close_to_eager(gm(x), model(x))


def test_second_run_is_a_no_op():
    model, x = make("rescnn")
    gm = qgraph.capture(model, (x,))
    assert FoldBatchNorm()(gm).modified
    text, code = str(gm.graph), gm.code
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    again = FoldBatchNorm()(gm)
    assert again.modified is False and dict(again.counts) == {"folded": 0}
    assert str(gm.graph) == text and gm.code == code
    assert gm.state_dict().keys() == state.keys()
    assert all(torch.equal(gm.state_dict()[k], v) for k, v in state.items())


def test_user_model_not_modified():
    model, x = make("rescnn")
    model.train()  # capture must not flip the user's module to eval either
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = qgraph.capture(model, (x,))
    FoldBatchNorm()(gm)
    assert model.training
    assert model.state_dict().keys() == before.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# --- near misses: the pass must leave these graphs exactly as they are ------------------------


class _TrainingBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bn
        y = self.conv(x)
        return F.batch_norm(y, b.running_mean, b.running_var, b.weight, b.bias, training=True)


class _ConvOutputUsedTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class _SharedWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.conv(x)))  # one nn.Conv2d called twice


class _WeightIsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.bn(F.linear(x, w))


_NEAR_MISSES = {
    "training-mode": (
        _TrainingBN, lambda: (torch.randn(2, 3, 8, 8),), "BatchNorm is in training mode"
    ),
    "producer-has-other-users": (
        _ConvOutputUsedTwice, lambda: (torch.randn(2, 3, 8, 8),), "conv2d has other users"
    ),
    "shared-weight": (
        _SharedWeight, lambda: (torch.randn(2, 3, 8, 8),), "conv.weight is shared with another op"
    ),
    "weight-is-graph-input": (
        _WeightIsInput,
        lambda: (torch.randn(2, 5), torch.randn(6, 5)),
        "weight or bias is not a constant",
    ),
}


@pytest.mark.parametrize("case", sorted(_NEAR_MISSES))
def test_near_miss_left_untouched(case, caplog):
    factory, inputs, reason = _NEAR_MISSES[case]
    torch.manual_seed(3)
    model = factory()
    _randomize(model.bn, seed=4)
    model.eval()
    args = inputs()
    gm = qgraph.capture(model, args)
    text = str(gm.graph)
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    caplog.set_level(logging.DEBUG, logger="qgraph.passes.fold_batchnorm")
    result = FoldBatchNorm()(gm)
    assert result.modified is False and dict(result.counts) == {"folded": 0}
    assert str(gm.graph) == text
    assert _census(gm)[str(_BN)] == 1
    assert all(torch.equal(gm.state_dict()[k], v) for k, v in state.items())
    assert reason in caplog.text  # the refusal says why
    qgraph.verify(gm)


def test_near_miss_numerics_unchanged():
    """The refused shared-weight graph still computes what the eager model computes."""
    torch.manual_seed(5)
    model = _SharedWeight()
    _randomize(model.bn)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    gm = qgraph.capture(model, (x,))
    FoldBatchNorm()(gm)
    _assert_close_to_eager(gm(x), model(x))


def test_folds_one_bn_and_refuses_another_in_the_same_graph():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.bn_a = nn.BatchNorm2d(4)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.bn_b = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.b(self.bn_a(self.a(x)))
            return self.bn_b(y) * y  # b's output has a second user: not foldable

    torch.manual_seed(6)
    model = Two()
    _randomize(model.bn_a, 1)
    _randomize(model.bn_b, 2)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    gm = qgraph.capture(model, (x,))
    result = FoldBatchNorm()(gm)
    assert dict(result.counts) == {"folded": 1}
    assert _census(gm)[str(_BN)] == 1
    qgraph.verify(gm)
    _assert_close_to_eager(gm(x), model(x))
    assert FoldBatchNorm()(copy.deepcopy(gm)).modified is False


# --- the same pass on ONNX models (onnx-ir) ----------------------------------------------------------


def _onnx_bn_model(producer: str, *, shared_weight: bool = False, second_reader: bool = False, gemm_beta: bool = False):  # noqa: ANN202
    """x → Conv|ConvTranspose(groups 2)|Gemm(transB 0) → BatchNormalization → y, as onnx-ir."""
    import numpy as np
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    c = 4
    if producer == "Gemm":
        x_shape, w_shape, attrs = ["N", 6], (6, c), ({"beta": 0.5} if gemm_beta else {})
    elif producer == "Conv":
        x_shape, w_shape, attrs = ["N", 3, 5, 5], (c, 3, 3, 3), {"pads": [1, 1, 1, 1]}
    else:
        x_shape, w_shape, attrs = ["N", 4, 5, 5], (4, c // 2, 3, 3), {"group": 2}
    inits = [numpy_helper.from_array(rng.standard_normal(w_shape).astype(np.float32), "W")]
    for name, values in (("scale", rng.random(c) + 0.5), ("B", rng.standard_normal(c) * 0.1),
                         ("mean", rng.standard_normal(c) * 0.1), ("var", rng.random(c) + 0.5)):
        inits.append(numpy_helper.from_array(values.astype(np.float32), name))
    bias = ["C"] if gemm_beta else []
    if gemm_beta:
        inits.append(numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "C"))
    nodes = [helper.make_node(producer, ["x", "W", *bias], ["h"], name="producer", **attrs),
             helper.make_node("BatchNormalization", ["h", "scale", "B", "mean", "var"], ["y"], name="bn", epsilon=1e-3)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if shared_weight:
        nodes.append(helper.make_node(producer, ["x", "W"], ["z"], name="twin", **attrs))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    if second_reader:
        nodes.append(helper.make_node("Relu", ["h"], ["r"]))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)], outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    x = rng.standard_normal([3 if d == "N" else d for d in x_shape]).astype(np.float32)
    return ir.serde.deserialize_model(proto), x


def _ort(model, x):  # noqa: ANN001, ANN202
    import onnxruntime as ort

    from qgraph.onnx_graph import serialize

    sess = ort.InferenceSession(serialize(model), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


@pytest.mark.parametrize("producer", ["Conv", "ConvTranspose", "Gemm"])
def test_onnx_fold_census_numerics_and_idempotence(producer):
    import numpy as np

    from qgraph.verify import verify

    model, x = _onnx_bn_model(producer)
    before = _ort(model, x)
    result = FoldBatchNorm()(model)
    assert result.modified and result.counts["folded"] == 1
    assert [n.op_type for n in model.graph] == [producer]
    assert model.graph.outputs[0].name == "y"  # the model's output keeps its name
    assert sorted(model.graph.initializers) == ["W", "W_bias"]  # BN statistics are gone
    verify(model)
    np.testing.assert_allclose(_ort(model, x)[0], before[0], rtol=1e-5, atol=1e-5)
    assert not FoldBatchNorm()(model).modified


@pytest.mark.parametrize("near_miss", ["shared_weight", "second_reader", "gemm_beta"])
def test_onnx_fold_near_misses_untouched(near_miss):
    model, x = _onnx_bn_model("Gemm" if near_miss == "gemm_beta" else "Conv", **{near_miss: True})
    result = FoldBatchNorm()(model)
    assert not result.modified and "BatchNormalization" in [n.op_type for n in model.graph]
