"""qgraph: a quantization compiler for TensorRT and ONNX Runtime.

Capture a model as a graph (:func:`capture`, :func:`load_pt2`), run passes over it
(:class:`Sequential`, :class:`PassManager`, the passes in :mod:`qgraph.passes`), and lower the
quantized graph with a backend (:mod:`qgraph.backends`).
"""

from qgraph._errors import (
    InputError,
    PostconditionError,
    PreconditionError,
    QGraphError,
    VerifierError,
)
from qgraph._pass import Pass, PassManager, PassResult, Sequential
from qgraph.capture import capture, load_pt2
from qgraph.instruments import DumpInstrument, PassInstrument, TimingInstrument
from qgraph.pipeline import build_pipeline, format_spec, parse_spec
from qgraph.quant import FakeQuant, QSpec
from qgraph.verify import verify

__all__ = [
    "Pass",
    "PassResult",
    "Sequential",
    "PassManager",
    "PassInstrument",
    "TimingInstrument",
    "DumpInstrument",
    "capture",
    "load_pt2",
    "verify",
    "parse_spec",
    "format_spec",
    "build_pipeline",
    "QSpec",
    "FakeQuant",
    "QGraphError",
    "InputError",
    "PreconditionError",
    "PostconditionError",
    "VerifierError",
]
