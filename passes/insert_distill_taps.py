"""Quantization-aware distillation (QAD): pair the fake-quant student with a frozen teacher.

``insert-distill-taps`` adds to the student graph a call of a frozen copy of the full-precision
teacher graph (same inputs), and one node computing :func:`qgraph.distill.distill_loss`: KL of the
teacher's over the student's logits (the first graph output, temperature 1 by default), plus
weighted MSE between *taps* — any named node of the graph, present in both (a residual add, an
attention score, not only module outputs). The student's ``forward`` then returns
``(output, loss)``: one module for any training loop, DDP included (the teacher has no
trainable parameters). ``remove-distill-taps`` restores the original graph; the backends remove
the taps themselves before export.

Example:
    >>> teacher = qgraph.capture(model, (example,))                  # doctest: +SKIP
    >>> InsertDistillTaps(teacher, taps={"add_3": 0.1})(student)     # doctest: +SKIP
    >>> output, loss = student(batch)                                # doctest: +SKIP
"""

from __future__ import annotations

import copy
import logging
import operator
from collections.abc import Mapping, Sequence

import torch
import torch.fx
import torch.utils._pytree as pytree

from qgraph._errors import PreconditionError
from qgraph._pass import Pass, PassResult
from qgraph.distill import FrozenTeacher, distill_loss

__all__ = ["InsertDistillTaps", "RemoveDistillTaps", "DISTILL_META"]

logger = logging.getLogger(__name__)

#: GraphModule.meta key: what insert-distill-taps added (to undo it).
DISTILL_META = "qgraph.distill"
_TEACHER = "distill_teacher"


class InsertDistillTaps(Pass):
    """Add the frozen teacher and the distillation loss; forward returns ``(output, loss)``.
    Counts: ``taps``.

    Args:
        teacher: the full-precision teacher as a GraphModule (``qgraph.capture`` of the original
            model); it is copied, never modified.
        taps: node names for feature losses, with their weights (a sequence means weight 1 each).
        temperature: the KL temperature (the QAD recipe uses 1).
        kl_weight: weight of the logits KL term.
    """

    name = "insert-distill-taps"

    def __init__(
        self,
        teacher: torch.fx.GraphModule,
        taps: Mapping[str, float] | Sequence[str] = (),
        temperature: float = 1.0,
        kl_weight: float = 1.0,
    ) -> None:
        if not isinstance(teacher, torch.fx.GraphModule):
            raise PreconditionError("the teacher must be a GraphModule: capture it with qgraph.capture")
        if not float(temperature) > 0:
            raise PreconditionError(f"temperature must be > 0, got {temperature}")
        self.teacher = teacher
        self.taps = dict(taps) if isinstance(taps, Mapping) else {name: 1.0 for name in taps}
        self.temperature = float(temperature)
        self.kl_weight = float(kl_weight)

    def requires(self, graph: torch.fx.GraphModule) -> None:
        meta = graph.meta.get(DISTILL_META)
        if meta is not None and meta["taps"] != self.taps:
            raise PreconditionError("the graph already has distillation taps: remove-distill-taps first")
        for label, gm in (("student", graph), ("teacher", self.teacher)):
            if getattr(getattr(gm.graph._codegen, "pytree_info", None), "out_spec", None) is None:
                raise PreconditionError(f"the {label} must come from qgraph.capture (a pytree output spec)")
            names = {n.name for n in gm.graph.nodes if n.op not in ("output",)}
            for tap in self.taps:
                if tap not in names:
                    near = sorted(n for n in names if n.split("_")[0] == tap.split("_")[0])[:5]
                    hint = f" (similar: {', '.join(near)})" if near else ""
                    raise PreconditionError(f"tap {tap!r}: no node of that name in the {label} graph{hint}")

    def call(self, graph: torch.fx.GraphModule) -> PassResult:
        if DISTILL_META in graph.meta:
            return PassResult(graph, False, {"taps": len(graph.meta[DISTILL_META]["taps"])})
        teacher = FrozenTeacher(_tapped_copy(self.teacher, list(self.taps)))
        graph.add_module(_TEACHER, teacher)
        nodes = {n.name: n for n in graph.graph.nodes}
        placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
        output = next(n for n in graph.graph.nodes if n.op == "output")
        flat_out = list(output.args[0]) if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
        with graph.graph.inserting_before(output):
            t_out = graph.graph.call_module(_TEACHER, tuple(placeholders))
            t_values = [graph.graph.call_function(operator.getitem, (t_out, i)) for i in range(1 + len(self.taps))]
            loss = graph.graph.call_function(
                distill_loss,
                (
                    flat_out[0],
                    t_values[0],
                    [nodes[t] for t in self.taps],
                    t_values[1:],
                    self.temperature,
                    self.kl_weight,
                    list(self.taps.values()),
                ),
            )
        old_spec, new_spec = _with_loss_spec(graph)
        graph.meta[DISTILL_META] = {
            "taps": dict(self.taps),
            "flat_out": len(flat_out),
            "loss": loss.name,
            "out_spec": old_spec,
        }
        _set_outputs(graph, output, flat_out + [loss], new_spec)
        graph.recompile()
        return PassResult(graph, True, {"taps": len(self.taps)})


class RemoveDistillTaps(Pass):
    """Undo ``insert-distill-taps``: the student alone, forward returning its own output."""

    name = "remove-distill-taps"

    def call(self, graph: torch.fx.GraphModule) -> PassResult:
        meta = graph.meta.pop(DISTILL_META, None)
        if meta is None:
            return PassResult(graph, False, {})
        output = next(n for n in graph.graph.nodes if n.op == "output")
        _set_outputs(graph, output, list(output.args[0])[: meta["flat_out"]], meta.get("out_spec"))
        teacher = next(n for n in graph.graph.nodes if n.op == "call_module" and n.target == _TEACHER)
        loss = next(n for n in graph.graph.nodes if n.name == meta["loss"])
        graph.graph.erase_node(loss)
        for user in list(teacher.users):
            graph.graph.erase_node(user)
        graph.graph.erase_node(teacher)
        delattr(graph, _TEACHER)
        graph.recompile()
        return PassResult(graph, True, {})


def _tapped_copy(teacher: torch.fx.GraphModule, taps: list[str]) -> torch.fx.GraphModule:
    """A copy of ``teacher`` whose forward returns ``(logits, *tap values)`` as a flat tuple."""
    gm = copy.deepcopy(teacher)
    nodes = {n.name: n for n in gm.graph.nodes}
    output = next(n for n in gm.graph.nodes if n.op == "output")
    flat = list(output.args[0]) if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
    output.args = (tuple([flat[0]] + [nodes[t] for t in taps]),)
    gm.graph._codegen = torch.fx.graph.CodeGen()  # positional inputs, a plain tuple out
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _set_outputs(gm: torch.fx.GraphModule, output: torch.fx.Node, values: list, spec: object) -> None:
    """Point the output node at ``values``; a pytree codegen gets the output spec ``spec``."""
    output.args = (tuple(values),)
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is not None and spec is not None:
        gm.graph._codegen.pytree_info = info._replace(out_spec=spec)


def _with_loss_spec(gm: torch.fx.GraphModule) -> tuple[object, object]:
    """(the current output spec, the spec of ``(current output, loss)``); None without pytree."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is None or info.out_spec is None:
        return None, None
    structure = pytree.tree_unflatten([0] * info.out_spec.num_leaves, info.out_spec)
    return info.out_spec, pytree.tree_structure((structure, 0))
