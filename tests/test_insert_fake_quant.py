"""insert-fake-quant (QAT): the PTQ graph made trainable — tracked weight scales, frozen or LSQ
activation scales, straight-through gradients — and lowered the same way after training."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import onnx
import pytest
import torch

import qgraph
from qgraph import FakeQuant, PreconditionError, Sequential
from qgraph.backends import tensorrt
from qgraph.examples.zoo import make
from qgraph.graph import get_attr
from qgraph.parity import check_parity
from qgraph.passes import Annotate, Calibrate, InsertFakeQuant, InsertObservers, InsertQDQ


def _calibrated(rules=tensorrt.INT8, name: str = "mlp"):
    model, x = make(name)
    gm = qgraph.capture(model, (x,))
    g = torch.Generator().manual_seed(5)
    data = [torch.randn(16, *x.shape[1:], generator=g) for _ in range(2)]
    Sequential([Annotate(rules), InsertObservers("max"), Calibrate(data)])(gm)
    return gm, data


def _train_classifier(gm, x, g, steps: int = 5) -> None:
    """A few SGD steps of cross-entropy on random labels, then eval mode. SGD, not Adam: Adam's
    ~lr-sized first steps would push a 0.004 activation scale below zero."""
    gm.train()
    opt = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.01)
    target = torch.randint(0, 10, (x.shape[0],), generator=g)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(gm(x), target).backward()
        opt.step()
    gm.eval()


def _quantizers(gm):
    return {name: m for name, m in gm.named_modules() if isinstance(m, FakeQuant)}


def test_census_weights_track_activations_frozen():
    gm, _ = _calibrated()
    result = InsertFakeQuant()(gm)
    assert result.modified
    assert result.counts == {"activations": 3, "weights": 3, "configured": 3, "learnable": 0}
    q = _quantizers(gm)
    assert sorted(m.spec.role for m in q.values() if m.track_weight) == ["weight"] * 3
    assert not any(m.learnable for m in q.values())


def test_numerics_equal_the_ptq_graph_before_training():
    gm, data = _calibrated()
    ptq = copy.deepcopy(gm)
    InsertQDQ()(ptq)
    InsertFakeQuant()(gm)
    with torch.no_grad():
        assert torch.equal(gm(data[0]), ptq(data[0]))  # bit-exact: same scales, same op


def test_idempotent():
    gm, _ = _calibrated()
    InsertFakeQuant(learn_scales=True)(gm)
    before = str(gm.graph)
    again = InsertFakeQuant(learn_scales=True)(gm)
    assert not again.modified and str(gm.graph) == before


def test_negative_needs_calibrated_quantizers_and_leaves_dynamic_block_scales_unlearned():
    model, x = make("mlp")
    with pytest.raises(PreconditionError, match="no quantizers or observers"):
        InsertFakeQuant()(qgraph.capture(model, (x,)))
    gm, _ = _calibrated(tensorrt.NVFP4)
    result = InsertFakeQuant(learn_scales=True)(gm)
    assert result.counts["learnable"] == 0  # NVFP4: dynamic block scales, nothing to learn
    with pytest.raises(PreconditionError, match="observe_steps"):
        InsertFakeQuant(observe_steps=-1)
    with pytest.raises(PreconditionError, match="learn_weight_scales must be true or false, got 'maybe'"):
        InsertFakeQuant(learn_weight_scales="maybe")
    with pytest.raises(PreconditionError, match="exclude each other"):
        InsertFakeQuant(learn_scales=True, observe_steps=2)


def test_verifier_passes():
    gm, _ = _calibrated()
    InsertFakeQuant(observe_steps=2)(gm)
    qgraph.verify(gm)


def test_ste_gradient_is_exactly_zero_outside_the_clipping_range():
    gm, _ = _calibrated()
    InsertFakeQuant()(gm)
    act = next(m for m in _quantizers(gm).values() if m.spec.role == "activation")
    limit = float(act.scale) * 127.5
    x = torch.tensor([-3 * limit, -0.5 * limit, 0.0, 0.9 * limit, 1.01 * limit, 10 * limit], requires_grad=True)
    act(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_lsq_scales_receive_gradients_and_training_lowers_with_parity():
    gm, data = _calibrated()
    InsertFakeQuant(learn_scales=True)(gm)
    gm.train()
    learn = [m for m in _quantizers(gm).values() if m.learnable]
    assert len(learn) == 3
    target = torch.randn(16, 10, generator=torch.Generator().manual_seed(9))
    opt = torch.optim.Adam(gm.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(gm(data[0]), target)
        loss.backward()
        assert all(m.scale.grad is not None and torch.isfinite(m.scale.grad).all() for m in learn)
        assert any(float(m.scale.grad.abs()) > 0 for m in learn)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    gm.eval()
    onnx_bytes = tensorrt.lower(gm, (data[1],))
    # the deployed model is the trained one: weight scales refreshed from the final weights
    report = check_parity(gm, onnx_bytes, (data[1],))
    assert report.max_relative <= 0.01, report.summary()
    assert tensorrt.inspect_model(onnx.load_from_string(onnx_bytes)).violations == []


def test_learned_per_tensor_scale_is_a_vector_that_reads_and_loads_as_a_scalar():
    """FSDP2 shards no 0-d parameter, so a learned per-tensor scale is a one-element vector;
    ``scale_value`` and the lowering see the scalar, and state dicts load across the two forms."""
    gm, data = _calibrated()
    frozen = copy.deepcopy(gm)
    InsertFakeQuant()(frozen)
    InsertFakeQuant(learn_scales=True)(gm)
    act = gm.get_submodule("fq_x")
    assert act.learnable and act.scale.shape == (1,) and act.scale_value().shape == ()
    assert frozen.get_submodule("fq_x").scale.shape == ()
    calibrated = float(act.scale)
    with torch.no_grad():
        act.scale.mul_(1.5)  # as if trained
    assert torch.equal(gm(data[0]), _with_state(copy.deepcopy(frozen), gm.state_dict())(data[0]))
    relearned = copy.deepcopy(gm)
    relearned.load_state_dict(frozen.state_dict())  # a 0-d scale into the one-element parameter
    assert float(relearned.get_submodule("fq_x").scale) == calibrated != float(act.scale)
    model = onnx.load_from_string(tensorrt.lower(gm, (data[1],)))
    scalars = {i.name for i in model.graph.initializer if not i.dims}
    assert {"fq_x.scale", "fq_relu.scale", "fq_relu_1.scale"} <= scalars  # the quantizer's name, a scalar
    assert gm.get_submodule("fq_x").learnable  # lowering froze a copy, not the trained graph


def _with_state(gm, state):
    gm.load_state_dict(state)
    return gm


def test_observe_steps_widen_the_activation_range():
    gm, data = _calibrated()
    InsertFakeQuant(observe_steps=1)(gm)
    gm.train()
    act = _quantizers(gm)["fq_x"]
    before = act.scale.clone()
    with torch.no_grad():
        gm(data[0] * 4)  # a wider batch in the first training step widens the range
        widened = act.scale.clone()
        gm(data[0] * 16)  # observation is over
    assert widened > before and torch.equal(act.scale, widened)


def test_batchnorm_is_folded_before_qat_so_training_matches_the_deployed_model():
    """BN strategy: fold-batchnorm (running statistics frozen) before QAT. The trained graph has
    no BatchNorm, its convs train with their folded weights, and the exported model is it."""
    from qgraph.passes import FoldBatchNorm

    model, x = make("rescnn")
    gm = qgraph.capture(model, (x,))
    g = torch.Generator().manual_seed(4)
    data = [torch.randn(8, *x.shape[1:], generator=g) for _ in range(2)]
    Sequential([FoldBatchNorm(), Annotate(tensorrt.INT8), InsertObservers(), Calibrate(data), InsertFakeQuant()])(gm)
    assert not [n for n in gm.graph.nodes if "batch_norm" in str(n.target)]
    _train_classifier(gm, data[0], g)
    onnx_bytes = tensorrt.lower(gm, (data[1],))
    proto = onnx.load_from_string(onnx_bytes)
    assert "BatchNormalization" not in {n.op_type for n in proto.graph.node}
    report = check_parity(gm, onnx_bytes, (data[1],))
    assert report.max_relative <= 0.02, report.summary()  # conv summation order, see test_lowering


def test_qat_graph_trains_under_autocast_and_torch_compile():
    """The QAT graph is an ordinary module: bf16 autocast (the quantizers compute in float32 and
    hand back the input's type) and torch.compile (aot_eager: the quantizers' autograd.Function
    twins traced, the same arithmetic as the custom ops) give the eager gradients."""
    gm, data = _calibrated()
    InsertFakeQuant(learn_scales=True)(gm)
    gm.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gm(data[0])
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gm.parameters() if p.requires_grad)
    gm.zero_grad()
    eager = gm(data[0]).pow(2).mean()
    eager.backward()
    grads = [p.grad.clone() for p in gm.parameters() if p.requires_grad]
    gm.zero_grad()
    compiled = torch.compile(gm, backend="aot_eager")
    loss = compiled(data[0]).pow(2).mean()
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=0, atol=0)
    for g, p in zip(grads, (p for p in gm.parameters() if p.requires_grad)):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor's CPU backend needs a C++ compiler")
@pytest.mark.parametrize("recipe", ["int8", "nvfp4"])
def test_inductor_fuses_the_quantizers_of_a_compiled_qat_graph(recipe):
    """torch.compile (inductor) of a QAT graph traces the quantizers' autograd.Function twins
    instead of calling the custom ops (which it cannot fuse): no qgraph op runs in a compiled
    step, the outputs are the eager ones up to the float ops' rounding (which can move a value
    across a quantization boundary: mean |difference| within 5 % of mean |output|), and it trains."""
    model, x = make("transformer")
    gm = qgraph.capture(model, (x,))
    g = torch.Generator().manual_seed(5)
    data = [torch.randn(16, *x.shape[1:], generator=g) for _ in range(2)]
    Sequential([Annotate(tensorrt.RULES[recipe], fallback=True), InsertObservers("max"), Calibrate(data),
                InsertFakeQuant()])(gm)
    gm.train()
    eager = gm(data[0]).detach()
    compiled = torch.compile(gm)
    opt = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for step in range(4):
        opt.zero_grad()
        with torch.profiler.profile() as prof:
            out = compiled(data[0])
            loss = out.pow(2).mean()
            loss.backward()
        if step == 0:
            assert (out.detach() - eager).abs().mean() <= 0.05 * eager.abs().mean()
        ran = {e.name for e in prof.events()}
        assert not any(name.startswith("qgraph::") for name in ran), sorted(n for n in ran if "qgraph" in n)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():  # eager again afterwards: the custom ops, as export and lowering see them
        with torch.profiler.profile() as prof:
            gm(data[0])
    assert any(e.name.startswith("qgraph::fake_quant") for e in prof.events())


def test_weight_only_plans_prepare_for_qat():
    """w4a16 has no activation observers: insert-fake-quant still quantizes and tracks weights."""
    import dataclasses

    rules = dataclasses.replace(
        tensorrt.W4A16, weight=dataclasses.replace(tensorrt.W4A16.weight, block_size=32)
    )
    model, x = make("mlp")
    gm = qgraph.capture(model, (x,))
    Sequential([Annotate(rules), InsertObservers(), Calibrate([x])])(gm)
    result = InsertFakeQuant()(gm)
    assert result.counts["weights"] == 3 and result.counts["activations"] == 0
    assert all(m.track_weight for m in _quantizers(gm).values())


def test_two_forwards_before_one_backward():
    """Tracked and observed scales change on every call; the op keeps its own copies, so a loss
    over two calls of the student back-propagates (siamese losses, summed micro-batches)."""
    gm, data = _calibrated()
    InsertFakeQuant(observe_steps=5)(gm)
    gm.train()
    loss = gm(data[0]).pow(2).mean() + gm(3 * data[0]).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in gm.parameters() if p.requires_grad)


def test_lowering_a_graph_left_in_train_mode_exports_the_inference_graph():
    gm, data = _calibrated()
    InsertFakeQuant(observe_steps=3)(gm)
    gm.train()  # observation still pending
    onnx_bytes = tensorrt.lower(gm, (data[1] * 50,))
    proto = onnx.load_from_string(onnx_bytes)
    assert not {"ReduceMax", "Max", "Where"} & {n.op_type for n in proto.graph.node}
    assert gm.training and tensorrt.inspect_model(proto).violations == []
    gm.eval()
    # within the INT8 tolerance of test_lowering (onnxruntime fuses INT8 Q/DQ into integer kernels)
    assert check_parity(gm, onnx_bytes, (data[1],)).max_relative <= 0.01


def test_learned_scales_stay_positive_and_export_positive():
    gm, data = _calibrated()
    InsertFakeQuant(learn_scales=True)(gm)
    act = _quantizers(gm)["fq_x"]
    with torch.no_grad():
        act.scale.fill_(-0.03)  # an optimizer overshot
    gm.train()
    assert torch.isfinite(gm(data[0])).all()
    gm.eval()
    proto = onnx.load_from_string(tensorrt.lower(gm, (data[1],)))
    assert act.scale.item() > 0 and tensorrt.inspect_model(proto).violations == []


@pytest.mark.parametrize(
    "elem, axis, block", [("int8", 0, 0), ("fp8_e4m3", 1, 0), ("int4", 1, 16), ("fp8_e4m3", 0, 8)]
)
def test_lsq_gradient_matches_a_pure_torch_ste_reference(elem, axis, block):
    """d/dx and d/dscale of qgraph::fake_quant_fmt equal autograd through a pure-torch LSQ/STE
    formulation (round and saturation passed straight through), per channel and per block."""
    from qgraph import qops

    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 32, generator=g) * 3
    scale0 = qops.absmax_scale(x, elem, axis, block) * 0.6  # some values saturate
    one = torch.ones(())

    s = scale0.clone().requires_grad_(True)
    xa = x.clone().requires_grad_(True)
    torch.ops.qgraph.fake_quant_fmt(xa, s, one, axis, block, elem).pow(2).sum().backward()

    s_ref = scale0.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    full = qops.expand(s_ref, xb, axis, block)
    v = xb / full
    r = qops.round_to(v.detach(), elem)
    e = qgraph.formats.element(elem)
    lo, hi = (e.qmin - 0.5, e.qmax + 0.5) if e.kind == "int" else (e.qmin, e.qmax)
    inside = ((v >= lo) & (v <= hi)).float()
    v_ste = v * inside + (r - v * inside).detach()  # value r; gradient dv inside, 0 outside
    (v_ste * full).pow(2).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-4, atol=1e-5)


def test_qat_under_onnxruntime_rules_lowers_to_int8_kernels_with_parity():
    """The same QAT graph, planned with the onnxruntime rules (uint8 activations from 0 after each
    ReLU, both inputs of the block Add), trains with LSQ scales and lowers to ORT's int8 kernels."""
    from qgraph.backends import onnxruntime
    from qgraph.passes import FoldBatchNorm

    model, x = make("rescnn")
    gm = qgraph.capture(model, (x,))
    g = torch.Generator().manual_seed(6)
    data = [torch.randn(8, *x.shape[1:], generator=g) for _ in range(2)]
    passes = [FoldBatchNorm(), Annotate(onnxruntime.INT8), InsertObservers(), Calibrate(data)]
    Sequential(passes + [InsertFakeQuant(learn_scales=True)])(gm)
    assert any(m.spec.dtype == "uint8" and m.learnable for m in _quantizers(gm).values())
    _train_classifier(gm, data[0], g)
    assert all(float(m.scale.detach().min()) > 1e-4 for m in _quantizers(gm).values() if m.learnable)
    onnx_bytes = onnxruntime.lower(gm, (data[1],))
    report = onnxruntime.inspect_model(onnx.load_from_string(onnx_bytes))
    assert report.quantized_weighted == len(report.weighted) == 7, report.summary()
    parity = check_parity(gm, onnx_bytes, (data[1],))  # int8 kernels, int32 biases
    assert parity.max_relative <= 0.03, parity.summary()


def test_a_learned_scale_driven_to_zero_is_reported_at_export(caplog):
    from qgraph.quant import prepare_for_export

    gm, data = _calibrated()
    InsertFakeQuant(learn_scales=True)(gm)
    act = _quantizers(gm)["fq_x"]
    with torch.no_grad():
        act.scale.fill_(-0.5)  # what Adam at lr 1e-3 does to a 0.004 scale in a few steps
    with caplog.at_level("WARNING", logger="qgraph.quant"):
        prepare_for_export(gm)
    assert "learned scale of fq_x fell from" in caplog.text
    assert float(act.scale.detach()) > 0


def _block32(rules):
    """w4a16 with blocks of 32: the zoo's layers are 32-128 wide (the default block is 128)."""
    import dataclasses

    return dataclasses.replace(rules, weight=dataclasses.replace(rules.weight, block_size=32))


@pytest.mark.parametrize("recipe", ["int8", "w4a16", "nvfp4"])
def test_learned_weight_scales_train_and_the_deploy_form_stores_them(recipe):
    """learn_weight_scales: per-channel INT8, INT4-block and NVFP4 E4M3-block weight scales become
    LSQ parameters, get gradients and move; the deploy form's stored weights decode to the trained
    fake-quant weights exactly, and it computes the trained model."""
    from onnx.reference import ReferenceEvaluator

    from _deploy_form import decoded_weights, trt_ops

    rules = _block32(tensorrt.W4A16) if recipe == "w4a16" else tensorrt.RULES[recipe]
    gm, data = _calibrated(rules)
    result = InsertFakeQuant(learn_weight_scales=True)(gm)
    weights = [m for m in _quantizers(gm).values() if m.spec.role == "weight"]
    assert len(weights) == 3 and all(m.learnable and not m.track_weight for m in weights)
    assert result.counts["learnable"] == 3
    assert InsertFakeQuant(learn_weight_scales=True).options() == {"learn_weight_scales": True}
    start = [m.scale.detach().clone() for m in weights]
    gm.train()
    opt = torch.optim.Adam([p for p in gm.parameters() if p.requires_grad], lr=1e-3)
    target = torch.randn(16, 10, generator=torch.Generator().manual_seed(9))
    for _ in range(10):
        opt.zero_grad()
        torch.nn.functional.mse_loss(gm(data[0]), target).backward()
        assert all(m.scale.grad is not None and bool(m.scale.grad.abs().sum() > 0) for m in weights)
        opt.step()
    gm.eval()
    assert all(not torch.equal(m.scale.detach(), s) for m, s in zip(weights, start))
    onnx_bytes = tensorrt.lower(gm, (data[1],))
    if recipe == "nvfp4":  # stored as the forward rounds them: E4M3 block scales
        from qgraph import qops

        assert all(torch.equal(m.scale.detach(), qops.e4m3_ratio(m.scale.detach())) for m in weights)
    with torch.no_grad():
        want = [m(get_attr(gm, n.args[0].target)).numpy() for n in gm.graph.nodes
                if n.op == "call_module" and (m := gm.get_submodule(n.target)) in weights]
    got = decoded_weights(onnx.load_from_string(onnx_bytes))
    for w in want:
        assert any(g.shape == w.T.shape and np.array_equal(g, w.T) or g.shape == w.shape and np.array_equal(g, w)
                   for g in got), f"no stored weight decodes to the trained {w.shape} weight"
    sess = ReferenceEvaluator(onnx.load_from_string(onnx_bytes), new_ops=trt_ops())
    out = sess.run(None, {sess.input_names[0]: data[1].numpy()})[0]
    with torch.no_grad():
        ref = gm(data[1]).numpy()
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


def test_nvfp4_learned_block_scales_are_rounded_to_e4m3_with_a_straight_through_gradient():
    """Off the E4M3 grid, a learned NVFP4 weight scale computes what its E4M3 rounding computes
    (what TensorRT stores), and its gradient passes the rounding straight through."""
    from qgraph import qops

    gm, _ = _calibrated(tensorrt.NVFP4)
    InsertFakeQuant(learn_weight_scales=True)(gm)
    node = next(n for n in gm.graph.nodes
                if n.op == "call_module" and gm.get_submodule(n.target).spec.role == "weight")
    module, w = gm.get_submodule(node.target), get_attr(gm, node.args[0].target).detach()
    with torch.no_grad():
        module.scale.mul_(1.03)  # between E4M3 values
    rounded = qops.e4m3_ratio(module.scale.detach())
    assert not torch.equal(rounded, module.scale.detach())
    out = module(w)
    args = (module.global_scale, module.spec.axis, 16, "fp4_e2m1", "fp8_e4m3")
    want = torch.ops.qgraph.fake_quant_fmt(w, rounded, *args)
    assert torch.equal(out.detach(), want)
    out.pow(2).sum().backward()
    s = rounded.clone().requires_grad_(True)
    torch.ops.qgraph.fake_quant_fmt(w, s, *args).pow(2).sum().backward()
    g = (w.numel() / s.numel() * 6) ** -0.5  # LSQ's gradient scale
    torch.testing.assert_close(module.scale.grad, s.grad * g, rtol=1e-5, atol=0)


def test_scales_that_cannot_be_learned_say_why():
    """Dynamic NVFP4/MX activations compute their block scales at run time; MX weight scales are
    powers of two: the pass leaves them as they are (tracked, frozen), configure_training refuses."""
    gm, _ = _calibrated(tensorrt.MXFP8)
    result = InsertFakeQuant(learn_scales=True, learn_weight_scales=True)(gm)
    q = _quantizers(gm).values()
    assert result.counts["learnable"] == 0
    assert all(m.track_weight for m in q if m.spec.role == "weight")
    weight = next(m for m in q if m.spec.role == "weight")
    dynamic = next(m for m in q if m.spec.dynamic)
    with pytest.raises(qgraph.QGraphError, match="at run time"):
        dynamic.configure_training(learn_scale=True)
    with pytest.raises(qgraph.QGraphError, match="powers of two"):
        weight.configure_training(learn_scale=True)
