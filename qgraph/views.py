"""What the planner reads of a graph: one small interface, a torch.fx and an ONNX implementation.

Backend rules are written over op kinds (``qgraph.graph``), and the ``annotate`` pass decides the
plan by asking a graph a handful of questions: the ops in order and their kinds, an op's tensor
inputs, who reads a tensor, which tensors are constants and their shapes, a Clip's lower bound.
:class:`GraphView` is those questions. :class:`FxView` answers them for a ``torch.export`` graph;
``qgraph.onnx_graph.OnnxView`` for an onnx-ir model. One planner, two graphs: the torch door and
the ONNX door get the same plan from the same rule data.

Handles are the graph's own objects: ops are fx ``Node`` s / ``ir.Node`` s; tensors are the fx
node that makes the value / an ``ir.Value``. Quantizers already on an edge (observers, fake-quants)
are looked through, so planning again after them gives the same plan.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping

import torch
import torch.fx

from qgraph.graph import constant_value, is_constant, node_label, op_kind

__all__ = ["GraphView", "FxView", "QUANTIZER", "view_of"]

#: A reader that is a quantizer already on the edge (it quantizes what it reads).
QUANTIZER = "quantizer"


class GraphView:
    """The questions the planner asks of a graph (see the module docstring).

    ``readers`` returns ``(reader, positions)`` pairs: ``reader`` is an op, :data:`QUANTIZER`, or
    None for a graph output; ``positions`` are the input indices at which it reads the tensor.
    """

    def ops(self) -> Iterable[object]:
        """The ops to plan, in topological order."""
        raise NotImplementedError

    def kind(self, op: object) -> str | None:
        """The op kind (``Conv``, ``Add`` ...), None for an op qgraph does not know (or no op)."""
        raise NotImplementedError

    def meta(self, op: object) -> MutableMapping:
        """Where the plan of ``op`` is stored."""
        raise NotImplementedError

    def label(self, op: object) -> str:
        """A short human label for messages: ``conv2d_1 (Conv)``."""
        raise NotImplementedError

    def names(self, op: object) -> tuple[str, ...]:
        """The names an override pattern is matched against (node name, module path)."""
        raise NotImplementedError

    def name(self, op: object) -> str:
        """The op's own node name ('' if it has none)."""
        raise NotImplementedError

    def describe(self, op: object) -> str:
        """What the op is, for "not an op qgraph knows" (its target or domain::op_type)."""
        raise NotImplementedError

    def arg(self, op: object, index: int) -> object | None:
        """The tensor at input ``index`` (through quantizers), None if absent or not a tensor."""
        raise NotImplementedError

    def output(self, op: object) -> object:
        """The tensor ``op`` makes (its first output)."""
        raise NotImplementedError

    def producer(self, tensor: object | None) -> object | None:
        """The op that makes ``tensor`` (None for graph inputs and constants)."""
        raise NotImplementedError

    def readers(self, tensor: object) -> list[tuple[object | None, frozenset[int]]]:
        """Who reads ``tensor`` and at which input positions (see the class docstring)."""
        raise NotImplementedError

    def is_constant(self, tensor: object | None) -> bool:
        raise NotImplementedError

    def constant_shape(self, tensor: object) -> tuple[int, ...]:
        raise NotImplementedError

    def shape(self, tensor: object) -> tuple | None:
        """The tensor's shape (ints or symbols) if known."""
        raise NotImplementedError

    def groups(self, op: object) -> int:
        """A Conv/ConvTranspose's group count (1 for anything else)."""
        raise NotImplementedError

    def clip_min(self, op: object) -> float | None:
        """A Clip's lower bound, None if it has none."""
        raise NotImplementedError

    def concat_parts(self, op: object) -> list[object | None]:
        """The tensors a Concat joins."""
        raise NotImplementedError

    def weight_axis(self, op: object, index: int, axis: int | None) -> int | None:
        """The per-channel axis of the constant at input ``index`` given the rule's ``axis``
        (a graph whose op stores its weight transposed says so here)."""
        return axis


class FxView(GraphView):
    """A ``torch.export`` GraphModule seen by the planner."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        from qgraph.observers import Observer
        from qgraph.quant import FakeQuant

        self.gm = gm
        self._quantizer_types = (Observer, FakeQuant)

    def _is_quantizer(self, node: torch.fx.Node) -> bool:
        return node.op == "call_module" and isinstance(self.gm.get_submodule(node.target), self._quantizer_types)

    def _through(self, node: object) -> object:
        while isinstance(node, torch.fx.Node) and self._is_quantizer(node):
            node = node.args[0]
        return node

    def ops(self) -> list[torch.fx.Node]:
        return [n for n in self.gm.graph.nodes if n.op == "call_function"]

    def kind(self, op: object) -> str | None:
        return op_kind(op) if isinstance(op, torch.fx.Node) else None

    def meta(self, op: torch.fx.Node) -> MutableMapping:
        return op.meta

    def label(self, op: torch.fx.Node) -> str:
        return node_label(op)

    def names(self, op: torch.fx.Node) -> tuple[str, ...]:
        return tuple(n for n in (op.name, module_path(op)) if n)

    def name(self, op: torch.fx.Node) -> str:
        return op.name

    def describe(self, op: torch.fx.Node) -> str:
        return str(getattr(op.target, "__name__", op.target))

    def arg(self, op: torch.fx.Node, index: int) -> torch.fx.Node | None:
        a = op.args[index] if index < len(op.args) else None
        return self._through(a) if isinstance(a, torch.fx.Node) else None

    def output(self, op: torch.fx.Node) -> torch.fx.Node:
        return op

    def producer(self, tensor: object | None) -> torch.fx.Node | None:
        return tensor if isinstance(tensor, torch.fx.Node) and tensor.op == "call_function" else None

    def readers(self, tensor: torch.fx.Node) -> list[tuple[object | None, frozenset[int]]]:
        out = []
        for user in tensor.users:
            if user.op == "output":
                out.append((None, frozenset()))
            elif self._is_quantizer(user):
                out.append((QUANTIZER, frozenset({0})))
            else:
                out.append((user, frozenset(i for i, a in enumerate(user.args) if a is tensor)))
        return out

    def is_constant(self, tensor: object | None) -> bool:
        return is_constant(tensor)

    def constant_shape(self, tensor: torch.fx.Node) -> tuple[int, ...]:
        return tuple(constant_value(self.gm, tensor).shape)

    def shape(self, tensor: torch.fx.Node) -> tuple | None:
        val = tensor.meta.get("val")
        return tuple(val.shape) if val is not None else None

    def groups(self, op: torch.fx.Node) -> int:
        # conv{1,2,3}d and conv_transpose{1,2,3}d both carry groups at position 6
        if op_kind(op) not in ("Conv", "ConvTranspose"):
            return 1
        return int(op.args[6]) if len(op.args) > 6 else int(op.kwargs.get("groups", 1))

    def clip_min(self, op: torch.fx.Node) -> float | None:
        low = op.args[1] if len(op.args) > 1 else op.kwargs.get("min", op.kwargs.get("min_val"))
        if low is None and "hardtanh" in str(op.target):
            low = -1.0  # hardtanh's default
        return float(low) if isinstance(low, (int, float)) else None

    def concat_parts(self, op: torch.fx.Node) -> list[object | None]:
        parts = op.args[0] if op.args else ()
        return [self._through(p) if isinstance(p, torch.fx.Node) else None for p in parts]


def module_path(node: torch.fx.Node) -> str:
    """The dotted path of the module that produced ``node`` (``features.0``), or ''."""
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def view_of(graph: object) -> GraphView:
    """The planner's view of a torch.fx GraphModule or an onnx-ir model."""
    if isinstance(graph, torch.fx.GraphModule):
        return FxView(graph)
    from qgraph.onnx_graph import OnnxView

    return OnnxView(graph)
