"""auto-precision: census, numerics (its errors are what PTQ of each plan measures; the plan
beats every one-layer upgrade within the budget), idempotence, near misses, verifier and lowering."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
import torch.nn.functional as F

import qgraph
from qgraph import PreconditionError, QGraphError, Sequential
from qgraph.backends import tensorrt
from qgraph.examples.zoo import make
from qgraph.parity import check_parity
from qgraph.passes import PASSES, Annotate, AutoPrecision, Calibrate, InsertObservers, InsertQDQ
from qgraph.passes.auto_precision import AUTO_PRECISION_META, weight_bits
from qgraph.passes._util import QUANT_META

CANDIDATES = [tensorrt.NVFP4, tensorrt.FP8]


def _float(name: str = "transformer"):
    model, x = make(name)
    gm = qgraph.capture(model, (x,))
    g = torch.Generator().manual_seed(2)
    return gm, [torch.randn(8, *x.shape[1:], generator=g) for _ in range(3)]


def _weight_specs(gm) -> dict[str, object]:
    return {n.name: s for n in gm.graph.nodes for s in n.meta.get(QUANT_META, {}).values() if s.role == "weight"}


def _ptq_error(gm, data, overrides, metric="mse") -> float:
    """PTQ of ``gm`` in NVFP4 with ``overrides`` (node name → FP8), scored as the pass documents,
    built from the public passes alone."""
    with torch.no_grad():
        return _measured(gm, data, overrides, metric)


def _measured(gm, data, overrides, metric) -> float:
    ref = [gm(x) for x in data]
    q = copy.deepcopy(gm)
    plan = [(name, tensorrt.FP8) for name in overrides]
    Sequential([Annotate(tensorrt.NVFP4, plan, fallback=True), InsertObservers(), Calibrate(data), InsertQDQ()])(q)
    out = [q(x) for x in data]
    if metric == "kl":
        kl = sum(F.kl_div(F.log_softmax(o.double(), -1), F.log_softmax(r.double(), -1), log_target=True,
                          reduction="sum") for o, r in zip(out, ref))
        return float(kl) / sum(r.numel() / r.shape[-1] for r in ref)
    return float(sum((o.double() - r.double()).square().sum() for o, r in zip(out, ref))
                 / sum(r.double().square().sum() for r in ref))


def test_census_upgrades_within_the_budget():
    gm, data = _float()
    result = AutoPrecision(CANDIDATES, data, effective_bits=6.0, fallback=True)(gm)
    specs = _weight_specs(gm)
    fp8 = [n for n, s in specs.items() if s.dtype == "fp8_e4m3"]
    assert result.modified and result.counts["upgraded"] == len(fp8) == 2
    assert {s.dtype for n, s in specs.items() if n not in fp8} == {"fp4_e2m1"}
    meta = gm.meta[AUTO_PRECISION_META]
    sizes = {n: layer["weights"] for n, layer in meta["layers"].items()}
    mean_bits = sum(weight_bits(specs[n]) * sizes[n] for n in sizes) / sum(sizes.values())
    assert meta["effective_bits"] == pytest.approx(mean_bits) and 4.5 < mean_bits <= 6.0
    assert {n for n, layer in meta["layers"].items() if layer["recipe"] == "fp8"} == set(fp8)


def test_numerics_errors_are_measured_ptq_and_the_plan_beats_one_layer_upgrades():
    gm, data = _float()
    plain = copy.deepcopy(gm)
    AutoPrecision(CANDIDATES, data, effective_bits=6.0, fallback=True)(gm)
    meta = gm.meta[AUTO_PRECISION_META]
    chosen = [n for n, layer in meta["layers"].items() if layer["recipe"] == "fp8"]
    assert meta["base_error"] == pytest.approx(_ptq_error(plain, data, []), rel=1e-9)
    assert meta["error"] == pytest.approx(_ptq_error(plain, data, chosen), rel=1e-9)
    for name in meta["layers"]:  # each gain is the one-layer upgrade's measured improvement
        alone = _ptq_error(plain, data, [name])
        assert meta["layers"][name]["gains"]["fp8"] == pytest.approx(meta["base_error"] - alone, rel=1e-6, abs=1e-12)
        assert meta["error"] <= alone
    assert meta["error"] < 0.7 * meta["base_error"]  # two of four layers in FP8 (measured: 0.56×)


def test_numerics_kl_metric_on_logits():
    gm, data = _float("mlp")
    plain = copy.deepcopy(gm)
    AutoPrecision(CANDIDATES, data, effective_bits=8.0, metric="kl", fallback=True)(gm)
    meta = gm.meta[AUTO_PRECISION_META]
    assert meta["base_error"] == pytest.approx(_ptq_error(plain, data, [], "kl"), rel=1e-9)
    upgraded = [n for n, layer in meta["layers"].items() if layer["recipe"] == "fp8"]
    # a budget for everything takes every upgrade that helps
    assert upgraded == [n for n, layer in meta["layers"].items() if layer["gains"]["fp8"] > 0]
    assert meta["error"] < meta["base_error"]


def test_idempotent_and_the_float_weights_untouched():
    gm, data = _float()
    weights = {k: v.clone() for k, v in gm.state_dict().items()}
    AutoPrecision(CANDIDATES, data, effective_bits=6.0, fallback=True)(gm)
    before = {n.name: dict(n.meta.get(QUANT_META, {})) for n in gm.graph.nodes}
    again = AutoPrecision(CANDIDATES, iter(data), effective_bits=6.0, fallback=True)(gm)  # any iterable
    assert not again.modified and again.counts["upgraded"] == 0
    assert {n.name: dict(n.meta.get(QUANT_META, {})) for n in gm.graph.nodes} == before
    assert all(torch.equal(v, weights[k]) for k, v in gm.state_dict().items())  # trials ran on copies


def test_negative_no_room_no_upgrade_and_bad_input():
    gm, data = _float()
    plain = copy.deepcopy(gm)
    result = AutoPrecision(CANDIDATES, data, effective_bits=4.5, fallback=True)(gm)
    Annotate(tensorrt.NVFP4, fallback=True)(plain)
    assert result.counts["upgraded"] == 0
    assert [dict(n.meta.get(QUANT_META, {})) for n in gm.graph.nodes] == [
        dict(n.meta.get(QUANT_META, {})) for n in plain.graph.nodes
    ]  # the base recipe's own plan
    fresh, _ = _float()
    with pytest.raises(PreconditionError, match=r"effective_bits 4\.2 is below the base recipe's own 4\.5 bits"):
        AutoPrecision(CANDIDATES, data, effective_bits=4.2, fallback=True)(fresh)
    with pytest.raises(PreconditionError, match="run it instead of `annotate`"):
        AutoPrecision(CANDIDATES, data, effective_bits=6.0)(plain)
    with pytest.raises(PreconditionError, match="planned by auto-precision with .* plan a fresh capture"):
        AutoPrecision(CANDIDATES, data, effective_bits=8.0, fallback=True)(gm)  # other settings
    linear = qgraph.capture(torch.nn.Linear(32, 32, bias=False).eval(), (torch.randn(4, 32),))
    with pytest.raises(QGraphError, match="zero on every batch: mse has no scale"):
        AutoPrecision(CANDIDATES, [torch.zeros(4, 32)], effective_bits=6.0, fallback=True)(linear)
    with pytest.raises(QGraphError, match="the float model failed on the data: .*shapes cannot be multiplied"):
        AutoPrecision(CANDIDATES, [torch.randn(4, 16)], effective_bits=6.0, fallback=True)(linear)
    with pytest.raises(QGraphError, match="metric 'kl' needs logits"):
        AutoPrecision(CANDIDATES, [torch.zeros(4, 1)], effective_bits=6.0, metric="kl")(
            qgraph.capture(torch.nn.Linear(1, 1).eval(), (torch.randn(4, 1),)))
    with pytest.raises(PreconditionError, match="nothing to upgrade"):  # FP8 is no wider than INT8
        AutoPrecision([tensorrt.INT8, tensorrt.FP8], data, effective_bits=8.0, fallback=True)(fresh)
    with pytest.raises(PreconditionError, match="upgrade must name recipes"):
        AutoPrecision(data=data, effective_bits=6.0, upgrade=8)
    with pytest.raises(PreconditionError, match="at least two candidate recipes"):
        AutoPrecision([tensorrt.NVFP4], data, effective_bits=6.0)
    with pytest.raises(PreconditionError, match="effective_bits must be a positive number"):
        AutoPrecision(CANDIDATES, data, effective_bits=True)
    with pytest.raises(PreconditionError, match="metric must be"):
        AutoPrecision(CANDIDATES, data, effective_bits=6.0, metric="cosine")
    with pytest.raises(PreconditionError, match="at least two candidate"):
        PASSES["auto-precision"]()  # a spec without upgrade= names no recipe
    with pytest.raises(PreconditionError, match="outside `qgraph lower` pass candidates"):
        AutoPrecision(data=data, effective_bits=6.0, upgrade="fp8")
    with pytest.raises(PreconditionError, match="candidates or upgrade, not both"):
        AutoPrecision(CANDIDATES, data, effective_bits=6.0, upgrade="fp8", rules=tensorrt.NVFP4, recipes=tensorrt.RULES)
    spec = AutoPrecision(data=data, effective_bits=6.0, upgrade="fp8+int8", rules=tensorrt.NVFP4, recipes=tensorrt.RULES)
    assert spec.candidates == (tensorrt.NVFP4, tensorrt.FP8, tensorrt.INT8)


def test_verifier_and_lowering_of_the_mixed_plan():
    gm, data = _float()
    AutoPrecision(CANDIDATES, data, effective_bits=6.0, fallback=True)(gm)
    Sequential([InsertObservers(), Calibrate(data), InsertQDQ()])(gm)
    qgraph.verify(gm)
    onnx_bytes = tensorrt.lower(gm, (data[1],), form="reference")
    report = check_parity(gm, onnx_bytes, (data[1],))
    assert report.max_relative <= 0.01, report.summary()
    deployed = onnx.load_from_string(tensorrt.lower(gm, (data[1],)))
    assert tensorrt.inspect_model(deployed).violations == []
    codes = {i.data_type for i in deployed.graph.initializer if ".weight_quantized" in i.name}
    assert codes == {onnx.TensorProto.FLOAT4E2M1, onnx.TensorProto.FLOAT8E4M3FN}  # both formats deployed


def test_weight_bits_of_the_recipes():
    bits = {r.precision: weight_bits(r.weight) for r in (tensorrt.NVFP4, tensorrt.FP8, tensorrt.INT8, tensorrt.W4A16)}
    assert bits == {"nvfp4": 4.5, "fp8": 8.0, "int8": 8.0, "w4a16": 4.25}
    assert weight_bits(None) == 32.0


def test_a_layer_named_like_another_modules_path_is_upgraded_alone():
    """The plan's overrides name nodes exactly (``@node:``): a layer whose node name is another
    module's path is upgraded without touching that module's ops."""

    class Act(torch.nn.Module):
        def forward(self, x):
            return F.gelu(x)

    class Clash(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.linear, self.last = torch.nn.Linear(32, 32), Act(), torch.nn.Linear(32, 32)

        def forward(self, x):
            return self.last(self.linear(self.first(x)))

    gm = qgraph.capture(Clash().eval(), (torch.randn(4, 32),))
    assert "linear" in {n.name for n in gm.graph.nodes}  # the first module's op, while module `linear` holds the GELU
    data = [torch.randn(4, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    bits = (4.5 * 1024 + 8.0 * 1024) / 2048  # room for exactly one of the two layers
    AutoPrecision(CANDIDATES, data, effective_bits=bits, fallback=True)(gm)
    meta = gm.meta[AUTO_PRECISION_META]
    upgraded = [n for n, layer in meta["layers"].items() if layer["recipe"] == "fp8"]
    assert len(upgraded) == 1
    assert {n for n, s in _weight_specs(gm).items() if s.dtype == "fp8_e4m3"} == set(upgraded)
    gelu = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.gelu.default)
    assert not gelu.meta.get(QUANT_META)  # as in uniform NVFP4: not an op the FP8 override reached


def test_a_budget_sweep_reuses_the_survey_and_plans_as_a_fresh_search():
    gm, data = _float()
    AutoPrecision(CANDIDATES, data, effective_bits=5.0, fallback=True)(gm)
    survey = gm.meta[AUTO_PRECISION_META]
    fresh, _ = _float()
    AutoPrecision(CANDIDATES, data, effective_bits=6.0, fallback=True)(fresh)
    swept, _ = _float()
    scored = []
    measure = AutoPrecision._score
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AutoPrecision, "_score", lambda self, *a: scored.append(a[1]) or measure(self, *a))
        AutoPrecision(CANDIDATES, data, effective_bits=6.0, fallback=True, survey=survey)(swept)
    assert len(scored) == 2  # the base and the plan, no single-layer trial
    got, want = swept.meta[AUTO_PRECISION_META], fresh.meta[AUTO_PRECISION_META]
    assert got["layers"] == want["layers"] and got["error"] == pytest.approx(want["error"], rel=1e-9)
    assert _weight_specs(swept) == _weight_specs(fresh)
    other = [torch.randn_like(x) for x in data]
    with pytest.raises(PreconditionError, match="survey was taken on other data or another model"):
        AutoPrecision(CANDIDATES, other, effective_bits=6.0, fallback=True, survey=survey)(_float()[0])
    with pytest.raises(PreconditionError, match="the survey was measured with .*'metric': 'mse'"):
        AutoPrecision(CANDIDATES, data, effective_bits=6.0, metric="kl", fallback=True, survey=survey)(_float()[0])
    with pytest.raises(PreconditionError, match="the survey's layers are not this graph's"):
        AutoPrecision(CANDIDATES, _float("mlp")[1], effective_bits=6.0, fallback=True, survey=survey)(_float("mlp")[0])
    with pytest.raises(PreconditionError, match="survey must be a plan's record"):
        AutoPrecision(CANDIDATES, data, effective_bits=6.0, survey={"layers": {}})


def test_each_edge_is_calibrated_once(monkeypatch):
    """The base and one uniform calibration per wider candidate observe every edge a trial needs:
    the trials themselves calibrate nothing (and still measure exactly PTQ: the numerics test)."""
    from qgraph.passes.calibrate import Calibrate as CalibratePass

    fresh, call = [], CalibratePass.call

    def counted(self, graph):
        result = call(self, graph)
        fresh.append(result.counts["observers"])
        return result

    monkeypatch.setattr(CalibratePass, "call", counted)
    gm, data = _float()
    AutoPrecision(CANDIDATES, data, effective_bits=6.0, fallback=True)(gm)
    trials = sum(len(layer["gains"]) for layer in gm.meta[AUTO_PRECISION_META]["layers"].values())
    assert len(fresh) == 1 + 1 + trials + 1  # base, FP8's edges, one trial per layer, the plan
    assert fresh[0] > 0 and fresh[1] > 0 and fresh[2:] == [0] * (trials + 1)


def test_trials_copy_no_weight(monkeypatch):
    """Each trial quantizes a graph over the model's own modules and tensors: no deep copy."""
    gm, data = _float()

    def no_deep_copy(*_):
        raise AssertionError("auto-precision deep-copied a GraphModule")

    monkeypatch.setattr(torch.fx.GraphModule, "__deepcopy__", no_deep_copy)
    weights = {k: v.clone() for k, v in gm.state_dict().items()}
    AutoPrecision(CANDIDATES, data, effective_bits=6.0, fallback=True)(gm)
    assert gm.meta[AUTO_PRECISION_META]["layers"]
    assert gm.state_dict().keys() == weights.keys()  # no trial's quantizer left on the model
    assert all(torch.equal(v, weights[k]) for k, v in gm.state_dict().items())


def test_negative_layers_a_candidate_cannot_run_or_that_share_a_weight_are_not_offered_it():
    """MXFP8 blocks of 32 cannot run a 48-wide reduction: that layer keeps NVFP4, the next is
    offered MXFP8; a Linear called twice (one weight, two layers) stays in the base recipe."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.tied = torch.nn.Linear(48, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)

        def forward(self, x):
            return self.tied(self.tied(F.gelu(self.b(F.gelu(self.a(x))))))

    g = torch.Generator().manual_seed(3)
    data = [torch.randn(8, 48, generator=g) for _ in range(2)]
    gm = qgraph.capture(Net().eval(), (data[0],))
    AutoPrecision([tensorrt.NVFP4, tensorrt.MXFP8], data, effective_bits=9.0)(gm)
    layers = gm.meta[AUTO_PRECISION_META]["layers"]
    assert set(layers) == {"linear", "linear_1"}  # the two calls of `tied` are not offered anything
    assert layers["linear"]["gains"] == {} and set(layers["linear_1"]["gains"]) == {"mxfp8"}
    assert layers["linear"]["recipe"] == "nvfp4"
