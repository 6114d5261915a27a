"""Run calibration data through the graph so its observers collect statistics.

Only observers that have not seen data yet are fed (the others are switched off for the run), so
running ``calibrate`` twice does not count the same data twice and the second run reports
``modified=False``. The data is any iterable of input tuples (or single tensors, or dicts keyed
by input name); a progress bar is shown when ``progress=True``.

An ONNX model (onnx-ir) runs in onnxruntime instead, with the tensors its observers watch exposed
as extra outputs; each batch feeds the same observers (and calibrators) as the torch graph, and
is dropped before the next one, so memory holds one batch of activations, not the data set.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir
import torch
import torch.fx
from tqdm.auto import tqdm

from qgraph._errors import QGraphError, first_line
from qgraph._pass import Pass, PassResult
from qgraph.observers import Observer
from qgraph.onnx_graph import OBSERVERS_META, session
from qgraph.passes._util import batch_args

__all__ = ["Calibrate"]


class Calibrate(Pass):
    """Feed calibration batches through un-calibrated observers. Counts: ``batches``, ``observers``.

    Args:
        data: an iterable of batches; re-iterable if the pass is to run more than once.
        progress: show a progress bar (tqdm) while calibrating.
    """

    name = "calibrate"
    graphs = ("fx", "onnx")
    context_keys = ("data", "progress")

    def __init__(self, data: Iterable = (), progress: bool = False) -> None:
        self.data = data
        self.progress = progress

    def call(self, graph: torch.fx.GraphModule | ir.Model) -> PassResult:
        if isinstance(graph, ir.Model):
            return self._call_onnx(graph)
        observers = [m for m in graph.modules() if isinstance(m, Observer)]
        fresh = [m for m in observers if m.batches == 0]
        if not fresh:
            return PassResult(graph, False, {"batches": 0, "observers": 0})
        for m in observers:
            m.enabled = m.batches == 0
        names = [n.name for n in graph.graph.nodes if n.op == "placeholder"]
        batches = 0
        try:
            with torch.no_grad():
                for batch in tqdm(self.data, desc="calibrating", unit="batch", disable=not self.progress):
                    try:
                        graph(*batch_args(batch, names))
                    except QGraphError:
                        raise
                    except Exception as exc:
                        raise QGraphError(
                            f"the model failed on calibration batch {batches}: {first_line(exc)}"
                        ) from None
                    batches += 1
        finally:
            for m in observers:
                m.enabled = True
        if batches == 0:
            raise QGraphError("calibration data is empty")
        return PassResult(graph, True, {"batches": batches, "observers": len(fresh)})

    def _call_onnx(self, model: ir.Model) -> PassResult:
        """Run the model in onnxruntime with the observed tensors as extra outputs, batch by
        batch; each batch's tensors go to their observers and are dropped (bounded memory)."""
        observers = model.graph.meta.get(OBSERVERS_META, {})
        fresh: dict[str, list[Observer]] = {}
        for (name, _), observer in observers.items():
            if observer.batches == 0:
                fresh.setdefault(name, []).append(observer)
        if not fresh:
            return PassResult(model, False, {"batches": 0, "observers": 0})
        values = {v.name: v for n in model.graph for v in n.outputs} | {v.name: v for v in model.graph.inputs}
        names = [v.name for v in model.graph.inputs]
        fetch = list(fresh)
        batches = 0
        with session(model, [values[n] for n in fetch]) as sess:
            for batch in tqdm(self.data, desc="calibrating", unit="batch", disable=not self.progress):
                feeds = {n: np.asarray(t) for n, t in zip(names, batch_args(batch, names))}
                try:
                    outs = sess.run(fetch, feeds)
                except Exception as exc:
                    raise QGraphError(f"the model failed on calibration batch {batches}: {first_line(exc)}") from None
                for name, out in zip(fetch, outs):
                    for observer in fresh[name]:
                        observer(out)  # numpy: the observers take arrays as they are
                batches += 1
        if batches == 0:
            raise QGraphError("calibration data is empty")
        return PassResult(model, True, {"batches": batches, "observers": sum(map(len, fresh.values()))})
