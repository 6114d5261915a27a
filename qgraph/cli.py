"""The ``qgraph`` command line: ``lower``, ``inspect`` and ``demo``.

Every user-fixable problem prints one line, ``qgraph: error: ...``, and exits with status 2;
outputs are written atomically, so a failed run leaves no file behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import NoReturn

from qgraph._errors import InputError, QGraphError
from qgraph.calibrators import CALIBRATORS

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (``qgraph: error: ...``), not the usage block
    followed by the error; ``--help`` still prints the full usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"qgraph: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qgraph", description="qgraph quantization compiler")
    sub = parser.add_subparsers(dest="command", required=True)

    lower = sub.add_parser("lower", help="quantize a model and lower it to QDQ ONNX")
    lower.add_argument("model", help="a torch.export program (.pt2) or a float ONNX model (.onnx)")
    lower.add_argument("-o", "--output", required=True, help="the ONNX file to write")
    lower.add_argument(
        "--backend",
        default="tensorrt",
        help="tensorrt (QDQ TensorRT parses) or onnxruntime (QDQ ORT's CPU provider fuses into int8 kernels)",
    )
    lower.add_argument(
        "--precision",
        default="int8",
        help="quantization recipe: int8, fp8, w4a16, nvfp4, mxfp8, mxfp4 (default: int8)",
    )
    lower.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="PATTERN=PRECISION",
        help="per-layer precision: node name or module path (fnmatch), @node:NAME (that node only), @first or @last; "
        "PRECISION may be float (repeatable, first match wins)",
    )
    lower.add_argument(
        "--fallback",
        action="store_true",
        help="run ops the recipe cannot run on this backend (e.g. NVFP4 on Conv) in its fallback precision",
    )
    lower.add_argument(
        "--form",
        choices=("deploy", "reference"),
        default="deploy",
        help="deploy: what the backend parses; reference: the same numbers in standard ops onnxruntime runs",
    )
    lower.add_argument("--calib", help=".npz with one array per model input, or a folder of them")
    lower.add_argument("--calibrator", choices=CALIBRATORS, default=None, help="default: max")
    lower.add_argument("--pipeline", help="pass pipeline spec (default: the PTQ pipeline)")
    lower.add_argument("--batch-size", type=int, default=32, help="calibration batch size")
    lower.add_argument("--parity-samples", type=int, default=256, help="samples for the parity check")
    lower.add_argument("--dump-dir", help="write the graph after every pass into this folder")
    lower.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")

    inspect = sub.add_parser(
        "inspect", help="TensorRT rule check, or onnxruntime fusion report, of any QDQ ONNX"
    )
    inspect.add_argument("model", help="a QDQ ONNX model")
    inspect.add_argument(
        "--backend",
        default="tensorrt",
        help="tensorrt: Q/DQ placement and rule violations; onnxruntime: which weighted ops ORT "
        "runs as int8 kernels, and why not (default: tensorrt)",
    )

    demo = sub.add_parser("demo", help="lower the bundled digits CNN and compare FP32 vs INT8")
    demo.add_argument("-o", "--output", default="digits_cnn_int8.onnx", help="the ONNX file to write")
    demo.add_argument("--calibrator", choices=CALIBRATORS, default="max")
    demo.add_argument("--precision", default="int8", help="recipe (default: int8); conv layers fall back")
    demo.add_argument("--form", choices=("deploy", "reference"), default="deploy", help="ONNX form to write")
    return parser


def _lower(args: argparse.Namespace) -> int:
    from qgraph.driver import check_writable, lower_file, write_atomic

    if args.pipeline and args.calibrator:
        raise InputError("give --calibrator or --pipeline, not both (put the calibrator in the spec)")
    check_writable(args.output)
    out = Path(args.output)
    for what, source in (("the input model", args.model), ("the calibration data", args.calib)):
        if out.exists() and Path(source).exists() and os.path.samefile(out, source):
            raise InputError(f"-o {args.output} is {what}: write the result to another file")
    if args.dump_dir:
        dump = Path(args.dump_dir)
        if dump.exists() and not dump.is_dir():
            raise InputError(f"--dump-dir {args.dump_dir}: exists and is not a folder")
        try:
            dump.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"--dump-dir {args.dump_dir}: cannot create it ({exc.strerror})") from None
        if not os.access(dump, os.W_OK):
            raise InputError(f"--dump-dir {args.dump_dir}: folder is not writable")
    if args.parity_samples < 1:
        raise InputError(f"--parity-samples must be >= 1, got {args.parity_samples}")
    start = time.perf_counter()
    result = lower_file(
        args.model,
        args.calib,
        backend=args.backend,
        precision=args.precision,
        calibrator=args.calibrator or "max",
        pipeline=args.pipeline,
        batch_size=args.batch_size,
        parity_samples=args.parity_samples,
        progress=not args.quiet,
        dump_dir=args.dump_dir,
        overrides=args.override,
        fallback=args.fallback,
        form=args.form,
    )
    if result.inspect is not None and result.inspect.violations:
        raise QGraphError(
            f"lowered model breaks {args.backend} rules: {result.inspect.violations[0]}"
        )
    write_atomic(args.output, result.onnx)
    if not args.quiet:
        calib = result.pass_seconds.get("calibrate", 0.0)
        print(f"qgraph lower: {args.model} -> {args.output} ({args.backend} {args.precision}, {args.form} form)")
        print(f"pipeline: {result.pipeline}")
        counts = result.counts
        print(
            f"folded {counts.get('fold-batchnorm.folded', 0)} BatchNorms; "
            f"{counts.get('insert-qdq.activations', 0)} activation and "
            f"{counts.get('insert-qdq.weights', 0)} weight quantizers"
        )
        if "auto-precision.upgraded" in counts:
            print(f"auto-precision: {counts['auto-precision.upgraded']} layer(s) upgraded to a wider recipe")
        for line in result.plan:
            print(line)
        print(f"calibration: {result.calib_samples} samples in {calib:.2f} s")
        print(f"lowering to ONNX: {result.lower_seconds:.2f} s; total {time.perf_counter() - start:.2f} s")
        where = "" if result.parity_form == args.form else f" [{result.parity_form} form]"
        print(result.parity.summary() + where)
        print(result.codes_summary())
        if result.inspect is not None:
            print(result.inspect.headline())
            by_reason: dict[str, list[str]] = {}
            for name, why in getattr(result.inspect, "reasons", {}).items():
                by_reason.setdefault(why, []).append(name)
            for why, names in by_reason.items():
                shown = ", ".join(names[:3]) + (f", … ({len(names)} ops)" if len(names) > 3 else "")
                print(f"  float in {args.backend}: {shown}: {why}")
        print(f"wrote {args.output} ({len(result.onnx) / 1024:.1f} KiB)")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import onnx

    from qgraph.driver import backend_module

    module = backend_module(args.backend)
    path = Path(args.model)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        model = onnx.load(str(path))  # external data is read from beside the model
    except Exception as exc:
        raise InputError(f"{path}: not a valid ONNX model ({type(exc).__name__})") from None
    if not model.opset_import and not model.graph.node:  # protobuf parses an empty file as a model
        raise InputError(f"{path}: not a valid ONNX model (no graph)")
    report = module.inspect_model(model)
    print(report.summary())
    return 1 if report.violations else 0


def _demo(args: argparse.Namespace) -> int:
    from qgraph.examples.demo import run_demo

    return run_demo(args.output, args.calibrator, args.precision, args.form)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qgraph`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("torch.onnx", "torch._export", "torch.export", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.ERROR)  # exporter chatter is not for CLI users
    warnings.filterwarnings("ignore")
    handlers = {"lower": _lower, "inspect": _inspect, "demo": _demo}
    try:
        return handlers[args.command](args)
    except QGraphError as exc:
        message = " ".join(str(exc).split())
        print(f"qgraph: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qgraph: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
