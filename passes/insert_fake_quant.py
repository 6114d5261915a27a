"""Make a quantized graph trainable: quantization-aware training (QAT).

Runs after calibration. Calibrated observers become :class:`~qgraph.quant.FakeQuant` exactly as in
``insert-qdq`` (so QAT starts from the PTQ model), and every quantizer is set up for training:

  * weight quantizers *track* their weight: scales are recomputed from the current weight on
    every call, so codes follow the weights as the optimizer moves them (the export uses the
    scales of the final weights); or, with ``learn_weight_scales=True``, their scales start from
    that rule and are trained with the LSQ gradient (per channel or per block; NVFP4's E4M3
    block scales too, rounded to E4M3 in the forward); weights the ``gptq`` pass rounded keep its
    scales frozen instead (tracking would recompute them from the rounded weights, whose
    saturated codes then move: GPTQ's start would be lost), unless their scales are learned;
  * activation scales stay frozen at their calibrated values (``learn_scales=False``), or become
    parameters trained with the LSQ gradient (``learn_scales=True``; INT8/FP8 activations), or
    keep widening with the running max |x| for the first ``observe_steps`` training calls.

Gradients are straight-through with the clipping mask (exactly 0 where a value saturated). The
result is an ordinary ``nn.Module``: any optimizer (keep learned scales out of weight decay),
bf16 autocast, ``torch.compile``, DDP (observed ranges are max-reduced across ranks); put it in
``train()`` mode for training and lower it with the same backend call as a PTQ graph (the
backends export the eval-mode graph, with tracked scales refreshed from the final weights).
"""

from __future__ import annotations

import logging

import torch
import torch.fx

from qgraph._errors import PreconditionError
from qgraph._pass import PassResult
from qgraph.observers import Observer
from qgraph.passes.gptq import GPTQ_META
from qgraph.passes.insert_qdq import InsertQDQ
from qgraph.quant import LEARNABLE_SCALE_TYPES, QUANT_META, FakeQuant

__all__ = ["InsertFakeQuant"]

logger = logging.getLogger(__name__)


class InsertFakeQuant(InsertQDQ):
    """Turn the calibrated plan into trainable fake-quant nodes. Counts: ``activations``,
    ``weights`` (inserted), ``configured`` (quantizers whose training setup changed),
    ``learnable`` (scales that are parameters).

    Args:
        learn_scales: train activation scales with LSQ (static activation quantizers; the block
            scales of dynamic NVFP4/MX activations are computed at run time and stay so).
        observe_steps: training calls during which activation ranges keep widening.
        learn_weight_scales: train weight scales with LSQ instead of tracking the weights
            (every weight format but MX, whose power-of-two scales keep tracking).
    """

    name = "insert-fake-quant"
    graphs = ("fx",)  # training needs the torch graph

    def __init__(self, learn_scales: bool = False, observe_steps: int = 0, learn_weight_scales: bool = False) -> None:
        if not isinstance(observe_steps, int) or observe_steps < 0:
            raise PreconditionError(f"observe_steps must be an integer >= 0, got {observe_steps!r}")
        for name, value in (("learn_scales", learn_scales), ("learn_weight_scales", learn_weight_scales)):
            if not isinstance(value, bool):
                raise PreconditionError(f"{name} must be true or false, got {value!r}")
        if learn_scales and observe_steps:
            raise PreconditionError("learn_scales and observe_steps exclude each other: a learned scale learns its range")
        self.learn_scales = learn_scales
        self.observe_steps = observe_steps
        self.learn_weight_scales = learn_weight_scales

    def options(self) -> dict[str, object]:
        opts: dict[str, object] = {}
        if self.learn_scales:
            opts["learn_scales"] = True
        if self.observe_steps:
            opts["observe_steps"] = self.observe_steps
        if self.learn_weight_scales:
            opts["learn_weight_scales"] = True
        return opts

    def requires(self, graph: torch.fx.GraphModule) -> None:
        planned = any(QUANT_META in n.meta for n in graph.graph.nodes)  # weight-only plans
        if not planned and not any(isinstance(m, (Observer, FakeQuant)) for m in graph.modules()):
            raise PreconditionError(
                "no quantizers or observers: run annotate, insert-observers and calibrate first"
            )
        super().requires(graph)

    def call(self, graph: torch.fx.GraphModule) -> PassResult:
        inserted = super().call(graph)  # observers -> fake-quant exactly as for PTQ
        counts = dict(inserted.counts)
        configured = learnable = 0
        rounded = graph.meta.get(GPTQ_META, set())  # weights whose GPTQ scales stay as they are
        for node in graph.graph.nodes:
            if node.op != "call_module" or not isinstance(graph.get_submodule(node.target), FakeQuant):
                continue
            module = graph.get_submodule(node.target)
            weight = module.spec.role == "weight" and getattr(node.args[0], "op", "") == "get_attr"
            learnable_kind = not module.spec.dynamic and module.spec.scale_type in LEARNABLE_SCALE_TYPES
            learn = learnable_kind and (self.learn_weight_scales if weight else self.learn_scales)
            configured += module.configure_training(
                track_weight=weight and not learn and node.target not in rounded,
                learn_scale=learn,
                observe_steps=0 if weight else self.observe_steps,
            )
            learnable += module.learnable
        counts.update(configured=configured, learnable=learnable)
        return PassResult(graph, inserted.modified or configured > 0, counts)
