"""Insert an :class:`~qgraph.observers.Observer` on every annotated activation edge.

One observer per (producer, spec): a tensor read by three quantized consumers (say the q, k and v
projections) is observed once and all three read the observer's output. Weight edges get no
observer: weights are constants and their ranges are read directly by ``insert-qdq``; nor do
MX activations, whose block scales are computed at run time.
"""

from __future__ import annotations

import torch
import torch.fx

from qgraph._errors import PreconditionError
from qgraph._pass import Pass, PassResult
from qgraph.calibrators import CALIBRATORS
from qgraph.observers import Observer
from qgraph.passes._util import FLOAT_META, QUANT_META, insert_module_after, is_quantizer
from qgraph.graph import op_kind, unique_attr_name

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

    def requires(self, graph: torch.fx.GraphModule) -> None:
        if not any(QUANT_META in n.meta for n in graph.graph.nodes):
            floats = [n for n in graph.graph.nodes if n.meta.get(FLOAT_META)]
            # the most telling reason: a GEMM's, then a Conv's, then any
            floats.sort(key=lambda n: {"Gemm": 0, "MatMul": 0, "Conv": 1}.get(op_kind(n) or "", 2))
            if floats:
                raise PreconditionError(
                    f"the plan quantizes nothing ({floats[0].name}: {floats[0].meta[FLOAT_META]})"
                )
            raise PreconditionError("no quantization annotations: run `annotate` first")

    def call(self, graph: torch.fx.GraphModule) -> PassResult:
        observers: dict[tuple[torch.fx.Node, object], torch.fx.Node] = {}
        inserted = 0
        for node in list(graph.graph.nodes):
            for index, spec in (node.meta.get(QUANT_META) or {}).items():
                src = node.args[index]
                if not spec.needs_calibration or is_quantizer(graph, src):
                    continue
                if self.calibrator in _INT8_GRID_CALIBRATORS and not spec.is_int8:
                    raise PreconditionError(
                        f"calibrator {self.calibrator} searches thresholds on the INT8 grid; "
                        f"input {index} of {node.name} is {spec.describe()}: use max or percentile"
                    )
                key = (src, spec)
                if key not in observers:
                    name = unique_attr_name(graph, f"obs_{src.name}")
                    module = Observer(
                        spec,
                        self.calibrator,
                        percentile=self.percentile,
                        bins=self.bins,
                        label=f"input {index} of {node.name} (output of {src.name})",
                    )
                    observers[key] = insert_module_after(graph, src, name, module)
                    inserted += 1
                node.update_arg(index, observers[key])
        if inserted:
            graph.recompile()
        return PassResult(graph, inserted > 0, {"observers": inserted})
