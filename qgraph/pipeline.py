"""Textual pipeline specs: ``fold-batchnorm,insert-observers(calibrator=percentile),insert-qdq``.

A spec is a comma-separated list of steps; a step is a pass name with optional ``key=value``
options in parentheses. Values are parsed as bool (``true``/``false``), int, float, or else kept
as strings. :func:`parse_spec` returns ``(name, options)`` pairs, :func:`format_spec` prints them
back in the same canonical form, and :func:`build_pipeline` turns a spec into a
:class:`~qgraph.Sequential` using an explicit name→factory table (``qgraph.passes.PASSES``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from qgraph._errors import InputError, QGraphError
from qgraph._pass import Pass, Sequential

__all__ = ["parse_spec", "format_spec", "format_step", "build_pipeline"]

_STEP = re.compile(r"\s*([a-z][a-z0-9-]*)\s*(?:\(([^()]*)\))?\s*$")
_KEY = re.compile(r"[a-z_][a-z0-9_]*$")


def _split_steps(spec: str) -> list[str]:
    steps, depth, current = [], 0, []
    for ch in spec:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise InputError(f"pipeline spec {spec!r}: unbalanced ')'")
        if ch == "," and depth == 0:
            steps.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise InputError(f"pipeline spec {spec!r}: unbalanced '('")
    steps.append("".join(current))
    return steps


def _parse_value(text: str) -> object:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _format_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_spec(spec: str) -> list[tuple[str, dict[str, object]]]:
    """Parse a pipeline spec into ``[(pass_name, options), ...]``.

    Raises:
        InputError: naming the step that does not parse.
    """
    if not spec.strip():
        raise InputError("pipeline spec is empty")
    parsed = []
    for step in _split_steps(spec):
        match = _STEP.match(step)
        if not match:
            raise InputError(f"pipeline spec: cannot parse step {step.strip()!r}")
        name, body = match.group(1), match.group(2)
        options: dict[str, object] = {}
        for item in filter(None, (s.strip() for s in (body or "").split(","))):
            key, sep, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not _KEY.match(key) or not value:
                raise InputError(f"pipeline spec: option {item!r} of {name} is not key=value")
            if key in options:
                raise InputError(f"pipeline spec: option {key!r} given twice to {name}")
            options[key] = _parse_value(value)
        parsed.append((name, options))
    return parsed


def format_step(name: str, options: Mapping[str, object]) -> str:
    """One step in canonical form; options print in sorted key order."""
    if not options:
        return name
    body = ",".join(f"{k}={_format_value(v)}" for k, v in sorted(options.items()))
    return f"{name}({body})"


def format_spec(steps: list[tuple[str, Mapping[str, object]]]) -> str:
    """Print parsed steps back as a spec; ``format_spec(parse_spec(s))`` is canonical."""
    return ",".join(format_step(name, opts) for name, opts in steps)


def build_pipeline(
    spec: str,
    table: Mapping[str, Callable[..., Pass]],
    *,
    context: Mapping[str, Any] | None = None,
    **sequential_kwargs: Any,
) -> Sequential:
    """Build a :class:`Sequential` from a spec.

    Args:
        spec: the pipeline text.
        table: pass name → factory; a factory is called with the step's options and, for
            names it declares in its ``context_keys`` attribute, values from ``context``.
        context: values the caller supplies, such as the backend's rules.
        sequential_kwargs: forwarded to :class:`Sequential` (``instruments``, ``verify``).
    """
    context = dict(context or {})
    passes = []
    for name, options in parse_spec(spec):
        factory = table.get(name)
        if factory is None:
            known = ", ".join(sorted(table))
            raise InputError(f"pipeline spec: unknown pass {name!r} (known: {known})")
        extra = {k: context[k] for k in getattr(factory, "context_keys", ()) if k in context}
        try:
            passes.append(factory(**options, **extra))
        except (TypeError, ValueError, QGraphError) as exc:
            # a wrong option name (TypeError), value (ValueError: bins=many) or choice
            raise InputError(f"pipeline spec: bad options for {name}: {exc}") from None
    return Sequential(passes, **sequential_kwargs)
