"""Attach quantization specs to graph edges from a backend's rules (data, no graph edits).

For every ``call_function`` node, the op kind is looked up in the rules:

  * a weighted op (Conv, ConvTranspose, Gemm) gets an activation spec on input 0 and a per-channel
    weight spec on input 1 — only if the weight is a constant, else it stays in float;
  * MatMul gets a weight spec on a constant input and activation specs otherwise;
  * an Add with a residual rule gets a spec on the input that is *not* the output of a quantized
    weighted op (so the Add fuses into it with an int8 output), when every use of its output is
    a quantized input (seen through ReLU/Clip and data movement); an Add with no such producer,
    or whose output feeds float ops (a transformer's residual → LayerNorm), stays in float;
  * an op the backend runs as an int8 kernel of its own (``int8_kernel``: onnxruntime's
    QLinearAdd) gets specs on both inputs when every use of its output is a quantized input
    (seen through ReLU/Clip and data movement); otherwise its residual rule applies;
  * pooling gets an activation spec on its input;
  * everything else stays in float, with the reason recorded.

Specs go to ``node.meta["qgraph.quant"]`` ({input index: QSpec}); reasons to
``node.meta["qgraph.float_reason"]``.

Recipes beyond INT8 add two things:

  * per-layer overrides: ``(pattern, rules)`` pairs, first match wins; a pattern is an fnmatch
    over the node name or its module path (``fc``, ``blocks.0.*``), ``@node:NAME`` (the op whose
    node name is exactly NAME, never a module path), or ``@first`` / ``@last`` (the first / last
    weighted op); ``rules=None`` keeps the op in float;
  * unsupported op/format pairs (NVFP4 on a Conv, a dynamic block quantizer on a 4-D input or on
    a reduction axis that is not a multiple of the block): an error naming the node, unless a
    ``fallback`` is given (the rule set to use instead, or ``"float"``); ops that fell back carry
    ``node.meta["qgraph.fallback"]``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import MutableMapping, Sequence
from typing import Literal

from qgraph._errors import PreconditionError
from qgraph._pass import Pass, PassResult
from qgraph.graph import DATA_MOVEMENT
from qgraph.passes._util import FLOAT_META, QUANT_META
from qgraph.quant import FALLBACK_META, QSpec
from qgraph.rules import BackendRules
from qgraph.views import QUANTIZER, view_of

__all__ = ["Annotate"]

_EXACT = "@node:"  # an override pattern's prefix: the exact node name that follows


class Annotate(Pass):
    """Decide the quantization plan: which edges get which spec. Counts: ``quantized``, ``float``.

    Runs on a ``torch.export`` GraphModule or an onnx-ir model (``qgraph.onnx_graph``): the plan
    is made over a :class:`~qgraph.views.GraphView`, so both doors get it from the same rules.

    Args:
        rules: the backend's rule data (e.g. ``qgraph.backends.tensorrt.rules.INT8``).
        overrides: ``(pattern, rules or None)`` pairs for per-layer precision (None: float).
        fallback: what ops the recipe cannot run become: ``True`` — the ``fallback`` rule set of
            the recipe that planned the node (an override's own), float if it has none; a rule
            set or ``"float"`` — that, for every such op; None/False — an error naming the node.
    """

    name = "annotate"
    graphs = ("fx", "onnx")
    context_keys = ("rules", "overrides", "fallback")

    def __init__(
        self,
        rules: BackendRules,
        overrides: Sequence[tuple[str, BackendRules | None]] = (),
        fallback: bool | BackendRules | Literal["float"] | None = None,
    ) -> None:
        self.rules = rules
        self.overrides = tuple(overrides)
        self.fallback = fallback

    def call(self, graph: object) -> PassResult:
        view = view_of(graph)
        self._v = view
        self._feeds_memo = {}
        ops = list(view.ops())
        weighted = [n for n in ops if view.kind(n) in self.rules.weighted_kinds]
        self._ends = {"@first": weighted[:1], "@last": weighted[-1:]}
        self._matched: set[str] = set()
        for node in reversed(ops):  # readers first: the look-ahead never recurses deeply (deep residual stacks)
            self._feeds_quantized_input(node)
        changed = False
        quantized = left_float = 0
        for node in ops:
            specs, reason, fell_back = self._plan_with_fallback(node)
            meta = view.meta(node)
            for key, value in ((FALLBACK_META, fell_back), (QUANT_META, specs), (FLOAT_META, reason)):
                if meta.get(key) != (value or None):
                    changed = True
                    _set_meta(meta, key, value or None)
            if specs:
                quantized += 1
            elif reason:
                left_float += 1
        unmatched = [p for p, _ in self.overrides if p not in self._matched]
        if unmatched:
            names = view.names(weighted[0]) if weighted else ()
            hint = f" (names look like {' or '.join(map(repr, names))})" if names else ""
            raise PreconditionError(f"override pattern(s) {', '.join(map(repr, unmatched))} match no op{hint}")
        return PassResult(graph, changed, {"quantized": quantized, "float": left_float})

    def _rules_for(self, node: object) -> tuple[BackendRules | None, str]:
        """The rule set of ``node`` after overrides, and the matching pattern ('' if none)."""
        rules, pattern = self._override_of(node)
        if pattern:
            self._matched.add(pattern)
        return rules, pattern

    def _override_of(self, node: object) -> tuple[BackendRules | None, str]:
        """Like :meth:`_rules_for`, without recording the pattern as used (for look-aheads)."""
        names = self._v.names(node)
        for pattern, rules in self.overrides:
            if pattern in self._ends:
                hit = node in self._ends[pattern]
            elif pattern.startswith(_EXACT):
                hit = self._v.name(node) == pattern[len(_EXACT):]
            else:
                hit = any(fnmatch.fnmatchcase(n, pattern) for n in names)
            if hit:
                return rules, pattern
        return self.rules, ""

    def _plan_with_fallback(self, node: object) -> tuple[dict[int, QSpec], str, str]:
        """(specs, float reason, fallback reason) of one node."""
        rules, pattern = self._rules_for(node)
        if rules is None:
            return {}, f"kept in float by override {pattern!r}", ""
        try:
            specs, reason = self._plan(node, rules)
        except _Unsupported as exc:
            why = str(exc)
            alt = (rules.fallback or "float") if self.fallback is True else self.fallback
            if not alt:
                name = rules.fallback.precision if rules.fallback else "float"
                raise PreconditionError(
                    f"{self._v.label(node)}: {rules.precision} is not supported here: {why}; "
                    f"allow fallback (--fallback) to run it in {name}, or override it"
                ) from None
            if alt == "float":
                return {}, f"fallback to float: {why}", ""
            try:
                specs, reason = self._plan(node, alt)
            except _Unsupported as inner:
                raise PreconditionError(
                    f"{self._v.label(node)}: neither {rules.precision} ({why}) nor the fallback "
                    f"{alt.precision} ({inner}) is supported here"
                ) from None
            return specs, reason, f"{alt.precision}: {why}" if specs else ""
        return specs, reason, ""

    def _plan(self, node: object, rules: BackendRules) -> tuple[dict[int, QSpec], str]:
        v = self._v
        kind = v.kind(node)
        if kind in DATA_MOVEMENT:
            return {}, ""
        if kind is None:
            return {}, f"{v.describe(node)}: not an op qgraph knows"
        rule = rules.ops.get(kind)
        if rule is None:
            why = rules.float_reasons.get(kind, "no rule for it")
            return {}, f"{why} ({rules.backend} {rules.precision})"
        if rule.unsupported:
            raise _Unsupported(rule.unsupported)
        if rule.int8_kernel and self._feeds_quantized_input(node):
            return self._plan_int8_kernel(node, rules)
        if rule.residual:
            specs, reason = self._plan_residual(node, rules)
            if specs and not self._feeds_quantized_input(node):
                # the weighted op cannot have an int8 output: Q/DQ would only cost accuracy
                return {}, "its output feeds float ops (no int8 output for the Add to fuse into)"
            return specs, reason
        if rule.int8_kernel:
            return {}, "its output feeds float ops (its int8 kernel needs a quantized output)"
        if rule.needs_weight and not any(v.is_constant(v.arg(node, i)) for i in (0, 1)):
            return {}, rule.needs_weight
        if rule.max_groups is not None and v.groups(node) > rule.max_groups:
            return {}, f"groups={v.groups(node)} (per-channel weight scales need groups<={rule.max_groups})"
        specs: dict[int, QSpec] = {}
        for inp in rule.inputs:
            arg = v.arg(node, inp.index)
            if arg is None:
                return {}, f"input {inp.index} is not a tensor"
            constant = v.is_constant(arg)
            if inp.role == "weight" and not constant:
                if rules.weight.block_size and rules.activation is not None:
                    raise _Unsupported("the weight is not a constant")
                return {}, "weight is not a constant"
            if constant and inp.role in ("weight", "either"):
                axis = v.weight_axis(node, inp.index, inp.weight_axis)
                specs[inp.index] = _weight_spec(v.constant_shape(arg), axis, rules)
            elif rules.activation is not None:
                _check_dynamic(v.shape(arg), rules.activation)
                specs[inp.index] = self._activation_spec(arg, rules)
        if specs and rules.activation is not None and all(s.role == "weight" for s in specs.values()):
            return {}, "all inputs are constants"
        return specs, ""

    def _plan_residual(self, node: object, rules: BackendRules) -> tuple[dict[int, QSpec], str]:
        v = self._v
        args = [v.arg(node, 0), v.arg(node, 1)]
        if any(a is None for a in args):
            return {}, "not an add of two tensors"
        if any(v.is_constant(a) for a in args):
            return {}, "adds a constant"
        fused = [self._is_quantized_weighted(a) for a in args]
        if not any(fused):
            return {}, "no quantized Conv/Gemm output to fuse the Add into"
        targets = [1] if all(fused) else [i for i, f in enumerate(fused) if not f]
        if rules.activation is None:
            return {}, f"{rules.precision} quantizes no activations"
        return {i: self._activation_spec(args[i], rules) for i in targets}, ""

    def _plan_int8_kernel(self, node: object, rules: BackendRules) -> tuple[dict[int, QSpec], str]:
        """Every tensor input of an op the backend runs as its own int8 kernel (QLinearAdd)."""
        args = self._two_tensors(node)
        if args is None:
            return self._plan_residual(node, rules)
        if rules.activation is None:
            return {}, f"{rules.precision} quantizes no activations"
        return {i: self._activation_spec(a, rules) for i, a in enumerate(args)}, ""

    def _two_tensors(self, node: object) -> list[object] | None:
        """``node``'s first two inputs (seen through quantizers) if both are non-constant tensors."""
        args = [self._v.arg(node, 0), self._v.arg(node, 1)]
        if any(a is None or self._v.is_constant(a) for a in args):
            return None
        return args

    def _feeds_quantized_input(self, node: object) -> bool:
        """Whether every use of ``node``'s output is an input that will be quantized, seen
        through ReLU/Clip, data movement (not Concat) and quantizers already in the graph (an
        int8 kernel needs its output read by a quantizer only)."""
        if node not in self._feeds_memo:  # each reader is judged by its own rule set
            readers = self._v.readers(self._v.output(node))
            self._feeds_memo[node] = bool(readers) and all(self._quantizes(u, at) for u, at in readers)
        return self._feeds_memo[node]

    def _quantizes(self, user: object, positions: frozenset[int]) -> bool:
        """Whether ``user`` quantizes what it reads at ``positions`` under its own rules."""
        v = self._v
        if user is QUANTIZER or user is None:
            return user is QUANTIZER
        kind = v.kind(user)
        if kind in ("Relu", "Clip") or (kind in DATA_MOVEMENT and kind != "Concat"):
            return self._feeds_quantized_input(user)
        rules, _ = self._override_of(user)  # the reader's own rule set (None: kept float)
        if rules is None:
            return False
        rule = rules.ops.get(kind) if kind else None
        if rule is None or rule.unsupported or rules.activation is None:
            return False
        if rule.int8_kernel:  # planned as one only as an Add of two tensors that are not constants
            return self._two_tensors(user) is not None and self._feeds_quantized_input(user)
        if rule.residual:  # the value is not a weighted op's output: the residual rule quantizes it
            return self._feeds_quantized_input(user)  # when the Add's own output is quantized
        args = [v.arg(user, 0), v.arg(user, 1)]
        if rule.needs_weight and not any(v.is_constant(a) for a in args):
            return False
        if rule.max_groups is not None and v.groups(user) > rule.max_groups:
            return False
        for r in rule.inputs:
            if r.role == "weight" and not v.is_constant(args[r.index] if r.index < 2 else None):
                return False  # the op stays float: its weight is not a constant
        return any(r.index in positions and r.role != "weight" for r in rule.inputs)

    def _activation_spec(self, arg: object, rules: BackendRules) -> QSpec:
        low = self._lower_bound(arg) if rules.bounded_activation is not None else None
        if low is None:
            return rules.activation
        # the range must hold 0 (its code is the zero-point): a positive bound (clamp(x, 2, 6))
        # counts as 0, and average pooling's zero padding can reach 0 anyway
        return dataclasses.replace(rules.bounded_activation, low=min(low, 0.0))

    def _lower_bound(self, tensor: object) -> float | None:
        """A value ``tensor`` cannot go below, known from the op that makes it, or None."""
        v = self._v
        node = v.producer(tensor)
        kind = v.kind(node)
        if kind in _LOWER_BOUNDS:
            return _LOWER_BOUNDS[kind]
        if kind == "Clip":
            return v.clip_min(node)
        if kind in ("MaxPool", "AveragePool", "GlobalAveragePool") or (kind in DATA_MOVEMENT and kind != "Concat"):
            source = v.arg(node, 0)
            return self._lower_bound(source) if source is not None else None
        if kind == "Concat":
            bounds = [self._lower_bound(p) if p is not None else None for p in v.concat_parts(node)]
            return min(bounds) if bounds and None not in bounds else None
        return None

    def _is_quantized_weighted(self, tensor: object) -> bool:
        node = self._v.producer(tensor)
        return self._v.kind(node) in self.rules.weighted_kinds and bool(self._v.meta(node).get(QUANT_META))


#: Lower bounds of op outputs: GELU's minimum is x·Φ(x) at x ≈ −0.752, −0.16997 (its tanh
#: approximation: −0.17004); the bound is taken just below both.
_LOWER_BOUNDS = {"Relu": 0.0, "Sigmoid": 0.0, "Softmax": 0.0, "Gelu": -0.1701}


class _Unsupported(Exception):
    """An op/format pair the backend cannot run (message: why)."""


def _weight_spec(shape: tuple[int, ...], axis: int | None, rules: BackendRules) -> QSpec:
    channel = None if axis is None or len(shape) < 2 else axis % len(shape)  # rank 1: one scale
    if not rules.weight.block_size:
        return rules.weight_spec(channel)
    block = rules.weight.block_size
    if len(shape) != 2:
        raise _Unsupported(f"block-quantized weights must be 2-D, this one is {shape}")
    reduction = 1 - channel
    if shape[reduction] % block:
        raise _Unsupported(f"reduction dim {shape[reduction]} of the weight is not a multiple of the block size {block}")
    return rules.weight_spec(channel, reduction)


def _check_dynamic(shape: tuple | None, spec: QSpec) -> None:
    """TensorRT's dynamic block quantizers take 2-D/3-D inputs blocked on a whole last axis."""
    if not spec.dynamic:
        return
    shape = shape or ()
    if len(shape) not in (2, 3):
        raise _Unsupported(f"dynamic {spec.dtype} quantization needs a 2-D or 3-D input, got rank {len(shape)}")
    last = shape[-1]
    if not isinstance(last, int) or last % spec.block_size:
        raise _Unsupported(f"last dim {last} of the input is not a multiple of the block size {spec.block_size}")


def _set_meta(meta: MutableMapping, key: str, value: object) -> None:
    if value is None:
        meta.pop(key, None)
    else:
        meta[key] = value

