"""What the backends share: export of a quantized fx graph to ONNX and onnx-ir clean-ups.

``qgraph::fake_quant`` is translated to ``QuantizeLinear`` → ``DequantizeLinear`` (``axis`` only
when per channel). After ``torch.onnx.export`` the model is tidied with onnx-ir:

* the dynamic batch dimension is named ``batch``;
* ``QuantizeLinear`` of a constant weight is computed once into an integer initializer
  (``<weight>_quantized``) with the same arithmetic as the torch op, so the deployed codes are the
  trained codes;
* ``Transpose`` of a dequantized constant (``linear`` on 3-D inputs) is folded into the initializer
  (INT8/FP8 per channel, INT4 blocks); NVFP4/MX weights keep the (N, K) layout with blocks on
  the last axis and the Transpose, as ModelOpt exports them for TensorRT;
* exporter metadata (stack traces, file paths) is dropped so equal inputs give equal bytes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
import torch
import torch.fx

from qgraph import formats
from qgraph._errors import QGraphError
from qgraph.graph import sharing_copy
from qgraph.onnx_graph import add_initializer  # noqa: F401 - used here and by the backends

__all__ = ["export_onnx", "serialize", "const_array", "const_or_dequantized", "decode_weights", "add_initializer"]

logger = logging.getLogger(__name__)


def export_onnx(
    gm: torch.fx.GraphModule,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    opset: int,
    form: str = "deploy",
) -> ir.Model:
    """Export a (fake-quantized) GraphModule to an onnx-ir model; dims symbolic in ``gm`` stay dynamic.

    ``form`` is ``deploy`` (the backend's Q/DQ form) or ``reference`` (standard ops onnxruntime
    runs, weights decoded to float; see :mod:`qgraph.backends._translate`).
    ``example_inputs`` should have at least 2 samples on a dynamic batch axis (size 1 would
    specialise it).
    """
    from qgraph.backends import _translate
    from qgraph.capture import INPUT_NAMES, OUTPUT_NAMES, dynamic_shapes_of
    from qgraph.quant import prepare_for_export

    prepare_for_export(gm)  # QAT: scales of the final weights; learned scales kept positive
    gm = _learned_scales_frozen(_without_distill_taps(gm))
    if form == "reference":
        gm = decode_weights(gm)
    table = _translate.deploy_table() if form == "deploy" else _translate.reference_table()

    # silence the exporter's progress prints and warnings; errors still raise
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        modes = [(m, m.training) for m in gm.modules()]  # the caller's, module by module
        gm.eval()  # what is deployed is the inference graph (no range observation, no dropout)
        try:
            program = torch.export.export(gm, tuple(example_inputs), dynamic_shapes=dynamic_shapes_of(gm))
        finally:
            for m, training in modes:
                m.training = training
        onnx_program = torch.onnx.export(
            program,
            dynamo=True,
            custom_translation_table=table,
            opset_version=opset,
            external_data=False,
            optimize=True,
            verbose=False,
        )
    model = onnx_program.model
    _restore_io_names(model, gm.meta.get(INPUT_NAMES), gm.meta.get(OUTPUT_NAMES))
    _name_batch_dim(model)
    _fold_weight_quantize(model)
    _mx_scales_as_e8m0_bits(model)
    _type_trt_outputs(model)
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


def const_or_dequantized(value: ir.Value | None) -> np.ndarray | None:
    """A constant, or the float32 value of DequantizeLinear of constants (NVFP4 scale chains)."""
    array = const_array(value)
    node = value.producer() if value is not None and array is None else None
    if node is None or node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return array
    ins = [const_or_dequantized(v) for v in node.inputs]
    if any(a is None for a in ins):
        return None
    axis, block = _axis_block(node, ins[1])
    return formats.dequantize(ins[0], ins[1], ins[2] if len(ins) > 2 else None, axis, block)


def _axis_block(node: ir.Node, scale: np.ndarray) -> tuple[int | None, int | None]:
    axis_attr, block_attr = node.attributes.get("axis"), node.attributes.get("block_size")
    block = block_attr.as_int() if block_attr is not None and block_attr.as_int() else None
    if not scale.ndim:
        return None, None
    return (axis_attr.as_int() if axis_attr is not None else 1), block


def _fold_weight_quantize(model: ir.Model) -> None:
    """QuantizeLinear of a constant → an initializer of codes, computed by qgraph.formats."""
    graph = model.graph
    for node in list(graph):
        if node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        x = const_array(node.inputs[0])
        scale = const_or_dequantized(node.inputs[1])
        zp = const_array(node.inputs[2]) if len(node.inputs) > 2 else None
        if x is None or scale is None or zp is None or x.dtype != np.float32:
            continue
        elem = formats.element_of(zp)
        axis, block = _axis_block(node, scale)
        codes = formats.quantize(x, scale, elem, zp if elem.kind == "int" else None, axis, block)
        init = add_initializer(graph, f"{node.inputs[0].name}_quantized", codes)
        node.outputs[0].replace_all_uses_with(init)
        graph.remove(node, safe=True)


def _mx_scales_as_e8m0_bits(model: ir.Model) -> None:
    """TensorRT reads MXFP8 weight scales as E8M0 bits in a uint8 initializer."""
    graph = model.graph
    for node in list(graph):
        if node.op_type != "TRT_MXFP8DequantizeLinear" or const_array(node.inputs[0]) is None:
            continue
        scale = const_array(node.inputs[1])
        if scale is None or scale.dtype != np.float32:
            continue
        bits = scale.astype(ml_dtypes.float8_e8m0fnu).view(np.uint8)
        node.replace_input_with(1, add_initializer(graph, f"{node.inputs[1].name}_e8m0", bits))


def _type_trt_outputs(model: ir.Model) -> None:
    """Give TensorRT's custom quantizers' outputs their types (no ONNX schema infers them)."""
    types = {
        "TRT_FP4DynamicQuantize": (ir.DataType.FLOAT4E2M1, ir.DataType.FLOAT8E4M3FN),
        "TRT_MXFP8DynamicQuantize": (ir.DataType.FLOAT8E4M3FN, ir.DataType.UINT8),
    }
    for node in model.graph:
        for value, dtype in zip(node.outputs, types.get(node.op_type, ())):
            value.type = ir.TensorType(dtype)
        if node.op_type == "TRT_MXFP8DequantizeLinear":
            node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
            node.outputs[0].shape = node.inputs[0].shape


def _transposed_const(graph: ir.Graph, value: ir.Value, perm: list[int]) -> ir.Value | None:
    """A new initializer holding ``value``'s constant transposed by ``perm`` (None if not constant)."""
    array = const_array(value)
    if array is None:
        return None
    return add_initializer(graph, f"{value.name}_t", np.ascontiguousarray(array.transpose(perm)))


def _transpose_block_scale(graph: ir.Graph, scale: ir.Value, perm: list[int]) -> ir.Value | None:
    """The transposed blocked scale: a constant, or DequantizeLinear(E4M3 constant, global) (NVFP4)."""
    direct = _transposed_const(graph, scale, perm)
    if direct is not None:
        return direct
    chain = scale.producer()
    if chain is None or chain.op_type != "DequantizeLinear" or len(chain.outputs[0].uses()) != 1:
        return None
    block_scales = _transposed_const(graph, chain.inputs[0], perm)
    if block_scales is None:
        return None
    old = chain.inputs[0]
    chain.replace_input_with(0, block_scales)
    chain.outputs[0].shape = block_scales.shape
    if not old.uses():
        graph.initializers.pop(old.name, None)
    return scale


def _fold_weight_transpose(model: ir.Model) -> None:
    """Transpose(DequantizeLinear(codes)) of a weight → DequantizeLinear of transposed codes."""
    graph = model.graph
    for node in list(graph):
        if node.op_type not in ("DequantizeLinear", "TRT_MXFP8DequantizeLinear") or len(node.outputs[0].uses()) != 1:
            continue
        codes = const_array(node.inputs[0])
        user = next(iter(node.outputs[0].uses())).node
        if codes is None or user.op_type != "Transpose" or len(node.inputs[0].uses()) != 1:
            continue
        if node.attributes.get("block_size") is not None and getattr(formats.element_of(codes), "kind", "float") == "float":
            continue  # NVFP4/MX weights keep ModelOpt's (N, K) layout and the Transpose
        perm_attr = user.attributes.get("perm")
        perm = list(perm_attr.as_ints()) if perm_attr is not None else list(range(codes.ndim))[::-1]
        scale = node.inputs[1]
        scale_array = const_or_dequantized(scale)
        if scale_array is None:
            continue
        if node.attributes.get("block_size") is not None:
            new_scale = _transpose_block_scale(graph, scale, perm)
            if new_scale is None:
                continue
            if new_scale is not scale:
                node.replace_input_with(1, new_scale)
                if not scale.uses():
                    graph.initializers.pop(scale.name, None)
            zero_point = node.inputs[2] if len(node.inputs) > 2 else None
            zp_t = _transposed_const(graph, zero_point, perm) if zero_point is not None else None
            if zp_t is not None:
                node.replace_input_with(2, zp_t)
                if not zero_point.uses():
                    graph.initializers.pop(zero_point.name, None)
        old = node.inputs[0]
        node.replace_input_with(0, _transposed_const(graph, old, perm))
        if scale_array.ndim:
            axis_attr = node.attributes.get("axis")
            axis = axis_attr.as_int() if axis_attr is not None else 1
            node.attributes["axis"] = ir.AttrInt64("axis", perm.index(axis % codes.ndim))
        out = node.outputs[0]
        out.shape = node.inputs[0].shape
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


def _without_distill_taps(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The student alone if QAD taps are in the graph (teachers are not deployed): a graph
    without the teacher over ``gm``'s own modules; ``gm`` itself if it has no taps."""
    from qgraph.passes.insert_distill_taps import DISTILL_META, RemoveDistillTaps

    if DISTILL_META not in gm.meta:
        return gm
    student = sharing_copy(gm)
    RemoveDistillTaps()(student)  # edits the copy's graph and drops its teacher attribute
    return student


def _learned_scales_frozen(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` with its learned per-tensor scales as 0-d buffers, so each is exported as the
    scalar initializer it names (``fq_x.scale``), not a reshape of a one-element parameter;
    ``gm`` itself if it learns none. The trained graph is left learning: the result is a graph
    over its modules in which only those quantizers are copies."""
    import copy

    from qgraph.quant import FakeQuant

    def learned(m: torch.nn.Module) -> bool:
        return isinstance(m, FakeQuant) and m.learnable and m.per_tensor

    names = [n.target for n in gm.graph.nodes if n.op == "call_module" and learned(gm.get_submodule(n.target))]
    if not names:
        return gm
    # qgraph's quantizers are top-level attributes; one inside a shared parent forces a deep copy
    gm = sharing_copy(gm) if all("." not in name for name in names) else copy.deepcopy(gm)
    for name in names:  # a learned scale is neither tracked nor observed: nothing else to keep
        frozen = copy.deepcopy(gm.get_submodule(name))
        frozen.configure_training(learn_scale=False)
        gm.set_submodule(name, frozen)
    return gm


def decode_weights(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A graph like ``gm``'s whose weight quantizers are replaced by their output: the decoded weights.

    The values are exactly what the deploy form's DequantizeLinear computes (codes times scale
    in float32), so the reference form runs the deployed weights on any runtime. ``gm`` is left
    as it was; the result shares its other modules and tensors (see :func:`qgraph.graph.sharing_copy`).
    """
    import copy

    from qgraph.graph import constant_value, unique_attr_name
    from qgraph.quant import FakeQuant

    gm = sharing_copy(gm)
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), FakeQuant):
            continue
        src = node.args[0]
        module = gm.get_submodule(node.target)
        if module.spec.role != "weight" or not isinstance(src, torch.fx.Node) or src.op != "get_attr":
            continue
        with torch.no_grad():  # through a copy: a weight-tracking quantizer writes its scales
            decoded = copy.deepcopy(module)(constant_value(gm, src)).detach().clone()
        name = unique_attr_name(gm, f"{node.target}_decoded")
        gm.register_buffer(name, decoded)
        with gm.graph.inserting_before(node):
            const = gm.graph.get_attr(name)
        const.meta = dict(node.meta)
        node.replace_all_uses_with(const)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
