"""Move activation outliers from a LayerNorm's output into the weights that read it (SmoothQuant).

Per-tensor INT8 activations lose the small channels when a few channels are large (transformer
LayerNorm outputs: MiniLM's channel 99 reaches 28 where the median channel reaches 1.9). With
``a_j`` the calibrated max |x| of channel j and ``w_j`` the max |W[:, j]| over every Linear that
reads the LayerNorm (Xiao et al., 2023)::

    s_j = a_j^alpha / w_j^(1 - alpha)
    LayerNorm weight, bias  /=  s          (the LayerNorm now outputs x / s)
    Linear weight[:, j]     *=  s_j        (each Linear reading it: W (x / s) s = W x)
    other readers (a residual Add) read  (x / s) * s  through a new Mul

so the float function is unchanged (to rounding) while the quantized activation ``x / s`` has
flatter channels and the weights, quantized per output channel, absorb the difference.

Rewrite case: ``layer_norm(x, [C], weight, bias)`` with constant, unshared weight and bias whose
output is read by at least one ``linear`` (as its input, with a constant, unshared weight).
Refused (left unchanged): a LayerNorm already smoothed; one with quantizers already on its
output (run this before ``annotate``); normalisation over more than the last axis.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.fx
from tqdm.auto import tqdm

from qgraph._errors import QGraphError, first_line
from qgraph._pass import Pass, PassResult
from qgraph.graph import constant_value, is_constant, op_kind, set_attr, unique_attr_name
from qgraph.passes._util import batch_args

__all__ = ["SmoothQuant", "SMOOTHED_META"]

logger = logging.getLogger(__name__)

#: node.meta key set on a LayerNorm this pass smoothed (a second run leaves it alone).
SMOOTHED_META = "qgraph.smoothed"

_LN_WEIGHT, _LN_BIAS = 2, 3  # layer_norm(input, normalized_shape, weight, bias, eps, ...)


class SmoothQuant(Pass):
    """Fold per-channel smoothing factors into LayerNorm → Linear pairs. Counts: ``smoothed``.

    Args:
        data: calibration batches (as for ``calibrate``): the per-channel ranges come from them.
        alpha: migration strength in [0, 1]: 0 leaves activations alone, 1 moves all of their
            range into the weights; 0.5 is the paper's default.
        progress: show a progress bar while collecting ranges.
    """

    name = "smooth-quant"
    context_keys = ("data", "progress")

    def __init__(self, data: Iterable = (), alpha: float = 0.5, progress: bool = False) -> None:
        if not 0.0 <= float(alpha) <= 1.0:
            raise QGraphError(f"smooth-quant: alpha must be in [0, 1], got {alpha}")
        self.data = data
        self.alpha = float(alpha)
        self.progress = progress

    def call(self, graph: torch.fx.GraphModule) -> PassResult:
        pairs = {}
        for node in graph.graph.nodes:
            linears, why = _candidates(graph, node)
            if linears:
                pairs[node] = linears
            elif why:
                logger.debug("not smoothing %s: %s", node.name, why)
        if not pairs:
            return PassResult(graph, False, {"smoothed": 0})
        if iter(self.data) is self.data:
            raise QGraphError(
                "smooth-quant reads the calibration data before calibrate does: pass a list or "
                "another re-iterable collection of batches, not a one-shot iterator"
            )
        ranges = self._channel_ranges(graph, list(pairs))
        for norm, linears in pairs.items():
            self._smooth(graph, norm, linears, ranges[norm])
        graph.recompile()
        return PassResult(graph, True, {"smoothed": len(pairs)})

    def _channel_ranges(self, gm: torch.fx.GraphModule, watch: list[torch.fx.Node]) -> dict:
        recorder = _ChannelMax(gm, set(watch))
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        batches = 0
        with torch.no_grad():
            for batch in tqdm(self.data, desc="smoothing", unit="batch", disable=not self.progress):
                try:
                    recorder.run(*batch_args(batch, names))
                except QGraphError:
                    raise
                except Exception as exc:
                    raise QGraphError(f"the model failed on calibration batch {batches}: {first_line(exc)}") from None
                batches += 1
        if not batches:
            raise QGraphError("smooth-quant needs calibration data (it is empty)")
        return recorder.amax

    def _smooth(self, gm, norm, linears, amax) -> None:  # noqa: ANN001 - private helper
        weights = [constant_value(gm, lin.args[1]).detach().to(torch.float64) for lin in linears]
        w_max = torch.stack([w.abs().amax(0) for w in weights]).amax(0).clamp(min=1e-5)
        a_max = amax.to(torch.float64).clamp(min=1e-5)
        s = (a_max.pow(self.alpha) / w_max.pow(1.0 - self.alpha)).clamp(1e-5, 1e5)
        for index in (_LN_WEIGHT, _LN_BIAS):
            const = norm.args[index]
            value = constant_value(gm, const).detach()
            set_attr(gm, const.target, torch.nn.Parameter((value.to(torch.float64) / s).to(value.dtype), requires_grad=False))
        for lin, w in zip(linears, weights):
            old = constant_value(gm, lin.args[1])
            set_attr(gm, lin.args[1].target, torch.nn.Parameter((w * s).to(old.dtype), requires_grad=False))
        others = [u for u in norm.users if u not in linears]
        if others:
            target = unique_attr_name(gm, f"{norm.name}_smoothing")
            set_attr(gm, target, s.to(torch.float32))
            with gm.graph.inserting_after(norm):
                factor = gm.graph.get_attr(target)
            with gm.graph.inserting_after(factor):
                restored = gm.graph.call_function(torch.ops.aten.mul.Tensor, (norm, factor))
            restored.meta = {k: v for k, v in norm.meta.items() if k in ("val", "tensor_meta", "nn_module_stack", "stack_trace")}
            for user in others:
                user.replace_input_with(norm, restored)
        norm.meta[SMOOTHED_META] = True


def _candidates(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[list[torch.fx.Node], str]:
    """(the Linears reading a smoothable LayerNorm, '') or ([], why not)."""
    if op_kind(node) != "LayerNormalization":
        return [], ""
    if node.meta.get(SMOOTHED_META):
        return [], "already smoothed"
    if len(node.args) <= _LN_BIAS or len(node.args[1]) != 1:
        return [], "not a LayerNorm over the last axis with weight and bias"
    for index in (_LN_WEIGHT, _LN_BIAS):
        if not _own_constant(gm, node.args[index], node):
            return [], "weight or bias is not a constant of its own"
    if any(u.op == "call_module" for u in node.users):
        return [], "its output is already observed or quantized (run smooth-quant before annotate)"
    linears = [
        u for u in node.users
        if op_kind(u) == "Gemm" and u.args[0] is node and _own_constant(gm, u.args[1], u)
    ]
    return (linears, "") if linears else ([], "no Linear reads it")


def _own_constant(gm: torch.fx.GraphModule, const: object, user: torch.fx.Node) -> bool:
    if not is_constant(const) or list(const.users) != [user]:
        return False
    return sum(1 for n in gm.graph.nodes if n.op == "get_attr" and n.target == const.target) == 1


class _ChannelMax(torch.fx.Interpreter):
    """Runs the graph and keeps the per-channel (last axis) max |x| of the watched nodes."""

    def __init__(self, gm: torch.fx.GraphModule, watch: set[torch.fx.Node]) -> None:
        super().__init__(gm)
        self.watch = watch
        self.amax: dict[torch.fx.Node, torch.Tensor] = {}

    def run_node(self, n: torch.fx.Node):  # noqa: ANN201 - whatever the node returns
        out = super().run_node(n)
        if n in self.watch:
            a = out.detach().abs().reshape(-1, out.shape[-1]).amax(0).to(torch.float32)
            self.amax[n] = a if n not in self.amax else torch.maximum(self.amax[n], a)
        return out
