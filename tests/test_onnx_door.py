"""The ONNX front door: the passes run on onnx-ir models and give the torch door's plan."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qgraph import PreconditionError, QGraphError, Sequential, capture
from qgraph.backends import onnxruntime as ort_backend
from qgraph.backends import tensorrt
from qgraph.cli import main
from qgraph.examples.zoo import ZOO, make
from qgraph.onnx_graph import load_onnx_model, serialize
from qgraph.passes import PASSES, Annotate, Calibrate, FoldBatchNorm, InsertFakeQuant, InsertObservers, InsertQDQ
from qgraph.pipeline import build_pipeline
from qgraph.verify import verify

_TMP = Path(tempfile.mkdtemp(prefix="qgraph-onnx-door-"))


def _calib(name: str) -> list[torch.Tensor]:
    _, x = make(name)
    g = torch.Generator().manual_seed(7)
    return [torch.randn(16, *x.shape[1:], generator=g) for _ in range(4)]


def _pipeline(calib, calibrator: str = "max", rules=tensorrt.INT8, spec: str = "") -> Sequential:  # noqa: ANN001
    """The explicit PTQ passes, or a pipeline spec (a backend's default) with the same context."""
    if spec:
        return build_pipeline(spec.format(calibrator=calibrator), PASSES, context={"rules": rules, "data": calib})
    return Sequential([FoldBatchNorm(), Annotate(rules), InsertObservers(calibrator), Calibrate(calib), InsertQDQ()])


@functools.cache
def exported(name: str) -> Path:
    """The zoo model as float ONNX, written by torch.onnx (dynamo exporter, dynamic batch)."""
    model, x = make(name)
    path = _TMP / f"{name}.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(
            model, (x,), dynamo=True, external_data=False, dynamic_shapes=({0: torch.export.Dim.AUTO},)
        ).save(str(path))
    return path


@functools.cache
def both_doors(name: str, calibrator: str = "max", spec: str = "") -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(torch door, ONNX door) TensorRT INT8 lowerings of one zoo model, same data and calibrator."""
    model, x = make(name)
    calib = _calib(name)
    gm = capture(model, (x,))
    _pipeline(calib, calibrator, spec=spec)(gm)
    via_torch = onnx.load_from_string(tensorrt.lower(gm, (calib[0],)))
    m = load_onnx_model(exported(name))
    _pipeline(calib, calibrator, spec=spec)(m)
    return via_torch, onnx.load_from_string(tensorrt.lower_onnx(m))


def _quantized(proto: onnx.ModelProto) -> tuple[dict[str, float], list[np.ndarray], dict[str, int]]:
    """(activation tensor name → scale, weight scale arrays, Q/DQ census) of a QDQ model."""
    init = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    acts = {n.input[0]: float(init[n.input[1]]) for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    weights = [init[n.input[1]] for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in init]
    census = {op: sum(n.op_type == op for n in proto.graph.node) for op in ("QuantizeLinear", "DequantizeLinear")}
    return acts, weights, census


@pytest.mark.parametrize(
    "name, calibrator, spec",
    [(n, "max", "") for n in sorted(ZOO)]
    + [("rescnn", "entropy", ""), ("transformer", "mse", ""), ("transformer", "max", tensorrt.DEFAULT_PIPELINE)],
)
def test_same_plan_from_both_doors(name, calibrator, spec):
    """Lowering a torch model and lowering its float ONNX export give the same Q/DQ placement and
    scales equal to float rounding.

    Activations are mapped by tensor name where the two exports name them alike; torch.onnx names
    a few values differently in the two exports (the torch door exports the captured graph with
    BatchNorm already folded, and numbers its nodes differently), so every scale is also matched
    as a multiset. Weights are matched as a multiset of per-channel scale vectors. The last case
    runs TensorRT's default pipeline (SmoothQuant on LayerNorm and GELU outputs first) on both.
    """
    via_torch, via_onnx = both_doors(name, calibrator, spec)
    acts_t, weights_t, census_t = _quantized(via_torch)
    acts_o, weights_o, census_o = _quantized(via_onnx)
    assert census_t == census_o
    shared = set(acts_t) & set(acts_o)
    assert len(shared) >= 0.75 * len(acts_t), (sorted(acts_t), sorted(acts_o))
    for tensor in shared:
        assert acts_o[tensor] == pytest.approx(acts_t[tensor], rel=1e-5), tensor
    np.testing.assert_allclose(sorted(acts_t.values()), sorted(acts_o.values()), rtol=1e-5)
    key = lambda w: (w.shape, tuple(np.round(w.reshape(-1)[:4], 6)))  # noqa: E731
    assert len(weights_t) == len(weights_o) > 0
    for a, b in zip(sorted(weights_t, key=key), sorted(weights_o, key=key)):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    report = tensorrt.inspect_model(via_onnx)
    assert report.violations == [] and report.quantized_weighted == len(report.weighted)


def _run(proto_or_bytes, x: np.ndarray) -> np.ndarray:  # noqa: ANN001
    data = proto_or_bytes if isinstance(proto_or_bytes, bytes) else proto_or_bytes.SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_both_doors_compute_the_same_outputs(name):
    """Same plan, same numbers: the two lowerings agree to float rounding in onnxruntime
    (up to rare one-step rounding flips where float summation order differs: ≤ 1% of the range)."""
    via_torch, via_onnx = both_doors(name)
    x = torch.cat(_calib(name)).numpy()
    a, b = _run(via_torch, x), _run(via_onnx, x)
    assert np.abs(a - b).max() <= 0.01 * np.abs(a).max()


def test_passes_on_onnx_are_idempotent_and_verified():
    m = load_onnx_model(exported("rescnn"))
    first = _pipeline(_calib("rescnn"))(m)
    assert first.modified and first.counts["insert-qdq.activations"] > 0
    verify(m)
    before = serialize(m)
    again = _pipeline(_calib("rescnn"))(m)
    assert not again.modified, again.counts
    assert serialize(m) == before


@pytest.mark.parametrize("name", ["rescnn", "transformer"])
def test_shapes_inferred_on_the_proto_equal_the_onnx_ir_pass(name, monkeypatch):
    """Small models get their shapes inferred on the proto as read, big inline ones (the limit
    lowered to 0 here) by onnx-ir's pass after normalisation: the same shapes and dtypes."""
    import qgraph.onnx_graph as og

    def shapes(model) -> dict:  # noqa: ANN001
        values = [v for n in model.graph for v in n.outputs] + list(model.graph.inputs)
        return {v.name: (v.dtype, None if v.shape is None else tuple(str(d) for d in v.shape)) for v in values}

    from_proto = shapes(og.load_onnx_model(exported(name)))
    monkeypatch.setattr(og, "_INFER_PROTO_LIMIT", 0)
    from_pass = shapes(og.load_onnx_model(exported(name)))
    assert from_proto == from_pass
    assert sum(shape is not None for _, shape in from_proto.values()) == len(from_proto)


def test_torch_only_passes_refuse_onnx_models():
    m = load_onnx_model(exported("transformer"))
    with pytest.raises(PreconditionError, match="insert-fake-quant runs on torch graphs only"):
        InsertFakeQuant()(m)


def test_calibration_feeds_the_same_observers():
    """The ONNX door's observers see what the torch door's see: equal amax per tensor, and a batch
    count equal to the number of batches (each batch streamed once, run by run)."""
    from qgraph.onnx_graph import OBSERVERS_META

    calib = _calib("mlp")
    m = load_onnx_model(exported("mlp"))
    Sequential([Annotate(tensorrt.INT8), InsertObservers("max"), Calibrate(calib, run_bytes=0)])(m)
    observers = m.graph.meta[OBSERVERS_META]
    assert {o.batches for o in observers.values()} == {len(calib)}
    x = observers[("x", tensorrt.INT8.activation)]
    assert x.amax() == pytest.approx(float(torch.cat(calib).abs().max()), rel=1e-6)


@pytest.mark.parametrize("name", ["rescnn", "transformer"])
def test_batches_run_together_give_the_same_histograms(name):
    """Batches concatenated into fewer onnxruntime runs (run_bytes) leave every observer with the
    histogram of running them one by one: same counts, bin width and max."""
    from qgraph.onnx_graph import OBSERVERS_META

    calib = _calib(name)
    hists = {}
    for run_bytes in (0, 64 << 20):
        m = load_onnx_model(exported(name))
        Sequential([Annotate(tensorrt.INT8), InsertObservers("entropy"), Calibrate(calib, run_bytes=run_bytes)])(m)
        observers = m.graph.meta[OBSERVERS_META]
        hists[run_bytes] = {key: (o.hist.state(), o.hist.amax, o.hist.total, o.batches) for key, o in observers.items()}
    alone, together = hists[0], hists[64 << 20]
    assert alone.keys() == together.keys() and alone
    for key in alone:
        (c0, w0), amax0, total0, batches0 = alone[key]
        (c1, w1), amax1, total1, batches1 = together[key]
        assert (w0, amax0, total0) == (w1, amax1, total1), key
        np.testing.assert_array_equal(c0, c1)
        # static shapes after the batch axis: the bytes per sample are known, one run for all
        assert (batches0, batches1) == (len(calib), 1), key


def _matmul_model(path: Path, inputs: dict[str, list], reshape: list[int] | None = None) -> Path:
    """``MatMul(input, W)`` per input (W: 8 x 4), the first input optionally through a Reshape."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32), "W")
    nodes, outputs, inits = [], [], [w]
    for i, name in enumerate(inputs):
        src = name
        if reshape is not None and i == 0:
            inits.append(numpy_helper.from_array(np.array(reshape, np.int64), "shape"))
            nodes.append(helper.make_node("Reshape", [name, "shape"], ["reshaped"]))
            src = "reshaped"
        nodes.append(helper.make_node("MatMul", [src, "W"], [f"{name}_y"]))
        shape = [*(reshape if src == "reshaped" else inputs[name])[:-1], 4]
        outputs.append(helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, shape))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
                              outputs, inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _runs(path: Path, calib, observed: str = "x", **kwargs) -> int:  # noqa: ANN001
    """How many onnxruntime runs the observer of ``observed`` saw (it checks the max, too)."""
    from qgraph.onnx_graph import OBSERVERS_META

    m = load_onnx_model(path)
    Sequential([Annotate(tensorrt.INT8), InsertObservers("max"), Calibrate(calib, **kwargs)])(m)
    observer = next(o for (name, _), o in m.graph.meta[OBSERVERS_META].items() if name == observed)
    tensors = [c[0] if isinstance(c, tuple) else c for c in calib]
    assert observer.amax() == pytest.approx(max(float(c.abs().max()) for c in tensors if c.numel()), rel=1e-6)
    return observer.batches


def test_batches_of_other_shapes_run_apart(tmp_path):
    """Shapes symbolic after axis 0: each new shape's first batch runs alone (it measures the bytes
    per sample of that shape); only batches of one shape run together."""
    path = _matmul_model(tmp_path / "seq.onnx", {"x": ["N", "T", 8]})
    g = torch.Generator().manual_seed(3)
    calib = [torch.randn(4, t, 8, generator=g) for t in (5, 5, 5, 3, 3, 5)]
    assert _runs(path, calib) == 5  # [0] measures, [1, 2], [3] measures length 3, [4], [5]
    assert _runs(path, calib, run_bytes=0) == 6  # run_bytes=0: every batch alone


def test_run_bytes_bound_holds_after_an_empty_batch(tmp_path):
    """An empty first batch measures nothing; the next one measures, and runs stay in budget."""
    path = _matmul_model(tmp_path / "seq.onnx", {"x": ["N", "T", 8]})
    g = torch.Generator().manual_seed(3)
    calib = [torch.zeros(0, 5, 8)] + [torch.randn(1, 5, 8, generator=g) for _ in range(6)]
    # x is 5 * 8 float32 = 160 bytes a sample: 320 bytes hold two samples
    assert _runs(path, calib, run_bytes=320) == 5  # [empty], [1] measures, [2, 3], [4, 5], [6]


def test_model_with_a_fixed_batch_inside_runs_batch_by_batch(tmp_path):
    """A Reshape that hard-codes the batch size fails on joined batches: calibration goes on one
    batch at a time, with the same statistics."""
    path = _matmul_model(tmp_path / "fixed.onnx", {"x": ["N", 8]}, reshape=[4, 8])
    g = torch.Generator().manual_seed(3)
    calib = [torch.randn(4, 8, generator=g) for _ in range(3)]
    assert _runs(path, calib, observed="reshaped") == 3


def test_batch_missing_an_input_is_a_clean_error(tmp_path):
    path = _matmul_model(tmp_path / "two.onnx", {"x": ["N", 8], "z": ["N", 8]})
    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)), (torch.randn(4, 8, generator=g),)]
    with pytest.raises(QGraphError, match="calibration batch 1"):
        _runs(path, calib)


def test_unnamed_nodes_are_named_by_op_type_for_overrides(tmp_path):
    """Nodes without names (hand-built or older exporters) get their op type as name at load, so
    an override pattern can select them."""
    path = _matmul_model(tmp_path / "unnamed.onnx", {"x": ["N", 8], "z": ["N", 8]})
    assert all(not n.name for n in onnx.load(str(path)).graph.node)
    m = load_onnx_model(path)
    assert [n.name for n in m.graph] == ["MatMul", "MatMul_1"]
    result = Annotate(tensorrt.INT8, overrides=[("MatMul_1", None)])(m)
    assert result.counts == {"quantized": 1, "float": 1}, result.counts
    result = Annotate(tensorrt.INT8, overrides=[("@node:MatMul", None)])(m)  # that node only
    assert result.counts == {"quantized": 1, "float": 1}, result.counts
    assert [bool(n.meta.get("qgraph.quant")) for n in m.graph] == [False, True]


@pytest.mark.parametrize("axes", [("N", "M"), (None, None)])
def test_inputs_without_one_named_batch_axis_run_batch_by_batch(tmp_path, axes):
    """Inputs whose axis 0 are different (or unnamed) symbols may not be independent samples."""
    path = _matmul_model(tmp_path / "two.onnx", {"x": [axes[0], 8], "z": [axes[1], 8]})
    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)) for _ in range(3)]
    assert _runs(path, calib) == 3


def test_onnxruntime_backend_from_onnx_fuses_every_weighted_op(tmp_path):
    calib = _calib("rescnn")
    m = load_onnx_model(exported("rescnn"))
    _pipeline(calib, rules=ort_backend.INT8)(m)
    data = ort_backend.lower_onnx(m)
    report = ort_backend.inspect_model(onnx.load_from_string(data))
    assert report.quantized_weighted == len(report.weighted) == 7, report.summary()
    x = torch.cat(calib).numpy()
    float_y = _run(exported("rescnn").read_bytes(), x)
    assert np.abs(_run(data, x) - float_y).max() <= 0.05 * np.abs(float_y).max()


# --- models in the wild: legacy opsets, unknown ops, external data ---------------------------------


def _npz(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "calib.npz"
    np.savez(path, **arrays)
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("opset", [11, 12])
def test_legacy_export_with_unfolded_batchnorm(tmp_path, capsys, opset):
    """A TorchScript-exporter model at opset 11/12 with BatchNormalization nodes and a fixed batch:
    BN is folded on the ONNX graph, the opset raised to 13, every weighted op quantized."""
    model, x = make("rescnn")
    path = tmp_path / "legacy.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, do_constant_folding=False,
                          input_names=["x"])
    assert sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node) == 6
    calib = _npz(tmp_path, x=np.random.default_rng(0).standard_normal((32, 3, 16, 16)).astype(np.float32))
    out = tmp_path / "o.onnx"
    before = _digest(path)
    assert main(["lower", str(path), "-o", str(out), "--calib", str(calib)]) == 0
    printed = capsys.readouterr().out
    assert "folded 6 BatchNorms" in printed and "tensorrt rules: OK (7/7" in printed, printed
    lowered = onnx.load(str(out))
    assert lowered.opset_import[0].version == 13 and not any(n.op_type == "BatchNormalization" for n in lowered.graph.node)
    assert _digest(path) == before
    y = _run(lowered, x.numpy())
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(y - want).max() <= 0.05 * np.abs(want).max()


def _mlp_with(tmp_path: Path, middle: list[onnx.NodeProto], opsets=(("", 17),)) -> Path:  # noqa: ANN001
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("W1", (8, 16)), ("b1", (16,)), ("W2", (16, 4)))]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h"]),
             *middle, helper.make_node("MatMul", ["g", "W2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    path = tmp_path / "mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets]), str(path))
    return path


@pytest.mark.parametrize("backend", ["tensorrt", "onnxruntime"])
def test_unknown_and_contrib_ops_stay_float(tmp_path, capsys, backend):
    """Ops qgraph has no rule for — a standard one (Softplus) and a contrib op (com.microsoft
    FastGelu) — stay float and are listed; the GEMMs around them are quantized."""
    path = _mlp_with(tmp_path, [helper.make_node("FastGelu", ["h"], ["s"], domain="com.microsoft"),
                                helper.make_node("Softplus", ["s"], ["g"])], opsets=(("", 17), ("com.microsoft", 1)))
    calib = _npz(tmp_path, x=np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32))
    out = tmp_path / "o.onnx"
    assert main(["lower", str(path), "-o", str(out), "--calib", str(calib), "--backend", backend]) == 0
    printed = capsys.readouterr().out
    assert "quantized (2 ops): MatMul×2" in printed, printed
    assert f"Softplus×1: no rule for it ({backend} int8)" in printed
    assert "ops qgraph has no rule for (1): com.microsoft::FastGelu×1" in printed
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "FastGelu" in ops and "Softplus" in ops


def test_external_data_model_lowers_and_repeats_byte_identically(tmp_path, capsys):
    """A model whose weights live in an external-data file (how models over 2 GB are stored)."""
    src = onnx.load(str(exported("mlp")))
    path = tmp_path / "ext" / "mlp.onnx"
    path.parent.mkdir()
    onnx.save_model(src, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="mlp.weights", size_threshold=0)
    assert (path.parent / "mlp.weights").stat().st_size > 0
    digests = {p.name: _digest(p) for p in path.parent.iterdir()}
    calib = _npz(tmp_path, x=np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32))
    outs = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for out in outs:
        assert main(["lower", str(path), "-o", str(out), "--calib", str(calib), "-q"]) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert {p.name: _digest(p) for p in path.parent.iterdir()} == digests, "the input model must not change"
    assert tensorrt.inspect_model(onnx.load(str(outs[0]))).violations == []


def _bad(tmp_path: Path, model: Path, calib: Path, capsys, *extra: str) -> str:  # noqa: ANN001
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir(exist_ok=True)
    assert main(["lower", str(model), "-o", str(out), "-q", "--calib", str(calib), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qgraph: error: ") and err.count("\n") == 1, err
    assert list(out.parent.iterdir()) == []
    return err


def test_bad_onnx_inputs(tmp_path, capsys):
    calib = _npz(tmp_path, x=np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32))
    old = _mlp_with(tmp_path, [helper.make_node("Relu", ["h"], ["g"])], opsets=(("", 9),))
    assert "opset 9 is below 11" in _bad(tmp_path, old, calib, capsys)
    wrong = _npz(tmp_path, x=np.ones((16, 5), np.float32))
    good = _mlp_with(tmp_path, [helper.make_node("Relu", ["h"], ["g"])])
    assert "the model expects (N, 8)" in _bad(tmp_path, good, wrong, capsys)


def test_float16_model(tmp_path, capsys):
    """A float16 model: its Q/DQ scales are float16 (one type with x), at opset 19 or above."""
    model, x = make("mlp")
    path = tmp_path / "mlp16.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(model.half(), (x.half(),), dynamo=True, external_data=False,
                          dynamic_shapes=({0: torch.export.Dim.AUTO},)).save(str(path))
    calib = _npz(tmp_path, x=np.random.default_rng(0).standard_normal((32, 64)).astype(np.float16))
    out = tmp_path / "o.onnx"
    assert main(["lower", str(path), "-o", str(out), "--calib", str(calib)]) == 0
    assert "tensorrt rules: OK (3/3" in capsys.readouterr().out
    lowered = onnx.load(str(out))
    assert lowered.opset_import[0].version >= 19
    scales = [i for i in lowered.graph.initializer if i.name.endswith("_scale")]
    assert scales and {s.data_type for s in scales} == {TensorProto.FLOAT16}
    xs = x.half().numpy()
    with torch.no_grad():
        want = model(x.half()).float().numpy()
    assert np.abs(_run(lowered, xs).astype(np.float32) - want).max() <= 0.05 * np.abs(want).max()


# --- cases found in review -------------------------------------------------------------------------


def test_float16_transformer_with_smoothing(tmp_path, capsys):
    """TensorRT's default pipeline (smooth-quant on LayerNorm and GELU) keeps a float16 graph float16."""
    model, x = make("transformer")
    path = tmp_path / "tf16.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(model.half(), (x.half(),), dynamo=True, external_data=False,
                          dynamic_shapes=({0: torch.export.Dim.AUTO},)).save(str(path))
    calib = _npz(tmp_path, x=np.random.default_rng(0).standard_normal((32, *x.shape[1:])).astype(np.float16))
    out = tmp_path / "o.onnx"
    assert main(["lower", str(path), "-o", str(out), "--calib", str(calib), "--calibrator", "percentile"]) == 0
    printed = capsys.readouterr().out
    assert "smooth-quant(alpha=0.8,gelu=true)" in printed and "tensorrt rules: OK (6/6" in printed, printed
    with torch.no_grad():
        want = model(x.half()).float().numpy()
    got = _run(onnx.load(str(out)), x.half().numpy()).astype(np.float32)
    assert np.abs(got - want).max() <= 0.1 * np.abs(want).max()


def test_legacy_export_without_constant_folding_keeps_weights_constant(tmp_path, capsys):
    """TorchScript exports without constant folding write nn.Linear as MatMul(x, Transpose(W)):
    the transpose is folded at load, so the weights get per-channel weight quantizers."""
    model, x = make("transformer")
    path = tmp_path / "tf.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, do_constant_folding=False, input_names=["x"])
    calib = _npz(tmp_path, x=np.random.default_rng(0).standard_normal((32, *x.shape[1:])).astype(np.float32))
    out = tmp_path / "o.onnx"
    assert main(["lower", str(path), "-o", str(out), "--calib", str(calib), "-q"]) == 0
    lowered = onnx.load(str(out))
    inits = {i.name for i in lowered.graph.initializer}
    weight_dqs = [n for n in lowered.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(weight_dqs) == 4  # qkv, proj, fc1, fc2: per-channel weights, not activation Q/DQ
    assert tensorrt.inspect_model(lowered).violations == []


def test_deep_residual_stack_plans_without_recursion():
    """300 residual blocks: the planner's look-ahead does not recurse through the chain."""
    from onnx_ir.serde import deserialize_model

    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for k in range(300):
        inits.append(numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), f"W{k}"))
        nodes += [helper.make_node("MatMul", [prev, f"W{k}"], [f"h{k}"]), helper.make_node("Add", [prev, f"h{k}"], [f"x{k}"])]
        prev = f"x{k}"
    inits.append(numpy_helper.from_array(np.ones((8, 2), np.float32), "Wout"))
    nodes.append(helper.make_node("MatMul", [prev, "Wout"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], inits)
    m = deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert Annotate(tensorrt.INT8)(m).counts["quantized"] == 601  # every MatMul and residual Add


def test_a_tensor_under_two_specs_gets_distinct_names(tmp_path, capsys):
    """h is read in int8 by one MatMul and in fp8 by another (an override): two Q/DQ pairs."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), f"W{i}") for i in range(3)]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W0"], ["h"], name="mm0"), helper.make_node("MatMul", ["h", "W1"], ["a"], name="mm1"),
         helper.make_node("MatMul", ["h", "W2"], ["b"], name="mm2"), helper.make_node("Add", ["a", "b"], ["y"], name="add")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])], inits)
    path = tmp_path / "two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    calib = _npz(tmp_path, x=rng.standard_normal((32, 16)).astype(np.float32))
    out = tmp_path / "o.onnx"
    assert main(["lower", str(path), "-o", str(out), "--calib", str(calib), "-q", "--override", "mm2=fp8"]) == 0
    lowered = onnx.load(str(out))
    assert sum(n.op_type == "QuantizeLinear" and n.input[0] == "h" for n in lowered.graph.node) == 2
    names = [o for n in lowered.graph.node for o in n.output]
    assert len(names) == len(set(names))


def test_upgrading_a_model_whose_weights_stay_on_disk(tmp_path, monkeypatch):
    """A model too big to read in (the limit lowered to 0 here) keeps finding its external weights
    after the opset is raised."""
    import qgraph.onnx_graph as og

    monkeypatch.setattr(og, "_INLINE_LIMIT", 0)
    w = numpy_helper.from_array(np.arange(32, dtype=np.float32).reshape(8, 4), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w])
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)]), str(folder / "m.onnx"),
                    save_as_external_data=True, location="m.data", size_threshold=0)
    monkeypatch.chdir(tmp_path)  # not the model's folder
    upgraded = og.upgrade_opset(og.load_onnx_model(folder / "m.onnx"), 13)
    np.testing.assert_array_equal(upgraded.graph.initializers["W"].const_value.numpy(), numpy_helper.to_array(w))


def test_unnamed_ops_are_named_by_type_in_messages(tmp_path, capsys):
    """An unnamed node gets its op type as name at load (NameFixPass), so messages can name it."""
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "x2"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                               helper.make_tensor_value_info("x2", TensorProto.FLOAT, [4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(np.ones(4, np.float32), "b")])
    path = tmp_path / "anon.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    calib = _npz(tmp_path, x=np.ones((4, 4), np.float32), x2=np.ones((4, 4), np.float32))
    err = _bad(tmp_path, path, calib, capsys, "--backend", "onnxruntime")
    assert "the plan quantizes nothing (MatMul: " in err
