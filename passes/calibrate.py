"""Run calibration data through the graph so its observers collect statistics.

Only observers that have not seen data yet are fed (the others are switched off for the run), so
running ``calibrate`` twice does not count the same data twice and the second run reports
``modified=False``. The data is any iterable of input tuples (or single tensors, or dicts keyed
by input name); a progress bar is shown when ``progress=True``.

An ONNX model (onnx-ir) runs in onnxruntime instead, with the tensors its observers watch exposed
as extra outputs; each batch feeds the same observers (and calibrators) as the torch graph, and
is dropped before the next one, so memory holds one batch of activations, not the data set.
Where the model's batch axis is dynamic, consecutive batches of one shape run together while
their observed outputs stay under ``run_bytes`` (bytes per sample from the tensors' shapes, or
measured on a first batch run alone where shapes are symbolic): small models then pay onnxruntime's per-run cost once, not per batch, and
every calibrator ends with the same statistics (histograms are exact under any grouping). This
treats samples as independent, as inference models do; ``run_bytes=0`` runs batches as given.
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
        run_bytes: ONNX models: the most bytes of observed tensors one onnxruntime run may
            return (consecutive batches are concatenated up to it; 0 runs every batch alone).
    """

    name = "calibrate"
    graphs = ("fx", "onnx")
    context_keys = ("data", "progress")

    def __init__(self, data: Iterable = (), progress: bool = False, run_bytes: int = 64 << 20) -> None:
        self.data = data
        self.progress = progress
        self.run_bytes = run_bytes

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
        stackable = _shared_batch_axis(model)
        state = {"batches": 0, "rows_per_run": _rows_per_run(values, fetch, self.run_bytes) if stackable else 0}

        def run(pending: list[dict[str, np.ndarray]]) -> None:
            first, done = state["batches"], state["batches"] + len(pending)
            feeds = pending[0] if len(pending) == 1 else {n: np.concatenate([f[n] for f in pending]) for n in names}
            try:
                outs = sess.run(fetch, feeds)
            except Exception as exc:
                which = f"batch {first}" if len(pending) == 1 else f"batches {first}-{done - 1}"
                raise QGraphError(f"the model failed on calibration {which}: {first_line(exc)}") from None
            if stackable and not state["rows_per_run"]:  # shapes unknown: the first run measures
                rows = len(next(iter(feeds.values())))
                per_row = sum(o.nbytes for o in outs) / max(rows, 1)
                state["rows_per_run"] = max(rows, int(self.run_bytes // max(per_row, 1.0)))
            for name, out in zip(fetch, outs):
                for observer in fresh[name]:
                    observer(out)  # numpy: the observers take arrays as they are
            state["batches"] = done

        with session(model, [values[n] for n in fetch]) as sess:
            pending: list[dict[str, np.ndarray]] = []
            rows = 0
            for batch in tqdm(self.data, desc="calibrating", unit="batch", disable=not self.progress):
                feeds = {n: np.asarray(t) for n, t in zip(names, batch_args(batch, names))}
                n = _rows(feeds) if stackable else None
                if pending and (n is None or not _same_shape(pending[0], feeds) or rows + n > state["rows_per_run"]):
                    run(pending)
                    pending, rows = [], 0
                if n is None:  # a batch that cannot join others runs alone
                    run([feeds])
                    continue
                pending.append(feeds)
                rows += n
            if pending:
                run(pending)
        if state["batches"] == 0:
            raise QGraphError("calibration data is empty")
        return PassResult(model, True, {"batches": state["batches"], "observers": sum(map(len, fresh.values()))})


def _shared_batch_axis(model: ir.Model) -> bool:
    """Whether every input's axis 0 is the same symbolic dimension (batches can run together)."""
    firsts = {v.shape[0] if v.shape is not None and len(v.shape) else None for v in model.graph.inputs}
    return len(firsts) == 1 and next(iter(firsts)) is not None and not isinstance(next(iter(firsts)), int)


def _rows_per_run(values: dict[str, ir.Value], fetch: list[str], run_bytes: int) -> int:
    """Samples per run under ``run_bytes`` from the observed tensors' shapes (a symbolic batch
    axis, static dimensions after it); 0 when a shape is unknown."""
    per_row = 0
    for name in fetch:
        value = values[name]
        dims = list(value.shape or ())[1:] if value.shape is not None and len(value.shape) else None
        if dims is None or value.dtype is None or not all(isinstance(d, int) for d in dims):
            return 0
        per_row += int(np.prod(dims, dtype=np.int64)) * value.dtype.itemsize
    return max(1, int(run_bytes // max(per_row, 1)))


def _rows(feeds: dict[str, np.ndarray]) -> int | None:
    """The batch's rows when every input has the same length on axis 0, else None."""
    sizes = {a.shape[0] if a.ndim else None for a in feeds.values()}
    return sizes.pop() if len(sizes) == 1 and None not in sizes else None


def _same_shape(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    """Whether two batches can be concatenated: the same dtypes and shapes after axis 0."""
    return all(a[k].shape[1:] == b[k].shape[1:] and a[k].dtype == b[k].dtype for k in a)
