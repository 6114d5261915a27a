"""Round Linear weights with GPTQ instead of to nearest: each column's rounding error is spread
over the columns not yet rounded, weighted by the layer's input statistics (Frantar et al., 2022).

For a Linear ``y = x W^T`` with calibration inputs X, GPTQ picks codes Q that keep
``||X W^T - X Q^T||`` small rather than ``||W - Q||``: with ``H = X^T X`` (plus ``damp`` times its
mean diagonal), columns are rounded left to right and the error ``(w_i - q_i) / U_ii`` of column
i is subtracted from the later columns through the Cholesky factor U of ``H^-1``. Scales follow
the weight's format: per tensor and per channel from the whole weight, as ``insert-qdq`` set them;
blocked formats (INT4 blocks, NVFP4 blocks of 16 with the weight's global scale kept, MX) from
each block's current values when GPTQ reaches it.

The pass runs after ``insert-qdq`` on the weights it quantized: it writes the rounded weights
(codes times scales) and their scales back, so the weight quantizer and every lowering give
GPTQ's codes. Layers are rounded in stages, each on inputs that come through the layers already
rounded (the paper's sequential order): a stage is every remaining Linear whose input no other
remaining Linear feeds, and each runs the calibration data up to the last input it needs.

Left alone (counted in ``skipped``, the reason in the debug log): weight quantizers that do not
feed a Linear as its weight (convolutions, MatMuls), shared weights, non-float32 weights and
layouts other than per tensor, per output channel or blocks along the input dimension.
Refused: a graph set up for QAT (``insert-fake-quant``: its weights track their scales).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.fx
from tqdm.auto import tqdm

from qgraph import _dist
from qgraph._errors import PreconditionError, QGraphError, first_line
from qgraph._pass import Pass, PassResult
from qgraph.graph import constant_value, is_constant, node_label, op_kind, set_attr
from qgraph.passes._util import batch_args
from qgraph.qops import block_amax, e4m3_ratio, round_to
from qgraph.quant import FakeQuant

__all__ = ["GPTQ", "GPTQ_META"]

logger = logging.getLogger(__name__)

#: gm.meta key: the weight quantizers GPTQ has rounded (a second run leaves them alone)
GPTQ_META = "qgraph.gptq"

_LAZY = 128  # columns updated together (the paper's lazy batch)


class GPTQ(Pass):
    """GPTQ rounding of the Linear weights ``insert-qdq`` quantized. Counts: ``weights``, ``skipped``.

    Args:
        data: calibration batches (as for ``calibrate``), re-iterable: read once per stage.
        damp: dampening added to H's diagonal, as a fraction of its mean (the paper's 0.01).
        progress: show a progress bar over the stages.
        merge_ranks: sum the layer statistics over torch.distributed's ranks, each with its own
            share of the data, so every rank writes the same weights (None: when initialized
            with more than one rank; every rank must run the pass).
    """

    name = "gptq"
    context_keys = ("data", "progress")

    def __init__(
        self, data: Iterable = (), damp: float = 0.01, progress: bool = False, merge_ranks: bool | None = None
    ) -> None:
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0.0 < float(damp) <= 1.0:
            raise PreconditionError(f"gptq: damp must be in (0, 1], got {damp!r}")
        if merge_ranks not in (None, True, False):
            raise PreconditionError(f"gptq: merge_ranks must be True, False or None, got {merge_ranks!r}")
        self.data = data
        self.damp = float(damp)
        self.progress = progress
        self.merge_ranks = merge_ranks

    def options(self) -> dict[str, object]:
        return {"damp": self.damp} if self.damp != 0.01 else {}

    def requires(self, graph: torch.fx.GraphModule) -> None:
        quantizers = [m for m in graph.modules() if isinstance(m, FakeQuant) and m.spec.role == "weight"]
        if not quantizers:
            raise PreconditionError("gptq rounds quantized weights: run `insert-qdq` first")
        if any(m.track_weight or m.learnable for m in quantizers):
            raise PreconditionError("gptq runs on the PTQ graph, before `insert-fake-quant` (its weights train)")

    def call(self, graph: torch.fx.GraphModule) -> PassResult:
        done = graph.meta.get(GPTQ_META, set())
        targets, skipped = [], 0
        for node in graph.graph.nodes:
            target, why = _target(graph, node)
            if why:
                skipped += 1
                logger.debug("gptq leaves %s alone: %s", node.name, why)
            elif target is not None and node.target not in done:
                targets.append(target)
        if not targets:
            return PassResult(graph, False, {"weights": 0, "skipped": skipped})
        if iter(self.data) is self.data:
            raise QGraphError("gptq reads the calibration data once per stage: pass a list, not a one-shot iterator")
        ranks = _dist.world(self.merge_ranks, "gptq")
        stages = _stages(graph, targets)
        done = graph.meta.setdefault(GPTQ_META, set())
        for stage in tqdm(stages, desc="gptq", unit="stage", disable=not self.progress):
            hessians = self._hessians(graph, stage, ranks)
            for t in stage:
                old = constant_value(graph, t.weight)
                weight, scale = _gptq(old, t.quantizer, hessians[t.linear.args[0]], self.damp, t.linear.name)
                set_attr(graph, t.weight.target, torch.nn.Parameter(weight, requires_grad=old.requires_grad))
                t.quantizer.scale.copy_(scale)
                done.add(t.node.target)
        return PassResult(graph, True, {"weights": sum(map(len, stages)), "skipped": skipped})

    def _hessians(self, gm: torch.fx.GraphModule, stage: list[_Target], ranks: int) -> dict[torch.fx.Node, torch.Tensor]:
        """``X^T X / rows`` (float64) of each stage input over the calibration data (of every
        rank when ``ranks`` > 1)."""
        inputs = list(dict.fromkeys(t.linear.args[0] for t in stage))
        recorder = _Hessians(gm, set(inputs))
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        batches, error = 0, None
        with torch.no_grad():
            try:
                for batch in self.data:
                    try:
                        recorder.run(*batch_args(batch, names))
                    except _Done:
                        pass
                    except QGraphError:
                        raise
                    except Exception as exc:
                        raise QGraphError(f"the model failed on calibration batch {batches}: {first_line(exc)}") from None
                    batches += 1
            except QGraphError as exc:
                error = exc
        sums = [recorder.sums.get(n, _zeros(n)) for n in inputs]
        rows = torch.tensor([batches] + [recorder.rows.get(n, 0) for n in inputs], dtype=torch.int64)
        if ranks > 1:  # every rank learns of a failure, then the statistics add up
            _dist.agree(error, "gptq")
            rows = _dist.all_reduce(rows)
            flat = _dist.all_reduce(torch.cat([h.flatten() for h in sums]))
            sums = [f.view_as(h) for f, h in zip(flat.split([h.numel() for h in sums]), sums)]
        elif error is not None:
            raise error
        if not int(rows[0]):
            raise QGraphError("gptq needs calibration data (it is empty)")
        return {n: h / max(int(r), 1) for n, h, r in zip(inputs, sums, rows[1:])}


class _Target:
    """One weight GPTQ rounds: its get_attr, quantizer node and module, and the Linear reading it."""

    def __init__(self, weight: torch.fx.Node, node: torch.fx.Node, quantizer: FakeQuant, linear: torch.fx.Node) -> None:
        self.weight, self.node, self.quantizer, self.linear = weight, node, quantizer, linear


def _target(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[_Target | None, str]:
    """(the target, '') for a weight quantizer GPTQ can round, (None, why not) for another weight
    quantizer, (None, '') for any other node."""
    if node.op != "call_module":
        return None, ""
    fq = gm.get_submodule(node.target)
    if not isinstance(fq, FakeQuant) or fq.spec.role != "weight":
        return None, ""
    weight = node.args[0]
    users = list(node.users)
    if len(users) != 1:
        return None, f"the quantized weight has {len(users)} readers (a shared weight)"
    if op_kind(users[0]) != "Gemm" or users[0].args[1] is not node or users[0].args[0] is node:
        return None, f"it feeds {node_label(users[0])}, not a Linear as its weight"
    if not is_constant(weight) or list(weight.users) != [node] or sum(
        1 for n in gm.graph.nodes if n.op == "get_attr" and n.target == weight.target
    ) != 1:
        return None, "the weight is shared or not a constant"
    w = constant_value(gm, weight)
    spec = fq.spec
    if w.dtype != torch.float32 or w.dim() != 2:
        return None, f"a {w.dtype} weight of rank {w.dim()} (float32 (out, in) only)"
    per_tensor = spec.axis is None and not spec.block_size
    per_channel = spec.axis == 0 and not spec.block_size
    blocked = spec.block_size and spec.axis in (1, -1)
    if spec.dynamic or not (per_tensor or per_channel or blocked) or (spec.is_int8 and spec.low is not None):
        return None, f"layout {spec.describe()}"
    return _Target(weight, node, fq, users[0]), ""


def _stages(gm: torch.fx.GraphModule, targets: list[_Target]) -> list[list[_Target]]:
    """Targets grouped so that no target's input depends on a target of its own or a later stage."""
    by_linear = {t.linear: t for t in targets}
    upstream: dict[torch.fx.Node, frozenset] = {}  # node -> the target Linears it depends on
    for node in gm.graph.nodes:
        deps = frozenset().union(*(upstream[a] for a in node.all_input_nodes))
        upstream[node] = deps | {node} if node in by_linear else deps
    remaining, stages = list(targets), []
    while remaining:
        pending = {t.linear for t in remaining}
        stage = [t for t in remaining if not (upstream[t.linear.args[0]] & pending)]
        stages.append(stage)
        remaining = [t for t in remaining if t not in stage]
    return stages


class _Done(Exception):
    """Raised by :class:`_Hessians` once every watched input is computed: the rest is not needed."""


class _Hessians(torch.fx.Interpreter):
    """Runs the graph and sums ``X^T X`` of the watched nodes (their last axis: a Linear's input)."""

    def __init__(self, gm: torch.fx.GraphModule, watch: set[torch.fx.Node]) -> None:
        super().__init__(gm)
        self.watch = watch
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.last = max(watch, key=order.__getitem__)
        self.sums: dict[torch.fx.Node, torch.Tensor] = {}
        self.rows: dict[torch.fx.Node, int] = {}

    def run_node(self, n: torch.fx.Node):  # noqa: ANN201 - whatever the node returns
        out = super().run_node(n)
        if n in self.watch:
            x = out.detach().reshape(-1, out.shape[-1]).to(torch.float64)
            xtx = x.T @ x
            self.sums[n] = xtx if n not in self.sums else self.sums[n] + xtx
            self.rows[n] = self.rows.get(n, 0) + x.shape[0]
            if n is self.last:
                raise _Done
        return out


def _zeros(node: torch.fx.Node) -> torch.Tensor:
    """An empty ``X^T X`` for a Linear input this rank never computed (no data on this rank)."""
    k = node.meta["val"].shape[-1]
    return torch.zeros(k, k, dtype=torch.float64)


def _gptq(
    w: torch.Tensor, fq: FakeQuant, hessian: torch.Tensor, damp: float, label: str = "the layer"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rounded weight: codes times scales, the quantizer's scale) of one (out, in) weight read
    by the Linear ``label``."""
    spec, block = fq.spec, fq.spec.block_size or 0
    W = w.detach().to(torch.float32).clone()
    k = W.shape[1]
    H = hessian.clone()
    if not bool(torch.isfinite(H).all()):
        raise QGraphError(f"gptq: the calibration inputs of {label} are not finite (NaN or Inf)")
    dead = torch.diagonal(H) == 0  # inputs that were always 0: their weights do not matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diagonal(H).mean() * torch.eye(k, dtype=H.dtype)
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:
        raise QGraphError(f"gptq: the input statistics of {label} are singular even dampened; raise damp") from None
    U = U.to(torch.float32)
    scale = fq.scale.detach().clone()  # per tensor / channel: insert-qdq's, from the whole weight
    g = fq.global_scale.detach() if hasattr(fq, "global_scale") else torch.ones((), dtype=torch.float32)
    lazy = -(-_LAZY // block) * block if block else _LAZY  # whole format blocks per lazy batch
    Q = torch.zeros_like(W)
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if block and col % block == 0:  # a new format block: its scale from its current values
                scale[:, col // block] = _block_scale(spec, W1[:, i : i + block], g)
            s = (scale[:, col // block] if block else scale) * g
            q = _rounded(W1[:, i], s, spec)
            Q[:, col] = q
            E1[:, i] = (W1[:, i] - q) / U1[i, i]
            W1[:, i:] -= E1[:, i : i + 1] * U1[i : i + 1, i:]
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return Q, scale


def _block_scale(spec, columns: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """The scale of one block of ``columns`` (out, block) by the format's rule, as (out,)."""
    if spec.scale_type == "fp8_e4m3":  # NVFP4: E4M3 multiples of the weight's global scale (kept)
        return e4m3_ratio(block_amax(columns, 1, spec.block_size) / (global_scale * 6.0))[:, 0]
    return FakeQuant.weight_scales(spec, columns)[0][:, 0]


def _rounded(x: torch.Tensor, s: torch.Tensor, spec) -> torch.Tensor:  # noqa: ANN001
    """``x`` quantized and dequantized with the effective scale ``s``, as the weight's quantizer does."""
    if spec.is_int8:
        return torch.clamp(torch.round(x / s), spec.qmin, spec.qmax) * s
    return round_to(x / s, spec.dtype) * s
