"""The ONNX door beside onnxruntime's quantize_static: calibration time, memory and accuracy.

Each model is exported to float ONNX by ``torch.onnx.export`` (as a user would) and quantized
from that file by:

* ``qgraph trt <calibrator>`` — the ONNX door with the TensorRT backend's default pipeline
  (``fold-batchnorm, smooth-quant(alpha=0.8, gelu=true), annotate, insert-observers, calibrate,
  insert-qdq``) for each calibrator: max, percentile (99.99), mse, entropy;
* ``qgraph ort max`` — the same door, onnxruntime backend (its default pipeline);
* ``ort MinMax`` / ``ort Entropy`` — ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel
  int8 weights, its default uint8 activations and op coverage).

Every variant runs as a fresh subprocess doing the whole job — float ONNX file in, quantized ONNX
file out — timed by wall clock, with its peak RSS (and the RSS before the job: imports and data).
Variants are interleaved round after round; medians are reported. Accuracy is measured in
onnxruntime on held-out data: the digits CNN's top-1 (real data), all-MiniLM-L6-v2's sentence-
embedding cosine vs FP32 on 64 held-out stdlib sentences (real weights, seq 128), and for a
ResNet-18-style CNN at 32×32 (random weights) the top-1 agreement and logit cosine vs FP32.

Usage: ``.venv/bin/python benchmarks/bench_onnx_door.py [--models resnet,digits,minilm] [--rounds 3]
[--out benchmarks/results_onnx_door.json]``
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from _host import cpu_name

HERE = Path(__file__).resolve().parent
QGRAPH = [f"qgraph trt {c}" for c in ("max", "percentile", "mse", "entropy")] + ["qgraph ort max"]
ORT = ["ort MinMax", "ort Entropy"]


def _export(model: torch.nn.Module, args: tuple, path: Path, dynamic: tuple) -> None:
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, dynamo=True, external_data=False, dynamic_shapes=dynamic).save(str(path))


def prepare(name: str, folder: Path) -> dict:
    """Export the model, write calibration batches and held-out data; returns the case."""
    if name == "resnet":
        sys.path.insert(0, str(HERE))
        from bench_ort import resnet18

        model = resnet18(imagenet=False)
        g = torch.Generator().manual_seed(1)
        calib = {"x": torch.randn(128, 3, 32, 32, generator=g).numpy()}
        test = {"x": torch.randn(256, 3, 32, 32, generator=g).numpy()}
        _export(model, (torch.from_numpy(test["x"][:2]),), folder / "resnet.onnx", ({0: torch.export.Dim.AUTO},))
        return {"calib": calib, "test": test, "labels": None}
    if name == "digits":
        from qgraph.capture import load_pt2
        from qgraph.examples.digits import CALIB_PATH, MODEL_PATH, TEST_PATH

        with np.load(CALIB_PATH) as c, np.load(TEST_PATH) as t:
            calib, test, labels = {"x": c["x"]}, {"x": t["x"]}, t["y"]
        model = load_pt2(MODEL_PATH)  # the bundled program, as a module
        _export(model, (torch.from_numpy(test["x"][:2]),), folder / "digits.onnx", ({0: torch.export.Dim.AUTO},))
        return {"calib": calib, "test": test, "labels": labels}
    sys.path.insert(0, str(HERE))
    import minilm

    model, tokenizer = minilm.load_minilm()
    texts = minilm.sentences(128 + 64, seed=0)
    ids, mask = minilm.encode(tokenizer, texts[:128], 128)
    tids, tmask = minilm.encode(tokenizer, texts[128:], 128)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=512)
    _export(model, (tids[:2], tmask[:2]), folder / "minilm.onnx", ({0: batch, 1: seq}, {0: batch, 1: seq}))
    return {
        "calib": {"input_ids": ids.numpy(), "attention_mask": mask.numpy()},
        "test": {"input_ids": tids.numpy(), "attention_mask": tmask.numpy()},
        "labels": None,
    }


# --- one variant, in its own process -------------------------------------------------------------


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(variant: str, src: Path, calib: Path, dst: Path) -> dict:
    """The whole job of one variant: float ONNX file in, quantized ONNX file out."""
    with np.load(calib) as data:
        arrays = {k: data[k] for k in data.files}
    batches = [{k: torch.from_numpy(v[i : i + 32]) for k, v in arrays.items()} for i in range(0, len(next(iter(arrays.values()))), 32)]
    if variant.startswith("qgraph"):
        from qgraph.backends import onnxruntime as ort_backend
        from qgraph.backends import tensorrt
        from qgraph.driver import quantize
        from qgraph.onnx_graph import load_onnx_model, upgrade_opset

        import onnx.defs

        import qgraph.passes  # noqa: F401 - imports happen before the clock starts, as for ORT's tool
        import qgraph.pipeline  # noqa: F401

        # onnx's operator-schema registry (~10 ms, once a process) starts warm for both tools:
        # ORT's tool initialises it on import (onnxruntime.quantization imports onnx.reference),
        # qgraph at its first check_model; left cold, qgraph alone would pay it inside the clock
        onnx.defs.get_schema("Conv")

        _, backend, calibrator = variant.split()
        module = tensorrt if backend == "trt" else ort_backend
        before = _rss_mib()
        start = time.perf_counter()
        model = upgrade_opset(load_onnx_model(src), 13)
        counts, seconds = quantize(
            model, batches, rules=module.INT8, pipeline=module.DEFAULT_PIPELINE.format(calibrator=calibrator)
        )
        dst.write_bytes(module.lower_onnx(model))
        wall = time.perf_counter() - start
        return {"wall_s": wall, "calibrate_s": seconds.get("calibrate", 0.0), "rss_before_mib": before, "rss_peak_mib": _rss_mib()}
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader:
        def __init__(self) -> None:
            self._it = iter([{k: v.numpy() for k, v in b.items()} for b in batches])

        def get_next(self) -> dict | None:
            return next(self._it, None)

    method = {"ort MinMax": CalibrationMethod.MinMax, "ort Entropy": CalibrationMethod.Entropy}[variant]
    before = _rss_mib()
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(
            str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method,
        )
    wall = time.perf_counter() - start
    return {"wall_s": wall, "calibrate_s": None, "rss_before_mib": before, "rss_peak_mib": _rss_mib()}


# --- the driver ----------------------------------------------------------------------------------


def accuracy(model: Path, reference: Path, case: dict) -> dict:
    def outputs(path: Path) -> np.ndarray:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        test = case["test"]
        n = len(next(iter(test.values())))
        return np.concatenate([sess.run(None, {k: v[i : i + 16] for k, v in test.items()})[0] for i in range(0, n, 16)])

    out, ref = outputs(model), outputs(reference)
    cos = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))
    result = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
              "top1_agreement": float(np.mean(out.argmax(1) == ref.argmax(1)))}
    if case["labels"] is not None:
        result["top1"] = float(np.mean(out.argmax(1) == case["labels"]))
    return result


def bench(name: str, rounds: int, folder: Path) -> dict:
    case = prepare(name, folder)
    src = folder / f"{name}.onnx"
    calib = folder / f"{name}_calib.npz"
    np.savez(calib, **case["calib"])
    variants = QGRAPH + ORT
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(rounds):
        for v in variants:
            dst = folder / f"{name}_{v.replace(' ', '_')}.onnx"
            cmd = [sys.executable, __file__, "--one", v, str(src), str(calib), str(dst)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:  # recorded: a tool that fails on a model is a result too
                runs[v].append({"error": done.stderr.strip().splitlines()[-1]})
                print(f"  {name} round {r + 1}: {v}: FAILED {runs[v][-1]['error']}", flush=True)
                continue
            runs[v].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  {name} round {r + 1}: {v}: {runs[v][-1]['wall_s']:.2f} s", flush=True)
    result = {"samples": int(len(next(iter(case["calib"].values())))), "fp32": accuracy(src, src, case), "variants": {}}
    for v in variants:
        if any("error" in x for x in runs[v]):
            result["variants"][v] = {"error": next(x["error"] for x in runs[v] if "error" in x)}
            continue
        walls = [x["wall_s"] for x in runs[v]]
        cal = [x["calibrate_s"] for x in runs[v] if x["calibrate_s"] is not None]
        result["variants"][v] = {
            "wall_s_median": statistics.median(walls), "wall_s_runs": walls,
            "calibrate_pass_s_median": statistics.median(cal) if cal else None,
            "rss_peak_mib_median": statistics.median(x["rss_peak_mib"] for x in runs[v]),
            "rss_job_mib_median": statistics.median(x["rss_peak_mib"] - x["rss_before_mib"] for x in runs[v]),
            **accuracy(folder / f"{name}_{v.replace(' ', '_')}.onnx", src, case),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet,digits,minilm")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results_onnx_door.json")
    parser.add_argument("--one", nargs=4, metavar=("VARIANT", "SRC", "CALIB", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        variant, src, calib, dst = args.one
        print(json.dumps(run_one(variant, Path(src), Path(calib), Path(dst))))
        return 0
    results = {"machine": f"{cpu_name()}, {torch.get_num_threads()} threads",
               "onnxruntime": ort.__version__, "rounds": args.rounds, "models": {}}
    with tempfile.TemporaryDirectory(prefix="qgraph-bench-door-") as tmp:
        for name in args.models.split(","):
            results["models"][name] = bench(name, args.rounds, Path(tmp))
            args.out.write_text(json.dumps(results, indent=2) + "\n")  # partial results survive
            for v, row in results["models"][name]["variants"].items():
                if "error" in row:
                    print(f"{name:7s} {v:22s} failed: {row['error']}")
                    continue
                acc = f"top-1 {100 * row['top1']:.2f}%" if "top1" in row else f"cosine {row['cosine_mean']:.4f} (min {row['cosine_min']:.4f})"
                print(f"{name:7s} {v:22s} {row['wall_s_median']:7.2f} s  peak RSS {row['rss_peak_mib_median']:6.0f} MiB "
                      f"(job +{row['rss_job_mib_median']:5.0f})  {acc}  top-1 agreement {100 * row['top1_agreement']:.1f}%")
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
