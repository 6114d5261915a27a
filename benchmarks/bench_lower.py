"""Benchmark: calibration, amax + insert-qdq, the whole pass pipeline, and TensorRT lowering.

For every zoo model (:data:`qgraph.examples.zoo.ZOO`) and every calibrator (max, percentile, mse,
entropy) this runs, ``--repeats`` times (calibrators interleaved within a repeat, so background
load spreads evenly over them) and each time on a fresh ``capture``::

    Sequential([FoldBatchNorm(), Annotate(tensorrt.INT8), InsertObservers(calibrator),
                Calibrate(batches), InsertQDQ()], instruments=[TimingInstrument()])(gm)
    tensorrt.lower(gm, (batches[0],))

and reports the median, min and max (``time.perf_counter``) of

* ``calibrate``: the Calibrate pass (from :class:`~qgraph.TimingInstrument`);
* ``insert_qdq``: the InsertQDQ pass, which computes every observer's amax (its share, the
  calibrator itself, is reported as ``amax``);
* ``pipeline``: the whole ``Sequential`` (all five passes, verifier after each pass included);
* ``lower``: ``tensorrt.lower``, split into ``torch.export`` (re-export of the fake-quant graph),
  ``torch.onnx.export`` (dynamo exporter incl. its optimizer), onnx-ir clean-up (the rest of
  ``export_onnx``) and ``serialize`` (``onnx.checker`` full check + serialization).

The split is measured by wrapping the library functions at run time (no library code changes).
Once per model/calibrator (outside the timings) it records parity (max relative output error,
onnxruntime vs torch fake-quant) and code agreement (fraction of identical activation codes), both
on all 512 calibration samples, and whether the ONNX bytes were identical in every repeat.

Fixed inputs: the zoo's seeded models (``make(name)``, seed 0); calibration data = 16 batches of
32 samples of ``torch.randn`` of the model's input shape, from ``torch.Generator().manual_seed(7)``.
``torch.set_num_threads(1)`` (and one inter-op thread) for stable numbers; onnxruntime sessions in
the parity checks are single-threaded too. Like ``timeit``, garbage is collected (``gc.collect()``,
untimed) before every run: otherwise Python's automatic full (generation-2) collection over the
large heap torch.export builds lands inside every third or so lowering and adds ~0.3 s to it
(``--gc-in-timings`` keeps that behaviour). One untimed warm-up run (mlp, max) precedes the
measurements so one-time imports and exporter initialisation are not charged to the first model.

Usage::

    .venv/bin/python benchmarks/bench_lower.py [--repeats 7] [--out benchmarks/results_lower.json]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

torch.set_num_threads(1)
with contextlib.suppress(RuntimeError):  # only settable before any inter-op work
    torch.set_num_interop_threads(1)

# torch.export's pytree FutureWarnings are noise here (they would repeat once per capture)
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

import onnx  # noqa: E402
from _host import cpu_name, cpuinfo  # noqa: E402
import onnxruntime  # noqa: E402

from qgraph import FakeQuant, Sequential, TimingInstrument, capture  # noqa: E402
from qgraph.backends import _onnx, tensorrt  # noqa: E402
from qgraph.calibrators import CALIBRATORS  # noqa: E402
from qgraph.examples.zoo import ZOO, make  # noqa: E402
from qgraph.observers import Observer  # noqa: E402
from qgraph.parity import check_codes, check_parity  # noqa: E402
from qgraph.passes import Annotate, Calibrate, FoldBatchNorm, InsertObservers, InsertQDQ  # noqa: E402

CALIB_BATCHES = 16
CALIB_BATCH_SIZE = 32
CALIB_SEED = 7
MODEL_SEED = 0

#: metric key → column title
METRICS = {
    "capture": "capture",
    "calibrate": "calibrate",
    "amax": "amax",
    "insert_qdq": "amax + insert-qdq",
    "pipeline": "pipeline (5 passes)",
    "lower": "lower",
    "lower_torch_export": "torch.export",
    "lower_onnx_export": "torch.onnx.export",
    "lower_cleanup": "onnx-ir clean-up",
    "lower_checker": "checker + serialize",
}


class _Split:
    """Accumulate wall time of wrapped library functions (reset per measured step)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, owner: object, attr: str, key: str) -> contextlib.AbstractContextManager:
        original = getattr(owner, attr)

        def timed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start

        @contextlib.contextmanager
        def patched():  # noqa: ANN202
            setattr(owner, attr, timed)
            try:
                yield
            finally:
                setattr(owner, attr, original)

        return patched()


def calibration_data(name: str) -> list[torch.Tensor]:
    shape = ZOO[name][1]
    g = torch.Generator().manual_seed(CALIB_SEED)
    return [torch.randn(CALIB_BATCH_SIZE, *shape, generator=g) for _ in range(CALIB_BATCHES)]


def run_once(name: str, calibrator: str, calib: list[torch.Tensor], split: _Split):
    """One fresh capture → pipeline → lower; returns (seconds per metric, graph, onnx bytes)."""
    model, x = make(name, seed=MODEL_SEED)
    split.seconds = {}
    t0 = time.perf_counter()
    gm = capture(model, (x,))
    t1 = time.perf_counter()
    timing = TimingInstrument()
    pipeline = Sequential(
        [FoldBatchNorm(), Annotate(tensorrt.INT8), InsertObservers(calibrator), Calibrate(calib), InsertQDQ()],
        instruments=[timing],
    )
    pipeline(gm)
    t2 = time.perf_counter()
    amax = split.seconds.get("amax", 0.0)
    split.seconds = {}
    data = tensorrt.lower(gm, (calib[0],))
    t3 = time.perf_counter()
    lower = t3 - t2
    export_onnx = split.seconds["export_onnx"]
    torch_export = split.seconds["torch_export"]
    onnx_export = split.seconds["onnx_export"]
    seconds = {
        "capture": t1 - t0,
        "calibrate": timing.seconds["calibrate"],
        "amax": amax,
        "insert_qdq": timing.seconds["insert-qdq"],
        "pipeline": t2 - t1,
        "lower": lower,
        "lower_torch_export": torch_export,
        "lower_onnx_export": onnx_export,
        "lower_cleanup": export_onnx - torch_export - onnx_export,
        "lower_checker": split.seconds["serialize"],
    }
    return seconds, gm, data


def summarize(samples: list[float]) -> dict[str, object]:
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "samples_s": samples,
    }


def ms(value: float) -> str:
    v = 1000 * value
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2f}"


def spread(s: dict[str, object]) -> str:
    return f"{ms(s['median_s'])} ({ms(s['min_s'])}–{ms(s['max_s'])})"


def machine() -> dict[str, object]:
    info = cpuinfo()
    return {
        "cpu": cpu_name(info),
        "cores": os.cpu_count(),
        "avx512_vnni": "avx512_vnni" in info.get("flags", "").split(),
        "cuda": torch.cuda.is_available(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
    }


def _exact(mismatches: int | None) -> str:
    if mismatches is None:
        return "n/a"
    return "yes" if mismatches == 0 else f"no ({mismatches})"


def tables(results: list[dict[str, object]], repeats: int) -> str:
    head = (
        f"Times in ms: median (min–max) over {repeats} repeats, each on a fresh capture. "
        "`amax + insert-qdq` is the InsertQDQ pass, `amax` its calibrator share; "
        "`pipeline` = all five passes incl. the verifier after each. Parity (max relative output "
        "error, onnxruntime vs torch fake-quant) and activation-code agreement (end to end; "
        "bit-exact = torch's quantizer gives ORT's codes on ORT's own quantizer inputs) on all "
        "512 calibration samples.\n\n"
    )
    cols = ["calibrate", "amax", "insert_qdq", "pipeline", "lower"]
    lines = [
        "| model | calibrator | " + " | ".join(METRICS[c] for c in cols) + " | max rel. err | codes equal (max diff) | quantizers bit-exact |",
        "|" + "---|" * (len(cols) + 5),
    ]
    for r in results:
        s = r["seconds"]
        lines.append(
            f"| {r['model']} | {r['calibrator']} | "
            + " | ".join(spread(s[c]) for c in cols)
            + f" | {r['parity_max_relative']:.2e} | {100 * r['codes_fraction_equal']:.3f}% (≤{r['codes_max_diff']})"
            + f" | {_exact(r['quantizer_mismatches'])} |"
        )
    split_cols = ["lower_torch_export", "lower_onnx_export", "lower_cleanup", "lower_checker"]
    lines += [
        "",
        "Lowering split (ms, medians; `capture` is the initial torch.export of the float model, "
        "not part of the pipeline):",
        "",
        "| model | calibrator | capture | " + " | ".join(METRICS[c] for c in split_cols)
        + " | lower | torch.onnx.export share of lower |",
        "|" + "---|" * (len(split_cols) + 5),
    ]
    for r in results:
        s = r["seconds"]
        # per repeat, then the median (medians of the parts need not add up to the median total)
        share = statistics.median(
            e / t for e, t in zip(s["lower_onnx_export"]["samples_s"], s["lower"]["samples_s"])
        )
        lines.append(
            f"| {r['model']} | {r['calibrator']} | {ms(s['capture']['median_s'])} | "
            + " | ".join(ms(s[c]["median_s"]) for c in split_cols)
            + f" | {ms(s['lower']['median_s'])} | {100 * share:.0f}% |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per model/calibrator (default 7)")
    parser.add_argument("--out", default="benchmarks/results_lower.json", help="JSON output path")
    parser.add_argument("--models", nargs="*", default=sorted(ZOO), help="zoo models (default: all)")
    parser.add_argument("--calibrators", nargs="*", default=list(CALIBRATORS), help="default: all four")
    parser.add_argument(
        "--gc-in-timings",
        action="store_true",
        help="do not gc.collect() (untimed) before every run: an automatic full collection then "
        "lands inside every few runs",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    split = _Split()
    wraps = [
        split.wrap(Observer, "amax", "amax"),
        split.wrap(_onnx, "export_onnx", "export_onnx"),
        split.wrap(_onnx, "serialize", "serialize"),
        # the re-export inside `tensorrt.lower` (the capture's own export is cleared before lower)
        split.wrap(torch.export, "export", "torch_export"),
        split.wrap(torch.onnx, "export", "onnx_export"),
    ]
    load_before = os.getloadavg()
    started = time.perf_counter()
    results = []
    with contextlib.ExitStack() as stack:
        for w in wraps:
            stack.enter_context(w)
        run_once("mlp", "max", calibration_data("mlp"), split)  # warm-up, untimed
        for name in args.models:
            calib = calibration_data(name)
            everything = torch.cat(calib)
            samples = {c: {k: [] for k in METRICS} for c in args.calibrators}
            digests: dict[str, set[str]] = {c: set() for c in args.calibrators}
            last = {}
            # calibrators interleaved within each repeat, so that background load spreads evenly
            for _ in range(args.repeats):
                for calibrator in args.calibrators:
                    if not args.gc_in_timings:
                        gc.collect()
                    seconds, gm, data = run_once(name, calibrator, calib, split)
                    for k, v in seconds.items():
                        samples[calibrator][k].append(v)
                    digests[calibrator].add(hashlib.sha256(data).hexdigest())
                    last[calibrator] = (gm, data)
            for calibrator in args.calibrators:
                gm, data = last[calibrator]
                parity = check_parity(gm, data, (everything,))
                codes = check_codes(gm, data, (everything,))
                result = {
                    "model": name,
                    "calibrator": calibrator,
                    "seconds": {k: summarize(v) for k, v in samples[calibrator].items()},
                    "parity_max_relative": parity.max_relative,
                    "codes_total": codes.total,
                    "codes_differing": codes.differing,
                    "codes_max_diff": codes.max_diff,
                    "codes_fraction_equal": codes.fraction_equal,
                    # codes that differ when torch quantizes the very tensor ORT quantized
                    # (0: the quantizers are bit-exact; older qgraph.parity lacks the field)
                    "quantizer_mismatches": getattr(codes, "quantizer_mismatches", None),
                    "onnx_bytes": len(data),
                    "onnx_bytes_identical_across_repeats": len(digests[calibrator]) == 1,
                    "activation_quantizers": sum(
                        isinstance(m, FakeQuant) and m.spec.role == "activation" for m in gm.modules()
                    ),
                }
                results.append(result)
                s = result["seconds"]
                print(
                    f"{name:12s} {calibrator:10s} calibrate {spread(s['calibrate'])} ms, "
                    f"insert-qdq {spread(s['insert_qdq'])} ms, pipeline {spread(s['pipeline'])} ms, "
                    f"lower {spread(s['lower'])} ms",
                    file=sys.stderr,
                    flush=True,
                )
    total = time.perf_counter() - started

    table = tables(results, args.repeats)
    print(table)
    print(f"total wall time {total:.1f} s", file=sys.stderr)
    out = {
        "command": " ".join([".venv/bin/python", "benchmarks/bench_lower.py", *sys.argv[1:]]),
        "repeats": args.repeats,
        "calibration_data": {
            "batches": CALIB_BATCHES,
            "batch_size": CALIB_BATCH_SIZE,
            "distribution": "torch.randn of the model's input shape",
            "generator_seed": CALIB_SEED,
            "model_seed": MODEL_SEED,
        },
        "machine": machine(),
        "gc_collect_before_each_run": not args.gc_in_timings,
        "total_wall_s": total,
        # other processes on the machine make the numbers noisier; recorded for honesty
        "loadavg_1_5_15_before": load_before,
        "loadavg_1_5_15_after": os.getloadavg(),
        "results": results,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
