"""insert-observers: one Observer per (producer, spec) on annotated activation edges."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import qgraph
from qgraph import PreconditionError, Sequential
from qgraph.backends.tensorrt import INT8
from qgraph.examples.zoo import make
from qgraph.observers import Observer
from qgraph.passes import Annotate, FoldBatchNorm, InsertObservers


@functools.lru_cache(maxsize=None)
def _annotated_cached(name: str):
    model, x = make(name)
    gm = qgraph.capture(model, (x,))
    Sequential([FoldBatchNorm(), Annotate(INT8)])(gm)
    return gm, x


def _annotated(name: str) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    gm, x = _annotated_cached(name)
    return copy.deepcopy(gm), x


def _observer_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [
        n for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), Observer)
    ]


# --- 1. census --------------------------------------------------------------------------------


def test_rescnn_census_and_placement():
    gm, _ = _annotated("rescnn")
    result = InsertObservers()(gm)
    obs = _observer_nodes(gm)
    assert result.modified and dict(result.counts) == {"observers": 9} and len(obs) == 9
    assert sum(isinstance(m, Observer) for m in gm.modules()) == 9
    # observed: the input, relus feeding convs/pools, pools, the downsample conv, flatten
    assert sorted(n.args[0].name for n in obs) == sorted(
        ["x", "relu", "max_pool2d", "relu_1", "relu_2", "conv2d_3", "relu_3", "relu_4", "flatten"]
    )
    for n in obs:
        module = gm.get_submodule(n.target)
        assert module.spec == INT8.activation and module.calibrator == "max"
        assert n.args[0].op != "get_attr"  # weights are never observed
    # every annotated activation input now reads an observer
    for node in gm.graph.nodes:
        for index, spec in (node.meta.get("qgraph.quant") or {}).items():
            src = node.args[index]
            if spec.role == "activation":
                assert src in obs, (node.name, index)
            else:
                assert src.op == "get_attr"


def test_observer_label_names_the_edge():
    gm, _ = _annotated("mlp")
    InsertObservers()(gm)
    labels = sorted(gm.get_submodule(n.target).label for n in _observer_nodes(gm))
    assert labels[0] == "input 0 of linear (output of x)"


def test_options_reach_the_observers():
    gm, _ = _annotated("mlp")
    InsertObservers("percentile", percentile=99.9, bins=256)(gm)
    for n in _observer_nodes(gm):
        m = gm.get_submodule(n.target)
        assert (m.calibrator, m.percentile, m.hist.bins) == ("percentile", 99.9, 256)


def test_unknown_calibrator_rejected():
    with pytest.raises(PreconditionError, match="unknown calibrator 'minmax'"):
        InsertObservers("minmax")


# --- shared observers -------------------------------------------------------------------------


class _QKV(nn.Module):
    """Three separate linears (q, k, v) reading the same tensor; a head reads their sum."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 8)
        self.v = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.q(x) + self.k(x) * self.v(x)))


def test_one_observer_shared_by_q_k_v():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8)
    gm = qgraph.capture(_QKV().eval(), (x,))
    Annotate(INT8)(gm)
    result = InsertObservers()(gm)
    obs = _observer_nodes(gm)
    linears = [n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert len(linears) == 4
    linears = linears[:3]
    # x feeds three linears: observed once. (add(q, k*v) has one weighted side, q, so the
    # residual rule puts the add's only other observer on mul's output; the head's on relu's.)
    x_obs = [n for n in obs if n.args[0].name == "x"]
    assert len(x_obs) == 1
    assert {u for u in x_obs[0].users} == set(linears)
    assert all(lin.args[0] is x_obs[0] for lin in linears)
    assert result.counts["observers"] == len(obs) == 3
    assert [n.args[0].name for n in obs if n is not x_obs[0]] == ["mul", "relu"]


def test_one_observer_for_both_inputs_of_x_matmul_xT():
    class M(nn.Module):
        def forward(self, x):
            return torch.matmul(x, x)

    gm = qgraph.capture(M(), (torch.randn(2, 4, 4),))
    Annotate(INT8)(gm)
    assert dict(InsertObservers()(gm).counts) == {"observers": 1}
    (obs,) = _observer_nodes(gm)
    mm = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.matmul.default)
    assert mm.args[:2] == (obs, obs)


def test_transformer_qkv_input_observed_once():
    gm, _ = _annotated("transformer")
    InsertObservers()(gm)
    obs = _observer_nodes(gm)
    producers = [n.args[0].name for n in obs]
    assert len(producers) == len(set(producers))  # never two observers on one producer
    assert len(obs) == 8  # the residual Adds feed LayerNorm / the output: not quantized


# --- 2. numerics: observers are identities ----------------------------------------------------


@pytest.mark.parametrize("name", ["rescnn", "transformer"])
def test_outputs_identical(name):
    gm, x = _annotated(name)
    xs = [x, torch.randn(3, *x.shape[1:])]
    before = [gm(t) for t in xs]
    InsertObservers("entropy")(gm)
    after = [gm(t) for t in xs]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


# --- 3. idempotence ---------------------------------------------------------------------------


def test_second_run_is_a_no_op():
    gm, _ = _annotated("rescnn")
    assert InsertObservers()(gm).modified
    text, code = str(gm.graph), gm.code
    names = sorted(name for name, m in gm.named_modules() if isinstance(m, Observer))
    again = InsertObservers()(gm)
    assert again.modified is False and dict(again.counts) == {"observers": 0}
    assert str(gm.graph) == text and gm.code == code
    assert sorted(name for name, m in gm.named_modules() if isinstance(m, Observer)) == names


# --- 4. near miss: no plan, no observers ------------------------------------------------------


def test_requires_annotations():
    model, x = make("mlp")
    gm = qgraph.capture(model, (x,))
    text = str(gm.graph)
    with pytest.raises(PreconditionError, match="no quantization annotations: run `annotate`"):
        InsertObservers()(gm)
    assert str(gm.graph) == text


def test_float_only_plan_inserts_nothing():
    """Annotated, but nothing quantizable (LayerNorm + softmax only): precondition fails too."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(8)

        def forward(self, x):
            return torch.softmax(self.ln(x), -1)

    gm = qgraph.capture(M().eval(), (torch.randn(2, 8),))
    assert Annotate(INT8)(gm).counts["quantized"] == 0
    with pytest.raises(PreconditionError, match=r"the plan quantizes nothing \(layer_norm: normalisation runs in float"):
        InsertObservers()(gm)


# --- 5. verifier ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rescnn", "depthwise", "transformer", "mlp"])
def test_verify_after_insert_observers(name):
    gm, _ = _annotated(name)
    InsertObservers()(gm)
    qgraph.verify(gm)
    # observers on placeholders sit after all inputs/constants, just before their first user
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in _observer_nodes(gm):
        assert order[n] > order[n.args[0]]
        assert order[n] < min(order[u] for u in n.users)


def test_int8_grid_calibrators_are_refused_for_other_formats():
    """mse and entropy score thresholds by INT8 rounding error: a clear error for FP8/NVFP4."""
    from qgraph.backends.tensorrt import FP8

    model, x = make("mlp")
    gm = qgraph.capture(model, (x,))
    Annotate(FP8)(gm)
    with pytest.raises(PreconditionError, match="calibrator mse searches thresholds on the INT8 grid.*fp8_e4m3"):
        InsertObservers("mse")(gm)
    assert InsertObservers("percentile")(gm).modified
