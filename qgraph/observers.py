"""Observer modules: inserted on graph edges, they record what flows through during calibration."""

from __future__ import annotations

import torch

from qgraph._errors import QGraphError
from qgraph.calibrators import CALIBRATORS, AbsHistogram, compute_amax
from qgraph.quant import QSpec

__all__ = ["Observer"]


class Observer(torch.nn.Module):
    """Identity in the forward pass; accumulates an :class:`AbsHistogram` of what it sees.

    Args:
        spec: the quantization spec of the observed edge.
        calibrator: one of ``max``, ``percentile``, ``mse``, ``entropy``.
        percentile: used by the ``percentile`` calibrator.
        bins: histogram resolution.
        label: the observed node, for error messages.
    """

    def __init__(
        self,
        spec: QSpec,
        calibrator: str = "max",
        *,
        percentile: float = 99.99,
        bins: int = 2048,
        label: str = "",
    ) -> None:
        super().__init__()
        if calibrator not in CALIBRATORS:
            raise QGraphError(f"unknown calibrator {calibrator!r} (known: {', '.join(CALIBRATORS)})")
        if not 0.0 < percentile <= 100.0:
            raise QGraphError(f"percentile must be in (0, 100], got {percentile}")
        self.spec = spec
        self.calibrator = calibrator
        self.percentile = percentile
        self.label = label
        self.hist = AbsHistogram(bins, track_counts=calibrator != "max")
        self.batches = 0
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # or a numpy array (the ONNX door)
        if self.enabled:
            try:
                self.hist.update(x)
            except QGraphError as exc:
                raise QGraphError(f"at {self.label}: {exc}") from None
            self.batches += 1
        return x

    def amax(self) -> float:
        """The calibrated clipping threshold; raises QGraphError naming the edge if undefined."""
        try:
            return compute_amax(self.hist, self.calibrator, self.percentile)
        except QGraphError as exc:
            raise QGraphError(f"at {self.label}: {exc}") from None

    def extra_repr(self) -> str:
        return f"{self.spec.describe()}, calibrator={self.calibrator}, batches={self.batches}"
