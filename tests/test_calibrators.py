"""AbsHistogram (exact streaming histogram of |x|) and compute_amax (max/percentile/mse/entropy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qgraph import QGraphError
from qgraph.calibrators import CALIBRATORS, AbsHistogram, compute_amax


def _numpy_hist(values: np.ndarray, width: float, nbins: int) -> np.ndarray:
    """Reference: bin i holds |x| in [i*width, (i+1)*width) (floor binning), counted by numpy."""
    a = np.abs(values.astype(np.float32)).astype(np.float64)
    counts, _ = np.histogram(a, bins=np.arange(nbins + 1, dtype=np.float64) * width)
    return counts.astype(np.float64)


def _trim(counts: np.ndarray) -> np.ndarray:
    nz = np.flatnonzero(counts)
    return counts[: nz[-1] + 1] if nz.size else counts[:0]


def _coarsen(counts: np.ndarray, width: float, target: float) -> np.ndarray:
    """Merge adjacent bins pairwise until the bin width is ``target`` (both powers of two)."""
    while width < target:
        if counts.size % 2:
            counts = np.append(counts, 0.0)
        counts = counts.reshape(-1, 2).sum(1)
        width *= 2
    assert width == target
    return counts


def _at_width(hist: AbsHistogram, width: float) -> np.ndarray:
    counts, w = hist.state()
    return _trim(_coarsen(counts, w, width))


def _hist_of(*batches: np.ndarray, bins: int = 64) -> AbsHistogram:
    h = AbsHistogram(bins)
    for b in batches:
        h.update(torch.from_numpy(np.asarray(b, dtype=np.float32)))
    return h


# --- AbsHistogram -----------------------------------------------------------------------------


def test_counts_match_numpy_histogram():
    rng = np.random.default_rng(0)
    data = rng.normal(0.0, 3.0, size=(64, 50)).astype(np.float32)
    h = AbsHistogram(bins=128)
    h.update(torch.from_numpy(data))
    counts, width = h.state()
    # width is the power of two that covers max|x| with ~bins bins
    assert width == 2.0 ** np.ceil(np.log2(np.abs(data).max() / 128))
    np.testing.assert_array_equal(counts, _trim(_numpy_hist(data, width, counts.size)))
    assert counts.sum() == data.size == h.total
    assert h.amax == pytest.approx(float(np.abs(data).max()), abs=0.0)


def test_known_small_data_exact_bins():
    # bins=4, max 3.5 -> width 1: |x| in [0,1): 0, 0.5, -0.9 ; [1,2): 1 ; [2,3): -2.5 ; [3,4): 3.5
    h = AbsHistogram(bins=4)
    h.update(torch.tensor([0.0, 0.5, -0.9, 1.0, -2.5, 3.5]))
    counts, width = h.state()
    assert width == 1.0
    np.testing.assert_array_equal(counts, [3, 1, 1, 1])


def test_growth_keeps_total_amax_and_exact_counts():
    rng = np.random.default_rng(1)
    small = rng.normal(0.0, 1.0, 5000).astype(np.float32)
    big = (100.0 * rng.normal(0.0, 1.0, 5000)).astype(np.float32)
    h = AbsHistogram(bins=256)
    h.update(torch.from_numpy(small))
    w0 = h.state()[1]
    h.update(torch.from_numpy(big))
    counts, width = h.state()
    assert width > w0  # the later, 100x larger batch forced pairwise merges
    assert h.counts.numel() <= 2 * h.bins  # memory stays bounded
    assert h.total == counts.sum() == small.size + big.size
    assert h.amax == float(np.abs(np.concatenate([small, big])).max())
    both = np.concatenate([small, big])
    np.testing.assert_array_equal(counts, _trim(_numpy_hist(both, width, counts.size)))


def test_value_on_top_edge_then_growth_is_binned_by_floor():
    # bins=8: [1.0] alone gets width 1/4 (1/8 would need a 9th bin for the top edge); after [3.0]
    # widens the bins to 1/2, 1.0 must be in bin 2 = floor(1.0 / 0.5), as numpy puts it.
    h = _hist_of([1.0], [3.0], bins=8)
    counts, width = h.state()
    assert width == 0.5
    assert counts[2] == 1 and counts[6] == 1 and counts.sum() == 2
    ref = _numpy_hist(np.array([1.0, 3.0]), width, counts.size)
    np.testing.assert_array_equal(counts, _trim(ref))


def test_zeros_only_then_data():
    h = AbsHistogram(bins=16)
    h.update(torch.zeros(7))
    assert h.width is None and h.total == 7 and h.amax == 0.0
    h.update(torch.tensor([0.0, 1.0, -3.0]))
    counts, width = h.state()
    assert h.total == 10 == counts.sum()
    assert counts[0] == 8  # the 7 early zeros and the new one land in the first bin
    assert h.amax == 3.0
    np.testing.assert_array_equal(
        counts, _trim(_numpy_hist(np.array([0.0] * 8 + [1.0, -3.0]), width, counts.size))
    )


def test_merge_equals_concatenation_and_is_order_independent():
    rng = np.random.default_rng(2)
    a = rng.normal(0.0, 1.0, 3000).astype(np.float32)
    b = rng.normal(0.0, 50.0, 2000).astype(np.float32)
    ab, ba = _hist_of(a), _hist_of(b)
    ab.merge(_hist_of(b))
    ba.merge(_hist_of(a))
    concat = _hist_of(np.concatenate([a, b]))
    # order independent: bit-identical state
    np.testing.assert_array_equal(ab.state()[0], ba.state()[0])
    assert ab.state()[1] == ba.state()[1]
    assert ab.total == ba.total == concat.total == a.size + b.size
    assert ab.amax == ba.amax == concat.amax
    width = max(ab.state()[1], concat.state()[1])
    np.testing.assert_array_equal(_at_width(ab, width), _at_width(concat, width))


def test_merge_with_empty_and_zero_histograms():
    data = np.array([0.25, -1.0, 2.0], dtype=np.float32)
    zeros = AbsHistogram(16)
    zeros.update(torch.zeros(4))
    h = AbsHistogram(16)
    h.merge(zeros)  # empty <- zeros only
    h.merge(AbsHistogram(16))  # <- nothing at all
    h.merge(_hist_of(data, bins=16))  # zeros-only <- data
    ref = _hist_of(np.zeros(4), data, bins=16)
    np.testing.assert_array_equal(h.state()[0], ref.state()[0])
    assert h.state()[1] == ref.state()[1]
    assert h.total == 7 and h.amax == 2.0


_values = st.lists(
    st.one_of(
        st.just(0.0),
        st.floats(-1e4, 1e4, allow_nan=False, allow_subnormal=False, width=32),
        st.integers(-64, 64).map(float),  # values on bin edges
        st.integers(-8, 8).map(lambda e: 2.0**e),  # exactly at a power-of-two bin boundary
    ),
    min_size=0,
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(batches=st.lists(_values, min_size=1, max_size=4), split=st.integers(0, 4))
@example(batches=[[1.0], [3.0]], split=1)  # a batch's max on its top bin edge, then growth
def test_property_merge_equals_concatenation(batches, split):
    """Histograms of parts, merged in any grouping, equal the histogram of all the data."""
    split = min(split, len(batches))
    left = _hist_of(*batches[:split], bins=8)
    right = _hist_of(*batches[split:], bins=8)
    merged = AbsHistogram(8)
    merged.merge(left)
    merged.merge(right)
    flat = np.array([v for b in batches for v in b], dtype=np.float32)
    concat = _hist_of(flat, bins=8)
    assert merged.total == concat.total == flat.size
    assert merged.amax == concat.amax
    if merged.width is None or concat.width is None:  # no non-zero value anywhere
        assert merged.width is None and concat.width is None
        assert merged.zeros == concat.zeros == flat.size
        return
    width = max(merged.state()[1], concat.state()[1])
    np.testing.assert_array_equal(_at_width(merged, width), _at_width(concat, width))
    # and both agree with numpy's floor binning at their own width
    for h in (merged, concat):
        counts, w = h.state()
        np.testing.assert_array_equal(counts, _trim(_numpy_hist(flat, w, counts.size)))


def test_nan_and_inf_raise():
    for bad in (float("nan"), float("inf"), -float("inf")):
        h = AbsHistogram()
        with pytest.raises(QGraphError, match="non-finite"):
            h.update(torch.tensor([1.0, bad, 2.0]))
        assert h.total == 0  # the bad batch was not counted


# --- compute_amax -----------------------------------------------------------------------------


def _gauss(n: int = 200_000, seed: int = 3) -> tuple[np.ndarray, AbsHistogram]:
    x = np.random.default_rng(seed).normal(0.0, 1.0, n).astype(np.float32)
    return x, _hist_of(x, bins=2048)


def test_max_is_true_max():
    x, h = _gauss()
    assert compute_amax(h, "max") == float(np.abs(x).max())


def test_percentile_100_is_max():
    x, h = _gauss()
    assert compute_amax(h, "percentile", percentile=100.0) == float(np.abs(x).max())


@pytest.mark.parametrize("pct", [50.0, 99.0, 99.9])
def test_percentile_within_one_bin_of_numpy(pct):
    x, h = _gauss()
    width = h.state()[1]
    ref = float(np.percentile(np.abs(x), pct))
    got = compute_amax(h, "percentile", percentile=pct)
    # the calibrator returns the upper edge of the bin holding the percentile
    assert ref <= got + 1e-12
    assert abs(got - ref) <= width, (got, ref, width)


@pytest.mark.parametrize("calibrator", ["mse", "entropy"])
def test_mse_and_entropy_clip_outliers(calibrator):
    """N(0, 1) data with three outliers near 50: the threshold lands between 2 sigma and max/2.

    (For MSE, clipping pays only when the outliers are rare enough: with 1e6 values and 3
    outliers the optimum is near 16; the bounds below leave wide margins on both sides.)
    """
    rng = np.random.default_rng(4)
    x = rng.normal(0.0, 1.0, 1_000_000).astype(np.float32)
    x[:3] = [50.0, -45.0, 48.0]
    h = _hist_of(x, bins=2048)
    amax = compute_amax(h, calibrator)
    assert 2.0 < amax < 25.0, amax


@pytest.mark.parametrize("calibrator", ["mse", "entropy"])
def test_mse_and_entropy_keep_most_of_a_clean_gaussian(calibrator):
    _, h = _gauss()
    amax = compute_amax(h, calibrator)
    assert 2.5 < amax <= h.amax, amax


def test_entropy_ignores_exact_zeros():
    """Zeros quantize exactly under any scale, so they must not move the entropy threshold."""
    x, h = _gauss(100_000, seed=5)
    with_zeros = _hist_of(x, np.zeros(300_000, dtype=np.float32), bins=2048)
    assert compute_amax(with_zeros, "entropy") == compute_amax(h, "entropy")


def test_entropy_on_relu_output_keeps_the_gaussian_tail():
    # relu(N(0, 1)): half exact zeros. The threshold must stay well beyond 3 sigma, as for |N(0, 1)|
    # (the zero spike in bin 0 used to drag it down to 2.0).
    x = np.maximum(np.random.default_rng(6).normal(0.0, 1.0, 200_000), 0.0).astype(np.float32)
    amax = compute_amax(_hist_of(x, bins=2048), "entropy")
    assert 3.5 < amax <= float(x.max()), amax


def test_every_calibrator_bounded_by_max():
    x, h = _gauss(5000)
    for name in CALIBRATORS:
        assert 0.0 < compute_amax(h, name) <= float(np.abs(x).max())


def test_no_data_raises():
    with pytest.raises(QGraphError, match="no data"):
        compute_amax(AbsHistogram(), "max")


@pytest.mark.parametrize("calibrator", CALIBRATORS)
def test_zero_range_raises(calibrator):
    h = AbsHistogram()
    h.update(torch.zeros(10))
    with pytest.raises(QGraphError, match="only zeros"):
        compute_amax(h, calibrator)


def test_unknown_calibrator_raises():
    _, h = _gauss(100)
    with pytest.raises(QGraphError, match="unknown calibrator 'minmax'"):
        compute_amax(h, "minmax")


def test_width_does_not_depend_on_batch_order():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal(1000) * 0.01, rng.standard_normal(1000) * 10
    forward, backward = _hist_of(a, b, bins=256), _hist_of(b, a, bins=256)
    assert forward.state()[1] == backward.state()[1]
    np.testing.assert_array_equal(forward.state()[0], backward.state()[0])
    for calibrator in ("percentile", "mse", "entropy"):
        assert compute_amax(forward, calibrator) == compute_amax(backward, calibrator)


def test_subnormal_values_are_binned():
    h = AbsHistogram(bins=64)
    h.update(torch.tensor([1e-44, -2e-44, 3e-45]))
    assert h.total == 3 and h.state()[0].sum() == 3


def _entropy_by_definition(counts: np.ndarray, width: float) -> float:
    """The entropy threshold computed threshold by threshold, straight from its definition."""
    from qgraph.calibrators import _candidates

    c = counts.astype(np.float64).copy()
    c[0] = c[1]
    best, best_kl = c.size, np.inf
    for i in _candidates(c.size, 128):
        ref = c[:i].copy()
        ref[-1] += c[i:].sum()
        chunk = (np.arange(i) * 128) // i
        nonzero = c[:i] > 0
        sums = np.bincount(chunk, weights=c[:i], minlength=128)
        filled = np.bincount(chunk, weights=nonzero, minlength=128)
        q = np.where(nonzero, sums[chunk] / np.maximum(filled[chunk], 1), 0.0)
        if q.sum() == 0:
            continue
        p, q = ref / ref.sum(), q / q.sum()
        mask = p > 0
        q = np.where(mask & (q == 0), 1e-12, q)
        kl = float(np.sum(p[mask] * np.log(p[mask] / q[mask])))
        if kl < best_kl:
            best, best_kl = int(i), kl
    return best * width


def test_entropy_closed_form_matches_the_definition():
    """The prefix-sum form picks the same threshold as the bin-by-bin KL on varied histograms
    (smooth, heavy-tailed, sparse, noisy; 129 to 2048 bins)."""
    from qgraph.calibrators import _entropy

    rng = np.random.default_rng(1)
    for t in range(120):
        n = int(rng.integers(129, 2049))
        kind = t % 4
        if kind == 0:
            c = rng.poisson(rng.exponential(50, n)).astype(float)
        elif kind == 1:
            c = np.floor(1e5 * np.exp(-np.arange(n) / rng.uniform(20, 400)))
        elif kind == 2:
            c = np.floor(1e7 * np.exp(-((np.arange(n) / rng.uniform(50, 500)) ** 2)))
        else:
            c = np.zeros(n)
            c[rng.integers(0, n, 3)] = rng.integers(1, 100, 3)
        c[-1] = max(c[-1], 1)
        assert _entropy(c, 0.01) == _entropy_by_definition(c, 0.01), (t, n, kind)


def test_numpy_and_torch_inputs_give_the_same_histogram():
    """onnxruntime's outputs (numpy, binned by numpy in chunks) and torch tensors fill the same
    bins, subnormal-scale data and arrays of several chunks included."""
    from qgraph.calibrators import _CHUNK

    rng = np.random.default_rng(0)
    for t in range(100):
        scale = float(rng.choice([1e-39, 1e-3, 1.0, 1e3]))
        sizes = rng.integers(1, 5000, 3) if t % 10 else rng.integers(_CHUNK - 1, 3 * _CHUNK + 2, 3)
        parts = [(rng.standard_normal(int(n)) * scale).astype(np.float32) for n in sizes]
        a, b = AbsHistogram(64), AbsHistogram(64)
        for p in parts:
            a.update(p)
            b.update(torch.from_numpy(p))
        assert (a.width, a.total, a.amax) == (b.width, b.total, b.amax), t
        assert torch.equal(a.counts, b.counts), t


def test_float16_numpy_arrays_are_binned_as_float32():
    """A float16 model's onnxruntime outputs (numpy float16) give the bins of their float32 values."""
    x = (np.random.default_rng(0).standard_normal(150_000) * 30).astype(np.float16)
    a, b = AbsHistogram(256), AbsHistogram(256)
    a.update(x)
    b.update(torch.from_numpy(x.astype(np.float32)))
    assert (a.width, a.total, a.amax) == (b.width, b.total, b.amax)
    assert torch.equal(a.counts, b.counts)


@pytest.mark.parametrize(
    "values", [np.array([-128, 5, 3], np.int8), np.array([-32768, 7], np.int16), np.array([2**25 - 1, 3], np.int32)]
)
def test_integer_numpy_arrays_are_binned_as_float32(values):
    """Integer arrays: |x| of a signed minimum does not wrap, and values past 2^24 stay in range."""
    a, b = AbsHistogram(2048), AbsHistogram(2048)
    a.update(values)
    b.update(torch.from_numpy(values.astype(np.float32)))
    assert (a.width, a.total, a.amax) == (b.width, b.total, b.amax)
    assert torch.equal(a.counts, b.counts)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tensors_are_binned_as_float32(dtype):
    """float16/bfloat16 activations (half models, either door) give the bins of their float32 values."""
    x = torch.randn(70_000, generator=torch.Generator().manual_seed(0)).to(dtype)
    a, b = AbsHistogram(256), AbsHistogram(256)
    a.update(x)
    b.update(x.float())
    assert (a.width, a.total, a.amax) == (b.width, b.total, b.amax)
    assert torch.equal(a.counts, b.counts)


def _mse_brute_force(counts: np.ndarray, width: float, cand: np.ndarray) -> np.ndarray:
    """Squared error of every candidate threshold (in bins), each bin quantized at its centre."""
    centers = (np.arange(counts.size) + 0.5) * width
    scale = cand[:, None] * width / 127.0
    deq = np.clip(np.rint(centers[None, :] / scale), 0, 127) * scale
    return ((centers[None, :] - deq) ** 2 * counts[None, :]).sum(1)


@pytest.mark.parametrize("seed", range(4))
def test_mse_closed_form_picks_a_brute_force_minimum(seed):
    """The prefix-sum MSE picks a threshold whose directly computed error is the minimum over the
    same candidates (to 1e-9 relative: near-equal errors may pick a neighbouring candidate)."""
    from qgraph.calibrators import _candidates

    rng = np.random.default_rng(seed)
    data = [rng.normal(0, 1, 50_000), rng.standard_t(2, 50_000), np.maximum(rng.normal(0, 1, 50_000), 0),
            np.concatenate([rng.normal(0, 0.01, 50_000), [30.0]])][seed]
    counts, width = _hist_of(data.astype(np.float32), bins=2048).state()
    amax = compute_amax(_hist_of(data.astype(np.float32), bins=2048), "mse")
    cand = _candidates(counts.size, max(1, counts.size // 64))
    err = _mse_brute_force(counts, width, cand)
    chosen = _mse_brute_force(counts, width, np.array([round(amax / width)]))[0]
    assert chosen <= err.min() * (1 + 1e-9), (chosen, err.min())


@pytest.mark.parametrize("calibrator", ["percentile", "mse", "entropy"])
@pytest.mark.parametrize("exponent", [-120, -30, 40])
def test_thresholds_scale_with_the_data(calibrator, exponent):
    """Data scaled by a power of two (exact in float32) gets the threshold scaled alike: the
    calibrators compare errors relative to the data, not in absolute units."""
    x = np.random.default_rng(8).normal(0.0, 1.0, 100_000).astype(np.float32)
    scale = np.float32(2.0**exponent)
    base = compute_amax(_hist_of(x, bins=2048), calibrator)
    assert compute_amax(_hist_of(x * scale, bins=2048), calibrator) == base * float(scale)
