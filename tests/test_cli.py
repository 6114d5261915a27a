"""The `qgraph` CLI: the happy path, and one-line errors with exit status 2 for bad input."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from qgraph.cli import main
from qgraph.examples.zoo import make


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    model, x = make("mlp")
    path = tmp_path_factory.mktemp("model") / "mlp.pt2"
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(ep, str(path))
    return path


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32))
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_lower_writes_checked_onnx_and_summary(model_file, calib_file, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    before = _digest(model_file)
    assert main(["lower", str(model_file), "-o", str(out), "--calib", str(calib_file)]) == 0
    printed = capsys.readouterr().out
    for expected in ("quantized (", "left in float", "Relu", "parity", "tensorrt rules: OK (3/3", "calibration:"):
        assert expected in printed, printed
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert _digest(model_file) == before, "the input model must never be modified"
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]


def test_same_inputs_same_bytes(model_file, calib_file, tmp_path):
    outs = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for out in outs:
        args = ["lower", str(model_file), "-o", str(out), "--calib", str(calib_file), "-q"]
        assert main(args + ["--calibrator", "entropy"]) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_custom_pipeline_and_inspect(model_file, calib_file, tmp_path, capsys):
    out = tmp_path / "p.onnx"
    spec = "annotate,insert-observers(calibrator=percentile,percentile=99.9),calibrate,insert-qdq"
    assert main(["lower", str(model_file), "-o", str(out), "--calib", str(calib_file), "--pipeline", spec]) == 0
    assert f"pipeline: {spec}" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    assert "TensorRT rules: OK" in capsys.readouterr().out


def test_inspect_flags_violations(tmp_path, capsys):
    from onnx import TensorProto, helper

    w = onnx.numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    scale = onnx.numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zp = onnx.numpy_helper.from_array(np.array(3, np.uint8), "zp")  # uint8, non-zero: two violations
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"]),
            helper.make_node("MatMul", ["xd", "w"], ["y"]),  # weight not quantized: a third
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [w, scale, zp],
    )
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    assert main(["inspect", str(path)]) == 1
    printed = capsys.readouterr().out
    assert "zero-point is not 0" in printed
    assert "uint8 codes" in printed
    assert "only some inputs quantized" in printed


def _bad(tmp_path: Path, model: Path, calib: Path | None, capsys, *extra: str) -> str:
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir(exist_ok=True)
    args = ["lower", str(model), "-o", str(out), "-q"] + (["--calib", str(calib)] if calib else [])
    assert main(args + list(extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("qgraph: error: ") and err.count("\n") == 1, err
    assert list(out.parent.iterdir()) == [], "no output (or temp file) may be left behind"
    return err


def _npz(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "content, message",
    [(b"\x00\x01garbage" * 10, "neither a torch.export .pt2 archive nor a valid ONNX"), (b"hello", "neither")],
)
def test_corrupt_model_files(tmp_path, calib_file, capsys, content, message):
    for name in ("m.onnx", "m.bin"):
        path = tmp_path / name
        path.write_bytes(content)
        assert message in _bad(tmp_path, path, calib_file, capsys)


def test_corrupt_pt2(tmp_path, calib_file, capsys):
    import zipfile

    path = tmp_path / "m.pt2"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("junk.txt", "not a program")
    assert "cannot load torch.export program" in _bad(tmp_path, path, calib_file, capsys)


def test_missing_model(tmp_path, calib_file, capsys):
    assert "no such model file" in _bad(tmp_path, tmp_path / "nope.pt2", calib_file, capsys)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"y": np.ones((8, 64), np.float32)}, "no array for model input 'x'"),
        ({"x": np.ones((8, 32), np.float32)}, "has shape (8, 32), the model expects (N, 64)"),
        ({"x": np.ones((8, 4, 64), np.float32)}, "the model input has rank 2"),
        ({"x": np.full((8, 64), np.nan, np.float32)}, "contains NaN or Inf"),
        ({"x": np.full((8, 64), np.inf, np.float32)}, "contains NaN or Inf"),
        ({"x": np.ones((0, 64), np.float32)}, "is empty"),
        ({"x": np.zeros((8, 64), np.float32)}, "is all zeros in every sample (zero range"),
    ],
)
def test_bad_calibration_data(tmp_path, model_file, capsys, arrays, message):
    assert message in _bad(tmp_path, model_file, _npz(tmp_path, **arrays), capsys)


def test_zero_range_inside_the_graph(tmp_path, capsys):
    """A graph whose activations are all zero for every calibration sample (dead ReLU)."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(-1.0)
    path = tmp_path / "dead.pt2"
    x = torch.ones(4, 8)
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},)), str(path))
    err = _bad(tmp_path, path, _npz(tmp_path, input=np.ones((8, 8), np.float32)), capsys)
    assert "saw only zeros (zero range" in err


def test_calibration_file_problems(tmp_path, model_file, capsys):
    assert "no such calibration file" in _bad(tmp_path, model_file, tmp_path / "none.npz", capsys)
    notnpz = tmp_path / "x.npz"
    notnpz.write_text("text")
    assert "not a .npz file" in _bad(tmp_path, model_file, notnpz, capsys)
    empty_dir = tmp_path / "calibdir"
    empty_dir.mkdir()
    assert "holds no .npz files" in _bad(tmp_path, model_file, empty_dir, capsys)
    assert "--calib DATA is required" in _bad(tmp_path, model_file, None, capsys)


def test_calibration_folder(tmp_path, model_file, capsys):
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        np.savez(folder / f"part{i}.npz", x=rng.standard_normal((10, 64)).astype(np.float32))
    out = tmp_path / "o.onnx"
    assert main(["lower", str(model_file), "-o", str(out), "--calib", str(folder)]) == 0
    assert "calibration: 30 samples" in capsys.readouterr().out


def test_bad_options(tmp_path, model_file, calib_file, capsys):
    assert "unknown backend" in _bad(tmp_path, model_file, calib_file, capsys, "--backend", "tvm")
    assert "no precision 'int3'" in _bad(tmp_path, model_file, calib_file, capsys, "--precision", "int3")
    assert "unknown pass 'fold'" in _bad(tmp_path, model_file, calib_file, capsys, "--pipeline", "fold")
    assert "run `calibrate` first" in _bad(
        tmp_path, model_file, calib_file, capsys, "--pipeline", "annotate,insert-observers,insert-qdq"
    )


def test_unwritable_output(tmp_path, model_file, calib_file, capsys):
    for out in (tmp_path / "missing" / "o.onnx", tmp_path):
        args = ["lower", str(model_file), "-o", str(out), "--calib", str(calib_file), "-q"]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("qgraph: error: ") and err.count("\n") == 1
        assert "cannot write" in err or "is a directory" in err
    assert not (tmp_path / "missing").exists()


def test_output_onto_an_input_is_refused(tmp_path, model_file, calib_file, capsys):
    """-o naming the model or the calibration file would overwrite it: refused, both unchanged."""
    import shutil

    model, calib = tmp_path / model_file.name, tmp_path / calib_file.name
    shutil.copy(model_file, model)
    shutil.copy(calib_file, calib)
    before = {p: _digest(p) for p in (model, calib)}
    for out, what in ((model, "the input model"), (calib, "the calibration data")):
        assert main(["lower", str(model), "--calib", str(calib), "-o", str(out), "-q"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"is {what}" in err, err
    assert {p: _digest(p) for p in (model, calib)} == before


def test_dump_dir_that_cannot_be_created(tmp_path, model_file, calib_file, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = _bad(tmp_path, model_file, calib_file, capsys, "--dump-dir", str(blocker / "dumps"))
    assert "--dump-dir" in err and "cannot create it" in err


def test_inspect_refuses_an_empty_file(tmp_path, capsys):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert main(["inspect", str(empty)]) == 2
    assert "not a valid ONNX model" in capsys.readouterr().err


def test_console_script_exit_status(tmp_path, calib_file):
    """The installed entry point: exit 2 and one line on stderr, no traceback."""
    bad = tmp_path / "bad.onnx"
    bad.write_text("not onnx")
    proc = subprocess.run(
        [sys.executable, "-m", "qgraph.cli", "lower", str(bad), "-o", str(tmp_path / "o.onnx"), "--calib", str(calib_file)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("qgraph: error:")


@pytest.fixture(scope="module")
def onnx_model_file(tmp_path_factory) -> Path:
    import contextlib
    import io

    model, x = make("rescnn")
    path = tmp_path_factory.mktemp("onnx") / "rescnn.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(
            model, (x,), dynamo=True, external_data=False, dynamic_shapes=({0: torch.export.Dim.AUTO},)
        ).save(str(path))
    return path


def test_lower_float_onnx(onnx_model_file, tmp_path, capsys):
    calib = _npz(tmp_path, x=np.random.default_rng(0).standard_normal((32, 3, 16, 16)).astype(np.float32))
    out = tmp_path / "o.onnx"
    before = _digest(onnx_model_file)
    assert main(["lower", str(onnx_model_file), "-o", str(out), "--calib", str(calib)]) == 0
    assert "tensorrt rules: OK (7/7" in capsys.readouterr().out
    assert _digest(onnx_model_file) == before
    # lowering the lowered (already quantized) model is refused
    assert "already quantized" in _bad(tmp_path, out, calib, capsys)


def test_onnx_ops_without_a_rule_stay_float(tmp_path, capsys):
    """The ONNX door: an op qgraph has no rule for (Cos) stays in float and is listed."""
    from onnx import numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((4, 4)).astype(np.float32), "W")
    path = _tiny_onnx(tmp_path / "cos.onnx", [onnx.helper.make_node("MatMul", ["x", "W"], ["h"]),
                                              onnx.helper.make_node("Cos", ["h"], ["y"])], [w])
    out = tmp_path / "o.onnx"
    calib = _npz(tmp_path, x=np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32))
    assert main(["lower", str(path), "-o", str(out), "--calib", str(calib)]) == 0
    printed = capsys.readouterr().out
    assert "quantized (1 ops): MatMul×1" in printed and "Cos×1: no rule for it (tensorrt int8)" in printed
    assert [n.op_type for n in onnx.load(str(out)).graph.node][-1] == "Cos"


def test_matmul_with_transposed_and_left_constant_weights(tmp_path, capsys):
    """`x @ W.t()` (a tied head) and `W @ x` lower cleanly; left weights use output-channel axis -2."""

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(6, 4))
            self.left = torch.nn.Parameter(torch.randn(5, 6))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(x @ self.w.t())  # (N, 6)
            return (self.left @ y.t()).t()  # (N, 5)

    path = tmp_path / "tied.pt2"
    x = torch.randn(4, 4)
    torch.export.save(torch.export.export(Tied().eval(), (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},)), str(path))
    out = tmp_path / "o.onnx"
    calib = _npz(tmp_path, x=np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32))
    assert main(["lower", str(path), "-o", str(out), "--calib", str(calib)]) == 0
    printed = capsys.readouterr().out
    assert "tensorrt rules: OK (2/2" in printed and "quantizers bit-exact on identical input: yes" in printed


def test_zero_input_in_one_file_of_a_folder_is_fine(tmp_path, model_file, capsys):
    folder = tmp_path / "calib"
    folder.mkdir()
    np.savez(folder / "a.npz", x=np.zeros((4, 64), np.float32))
    np.savez(folder / "b.npz", x=np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32))
    out = tmp_path / "o.onnx"
    assert main(["lower", str(model_file), "-o", str(out), "--calib", str(folder), "-q"]) == 0


# --- recipes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp8", "nvfp4", "mxfp8"])
def test_lower_each_recipe(model_file, calib_file, tmp_path, capsys, precision):
    out = tmp_path / "out.onnx"
    assert main(["lower", str(model_file), "-o", str(out), "--calib", str(calib_file), "--precision", precision]) == 0
    printed = capsys.readouterr().out
    assert f"tensorrt {precision}, deploy form" in printed and "tensorrt rules: OK (3/3" in printed
    # GEMM-only, so torch and onnxruntime quantize to the same codes: the outputs differ only by
    # float32 summation order in the GEMMs (bit-identical on some hosts), below 1e-5 of max|y|
    parity = re.search(r"parity .*max\|err\| (\S+) \(([\d.]+)% of max\|y\|\)", printed)
    assert parity and float(parity[2]) < 1e-3, printed
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_reference_form_and_override(model_file, calib_file, tmp_path, capsys):
    out = tmp_path / "ref.onnx"
    args = ["lower", str(model_file), "-o", str(out), "--calib", str(calib_file), "--precision", "mxfp4"]
    assert main(args + ["--form", "reference", "--override", "@last=float"]) == 0
    printed = capsys.readouterr().out
    assert "kept in float by override '@last'" in printed
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "Round" in ops and not any(op.startswith("TRT_") for op in ops)


def test_recipe_bad_input(model_file, calib_file, tmp_path, capsys):
    conv_model = tmp_path / "cnn.pt2"
    model, x = make("rescnn")
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},)), str(conv_model))
    conv_calib = _npz(tmp_path, x=np.random.default_rng(1).standard_normal((8, *x.shape[1:])).astype(np.float32))
    err = _bad(tmp_path, conv_model, conv_calib, capsys, "--precision", "nvfp4")
    assert "conv2d (Conv): nvfp4 is not supported here" in err and "--fallback" in err
    err = _bad(tmp_path, model_file, calib_file, capsys, "--precision", "mxfp4")
    assert "no MXFP4 path" in err
    err = _bad(tmp_path, model_file, calib_file, capsys, "--precision", "w4a16")
    assert "reduction dim 64 of the weight is not a multiple of the block size 128" in err
    assert "PATTERN=PRECISION" in _bad(tmp_path, model_file, calib_file, capsys, "--override", "fc")
    assert "unknown precision 'int3'" in _bad(tmp_path, model_file, calib_file, capsys, "--override", "fc=int3")
    assert "no precision 'fp16'" in _bad(tmp_path, model_file, calib_file, capsys, "--precision", "fp16")


def test_override_matching_nothing_and_mxfp4_deploy_are_refused_up_front(model_file, calib_file, tmp_path, capsys):
    err = _bad(tmp_path, model_file, calib_file, capsys, "--override", "nosuch*=float")
    assert "override pattern(s) 'nosuch*' match no op (names look like 'linear' or 'net.0')" in err
    err = _bad(tmp_path, model_file, calib_file, capsys, "--precision", "mxfp4")
    assert "no MXFP4 path" in err and "--form reference" in err


def test_lower_for_onnxruntime_and_fusion_report(model_file, calib_file, tmp_path, capsys):
    out = tmp_path / "ort.onnx"
    args = ["lower", str(model_file), "-o", str(out), "--calib", str(calib_file), "--backend", "onnxruntime"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "(onnxruntime int8, deploy form)" in printed
    assert "onnxruntime: 3/3 weighted ops run as int8 kernels" in printed, printed
    assert "quantizers bit-exact on identical input: yes" in printed
    assert main(["inspect", str(out), "--backend", "onnxruntime"]) == 0
    assert "QGemm×3" in capsys.readouterr().out
    trt = tmp_path / "trt.onnx"
    assert main(["lower", str(model_file), "-o", str(trt), "--calib", str(calib_file), "-q"]) == 0
    assert main(["inspect", str(trt), "--backend", "onnxruntime"]) == 0
    assert "float — int8 activations" in capsys.readouterr().out  # TensorRT form: s8 activations


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--precision", "fp8"], "backend onnxruntime has no precision 'fp8'"),
        (["--form", "reference"], "unknown form 'reference'"),
    ],
)
def test_onnxruntime_backend_bad_options(model_file, calib_file, tmp_path, capsys, extra, message):
    out = tmp_path / "x.onnx"
    args = ["lower", str(model_file), "-o", str(out), "--calib", str(calib_file), "--backend", "onnxruntime"]
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_lower_float_onnx_for_onnxruntime(onnx_model_file, tmp_path, capsys):
    calib = _npz(tmp_path, x=np.random.default_rng(1).standard_normal((32, 3, 16, 16)).astype(np.float32))
    out = tmp_path / "o.onnx"
    assert main(["lower", str(onnx_model_file), "-o", str(out), "--calib", str(calib), "--backend", "onnxruntime"]) == 0
    assert "onnxruntime: 7/7 weighted ops run as int8 kernels" in capsys.readouterr().out


class _Tokens(torch.nn.Module):
    """Token ids in (int64), an embedding, a linear: the shape of a text model's input."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids))


@pytest.mark.parametrize("backend", ["tensorrt", "onnxruntime"])
def test_lower_a_model_with_token_id_inputs(tmp_path, capsys, backend):
    ids = torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "tokens.pt2"
    ep = torch.export.export(_Tokens().eval(), (ids,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(ep, str(path))
    calib = _npz(tmp_path, ids=np.random.default_rng(0).integers(0, 50, (32, 6)).astype(np.int64))
    out = tmp_path / "o.onnx"
    assert main(["lower", str(path), "-o", str(out), "--calib", str(calib), "--backend", backend]) == 0
    assert "1/1 weighted ops" in capsys.readouterr().out
    floats = _npz(tmp_path, ids=np.zeros((8, 6), np.float32) + 1.0)
    assert "holds floats, the model input is torch.int64" in _bad(tmp_path, path, floats, capsys)


def test_integer_calibration_values_outside_the_input_type_are_refused(tmp_path):
    from qgraph._errors import InputError
    from qgraph.data import CalibrationData

    path = _npz(tmp_path, x=np.array([[1, 300, 2, 3]], np.int64))
    with pytest.raises(InputError, match=r"outside torch.uint8's range \[0, 255\]"):
        CalibrationData(path, [("x", (None, 4), torch.uint8)])


def _tiny_onnx(path: Path, nodes, inits=(), width: int = 4, out: int = 4, opsets=(("", 17),)) -> Path:  # noqa: ANN001
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out])], list(inits),
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets]), str(path))
    return path


@pytest.mark.parametrize("backend", ["tensorrt", "onnxruntime"])
def test_bad_onnx_models_get_one_line_and_no_output(tmp_path, capsys, backend):
    from onnx import helper, numpy_helper

    calib = _npz(tmp_path, x=np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32))
    w4 = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    custom = _tiny_onnx(tmp_path / "custom.onnx", [helper.make_node("MatMul", ["x", "W"], ["h"]),
                                                   helper.make_node("FooBar", ["h"], ["y"], domain="my.ops")],
                        [w4], opsets=(("", 17), ("my.ops", 1)))
    err = _bad(tmp_path, custom, calib, capsys, "--backend", backend)
    assert "onnxruntime cannot run the model" in err and "FooBar" in err
    no_weights = _tiny_onnx(tmp_path / "relu.onnx", [helper.make_node("Relu", ["x"], ["y"])])
    assert "model has no float weights" in _bad(tmp_path, no_weights, calib, capsys, "--backend", backend)
    w = numpy_helper.from_array(np.ones((8, 2), np.float32), "W")
    wider = _tiny_onnx(tmp_path / "mm.onnx", [helper.make_node("MatMul", ["x", "W"], ["y"])], [w], width=8, out=2)
    assert "the model expects (N, 8)" in _bad(tmp_path, wider, calib, capsys, "--backend", backend)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], "required: command"),
        (["lower"], "required: model, -o/--output"),
        (["lower", "m.pt2", "-o", "o.onnx", "--calibrator", "minmax"], "invalid choice: 'minmax'"),
        (["lower", "m.pt2", "-o", "o.onnx", "--batch-size", "many"], "invalid int value: 'many'"),
        (["lower", "m.pt2", "-o", "o.onnx", "--nope"], "unrecognized arguments: --nope"),
    ],
)
def test_usage_mistakes_are_one_line(argv, expected, capsys):
    """argparse's own errors: one line naming the problem and status 2, without the usage block."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("qgraph: error: ") and err.count("\n") == 1 and expected in err and "--help" in err, err


@pytest.mark.parametrize("suffix", ["/", "/."])
def test_output_naming_a_folder_is_refused(model_file, calib_file, tmp_path, capsys, suffix):
    """``-o new/`` names a folder: without the check, Path() drops the slash and a file ``new`` appears."""
    out = f"{tmp_path / 'new'}{suffix}"
    assert main(["lower", str(model_file), "-o", out, "--calib", str(calib_file), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qgraph: error: ") and err.count("\n") == 1 and "names a folder" in err, err
    assert list(tmp_path.iterdir()) == []


def test_lower_with_auto_precision_in_the_pipeline(model_file, calib_file, tmp_path, capsys):
    """`auto-precision(effective_bits=…,upgrade=…)` takes the lowering's recipe as its base and the
    backend's recipes by name; its upgrades are deployed (FP8 weight codes beside NVFP4 ones)."""
    out = tmp_path / "mixed.onnx"
    spec = "auto-precision(effective_bits=6,upgrade=fp8,metric=kl),insert-observers,calibrate,insert-qdq"
    args = ["lower", str(model_file), "-o", str(out), "--calib", str(calib_file), "--precision", "nvfp4"]
    assert main(args + ["--pipeline", spec]) == 0
    printed = capsys.readouterr().out
    upgraded = int(re.search(r"auto-precision: (\d+) layer\(s\) upgraded", printed).group(1))
    codes = [i.data_type for i in onnx.load(str(out)).graph.initializer if ".weight_quantized" in i.name]
    assert 1 <= upgraded < 3 and codes.count(onnx.TensorProto.FLOAT8E4M3FN) == upgraded, printed
    assert codes.count(onnx.TensorProto.FLOAT4E2M1) == 3 - upgraded
    bad = "auto-precision(effective_bits=6,upgrade=fp9),insert-observers,calibrate,insert-qdq"
    err = _bad(tmp_path, model_file, calib_file, capsys, "--precision", "nvfp4", "--pipeline", bad)
    assert "unknown recipe 'fp9' in upgrade (known: int8, fp8" in err
    err = _bad(tmp_path, model_file, calib_file, capsys, "--precision", "nvfp4", "--override", "@last=fp8",
               "--pipeline", spec)
    assert "drop the per-layer overrides (--override)" in err
