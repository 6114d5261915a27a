"""gptq: census, numerics (the layer error below round-to-nearest's; the written weights are
their own codes), idempotence, near misses, verifier and lowering."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
from torch import nn

import qgraph
from qgraph import PreconditionError, QGraphError, Sequential, capture
from qgraph.backends import tensorrt
from qgraph.examples.zoo import make
from qgraph.graph import constant_value
from qgraph.parity import check_parity
from qgraph.passes import GPTQ, PASSES, Annotate, Calibrate, InsertFakeQuant, InsertObservers, InsertQDQ
from qgraph.passes.gptq import GPTQ_META, _gptq
from qgraph.pipeline import build_pipeline
from qgraph.quant import FakeQuant, QSpec


class TwoLinears(nn.Module):
    """256 → 256 → 64 with a GELU: wide enough for INT4 blocks of 128."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(256, 256)
        self.fc2 = nn.Linear(256, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def _data(n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    """Correlated inputs (a random mixing of 32 latent factors), as real activations are: GPTQ
    uses the correlation, round-to-nearest ignores it."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(32, 256, generator=torch.Generator().manual_seed(99))
    return [torch.randn(64, 32, generator=g) @ mix + 0.1 * torch.randn(64, 256, generator=g) for _ in range(n)]


def _ptq(recipe: str = "W4A16", data=None):  # noqa: ANN001
    torch.manual_seed(0)
    model = TwoLinears().eval()
    data = data or _data()
    gm = capture(model, (data[0][:4],))
    Sequential([Annotate(getattr(tensorrt, recipe), fallback=True), InsertObservers(), Calibrate(data), InsertQDQ()])(gm)
    return model, gm, data


def _weights(gm) -> dict[str, torch.Tensor]:
    return {n.target: constant_value(gm, n).clone() for n in gm.graph.nodes if n.op == "get_attr" and n.target.endswith("weight")}


def test_census_every_linear_weight_rounded_graph_unchanged():
    _, gm, data = _ptq("INT8")
    code = gm.code
    result = GPTQ(data)(gm)
    assert result.modified and dict(result.counts) == {"weights": 2, "skipped": 0}
    assert gm.code == code  # weights and scales change, the graph does not
    assert gm.meta[GPTQ_META] == {"fq_fc1_weight", "fq_fc2_weight"}


@pytest.mark.parametrize("recipe", ["W4A16", "NVFP4", "INT8", "FP8", "MXFP8"])
def test_written_weights_are_their_own_codes(recipe):
    """The quantizer reproduces the written weights exactly: every lowering exports GPTQ's codes."""
    _, gm, data = _ptq(recipe)
    GPTQ(data)(gm)
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(fq := gm.get_submodule(node.target), FakeQuant) and fq.spec.role == "weight":
            w = constant_value(gm, node.args[0])
            assert torch.equal(fq(w), w), (recipe, node.target)


@pytest.mark.parametrize("recipe", ["W4A16", "NVFP4", "INT8", "FP8", "MXFP8"])
def test_layer_error_below_round_to_nearest(recipe):
    """On held-out inputs from the same distribution, the first layer's output error from its
    weights' rounding is a fraction of round-to-nearest's (measured: 0.07 of it, every recipe:
    the inputs span 32 directions, and GPTQ moves the error out of them)."""
    model, rtn, data = _ptq(recipe)
    gptq = copy.deepcopy(rtn)
    GPTQ(data)(gptq)
    x = _data(1, seed=7)[0]
    w = model.fc1.weight.detach()

    def error(gm) -> float:
        fq = gm.get_submodule("fq_fc1_weight")
        q = fq(constant_value(gm, next(n for n in gm.graph.nodes if n.target == "fc1.weight"))).detach()
        return float(((x @ w.T - x @ q.T) ** 2).mean())

    assert error(gptq) < 0.2 * error(rtn), (error(gptq), error(rtn))


def test_per_tensor_weights():
    """A per-tensor INT8 weight (no recipe plans one): the scale stays, the codes reproduce, the
    layer error drops."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 256, generator=g)
    spec = QSpec(dtype="int8", role="weight")
    fq = FakeQuant.for_weight(spec, w)
    x = torch.cat(_data(2))
    q, scale = _gptq(w, fq, (x.double().T @ x.double()) / x.shape[0], 0.01)
    assert torch.equal(scale, fq.scale) and torch.equal(fq(q), q)
    rtn = fq(w)
    assert float(((x @ (w - q).T) ** 2).mean()) < 0.2 * float(((x @ (w - rtn).T) ** 2).mean())


def test_later_layers_see_inputs_through_the_rounded_ones():
    """fc2 is rounded on fc1's output with fc1 already GPTQ-rounded: redoing fc2 from statistics
    of the final graph gives the written weights exactly (from RTN-fc1 statistics it would not)."""
    model, gm, data = _ptq("W4A16")
    rtn = copy.deepcopy(gm)
    GPTQ(data)(gm)

    def fc2_hessian(graph) -> torch.Tensor:
        quantizer = next(n for n in graph.graph.nodes if n.target == "fq_fc2_weight")
        (linear,) = quantizer.users
        seen = []

        class Grab(torch.fx.Interpreter):
            def run_node(self, n):  # noqa: ANN001, ANN202
                out = super().run_node(n)
                if n is linear.args[0]:
                    seen.append(out.reshape(-1, out.shape[-1]).double())
                return out

        for x in data:
            Grab(graph).run(x)
        x = torch.cat(seen)
        return x.T @ x / x.shape[0]

    fq = copy.deepcopy(rtn.get_submodule("fq_fc2_weight"))
    w = model.fc2.weight.detach()
    written = constant_value(gm, next(n for n in gm.graph.nodes if n.target == "fc2.weight"))
    assert torch.equal(_gptq(w, copy.deepcopy(fq), fc2_hessian(gm), 0.01)[0], written)
    assert not torch.equal(_gptq(w, copy.deepcopy(fq), fc2_hessian(rtn), 0.01)[0], written)


def test_qat_after_gptq_starts_from_its_codes():
    """insert-fake-quant keeps a GPTQ-rounded weight's scales (tracking would recompute them
    from the rounded weights and move saturated codes); other weights still track."""
    _, gm, data = _ptq("INT8")
    GPTQ(data)(gm)
    with torch.no_grad():
        before = gm(data[1])
    InsertFakeQuant()(gm)
    gm.train()
    with torch.no_grad():
        assert torch.equal(gm(data[1]), before)
    assert not any(gm.get_submodule(t).track_weight for t in gm.meta[GPTQ_META])


def test_second_run_is_a_no_op():
    _, gm, data = _ptq()
    GPTQ(data)(gm)
    weights, code = _weights(gm), gm.code
    again = GPTQ(data)(gm)
    assert not again.modified and again.counts["weights"] == 0
    assert gm.code == code and all(torch.equal(w, _weights(gm)[k]) for k, w in weights.items())


class Tied(nn.Module):
    """One weight read by two Linears (tied), and a Conv: neither is GPTQ's to round."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 1)
        self.fc = nn.Linear(64, 64)
        self.out = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x.reshape(-1, 4, 16)).reshape(-1, 64)
        return self.out(self.fc(h) + torch.nn.functional.linear(h, self.fc.weight))


def test_near_misses_left_alone_and_input_model_untouched(caplog):
    torch.manual_seed(0)
    model = Tied().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [torch.randn(16, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    gm = capture(model, (data[0][:4],))
    Sequential([Annotate(tensorrt.INT8), InsertObservers(), Calibrate(data), InsertQDQ()])(gm)
    with caplog.at_level("DEBUG", logger="qgraph.passes.gptq"):
        result = GPTQ(data)(gm)
    # rounded: out; left alone: the conv's weight and the shared fc.weight (read twice)
    assert dict(result.counts) == {"weights": 1, "skipped": 2}
    assert "fq_conv_weight alone: it feeds conv1d (Conv), not a Linear" in caplog.text
    assert "fq_fc_weight alone: the quantized weight has 2 readers (a shared weight)" in caplog.text
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is not the graph


def test_refusals():
    model, x = make("mlp")
    gm = capture(model, (x,))
    with pytest.raises(PreconditionError, match="insert-qdq"):
        GPTQ([x])(gm)
    _, gm, data = _ptq()
    with pytest.raises(QGraphError, match="one-shot iterator"):
        GPTQ(iter(data))(gm)
    with pytest.raises(QGraphError, match="empty"):
        GPTQ([])(gm)
    with pytest.raises(PreconditionError, match="damp"):
        GPTQ(data, damp=0)
    qat = copy.deepcopy(_ptq("INT8")[1])
    InsertFakeQuant()(qat)
    with pytest.raises(PreconditionError, match="insert-fake-quant"):
        GPTQ(data)(qat)


@pytest.mark.parametrize("recipe", ["W4A16", "NVFP4", "INT8"])
def test_verifier_lowering_and_parity(recipe):
    _, gm, data = _ptq(recipe)
    GPTQ(data)(gm)
    qgraph.verify(gm)
    form = "reference" if recipe == "NVFP4" else "deploy"  # onnxruntime has no FP4 kernels
    onnx_bytes = tensorrt.lower(gm, (data[1],), form=form)
    report = check_parity(gm, onnx_bytes, (data[1],))
    assert report.max_relative <= 0.01, report.summary()
    assert tensorrt.inspect_model(onnx.load_from_string(onnx_bytes)).violations == []


def test_in_a_pipeline_spec():
    _, gm, data = _ptq()
    fresh = copy.deepcopy(gm)
    GPTQ(data)(gm)
    pipeline = build_pipeline("gptq(damp=0.01)", PASSES, context={"data": data})
    assert pipeline(fresh).modified
    assert all(torch.equal(w, _weights(gm)[k]) for k, w in _weights(fresh).items())
    assert GPTQ(data, damp=0.05).spec() == "gptq(damp=0.05)"
