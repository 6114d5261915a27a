"""Digits CNN: FP32 vs INT8 PTQ accuracy per calibrator, both run in onnxruntime (held-out split).

Run: .venv/bin/python benchmarks/bench_digits.py
"""

from __future__ import annotations

import numpy as np

from qgraph.driver import lower_file
from qgraph.examples.demo import float_onnx, onnx_accuracy
from qgraph.examples.digits import CALIB_PATH, MODEL_PATH, TEST_PATH


def main() -> None:
    with np.load(TEST_PATH) as test:
        x, y = test["x"], test["y"]
    fp32 = onnx_accuracy(float_onnx(), x, y)
    print(f"held-out split: {len(y)} images; FP32 (ORT) accuracy {fp32:.2f}%\n")
    print("| calibrator | INT8 accuracy (ORT) | Δ vs FP32 (points) | parity max rel. err | pipeline s | lower s |")
    print("|---|---|---|---|---|---|")
    for calibrator in ("max", "percentile", "mse", "entropy"):
        result = lower_file(MODEL_PATH, CALIB_PATH, calibrator=calibrator)
        pipeline = sum(result.pass_seconds.values())
        acc = onnx_accuracy(result.onnx, x, y)
        print(
            f"| {calibrator} | {acc:.2f}% | {acc - fp32:+.2f} | {100 * result.parity.max_relative:.2f}% "
            f"| {pipeline:.2f} | {result.lower_seconds:.2f} |"
        )


if __name__ == "__main__":
    main()
