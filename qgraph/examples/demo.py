"""``qgraph demo``: lower the bundled digits CNN to TensorRT INT8 and compare accuracy in ORT.

The model (``assets/digits_cnn.pt2``) is a small residual CNN trained on scikit-learn's digits by
``benchmarks/train_digits.py``; ``assets/digits_calib.npz`` holds 512 training images for
calibration and ``assets/digits_test.npz`` the held-out split. Both the FP32 model and the INT8
model are run in onnxruntime on the held-out split.
"""

from __future__ import annotations

import numpy as np

from qgraph.backends import _onnx
from qgraph.backends.tensorrt import OPSET, WEIGHTED_KINDS
from qgraph.capture import load_pt2
from qgraph.driver import lower_file, write_atomic
from qgraph.examples.digits import CALIB_PATH, MODEL_PATH, TEST_PATH
from qgraph.graph import op_kind
from qgraph.parity import session
from qgraph.quant import QUANT_META

__all__ = ["run_demo", "onnx_accuracy"]


def onnx_accuracy(model: bytes, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy (percent) of an ONNX classifier run in onnxruntime."""
    sess = session(model)
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return 100.0 * float(np.mean(logits.argmax(1) == y))


def float_onnx() -> bytes:
    """The bundled FP32 model exported to ONNX the same way as the quantized one."""
    import torch

    gm = load_pt2(MODEL_PATH)
    return _onnx.serialize(_onnx.export_onnx(gm, (torch.zeros(2, 1, 8, 8),), opset=OPSET))


def run_demo(output: str, calibrator: str = "max", precision: str = "int8", form: str = "deploy") -> int:
    """Lower, write ``output``, print FP32 vs quantized accuracy; returns the exit status.

    Recipes TensorRT runs on GEMMs only (nvfp4, mxfp8, w4a16) fall back for the CNN's convolutions
    (FP8, or float for w4a16); accuracy is measured in onnxruntime on the model itself, or on its
    reference form where onnxruntime cannot run it (FP4, TensorRT's dynamic quantizers).
    """
    with np.load(TEST_PATH) as test:
        x, y = test["x"], test["y"]
    result = lower_file(
        MODEL_PATH,
        CALIB_PATH,
        calibrator=calibrator,
        precision=precision,
        fallback=True,
        form=form,
        progress=True,
    )
    write_atomic(output, result.onnx)
    fp32 = onnx_accuracy(float_onnx(), x, y)
    quant = onnx_accuracy(result.runnable, x, y)
    plan = result.plan
    n = sum(1 for node in result.graph.graph.nodes if op_kind(node) in WEIGHTED_KINDS)
    q = sum(1 for node in result.graph.graph.nodes if op_kind(node) in WEIGHTED_KINDS and node.meta.get(QUANT_META))
    for line in plan:
        print(line)
    label = precision.upper()
    where = "" if result.parity_form == "deploy" else ", measured on its reference form"
    print(f"digits CNN, held-out split ({len(y)} images), onnxruntime CPU:")
    print(f"  FP32 accuracy: {fp32:.2f}%")
    print(
        f"  {label} accuracy: {quant:.2f}%  (tensorrt {precision}, calibrator {calibrator}, "
        f"{q}/{n} weighted ops quantized{where})"
    )
    print(f"  {result.parity.summary()}")
    print(f"  {result.codes_summary()}")
    print(f"wrote {output}")
    return 0
