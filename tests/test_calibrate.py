"""calibrate: feeds data through observers that have not seen any; never edits the graph."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from torch import nn

import qgraph
from qgraph import PreconditionError, QGraphError, Sequential
from qgraph.backends.tensorrt import INT8
from qgraph.examples.zoo import make
from qgraph.observers import Observer
from qgraph.passes import Annotate, Calibrate, FoldBatchNorm, InsertObservers


@functools.lru_cache(maxsize=None)
def _observed_cached(name: str):
    model, x = make(name)
    gm = qgraph.capture(model, (x,))
    Sequential([FoldBatchNorm(), Annotate(INT8), InsertObservers()])(gm)
    return gm, x


def _observed(name: str) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    gm, x = _observed_cached(name)
    return copy.deepcopy(gm), x


def _observers(gm: torch.fx.GraphModule) -> dict[str, Observer]:
    return {name: m for name, m in gm.named_modules() if isinstance(m, Observer)}


def _data(x: torch.Tensor, n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(x.shape, generator=g) for _ in range(n)]


# --- 1. census: statistics collected, graph untouched ----------------------------------------


def test_census_counts_and_no_graph_edit():
    gm, x = _observed("rescnn")
    text, code = str(gm.graph), gm.code
    data = _data(x)
    result = Calibrate(data)(gm)
    assert result.modified
    assert dict(result.counts) == {"batches": 3, "observers": 9}
    assert str(gm.graph) == text and gm.code == code
    for name, obs in _observers(gm).items():
        assert obs.batches == 3, name
        assert obs.enabled, name  # switched back on after the run
        assert obs.hist.total > 0 and obs.hist.total % 3 == 0


def test_input_observer_saw_exactly_the_data():
    gm, x = _observed("mlp")
    data = _data(x, n=4, seed=1)
    Calibrate(data)(gm)
    obs = gm.get_submodule("obs_x")
    flat = torch.cat([d.reshape(-1) for d in data]).numpy()
    assert obs.hist.total == flat.size
    assert obs.hist.amax == float(np.abs(flat).max())
    assert obs.amax() == float(np.abs(flat).max())  # the default calibrator is max


@pytest.mark.parametrize("form", ["tensor", "tuple", "dict"])
def test_batch_forms(form):
    gm, x = _observed("mlp")
    data = _data(x, n=2)
    batches = {
        "tensor": data,
        "tuple": [(d,) for d in data],
        "dict": [{"x": d} for d in data],
    }[form]
    assert dict(Calibrate(batches)(gm).counts) == {"batches": 2, "observers": 3}
    assert gm.get_submodule("obs_x").hist.amax == float(torch.cat(data).abs().max())


# --- 2. numerics: calibration does not change what the graph computes ------------------------


def test_outputs_identical():
    gm, x = _observed("transformer")
    xs = [x, torch.randn(2, *x.shape[1:])]
    before = [gm(t) for t in xs]
    Calibrate(_data(x))(gm)
    after = [gm(t) for t in xs]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


# --- 3. idempotence ---------------------------------------------------------------------------


def test_second_run_is_a_no_op_and_does_not_double_count():
    gm, x = _observed("rescnn")
    data = _data(x)
    Calibrate(data)(gm)
    text = str(gm.graph)
    snapshot = {
        n: (o.batches, o.hist.total, o.hist.counts.clone()) for n, o in _observers(gm).items()
    }
    again = Calibrate(data)(gm)
    assert again.modified is False and dict(again.counts) == {"batches": 0, "observers": 0}
    assert str(gm.graph) == text
    for name, obs in _observers(gm).items():
        batches, total, counts = snapshot[name]
        assert obs.batches == batches and obs.hist.total == total
        assert torch.equal(obs.hist.counts, counts)


def test_only_fresh_observers_are_fed():
    gm, x = _observed("mlp")
    Calibrate(_data(x, n=2))(gm)
    old = gm.get_submodule("obs_x")
    # replace one observer by a fresh one (as if it had been inserted later)
    fresh = Observer(old.spec, old.calibrator, label=old.label)
    gm.add_module("obs_x", fresh)
    others = {n: (o.batches, o.hist.total) for n, o in _observers(gm).items() if n != "obs_x"}
    result = Calibrate(_data(x, n=5, seed=9))(gm)
    assert dict(result.counts) == {"batches": 5, "observers": 1}
    assert fresh.batches == 5 and fresh.hist.total == 5 * x.numel()
    now = {n: (o.batches, o.hist.total) for n, o in _observers(gm).items() if n != "obs_x"}
    assert now == others


# --- 4. near misses ---------------------------------------------------------------------------


def test_graph_without_observers_is_not_modified():
    model, x = make("mlp")
    gm = qgraph.capture(model, (x,))
    Annotate(INT8)(gm)  # annotated but no observers
    text = str(gm.graph)
    result = Calibrate(_data(x))(gm)
    assert result.modified is False and dict(result.counts) == {"batches": 0, "observers": 0}
    assert str(gm.graph) == text


def test_empty_data_raises():
    gm, _ = _observed("mlp")
    with pytest.raises(QGraphError, match="calibration data is empty"):
        Calibrate([])(gm)
    assert all(o.batches == 0 and o.enabled for o in _observers(gm).values())


def test_dict_batch_missing_input_raises():
    gm, x = _observed("mlp")
    with pytest.raises(QGraphError, match="calibration batch lacks input\\(s\\) x"):
        Calibrate([{"y": x}])(gm)


def test_nan_in_data_names_the_edge():
    gm, x = _observed("mlp")
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(QGraphError) as info:
        Calibrate([x, bad])(gm)
    msg = str(info.value)
    assert msg.startswith("at input 0 of linear (output of x): non-finite value")
    assert all(o.enabled for o in _observers(gm).values())  # re-enabled after the failure


def test_observer_without_data_names_the_edge():
    gm, _ = _observed("mlp")
    msg = r"^at input 0 of linear \(output of x\): observer saw no data"
    with pytest.raises(QGraphError, match=msg):
        gm.get_submodule("obs_x").amax()


def test_all_zero_edge_reported_at_amax():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.relu(x))

    gm = qgraph.capture(M().eval(), (torch.randn(2, 4),))
    Sequential([Annotate(INT8), InsertObservers(), Calibrate([-torch.rand(2, 4)])])(gm)
    (obs,) = _observers(gm).values()
    with pytest.raises(QGraphError, match="only zeros"):
        obs.amax()


# --- 5. verifier ------------------------------------------------------------------------------


def test_verify_after_calibrate():
    gm, x = _observed("depthwise")
    Calibrate(_data(x, n=2))(gm)
    qgraph.verify(gm)


@pytest.mark.parametrize("bad", [-1, 1.5, "64", True])
def test_run_bytes_must_be_a_non_negative_integer(bad):
    with pytest.raises(PreconditionError, match="run_bytes must be an integer >= 0"):
        Calibrate([], run_bytes=bad)
