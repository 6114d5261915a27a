"""calibrate and gptq under torchrun (two gloo ranks, CPU). Each rank calibrates on its share
of the data and the observers' histograms are merged, so every calibrator gives every rank
exactly the range one process gets from all the data — on the torch graph and on the ONNX model,
with even shares and with one rank given nothing; a rank that fails makes both raise;
``merge_ranks=False`` keeps each rank's own statistics. GPTQ sums its layer statistics the same
way."""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import qgraph
from qgraph import PreconditionError, Sequential
from qgraph.backends.tensorrt import INT8
from qgraph.calibrators import CALIBRATORS
from qgraph.examples.zoo import make
from qgraph.observers import Observer
from qgraph.onnx_graph import OBSERVERS_META, load_onnx_model
from qgraph.passes import GPTQ, Annotate, Calibrate, InsertObservers

sys.path.insert(0, str(Path(__file__).parent))
from test_gptq import _data as _gptq_data  # noqa: E402
from test_gptq import _ptq, _weights  # noqa: E402

#: gptq's data: the correlated inputs of tests/test_gptq.py, four batches (two per rank)
GPTQ_DATA = _gptq_data(4)

#: six batches of different spreads (the ranks' ranges differ: the merge must coarsen bins)
DATA = [torch.randn(8, 64, generator=torch.Generator().manual_seed(i)) * (1.0 + 0.7 * i) for i in range(6)]


@functools.cache
def _fx(calibrator: str) -> torch.fx.GraphModule:
    model, x = make("mlp")
    gm = qgraph.capture(model, (x,))
    Sequential([Annotate(INT8), InsertObservers(calibrator)])(gm)
    return gm


def fx_observed(calibrator: str) -> torch.fx.GraphModule:
    """The zoo MLP with observers of ``calibrator``, not calibrated."""
    return copy.deepcopy(_fx(calibrator))


@functools.cache
def _onnx_file() -> Path:
    model, x = make("mlp")
    path = Path(tempfile.mkdtemp(prefix="qgraph-ranks-")) / "mlp.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(model, (x,), dynamo=True, external_data=False,
                          dynamic_shapes=({0: torch.export.Dim.AUTO},)).save(str(path))
    return path


def onnx_observed(calibrator: str):
    """The zoo MLP as an ONNX model (onnx-ir) with observers of ``calibrator``."""
    m = load_onnx_model(_onnx_file())
    Sequential([Annotate(INT8), InsertObservers(calibrator)])(m)
    return m


def _ranges(graph) -> dict[str, list]:  # also used by the worker
    """Each observer's [amax, values seen] (+ batches on the torch graph: the ONNX door counts
    onnxruntime runs, which join batches)."""
    if isinstance(graph, torch.fx.GraphModule):
        observers = {n: m for n, m in graph.named_modules() if isinstance(m, Observer)}
        return {n: [m.amax(), m.hist.total, m.batches] for n, m in observers.items()}
    observers = {f"{name}:{i}": m for (name, i), m in graph.graph.meta[OBSERVERS_META].items()}
    return {n: [m.amax(), m.hist.total] for n, m in observers.items()}


def _single(build, calibrator: str, data) -> dict[str, list]:
    graph = build(calibrator)
    Calibrate(data)(graph)
    return _ranges(graph)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    worker = Path(__file__).with_name("calibrate_ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [{**json.loads((out / f"rank{r}.json").read_text()), "dir": str(out)} for r in (0, 1)]


@pytest.mark.parametrize("share", ["even", "uneven"])
def test_merged_ranges_equal_one_process_on_all_the_data(ranks, share):
    for calibrator in CALIBRATORS:
        for kind, build in (("fx", fx_observed), ("onnx", onnx_observed)):
            key = f"{share} {calibrator} {kind}"
            expected = _single(build, calibrator, DATA)
            assert len(expected) == 3 if kind == "fx" else len(expected) >= 3
            for r in (0, 1):
                assert ranks[r][key]["ranges"] == expected, (key, r)  # exact: amax, batches, values seen
                assert ranks[r][key]["counts"] == {"batches": 6, "observers": len(expected), "ranks": 2}, key


def test_a_failing_rank_makes_every_rank_raise(ranks):
    for kind in ("fx", "onnx"):
        assert ranks[1][f"failure {kind}"].endswith("non-finite value (NaN or Inf) reached an observer"), kind
        assert ranks[0][f"failure {kind}"] == "calibration failed on rank 1 (its own error is in its output)", kind


def test_gptq_on_shares_equals_one_process_on_all_the_data(ranks):
    """Each rank rounds with the layer statistics of both shares: the same weights on both
    ranks, and those of one process given all the data (float64 sums added in another order:
    equal to 1e-6, which no code flip would be)."""
    out = ranks[0]["dir"]
    weights = [torch.load(Path(out) / f"gptq{r}.pt") for r in (0, 1)]
    _, gm, _ = _ptq("W4A16", data=GPTQ_DATA)
    GPTQ(GPTQ_DATA)(gm)
    single = _weights(gm)
    assert weights[0].keys() == single.keys() and len(single) == 2
    for key, w in single.items():
        assert torch.equal(weights[0][key], weights[1][key]), key
        torch.testing.assert_close(weights[0][key], w, rtol=0, atol=1e-6, msg=key)


def test_auto_precision_on_shares_makes_one_plan_equal_to_one_process_on_all_the_data(ranks):
    """Every rank gets the same plan, errors and gains, and they are those of one process given
    all the batches (float64 error sums added in another order: equal to 1e-9 relative)."""
    from test_auto_precision import CANDIDATES, _float

    from qgraph.passes import AutoPrecision
    from qgraph.passes.auto_precision import AUTO_PRECISION_META

    assert ranks[0]["auto-precision"] == ranks[1]["auto-precision"]
    gm, data = _float()
    AutoPrecision(CANDIDATES, data, effective_bits=6.0, fallback=True)(gm)
    single, merged = gm.meta[AUTO_PRECISION_META], ranks[0]["auto-precision"]
    assert {n: layer["recipe"] for n, layer in merged["layers"].items()} == {
        n: layer["recipe"] for n, layer in single["layers"].items()
    }
    assert merged["base_error"] == pytest.approx(single["base_error"], rel=1e-9)
    assert merged["error"] == pytest.approx(single["error"], rel=1e-9)
    for n, layer in single["layers"].items():
        assert merged["layers"][n]["gains"]["fp8"] == pytest.approx(layer["gains"]["fp8"], rel=1e-6), n


def test_merge_ranks_false_keeps_each_ranks_own(ranks):
    for r in (0, 1):
        assert ranks[r]["own max fx"]["ranges"] == _single(fx_observed, "max", DATA[r::2])
        assert ranks[r]["own max fx"]["counts"] == {"batches": 3, "observers": 3}
    assert ranks[0]["own max fx"]["ranges"] != ranks[1]["own max fx"]["ranges"]


def test_merge_ranks_needs_a_process_group():
    with pytest.raises(PreconditionError, match="torch.distributed"):
        Calibrate(DATA, merge_ranks=True)(fx_observed("max"))
    with pytest.raises(PreconditionError, match="merge_ranks"):
        Calibrate(DATA, merge_ranks="yes")
