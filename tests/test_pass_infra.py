"""The pass contract: PassResult, Sequential, PassManager, instruments, verifier, pipeline specs."""

from __future__ import annotations

import copy
import time
import warnings

import pytest
import torch
from torch import nn

import qgraph
from qgraph import (
    DumpInstrument,
    InputError,
    Pass,
    PassManager,
    PassResult,
    PostconditionError,
    PreconditionError,
    Sequential,
    TimingInstrument,
    VerifierError,
)
from qgraph.backends.tensorrt import INT8
from qgraph.passes import PASSES, Annotate, Calibrate, FoldBatchNorm, InsertObservers, InsertQDQ


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


@pytest.fixture(scope="module")
def _tiny_graph() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return qgraph.capture(_Tiny().eval(), (torch.randn(2, 4),))


@pytest.fixture
def gm(_tiny_graph) -> torch.fx.GraphModule:
    return copy.deepcopy(_tiny_graph)


# --- toy passes -------------------------------------------------------------------------------


class _Countdown(Pass):
    """Reports a change for the first ``n`` calls (adds a marker attribute), then none."""

    name = "countdown"

    def __init__(self, n: int) -> None:
        self.n = n
        self.calls = 0

    def call(self, graph):
        self.calls += 1
        changed = self.calls <= self.n
        if changed:
            setattr(graph, f"_marker_{self.calls}", self.calls)
        return PassResult(graph, changed, {"changes": int(changed)})


class _Noop(Pass):
    name = "noop"

    def call(self, graph):
        return PassResult(graph, False)


class _Fails(Pass):
    name = "fails"

    def requires(self, graph):
        raise PreconditionError("needs something the graph lacks")

    def call(self, graph):  # pragma: no cover - requires stops it
        raise AssertionError("call must not run when requires fails")


class _AddsMarker(Pass):
    """Adds a marker in ``call``; ``ensures`` demands the marker on the RESULT graph."""

    name = "adds-marker"

    def __init__(self, really: bool = True) -> None:
        self.really = really
        self.ensured: list[PassResult] = []

    def call(self, graph):
        if self.really:
            graph.qgraph_marker = True
        return PassResult(graph, self.really)

    def ensures(self, result):
        self.ensured.append(result)
        if not getattr(result.graph, "qgraph_marker", False):
            raise PostconditionError("marker missing")


class _BreaksGraph(Pass):
    """Adds a get_attr to an attribute that does not exist."""

    name = "breaks-graph"

    def call(self, graph):
        out = next(n for n in graph.graph.nodes if n.op == "output")
        with graph.graph.inserting_before(out), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # fx warns about the dangling target
            graph.graph.get_attr("no_such_weight")
        return PassResult(graph, True)


class _Sleeps(Pass):
    name = "sleeps"

    def call(self, graph):
        time.sleep(0.02)
        return PassResult(graph, False)


# --- PassResult and Pass ----------------------------------------------------------------------


def test_pass_result_defaults_and_frozen(gm):
    r = PassResult(gm, False)
    assert r.graph is gm and r.modified is False and dict(r.counts) == {}
    with pytest.raises(Exception):
        r.modified = True  # frozen dataclass


def test_pass_returning_wrong_type_is_a_bug(gm):
    class Bad(Pass):
        name = "bad"

        def call(self, graph):
            return graph

    with pytest.raises(TypeError, match="bad returned GraphModule"):
        Bad()(gm)


def test_requires_checked_before_call(gm):
    with pytest.raises(PreconditionError, match="lacks"):
        _Fails()(gm)


def test_ensures_checked_on_the_result(gm):
    p = _AddsMarker()
    assert not hasattr(gm, "qgraph_marker")  # the input alone would fail the post-condition
    result = p(gm)
    assert p.ensured == [result]  # ensures saw the result object, not the input
    assert result.modified


def test_ensures_failure_raises(gm):
    with pytest.raises(PostconditionError, match="marker missing"):
        _AddsMarker(really=False)(gm)


# --- Sequential -------------------------------------------------------------------------------


def test_sequential_ors_modified_and_prefixes_counts(gm):
    r = Sequential([_Noop(), _Countdown(1), _Noop()])(gm)
    assert r.modified is True
    assert dict(r.counts) == {"countdown.changes": 1}
    r = Sequential([_Noop(), _Noop()])(gm)
    assert r.modified is False and dict(r.counts) == {}


def test_sequential_error_names_passes_already_run(gm):
    seq = Sequential([_Noop(), _Countdown(1), _Fails(), _Noop()])
    with pytest.raises(PreconditionError) as info:
        seq(gm)
    msg = str(info.value)
    assert msg.startswith("fails: needs something the graph lacks")
    assert "(passes already run: noop, countdown)" in msg


def test_sequential_error_first_pass_says_none(gm):
    with pytest.raises(PreconditionError, match=r"passes already run: none\)"):
        Sequential([_Fails()])(gm)


def test_verifier_runs_after_each_pass_and_catches_broken_graph(gm):
    seq = Sequential([_Noop(), _BreaksGraph(), _Noop()])
    with pytest.raises(VerifierError) as info:
        seq(gm)
    msg = str(info.value)
    assert msg.startswith("breaks-graph:") and "no_such_weight" in msg
    assert "passes already run: noop)" in msg


def test_verify_false_skips_verifier(gm):
    r = Sequential([_BreaksGraph()], verify=False)(gm)
    assert r.modified
    with pytest.raises(VerifierError, match="no_such_weight"):
        qgraph.verify(gm)


def test_verify_accepts_captured_graph_and_rejects_dangling_call_module(gm):
    qgraph.verify(gm)
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    gm.add_module("extra", nn.Identity())
    with gm.graph.inserting_after(x):
        gm.graph.call_module("extra", (x,))
    qgraph.verify(gm)  # an unused module call is still a well-formed graph
    delattr(gm, "extra")  # a pass that deletes a module but leaves its call behind
    with pytest.raises(VerifierError, match="extra"):
        qgraph.verify(gm)


def test_verify_rejects_get_attr_to_non_tensor(gm):
    gm.not_a_tensor = 3
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fx warns: not a parameter or buffer
        gm.graph.get_attr("not_a_tensor")
    with pytest.raises(VerifierError, match="'not_a_tensor' is not a tensor"):
        qgraph.verify(gm)


# --- PassManager ------------------------------------------------------------------------------


def test_pass_manager_stops_at_fixed_point(gm):
    counter = _Countdown(2)
    pm = PassManager([counter, _Noop()], max_iterations=8)
    r = pm(gm)
    assert pm.iterations == 3  # two changing iterations, one that confirms the fixed point
    assert counter.calls == 3
    assert r.modified is True
    assert dict(r.counts) == {"countdown.changes": 2}


def test_pass_manager_unmodified_graph_runs_once(gm):
    pm = PassManager([_Noop()])
    r = pm(gm)
    assert pm.iterations == 1 and r.modified is False


def test_pass_manager_max_iterations(gm):
    counter = _Countdown(100)
    pm = PassManager([counter], max_iterations=4)
    r = pm(gm)
    assert pm.iterations == 4 and counter.calls == 4
    assert r.modified is True and r.counts["countdown.changes"] == 4


def test_pass_manager_rejects_zero_iterations():
    with pytest.raises(PreconditionError, match="max_iterations must be >= 1, got 0"):
        PassManager([_Noop()], max_iterations=0)


def test_pass_manager_ptq_pipeline_reaches_fixed_point():
    """The standard PTQ passes repeated: iteration 2 must change nothing (every pass idempotent
    on the output of the whole chain, including annotate after insert-qdq)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2)
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    g = qgraph.capture(model, (x,))
    pm = PassManager(
        [FoldBatchNorm(), Annotate(INT8), InsertObservers(), Calibrate([x]), InsertQDQ()]
    )
    r = pm(g)
    assert pm.iterations == 2
    assert r.counts["insert-qdq.weights"] == 1 and r.counts["insert-qdq.activations"] == 2
    conv = next(n for n in g.graph.nodes if n.op == "call_function" and "conv" in str(n.target))
    assert set(conv.meta["qgraph.quant"]) == {0, 1}  # plan intact after re-annotation
    assert "qgraph.float_reason" not in conv.meta


# --- instruments ------------------------------------------------------------------------------


def test_timing_instrument_sums_per_pass(gm):
    timing = TimingInstrument()
    pm = PassManager([_Countdown(1), _Sleeps()], instruments=[timing])
    pm(gm)
    assert set(timing.seconds) == {"countdown", "sleeps"}
    assert pm.iterations == 2
    assert 0.04 <= timing.seconds["sleeps"] < 1.0  # two runs of 20 ms, summed
    assert 0.0 <= timing.seconds["countdown"] < timing.seconds["sleeps"]


def test_dump_instrument_writes_graph_after_each_pass(gm, tmp_path):
    dump = DumpInstrument(tmp_path / "dumps")
    Sequential([_Noop(), FoldBatchNorm(), _Noop()], instruments=[dump])(gm)
    files = sorted(p.name for p in (tmp_path / "dumps").iterdir())
    assert files == ["01-noop.txt", "02-fold-batchnorm.txt", "03-noop.txt"]
    text = (tmp_path / "dumps" / "03-noop.txt").read_text(encoding="utf-8")
    assert text == str(gm.graph) + "\n"
    assert "aten.linear.default" in text


def test_instruments_not_called_after_failed_pass(gm, tmp_path):
    dump = DumpInstrument(tmp_path)
    with pytest.raises(PreconditionError):
        Sequential([_Noop(), _Fails()], instruments=[dump])(gm)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["01-noop.txt"]


# --- pipeline specs ---------------------------------------------------------------------------

_STANDARD = "fold-batchnorm,insert-observers(calibrator=percentile),insert-qdq"


def test_parse_spec():
    assert qgraph.parse_spec(_STANDARD) == [
        ("fold-batchnorm", {}),
        ("insert-observers", {"calibrator": "percentile"}),
        ("insert-qdq", {}),
    ]


def test_parse_spec_values_and_whitespace():
    steps = qgraph.parse_spec(" a ( x = 1 , y=2.5, z=true , w=False, s=mse ) , b-2 ")
    assert steps == [("a", {"x": 1, "y": 2.5, "z": True, "w": False, "s": "mse"}), ("b-2", {})]
    assert type(steps[0][1]["x"]) is int and type(steps[0][1]["y"]) is float


@pytest.mark.parametrize(
    "spec",
    [
        _STANDARD,
        "fold-batchnorm,annotate,insert-observers(calibrator=max),calibrate,insert-qdq",
        "insert-observers(bins=512,calibrator=entropy,percentile=99.9)",
        "x(flag=false,n=3)",
    ],
)
def test_format_parse_round_trip(spec):
    assert qgraph.format_spec(qgraph.parse_spec(spec)) == spec


def test_format_spec_is_canonical():
    spec = " insert-observers( percentile=99.9 ,calibrator=mse ),insert-qdq()"
    canonical = "insert-observers(calibrator=mse,percentile=99.9),insert-qdq"
    assert qgraph.format_spec(qgraph.parse_spec(spec)) == canonical


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "pipeline spec is empty"),
        ("   ", "pipeline spec is empty"),
        ("fold-batchnorm,,insert-qdq", "cannot parse step ''"),
        ("fold-batchnorm,", "cannot parse step ''"),
        ("FoldBatchNorm", "cannot parse step 'FoldBatchNorm'"),
        ("insert-observers(calibrator=max", "unbalanced '('"),
        ("insert-qdq)", "unbalanced ')'"),
        ("a(b(c=1))", "cannot parse step"),
        (
            "insert-observers(calibrator)",
            "option 'calibrator' of insert-observers is not key=value",
        ),
        ("insert-observers(calibrator=)", "is not key=value"),
        ("insert-observers(Bad=1)", "is not key=value"),
        ("insert-observers(bins=1,bins=2)", "option 'bins' given twice to insert-observers"),
    ],
)
def test_bad_specs_raise_input_error(spec, message):
    with pytest.raises(InputError) as info:
        qgraph.parse_spec(spec)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("fold-batchnorm,fold-bn", "unknown pass 'fold-bn' (known: annotate, auto-precision, calibrate, "),
        ("fold-batchnorm(x=1)", "bad options for fold-batchnorm"),
        ("insert-observers(calibrator=minmax)", "insert-observers"),
        ("insert-observers(bins=many)", "insert-observers"),
    ],
)
def test_build_pipeline_bad_steps_raise_input_error(spec, message):
    with pytest.raises(InputError) as info:
        qgraph.build_pipeline(spec, PASSES, context={"rules": INT8})
    assert message in str(info.value)


def test_build_pipeline_runs_the_standard_ptq_spec():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    data = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    spec = "fold-batchnorm,annotate,insert-observers(calibrator=percentile),calibrate,insert-qdq"
    pipeline = qgraph.build_pipeline(spec, PASSES, context={"rules": INT8, "data": data})
    assert isinstance(pipeline, Sequential)
    assert [type(p) for p in pipeline.passes] == [
        FoldBatchNorm, Annotate, InsertObservers, Calibrate, InsertQDQ
    ]
    assert pipeline.passes[1].rules is INT8 and pipeline.passes[3].data is data
    assert pipeline.passes[2].calibrator == "percentile"
    assert pipeline.spec() == spec  # the pipeline prints back the spec it came from

    g = qgraph.capture(model, (x,))
    r = pipeline(g)
    assert r.counts["fold-batchnorm.folded"] == 1
    assert r.counts["calibrate.batches"] == 3
    assert r.counts["insert-qdq.activations"] == 1 and r.counts["insert-qdq.weights"] == 1
    # quantized output stays close to the float model (a one-conv model, 8-bit codes)
    y, yq = model(x), g(x)
    assert (yq - y).abs().max() <= 0.05 * y.abs().max()


def test_build_pipeline_forwards_sequential_options(tmp_path):
    dump = DumpInstrument(tmp_path)
    pipeline = qgraph.build_pipeline(
        "fold-batchnorm", PASSES, instruments=[dump], verify=False
    )
    assert pipeline.instruments == [dump] and pipeline.verify is False


@pytest.mark.parametrize(
    ("pass_", "spec"),
    [
        (FoldBatchNorm(), "fold-batchnorm"),
        (Annotate(INT8), "annotate"),
        (InsertObservers(), "insert-observers(calibrator=max)"),
        (
            InsertObservers("percentile", percentile=99.9),
            "insert-observers(calibrator=percentile,percentile=99.9)",
        ),
        (InsertObservers("entropy", bins=512), "insert-observers(bins=512,calibrator=entropy)"),
        (Calibrate([]), "calibrate"),
        (InsertQDQ(), "insert-qdq"),
    ],
)
def test_pass_spec_prints_back(pass_, spec):
    assert pass_.spec() == spec == repr(pass_)
    # and the printed spec builds an equal pass
    rebuilt = qgraph.build_pipeline(spec, PASSES, context={"rules": INT8, "data": []}).passes[0]
    assert type(rebuilt) is type(pass_) and rebuilt.spec() == spec


def test_sequential_spec_joins_steps():
    seq = Sequential([FoldBatchNorm(), InsertObservers("mse"), InsertQDQ()])
    assert seq.spec() == "fold-batchnorm,insert-observers(calibrator=mse),insert-qdq"
    assert qgraph.format_spec(qgraph.parse_spec(seq.spec())) == seq.spec()


@pytest.mark.parametrize(
    ("example", "message"),
    [
        (torch.randn(2, 8), r"write \(x,\), not x"),  # a bare tensor would be unpacked row by row
        ((torch.randn(2, 8), 3), r"example_inputs\[1\] is of type int, not a tensor"),
        ({"x": torch.randn(2, 8)}, "must be a tuple of tensors, got dict"),
    ],
)
def test_capture_names_a_malformed_example(example, message):
    with pytest.raises(qgraph.InputError, match=message):
        qgraph.capture(nn.Linear(8, 4), example)


def test_capture_with_a_static_batch_takes_what_torch_export_takes():
    class Scaled(nn.Module):
        def forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
            return x * k

    gm = qgraph.capture(Scaled(), (torch.ones(2, 3), 3), dynamic_batch=False)
    assert torch.equal(gm(torch.ones(2, 3), 3), torch.full((2, 3), 3.0))
