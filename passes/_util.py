"""Small fx helpers shared by the passes (private)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.fx

from qgraph._errors import QGraphError
from qgraph.graph import get_attr

from qgraph.quant import FLOAT_META, QUANT_META  # noqa: F401 - re-exported for the passes


def delete_unused_attrs(gm: torch.fx.GraphModule, targets: set[str]) -> None:
    """Delete the given attributes if no get_attr/call_module node refers to them any more."""
    used = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    for target in sorted(targets - used):
        *path, last = target.split(".")
        owner = get_attr(gm, ".".join(path)) if path else gm
        if hasattr(owner, last):
            delattr(owner, last)


def insert_module_after(
    gm: torch.fx.GraphModule, src: torch.fx.Node, name: str, module: torch.nn.Module
) -> torch.fx.Node:
    """Add ``module`` as attribute ``name`` and a call_module node reading ``src`` right after it."""
    gm.add_module(name, module)
    if src.op in ("placeholder", "get_attr"):
        # keep inputs and constants grouped at the top: insert just before src's first user
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        first_user = min(src.users, key=order.__getitem__)
        with gm.graph.inserting_before(first_user):
            node = gm.graph.call_module(name, (src,))
    else:
        with gm.graph.inserting_after(src):
            node = gm.graph.call_module(name, (src,))
    node.meta["val"] = src.meta.get("val")
    return node


def is_quantizer(gm: torch.fx.GraphModule, node: object) -> bool:
    """True for a call_module node of an Observer or FakeQuant (a quantizer already on the edge)."""
    from qgraph.observers import Observer
    from qgraph.quant import FakeQuant

    return (
        isinstance(node, torch.fx.Node)
        and node.op == "call_module"
        and isinstance(gm.get_submodule(node.target), (Observer, FakeQuant))
    )


def batch_args(batch: object, names: list[str]) -> tuple:
    """A calibration batch (a tensor, a tuple, or a dict keyed by input name) as positional args."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, Mapping):
        missing = [n for n in names if n not in batch]
        if missing:
            raise QGraphError(f"calibration batch lacks input(s) {', '.join(missing)}")
        return tuple(batch[n] for n in names)
    return tuple(batch)
