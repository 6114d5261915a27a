"""The structural verifier, run after every pass when ``verify=True`` (the default).

It checks what every later pass and the exporter rely on: the fx graph lints (topological order,
every use defined, one output), every ``get_attr`` names an existing tensor or module, every
``call_module`` names an existing module, and the generated code compiles.
"""

from __future__ import annotations

import torch
import torch.fx

from qgraph._errors import VerifierError
from qgraph.graph import get_attr

__all__ = ["verify"]


def verify(gm: torch.fx.GraphModule) -> None:
    """Raise :class:`~qgraph.VerifierError` naming the first problem found in ``gm``."""
    try:
        gm.graph.lint()
    except Exception as exc:  # fx raises RuntimeError or AssertionError
        raise VerifierError(f"graph does not lint: {exc}") from None
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    if len(outputs) != 1:
        raise VerifierError(f"graph has {len(outputs)} output nodes, expected 1")
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            try:
                value = get_attr(gm, node.target)
            except AttributeError:
                raise VerifierError(f"node {node.name} refers to missing {node.target!r}") from None
            if node.op == "call_module" and not isinstance(value, torch.nn.Module):
                raise VerifierError(f"node {node.name}: {node.target!r} is not a module")
            if node.op == "get_attr" and not isinstance(value, (torch.Tensor, torch.nn.Module)):
                raise VerifierError(f"node {node.name}: {node.target!r} is not a tensor")
    try:
        gm.recompile()
    except Exception as exc:
        raise VerifierError(f"graph code does not compile: {exc}") from None
