"""Attach quantization specs to graph edges from a backend's rules (data, no graph edits).

For every ``call_function`` node, the op kind is looked up in the rules:

  * a weighted op (Conv, ConvTranspose, Gemm) gets an activation spec on input 0 and a per-channel
    weight spec on input 1 — only if the weight is a constant, else it stays in float;
  * MatMul gets a weight spec on a constant input and activation specs otherwise;
  * an Add with a residual rule gets a spec on the input that is *not* the output of a quantized
    weighted op (so the Add fuses into it); an Add with no such producer stays in float;
  * pooling gets an activation spec on its input;
  * everything else stays in float, with the reason recorded.

Specs go to ``node.meta["qgraph.quant"]`` ({input index: QSpec}); reasons to
``node.meta["qgraph.float_reason"]``.
"""

from __future__ import annotations

import torch
import torch.fx

from qgraph._pass import Pass, PassResult
from qgraph.graph import DATA_MOVEMENT, constant_value, is_constant, op_kind
from qgraph.observers import Observer
from qgraph.passes._util import FLOAT_META, QUANT_META
from qgraph.quant import FakeQuant, QSpec
from qgraph.rules import BackendRules

__all__ = ["Annotate"]


class Annotate(Pass):
    """Decide the quantization plan: which edges get which spec. Counts: ``quantized``, ``float``.

    Args:
        rules: the backend's rule data (e.g. ``qgraph.backends.tensorrt.rules.INT8``).
    """

    name = "annotate"
    context_keys = ("rules",)

    def __init__(self, rules: BackendRules) -> None:
        self.rules = rules

    def call(self, graph: torch.fx.GraphModule) -> PassResult:
        self._gm = graph
        changed = False
        quantized = left_float = 0
        for node in graph.graph.nodes:
            if node.op != "call_function":
                continue
            specs, reason = self._plan(node)
            if specs:
                quantized += 1
            elif reason:
                left_float += 1
            if node.meta.get(QUANT_META) != (specs or None):
                changed = True
                _set_meta(node, QUANT_META, specs or None)
            if node.meta.get(FLOAT_META) != (reason or None):
                changed = True
                _set_meta(node, FLOAT_META, reason or None)
        return PassResult(graph, changed, {"quantized": quantized, "float": left_float})

    def _plan(self, node: torch.fx.Node) -> tuple[dict[int, QSpec], str]:
        kind = op_kind(node)
        if kind in DATA_MOVEMENT:
            return {}, ""
        if kind is None:
            return {}, f"{_short(node)}: not an op qgraph knows"
        rule = self.rules.ops.get(kind)
        if rule is None:
            why = self.rules.float_reasons.get(kind, "no rule for it")
            return {}, f"{why} ({self.rules.backend} {self.rules.precision})"
        if rule.residual:
            return self._plan_residual(node)
        if rule.max_groups is not None and _groups(node) > rule.max_groups:
            return {}, f"groups={_groups(node)} (per-channel weight scales need groups<={rule.max_groups})"
        specs: dict[int, QSpec] = {}
        for inp in rule.inputs:
            arg = node.args[inp.index] if inp.index < len(node.args) else None
            if not isinstance(arg, torch.fx.Node):
                return {}, f"input {inp.index} is not a tensor"
            arg = self._through_quantizers(arg)
            constant = is_constant(arg)
            if inp.role == "weight" and not constant:
                return {}, "weight is not a constant"
            if constant and inp.role in ("weight", "either"):
                specs[inp.index] = self.rules.weight_spec(_axis(self._gm, arg, inp.weight_axis))
            else:
                specs[inp.index] = self.rules.activation
        if specs and all(s.role == "weight" for s in specs.values()):
            return {}, "all inputs are constants"
        return specs, ""

    def _plan_residual(self, node: torch.fx.Node) -> tuple[dict[int, QSpec], str]:
        args = node.args[:2]
        if len(args) < 2 or not all(isinstance(a, torch.fx.Node) for a in args):
            return {}, "not an add of two tensors"
        args = [self._through_quantizers(a) for a in args]
        if any(is_constant(a) for a in args):
            return {}, "adds a constant"
        fused = [self._is_quantized_weighted(a) for a in args]
        if not any(fused):
            return {}, "no quantized Conv/Gemm output to fuse the Add into"
        targets = [1] if all(fused) else [i for i, f in enumerate(fused) if not f]
        return {i: self.rules.activation for i in targets}, ""

    def _is_quantized_weighted(self, node: torch.fx.Node) -> bool:
        return op_kind(node) in self.rules.weighted_kinds and bool(node.meta.get(QUANT_META))

    def _through_quantizers(self, node: torch.fx.Node) -> torch.fx.Node:
        # Observers and fake-quants inserted by later passes are identities for planning; looking
        # through them keeps the plan (and `modified=False`) when annotate runs again after them.
        while node.op == "call_module" and isinstance(
            self._gm.get_submodule(node.target), (Observer, FakeQuant)
        ):
            node = node.args[0]
        return node


def _set_meta(node: torch.fx.Node, key: str, value: object) -> None:
    if value is None:
        node.meta.pop(key, None)
    else:
        node.meta[key] = value


def _short(node: torch.fx.Node) -> str:
    return str(getattr(node.target, "__name__", node.target))


def _groups(node: torch.fx.Node) -> int:
    # conv{1,2,3}d and conv_transpose{1,2,3}d both carry groups at position 6
    if op_kind(node) not in ("Conv", "ConvTranspose"):
        return 1
    return int(node.args[6]) if len(node.args) > 6 else int(node.kwargs.get("groups", 1))


def _axis(gm: torch.fx.GraphModule, weight: torch.fx.Node, axis: int | None) -> int | None:
    rank = constant_value(gm, weight).dim()
    if axis is None or rank < 2:
        return None  # a rank-1 constant has no channel axis: one scale
    return axis % rank
