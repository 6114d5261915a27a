"""Parity: does the exported ONNX (run in onnxruntime) compute what the torch fake-quant graph does?

Both run on the same inputs; the report gives, per output, the max absolute error and that error
relative to the output's largest magnitude. Differences come only from float rounding (the two
runtimes sum convolutions in different orders); when such a difference lands on a rounding tie of
a later quantizer, that element moves by one quantization step.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import torch
import torch.fx

__all__ = ["ParityReport", "check_parity"]


@dataclasses.dataclass(frozen=True)
class ParityReport:
    """Per-output errors of ONNX vs torch: ``(name, max_abs_error, max_abs_reference)``."""

    outputs: tuple[tuple[str, float, float], ...]
    samples: int
    reference: str = "torch fake-quant"

    @property
    def max_error(self) -> float:
        return max(err for _, err, _ in self.outputs)

    @property
    def max_relative(self) -> float:
        return max(err / ref if ref else err for _, err, ref in self.outputs)

    def summary(self) -> str:
        parts = [
            f"{name} max|err| {err:.3g} ({100 * err / ref if ref else 0:.3f}% of max|y|)"
            for name, err, ref in self.outputs
        ]
        return f"parity (onnxruntime vs {self.reference}, {self.samples} samples): " + "; ".join(parts)


#: ONNX element types below 8-bit integers: FP8, INT4/UINT4, FP4.
_LOW_PRECISION = {17, 18, 19, 20, 21, 22, 23}


def _uses_low_precision(model: bytes | str) -> bool:
    import onnx

    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model, load_external_data=False)
    types = {t.data_type for t in proto.graph.initializer}
    for node in proto.graph.node:
        types.update(a.t.data_type for a in node.attribute if a.name == "value")
        types.update(a.i for a in node.attribute if a.name in ("to", "output_dtype"))
    return bool(types & _LOW_PRECISION)


def session(model: bytes | str) -> ort.InferenceSession:
    """A single-threaded CPU onnxruntime session (deterministic, comparable timings) of ONNX
    bytes or a file (which may keep its weights in external data).

    Models with FP8/INT4/FP4 values run without graph optimisations: onnxruntime 1.32's CPU
    optimiser rewrites FP8 Q/DQ around Gemm into something that computes different numbers
    (measured on the zoo MLP: max error 0.57 on outputs of magnitude 0.24; 0 unoptimised), and
    fuses blocked INT4 DequantizeLinear+MatMul into MatMulNBits with int8 activations.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    if _uses_low_precision(model):
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def check_parity(
    gm: torch.fx.GraphModule, model: bytes, inputs: tuple[torch.Tensor, ...]
) -> ParityReport:
    """Run ``gm`` and the ONNX ``model`` on ``inputs`` and compare every output."""
    sess = session(model)
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
    got = sess.run(None, feeds)
    with torch.no_grad():
        want = gm(*inputs)
    if isinstance(want, torch.Tensor):
        want = (want,)
    want = [w.detach().numpy() for w in torch.utils._pytree.tree_leaves(want)]
    outputs = []
    for meta, g, w in zip(sess.get_outputs(), got, want):
        err = float(np.max(np.abs(g.astype(np.float64) - w))) if w.size else 0.0
        outputs.append((meta.name, err, float(np.max(np.abs(w))) if w.size else 0.0))
    return ParityReport(tuple(outputs), int(inputs[0].shape[0]))


def compare_models(reference: bytes | str, model: bytes, inputs: tuple[torch.Tensor, ...]) -> ParityReport:
    """Run two ONNX models (bytes or a file path) with the same inputs in onnxruntime and compare
    every output (the ONNX door: the quantized model against the float file it came from)."""
    sessions = [session(reference), session(model)]
    feeds = {i.name: t.numpy() for i, t in zip(sessions[0].get_inputs(), inputs)}
    want, got = (s.run(None, feeds) for s in sessions)
    outputs = []
    for meta, g, w in zip(sessions[1].get_outputs(), got, want):
        err = float(np.max(np.abs(g.astype(np.float64) - w))) if w.size else 0.0
        outputs.append((meta.name, err, float(np.max(np.abs(w))) if w.size else 0.0))
    return ParityReport(tuple(outputs), int(inputs[0].shape[0]), "the float model")


@dataclasses.dataclass(frozen=True)
class CodeAgreement:
    """Integer codes at every activation quantizer, ONNX (ORT) vs torch.

    Attributes:
        total: codes compared.
        differing: codes that differ end to end (float differences upstream can move a value
            across a rounding boundary; the flip then propagates).
        max_diff: largest end-to-end difference in code units.
        quantizer_mismatches: codes that differ when the torch quantizer is applied to the very
            tensor ORT quantized — 0 means the quantizers themselves are bit-exact.
    """

    total: int
    differing: int
    max_diff: int
    quantizer_mismatches: int = 0

    @property
    def fraction_equal(self) -> float:
        return 1.0 - self.differing / self.total if self.total else 1.0

    def summary(self) -> str:
        return (
            f"activation codes: {100 * self.fraction_equal:.3f}% of {self.total} identical "
            f"(max difference {self.max_diff}); quantizers bit-exact on identical input: "
            f"{'yes' if self.quantizer_mismatches == 0 else f'NO ({self.quantizer_mismatches} codes differ)'}"
        )


def check_codes(
    gm: torch.fx.GraphModule, model: bytes, inputs: tuple[torch.Tensor, ...]
) -> CodeAgreement:
    """Compare the codes every ``QuantizeLinear`` produces in ORT with the torch quantizer's codes.

    Activation quantizers are matched in graph order: the exporter translates the fx graph node
    by node, so the i-th activation ``QuantizeLinear`` is the i-th activation ``FakeQuant`` (names
    cannot be used: the exporter merges equal scale initializers). A shape mismatch raises.
    """
    import onnx

    from qgraph._errors import QGraphError
    from qgraph.quant import FakeQuant

    if not all(m.spec.is_int8 for m in gm.modules() if isinstance(m, FakeQuant)):
        raise QGraphError("codes are compared for INT8 quantizers only")
    proto = onnx.load_from_string(model)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    producers = {o: node for node in proto.graph.node for o in node.output}

    def sole_reader(name: str) -> onnx.NodeProto | None:
        users = readers.get(name, [])
        return users[0] if len(users) == 1 else None

    def code_clip(node: onnx.NodeProto | None, zp: np.ndarray | int) -> tuple | None:
        """The code bounds of a Clip on codes (the onnxruntime lowering's moved ReLU), or None."""
        if node is None or node.op_type != "Clip" or not all(i in inits for i in node.input[1:3]):
            return None
        return tuple(int(inits[i]) - zp for i in node.input[1:3])

    def concat_group(q: onnx.NodeProto, zp) -> tuple | None:  # noqa: ANN001
        """(concat, [(Q input, code bounds or None)]) when ``q`` is one of the quantizers the
        onnxruntime lowering split over a Concat's inputs (each maybe followed by a Clip)."""
        reader = sole_reader(q.output[0])
        if code_clip(reader, zp) is not None:
            reader = sole_reader(reader.output[0])
        if reader is None or reader.op_type != "Concat":
            return None
        parts, members = [], []
        for name in reader.input:
            node, bounds = producers.get(name), None
            if node is not None and code_clip(node, zp) is not None:
                node, bounds = producers.get(node.input[0]), code_clip(node, zp)
            if node is None or node.op_type != "QuantizeLinear" or node.input[1:] != q.input[1:]:
                return None
            members.append(node.output[0])
            parts.append((node.input[0], bounds))
        grouped.update(members)
        return reader, parts

    q_names, q_parts, zero_points, code_ranges = [], [], [], []
    grouped: set[str] = set()
    outputs = {o.name for o in proto.graph.output}
    for node in proto.graph.node:
        if node.op_type != "QuantizeLinear" or node.output[0] in grouped:
            continue
        zp = inits[node.input[2]].astype(np.int32) if len(node.input) > 2 and node.input[2] in inits else 0
        group = concat_group(node, zp)
        if group is not None:
            cat, parts = group
            axis = next((a.i for a in cat.attribute if a.name == "axis"), 0)
            codes, split = cat.output[0], (parts, axis)
        else:
            codes, split = node.output[0], ([(node.input[0], None)], None)
        bounds = code_clip(sole_reader(codes), zp)
        if bounds is not None:
            codes = sole_reader(codes).output[0]
        q_names.append(codes)
        q_parts.append(split)
        zero_points.append(zp)
        code_ranges.append(bounds or (None, None))
        for name in [codes, *(n for n, _ in split[0])]:
            if name not in outputs:
                proto.graph.output.append(onnx.ValueInfoProto(name=name))
                outputs.add(name)
    sess = session(proto.SerializeToString())
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
    wanted = list(dict.fromkeys(q_names + [n for parts, _ in q_parts for n, _ in parts]))
    fetched = dict(zip(wanted, sess.run(wanted, feeds))) if q_names else {}
    all_values = {**feeds, **fetched}
    # codes relative to their zero point: uint8 codes (zero point 128) compare with int8 ones
    onnx_codes = [fetched[n].astype(np.int32) - zp for n, zp in zip(q_names, zero_points)]
    onnx_q_inputs = [[(all_values[n], b) for n, b in parts] for parts, _ in q_parts]
    concat_axes = [axis for _, axis in q_parts]

    # quantizers whose input is computed from constants alone (e.g. a transposed weight) are
    # folded into initializers at export: they have no QuantizeLinear left to compare with
    from_inputs: set[torch.fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a in from_inputs for a in n.all_input_nodes):
            from_inputs.add(n)
    order = [
        n.target
        for n in gm.graph.nodes
        if n.op == "call_module"
        and n in from_inputs
        and isinstance(gm.get_submodule(n.target), FakeQuant)
        and gm.get_submodule(n.target).spec.role == "activation"
    ]
    if len(order) != len(onnx_codes):
        from qgraph._errors import QGraphError

        raise QGraphError(
            f"cannot pair quantizers: {len(order)} activation quantizers in torch, "
            f"{len(onnx_codes)} QuantizeLinear in ONNX"
        )
    torch_codes: dict[str, np.ndarray] = {}

    def hook(mod, args, out, name):  # noqa: ANN001, ANN202
        x = args[0].detach()
        codes = torch.clamp(torch.round(x / mod.scale_value()) + mod.zero_point.float(), mod.spec.qmin, mod.spec.qmax)
        torch_codes[name] = codes.numpy().astype(np.int32) - mod.zero_point.numpy().astype(np.int32)

    hooks = [
        gm.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name))
        for name in order
    ]
    try:
        with torch.no_grad():
            gm(*inputs)
    finally:
        for h in hooks:
            h.remove()
    pairs = [(torch_codes[name], got) for name, got in zip(order, onnx_codes)]
    quantizer_mismatches = 0
    with torch.no_grad():
        for name, parts, axis, got, (lo, hi) in zip(order, onnx_q_inputs, concat_axes, onnx_codes, code_ranges):
            module = gm.get_submodule(name)
            scale = module.scale_value().detach().numpy()
            pieces = []
            for q_in, bounds in parts:
                piece = module(torch.from_numpy(np.asarray(q_in))).numpy()
                if bounds is not None:  # a ReLU the lowering moved after this part's quantizer
                    piece = np.clip(piece, np.float32(bounds[0]) * scale, np.float32(bounds[1]) * scale)
                pieces.append(piece)
            deq = pieces[0] if axis is None else np.concatenate(pieces, axis)
            if lo is not None:  # the ReLU/Clip the lowering moved after the quantizer, on codes
                deq = np.clip(deq, np.float32(lo) * scale, np.float32(hi) * scale)
            expected = got.astype(np.float32) * scale
            quantizer_mismatches += int(np.count_nonzero(deq != expected))
    total = differing = max_diff = 0
    for codes, got in pairs:
        if got.ndim == 2 and codes.ndim > 2 and got.shape == (codes.size // codes.shape[-1], codes.shape[-1]):
            got = got.reshape(codes.shape)  # the onnxruntime lowering quantizes (rows, K) views
        if codes.shape != got.shape:
            raise ValueError(f"quantizer shapes differ: torch {codes.shape}, ONNX {got.shape}")
        diff = np.abs(codes - got.astype(np.int32))
        total += diff.size
        differing += int(np.count_nonzero(diff))
        max_diff = max(max_diff, int(diff.max()) if diff.size else 0)
    return CodeAgreement(total, differing, max_diff, quantizer_mismatches)
