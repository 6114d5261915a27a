"""Torch front door: capture an ``nn.Module`` with ``torch.export`` or load a ``.pt2`` file.

Both return a private :class:`torch.fx.GraphModule` (parameters copied, so passes never touch the
user's model) whose graph is torch.export's ATen-level IR. The batch dimension (axis 0 of every
input) is dynamic by default.

Example:
    >>> gm = capture(model.eval(), (torch.randn(1, 1, 8, 8),))  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import inspect
import zipfile
from pathlib import Path

import torch
import torch.fx

from qgraph._errors import InputError, first_line

__all__ = ["capture", "load_pt2", "export_program", "input_specs", "dynamic_shapes_of"]


def _batch_dynamic_shapes(example_inputs: tuple[torch.Tensor, ...]) -> tuple:
    return tuple({0: torch.export.Dim.AUTO} if t.dim() > 0 else None for t in example_inputs)


def _check_example_inputs(example_inputs: object, tensors_only: bool) -> None:
    """A tuple or list with one value per model input (a bare tensor would be unpacked row by row);
    ``tensors_only``: each a tensor, as a dynamic batch axis needs."""
    if isinstance(example_inputs, torch.Tensor):
        raise InputError("example_inputs must be a tuple with one tensor per model input: write (x,), not x")
    if not isinstance(example_inputs, (tuple, list)):
        raise InputError(f"example_inputs must be a tuple of tensors, got {type(example_inputs).__name__}")
    for i, value in enumerate(example_inputs if tensors_only else ()):
        if not isinstance(value, torch.Tensor):
            raise InputError(f"example_inputs[{i}] is of type {type(value).__name__}, not a tensor (one tensor per model input)")


def export_program(
    module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], *, dynamic_batch: bool = True
) -> torch.export.ExportedProgram:
    """``torch.export.export`` with axis 0 of every input dynamic (unless ``dynamic_batch=False``)."""
    _check_example_inputs(example_inputs, tensors_only=dynamic_batch)
    shapes = _batch_dynamic_shapes(example_inputs) if dynamic_batch else None
    params = inspect.signature(module.forward).parameters.values()
    if shapes is not None and any(p.kind is p.VAR_POSITIONAL for p in params):
        shapes = (shapes,)  # forward(*inputs): one entry for the whole tuple
    return torch.export.export(module, tuple(example_inputs), dynamic_shapes=shapes)


def dynamic_shapes_of(gm: torch.fx.GraphModule) -> tuple | None:
    """``dynamic_shapes`` for re-exporting ``gm``: exactly the dims that are symbolic in its inputs.

    A program captured with a static batch stays static; one with a dynamic sequence length keeps
    it dynamic. None when every input is static.
    """
    shapes = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            dims = {
                i: torch.export.Dim.AUTO
                for i, d in enumerate(getattr(val, "shape", ()))
                if not isinstance(d, int)
            }
            shapes.append(dims or None)
    return tuple(shapes) if any(shapes) else None


#: GraphModule.meta keys: the model's own input/output names (fx may rename placeholders, e.g.
#: ``input`` → ``input_1``); calibration data and the lowered ONNX use these.
INPUT_NAMES = "qgraph.input_names"
OUTPUT_NAMES = "qgraph.output_names"


def _to_graph_module(program: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    gm = copy.deepcopy(program.module())
    user_inputs = [
        spec.arg.name
        for spec in program.graph_signature.input_specs
        if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT
    ]
    gm.meta[INPUT_NAMES] = user_inputs
    for node in list(gm.graph.nodes):
        # torch.export's input-shape guard; qgraph re-exports with its own shapes.
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
            delattr(gm, "_guards_fn")
    gm.graph.eliminate_dead_code()
    gm.recompile()
    gm.eval()
    return gm


def capture(
    module: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    dynamic_batch: bool = True,
    dynamic_shapes: object = None,
) -> torch.fx.GraphModule:
    """Capture ``module`` (put in eval mode on a copy) as an fx GraphModule via torch.export.

    Args:
        module: the model; it is copied, never modified.
        example_inputs: a tuple with one tensor per input; use a batch of at least 2 (1 would
            specialise it). With ``dynamic_batch=False`` or ``dynamic_shapes``, any value
            ``torch.export`` takes.
        dynamic_batch: make axis 0 of every input dynamic.
        dynamic_shapes: torch.export ``dynamic_shapes`` to use instead (overrides ``dynamic_batch``).
    """
    _check_example_inputs(example_inputs, tensors_only=dynamic_shapes is None and dynamic_batch)
    module = copy.deepcopy(module).eval()
    if dynamic_shapes is not None:
        program = torch.export.export(module, tuple(example_inputs), dynamic_shapes=dynamic_shapes)
    else:
        program = export_program(module, example_inputs, dynamic_batch=dynamic_batch)
    return _to_graph_module(program)


def load_pt2(path: str | Path) -> torch.fx.GraphModule:
    """Load a program saved with ``torch.export.save`` as a private GraphModule."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path}: not a torch.export .pt2 archive")
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise InputError(f"{path}: cannot load torch.export program ({first_line(exc)})") from None
    return _to_graph_module(program)


def input_specs(gm: torch.fx.GraphModule) -> list[tuple[str, tuple[int | None, ...], torch.dtype]]:
    """``(name, shape, dtype)`` of every graph input, under the model's own input names; dynamic
    dimensions are None."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = gm.meta.get(INPUT_NAMES) or [n.name for n in placeholders]
    if len(names) != len(placeholders):
        names = [n.name for n in placeholders]
    specs = []
    for node, name in zip(placeholders, names):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise InputError(f"model input {name!r} is not a tensor")
        if val.dtype.is_complex:
            raise InputError(f"model input {name!r} is {val.dtype}; complex inputs are not supported")
        shape = tuple(d if isinstance(d, int) else None for d in val.shape)
        specs.append((name, shape, val.dtype))
    return specs
