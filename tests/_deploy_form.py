"""Reading a TensorRT deploy-form model back in numpy: its stored weights decoded, and
onnx.reference implementations of TensorRT's quantizer ops (written from their spec in
REFERENCE.md), so tests can evaluate the deploy form itself without TensorRT."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir

from qgraph.backends._onnx import const_array, const_or_dequantized


def decoded_weights(proto: onnx.ModelProto) -> list[np.ndarray]:
    """Every dequantized constant weight of a deploy-form model, decoded in numpy."""
    graph = ir.serde.deserialize_model(proto).graph
    out = []
    for node in graph:
        if const_array(node.inputs[0]) is None:
            continue
        if any(use.node.op_type == "DequantizeLinear" and use.idx == 1 for use in node.outputs[0].uses()):
            continue  # an NVFP4 block-scale DequantizeLinear (the scale of the weight's), not a weight
        if node.op_type == "DequantizeLinear":
            out.append(const_or_dequantized(node.outputs[0]))
        elif node.op_type == "TRT_MXFP8DequantizeLinear":
            codes = const_array(node.inputs[0]).astype(np.float32)
            bits = const_array(node.inputs[1])
            scale = bits.view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
            axis = node.attributes["axis"].as_int() % codes.ndim
            block = node.attributes["block_size"].as_int()
            out.append(codes * np.repeat(scale, block, axis=axis).take(range(codes.shape[axis]), axis=axis))
    return out


def trt_ops():
    """onnx.reference implementations of TensorRT's quantizer ops (REFERENCE.md), on qgraph.formats."""
    from onnx.reference.op_run import OpRun

    from qgraph import formats

    def blocks_last(x, block):
        return formats.block_amax(x, -1, block)

    class TRT_FP4DynamicQuantize(OpRun):  # noqa: N801 - TensorRT's name
        op_domain = "trt"

        def _run(self, x, global_scale, axis=-1, block_size=16, scale_type=17):
            ratio = blocks_last(x, block_size) / (np.float32(6) * global_scale)
            s_b = np.clip(ratio, np.float32(2**-9), np.float32(448)).astype(ml_dtypes.float8_e4m3fn)
            eff = (s_b.astype(np.float32) * global_scale).astype(np.float32)
            return formats.quantize(x, eff, "fp4_e2m1", axis=-1, block_size=block_size), s_b

    class TRT_MXFP8DynamicQuantize(OpRun):  # noqa: N801
        op_domain = "trt"

        def _run(self, x, axis=-1, block_size=32, output_dtype=17):
            scale = formats.mx_scales(x, "fp8_e4m3", axis=-1, block_size=block_size)
            codes = formats.quantize(x, scale.astype(np.float32), "fp8_e4m3", axis=-1, block_size=block_size)
            return codes, scale.view(np.uint8)

    class TRT_MXFP8DequantizeLinear(OpRun):  # noqa: N801
        op_domain = "trt"

        def _run(self, x, scale, axis=-1, block_size=32, output_dtype=1):
            s = scale.view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
            return (formats.dequantize(x, s, axis=axis, block_size=block_size),)

    return [TRT_FP4DynamicQuantize, TRT_MXFP8DynamicQuantize, TRT_MXFP8DequantizeLinear]
