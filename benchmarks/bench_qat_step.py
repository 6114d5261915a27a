"""QAT training-step time against the FP32 training step of the same graph (goal: ≤ 1.2×).

For each model and recipe this captures the model with ``qgraph.capture`` twice: once left in
FP32, once prepared for QAT (``fold-batchnorm → annotate(recipe, fallback) → insert-observers →
calibrate → insert-fake-quant``: weights track their scales, activation scales frozen). Both graphs
train with the same optimizer (AdamW) on the same batch; one *step* is zero_grad + forward + loss +
backward + optimizer step. After ``--warmup`` untimed steps, ``--steps`` steps are timed one by one
with ``time.perf_counter``, **interleaved** with steps of the FP32 graph (one of each, in turn), so
that load changes on a shared host hit both alike; each row reports its median and the ratio of
its median to the median of the FP32 steps it was interleaved with.
Each QAT graph is timed twice: with the eager quantizer kernels (the default) and with
``qgraph.qops.use_compiled_kernels()`` (each quantizer's forward and backward fused by
``torch.compile``; the first warm-up step compiles, and its time is reported apart). Then both
graphs are compiled whole with ``torch.compile(gm)`` (inductor; the quantizers traced and fused
with the ops around them) and timed the same way; the compiled QAT graph's ratio is given
against the compiled FP32 graph.

Models: the zoo transformer block (dim 32, seq 8; tiny, so per-op overheads dominate), the zoo
ResCNN, and — when ``benchmarks/tinylm.py`` is importable — the byte-level TinyLM (about 3M
parameters, batch 16 × 128 bytes), the model of the QAD study, and a twice-as-wide TinyLM (2
blocks of width 512) to show how the ratio moves with the width. ``torch.set_num_threads(1)``.

Usage::

    .venv/bin/python benchmarks/bench_qat_step.py [--steps 20] [--warmup 3] [--recipes int8,nvfp4]

Writes ``benchmarks/results_qat_step.json`` next to this script and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import qgraph
from _host import cpu_name
from qgraph import Sequential, qops
from qgraph.backends import tensorrt
from qgraph.examples.zoo import make
from qgraph.passes import Annotate, Calibrate, FoldBatchNorm, InsertFakeQuant, InsertObservers

HERE = Path(__file__).resolve().parent


def _models():
    """(name, model, example input, loss function on (output, batch)) of every benchmarked model."""
    out = []
    for name in ("transformer", "rescnn"):
        model, x = make(name)
        batch = torch.randn(32, *x.shape[1:], generator=torch.Generator().manual_seed(0))
        out.append((name, model, batch, lambda y: y.float().pow(2).mean()))
    try:
        sys.path.insert(0, str(HERE))
        import tinylm  # noqa: PLC0415 - optional: the study's model

        tokens = torch.randint(0, 256, (16, 128), generator=torch.Generator().manual_seed(0))
        targets = torch.roll(tokens, -1, dims=1)
        loss = lambda y: torch.nn.functional.cross_entropy(y.reshape(-1, 256), targets.reshape(-1))  # noqa: E731
        out.append(("tinylm", tinylm.TinyLM(), tokens, loss))
        # the same architecture twice as wide (2 blocks, d 512, MLP 2048): GEMM work grows with
        # the width squared, quantizer work with the width
        wide = tinylm.TinyLM(n_layer=2, d_model=512, n_head=8, d_ff=2048)
        out.append(("tinylm d512", wide, tokens, loss))
    except Exception as exc:  # the optional model is missing or does not build
        print(f"tinylm skipped: {type(exc).__name__}: {exc}")
    return out


def _stepper(gm: torch.nn.Module, batch: torch.Tensor, loss_fn):
    """A function running one training step of ``gm`` (its own AdamW) and returning its seconds."""
    gm.train()
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(gm(batch)).backward()
        opt.step()
        return time.perf_counter() - start

    return step


def _time_interleaved(graphs: list, batch: torch.Tensor, loss_fn, warmup: int, steps: int) -> list[list[float]]:
    """Step times of each graph, one step of each in turn (``warmup`` rounds untimed)."""
    steppers = [_stepper(g, batch, loss_fn) for g in graphs]
    times: list[list[float]] = [[] for _ in graphs]
    for i in range(warmup + steps):
        for stepper, samples in zip(steppers, times):
            t = stepper()
            if i >= warmup:
                samples.append(t)
    return times


def _paired(times: list[float], ref_times: list[float]) -> str:
    """Median and 10th-90th percentile of the ratios of interleaved steps, step by step."""
    ratios = sorted(t / r for t, r in zip(times, ref_times))
    at = lambda q: ratios[min(len(ratios) - 1, int(q * len(ratios)))]
    return f"{statistics.median(ratios):.2f} [{at(0.1):.2f}–{at(0.9):.2f}]"


def _qat_graph(model, batch, recipe: str):
    gm = qgraph.capture(model, (batch[:4],))
    rules = tensorrt.RULES[recipe]
    calib = [batch[:8]]
    Sequential(
        [FoldBatchNorm(), Annotate(rules, fallback=True), InsertObservers("max"), Calibrate(calib), InsertFakeQuant()]
    )(gm)
    return gm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--recipes", default="int8,fp8,nvfp4")
    parser.add_argument("--out", default=str(HERE / "results_qat_step.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows, raw = [], {}
    for name, model, batch, loss_fn in _models():
        fp32 = qgraph.capture(model, (batch[:4],))
        FoldBatchNorm()(fp32)  # the same folded graph QAT trains
        compiled_fp32 = torch.compile(fp32)
        start = time.perf_counter()
        _stepper(compiled_fp32, batch, loss_fn)()  # compiles
        first = time.perf_counter() - start
        base, graph_base = _time_interleaved([fp32, compiled_fp32], batch, loss_fn, args.warmup, args.steps)
        raw[f"{name}/fp32"] = base
        raw[f"{name}/fp32/graph compiled"] = {"first_step": first, "steps": graph_base}
        base_ms, graph_base_ms = 1e3 * statistics.median(base), 1e3 * statistics.median(graph_base)
        rows.append((name, "fp32", base_ms, 1.0, ""))
        rows.append((name, "fp32 (graph compiled)", graph_base_ms, graph_base_ms / base_ms, _paired(graph_base, base)))
        for recipe in args.recipes.split(","):
            try:
                qat = _qat_graph(model, batch, recipe)
            except qgraph.QGraphError as exc:
                rows.append((name, recipe, float("nan"), float("nan"), ""))
                print(f"{name} {recipe}: {exc}")
                continue
            for kernels in ("eager", "compiled", "graph"):
                previous = qops.use_compiled_kernels(kernels == "compiled")
                graph = torch.compile(qat) if kernels == "graph" else qat
                reference = compiled_fp32 if kernels == "graph" else fp32
                try:
                    start = time.perf_counter()
                    _stepper(graph, batch, loss_fn)()  # compiles, when compiled
                    first = time.perf_counter() - start
                    ref_times, times = _time_interleaved([reference, graph], batch, loss_fn, args.warmup, args.steps)
                finally:
                    qops.use_compiled_kernels(previous)
                raw[f"{name}/{recipe}/{kernels}"] = {"first_step": first, "steps": times, "reference_steps": ref_times}
                ms, ref_ms = 1e3 * statistics.median(times), 1e3 * statistics.median(ref_times)
                label = "graph compiled" if kernels == "graph" else f"{kernels} kernels"
                rows.append((name, f"{recipe} ({label})", ms, ms / ref_ms, _paired(times, ref_times)))
                print(f"{name} {recipe} {label}: {ms:.1f} ms, {ms / ref_ms:.2f}x the interleaved fp32"
                      f"{' graph compiled' if kernels == 'graph' else ''} step ({ref_ms:.1f} ms), "
                      f"first step {first:.1f} s", flush=True)
    print("\n| model | graph | step ms (median) | × the interleaved FP32 step (graph compiled rows: FP32 graph compiled) | step-by-step ratio: median [10th–90th percentile] |\n|---|---|---|---|---|")
    for name, graph, ms, ratio, paired in rows:
        print(f"| {name} | {graph} | {ms:.1f} | {ratio:.2f} | {paired} |")
    Path(args.out).write_text(
        json.dumps(
            {
                "command": " ".join(sys.argv),
                "torch": torch.__version__,
                "python": platform.python_version(),
                "cpu": cpu_name(),
                "threads": 1,
                "rows": rows,
                "step_seconds": raw,
            },
            indent=1,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
