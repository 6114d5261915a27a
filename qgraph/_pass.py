"""The pass contract: a pass takes a graph and returns a :class:`PassResult`.

A pass is a small object. ``call(graph)`` does the work and returns the (possibly same) graph,
an honest ``modified`` flag (true only when the graph or its quantization state changed) and
counts for the summary ("folded 12 BatchNorms"). ``requires`` is checked on the input and
``ensures`` on the *result*, never on the input. Passes are in-place on the
:class:`torch.fx.GraphModule` they are given; callers that must keep the original copy it first
(the front doors in :mod:`qgraph.capture` always hand out a private copy).

:class:`Sequential` runs passes in order; :class:`PassManager` repeats a sequence until no pass
reports a change (a fixed point) or ``max_iterations`` is reached. Both run the structural verifier
after every pass when ``verify=True`` and call the instruments around every pass.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from qgraph._errors import PreconditionError, QGraphError

if TYPE_CHECKING:
    import torch.fx

    from qgraph.instruments import PassInstrument

__all__ = ["Pass", "PassResult", "Sequential", "PassManager"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PassResult:
    """What a pass returns.

    Attributes:
        graph: the graph after the pass (the same object for in-place passes).
        modified: true only if the pass changed the graph or its quantization state.
        counts: named counts for summaries, e.g. ``{"folded": 3}``.
    """

    graph: torch.fx.GraphModule
    modified: bool
    counts: Mapping[str, int] = dataclasses.field(default_factory=dict)


class Pass:
    """Base class of every qgraph pass.

    Subclasses set ``name`` (the kebab-case name used in pipeline specs) and implement
    :meth:`call`; they may override :meth:`requires` and :meth:`ensures`, which raise
    :class:`~qgraph.PreconditionError` / :class:`~qgraph.PostconditionError`.
    ``options()`` returns the constructor arguments that a pipeline spec prints back.
    """

    name: str = "pass"
    #: the graphs the pass works on: ``fx`` (torch.fx GraphModule), ``onnx`` (onnx-ir Model)
    graphs: tuple[str, ...] = ("fx",)

    def call(self, graph: torch.fx.GraphModule) -> PassResult:
        raise NotImplementedError(f"{type(self).__name__}.call")

    def requires(self, graph: torch.fx.GraphModule) -> None:
        """Raise PreconditionError if ``graph`` is not something this pass can work on."""

    def ensures(self, result: PassResult) -> None:
        """Raise PostconditionError if the result breaks this pass's promise."""

    def options(self) -> dict[str, object]:
        """Constructor arguments that differ from the defaults, for printing a spec back."""
        return {}

    def __call__(self, graph: torch.fx.GraphModule) -> PassResult:
        import torch.fx

        if not isinstance(graph, torch.fx.GraphModule) and "onnx" not in self.graphs:
            raise PreconditionError(f"{self.name} runs on torch graphs only, not on ONNX models (export a .pt2)")
        self.requires(graph)
        result = self.call(graph)
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {self.name} returned {type(result).__name__}, not PassResult")
        self.ensures(result)
        return result

    def spec(self) -> str:
        """This pass as it is written in a pipeline spec, e.g. ``insert-observers(calibrator=mse)``."""
        from qgraph.pipeline import format_step

        return format_step(self.name, self.options())

    def __repr__(self) -> str:
        return self.spec()


class Sequential(Pass):
    """Run passes in order; the result is modified if any pass modified the graph.

    Args:
        passes: the passes to run.
        instruments: hooks called before and after every pass (timing, dumps).
        verify: run :func:`qgraph.verify.verify` after every pass.
    """

    name = "sequential"
    graphs = ("fx", "onnx")

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        instruments: Sequence[PassInstrument] = (),
        verify: bool = True,
    ) -> None:
        self.passes = list(passes)
        self.instruments = list(instruments)
        self.verify = verify

    def spec(self) -> str:
        return ",".join(p.spec() for p in self.passes)

    def call(self, graph: torch.fx.GraphModule) -> PassResult:
        from qgraph.verify import verify

        modified = False
        counts: dict[str, int] = {}
        done: list[str] = []
        for p in self.passes:
            for inst in self.instruments:
                inst.before_pass(p, graph)
            try:
                result = p(graph)
                if self.verify:
                    verify(result.graph)
            except QGraphError as exc:
                ran = ", ".join(done) or "none"
                raise type(exc)(f"{p.name}: {exc} (passes already run: {ran})") from exc
            for inst in self.instruments:
                inst.after_pass(p, result)
            graph = result.graph
            modified |= result.modified
            for key, value in result.counts.items():
                counts[f"{p.name}.{key}"] = counts.get(f"{p.name}.{key}", 0) + value
            done.append(p.name)
            logger.debug("%s: modified=%s counts=%s", p.name, result.modified, dict(result.counts))
        return PassResult(graph, modified, counts)


class PassManager(Sequential):
    """Repeat a sequence of passes until none reports a change.

    Args:
        passes: the passes of one iteration.
        max_iterations: stop after this many iterations even if the graph still changes.
        instruments, verify: as for :class:`Sequential`.
    """

    name = "pass-manager"

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        max_iterations: int = 8,
        instruments: Sequence[PassInstrument] = (),
        verify: bool = True,
    ) -> None:
        super().__init__(passes, instruments=instruments, verify=verify)
        if max_iterations < 1:
            raise PreconditionError(f"max_iterations must be >= 1, got {max_iterations}")
        self.max_iterations = max_iterations
        self.iterations = 0

    def call(self, graph: torch.fx.GraphModule) -> PassResult:
        modified = False
        counts: dict[str, int] = {}
        self.iterations = 0
        for _ in range(self.max_iterations):
            self.iterations += 1
            result = super().call(graph)
            graph = result.graph
            for key, value in result.counts.items():
                counts[key] = counts.get(key, 0) + value
            if not result.modified:
                break
            modified = True
        return PassResult(graph, modified, counts)
