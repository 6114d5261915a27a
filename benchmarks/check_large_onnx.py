"""The ONNX door on a model over 2 GB (weights in an external-data file): does it lower, how long,
how much memory, and how close to the float model.

Builds a float MLP whose weights take ``--gb`` GB (three MatMuls + bias + ReLU, random weights,
saved with ``onnx``'s external data), writes 64 calibration samples, then runs
``qgraph lower big.onnx --calib calib.npz -o big_int8.onnx`` (TensorRT INT8) in a subprocess and
reports its wall time, its peak RSS, the output size, and the cosine of the quantized model's
outputs against the float model's on held-out inputs (both run by onnxruntime). Too big for the
test suite; run by hand: ``.venv/bin/python benchmarks/check_large_onnx.py [--gb 2.2] [--keep DIR]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def build(folder: Path, gb: float) -> Path:
    """An MLP x (N, D) → 3 × (MatMul (D, D) + Add + Relu) → y, weights ``gb`` GB in total."""
    d = int((gb * 2**30 / 4 / 3) ** 0.5) // 64 * 64
    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "x"
    for i in range(3):
        w = (rng.standard_normal((d, d), dtype=np.float32) / np.sqrt(d)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(d, np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]), helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"])]
        x = f"r{i}"
        del w
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", d])], inits)
    path = folder / "big.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path),
                    save_as_external_data=True, all_tensors_to_one_file=True, location="big.onnx.data")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.2)
    parser.add_argument("--keep", type=Path, help="work in this folder and keep the files")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="qgraph-large-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        src = build(folder, args.gb)
        data_bytes = (folder / "big.onnx.data").stat().st_size
        d = onnx.load(str(src), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[1].dim_value
        print(f"built {src.name}: weights {data_bytes / 2**30:.2f} GiB (D = {d}) in {time.perf_counter() - start:.0f} s", flush=True)
        rng = np.random.default_rng(1)
        np.savez(folder / "calib.npz", x=rng.standard_normal((64, d), dtype=np.float32))
        out = folder / "big_int8.onnx"
        cmd = [sys.executable, "-m", "qgraph.cli", "lower", str(src), "--calib", str(folder / "calib.npz"), "-o", str(out)]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        print(done.stdout + done.stderr.splitlines()[-1] if done.returncode else done.stdout)
        if done.returncode:
            return done.returncode
        x = rng.standard_normal((16, d), dtype=np.float32)
        want = ort.InferenceSession(str(src)).run(None, {"x": x})[0]
        got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
        cos = float((want * got).sum() / (np.linalg.norm(want) * np.linalg.norm(got)))
        result = {"weights_gib": data_bytes / 2**30, "lower_wall_s": wall, "lower_peak_rss_gib": peak,
                  "output_mib": out.stat().st_size / 2**20, "output_cosine_vs_fp32": cos}
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
