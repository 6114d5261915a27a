"""Insert an :class:`~qgraph.observers.Observer` on every annotated activation edge.

One observer per (producer, spec): a tensor read by three quantized consumers (say the q, k and v
projections) is observed once and all three read the observer's output. Weight edges get no
observer: weights are constants and their ranges are read directly by ``insert-qdq``; nor do
MX activations, whose block scales are computed at run time.

On an ONNX model (onnx-ir) nothing is inserted into the graph: the observers are kept in
``graph.meta`` keyed by (tensor name, spec), and ``calibrate`` feeds them from onnxruntime.
"""

from __future__ import annotations

import onnx_ir as ir
import torch
import torch.fx

from qgraph._errors import PreconditionError
from qgraph._pass import Pass, PassResult
from qgraph.calibrators import CALIBRATORS
from qgraph.graph import unique_attr_name
from qgraph.observers import Observer
from qgraph.onnx_graph import OBSERVERS_META, is_dequantized, planned_edges
from qgraph.passes._util import FLOAT_META, QUANT_META, insert_module_after, is_quantizer
from qgraph.quant import QSpec
from qgraph.views import view_of

__all__ = ["InsertObservers"]

#: calibrators that score thresholds by the error of INT8 rounding (not FP8, FP4, block scales)
_INT8_GRID_CALIBRATORS = ("mse", "entropy")


class InsertObservers(Pass):
    """Insert activation observers. Counts: ``observers``.

    Args:
        calibrator: ``max``, ``percentile``, ``mse`` or ``entropy``.
        percentile: the percentile for ``calibrator=percentile``.
        bins: histogram resolution of each observer.
    """

    name = "insert-observers"
    graphs = ("fx", "onnx")

    def __init__(self, calibrator: str = "max", percentile: float = 99.99, bins: int = 2048) -> None:
        if calibrator not in CALIBRATORS:
            raise PreconditionError(
                f"unknown calibrator {calibrator!r} (known: {', '.join(CALIBRATORS)})"
            )
        if not isinstance(bins, int) or bins < 128:
            raise PreconditionError(f"bins must be an integer >= 128, got {bins!r}")
        if not 0.0 < float(percentile) <= 100.0:
            raise PreconditionError(f"percentile must be in (0, 100], got {percentile}")
        self.calibrator = calibrator
        self.percentile = float(percentile)
        self.bins = int(bins)

    def options(self) -> dict[str, object]:
        opts: dict[str, object] = {"calibrator": self.calibrator}
        if self.percentile != 99.99:
            opts["percentile"] = self.percentile
        if self.bins != 2048:
            opts["bins"] = self.bins
        return opts

    def requires(self, graph: torch.fx.GraphModule | ir.Model) -> None:
        view = view_of(graph)
        ops = list(view.ops())
        if not any(QUANT_META in view.meta(n) for n in ops):
            floats = [n for n in ops if view.meta(n).get(FLOAT_META)]
            # the most telling reason: a GEMM's, then a Conv's, then any
            floats.sort(key=lambda n: {"Gemm": 0, "MatMul": 0, "Conv": 1}.get(view.kind(n) or "", 2))
            if floats:
                raise PreconditionError(
                    f"the plan quantizes nothing ({(view.names(floats[0]) or (view.label(floats[0]),))[0]}: {view.meta(floats[0])[FLOAT_META]})"
                )
            raise PreconditionError("no quantization annotations: run `annotate` first")

    def _check_calibrator(self, spec: QSpec, index: int, name: str) -> None:
        if self.calibrator in _INT8_GRID_CALIBRATORS and not spec.is_int8:
            raise PreconditionError(
                f"calibrator {self.calibrator} searches thresholds on the INT8 grid; "
                f"input {index} of {name} is {spec.describe()}: use max or percentile"
            )

    def _observer(self, spec: QSpec, label: str) -> Observer:
        return Observer(spec, self.calibrator, percentile=self.percentile, bins=self.bins, label=label)

    def _call_onnx(self, model: ir.Model) -> PassResult:
        """ONNX: the observers are kept beside the graph (``graph.meta``), keyed by tensor name;
        ``calibrate`` runs the model in onnxruntime and feeds them."""
        observers = model.graph.meta.setdefault(OBSERVERS_META, {})
        inserted = 0
        for node, index, value, spec in planned_edges(model):
            if not spec.needs_calibration or spec.role == "weight" or is_dequantized(value):
                continue
            self._check_calibrator(spec, index, node.name)
            if (value.name, spec) not in observers:
                label = f"input {index} of {node.name} (tensor {value.name})"
                observers[(value.name, spec)] = self._observer(spec, label)
                inserted += 1
        return PassResult(model, inserted > 0, {"observers": inserted})

    def call(self, graph: torch.fx.GraphModule | ir.Model) -> PassResult:
        if isinstance(graph, ir.Model):
            return self._call_onnx(graph)
        observers: dict[tuple[torch.fx.Node, object], torch.fx.Node] = {}
        inserted = 0
        for node in list(graph.graph.nodes):
            for index, spec in (node.meta.get(QUANT_META) or {}).items():
                src = node.args[index]
                if not spec.needs_calibration or is_quantizer(graph, src):
                    continue
                self._check_calibrator(spec, index, node.name)
                key = (src, spec)
                if key not in observers:
                    name = unique_attr_name(graph, f"obs_{src.name}")
                    module = self._observer(spec, f"input {index} of {node.name} (output of {src.name})")
                    observers[key] = insert_module_after(graph, src, name, module)
                    inserted += 1
                node.update_arg(index, observers[key])
        if inserted:
            graph.recompile()
        return PassResult(graph, inserted > 0, {"observers": inserted})
