"""The schema of a backend's quantization rules: plain frozen data over op kinds.

A backend (``qgraph.backends.<name>.rules``) fills these tables; the ``annotate`` pass reads them
and attaches :class:`~qgraph.quant.QSpec` s to graph edges. Rules never edit graphs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

from qgraph.quant import QSpec

__all__ = ["InputRule", "OpRule", "BackendRules"]


@dataclasses.dataclass(frozen=True)
class InputRule:
    """One input of an op to quantize.

    Attributes:
        index: the input position (0 = data, 1 = weight for Conv/Gemm).
        role: ``activation``; ``weight`` (must be a constant, else the op stays in float);
            ``either`` (a weight spec if the input is a constant, else an activation spec).
        weight_axis: the per-channel axis for a constant weight; negative counts from the end.
    """

    index: int
    role: Literal["activation", "weight", "either"] = "activation"
    weight_axis: int | None = None


@dataclasses.dataclass(frozen=True)
class OpRule:
    """How one op kind is quantized.

    Attributes:
        inputs: the inputs that get Q/DQ.
        residual: an Add rule: quantize only the input(s) *not* produced by a quantized weighted op
            (so the Add fuses into that op with an int8 output); if both are, quantize input 1.
            Only when the Add's output reaches a quantized input: otherwise the op cannot have an
            int8 output and the Add stays float.
        int8_kernel: the backend runs this op as an int8 kernel of its own that needs every input
            and the output quantized (onnxruntime's QLinearAdd): when the op's output reaches a
            quantized input (through ReLU/Clip and data movement), every input is quantized;
            otherwise the ``residual`` rule applies.
        needs_weight: non-empty when the op is quantized only with a constant (weight) input;
            an op of two activations then stays in float for this reason.
        max_groups: ops with more groups than this stay in float (grouped ConvTranspose).
        unsupported: non-empty when the backend cannot run this op kind in this precision (e.g.
            NVFP4 on Conv): why. Such an op is an error unless the user asked for fallback.
    """

    inputs: tuple[InputRule, ...] = ()
    residual: bool = False
    int8_kernel: bool = False
    needs_weight: str = ""
    max_groups: int | None = None
    unsupported: str = ""


@dataclasses.dataclass(frozen=True)
class BackendRules:
    """A backend's rule set for one precision (a *recipe*).

    Attributes:
        backend: backend name (``tensorrt``, ``onnxruntime``).
        precision: recipe name (``int8``, ``fp8``, ``w4a16``, ``nvfp4``, ``mxfp8``, ``mxfp4``).
        activation: the spec of every quantized activation (None: weight-only recipe).
        weight: the spec of every quantized weight; its axis is filled in per op: the output
            channel axis (per-channel specs) or the reduction axis (blocked specs).
        ops: op kind → rule. Kinds not listed stay in float.
        weighted_kinds: op kinds whose output a residual Add can fuse with.
        float_reasons: op kind → why it stays in float (for the summary).
        fallback: the rule set an unsupported op runs in when the user allows fallback
            (None: float), e.g. FP8 for NVFP4 on a Conv.
        bounded_activation: the spec of an activation with a known lower bound (the output of
            ReLU 0, ReLU6 0, GELU −0.17, Sigmoid/Softmax 0, or pooling/data movement of one), when
            the backend has a better one than ``activation``: annotate fills in ``low``
            (onnxruntime: uint8 over [low, amax], twice the steps of [−amax, amax] after a ReLU,
            and ORT drops the ReLU); None: ``activation``.
    """

    backend: str
    precision: str
    activation: QSpec | None
    weight: QSpec
    ops: Mapping[str, OpRule]
    weighted_kinds: frozenset[str]
    float_reasons: Mapping[str, str] = dataclasses.field(default_factory=dict)
    fallback: BackendRules | None = None
    bounded_activation: QSpec | None = None

    def weight_spec(self, channel_axis: int | None, reduction_axis: int | None = None) -> QSpec:
        """The weight spec on one op: blocked specs run along ``reduction_axis``."""
        axis = reduction_axis if self.weight.block_size else channel_axis
        return dataclasses.replace(self.weight, axis=axis)
