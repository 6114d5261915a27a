"""The bundled digits example: the data split and the shipped model/assets (no retraining)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qgraph.examples.digits import (
    CALIB_PATH,
    CALIB_SAMPLES,
    MODEL_PATH,
    TEST_PATH,
    accuracy,
    load_split,
)

#: the float model's held-out accuracy must stay at or above this (percent)
MIN_ACCURACY = 97.0


def _images(x: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in x.reshape(len(x), -1)}


def test_load_split_shapes_and_stratification():
    pytest.importorskip("sklearn")
    data = load_split(0)
    n_train, n_test = len(data["y_train"]), len(data["y_test"])
    assert n_train + n_test == 1797 and n_test == 450  # ceil(0.25 * 1797)
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = data[f"x_{split}"], data[f"y_{split}"]
        assert x.shape == (n, 1, 8, 8) and x.dtype == np.float32
        assert y.shape == (n,) and y.dtype == np.int64
        assert x.min() >= 0.0 and x.max() <= 1.0
    # Stratified: every class's share of the test split is within one sample of 25%.
    total = np.bincount(data["y_train"], minlength=10) + np.bincount(data["y_test"], minlength=10)
    assert np.all(np.abs(np.bincount(data["y_test"], minlength=10) - 0.25 * total) <= 1)
    # Disjoint: the split partitions the 1797 images (load_digits has no duplicate images).
    assert not _images(data["x_train"]) & _images(data["x_test"])
    assert load_split(0)["y_test"].tolist() == data["y_test"].tolist()  # seeded


def test_bundled_assets_load_and_reach_accuracy():
    with np.load(TEST_PATH) as test:
        x, y = test["x"], test["y"]
    with np.load(CALIB_PATH) as calib:
        assert list(calib.keys()) == ["x"]  # keyed by the model's input name
        assert calib["x"].shape == (CALIB_SAMPLES, 1, 8, 8) and calib["x"].dtype == np.float32
    assert x.shape == (len(y), 1, 8, 8) and x.dtype == np.float32 and y.dtype == np.int64

    program = torch.export.load(str(MODEL_PATH))
    specs = program.graph_signature.input_specs
    assert [s.arg.name for s in specs if s.kind.name == "USER_INPUT"] == ["x"]
    model = program.module()
    assert accuracy(model, x, y) >= MIN_ACCURACY
    # The batch dimension is dynamic: batches other than the export example's (2) run.
    for batch in (1, 5):
        assert model(torch.from_numpy(x[:batch])).shape == (batch, 10)
