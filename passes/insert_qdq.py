"""Replace calibrated observers with fake-quant nodes and quantize annotated weights.

Every :class:`~qgraph.observers.Observer` becomes a :class:`~qgraph.quant.FakeQuant` whose scale
comes from its calibrator's ``amax`` by the format's rule (``amax / 127`` for INT8, ``amax / 448``
for FP8, the NVFP4 per-tensor scale ``amax / 2688``). Every annotated constant weight edge gets a
``FakeQuant`` whose scales (per channel, per block, NVFP4 two-level, MX E8M0) are read off the
weight itself. Activations that need no calibration (MX: block scales at run time) get their
quantizer directly. The fake-quant ops (``qgraph::fake_quant``, ``qgraph::fake_quant_fmt``,
``qgraph::fake_quant_dynamic``) are what the backends export as Q/DQ computing the same codes.
"""

from __future__ import annotations

import torch
import torch.fx

from qgraph._errors import PreconditionError
from qgraph._pass import Pass, PassResult
from qgraph.graph import constant_value, is_constant, unique_attr_name
from qgraph.observers import Observer
from qgraph.passes._util import QUANT_META, insert_module_after, is_quantizer
from qgraph.quant import FakeQuant, QSpec

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
        weights, dynamic = self._quantize_constants_and_dynamic(graph)
        activations += dynamic
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
            name = unique_attr_name(gm, node.target.replace("obs_", "fq_", 1))
            gm.add_module(name, FakeQuant.for_activation(observer.spec, observer.amax()))
            with gm.graph.inserting_before(node):
                fq_node = gm.graph.call_module(name, node.args)  # named after its module
            fq_node.meta = dict(node.meta)
            node.replace_all_uses_with(fq_node)
            gm.graph.erase_node(node)
            delattr(gm, node.target)
            replaced += 1
        return replaced

    def _quantize_constants_and_dynamic(self, gm: torch.fx.GraphModule) -> tuple[int, int]:
        """Quantizers of constant weights and of uncalibrated (MX) activations: (weights, dynamic)."""
        made: dict[tuple[torch.fx.Node, QSpec], torch.fx.Node] = {}
        dynamic = 0
        for node in list(gm.graph.nodes):
            for index, spec in (node.meta.get(QUANT_META) or {}).items():
                src = node.args[index]
                if spec.role == "weight" and is_constant(src):
                    quantizer, base = (lambda: FakeQuant.for_weight(spec, constant_value(gm, src))), src.target
                elif spec.role == "activation" and not spec.needs_calibration and not is_quantizer(gm, src):
                    quantizer, base = (lambda: FakeQuant.for_activation(spec, 0.0)), src.name
                    dynamic += (src, spec) not in made
                else:
                    continue
                key = (src, spec)
                if key not in made:
                    name = unique_attr_name(gm, f"fq_{base}")
                    made[key] = insert_module_after(gm, src, name, quantizer())
                node.update_arg(index, made[key])
        return len(made) - dynamic, dynamic
