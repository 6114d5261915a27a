"""Range calibrators over a streaming histogram of |x|: max, percentile, MSE and entropy.

:class:`AbsHistogram` keeps counts of ``|x|`` in bins whose width is a power of two. When a
batch exceeds the covered range, adjacent bins are merged in pairs and the width doubles, so the
histogram stays exact (no re-binning error), its memory stays bounded (at most ``bins``
counters), and two histograms — from two batches or two processes — merge exactly and in any order.
:func:`all_reduce_histograms` merges them across the ranks of a torch.distributed job.

Calibrators turn the histogram into an ``amax`` (the clipping threshold of a symmetric range):

* ``max``: the largest |x| seen.
* ``percentile``: the smallest bin edge below which ``percentile`` % of the values lie (99.99 by
  default).
* ``mse``: the threshold minimising the expected squared quantization error of the histogram.
* ``entropy``: TensorRT's classic method: the threshold minimising KL(P ‖ Q) between the clipped
  reference distribution P and its 128-level quantized version Q (over 128..n bins).
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

from qgraph._errors import QGraphError

__all__ = ["AbsHistogram", "CALIBRATORS", "compute_amax", "all_reduce_histograms"]

#: Calibrator names accepted by ``InsertObservers`` and ``--calibrator``.
CALIBRATORS = ("max", "percentile", "mse", "entropy")

_QUANT_LEVELS = 128  # |x| maps to codes 0..127 under symmetric int8
# numpy arrays (onnxruntime's outputs) up to this many values are binned by numpy in chunks that
# stay in cache: no thread-pool wake-up and no page faults on fresh scratch buffers, which cost a
# fresh process more than the binning itself; larger ones go to torch's multi-threaded passes
_NUMPY_LIMIT = 1 << 22
_CHUNK = 1 << 16
_MAX_CANDIDATES = 512
_BLOCK = 128  # entropy candidates per block


class AbsHistogram:
    """Exact streaming histogram of |x| with power-of-two bin width.

    Args:
        bins: target resolution; the histogram holds between ``bins/2`` and ``bins`` bins
            once it has seen data (bin width: the smallest power of two >= max|x| / bins).
        track_counts: False keeps only max|x| and the count (all the ``max`` calibrator reads):
            two reductions per batch instead of a histogram pass (MiniLM calibration: 6.0 → 2.9 s).
    """

    def __init__(self, bins: int = 2048, track_counts: bool = True) -> None:
        self.bins = bins
        self.track_counts = track_counts
        self.width: float | None = None
        self.counts = torch.zeros(0, dtype=torch.int64)
        self.zeros = 0  # zeros seen before any non-zero value fixed the width
        self.amax = 0.0
        self.total = 0

    def _grow(self, needed: int) -> None:
        counts = self.counts
        # the same criterion as the first width (m / width <= bins), so the width is a function of
        # the running max alone and does not depend on the order the batches came in
        while needed > self.bins:
            if counts.numel() % 2:
                counts = torch.cat([counts, counts.new_zeros(1)])
            counts = counts.view(-1, 2).sum(1)
            self.width *= 2
            needed = (needed + 1) // 2  # integers: a float division loses the +1 of huge counts
        if counts.numel() < needed:
            counts = torch.cat([counts, counts.new_zeros(needed - counts.numel())])
        self.counts = counts

    def update(self, x: torch.Tensor | np.ndarray) -> None:
        """Add the values of ``x`` (a tensor or numpy array, any shape). NaN/Inf raise QGraphError.

        float32 and float16 numpy arrays of up to 4 M values (onnxruntime's outputs) are counted
        with numpy, other and larger data and tensors with torch (multi-threaded); both compute the
        same bins.
        """
        if not self.track_counts:
            self._update_max(x.detach() if isinstance(x, torch.Tensor) else x)
            return
        # float32/float16 only: |x| of a signed integer minimum wraps in its own type, and integers
        # above 2^24 round up in float32 past the last bin; the torch path widens first
        if isinstance(x, np.ndarray) and x.size <= _NUMPY_LIMIT and x.dtype in (np.float32, np.float16):
            self._update_numpy(x.reshape(-1))
            return
        x = (x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))).reshape(-1)
        if x.dtype == torch.float32:
            a = torch.abs(x, out=_scratch(x.numel(), torch.float32))
        elif x.dtype == torch.float64:
            a = x.abs().float()
        else:  # float16/bfloat16/integers: widened into the scratch buffer first
            a = _scratch(x.numel(), torch.float32).copy_(x).abs_()
        if a.numel() == 0 or not self._see(a.numel(), float(a.max())):
            return
        if self.width < 2.0**-100:
            a = a.to(torch.float64)
        # a and idx are scratch buffers (fresh 25 MB tensors cost more in page faults than the math);
        # |x| / width is exact (a power of two) and <= the last bin, so truncation is the floor
        idx = _scratch(a.numel(), torch.int32)
        idx.copy_(a.mul_(1.0 / self.width))
        self.counts += torch.bincount(idx, minlength=self.counts.numel())

    def _see(self, n: int, m: float) -> bool:
        """Account for ``n`` values of largest magnitude ``m``; False when there is nothing to bin.

        Fixes the width on the first non-zero batch and grows the histogram to cover ``m``.
        """
        if not math.isfinite(m):
            raise QGraphError("non-finite value (NaN or Inf) reached an observer")
        self.total += n
        self.amax = max(self.amax, m)
        if m == 0.0 and self.width is None:
            self.zeros += n
            return False
        if self.width is None:
            self.width = 2.0 ** math.ceil(math.log2(m / self.bins))
            self.counts = torch.zeros(math.floor(m / self.width) + 1, dtype=torch.int64)
            if self.zeros:
                self.counts[0] += self.zeros
                self.zeros = 0
        # Bin i holds [i*width, (i+1)*width): a value on the top edge gets a bin of its own rather
        # than being clamped into the one below, so pairwise merges (here and in `merge`) stay exact.
        self._grow(math.floor(m / self.width) + 1)
        return True

    def _update_numpy(self, x: np.ndarray) -> None:
        """Bin a 1-D numpy array chunk by chunk (the same bins as the torch passes)."""
        if x.size == 0 or not self._see(x.size, max(float(x.max()), -float(x.min()))):
            return
        # float32 would underflow |x| / width for tiny widths
        dtype = np.float64 if self.width < 2.0**-100 else np.float32
        inv = dtype(1.0 / self.width)
        size = min(_CHUNK, x.size)
        buf, idx = np.empty(size, dtype), np.empty(size, np.intp)
        counts = np.zeros(self.counts.numel(), np.int64)
        for start in range(0, x.size, _CHUNK):
            chunk = x[start : start + _CHUNK]
            a, i = buf[: chunk.size], idx[: chunk.size]
            np.abs(chunk, out=a)
            np.multiply(a, inv, out=a)
            i[...] = a  # truncation is the floor: |x| / width >= 0 and exact
            counts += np.bincount(i, minlength=counts.size)
        self.counts += torch.from_numpy(counts)

    def _update_max(self, x: torch.Tensor | np.ndarray) -> None:
        n = x.size if isinstance(x, np.ndarray) else x.numel()
        if n == 0:
            return
        # no |x| temporary; numpy arrays (onnxruntime's outputs) stay numpy: for small tensors a
        # numpy reduction is ~10x cheaper than waking torch's thread pool
        m = max(float(x.max()), -float(x.min()))
        if not math.isfinite(m):
            raise QGraphError("non-finite value (NaN or Inf) reached an observer")
        self.total += n
        self.amax = max(self.amax, m)

    def merge(self, other: AbsHistogram) -> None:
        """Add another histogram's counts (exact: widths are powers of two)."""
        self.total += other.total
        self.amax = max(self.amax, other.amax)
        if other.width is None:
            self._add_zeros(other.zeros)
            return
        if self.width is None:
            zeros = self.zeros
            self.width, self.counts, self.zeros = other.width, other.counts.clone(), 0
            self._add_zeros(zeros)
            return
        theirs = _coarsened(other.counts, other.width, self.width)
        their_width = max(other.width, self.width)
        while self.width < their_width:
            self._grow(self.bins + 1)  # forces one pairwise merge
        self._grow(max(self.counts.numel(), theirs.numel()))
        self.counts[: theirs.numel()] += theirs

    def _add_zeros(self, n: int) -> None:
        if self.width is None:
            self.zeros += n
        elif n:
            self.counts[0] += n

    def state(self) -> tuple[np.ndarray, float]:
        """(counts as float64 with trailing empty bins trimmed, bin width)."""
        counts = self.counts.numpy().astype(np.float64)
        nonzero = np.flatnonzero(counts)
        return counts[: nonzero[-1] + 1] if nonzero.size else counts, float(self.width or 0.0)


def all_reduce_histograms(hists: list[AbsHistogram]) -> None:
    """Merge each histogram with its counterparts on every rank of torch.distributed's default group.

    Every rank passes its histograms in the same order (the same observers); afterwards each
    holds, on every rank, exactly the histogram one process would have built from all ranks'
    data: the bin width is a power of two fixed by the running max, so each rank coarsens its
    bins to the widest rank's width without error, and the counts add. Three collectives in all
    (max of the ranges, sum of the totals, sum of the bins), whatever the number of histograms;
    on the group's device (a GPU under NCCL).
    """
    from qgraph import _dist

    if not hists:
        return
    # the largest |x| and bin width per histogram (0: only zeros, or counts not tracked)
    ranges = _dist.all_reduce(torch.tensor([[h.amax, h.width or 0.0] for h in hists], dtype=torch.float64), "max")
    totals = _dist.all_reduce(torch.tensor([[h.total, h.zeros] for h in hists], dtype=torch.int64))
    parts, lengths = [], []
    for h, (amax, width), (total, zeros) in zip(hists, ranges.tolist(), totals.tolist()):
        h.amax, h.total = amax, total
        if not h.track_counts or width == 0.0:  # nothing binned anywhere yet: zeros wait for a width
            h.zeros = zeros if h.track_counts else 0
            continue
        n = math.floor(amax / width) + 1  # the bins of the merged histogram (as _see sizes them)
        if h.width is None:  # this rank saw no non-zero value: its zeros go to bin 0
            mine = torch.zeros(n, dtype=torch.int64)
            mine[0] = h.zeros
        else:
            mine = _coarsened(h.counts, h.width, width)[:n]  # bins past the max are empty
            mine = torch.cat([mine, mine.new_zeros(n - mine.numel())])
        parts.append(mine)
        lengths.append((h, width, n))
    if not parts:
        return
    merged = _dist.all_reduce(torch.cat(parts))
    for (h, width, _), counts in zip(lengths, merged.split([n for *_, n in lengths])):
        h.width, h.counts, h.zeros = width, counts.clone(), 0


def _coarsened(counts: torch.Tensor, width: float, to: float) -> torch.Tensor:
    """``counts`` of bins of ``width`` summed pairwise into bins of the power-of-two multiple ``to``."""
    while width < to:
        if counts.numel() % 2:
            counts = torch.cat([counts, counts.new_zeros(1)])
        counts, width = counts.view(-1, 2).sum(1), width * 2
    return counts


_SCRATCH = threading.local()


def _scratch(n: int, dtype: torch.dtype) -> torch.Tensor:
    """A reusable 1-D buffer of ``n`` elements (per thread and dtype; grows, never shrinks)."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < n:
        buf = buffers[dtype] = torch.empty(n, dtype=dtype)
    return buf[:n]


def _percentile(counts: np.ndarray, width: float, percentile: float) -> float:
    cdf = np.cumsum(counts)
    idx = int(np.searchsorted(cdf, cdf[-1] * percentile / 100.0))
    return (min(idx, counts.size - 1) + 1) * width


def _candidates(n: int, start: int) -> np.ndarray:
    start = min(start, n)
    stride = max(1, math.ceil((n - start + 1) / _MAX_CANDIDATES))
    return np.arange(start, n + 1, stride)


_ODD = 2 * np.arange(1, _QUANT_LEVELS) - 1  # 2k - 1 for the levels k = 1..127


def _mse(counts: np.ndarray, width: float) -> float:
    """The threshold whose symmetric 127-level grid gives the smallest squared error.

    Every bin stands for its centre ``c``; under a threshold of ``t`` bins (step ``s = t w / 127``)
    it dequantizes to ``k s`` with ``k = clip(round(c / s), 0, 127)``; ties (a centre exactly
    half-way between two levels) go to the upper level. Level ``k >= 1`` starts at the first bin
    whose centre reaches ``(k - 1/2) s``: bin ``b_k = ceil(((2k - 1) t - 127) / 254)``, an integer
    formula. With prefix sums ``S0``, ``S1`` of ``n`` and ``n c`` and the total ``S2`` of ``n c²``,
    the error ``sum_k S2_k - 2 k s S1_k + (k s)² S0_k`` summed by parts over the levels is

        S2 - 2 s (127 S1[n] - sum_k S1[b_k]) + s² (127² S0[n] - sum_k (2k - 1) S0[b_k])

    so a threshold costs two gathers of 127 prefix sums, for every candidate at once.
    """
    n = counts.size
    cands = _candidates(n, max(1, n // 64))
    centers = (np.arange(n) + 0.5) * width
    s0 = np.zeros(n + 1)
    s1 = np.zeros(n + 1)
    np.cumsum(counts, out=s0[1:])
    np.cumsum(counts * centers, out=s1[1:])
    s2 = float(np.dot(counts, centers * centers))
    first = (_ODD[None, :] * cands[:, None] + 126) // 254  # (candidates, 127): b_k, all <= n
    step = cands * (width / 127.0)
    err = s2 + step * (
        step * (127.0**2 * s0[n] - s0[first] @ _ODD.astype(np.float64)) - 2.0 * (127.0 * s1[n] - s1[first].sum(1))
    )
    # the first candidate at the minimum; equal errors differ by rounding, so a margin relative
    # to the error itself (squared data units: an absolute one would tie everything on tiny data)
    best = np.flatnonzero(err <= err.min() + 1e-12 * abs(err.min()))[0]
    return int(cands[best]) * width


def _entropy(counts: np.ndarray, width: float) -> float:
    """TensorRT's entropy calibration: the threshold ``i`` bins whose KL(P ‖ Q) is smallest.

    For a threshold of ``i`` bins: P is the histogram below it with everything above added to
    bin ``i - 1`` (clipped values), Q spreads each of 128 chunks' mass evenly over the chunk's
    non-empty bins (chunk ``k`` = bins ``[ceil(k i / 128), ceil((k + 1) i / 128))``), both
    normalised. With ``S_k``, ``N_k`` a chunk's mass and non-empty bins, ``T`` the total and
    ``C`` the mass below ``i``, every bin ``j < i - 1`` with ``c_j > 0`` contributes
    ``c_j/T · log(c_j C N_k / (T S_k))``, so the sum over them is prefix sums of ``c``,
    ``c log c`` and per-chunk terms: O(128) per threshold instead of O(i), for every threshold at
    once. Bin ``i - 1`` (holding the clipped mass) is added on its own; where P has mass and Q
    none, Q is smoothed to 1e-12.
    """
    n = counts.size
    if n <= _QUANT_LEVELS:
        return n * width
    # Exact zeros (ReLU outputs) are exact under every scale, but a spike in bin 0 dominates the
    # KL and drags the threshold down (to ~2 sigma on relu(N(0,1))). Like pytorch-quantization,
    # let bin 0 count as its neighbour so the zeros do not vote.
    c = counts.astype(np.float64)  # a copy
    c[0] = c[1]
    cands = _candidates(n, _QUANT_LEVELS)
    mass = np.zeros(n + 1)  # mass[j]: sum of c below bin j
    filled = np.zeros(n + 1)
    clogc = np.zeros(n + 1)
    np.cumsum(c, out=mass[1:])
    np.cumsum(c > 0, out=filled[1:])
    np.cumsum(c * np.log(np.where(c > 0, c, 1.0)), out=clogc[1:])
    total = mass[-1]
    # candidates in blocks: (block, 128) temporaries stay small enough for the allocator to reuse
    # (fresh ones of every candidate cost more in page faults than the arithmetic on them)
    per_chunk = np.empty(cands.size)
    s_last = np.empty(cands.size)
    nk_last = np.empty(cands.size)
    levels = np.arange(_QUANT_LEVELS + 1)[None, :]
    s_buf, nk_buf = np.empty((_BLOCK, _QUANT_LEVELS)), np.empty((_BLOCK, _QUANT_LEVELS))
    for lo in range(0, cands.size, _BLOCK):
        block = cands[lo : lo + _BLOCK]
        s, nk = s_buf[: block.size], nk_buf[: block.size]
        bounds = (levels * block[:, None] + _QUANT_LEVELS - 1) >> 7  # // 128
        edges = mass[bounds]
        np.subtract(edges[:, 1:], edges[:, :-1], out=s)  # chunk masses S_k
        np.take(filled, bounds, out=edges)
        np.subtract(edges[:, 1:], edges[:, :-1], out=nk)  # non-empty bins N_k
        s_last[lo : lo + _BLOCK], nk_last[lo : lo + _BLOCK] = s[:, -1], nk[:, -1]
        d = edges[:, 1:]
        np.copyto(d, s)
        d[:, -1] -= c[block - 1]  # the chunk masses without bin i - 1 (always in the last chunk)
        # sum over chunks of d log(N_k / S_k); d > 0 implies S_k > 0 and N_k >= 1 (d = 0 adds 0)
        np.maximum(nk, 1.0, out=nk)
        np.maximum(s, 1e-300, out=s)
        np.divide(nk, s, out=nk)
        np.log(nk, out=nk)
        np.multiply(nk, d, out=nk).sum(1, out=per_chunk[lo : lo + _BLOCK])
    last = c[cands - 1]
    below = mass[cands]
    safe_below = np.where(below > 0, below, 1.0)
    kl = (clogc[cands - 1] - (math.log(total) - np.log(safe_below)) * mass[cands - 1] + per_chunk) / total
    p_last = (last + total - below) / total
    q_last = np.where(last > 0, s_last / (np.maximum(nk_last, 1) * safe_below), 1e-12)
    kl += np.where(p_last > 0, p_last * np.log(np.where(p_last > 0, p_last, 1.0) / q_last), 0.0)
    kl = np.where(below > 0, kl, np.inf)  # no mass below the threshold: no Q
    if not np.isfinite(kl).any():
        return n * width
    # the first threshold at the minimum: equal KLs (sparse histograms) differ here by rounding
    best = np.flatnonzero(kl <= kl.min() + 1e-12 * max(1.0, abs(kl.min())))[0]
    return int(cands[best]) * width


def compute_amax(hist: AbsHistogram, calibrator: str, percentile: float = 99.99) -> float:
    """The clipping threshold chosen by ``calibrator`` for the data in ``hist``.

    Raises:
        QGraphError: no data, or only zeros (a zero range has no scale).
    """
    if hist.total == 0:
        raise QGraphError("observer saw no data")
    if hist.amax == 0.0:
        raise QGraphError("observer saw only zeros (zero range: no scale can be derived)")
    if calibrator == "max":
        return hist.amax
    counts, width = hist.state()
    if calibrator == "percentile":
        amax = _percentile(counts, width, percentile)
    elif calibrator == "mse":
        amax = _mse(counts, width)
    elif calibrator == "entropy":
        amax = _entropy(counts, width)
    else:
        raise QGraphError(f"unknown calibrator {calibrator!r} (known: {', '.join(CALIBRATORS)})")
    return min(amax, hist.amax)
