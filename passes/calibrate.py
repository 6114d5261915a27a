"""Run calibration data through the graph so its observers collect statistics.

Only observers that have not seen data yet are fed (the others are switched off for the run), so
running ``calibrate`` twice does not count the same data twice and the second run reports
``modified=False``. The data is any iterable of input tuples (or single tensors, or dicts keyed
by input name); a progress bar is shown when ``progress=True``.

An ONNX model (onnx-ir) runs in onnxruntime instead, with the tensors its observers watch exposed
as extra outputs; each batch feeds the same observers (and calibrators) as the torch graph, and
is dropped before the next one, so memory holds one run's activations, not the data set.
Where every model input has one named symbolic batch axis, consecutive batches of one shape run
together while their observed outputs stay under ``run_bytes`` (bytes per sample from the
tensors' shapes, or measured on the first batch of each shape, run alone): small models then pay
onnxruntime's per-run cost once, not per batch, and every calibrator ends with the same
statistics (histograms are exact under any grouping). This treats samples as independent, as
inference models do; a model that fails on joined batches (a batch size fixed inside) is run
batch by batch from then on, and ``run_bytes=0`` runs batches as given.

Under torch.distributed (torchrun) each rank calibrates on its own share of the data and, at the
end, the observers' histograms are merged across the ranks (:func:`all_reduce_histograms`): every
rank ends with the statistics one process would have collected from all the data, so every
calibrator picks the same range on every rank. Every rank must then run the pass (a rank with no
batches takes part with empty statistics; a rank that fails makes every rank raise rather than
wait); code that calibrates on one rank only passes ``merge_ranks=False``, which keeps each
rank's own statistics.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir
import torch
import torch.fx
from tqdm.auto import tqdm

from qgraph import _dist
from qgraph._errors import PreconditionError, QGraphError, first_line
from qgraph._pass import Pass, PassResult
from qgraph.calibrators import all_reduce_histograms
from qgraph.observers import Observer
from qgraph.onnx_graph import OBSERVERS_META, session
from qgraph.passes._util import batch_args

__all__ = ["Calibrate"]


class Calibrate(Pass):
    """Feed calibration batches through un-calibrated observers. Counts: ``batches``, ``observers``
    (and ``ranks`` where statistics were merged across torch.distributed ranks; ``batches`` is
    then the sum over the ranks).

    Args:
        data: an iterable of batches; re-iterable if the pass is to run more than once.
        progress: show a progress bar (tqdm) while calibrating.
        run_bytes: ONNX models: the most bytes of observed tensors one onnxruntime run may
            return (consecutive batches are concatenated up to it; 0 runs every batch alone).
        merge_ranks: merge the statistics across the ranks of torch.distributed's default group
            (None: when it is initialized with more than one rank). Every rank must run the pass.
    """

    name = "calibrate"
    graphs = ("fx", "onnx")
    context_keys = ("data", "progress")

    def __init__(
        self, data: Iterable = (), progress: bool = False, run_bytes: int = 64 << 20, merge_ranks: bool | None = None
    ) -> None:
        if isinstance(run_bytes, bool) or not isinstance(run_bytes, int) or run_bytes < 0:
            raise PreconditionError(f"run_bytes must be an integer >= 0, got {run_bytes!r}")
        if merge_ranks not in (None, True, False):
            raise PreconditionError(f"merge_ranks must be True, False or None, got {merge_ranks!r}")
        self.data = data
        self.progress = progress
        self.run_bytes = run_bytes
        self.merge_ranks = merge_ranks

    def _finish(self, fresh: list[Observer], batches: int, ranks: int, error: QGraphError | None) -> dict[str, int]:
        """Merge the fresh observers' statistics across ``ranks`` (> 1) once every rank has
        finished (or failed: then all raise) and check that some data was seen; returns the
        pass's counts."""
        if ranks > 1:
            _dist.agree(error, "calibration")
        elif error is not None:
            raise error
        counts = {"batches": batches, "observers": len(fresh)}
        if ranks > 1:
            seen = _dist.all_reduce(torch.tensor([batches] + [m.batches for m in fresh], dtype=torch.int64))
            all_reduce_histograms([m.hist for m in fresh])
            for m, n in zip(fresh, seen[1:].tolist()):
                m.batches = n
            counts.update(batches=int(seen[0]), ranks=ranks)
        if counts["batches"] == 0:
            raise QGraphError("calibration data is empty")
        return counts

    def call(self, graph: torch.fx.GraphModule | ir.Model) -> PassResult:
        if isinstance(graph, ir.Model):
            return self._call_onnx(graph)
        observers = [m for m in graph.modules() if isinstance(m, Observer)]
        fresh = [m for m in observers if m.batches == 0]
        if not fresh:
            return PassResult(graph, False, {"batches": 0, "observers": 0})
        ranks = _dist.world(self.merge_ranks, "calibrate")
        for m in observers:
            m.enabled = m.batches == 0
        names = [n.name for n in graph.graph.nodes if n.op == "placeholder"]
        batches, error = 0, None
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
        except QGraphError as exc:
            error = exc  # raised in _finish, after the other ranks have heard of it
        finally:
            for m in observers:
                m.enabled = True
        return PassResult(graph, True, self._finish(fresh, batches, ranks, error))

    def _call_onnx(self, model: ir.Model) -> PassResult:
        """Run the model in onnxruntime with the observed tensors as extra outputs, run by run;
        each run's tensors go to their observers and are dropped (bounded memory)."""
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
        batch_dim = _shared_batch_dim(model) if self.run_bytes > 0 else None
        # rows per run: from the observed tensors' shapes, or measured per input shape on a batch
        # of that shape run alone
        static_rows = _rows_from_shapes(values, fetch, batch_dim, self.run_bytes) if batch_dim is not None else 0
        measured: dict[tuple, int] = {}
        state = {"batches": 0, "join": batch_dim is not None}

        def limit(signature: tuple) -> int:
            return static_rows or measured.get(signature, 0)

        def run(pending: list[dict[str, np.ndarray]]) -> None:
            if len(pending) > 1:
                try:
                    outs = sess.run(fetch, {n: np.concatenate([f[n] for f in pending]) for n in names})
                except Exception:  # the model does not take joined batches (a fixed batch size)
                    state["join"] = False  # one by one from here on, which also finds a bad batch
                    for feeds in pending:
                        run([feeds])
                    return
            else:
                try:
                    outs = sess.run(fetch, pending[0])
                except Exception as exc:
                    raise QGraphError(f"the model failed on calibration batch {state['batches']}: {first_line(exc)}") from None
            rows = sum(_rows(f) or 0 for f in pending)
            if state["join"] and rows and not limit(_signature(pending[0])):  # measure this shape's bytes per sample
                measured[_signature(pending[0])] = max(1, int(self.run_bytes // max(sum(o.nbytes for o in outs) / rows, 1.0)))
            for name, out in zip(fetch, outs):
                for observer in fresh[name]:
                    observer(out)  # numpy: the observers take arrays as they are
            state["batches"] += len(pending)

        ranks, error = _dist.world(self.merge_ranks, "calibrate"), None
        try:
            with session(model, [values[n] for n in fetch]) as sess:
                pending: list[dict[str, np.ndarray]] = []
                pending_signature, rows = None, 0
                for batch in tqdm(self.data, desc="calibrating", unit="batch", disable=not self.progress):
                    feeds = {n: np.asarray(t) for n, t in zip(names, batch_args(batch, names))}
                    n = _rows(feeds) if state["join"] else None
                    signature = _signature(feeds) if n is not None else None
                    cap = limit(signature) if signature is not None else 0  # 0: cannot join
                    if pending and not (cap and signature == pending_signature and rows + n <= cap):
                        run(pending)
                        pending, rows = [], 0
                    if not (cap and state["join"]):  # runs alone: cannot join, or measures its shape
                        run([feeds])
                        continue
                    pending.append(feeds)
                    pending_signature, rows = signature, rows + n
                if pending:
                    run(pending)
        except QGraphError as exc:
            error = exc  # raised in _finish, after the other ranks have heard of it
        fresh_list = [m for ms in fresh.values() for m in ms]
        return PassResult(model, True, self._finish(fresh_list, state["batches"], ranks, error))


def _shared_batch_dim(model: ir.Model) -> ir.SymbolicDim | None:
    """The named symbolic dimension that is axis 0 of every model input, or None."""
    firsts = {v.shape[0] if v.shape is not None and len(v.shape) else None for v in model.graph.inputs}
    dim = firsts.pop() if len(firsts) == 1 else None
    return dim if isinstance(dim, ir.SymbolicDim) and dim.value is not None else None


def _rows_from_shapes(values: dict[str, ir.Value], fetch: list[str], batch_dim: ir.SymbolicDim, run_bytes: int) -> int:
    """Samples per run under ``run_bytes`` from the observed tensors' shapes: each must have the
    inputs' batch dimension on axis 0 and static dimensions after it; else 0 (measure instead)."""
    per_row = 0.0
    for name in fetch:
        value = values[name]
        shape = value.shape
        if shape is None or not len(shape) or shape[0] != batch_dim or value.dtype is None:
            return 0
        if not all(isinstance(d, int) for d in shape[1:]):
            return 0
        per_row += float(np.prod(list(shape[1:]), dtype=np.float64)) * value.dtype.itemsize
    return max(1, int(run_bytes // max(per_row, 1.0)))


def _rows(feeds: dict[str, np.ndarray]) -> int | None:
    """The batch's rows when every input has the same length on axis 0, else None."""
    sizes = {a.shape[0] if a.ndim else None for a in feeds.values()}
    return sizes.pop() if len(sizes) == 1 and None not in sizes else None


def _signature(feeds: dict[str, np.ndarray]) -> tuple:
    """What batches must share to be concatenated: input names, dtypes and shapes after axis 0."""
    return tuple((k, a.dtype.str, a.shape[1:]) for k, a in sorted(feeds.items()))
