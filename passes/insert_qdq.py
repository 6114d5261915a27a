"""Replace calibrated observers with fake-quant nodes and quantize annotated weights.

Every :class:`~qgraph.observers.Observer` becomes a :class:`~qgraph.quant.FakeQuant` carrying the
scale ``amax / 127`` from its calibrator (zero-point 0). Every annotated constant weight edge gets a
``FakeQuant`` whose per-channel scales come from the weight's own per-channel ``amax``. The
fake-quant op is ``torch.ops.qgraph.fake_quant``, which the backends export as ONNX
``QuantizeLinear``/``DequantizeLinear`` computing the same codes.
"""

from __future__ import annotations

import torch
import torch.fx

from qgraph._errors import PreconditionError
from qgraph._pass import Pass, PassResult
from qgraph.graph import constant_value, is_constant, unique_attr_name
from qgraph.observers import Observer
from qgraph.passes._util import QUANT_META, insert_module_after
from qgraph.quant import FakeQuant, QSpec, symmetric_scale

__all__ = ["InsertQDQ"]


class InsertQDQ(Pass):
    """Turn the calibrated plan into fake-quant nodes. Counts: ``activations``, ``weights``."""

    name = "insert-qdq"

    def requires(self, graph: torch.fx.GraphModule) -> None:
        for name, module in graph.named_modules():
            if isinstance(module, Observer) and module.batches == 0:
                raise PreconditionError(f"observer {name} has seen no data: run `calibrate` first")

    def call(self, graph: torch.fx.GraphModule) -> PassResult:
        activations = self._replace_observers(graph)
        weights = self._quantize_weights(graph)
        if activations or weights:
            graph.recompile()
        counts = {"activations": activations, "weights": weights}
        return PassResult(graph, activations + weights > 0, counts)

    def _replace_observers(self, gm: torch.fx.GraphModule) -> int:
        replaced = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            observer = gm.get_submodule(node.target)
            if not isinstance(observer, Observer):
                continue
            scale = symmetric_scale(torch.tensor(observer.amax()), observer.spec)
            name = unique_attr_name(gm, node.target.replace("obs_", "fq_", 1))
            gm.add_module(name, FakeQuant(observer.spec, scale))
            with gm.graph.inserting_before(node):
                fq_node = gm.graph.call_module(name, node.args)  # named after its module
            fq_node.meta = dict(node.meta)
            node.replace_all_uses_with(fq_node)
            gm.graph.erase_node(node)
            delattr(gm, node.target)
            replaced += 1
        return replaced

    def _quantize_weights(self, gm: torch.fx.GraphModule) -> int:
        made: dict[tuple[torch.fx.Node, QSpec], torch.fx.Node] = {}
        for node in list(gm.graph.nodes):
            for index, spec in (node.meta.get(QUANT_META) or {}).items():
                src = node.args[index]
                if spec.role != "weight" or not is_constant(src):
                    continue
                key = (src, spec)
                if key not in made:
                    scale = symmetric_scale(_amax(constant_value(gm, src), spec.axis), spec)
                    name = unique_attr_name(gm, f"fq_{src.target}")
                    made[key] = insert_module_after(gm, src, name, FakeQuant(spec, scale))
                node.update_arg(index, made[key])
        return len(made)


def _amax(weight: torch.Tensor, axis: int | None) -> torch.Tensor:
    w = weight.detach().abs()
    if axis is None:
        return w.max()
    return w.movedim(axis, 0).reshape(w.shape[axis], -1).max(dim=1).values
