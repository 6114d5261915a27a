"""The float-ONNX reader: exports from torch (dynamo and the legacy exporter, opset 11-20) read
back into a torch graph compute what the original model computes, keep the ONNX I/O names, and
refuse what they cannot read with a message naming the op."""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from qgraph import InputError
from qgraph.capture import input_specs
from qgraph.examples.zoo import make
from qgraph.onnx_import import load_onnx


class _SoftmaxHead(nn.Module):
    """Linear on a 3-D input, softmax over axis 1, and a Gemm-style linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(5 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.softmax(self.a(x), dim=1)  # (N, 4, 5), over axis 1
        return self.b(y.flatten(1))


def _legacy(model, x, path, opset):
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x,), str(path), dynamo=False, opset_version=opset,
            input_names=["input.1"], output_names=["out.0"], dynamic_axes={"input.1": {0: "N"}, "out.0": {0: "N"}},
        )


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_legacy_exports_round_trip(tmp_path, opset):
    torch.manual_seed(0)
    model, x = _SoftmaxHead().eval(), torch.randn(2, 4, 6)
    path = tmp_path / "m.onnx"
    _legacy(model, x, path, opset)
    gm = load_onnx(path)
    assert [name for name, _, _ in input_specs(gm)] == ["input.1"]
    for batch in (1, 5):
        xb = torch.randn(batch, 4, 6)
        with torch.no_grad():
            np.testing.assert_allclose(gm(xb).numpy(), model(xb).numpy(), atol=1e-6)


def test_gemm_weight_stays_a_constant(tmp_path):
    model, x = make("mlp")
    path = tmp_path / "m.onnx"
    _legacy(model, x, path, 13)
    gm = load_onnx(path)
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    assert len(linears) == 3 and all(n.args[1].op == "get_attr" for n in linears)


def test_refuses_a_reshape_that_bakes_the_batch(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    shape = numpy_helper.from_array(np.array([2, -1, 4], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, "M", 4])],
        [shape],
    )
    path = tmp_path / "r.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(InputError, match="fixes the batch at 2"):
        load_onnx(path)


def test_input_named_like_an_internal_value(tmp_path):
    """An input called `conv2d` must not clash with the reader's own node names."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3)).eval()
    path = tmp_path / "c.onnx"
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 1, 5, 5),), str(path), dynamo=False, opset_version=13,
                          input_names=["conv2d"], dynamic_axes={"conv2d": {0: "N"}})
    gm = load_onnx(path)
    assert input_specs(gm)[0][0] == "conv2d"
    x = torch.randn(3, 1, 5, 5)
    with torch.no_grad():
        np.testing.assert_allclose(gm(x).numpy(), model(x).numpy(), atol=1e-6)
