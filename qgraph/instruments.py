"""Hooks called around every pass of a :class:`~qgraph.Sequential`: timing and graph dumps.

Example:
    >>> timing = TimingInstrument()
    >>> Sequential([FoldBatchNorm()], instruments=[timing])(graph)  # doctest: +SKIP
    >>> timing.seconds  # {"fold-batchnorm": 0.0012}
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch.fx

    from qgraph._pass import Pass, PassResult

__all__ = ["PassInstrument", "TimingInstrument", "DumpInstrument"]


class PassInstrument:
    """Base class: override either hook; both default to doing nothing."""

    def before_pass(self, pass_: Pass, graph: torch.fx.GraphModule) -> None:
        """Called with the graph a pass is about to get."""

    def after_pass(self, pass_: Pass, result: PassResult) -> None:
        """Called with the result of a pass that succeeded."""


class TimingInstrument(PassInstrument):
    """Wall time per pass name, summed over repeated runs, in ``seconds``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = 0.0

    def before_pass(self, pass_: Pass, graph: torch.fx.GraphModule) -> None:
        self._start = time.perf_counter()

    def after_pass(self, pass_: Pass, result: PassResult) -> None:
        elapsed = time.perf_counter() - self._start
        self.seconds[pass_.name] = self.seconds.get(pass_.name, 0.0) + elapsed


class DumpInstrument(PassInstrument):
    """Write the graph's text after every pass to ``DIR/NN-<pass>.txt``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.index = 0

    def after_pass(self, pass_: Pass, result: PassResult) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.index += 1
        path = self.directory / f"{self.index:02d}-{pass_.name}.txt"
        path.write_text(str(result.graph.graph) + "\n", encoding="utf-8")
