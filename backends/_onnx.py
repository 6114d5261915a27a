"""What the backends share: export of a quantized fx graph to ONNX and onnx-ir clean-ups.

``qgraph::fake_quant`` is translated to ``QuantizeLinear`` → ``DequantizeLinear`` (``axis`` only
when per channel). After ``torch.onnx.export`` the model is tidied with onnx-ir:

* the dynamic batch dimension is named ``batch``;
* ``QuantizeLinear`` of a constant weight is computed once into an integer initializer
  (``<weight>_quantized``) with the same arithmetic as the torch op, so the deployed codes are the
  trained codes;
* ``Transpose`` of a dequantized constant (``linear`` on 3-D inputs) is folded into the initializer;
* exporter metadata (stack traces, file paths) is dropped so equal inputs give equal bytes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
import torch
import torch.fx

from qgraph._errors import QGraphError

__all__ = ["export_onnx", "serialize", "const_array"]

logger = logging.getLogger(__name__)


def _fake_quant_onnx(x, scale, zero_point, axis: int, qmin: int, qmax: int):  # noqa: ANN001, ANN201
    from onnxscript import opset20 as op

    if len(scale.shape) == 0:
        q = op.QuantizeLinear(x, scale, zero_point)
        return op.DequantizeLinear(q, scale, zero_point)
    q = op.QuantizeLinear(x, scale, zero_point, axis=axis)
    return op.DequantizeLinear(q, scale, zero_point, axis=axis)


def export_onnx(
    gm: torch.fx.GraphModule, example_inputs: tuple[torch.Tensor, ...], *, opset: int
) -> ir.Model:
    """Export a (fake-quantized) GraphModule to an onnx-ir model; dims symbolic in ``gm`` stay dynamic.

    ``example_inputs`` should have at least 2 samples on a dynamic batch axis (size 1 would
    specialise it).
    """
    from qgraph.capture import INPUT_NAMES, OUTPUT_NAMES, dynamic_shapes_of

    # silence the exporter's progress prints and warnings; errors still raise
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(gm, tuple(example_inputs), dynamic_shapes=dynamic_shapes_of(gm))
        onnx_program = torch.onnx.export(
            program,
            dynamo=True,
            custom_translation_table={torch.ops.qgraph.fake_quant.default: _fake_quant_onnx},
            opset_version=opset,
            external_data=False,
            optimize=True,
            verbose=False,
        )
    model = onnx_program.model
    _restore_io_names(model, gm.meta.get(INPUT_NAMES), gm.meta.get(OUTPUT_NAMES))
    _name_batch_dim(model)
    _fold_weight_quantize(model)
    _fold_weight_transpose(model)
    _drop_metadata(model)
    ir_passes.RemoveUnusedNodesPass()(model)
    ir_passes.RemoveUnusedOpsetsPass()(model)
    return model


def serialize(model: ir.Model) -> bytes:
    """Check (onnx.checker, full) and serialize; raises QGraphError if the checker refuses."""
    proto = ir.serde.serialize_model(model)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise QGraphError(f"lowered model fails onnx.checker: {str(exc).splitlines()[0]}") from None
    return proto.SerializeToString(deterministic=True)


def _restore_io_names(model: ir.Model, inputs: list[str] | None, outputs: list[str] | None) -> None:
    """Give the graph inputs/outputs the source model's names (serving code looks them up)."""
    pairs = []
    if inputs and len(inputs) == len(model.graph.inputs):
        pairs += list(zip(model.graph.inputs, inputs))
    if outputs and len(outputs) == len(model.graph.outputs):
        pairs += list(zip(model.graph.outputs, outputs))
    wanted = {name for _, name in pairs}
    for value in _all_values(model.graph):
        if value.name in wanted and all(value is not v for v, _ in pairs):
            value.name = f"{value.name}__qgraph"  # free the name for the graph input/output
    for value, name in pairs:
        if value.name != name and not (value.is_graph_input() and value in model.graph.outputs):
            value.name = name


def _name_batch_dim(model: ir.Model) -> None:
    names = set()
    for value in model.graph.inputs:
        if value.shape is not None and len(value.shape) and isinstance(value.shape[0], ir.SymbolicDim):
            names.add(value.shape[0].value)
    if not names:
        return
    for value in _all_values(model.graph):
        if value.shape is None:
            continue
        dims = [
            "batch" if isinstance(d, ir.SymbolicDim) and d.value in names else d
            for d in value.shape
        ]
        value.shape = ir.Shape(dims)


def _all_values(graph: ir.Graph):  # noqa: ANN202
    yield from graph.inputs
    for node in graph:
        yield from node.outputs


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind a value (initializer or Constant node), as numpy, or None."""
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return tensor.numpy() if tensor is not None else None


def _fold_weight_quantize(model: ir.Model) -> None:
    graph = model.graph
    for node in list(graph):
        if node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        x, scale, zp = (const_array(v) for v in (list(node.inputs) + [None, None])[:3])
        if x is None or scale is None or zp is None or x.dtype != np.float32:
            continue
        axis_attr = node.attributes.get("axis")
        axis = axis_attr.as_int() if axis_attr is not None and scale.ndim else 0
        codes = _quantize(x, scale, zp, axis)
        name = _free_name(graph, f"{node.inputs[0].name}_quantized")
        init = ir.Value(name=name, const_value=ir.tensor(codes, name=name))
        init.shape = ir.Shape(codes.shape)
        init.type = ir.TensorType(ir.DataType.from_numpy(codes.dtype))
        graph.register_initializer(init)
        node.outputs[0].replace_all_uses_with(init)
        graph.remove(node, safe=True)


def _free_name(graph: ir.Graph, base: str) -> str:
    """An initializer name not yet used (one weight may be quantized on two axes)."""
    name, i = base, 0
    while name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    return name


def _quantize(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int) -> np.ndarray:
    """QuantizeLinear in numpy: float32 divide, round half to even, add zero-point, saturate."""
    shape = [1] * x.ndim
    if scale.ndim:
        shape[axis] = -1
    info = np.iinfo(zp.dtype)
    q = np.rint(x / scale.reshape(shape).astype(np.float32)) + zp.reshape(shape).astype(np.float32)
    return np.clip(q, info.min, info.max).astype(zp.dtype)


def _fold_weight_transpose(model: ir.Model) -> None:
    graph = model.graph
    for node in list(graph):
        if node.op_type != "DequantizeLinear" or len(node.outputs[0].uses()) != 1:
            continue
        codes = const_array(node.inputs[0])
        user = next(iter(node.outputs[0].uses())).node
        if codes is None or user.op_type != "Transpose" or len(node.inputs[0].uses()) != 1:
            continue
        perm_attr = user.attributes.get("perm")
        perm = list(perm_attr.as_ints()) if perm_attr is not None else list(range(codes.ndim))[::-1]
        axis_attr = node.attributes.get("axis")
        scale = const_array(node.inputs[1])
        if scale is None:
            continue
        old = node.inputs[0]
        codes_t = np.ascontiguousarray(codes.transpose(perm))
        name = _free_name(graph, f"{old.name}_t")
        init = ir.Value(name=name, const_value=ir.tensor(codes_t, name=name))
        init.shape = ir.Shape(codes_t.shape)
        init.type = ir.TensorType(ir.DataType.from_numpy(codes_t.dtype))
        graph.register_initializer(init)
        node.replace_input_with(0, init)
        if scale.ndim:
            axis = axis_attr.as_int() if axis_attr is not None else 1
            node.attributes["axis"] = ir.AttrInt64("axis", perm.index(axis % codes.ndim))
        out = node.outputs[0]
        out.shape = ir.Shape(codes_t.shape)
        user.outputs[0].replace_all_uses_with(out)
        graph.remove(user, safe=True)
        if not old.uses():
            graph.initializers.pop(old.name, None)


def _drop_metadata(model: ir.Model) -> None:
    for node in model.graph:
        node.metadata_props.clear()
        for value in node.outputs:
            value.metadata_props.clear()
    for value in model.graph.inputs:
        value.metadata_props.clear()
    model.metadata_props.clear()
    model.graph.metadata_props.clear()
