"""Digits CNN: INT8 PTQ accuracy (ORT, held-out split) within 0.3 points of FP32, per calibrator."""

from __future__ import annotations

import numpy as np
import pytest

from qgraph.driver import lower_file
from qgraph.examples.demo import float_onnx, onnx_accuracy
from qgraph.examples.digits import CALIB_PATH, MODEL_PATH, TEST_PATH


@pytest.fixture(scope="module")
def test_split():
    with np.load(TEST_PATH) as test:
        return test["x"], test["y"]


@pytest.fixture(scope="module")
def fp32_accuracy(test_split):
    return onnx_accuracy(float_onnx(), *test_split)


@pytest.mark.parametrize("calibrator", ["max", "percentile", "mse", "entropy"])
def test_int8_within_0_3_points_of_fp32(calibrator, test_split, fp32_accuracy):
    result = lower_file(MODEL_PATH, CALIB_PATH, calibrator=calibrator)
    assert result.inspect.violations == []
    int8 = onnx_accuracy(result.onnx, *test_split)
    assert fp32_accuracy >= 97.0
    assert int8 >= fp32_accuracy - 0.3, f"{calibrator}: INT8 {int8:.2f}% vs FP32 {fp32_accuracy:.2f}%"
