"""Fake-quant throughput per numeric format, against the memory-bandwidth limit of the machine.

Every quantizer qgraph puts into a graph runs one of three custom ops (``torch.ops.qgraph.fake_quant``
for INT8, ``fake_quant_fmt`` for static FP8/INT4/NVFP4, ``fake_quant_dynamic`` for run-time NVFP4
and MX block scales). This script times each of them on one 4096x4096 float32 tensor
(``torch.randn``, seed 0), with its scales computed once beforehand (outside the timings, with the
:mod:`qgraph.qops` scale rules), and compares with:

* ``torch.fake_quantize_per_tensor_affine`` (torch's own INT8 fake-quant kernel), a baseline;
* ``torch.clone`` and ``y.copy_(x)`` of the same tensor: the memory-bandwidth limit. Both read and
  write every element once, which is the least any out-of-place fake-quant has to do; ``clone``
  also allocates its output, as the fake-quant ops do, so it is the limit used for the fraction.

Cases (``x`` is (4096, 4096); "axis 1" blocks run along the rows' contiguous dimension):

| case | op | scales |
|---|---|---|
| int8 per-tensor | ``fake_quant(x, s, zp, 0, -128, 127)`` | 0-d ``amax/127``, 0-d int8 zero point |
| int8 per-channel | same | (4096,) on axis 0 |
| fp8_e4m3 per-tensor | ``fake_quant_fmt(x, s, 1, 0, 0, "fp8_e4m3")`` | 0-d ``absmax_scale`` |
| fp8_e4m3 per-channel | same, axis 0 | (4096,) ``absmax_scale(axis=0)`` |
| int4 blocked 128 | ``fake_quant_fmt(x, s, 1, 1, 128, "int4")`` | (4096, 32) ``absmax_scale(axis=1, block_size=128)`` |
| nvfp4 weight | ``fake_quant_fmt(x, s, g, 1, 16, "fp4_e2m1")`` | ``nvfp4_scales(x, axis=1, block_size=16)`` |
| nvfp4 dynamic | ``fake_quant_dynamic(x, g, 16, "fp4_e2m1", "fp8_e4m3")`` | g = ``nvfp4_global_scale(amax)``; block scales at run time |
| mxfp8 dynamic | ``fake_quant_dynamic(x, 1, 32, "fp8_e4m3", "e8m0")`` | E8M0 block scales at run time |
| nvfp4 weight scales | ``nvfp4_scales(x, axis=1, block_size=16)`` (what QAT recomputes every step for a tracked weight; writes 1/16 of N) | — |
| mxfp4 dynamic | ``fake_quant_dynamic(x, 1, 32, "fp4_e2m1", "e8m0")`` | E8M0 block scales at run time |

Each case runs with ``torch.set_num_threads(1)`` and then 2 (CPU), ``--warmup`` untimed calls then
``--repeats`` timed ones (``time.perf_counter``); the median is reported. Throughput counts
``2 * 4 * N`` bytes (one float32 read and one float32 write per element, N = 4096*4096), whatever
the op does internally, so "fraction of limit" = clone time / op time; the fraction of the
``copy_`` time (no allocation, so no page faults on a fresh 64 MiB buffer) is reported beside it.
The 1-minute load average before and after is recorded: other processes on the machine skew the
numbers, the 2-thread ones most. Also recorded once per case
(untimed): the relative RMS error ``||fq(x) - x|| / ||x||``, a check that each case quantizes.
If ``torch.cuda.is_available()`` the same cases are timed on the GPU too (CUDA events, after a
synchronise); otherwise the script says so.

Results are printed as a markdown table and written to ``benchmarks/results_formats.json``
(next to this script) unless ``--out`` says otherwise.

Usage::

    .venv/bin/python benchmarks/bench_formats.py [--repeats 7] [--warmup 2] [--size 4096] [--cols N] [--compiled]

``--compiled`` times the kernels QAT trains with (:func:`qgraph.qops.use_compiled_kernels`: each
op's body fused by ``torch.compile``; the warm-up calls compile it), with grad off as in training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from _host import cpu_name
from qgraph import qops  # registers qgraph::fake_quant_fmt / fake_quant_dynamic
from qgraph import quant  # noqa: F401 - registers qgraph::fake_quant

#: Where the JSON results go by default: next to this script.
DEFAULT_OUT = Path(__file__).resolve().parent / "results_formats.json"

#: CPU thread counts every case is timed with.
THREADS = (1, 2)


def make_cases(x: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """Build one zero-argument callable per case, with all static scales precomputed.

    Args:
        x: the (rows, cols) float32 input, on the device the cases will run on.

    Returns:
        Case name → callable that returns the fake-quantized tensor (a new allocation).
    """
    dev = x.device
    ops = torch.ops.qgraph
    one = torch.ones((), dtype=torch.float32, device=dev)
    amax = x.abs().max()

    int8_s = (amax / 127.0).to(torch.float32)
    int8_zp = torch.zeros((), dtype=torch.int8, device=dev)
    int8_sc = (x.abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(torch.float32)
    int8_zpc = torch.zeros(x.shape[0], dtype=torch.int8, device=dev)

    fp8_s = qops.absmax_scale(x, "fp8_e4m3")
    fp8_sc = qops.absmax_scale(x, "fp8_e4m3", axis=0)
    int4_s = qops.absmax_scale(x, "int4", axis=1, block_size=128)
    nv_bs, nv_g = qops.nvfp4_scales(x, axis=1, block_size=16)
    nv_dyn_g = qops.nvfp4_global_scale(amax)

    base_scale = float(int8_s)
    return {
        "torch.fake_quantize_per_tensor_affine (baseline)": lambda: (
            torch.fake_quantize_per_tensor_affine(x, base_scale, 0, -128, 127)
        ),
        "int8 per-tensor": lambda: ops.fake_quant(x, int8_s, int8_zp, 0, -128, 127),
        "int8 per-channel": lambda: ops.fake_quant(x, int8_sc, int8_zpc, 0, -128, 127),
        "fp8_e4m3 per-tensor": lambda: ops.fake_quant_fmt(x, fp8_s, one, 0, 0, "fp8_e4m3"),
        "fp8_e4m3 per-channel": lambda: ops.fake_quant_fmt(x, fp8_sc, one, 0, 0, "fp8_e4m3"),
        "int4 blocked 128 (axis 1)": lambda: ops.fake_quant_fmt(x, int4_s, one, 1, 128, "int4"),
        "nvfp4 weight (static, block 16)": lambda: ops.fake_quant_fmt(
            x, nv_bs, nv_g, 1, 16, "fp4_e2m1"
        ),
        "nvfp4 dynamic activation": lambda: ops.fake_quant_dynamic(
            x, nv_dyn_g, 16, "fp4_e2m1", "fp8_e4m3"
        ),
        "mxfp8 dynamic": lambda: ops.fake_quant_dynamic(x, one, 32, "fp8_e4m3", "e8m0"),
        "nvfp4 weight scales (QAT's per-step refresh)": lambda: qops.nvfp4_scales(x, axis=1, block_size=16)[0],
        "mxfp4 dynamic": lambda: ops.fake_quant_dynamic(x, one, 32, "fp4_e2m1", "e8m0"),
    }


def bandwidth_cases(x: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """The memory-bandwidth references: ``torch.clone`` and ``copy_`` into a preallocated tensor.

    Args:
        x: the input tensor.

    Returns:
        Name → zero-argument callable.
    """
    y = torch.empty_like(x)
    return {"torch.clone (limit)": lambda: torch.clone(x), "y.copy_(x)": lambda: y.copy_(x)}


def time_cpu(fn: Callable[[], torch.Tensor], warmup: int, repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones.

    Args:
        fn: the call to time.
        warmup: untimed calls first.
        repeats: timed calls.

    Returns:
        One duration (seconds) per timed call.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        del out
    return times


def time_cuda(fn: Callable[[], torch.Tensor], warmup: int, repeats: int) -> list[float]:
    """GPU seconds of ``repeats`` calls of ``fn`` (CUDA events), after ``warmup`` untimed ones.

    Args:
        fn: the call to time (its tensors on a CUDA device).
        warmup: untimed calls first.
        repeats: timed calls.

    Returns:
        One duration (seconds) per timed call.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def rel_rms_error(x: torch.Tensor, y: torch.Tensor) -> float:
    """``||y - x|| / ||x||`` in float64."""
    x64, y64 = x.double(), y.double()
    return float((y64 - x64).norm() / x64.norm())


def run_device(
    x: torch.Tensor, warmup: int, repeats: int, threads: int | None
) -> tuple[list[dict], float]:
    """Time every case and the bandwidth references on ``x``'s device.

    Args:
        x: the input tensor (CPU or CUDA).
        warmup: untimed calls per case.
        repeats: timed calls per case.
        threads: CPU intra-op threads to set (None on CUDA).

    Returns:
        ``(rows, limit_seconds)``: one dict per case (name, median/min/max ms, GB/s, fraction of
        the limit, relative RMS error) and the median time of ``torch.clone``.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    timer = time_cpu if x.device.type == "cpu" else time_cuda
    nbytes = 2 * x.element_size() * x.numel()
    cases = {**bandwidth_cases(x), **make_cases(x)}
    medians: dict[str, tuple[float, list[float]]] = {}
    for name, fn in cases.items():
        times = timer(fn, warmup, repeats)
        medians[name] = (statistics.median(times), times)
    limit = medians["torch.clone (limit)"][0]
    copy_limit = medians["y.copy_(x)"][0]
    rows = []
    for name, (med, times) in medians.items():
        err = (
            None
            if name in ("torch.clone (limit)", "y.copy_(x)") or "scales" in name  # not a quantized copy of x
            else rel_rms_error(x, cases[name]())
        )
        rows.append(
            {
                "case": name,
                "median_ms": 1e3 * med,
                "min_ms": 1e3 * min(times),
                "max_ms": 1e3 * max(times),
                "gb_per_s": nbytes / med / 1e9,
                "fraction_of_limit": limit / med,
                "fraction_of_copy": copy_limit / med,
                "rel_rms_error": err,
                "times_ms": [1e3 * t for t in times],
            }
        )
    return rows, limit


def markdown(rows_by_config: dict[str, list[dict]]) -> str:
    """One markdown table: a row per case, ms / GB/s / fraction columns per configuration.

    Args:
        rows_by_config: configuration label (``cpu 1 thread``) → rows from :func:`run_device`.

    Returns:
        The table text.
    """
    configs = list(rows_by_config)
    head = (
        "| case | rel. RMS err | "
        + " | ".join(f"{c} ms | {c} GB/s | {c} % of clone | {c} % of copy_" for c in configs)
        + " |"
    )
    sep = "|---|---|" + "---|---|---|---|" * len(configs)
    lines = [head, sep]
    names = [r["case"] for r in rows_by_config[configs[0]]]
    for name in names:
        cells = []
        err = None
        for c in configs:
            row = next(r for r in rows_by_config[c] if r["case"] == name)
            err = row["rel_rms_error"] if err is None else err
            cells.append(
                f"{row['median_ms']:.2f} | {row['gb_per_s']:.2f} | {100 * row['fraction_of_limit']:.1f}% "
                f"| {100 * row['fraction_of_copy']:.1f}%"
            )
        err_s = "—" if err is None else f"{err:.2e}"
        lines.append(f"| {name} | {err_s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON.

    Args:
        argv: command-line arguments; ``sys.argv[1:]`` when None.

    Returns:
        The process exit code.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="the tensor is size x size")
    parser.add_argument("--cols", type=int, default=None, help="size x cols instead (e.g. 2048 x 1024: an MLP input)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per case (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per case first")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument(
        "--compiled", action="store_true", help="with qgraph.qops.use_compiled_kernels() (the QAT training kernels)"
    )
    args = parser.parse_args(argv)

    gen = torch.Generator().manual_seed(0)
    cols = args.cols or args.size
    x = torch.randn(args.size, cols, generator=gen, dtype=torch.float32)
    n = x.numel()
    print(
        f"tensor ({args.size}, {cols}) float32, {n * 4 / 2**20:.0f} MiB; bytes counted per call "
        f"2*4*N = {2 * 4 * n / 1e6:.1f} MB; median of {args.repeats} after {args.warmup} warm-up"
    )
    load_before = _loadavg()
    start = time.perf_counter()
    rows_by_config: dict[str, list[dict]] = {}
    limits: dict[str, float] = {}
    initial_threads = torch.get_num_threads()
    previous_kernels = qops.use_compiled_kernels(args.compiled)
    cuda_note = None
    try:
        # in training the ops' bodies run with grad off (autograd's custom-op wrapper); with grad
        # on, a compiled kernel runs its eager body instead (kept for double backward)
        with torch.set_grad_enabled(not args.compiled):
            for t in THREADS:
                label = f"cpu {t}t"
                rows_by_config[label], limits[label] = run_device(x, args.warmup, args.repeats, t)
                print(f"  {label}: done ({time.perf_counter() - start:.1f} s)", flush=True)
            torch.set_num_threads(initial_threads)
            if torch.cuda.is_available():
                label = f"cuda ({torch.cuda.get_device_name(0)})"
                rows_by_config[label], limits[label] = run_device(x.cuda(), args.warmup, args.repeats, None)
            else:
                cuda_note = "CUDA not available (torch.cuda.is_available() is False): GPU timings skipped"
    finally:
        torch.set_num_threads(initial_threads)
        qops.use_compiled_kernels(previous_kernels)
    total = time.perf_counter() - start
    load_after = _loadavg()

    print()
    print(markdown(rows_by_config))
    print()
    for label, limit in limits.items():
        print(
            f"{label}: bandwidth limit (torch.clone) {1e3 * limit:.2f} ms = {2 * 4 * n / limit / 1e9:.2f} GB/s"
        )
    if cuda_note:
        print(cuda_note)
    print(f"load average (1 min) before {load_before}, after {load_after} ({os.cpu_count()} CPUs)")
    print(f"total {total:.1f} s")

    result = {
        "benchmark": "bench_formats",
        "command": ".venv/bin/python benchmarks/bench_formats.py" + (" --compiled" if args.compiled else ""),
        "args": {"size": args.size, "cols": cols, "repeats": args.repeats, "warmup": args.warmup, "compiled": args.compiled},
        "bytes_per_call": 2 * 4 * n,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": cpu_name(),
        "cpus": os.cpu_count(),
        "loadavg_1min": {"before": load_before, "after": load_after},
        "cuda": cuda_note or "timed",
        "limit_ms": {k: 1e3 * v for k, v in limits.items()},
        "results": rows_by_config,
        "total_s": total,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def _loadavg() -> float | None:
    """The 1-minute load average (other processes compete for the cores), None if unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
