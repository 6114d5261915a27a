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
    """Raise :class:`~qgraph.VerifierError` naming the first problem found in ``gm``
    (a GraphModule, or an onnx-ir model: see :func:`verify_onnx`)."""
    if not isinstance(gm, torch.fx.GraphModule):
        verify_onnx(gm)
        return
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


def verify_onnx(model) -> None:  # noqa: ANN001 - an onnx_ir.Model
    """An onnx-ir model: nodes in topological order (every input defined before it is read),
    value names unique, every graph output defined."""
    graph = model.graph
    defined = {id(v) for v in graph.inputs} | {id(v) for v in graph.initializers.values()}
    names: set[str] = {v.name for v in graph.inputs} | set(graph.initializers)
    for node in graph:
        for value in node.inputs:
            if value is not None and id(value) not in defined:
                raise VerifierError(f"node {node.name} ({node.op_type}) reads {value.name!r} before it is defined")
        for value in node.outputs:
            if value.name in names:
                raise VerifierError(f"value name {value.name!r} is defined twice")
            names.add(value.name)
            defined.add(id(value))
    for value in graph.outputs:
        if id(value) not in defined:
            raise VerifierError(f"graph output {value.name!r} is not defined")
