"""What a lowering quantized and what it left in float, read off the annotated graph."""

from __future__ import annotations

from collections import Counter

from qgraph.quant import FALLBACK_META, FLOAT_META, QUANT_META
from qgraph.views import view_of

__all__ = ["plan_summary", "format_plan"]


def plan_summary(graph: object) -> tuple[Counter, dict[tuple[str, str], int]]:
    """(quantized op kinds → count, (op kind, reason) → count of ops left in float) of an
    annotated GraphModule or onnx-ir model."""
    view = view_of(graph)
    quantized: Counter = Counter()
    left: dict[tuple[str, str], int] = {}
    for node in view.ops():
        meta = view.meta(node)
        if meta.get(QUANT_META):
            quantized[view.kind(node) or view.describe(node)] += 1
        elif meta.get(FLOAT_META):
            key = (view.kind(node) or view.describe(node), meta[FLOAT_META])
            left[key] = left.get(key, 0) + 1
    return quantized, left


def format_plan(graph: object) -> list[str]:
    """Summary lines: ``quantized: Conv×4, Add×1`` and one line per float reason."""
    quantized, left = plan_summary(graph)
    lines = [
        f"quantized ({sum(quantized.values())} ops): "
        + (", ".join(f"{k}×{v}" for k, v in sorted(quantized.items())) or "none")
    ]
    fell_back: dict[tuple[str, str], int] = {}
    view = view_of(graph)
    for node in view.ops():
        if view.meta(node).get(FALLBACK_META):
            key = (view.kind(node) or view.describe(node), view.meta(node)[FALLBACK_META])
            fell_back[key] = fell_back.get(key, 0) + 1
    if fell_back:
        lines.append(f"fell back ({sum(fell_back.values())} ops, allowed by fallback):")
        lines += [f"  {kind}×{n}: {reason}" for (kind, reason), n in sorted(fell_back.items())]
    if left:
        lines.append(f"left in float ({sum(left.values())} ops):")
        unknown: Counter = Counter()
        for (kind, reason), n in left.items():
            if reason.endswith(_UNKNOWN):
                unknown[_short(kind)] += n
        lines += [
            f"  {kind}×{n}: {reason}" for (kind, reason), n in sorted(left.items()) if not reason.endswith(_UNKNOWN)
        ]
        if unknown:  # one line: shape arithmetic, masks, casts... (no rule: they stay float)
            names = ", ".join(f"{k}×{n}" for k, n in sorted(unknown.items()))
            lines.append(f"  ops qgraph has no rule for ({sum(unknown.values())}): {names}")
    return lines


_UNKNOWN = "not an op qgraph knows"


def _short(kind: str) -> str:
    """``aten.arange.default`` → ``arange``; ONNX ``domain::Op`` as it is."""
    if "::" in kind:
        return kind
    name = kind.removeprefix("aten.")
    return name.rsplit(".", 1)[0] if "." in name else name
