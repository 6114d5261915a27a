"""Load → quantize → lower → check: the whole PTQ job, used by the CLI and the demo.

Example:
    >>> result = lower_file("model.pt2", "calib.npz", backend="tensorrt", precision="int8")  # doctest: +SKIP
    >>> write_atomic("model_int8.onnx", result.onnx)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
import zipfile
from pathlib import Path

import onnx
import torch
import torch.fx

from qgraph._errors import InputError, QGraphError, first_line
from qgraph.capture import input_specs, load_pt2
from qgraph.data import CalibrationData
from qgraph.instruments import DumpInstrument, TimingInstrument
from qgraph.parity import CodeAgreement, ParityReport, check_codes, check_parity, compare_models
from qgraph.pipeline import build_pipeline
from qgraph.report import format_plan

__all__ = ["DEFAULT_PIPELINE", "LoweringResult", "load_model", "quantize", "lower_file", "write_atomic"]

#: The PTQ pipeline run when no ``--pipeline`` is given; ``{calibrator}`` is filled in.
DEFAULT_PIPELINE = "fold-batchnorm,annotate,insert-observers(calibrator={calibrator}),calibrate,insert-qdq"


@dataclasses.dataclass
class LoweringResult:
    """Everything one lowering produced: the ONNX bytes, the graph, timings and checks."""

    onnx: bytes
    graph: torch.fx.GraphModule
    pipeline: str
    counts: dict[str, int]
    pass_seconds: dict[str, float]
    lower_seconds: float
    parity: ParityReport
    codes: CodeAgreement | str
    inspect: object
    calib_samples: int
    form: str = "deploy"
    parity_form: str = "deploy"
    runnable: bytes = b""  # the ONNX that onnxruntime ran for parity (the output, or its reference form)
    plan: list[str] = dataclasses.field(default_factory=list)  # format_plan lines, read before lowering

    def codes_summary(self) -> str:
        """One line on activation-code agreement (or why it was not compared)."""
        return self.codes if isinstance(self.codes, str) else self.codes.summary()


def backend_module(name: str):  # noqa: ANN201 - a backend module
    from qgraph.backends import BACKENDS

    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r} (known: {', '.join(sorted(BACKENDS))})")
    return BACKENDS[name]


def resolve_recipe(module, precision: str, overrides=(), fallback: bool = False):  # noqa: ANN001, ANN201
    """(rules, [(pattern, rules or None)], fallback: True or None) of a backend recipe.

    ``overrides`` are ``PATTERN=PRECISION`` strings; PRECISION ``float`` keeps the op in float.
    """
    if precision not in module.RULES:
        raise InputError(
            f"backend {module.__name__.rsplit('.', 1)[-1]} has no precision {precision!r} "
            f"(has: {', '.join(module.RULES)})"
        )
    rules = module.RULES[precision]
    parsed = []
    for item in overrides:
        pattern, sep, prec = str(item).partition("=")
        if not sep or not pattern or not prec:
            raise InputError(f"--override {item!r}: expected PATTERN=PRECISION, e.g. '@last=int8' or 'fc*=float'")
        if prec != "float" and prec not in module.RULES:
            raise InputError(f"--override {item!r}: unknown precision {prec!r} (has: float, {', '.join(module.RULES)})")
        parsed.append((pattern, None if prec == "float" else module.RULES[prec]))
    return rules, parsed, True if fallback else None


def load_model(path: str | Path) -> torch.fx.GraphModule:
    """A private GraphModule from a ``.pt2`` torch.export archive or a float ``.onnx`` model
    (read into torch by ``qgraph.onnx_import``; :func:`lower_file` takes ONNX models natively)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such model file")
    if _is_pt2(path):
        return load_pt2(path)
    from qgraph.onnx_import import load_onnx

    return load_onnx(path)


def _is_pt2(path: Path) -> bool:
    return path.suffix == ".pt2" or zipfile.is_zipfile(path)


#: Recipes the ONNX door lowers natively (per-tensor / per-channel Q/DQ on the ONNX graph). Block
#: formats and the reference form read an ONNX model into torch instead (``qgraph.onnx_import``:
#: the ops it knows only), so they get the torch door's fake-quant simulation.
ONNX_PRECISIONS = ("int8", "fp8")


def quantize(
    gm: torch.fx.GraphModule,
    data,  # noqa: ANN001 - an iterable of batches
    *,
    rules,  # noqa: ANN001 - BackendRules
    pipeline: str,
    progress: bool = False,
    dump_dir: str | Path | None = None,
    overrides=(),  # noqa: ANN001 - [(pattern, BackendRules | None)]
    fallback=None,  # noqa: ANN001 - BackendRules | "float" | None
    recipes=None,  # noqa: ANN001 - the backend's recipes by name (auto-precision's upgrade=)
) -> tuple[dict[str, int], dict[str, float]]:
    """Run a pipeline spec on ``gm`` in place; returns (counts, seconds per pass)."""
    from qgraph.passes import PASSES

    timing = TimingInstrument()
    instruments = [timing] + ([DumpInstrument(dump_dir)] if dump_dir else [])
    seq = build_pipeline(
        pipeline,
        PASSES,
        context={
            "rules": rules,
            "recipes": recipes,
            "overrides": overrides,
            "fallback": fallback,
            "data": data,
            "progress": progress,
        },
        instruments=instruments,
    )
    result = seq(gm)
    return dict(result.counts), timing.seconds


def lower_file(
    model_path: str | Path,
    calib_path: str | Path | None,
    *,
    backend: str = "tensorrt",
    precision: str = "int8",
    calibrator: str = "max",
    pipeline: str | None = None,
    batch_size: int = 32,
    parity_samples: int = 256,
    progress: bool = False,
    dump_dir: str | Path | None = None,
    overrides=(),  # noqa: ANN001 - PATTERN=PRECISION strings
    fallback: bool = False,
    form: str = "deploy",
) -> LoweringResult:
    """The whole job on files: load, calibrate and quantize, lower, inspect, check parity.

    ``form`` ``deploy`` writes what the backend parses; ``reference`` its onnxruntime-runnable
    twin. Parity is measured in onnxruntime on the deploy form when onnxruntime runs it (INT8,
    FP8, INT4 weights), else on the reference form.
    """
    module = backend_module(backend)
    if form not in module.FORMS:
        raise InputError(f"unknown form {form!r} (known: {', '.join(module.FORMS)})")
    rules, override_rules, fallback_rules = resolve_recipe(module, precision, overrides, fallback)
    if form == "deploy" and precision in getattr(module, "REFERENCE_ONLY", ()):
        raise InputError(module.REFERENCE_ONLY[precision])  # before any calibration work
    if not Path(model_path).is_file():
        raise InputError(f"{model_path}: no such model file")
    if not _is_pt2(Path(model_path)) and precision in ONNX_PRECISIONS and form == "deploy":
        return _lower_onnx_file(
            module, model_path, calib_path, rules=rules, overrides=override_rules, fallback=fallback_rules,
            precision=precision, form=form,
            pipeline=pipeline or getattr(module, "DEFAULT_PIPELINE", DEFAULT_PIPELINE).format(calibrator=calibrator),
            batch_size=batch_size, parity_samples=parity_samples, progress=progress, dump_dir=dump_dir,
        )
    gm = load_model(model_path)
    if calib_path is None:
        raise InputError("--calib DATA is required: PTQ needs calibration data")
    specs = input_specs(gm)
    static_batch = specs[0][1][0] if specs and specs[0][1] else None
    if static_batch is not None:
        batch_size = static_batch  # the program was exported with a fixed batch: feed exactly that
    data = CalibrationData(calib_path, specs, batch_size, exact=static_batch is not None)
    spec = pipeline or getattr(module, "DEFAULT_PIPELINE", DEFAULT_PIPELINE).format(calibrator=calibrator)
    counts, seconds = quantize(
        gm,
        data,
        rules=rules,
        pipeline=spec,
        progress=progress,
        dump_dir=dump_dir,
        overrides=override_rules,
        fallback=fallback_rules,
        recipes=module.RULES,
    )
    kinds = {type(m).__name__ for m in gm.modules()}
    if "Observer" in kinds:
        raise QGraphError("pipeline left observers in the graph: end it with `insert-qdq`")
    if "FakeQuant" not in kinds:
        raise QGraphError("pipeline quantized nothing: it needs annotate, insert-observers, calibrate, insert-qdq")
    sample = data.take(static_batch or min(parity_samples, data.samples))
    example = sample if static_batch or sample[0].shape[0] >= 2 else tuple(torch.cat([t, t]) for t in sample)
    start = time.perf_counter()
    onnx_bytes = _lower(module, gm, example, form)
    lower_seconds = time.perf_counter() - start
    runnable = onnx_bytes if form == "reference" or module.ort_runnable(gm) else None
    parity_form = form if runnable is not None else "reference"
    if runnable is None:
        runnable = _lower(module, gm, example, "reference")
    parity = check_parity(gm, runnable, sample)
    try:
        codes: CodeAgreement | str = check_codes(gm, runnable, sample)
    except QGraphError as exc:  # a diagnostic, not a reason to refuse the lowering
        codes = f"activation codes: not compared ({exc})"
    report = module.inspect_model(onnx.load_from_string(onnx_bytes)) if form == "deploy" else None
    return LoweringResult(
        onnx_bytes, gm, spec, counts, seconds, lower_seconds, parity, codes, report, data.samples,
        form, parity_form, runnable, format_plan(gm),
    )


def _lower_onnx_file(
    module, model_path, calib_path, *, rules, overrides, fallback, precision, form, pipeline,  # noqa: ANN001
    batch_size, parity_samples, progress, dump_dir,  # noqa: ANN001
) -> LoweringResult:
    """The ONNX door: the passes run on the onnx-ir model itself, calibration in onnxruntime."""
    from qgraph.onnx_graph import input_specs as onnx_input_specs
    from qgraph.onnx_graph import load_onnx_model, quantizer_opset, upgrade_opset

    model = load_onnx_model(model_path)
    model = upgrade_opset(model, quantizer_opset(model, precision))
    if calib_path is None:
        raise InputError("--calib DATA is required: PTQ needs calibration data")
    specs = onnx_input_specs(model)
    static_batch = specs[0][1][0] if specs and specs[0][1] else None
    if static_batch is not None:
        batch_size = static_batch
    data = CalibrationData(calib_path, specs, batch_size, exact=static_batch is not None)
    counts, seconds = quantize(
        model, data, rules=rules, pipeline=pipeline, progress=progress, dump_dir=dump_dir,
        overrides=overrides, fallback=fallback, recipes=module.RULES,
    )
    if not any(n.op_type == "DequantizeLinear" for n in model.graph):
        raise QGraphError("pipeline quantized nothing: it needs annotate, insert-observers, calibrate, insert-qdq")
    plan = format_plan(model)  # before the backend rewrites the graph
    start = time.perf_counter()
    try:
        onnx_bytes = module.lower_onnx(model)
    except QGraphError:
        raise
    except Exception as exc:
        raise QGraphError(f"lowering failed: {first_line(exc)}") from None
    lower_seconds = time.perf_counter() - start
    sample = data.take(static_batch or min(parity_samples, data.samples))
    parity = compare_models(str(model_path), onnx_bytes, sample)  # the input file: external data too
    codes = "activation codes: not compared (ONNX input: there is no torch fake-quant graph)"
    report = module.inspect_model(onnx.load_from_string(onnx_bytes))
    return LoweringResult(
        onnx_bytes, model, pipeline, counts, seconds, lower_seconds, parity, codes, report, data.samples,
        "deploy", "deploy", onnx_bytes, plan,
    )


def _lower(module, gm: torch.fx.GraphModule, example: tuple, form: str) -> bytes:  # noqa: ANN001
    try:
        return module.lower(gm, example, form=form)
    except QGraphError:
        raise
    except Exception as exc:  # torch.export / torch.onnx refusing this model
        raise QGraphError(f"export to ONNX failed: {first_line(exc)}") from None


def check_writable(path: str | Path) -> Path:
    """Fail early (before any work) if ``path`` cannot be written."""
    # Path() drops a trailing "/" or "/.": "out/new/" would write a file named "new"
    if os.path.basename(str(path)) in ("", ".", ".."):
        raise InputError(f"{path}: names a folder; give the file to write")
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise InputError(f"{path}: is a directory")
    if not parent.is_dir():
        raise InputError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write {path}: folder {parent} is not writable")
    try:  # access() can say yes where creating a file fails (/proc, /sys, read-only mounts)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror}") from None
    return path


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that no reader ever sees a half-written file."""
    path = check_writable(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # e.g. a folder access() calls writable that is not (/proc, /sys)
        raise InputError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise InputError(f"cannot write {path}: {exc.strerror}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
