"""GPTQ against round-to-nearest weights: all-MiniLM-L6-v2 and the tiny byte LM, per recipe.

For each recipe the same PTQ graph (``annotate(TensorRT rules, fallback) → insert-observers(max)
→ calibrate → insert-qdq``) is scored as it is (weights rounded to nearest, **RTN**) and after
``gptq`` on the same calibration data (**GPTQ**), with the pass's wall time.

* **MiniLM** (``benchmarks/minilm.py``; ``make bench``): 128 calibration sentences at sequence
  64; metric: cosine of each of 64 held-out sentences' embedding to FP32 (mean and min), in
  torch and in onnxruntime on the lowered model (``tensorrt.lower``; NVFP4 in the reference
  form, which onnxruntime runs). ``gap closed`` = (cos_GPTQ − cos_RTN) / (1 − cos_RTN).
* **tiny LM** (``benchmarks/tinylm.py``; the teacher is trained on first use, ~10 minutes, then
  cached): calibration 8 × 32 windows of 128 bytes (``study_qad``'s); metrics: validation
  cross-entropy (nats/byte) and KL to the FP32 model, ``gap closed`` on KL.

Usage: ``.venv/bin/python benchmarks/bench_gptq.py [--models minilm,tinylm] [--recipes
w4a16,nvfp4,int8,fp8] [--out benchmarks/results_gptq.json]`` (2 threads).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _host import cpu_name  # noqa: E402

import qgraph  # noqa: E402
from qgraph import Sequential  # noqa: E402
from qgraph.backends import tensorrt  # noqa: E402
from qgraph.passes import GPTQ, Annotate, Calibrate, InsertObservers, InsertQDQ  # noqa: E402


def _ptq(capture, recipe: str, calib: list) -> torch.fx.GraphModule:  # noqa: ANN001
    gm = capture()
    Sequential([Annotate(tensorrt.RULES[recipe], fallback=True), InsertObservers("max"), Calibrate(calib), InsertQDQ()])(gm)
    return gm


def _timed_gptq(gm: torch.fx.GraphModule, calib: list) -> tuple[float, dict]:
    t0 = time.perf_counter()
    result = GPTQ(calib)(gm)
    return time.perf_counter() - t0, dict(result.counts)


def bench_minilm(recipes: list[str]) -> list[dict]:
    from minilm import calibration_and_heldout, cosine, load_minilm, ort_cosine

    model, tokenizer = load_minilm()
    calib, (ids, mask) = calibration_and_heldout(tokenizer)
    example = (ids[:2], mask[:2])
    with torch.no_grad():
        ref = model(ids, mask)

    def scored(gm: torch.fx.GraphModule, recipe: str) -> dict:
        with torch.no_grad():
            cos = cosine(gm(ids, mask), ref)
        form = "reference" if recipe == "nvfp4" else "deploy"
        ort = ort_cosine(tensorrt.lower(gm, example, form=form), (ids, mask), ref)
        return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                "ort_cos_mean": float(ort.mean()), "ort_cos_min": float(ort.min()), "form": form}

    rows = []
    for recipe in recipes:
        gm = _ptq(lambda: qgraph.capture(model, example), recipe, calib)
        rtn = scored(gm, recipe)
        seconds, counts = _timed_gptq(gm, calib)
        gptq = scored(gm, recipe)
        closed = (gptq["cos_mean"] - rtn["cos_mean"]) / (1 - rtn["cos_mean"])
        rows.append({"model": "minilm", "recipe": recipe, "rtn": rtn, "gptq": gptq, "gap_closed": closed,
                     "gptq_s": seconds, "counts": counts})
        print(f"minilm {recipe}: cos {rtn['cos_mean']:.4f} -> {gptq['cos_mean']:.4f} ({100 * closed:.0f} %), "
              f"ORT {rtn['ort_cos_mean']:.4f} -> {gptq['ort_cos_mean']:.4f}; gptq {seconds:.1f} s {counts}", flush=True)
    return rows


def bench_tinylm(recipes: list[str]) -> list[dict]:
    import tinylm

    model = tinylm.teacher()
    calib = tinylm.calibration_batches(8, 32)
    log_t = tinylm.teacher_log_probs(model)
    fp32 = tinylm.score(model, log_t)
    rows = []
    for recipe in recipes:
        gm = _ptq(lambda: qgraph.capture(model, (calib[0][:4],)), recipe, calib)
        rtn = tinylm.score(gm, log_t)
        seconds, counts = _timed_gptq(gm, calib)
        gptq = tinylm.score(gm, log_t)
        closed = (rtn["kl"] - gptq["kl"]) / rtn["kl"]
        rows.append({"model": "tinylm", "recipe": recipe, "fp32": fp32, "rtn": rtn, "gptq": gptq,
                     "gap_closed": closed, "gptq_s": seconds, "counts": counts})
        print(f"tinylm {recipe}: KL {rtn['kl']:.4f} -> {gptq['kl']:.4f} ({100 * closed:.0f} %), "
              f"CE {rtn['ce']:.4f} -> {gptq['ce']:.4f} (FP32 {fp32['ce']:.4f}); gptq {seconds:.1f} s {counts}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,tinylm")
    parser.add_argument("--recipes", default="w4a16,nvfp4,int8,fp8")
    parser.add_argument("--out", default=str(HERE / "results_gptq.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    recipes = args.recipes.split(",")
    t0 = time.perf_counter()
    rows = []
    for name in args.models.split(","):
        rows += {"minilm": bench_minilm, "tinylm": bench_tinylm}[name](recipes)
    total = time.perf_counter() - t0
    record = {"command": " ".join(sys.argv), "args": vars(args), "cpu": cpu_name(), "torch": torch.__version__,
              "python": platform.python_version(), "total_s": total, "rows": rows}
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"total {total:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
