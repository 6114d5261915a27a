"""ONNX models as qgraph graphs: load through onnx-ir, the planner's view, running in onnxruntime.

The ONNX front door works on the model itself, not on a translation: passes edit an onnx-ir
``ir.Model`` in place, the planner reads it through :class:`OnnxView` (the same ``annotate`` and
rule data as the torch door), and calibration runs the model in onnxruntime with the observed
tensors exposed as extra outputs. Ops qgraph has no rule for — any op, custom domains included,
as long as onnxruntime runs it — stay in float.

:func:`load_onnx_model` reads a model (external data and models over 2 GB included: onnx-ir keeps
external tensors on disk until they are used), refuses what cannot be quantized (invalid files,
opset < 11, already-quantized models, models without float weights), and normalises it with
onnx-ir's own passes: constants lifted to initializers, initializers removed from the inputs,
Identity nodes and dead nodes removed, topological order, shape inference; transposes of
constant weights are folded (``MatMul(x, Transpose(W))`` from exporters that do not fold).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, MutableMapping
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.external_data
import onnx_ir.passes.common as common

from qgraph._errors import InputError, first_line
from qgraph.views import QUANTIZER, GraphView

__all__ = [
    "OnnxView",
    "load_onnx_model",
    "upgrade_opset",
    "quantizer_opset",
    "input_specs",
    "internalize",
    "model_opset",
    "serialize",
    "session",
    "QUANTIZED_OPS",
    "OBSERVERS_META",
    "add_initializer",
    "drop_unused_initializers",
    "planned_edges",
    "is_dequantized",
]

#: Ops that mean a model is quantized already.
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "MatMulInteger", "ConvInteger", "QLinearAdd", "QGemm", "MatMulIntegerToFloat",
})

#: Beyond this many bytes of weights a model goes to onnxruntime as a file with external data
#: (protobuf cannot hold 2 GB in one message).
_INLINE_LIMIT = 1 << 30
#: Up to this many bytes a model read from disk gets its shapes inferred before deserialisation.
_INFER_PROTO_LIMIT = 64 << 20

_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


def model_opset(model: ir.Model) -> int:
    """The model's default-domain opset version."""
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def load_onnx_model(path: str | Path) -> ir.Model:
    """Read and check a float ONNX model, normalised for the passes (see the module docstring).

    Raises:
        InputError: one line naming the problem.
    """
    path = Path(path)
    try:  # one parse: the weights in external data stay on disk (read when used)
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        raise InputError(f"{path}: neither a torch.export .pt2 archive nor a valid ONNX model") from None
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    try:  # external data is checked where it lies (the file names are relative to the model)
        onnx.checker.check_model(str(path) if external else proto)
    except Exception as exc:
        raise InputError(f"{path}: invalid ONNX model ({first_line(exc)})") from None
    # shapes inferred on the proto just read (one C++ call) rather than by onnx-ir's pass, which
    # serialises the model again and deserialises the result; models holding big weights inline
    # take the pass (it strips the weights before the copy) once the graph is normalised
    inferred = proto.ByteSize() <= _INFER_PROTO_LIMIT
    if inferred:
        with contextlib.suppress(Exception):  # shapes are a help, not a must (custom ops have none)
            proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, path.parent)
    del proto
    opset = model_opset(model)
    if opset < 11:
        raise InputError(f"{path}: opset {opset} is below 11, the oldest qgraph reads")
    quantized = next((n for n in model.graph.all_nodes() if n.op_type in QUANTIZED_OPS and n.domain in ("", "ai.onnx", "com.microsoft")), None)
    if quantized is not None:
        raise InputError(
            f"{path}: model is already quantized ({quantized.op_type} {quantized.name!r}); "
            "pass the float model it came from"
        )
    for value in model.graph.inputs:
        if value.dtype is not None and not (value.dtype in _FLOAT_TYPES or value.dtype.is_integer() or value.dtype == ir.DataType.BOOL):
            raise InputError(f"{path}: input {value.name} is {value.dtype}; inputs must be float, integer or bool tensors")
    for pass_ in (
        common.RemoveInitializersFromInputsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.IdentityEliminationPass(),
        common.RemoveUnusedNodesPass(),
        common.TopologicalSortPass(),
        common.NameFixPass(_OpTypeNames()),  # unnamed nodes get names: overrides and messages can name them
    ):
        pass_(model)
    weights = [v for v in model.graph.initializers.values() if v.dtype in _FLOAT_TYPES and v.const_value is not None and v.const_value.size > 1]
    if not weights:
        raise InputError(f"{path}: model has no float weights: nothing to quantize")
    _load_external_data(model)
    if not inferred:
        with contextlib.suppress(Exception):
            common.ShapeInferencePass()(model)
    _fold_weight_transposes(model)
    return model


class _OpTypeNames(common.naming.SimpleNameGenerator):
    """An unnamed node is named after its op type (``MatMul``, ``MatMul_1``, ...: NameFixPass
    makes them unique), so ``--override 'MatMul*=float'`` can select it."""

    def generate_node_name(self, node: ir.Node) -> str:
        return node.name or node.op_type


def _fold_weight_transposes(model: ir.Model) -> None:
    """``Transpose(W)`` of a constant → a transposed constant: exporters without constant
    folding write ``nn.Linear`` as ``MatMul(x, Transpose(W))``, whose weight is then a constant
    again (per-channel weight scales, not an activation quantizer)."""
    graph = model.graph
    for node in list(graph):
        w = node.inputs[0] if node.op_type == "Transpose" and node.domain in ("", "ai.onnx") and node.inputs else None
        out = node.outputs[0] if w is not None else None
        if w is None or w.const_value is None or isinstance(w.const_value, ir.ExternalTensor) or out.is_graph_output():
            continue
        array = w.const_value.numpy()
        perm = node.attributes.get_ints("perm", list(range(array.ndim))[::-1])
        folded = add_initializer(graph, f"{w.name}_transposed", np.ascontiguousarray(np.transpose(array, perm)))
        out.replace_all_uses_with(folded)
        graph.remove(node, safe=True)
        if not w.uses() and not w.is_graph_output():
            graph.initializers.pop(w.name)


def _load_external_data(model: ir.Model) -> None:
    """Read external-data weights into memory when they fit in one ONNX message (< 1 GB), so the
    model is self-contained; bigger models keep them on disk (read when used)."""
    external = [v for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)]
    if external and sum(v.const_value.nbytes for v in external) <= _INLINE_LIMIT:
        internalize(model)


def internalize(model: ir.Model) -> None:
    """Read every weight still in an external-data file into memory (before writing the model
    as one self-contained file: after quantization a model 4x smaller than its float source).

    Raises:
        QGraphError: the weights would exceed protobuf's 2 GB.
    """
    from qgraph._errors import QGraphError

    values = list(model.graph.initializers.values())
    if sum(v.const_value.nbytes for v in values if v.const_value is not None) >= 2**31:
        raise QGraphError("the quantized model holds over 2 GB of weights: more than one ONNX file can hold")
    for value in values:
        if isinstance(value.const_value, ir.ExternalTensor):
            value.const_value = ir.Tensor(np.array(value.const_value.numpy()), name=value.name)


def input_specs(model: ir.Model) -> list[tuple[str, tuple[int | None, ...], object]]:
    """``(name, shape, dtype)`` of every model input; symbolic dimensions are None."""
    import torch

    specs = []
    for value in model.graph.inputs:
        dtype = value.dtype or ir.DataType.FLOAT
        shape = tuple(d if isinstance(d, int) else None for d in (value.shape or ()))
        specs.append((value.name, shape, torch.from_numpy(np.zeros(0, dtype.numpy())).dtype))
    return specs


def quantizer_opset(model: ir.Model, precision: str) -> int:
    """The lowest opset whose Q/DQ hold ``precision`` for this model: 13 (per-channel INT8
    scales), 19 for FP8 or for float16/bfloat16 models (scales of their type)."""
    values = [*model.graph.inputs, *model.graph.initializers.values()]
    half = any(v.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16) for v in values)
    return 19 if precision == "fp8" or half else 13


def upgrade_opset(model: ir.Model, target: int) -> ir.Model:
    """The model at opset ``target`` (onnx's version converter) if it is below; else itself."""
    if model_opset(model) >= target:
        return model
    base_dir = next(
        (v.const_value.base_dir for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)),
        None,
    )
    try:
        proto = onnx.version_converter.convert_version(ir.serde.serialize_model(model), target)
    except Exception as exc:
        raise InputError(f"cannot upgrade the model from opset {model_opset(model)} to {target}: {first_line(exc)}") from None
    upgraded = ir.serde.deserialize_model(proto)
    if base_dir is not None:  # weights left on disk (a large model) are found where they were
        ir.external_data.set_base_dir(upgraded.graph, base_dir)
    return upgraded


def serialize(model: ir.Model) -> bytes:
    """The model as ONNX bytes (deterministic: the same model gives the same bytes)."""
    return ir.serde.serialize_model(model).SerializeToString(deterministic=True)


@contextlib.contextmanager
def session(model: ir.Model, outputs: list[ir.Value] = (), *, optimize: bool = True) -> Iterator[object]:
    """An onnxruntime CPU session of ``model`` with ``outputs`` exposed as extra graph outputs.

    The model is not changed (the extra outputs are removed again). Models with more than 1 GB
    of weights are handed over as a file with external data.
    """
    import onnxruntime as ort

    graph = model.graph
    extra = [v for v in dict.fromkeys(outputs) if not v.is_graph_output()]
    graph.outputs.extend(extra)
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # no busy-waiting pool threads after a run: the observers work on the same cores between runs
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if not optimize:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        weight_bytes = sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None)
        large = weight_bytes > _INLINE_LIMIT
        with tempfile.TemporaryDirectory(prefix="qgraph-ort-") if large else contextlib.nullcontext() as tmp:
            if large:
                path = Path(tmp) / "model.onnx"
                ir.save(model, path, external_data="model.onnx.data")
                source: object = str(path)
            else:
                source = serialize(model)
            try:
                sess = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
            except Exception as exc:
                raise InputError(f"onnxruntime cannot run the model: {first_line(exc)}") from None
            yield sess
    finally:
        for _ in extra:
            graph.outputs.pop()


class OnnxView(GraphView):
    """An onnx-ir model seen by the planner (see :class:`qgraph.views.GraphView`).

    A MatMul with a constant weight followed by the Add of a constant bias (how exporters write
    ``nn.Linear`` on 3-D inputs) is one op to the planner, as ``linear`` is in a torch graph: the
    bias Add is not planned, and a residual Add after it sees the MatMul as its producer. A
    Q→DQ pair already on an edge is looked through.
    """

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self._bias_add: dict[ir.Node, ir.Node] = {}  # MatMul → its bias Add
        for node in model.graph:
            add = _bias_add_of(node)
            if add is not None:
                self._bias_add[node] = add
        self._folded = {id(a): m for m, a in self._bias_add.items()}

    def ops(self) -> list[ir.Node]:
        return [n for n in self.model.graph if id(n) not in self._folded and n.op_type not in ("QuantizeLinear", "DequantizeLinear")]

    def kind(self, op: object) -> str | None:
        if not isinstance(op, ir.Node) or op.domain not in ("", "ai.onnx"):
            return None
        if op.op_type == "ReduceMean" and _is_global_pool(op):
            return "GlobalAveragePool"
        return op.op_type

    def meta(self, op: ir.Node) -> MutableMapping:
        return op.meta

    def label(self, op: ir.Node) -> str:
        kind = self.kind(op)
        name = op.name or f"an unnamed {op.op_type}"
        return f"{name} ({kind})" if kind and op.name else name

    def names(self, op: ir.Node) -> tuple[str, ...]:
        scopes = op.metadata_props.get("pkg.torch.onnx.name_scopes", "")
        path = ""
        if scopes:  # ['', 'block1', 'block1.conv1', 'block1.conv1.0', 'conv2d']: the module is the one before the op
            parts = [p.strip(" '\"") for p in scopes.strip("[]").split(",")]
            path = parts[-2] if len(parts) >= 2 else ""
        return tuple(n for n in (op.name, path) if n)

    def name(self, op: ir.Node) -> str:
        return op.name or ""

    def describe(self, op: ir.Node) -> str:
        return f"{op.domain}::{op.op_type}" if op.domain not in ("", "ai.onnx") else op.op_type

    def arg(self, op: ir.Node, index: int) -> ir.Value | None:
        value = op.inputs[index] if index < len(op.inputs) else None
        return _through_qdq(value) if value is not None else None

    def output(self, op: ir.Node) -> ir.Value:
        return self._bias_add.get(op, op).outputs[0]

    def producer(self, tensor: object | None) -> ir.Node | None:
        node = tensor.producer() if isinstance(tensor, ir.Value) else None
        return self._folded.get(id(node), node) if node is not None else None

    def readers(self, tensor: ir.Value) -> list[tuple[object | None, frozenset[int]]]:
        out: dict[ir.Node, set[int]] = {}
        for use in tensor.uses():
            out.setdefault(use.node, set()).add(use.idx)
        readers = [(QUANTIZER if n.op_type == "QuantizeLinear" else n, frozenset(at)) for n, at in out.items()]
        return readers + ([(None, frozenset())] if tensor.is_graph_output() else [])

    def is_constant(self, tensor: object | None) -> bool:
        return isinstance(tensor, ir.Value) and tensor.const_value is not None

    def constant_shape(self, tensor: ir.Value) -> tuple[int, ...]:
        return tuple(tensor.const_value.shape)

    def shape(self, tensor: ir.Value) -> tuple | None:
        if tensor.shape is None:
            return None
        return tuple(d if isinstance(d, int) else str(d) for d in tensor.shape)

    def groups(self, op: ir.Node) -> int:
        return op.attributes.get_int("group", 1) if op.op_type in ("Conv", "ConvTranspose") else 1

    def clip_min(self, op: ir.Node) -> float | None:
        low = op.inputs[1] if len(op.inputs) > 1 else None
        if low is None or low.const_value is None:
            return None
        return float(low.const_value.numpy().reshape(-1)[0])

    def concat_parts(self, op: ir.Node) -> list[object | None]:
        return [_through_qdq(v) if v is not None else None for v in op.inputs]

    def weight_axis(self, op: ir.Node, index: int, axis: int | None) -> int | None:
        # torch's linear and a Gemm with transB=1 hold W as (N, K); transB=0 holds (K, N)
        if op.op_type == "Gemm" and index == 1 and axis == 0 and not op.attributes.get_int("transB", 0):
            return 1
        return axis


def _through_qdq(value: ir.Value) -> ir.Value:
    """The tensor a DequantizeLinear(QuantizeLinear(x)) pair (or a DQ of codes) stands for."""
    node = value.producer()
    if node is not None and node.op_type == "DequantizeLinear":
        src = node.inputs[0]
        q = src.producer()
        if q is not None and q.op_type == "QuantizeLinear":
            return q.inputs[0]
        if src.meta.get(SOURCE_META) is not None:
            return src.meta[SOURCE_META]
    return value


#: On a weight's code initializer: the float weight it was quantized from (so planning again
#: after insert-qdq sees the same constant).
SOURCE_META = "qgraph.source"


def _is_global_pool(node: ir.Node) -> bool:
    """ReduceMean over every spatial axis with keepdims: what exporters write for global pooling."""
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    axes = node.attributes.get_ints("axes", None)
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].const_value is not None:
        axes = node.inputs[1].const_value.numpy().reshape(-1).tolist()
    if rank is None or rank < 3 or not axes or not node.attributes.get_int("keepdims", 1):
        return False
    return sorted(int(a) % rank for a in axes) == list(range(2, rank))


def _bias_add_of(node: ir.Node) -> ir.Node | None:
    """The Add of a constant bias (N,) after ``node``, a MatMul with a constant (K, N) weight."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    weight = node.inputs[1]
    out = node.outputs[0]
    if weight is None or weight.const_value is None or len(weight.const_value.shape) != 2 or out.is_graph_output():
        return None
    uses = list(out.uses())
    if len(uses) != 1 or uses[0].node.op_type != "Add":
        return None
    add = uses[0].node
    bias = add.inputs[1 - uses[0].idx]
    if bias is None or bias.const_value is None:
        return None
    if tuple(bias.const_value.shape) != (weight.const_value.shape[1],):
        return None
    return add


def add_initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer named after ``base`` (made unique)."""
    name, i = base, 0
    while name in graph.initializers:  # one weight may be quantized on two axes
        i += 1
        name = f"{base}_{i}"
    # ir.Tensor, not ir.tensor: the convenience constructor's protocol checks cost ~40 us a call
    init = ir.Value(name=name, const_value=ir.Tensor(array, name=name))
    init.shape = ir.Shape(array.shape)
    init.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
    graph.register_initializer(init)
    return init


def drop_unused_initializers(graph: ir.Graph) -> None:
    """Remove initializers nothing reads any more (after a pass replaced them)."""
    for name in [n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_output()]:
        graph.initializers.pop(name)


def planned_edges(model: ir.Model) -> Iterator[tuple[ir.Node, int, ir.Value, object]]:
    """``(node, input index, tensor, QSpec)`` of every annotated input, in graph order."""
    from qgraph.quant import QUANT_META

    for node in model.graph:
        for index, spec in sorted((node.meta.get(QUANT_META) or {}).items()):
            yield node, index, node.inputs[index], spec


def is_dequantized(value: ir.Value) -> bool:
    """Whether ``value`` is the output of a DequantizeLinear (a quantizer already on the edge)."""
    node = value.producer()
    return node is not None and node.op_type == "DequantizeLinear"


#: graph.meta key: {(tensor name, QSpec): Observer} of the activations to calibrate.
OBSERVERS_META = "qgraph.observers"
