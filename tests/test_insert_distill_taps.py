"""insert-distill-taps (QAD): a frozen teacher and the distillation loss inside the student
graph; forward returns (output, loss); remove-distill-taps and the backends take them out."""

from __future__ import annotations

import copy

import pytest
import torch

import qgraph
from qgraph import PreconditionError, Sequential
from qgraph.backends import tensorrt
from qgraph.distill import kl_divergence
from qgraph.examples.zoo import make
from qgraph.parity import check_parity
from qgraph.passes import (
    Annotate,
    Calibrate,
    InsertDistillTaps,
    InsertFakeQuant,
    InsertObservers,
    RemoveDistillTaps,
)


def _student_and_teacher(name: str = "transformer", rules=tensorrt.NVFP4):
    model, x = make(name)
    teacher = qgraph.capture(model, (x,))
    student = qgraph.capture(model, (x,))
    g = torch.Generator().manual_seed(2)
    data = [torch.randn(8, *x.shape[1:], generator=g) for _ in range(3)]
    Sequential([Annotate(rules, fallback=tensorrt.FP8), InsertObservers(), Calibrate(data), InsertFakeQuant()])(student)
    return student, teacher, data


def test_census_teacher_and_loss_nodes():
    student, teacher, _ = _student_and_teacher()
    result = InsertDistillTaps(teacher, taps={"add": 0.5, "softmax": 1.0})(student)
    assert result.modified and result.counts == {"taps": 2}
    calls = [n for n in student.graph.nodes if n.op == "call_module" and n.target == "distill_teacher"]
    losses = [n for n in student.graph.nodes if getattr(n.target, "__name__", "") == "distill_loss"]
    assert len(calls) == 1 and len(losses) == 1
    assert losses[0].args[4:] == (1.0, 1.0, [0.5, 1.0])  # temperature, kl weight, tap weights


def test_numerics_loss_is_the_kl_of_teacher_over_student():
    student, teacher, data = _student_and_teacher()
    plain = copy.deepcopy(student)
    InsertDistillTaps(teacher)(student)
    with torch.no_grad():
        output, loss = student(data[0])
        want = kl_divergence(plain(data[0]), teacher(data[0]))
    assert torch.equal(output, plain(data[0]))
    torch.testing.assert_close(loss, want, rtol=0, atol=0)
    assert loss > 0  # NVFP4 moves the logits


def test_idempotent_and_removable():
    student, teacher, data = _student_and_teacher()
    before = str(student.graph)
    InsertDistillTaps(teacher)(student)
    assert not InsertDistillTaps(teacher)(student).modified
    assert RemoveDistillTaps()(student).modified
    assert str(student.graph) == before and not hasattr(student, "distill_teacher")
    assert isinstance(student(data[0]), torch.Tensor)
    assert not RemoveDistillTaps()(student).modified


def test_negative_a_tap_that_does_not_exist():
    student, teacher, _ = _student_and_teacher()
    with pytest.raises(PreconditionError, match=r"tap 'add_99': no node of that name in the student graph \(similar: add"):
        InsertDistillTaps(teacher, taps=["add_99"])(student)
    with pytest.raises(PreconditionError, match="capture it"):
        InsertDistillTaps(torch.nn.Linear(2, 2))
    with pytest.raises(PreconditionError, match="temperature"):
        InsertDistillTaps(teacher, temperature=0)


def test_verifier_passes_and_lowering_drops_the_teacher():
    student, teacher, data = _student_and_teacher()
    InsertDistillTaps(teacher, taps=["add"])(student)
    qgraph.verify(student)
    onnx_bytes = tensorrt.lower(student, (data[1],), form="reference")
    report = check_parity(student, onnx_bytes, (data[1],))  # the loss output is not exported
    assert len(report.outputs) == 1 and report.max_relative <= 0.01


def test_teacher_gets_no_gradient_and_is_not_modified():
    student, teacher, data = _student_and_teacher()
    reference = {k: v.clone() for k, v in teacher.state_dict().items()}
    InsertDistillTaps(teacher, taps={"add": 0.1})(student)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    assert not any(p.requires_grad for p in student.distill_teacher.parameters())
    assert not student.distill_teacher.training
    opt = torch.optim.SGD(params, lr=0.05)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        _, loss = student(data[0])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is None for p in student.distill_teacher.parameters())
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, reference[k]) for k, v in teacher.state_dict().items())
    copied = student.distill_teacher.module.state_dict()
    assert all(torch.equal(copied[k], reference[k]) for k in reference if k in copied)


def test_lowering_leaves_the_training_student_as_it_was_and_copies_no_weight(monkeypatch):
    """Lowering drops the teacher and freezes learned scales on a graph over the student's own
    modules (a deep copy would double a large student and its teacher): the trained graph keeps
    its teacher, learned scales, per-module train/eval modes and values."""
    from qgraph.graph import sharing_copy

    student, teacher, data = _student_and_teacher()
    InsertFakeQuant(learn_scales=True)(student)
    InsertDistillTaps(teacher, taps=["add"])(student)

    def no_deep_copy(*_):
        raise AssertionError("lowering deep-copied a GraphModule")

    monkeypatch.setattr(torch.fx.GraphModule, "__deepcopy__", no_deep_copy)
    student.train()
    learned = [n for n, m in student.named_modules() if getattr(m, "learnable", False)]
    assert learned  # the FP8 fallback's per-tensor activation scales
    graph, modes = str(student.graph), {n: m.training for n, m in student.named_modules()}
    state = {k: v.clone() for k, v in student.state_dict().items()}
    for form in ("deploy", "reference"):
        tensorrt.lower(student, (data[1],), form=form)
    assert str(student.graph) == graph and hasattr(student, "distill_teacher")
    assert {n: m.training for n, m in student.named_modules()} == modes  # the teacher stays in eval
    assert all(isinstance(student.get_submodule(n).scale, torch.nn.Parameter) for n in learned)
    assert all(torch.equal(v, state[k]) for k, v in student.state_dict().items())
    shared = sharing_copy(student)
    assert all(a is b for a, b in zip(shared.parameters(), student.parameters(), strict=True))
    shared.graph.erase_node(next(n for n in shared.graph.nodes if n.op == "output"))
    assert str(student.graph) == graph
