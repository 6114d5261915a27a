"""Mixed precision by measured sensitivity: give the layers that lose most in the cheapest recipe
a wider one, within a budget of bits per weight, then annotate.

A *layer* is an op with a quantized weight (Linear, Conv, a MatMul with a constant). The pass
scores PTQ of the whole model against its float outputs on the calibration data, first with every
layer in the first candidate recipe (the base), then once per layer and wider candidate with that
one layer in the candidate (its weight and its input activation). A layer's *gain* is how much
its upgrade lowers the error; its *cost* is the extra weight storage:

    bits(recipe) = element bits + scale bits / block size     (NVFP4 4.5, MXFP8 8.25, FP8 8, INT4 blocks of 128: 4.25)

Upgrades are taken greedily by gain per extra bit (each layer at most once, in the first
candidate it is ranked for; no upgrade that does not lower the error) while the weights' mean
bits, weighted by their sizes, stay within ``effective_bits``. Errors are treated as adding up,
which they only roughly do: the plan is scored once more as a whole, and that measured error is
what the pass reports (a plan that measures worse than the base keeps only its best upgrade).

Only layers the base recipe quantizes are considered, each offered the candidates that run it
without fallback; layers that share a weight stay in the base recipe. The data is read once and
kept (every trial sees the same batches). Under torchrun every rank must run the pass on its own
share (at least one batch each): the trials calibrate across ranks as ``calibrate`` does and
their errors are summed over the ranks, so every rank makes the same plan.

The plan is an ``annotate`` with one override per upgraded layer, so the rest of the pipeline
(observers, calibration, insert-qdq, QAT, the backends) runs on it unchanged.

Cost: one scoring of the data per layer and wider candidate, plus two, each on a graph that
shares the model's weights (no tensor of the model is copied), and one calibration per
candidate: observers see float tensors, so a trial takes the statistics of every edge it
observes as an earlier calibration in the same spec left them (an edge seen in no earlier
calibration is calibrated in the trial). The float model's first output on every batch is kept. It suits models up to a few hundred layers;
ModelOpt's ``auto_quantize`` estimates the same gains from gradients instead, which is cheaper
and rougher. A sweep over budgets measures the layers once: pass an earlier plan's record as
``survey`` and only the base and the new plan are scored.

Errors: ``mse`` (default) is the squared error of the first output over its square (summed over
the data); ``kl`` is KL(float ‖ quantized) of the softmax over the first output's last axis, the
metric for logits.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch
import torch.fx
import torch.nn.functional as F
import torch.utils._pytree as pytree
from tqdm.auto import tqdm

from qgraph import _dist
from qgraph._errors import PreconditionError, QGraphError, first_line
from qgraph._pass import Pass, PassResult
from qgraph.graph import constant_value, sharing_copy
from qgraph.passes._util import QUANT_META, batch_args
from qgraph.passes.annotate import Annotate
from qgraph.passes.calibrate import Calibrate
from qgraph.passes.insert_observers import InsertObservers
from qgraph.passes.insert_qdq import InsertQDQ
from qgraph.observers import Observer
from qgraph.quant import FALLBACK_META, QSpec
from qgraph.rules import BackendRules

__all__ = ["AUTO_PRECISION_META", "AutoPrecision", "weight_bits"]

logger = logging.getLogger(__name__)

#: gm.meta key: the plan's record ({"effective_bits", "base_error", "error", "layers": {...}})
AUTO_PRECISION_META = "qgraph.auto_precision"

_SCALE_BITS = {"float32": 32, "fp8_e4m3": 8, "e8m0": 8}


def weight_bits(spec: QSpec | None) -> float:
    """Storage bits per weight element of ``spec``, block scales included (None: float32, 32)."""
    if spec is None:
        return 32.0
    scale = _SCALE_BITS[spec.scale_type] / spec.block_size if spec.block_size else 0.0
    return float(spec.element.bits) + scale


class AutoPrecision(Pass):
    """Annotate with a per-layer choice among recipes, under a weight-bits budget. Counts:
    ``quantized``, ``float`` (as ``annotate``), ``upgraded`` (layers given a wider recipe).

    Args:
        candidates: the recipes to choose from (a backend's rule sets), the cheapest first: the
            base every layer starts in, e.g. ``[tensorrt.NVFP4, tensorrt.FP8]``.
        data: calibration batches (as for ``calibrate``), read once and kept.
        effective_bits: the budget, mean storage bits per weight element over the quantized
            layers (e.g. 5.0: NVFP4 with about one parameter in seven at FP8).
        fallback: as ``annotate``'s, for every trial and the plan.
        metric: ``mse`` or ``kl`` (see the module docstring).
        calibrator: the trials' calibrator (``insert-observers``).
        progress: show a progress bar over the trials.
        survey: the record (``gm.meta[AUTO_PRECISION_META]``) of this pass on another capture of
            the same model, with the same candidates, fallback, metric, calibrator and data (the
            budget may differ): its per-layer gains are reused instead of measured again. The
            base is still scored, and must measure as in the record.

    Example::

        AutoPrecision([tensorrt.NVFP4, tensorrt.FP8], data, effective_bits=5.0, fallback=True)(gm)
        Sequential([InsertObservers(), Calibrate(data), InsertQDQ()])(gm)
        # a wider budget on a fresh capture, without measuring every layer again
        AutoPrecision([...], data, effective_bits=6.0, fallback=True, survey=gm.meta[AUTO_PRECISION_META])(gm2)
    """

    name = "auto-precision"
    context_keys = ("rules", "recipes", "overrides", "fallback", "data", "progress")

    def __init__(
        self,
        candidates: Sequence[BackendRules] = (),
        data: Iterable = (),
        effective_bits: float = 0.0,
        fallback: bool | BackendRules | Literal["float"] | None = None,
        metric: Literal["mse", "kl"] = "mse",
        calibrator: str = "max",
        progress: bool = False,
        survey: Mapping | None = None,
        *,
        upgrade: str = "",
        rules: BackendRules | None = None,
        recipes: Mapping[str, BackendRules] | None = None,
        overrides: Sequence = (),
    ) -> None:
        """``upgrade``, ``rules``, ``recipes`` and ``overrides`` are for pipeline specs
        (``auto-precision(effective_bits=5,upgrade=fp8)`` in ``qgraph lower --pipeline``): the
        candidates are then ``rules`` (the lowering's recipe) and the ``+``-separated recipe names
        of ``upgrade`` looked up in ``recipes`` (the backend's), and ``--override`` is refused."""
        if not isinstance(upgrade, str):
            raise PreconditionError(f"auto-precision: upgrade must name recipes (fp8, or fp8+int8), got {upgrade!r}")
        if upgrade:
            candidates = _from_spec(candidates, upgrade, rules, recipes)
        if overrides:
            raise PreconditionError("auto-precision chooses each layer's recipe itself: drop the per-layer overrides (--override)")
        candidates = tuple(candidates)
        if len(candidates) < 2 or not all(isinstance(c, BackendRules) for c in candidates):
            raise PreconditionError(
                "auto-precision: give at least two candidate recipes (rule sets), the cheapest first "
                "(in a pipeline spec: upgrade=RECIPE)"
            )
        if isinstance(effective_bits, bool) or not isinstance(effective_bits, (int, float)) or effective_bits <= 0:
            raise PreconditionError(f"auto-precision: effective_bits must be a positive number, got {effective_bits!r}")
        if metric not in ("mse", "kl"):
            raise PreconditionError(f"auto-precision: metric must be 'mse' or 'kl', got {metric!r}")
        self.candidates = candidates
        self.data = data
        self.effective_bits = float(effective_bits)
        self.fallback = fallback
        self.metric = metric
        InsertObservers(calibrator)  # a calibrator it does not know fails here, not after the reference pass
        self.calibrator = calibrator
        self.progress = progress
        if survey is not None and not (isinstance(survey, Mapping) and {"config", "base_error", "layers"} <= survey.keys()):
            raise PreconditionError("auto-precision: survey must be a plan's record, gm.meta[AUTO_PRECISION_META]")
        self.survey = survey
        self.upgrade = upgrade

    def options(self) -> dict[str, object]:
        opts: dict[str, object] = {"effective_bits": self.effective_bits}
        if self.upgrade:
            opts["upgrade"] = self.upgrade
        if self.metric != "mse":
            opts["metric"] = self.metric
        if self.calibrator != "max":
            opts["calibrator"] = self.calibrator
        return opts

    def requires(self, graph: torch.fx.GraphModule) -> None:
        if AUTO_PRECISION_META in graph.meta:
            return  # planned already: call says whether with these settings
        if any(QUANT_META in n.meta for n in graph.graph.nodes):
            raise PreconditionError("auto-precision plans a float graph: run it instead of `annotate`, not after it")

    def _config(self) -> dict[str, object]:
        fallback = self.fallback.precision if isinstance(self.fallback, BackendRules) else self.fallback
        return {"candidates": [f"{c.backend} {c.precision}" for c in self.candidates], "budget": self.effective_bits,
                "metric": self.metric, "calibrator": self.calibrator, "fallback": fallback}

    def call(self, graph: torch.fx.GraphModule) -> PassResult:
        planned = graph.meta.get(AUTO_PRECISION_META)
        if planned is not None:
            if planned["config"] != self._config():
                raise PreconditionError(
                    f"this graph was planned by auto-precision with {planned['config']}: plan a fresh capture"
                )
            return PassResult(graph, False, {"quantized": 0, "float": 0, "upgraded": 0})
        data = list(self.data)  # read once: every trial sees the same batches in the same order
        names = [n.name for n in graph.graph.nodes if n.op == "placeholder"]
        ranks = _dist.world(None, "auto-precision")
        reference = self._reference(graph, data, names, ranks)
        sizes, bits = self._layers(graph)
        if not sizes:
            raise PreconditionError("the base recipe quantizes no weight here: auto-precision has nothing to choose")
        total = sum(sizes.values())
        base_bits = sum(bits[0][n] * sizes[n] for n in sizes) / total
        if self.effective_bits < base_bits - 1e-9:
            raise PreconditionError(
                f"effective_bits {self.effective_bits:g} is below the base recipe's own {base_bits:.3g} bits per weight"
            )
        trials = [(n, c) for n in sizes for c in range(1, len(self.candidates)) if bits[c].get(n, 0.0) > bits[0][n]]
        if not trials:
            raise PreconditionError("no candidate runs any layer in more bits than the base recipe: nothing to upgrade")

        observed: dict[tuple[str, QSpec], Observer] = {}  # calibrated edges, shared by the trials

        def score(chosen: dict[str, int]) -> float:
            return self._score(graph, chosen, data, reference, names, ranks, observed)

        surveyed = self._surveyed(sizes, trials)
        bar = tqdm(total=2 + (0 if surveyed else len(trials) + len(self.candidates) - 1), desc="auto-precision",
                   unit="trial", disable=not self.progress)
        base_error = score({})
        bar.update()
        if surveyed:
            self._check_base(base_error)
            gains = surveyed
        else:
            for c in range(1, len(self.candidates)):  # every edge a candidate observes, calibrated once
                self._calibrated(_annotated(graph, self.candidates[c], [], "float"), data, observed)
                bar.update()
            gains = {}
            for name, c in trials:
                gains[name, c] = base_error - score({name: c})
                bar.update()
        cost = {(n, c): (bits[c][n] - bits[0][n]) * sizes[n] for n, c in trials}
        chosen = _greedy(gains, cost, (self.effective_bits - base_bits) * total + 1e-9 * total)
        error = score(chosen) if chosen else base_error
        bar.update()
        bar.close()
        if error > base_error:  # the gains did not add up: keep the best single upgrade, measured
            best = max(chosen.items(), key=lambda item: gains[item])
            logger.warning("auto-precision: the plan measured %.4g, above the base's %.4g; keeping only %s",
                           error, base_error, best[0])
            chosen, error = dict([best]), base_error - gains[best]
        result = Annotate(self.candidates[0], self._overrides(chosen), self.fallback)(graph)
        achieved = sum(bits[chosen.get(n, 0)][n] * sizes[n] for n in sizes) / total
        graph.meta[AUTO_PRECISION_META] = {
            "config": self._config(),
            "effective_bits": achieved,
            "base_error": base_error,
            "error": error,
            "layers": {
                n: {
                    "recipe": self.candidates[chosen.get(n, 0)].precision,
                    "weights": sizes[n],
                    "gains": {self.candidates[c].precision: gains[n, c] for (m, c) in trials if m == n},
                }
                for n in sizes
            },
        }
        logger.info(
            "auto-precision: %d of %d layers upgraded, %.3g bits per weight, %s %.4g -> %.4g",
            len(chosen), len(sizes), achieved, self.metric, base_error, error,
        )
        return PassResult(graph, result.modified, {**result.counts, "upgraded": len(chosen)})

    def _surveyed(self, sizes: dict[str, int], trials: list[tuple[str, int]]) -> dict[tuple[str, int], float]:
        """The gains of ``survey`` for these trials ({} without one), checked against this pass
        and graph."""
        if self.survey is None:
            return {}
        config, ours = ({k: v for k, v in c.items() if k != "budget"} for c in (self.survey["config"], self._config()))
        if config != ours:
            raise PreconditionError(f"auto-precision: the survey was measured with {config}, not {ours}")
        layers = self.survey["layers"]
        if {n: layer["weights"] for n, layer in layers.items()} != sizes:
            raise PreconditionError("auto-precision: the survey's layers are not this graph's: survey a capture of this model")
        try:
            return {(n, c): float(layers[n]["gains"][self.candidates[c].precision]) for n, c in trials}
        except KeyError as exc:
            raise PreconditionError(f"auto-precision: the survey has no gain for {exc}: survey a capture of this model") from None

    def _check_base(self, base_error: float) -> None:
        """The base must measure as in the survey: the same model, data and calibration."""
        recorded = float(self.survey["base_error"])
        if abs(base_error - recorded) > 1e-6 * max(abs(recorded), 1e-30):
            raise PreconditionError(
                f"auto-precision: the base measures {base_error:.6g} here and {recorded:.6g} in the survey: "
                "the survey was taken on other data or another model"
            )

    def _reference(self, graph: torch.fx.GraphModule, data: list, names: list[str], ranks: int) -> list[torch.Tensor]:
        """The float model's first output on every batch, checked for the metric."""
        reference, error = [], None
        try:
            with torch.no_grad():
                reference = [_first_output(graph(*batch_args(b, names))) for b in data]
            self._check(reference)
        except QGraphError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - the user's model or data: one line naming it
            error = QGraphError(f"the float model failed on the data: {first_line(exc)}")
        if ranks > 1:  # every rank learns of a failure before the trials' collectives
            _dist.agree(error, "auto-precision")
        elif error is not None:
            raise error
        return reference

    def _check(self, reference: list[torch.Tensor]) -> None:
        """Refuse data the metric cannot score."""
        if not reference:
            raise QGraphError("auto-precision needs calibration data: got no batches")
        if self.metric == "kl":
            if any(r.dim() == 0 or r.shape[-1] < 2 for r in reference):
                raise QGraphError("metric 'kl' needs logits: the model's first output has no class axis of 2 or more")
            if any(bool(torch.isnan(r).any() or torch.isposinf(r).any()) for r in reference):
                raise QGraphError("the float model's first output has NaN or +inf on the data")
        else:
            if not all(bool(torch.isfinite(r).all()) for r in reference):
                raise QGraphError("the float model's first output is not finite on the data")
            if not any(bool(r.any()) for r in reference):
                raise QGraphError("the float model's first output is zero on every batch: mse has no scale")

    def _layers(self, graph: torch.fx.GraphModule) -> tuple[dict[str, int], list[dict[str, float]]]:
        """(weight elements of each layer the base recipe quantizes, bits per weight of each
        layer in each candidate that runs it), from one annotation per candidate on a copy of
        the graph. A wider candidate is surveyed without fallback: a layer it cannot run itself
        (or would leave in float) is not offered it. Layers sharing a weight stay in the base
        recipe and out of the budget (one tensor cannot be stored two ways)."""
        sizes, bits, weights = {}, [], {}
        for i, rules in enumerate(self.candidates):
            gm = _annotated(graph, rules, [], self.fallback if i == 0 else "float")
            per_layer = {}
            for node in gm.graph.nodes:
                for index, spec in node.meta.get(QUANT_META, {}).items():
                    if spec.role == "weight" and not (i and node.meta.get(FALLBACK_META)):
                        per_layer[node.name] = weight_bits(spec)
                        if i == 0:
                            sizes[node.name] = constant_value(gm, node.args[index]).numel()
                            weights[node.name] = node.args[index].target
            bits.append(per_layer)
        uses = Counter(weights.values())
        shared = [n for n, target in weights.items() if uses[target] > 1]
        if shared:
            logger.debug("auto-precision leaves %s in the base recipe: they share a weight", ", ".join(shared))
        return {n: size for n, size in sizes.items() if n not in shared}, bits

    def _overrides(self, chosen: dict[str, int]) -> list[tuple[str, BackendRules]]:
        return [(f"@node:{name}", self.candidates[c]) for name, c in chosen.items()]

    def _score(
        self, graph: torch.fx.GraphModule, chosen: dict[str, int], data: list, reference: list, names: list[str],
        ranks: int, observed: dict,
    ) -> float:
        """The error of PTQ with the layers in ``chosen`` upgraded, over the data (of every rank:
        calibration merges across ranks as ``calibrate`` does, and so do the error sums)."""
        gm = self._calibrated(_annotated(graph, self.candidates[0], self._overrides(chosen), self.fallback), data, observed)
        InsertQDQ()(gm)
        sums, error = torch.zeros(2, dtype=torch.float64), None
        try:
            with torch.no_grad():
                for batch, ref in zip(data, reference, strict=True):
                    sums += self._error(_first_output(gm(*batch_args(batch, names))), ref)
        except Exception as exc:  # noqa: BLE001 - the user's model: one line naming it
            error = QGraphError(f"the quantized model failed on the data: {first_line(exc)}")
        if ranks > 1:
            _dist.agree(error, "auto-precision")
            sums = _dist.all_reduce(sums)
        elif error is not None:
            raise error
        num, den = sums.tolist()
        return num / den

    def _calibrated(self, gm: torch.fx.GraphModule, data: list, observed: dict) -> torch.fx.GraphModule:
        """``gm`` (annotated) with calibrated observers: each edge in ``observed`` ((source node,
        spec) -> an earlier trial's observer) takes its statistics (an observer passes float
        tensors through unchanged, so they are the same whatever else is observed), the rest are
        calibrated on ``data`` (under torchrun, merged across ranks) and added to ``observed``."""
        InsertObservers(self.calibrator)(gm)
        observers = {}
        for node in gm.graph.nodes:
            module = gm.get_submodule(node.target) if node.op == "call_module" else None
            if isinstance(module, Observer):
                observers[node.args[0].name, module.spec] = module
        for key, observer in observers.items():
            seen = observed.get(key)
            if seen is not None:  # read only from here on: calibrate skips an observer that has batches
                observer.hist, observer.batches = seen.hist, seen.batches
        Calibrate(data)(gm)
        for key, observer in observers.items():
            observed.setdefault(key, observer)
        return gm

    def _error(self, out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """(error sum, normaliser) of one batch, float64."""
        out, ref = out.to(torch.float64), ref.to(torch.float64)
        if self.metric == "kl":  # KL(float || quantized) per row; masked (-inf) classes add 0
            logp, logq = F.log_softmax(ref, -1), F.log_softmax(out, -1)
            p = logp.exp()
            terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
            return torch.stack([terms.sum(), torch.tensor(ref.numel() / ref.shape[-1], dtype=torch.float64)])
        return torch.stack([(out - ref).square().sum(), ref.square().sum()])


def _greedy(gains: dict[tuple[str, int], float], cost: dict[tuple[str, int], float], budget: float) -> dict[str, int]:
    """{layer: candidate} by gain per extra bit while the budget lasts, each layer once (a wider
    candidate ranked below a layer's first choice is not considered for it again), no upgrade
    that does not lower the error."""
    chosen = {}
    for name, c in sorted(gains, key=lambda t: gains[t] / cost[t], reverse=True):
        if name not in chosen and gains[name, c] > 0 and cost[name, c] <= budget:
            chosen[name] = c
            budget -= cost[name, c]
    return chosen


def _from_spec(
    candidates: Sequence[BackendRules], upgrade: str, rules: BackendRules | None, recipes: Mapping | None
) -> tuple[BackendRules, ...]:
    """The candidates a pipeline spec names: the lowering's recipe, then each of ``upgrade``."""
    if candidates:
        raise PreconditionError("auto-precision: give candidates or upgrade, not both")
    if rules is None or recipes is None:
        raise PreconditionError("auto-precision: upgrade names a backend's recipes; outside `qgraph lower` pass candidates")
    names = upgrade.split("+")
    unknown = next((n for n in names if n not in recipes), None)
    if unknown is not None:
        raise PreconditionError(f"auto-precision: unknown recipe {unknown!r} in upgrade (known: {', '.join(recipes)})")
    return (rules, *(recipes[n] for n in names))


def _annotated(
    graph: torch.fx.GraphModule, rules: BackendRules, overrides: list, fallback: object
) -> torch.fx.GraphModule:
    gm = sharing_copy(graph)  # the passes after annotate add top-level quantizers, never write a weight
    Annotate(rules, overrides, fallback)(gm)
    return gm


def _first_output(out: object) -> torch.Tensor:
    leaves = [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
    if not leaves:
        raise QGraphError("auto-precision scores the model's first output: it returned no tensor")
    return leaves[0].detach()
