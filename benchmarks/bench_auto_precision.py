"""NVFP4 with FP8 upgrades chosen by ``auto-precision``: PTQ and QAD on the tiny byte LM.

Plans, all with TensorRT's rules and fallback (the attention MatMuls in FP8 in every plan):

* uniform NVFP4 (4.5 bits per weight) and uniform FP8 (8 bits): the two ends;
* ``auto-precision([NVFP4, FP8], effective_bits=B)`` for B = 5.0, 5.5, 6.0 (KL on the logits of
  the 8 × 32 calibration windows, which it also calibrates on);
* a hand plan: q, k and v in FP8 (their shared input, the LN1 output, is NVFP4's costliest
  activation in ``study_qad.py --sensitivity``), and ``auto-precision`` at the same bits.

Each plan is calibrated (max) and scored on the held-out validation windows (KL to the FP32
teacher, CE); with ``--qad``, the uniform NVFP4 plan and the auto plans are then trained with
QAD exactly as in ``study_qad.py`` (400 steps of 16 × 128 bytes, AdamW lr 1e-4, warmup + cosine,
KL only, compiled quantizer kernels). ``gap closed`` is of uniform NVFP4 PTQ's KL.

``--model minilm``: all-MiniLM-L6-v2's real weights (``make bench``), PTQ only: uniform NVFP4,
``auto-precision`` (mse of the normalised embedding) at 5.0, 5.5 and 6.0 bits and uniform FP8,
each NVFP4 plan also with its weights rounded by ``gptq`` (the same calibration data), scored by
the embedding's cosine to FP32 on 64 held-out sentences, in torch and in onnxruntime.

Usage: ``.venv/bin/python benchmarks/bench_auto_precision.py [--model tinylm|minilm] [--qad] [--out
FILE]`` (2 threads; the tiny LM's teacher is trained on first use, ~10 minutes, then cached).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _host import cpu_name  # noqa: E402

import qgraph  # noqa: E402
from qgraph import Sequential, qops  # noqa: E402
from qgraph.backends import tensorrt  # noqa: E402
from qgraph.passes import (  # noqa: E402
    GPTQ,
    Annotate,
    AutoPrecision,
    Calibrate,
    InsertDistillTaps,
    InsertFakeQuant,
    InsertObservers,
    InsertQDQ,
)
from qgraph.passes.auto_precision import AUTO_PRECISION_META, weight_bits  # noqa: E402
from qgraph.passes._util import QUANT_META  # noqa: E402

BUDGETS = (5.0, 5.5, 6.0)
STEPS, LR, BATCH = 400, 1e-4, 16


def _mean_bits(gm: torch.fx.GraphModule) -> float:
    """Mean storage bits per weight element over the layers with a quantized weight."""
    from qgraph.graph import constant_value

    bits = size = 0.0
    for node in gm.graph.nodes:
        for index, spec in node.meta.get(QUANT_META, {}).items():
            if spec.role == "weight":
                n = constant_value(gm, node.args[index]).numel()
                bits, size = bits + weight_bits(spec) * n, size + n
    return bits / size


def _upgraded(gm: torch.fx.GraphModule) -> list[str]:
    """Module paths of the layers whose weight is FP8 (a readable name for each upgrade)."""
    out = []
    for node in gm.graph.nodes:
        specs = node.meta.get(QUANT_META, {}).values()
        if any(s.role == "weight" and s.dtype == "fp8_e4m3" for s in specs):
            stack = node.meta.get("nn_module_stack") or {}
            out.append(list(stack.values())[-1][0] if stack else node.name)
    return out


def _plans(calib: list, budgets: list[float], metric: str, extra: dict | None = None) -> dict:
    """Label -> a function planning a fresh capture: uniform NVFP4, uniform FP8, ``extra``, then
    auto-precision([NVFP4, FP8]) at each budget (the first budget's search measures the layers;
    the others reuse its record as their ``survey``)."""
    plans = {
        "uniform NVFP4": lambda gm: Annotate(tensorrt.NVFP4, fallback=True)(gm),
        "uniform FP8": lambda gm: Annotate(tensorrt.FP8, fallback=True)(gm),
        **(extra or {}),
    }
    survey = {}

    def auto(gm: torch.fx.GraphModule, bits: float) -> None:
        AutoPrecision([tensorrt.NVFP4, tensorrt.FP8], calib, effective_bits=bits, fallback=True, metric=metric,
                      progress=True, survey=survey.get("record"))(gm)
        survey.setdefault("record", gm.meta[AUTO_PRECISION_META])

    for bits in budgets:
        plans[f"auto-precision, {bits:g} bits"] = lambda gm, b=bits: auto(gm, b)
    return plans


def _planned(
    model: torch.nn.Module, example: tuple, plan: Callable[[torch.fx.GraphModule], object]
) -> tuple[torch.fx.GraphModule, float, float, list[str]]:
    """(a capture of ``model`` planned by ``plan``, seconds planning, bits per weight, FP8 layers)."""
    gm = qgraph.capture(model, example)
    t0 = time.perf_counter()
    plan(gm)
    plan_s = time.perf_counter() - t0
    return gm, plan_s, _mean_bits(gm), _upgraded(gm)


def bench_minilm() -> list[dict]:
    """all-MiniLM-L6-v2 (``make bench``): the plans scored by the embedding's cosine to FP32 on 64
    held-out sentences, in torch and in onnxruntime on the lowered model (reference form)."""
    from minilm import calibration_and_heldout, cosine, load_minilm, ort_cosine

    model, tokenizer = load_minilm()
    calib, (ids, mask) = calibration_and_heldout(tokenizer)
    example = (ids[:2], mask[:2])
    with torch.no_grad():
        ref = model(ids, mask)
    rows, nvfp4 = [], None
    for label, plan in _plans(calib, BUDGETS, "mse").items():
        gm, plan_s, bits, upgraded = _planned(model, example, plan)
        Sequential([InsertObservers("max"), Calibrate(calib), InsertQDQ()])(gm)
        arms = [("PTQ", gm)]
        if label != "uniform FP8":  # the same plan with GPTQ-rounded weights (same calibration data)
            rounded = copy.deepcopy(gm)
            GPTQ(calib)(rounded)
            arms.append(("PTQ + gptq", rounded))
        for arm, graph in arms:
            with torch.no_grad():
                cos = cosine(graph(ids, mask), ref)
            ort = ort_cosine(tensorrt.lower(graph, example, form="reference"), (ids, mask), ref)
            nvfp4 = float(cos.mean()) if (label, arm) == ("uniform NVFP4", "PTQ") else nvfp4
            rows.append({"model": "minilm", "plan": label, "arm": arm, "bits": bits, "upgraded": upgraded,
                         "plan_s": plan_s, "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                         "ort_cos_mean": float(ort.mean()), "ort_cos_min": float(ort.min()),
                         "gap_closed": (float(cos.mean()) - nvfp4) / (1 - nvfp4)})
            print(f"minilm {label} {arm}: {bits:.3f} bits, cos {cos.mean():.4f} / {cos.min():.4f} "
                  f"(ORT {ort.mean():.4f}), {100 * rows[-1]['gap_closed']:.0f} % of NVFP4's gap, {plan_s:.0f} s; "
                  f"FP8: {upgraded}", flush=True)
    print("\n| plan | arm | bits per weight | layers in FP8 | cosine mean / min (torch) | (ORT) | gap closed | search |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['plan']} | {r['arm']} | {r['bits']:.2f} | {len(r['upgraded'])} | {r['cos_mean']:.4f} / "
              f"{r['cos_min']:.4f} | {r['ort_cos_mean']:.4f} / {r['ort_cos_min']:.4f} | {100 * r['gap_closed']:.0f} % "
              f"| {r['plan_s']:.0f} s |")
    return rows


def main() -> None:
    import tinylm
    from study_qad import _finetune

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("tinylm", "minilm"), default="tinylm")
    parser.add_argument("--qad", action="store_true", help="train the NVFP4 and auto plans with QAD (tiny LM)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    args.out = args.out or str(HERE / ("results_auto_precision.json" if args.model == "tinylm"
                                       else "results_auto_precision_minilm.json"))
    torch.set_num_threads(2)
    torch.manual_seed(0)
    qops.use_compiled_kernels()
    start = time.perf_counter()
    if args.model == "minilm":
        rows = bench_minilm()
        _write(args.out, rows, start)
        return

    model = tinylm.teacher()
    calib = tinylm.calibration_batches(8, 32)
    log_t = tinylm.teacher_log_probs(model)
    example = (calib[0][:4],)
    teacher = qgraph.capture(model, example)
    qkv = [n.name for n in teacher.graph.nodes
           if any(path.split(".")[-1] in ("q", "k", "v") for path, _ in (n.meta.get("nn_module_stack") or {}).values())
           and n.op == "call_function" and "linear" in str(n.target)]

    def hand_plan(gm: torch.fx.GraphModule) -> None:
        Annotate(tensorrt.NVFP4, [(n, tensorrt.FP8) for n in qkv], fallback=True)(gm)

    hand_bits = _planned(model, example, hand_plan)[2]
    plans = _plans(calib, [*BUDGETS, round(hand_bits, 3)], "kl", {"hand: q, k, v in FP8": hand_plan})

    rows, starts, nvfp4_kl, bits_of = [], {}, None, {}
    for label, plan in plans.items():
        gm, plan_s, bits, upgraded = _planned(model, example, plan)
        Sequential([InsertObservers("max"), Calibrate(calib)])(gm)
        starts[label], bits_of[label] = copy.deepcopy(gm), bits
        InsertQDQ()(gm)
        r = tinylm.score(gm, log_t)
        nvfp4_kl = r["kl"] if label == "uniform NVFP4" else nvfp4_kl
        meta = gm.meta.get(AUTO_PRECISION_META, {})
        rows.append({"plan": label, "arm": "PTQ", "bits": bits, "upgraded": upgraded,
                     "plan_s": plan_s, "search_kl_base": meta.get("base_error"), "search_kl": meta.get("error"),
                     "kl_closed": (nvfp4_kl - r["kl"]) / nvfp4_kl, **r})
        print(f"{label}: {rows[-1]['bits']:.3f} bits, KL {r['kl']:.4f}, CE {r['ce']:.4f} "
              f"({100 * rows[-1]['kl_closed']:.0f} % of NVFP4's KL), {plan_s:.0f} s; FP8: {upgraded}", flush=True)

    if args.qad:
        for label, gm in starts.items():
            if not (label == "uniform NVFP4" or label.startswith("auto")):
                continue
            student = copy.deepcopy(gm)
            InsertFakeQuant()(student)
            InsertDistillTaps(teacher, temperature=1.0)(student)
            t0 = time.perf_counter()
            history = _finetune(student, tinylm.batches("train", BATCH, tinylm.CONFIG["ctx"], seed=11),
                                lambda out, _y: out[1], STEPS, LR, f"QAD {label}")
            r = tinylm.score(student, log_t)
            rows.append({"plan": label, "arm": "QAD", "bits": bits_of[label], "train_s": time.perf_counter() - t0,
                         "kl_closed": (nvfp4_kl - r["kl"]) / nvfp4_kl, "loss_history": history, **r})
            print(f"QAD {label}: KL {r['kl']:.4f}, CE {r['ce']:.4f} ({100 * rows[-1]['kl_closed']:.0f} % of "
                  f"NVFP4 PTQ's KL)", flush=True)

    print("\n| plan | bits per weight | arm | KL to teacher | val CE | of NVFP4 PTQ's KL closed |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['plan']} | {r['bits']:.2f} | {r['arm']} | {r['kl']:.4f} | {r['ce']:.4f} | {100 * r['kl_closed']:.0f} % |")
    _write(args.out, rows, start)


def _write(out: str, rows: list[dict], start: float) -> None:
    total = time.perf_counter() - start
    print(f"total {total:.0f} s")
    Path(out).write_text(json.dumps(
        {"command": " ".join(sys.argv), "host": cpu_name(), "torch": torch.__version__,
         "python": platform.python_version(), "total_s": total, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
