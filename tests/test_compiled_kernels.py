"""Compiled quantizer kernels (``qgraph.qops.use_compiled_kernels``): the torch.compile'd forward
and straight-through backward of every fake-quant op give bit-identical values and gradients to
the eager kernels, special values included (ties, saturation, ±inf, NaN, subnormals, -0)."""

from __future__ import annotations

import shutil

import pytest
import torch

from qgraph import formats as fmt
from qgraph import qops
from qgraph.quant import FakeQuant, QSpec

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="inductor's CPU backend needs a C++ compiler",
)

N = qops.COMPILED_MIN_NUMEL  # large enough to take the compiled path


@pytest.fixture
def compiled():
    previous = qops.use_compiled_kernels(True)
    yield
    qops.use_compiled_kernels(previous)


def _data(shape, scale: float, seed: int = 0) -> torch.Tensor:
    """Random values over several binades, with the special values written into the first ones."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-12, 6, shape, generator=g).float())
    special = torch.tensor(
        [0.5, 1.5, 2.5, -0.5, -2.5, 127.5, -128.5, 1e9, -1e9, 5.5, 0.25, 0.75, 3.5, 1e-30, 0.0, -0.0]
    ) * scale
    flat = x.view(-1)
    flat[: special.numel()] = special
    flat[16:19] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    return x


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (so -0 differs from 0), NaN equal to NaN whatever its payload or sign."""
    a, b = a.detach().float().contiguous(), b.detach().float().contiguous()
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a.view(torch.int32)[~nan], b.view(torch.int32)[~nan])


def _run(fq: FakeQuant, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = fq(x)
    g = torch.Generator().manual_seed(1)
    y.backward(torch.randn(y.shape, generator=g).to(y.dtype))
    return y.detach(), x.grad


def _weight_spec(dtype: str, **kw) -> QSpec:
    return QSpec(dtype, "weight", kw.pop("axis", 0), **kw)


CASES = {
    "int8 per tensor": lambda: FakeQuant.for_activation(QSpec("int8", "activation", None), torch.tensor(4.0)),
    "int8 per channel": lambda: FakeQuant.for_weight(_weight_spec("int8"), _data((256, 256), 1.0, 3)),
    "uint8 affine": lambda: FakeQuant(
        QSpec("uint8", "activation", None, symmetric=False), torch.tensor(0.02), torch.tensor(100, dtype=torch.uint8)
    ),
    "fp8 per tensor": lambda: FakeQuant.for_activation(QSpec("fp8_e4m3", "activation", None), torch.tensor(4.0)),
    "fp8 e5m2 per tensor": lambda: FakeQuant.for_activation(QSpec("fp8_e5m2", "activation", None), torch.tensor(4.0)),
    "fp8 per channel": lambda: FakeQuant.for_weight(_weight_spec("fp8_e4m3"), _data((256, 256), 1.0, 7)),
    "int4 blocks": lambda: FakeQuant.for_weight(_weight_spec("int4", axis=1, block_size=128), _data((512, 256), 1.0, 4)),
    "nvfp4 weight": lambda: FakeQuant.for_weight(
        _weight_spec("fp4_e2m1", axis=1, block_size=16, scale_type="fp8_e4m3"), _data((256, 256), 1.0, 5)
    ),
    "nvfp4 activation": lambda: FakeQuant.for_activation(
        QSpec("fp4_e2m1", "activation", -1, block_size=16, scale_type="fp8_e4m3", dynamic=True), torch.tensor(4.0)
    ),
    "mxfp8 activation": lambda: FakeQuant.for_activation(
        QSpec("fp8_e4m3", "activation", -1, block_size=32, scale_type="e8m0", dynamic=True), torch.tensor(4.0)
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_kernel_bit_identical_to_eager(case, compiled):
    fq = CASES[case]()
    shape = (512, 256) if fq.spec.role == "weight" and fq.scale.dim() and fq.scale.shape[0] == 512 else (256, 256)
    x = _data(shape, float(fq.scale.reshape(-1)[0]) if fq.scale.numel() else 1.0)
    assert x.numel() >= N
    y_compiled, g_compiled = _run(fq, x)
    qops.use_compiled_kernels(False)
    y_eager, g_eager = _run(fq, x)
    assert _same(y_compiled, y_eager), case
    assert _same(g_compiled, g_eager), case
    assert (g_eager == 0).any() or fq.spec.dynamic, "the data saturate somewhere: the mask is exercised"


def test_compiled_kernel_bf16_and_strided_input(compiled):
    fq = FakeQuant.for_activation(QSpec("fp8_e4m3", "activation", None), torch.tensor(3.0))
    x = _data((128, 2, 256), 0.01).transpose(0, 2).to(torch.bfloat16)  # not contiguous
    y_compiled, g_compiled = _run(fq, x)
    qops.use_compiled_kernels(False)
    y_eager, g_eager = _run(fq, x)
    assert y_compiled.dtype == torch.bfloat16 and y_compiled.shape == x.shape
    assert y_compiled.stride() == y_eager.stride() == x.stride()  # x's layout, no copy of x
    assert _same(y_compiled, y_eager)
    assert _same(g_compiled, g_eager)


def test_small_tensors_stay_eager_and_setting_is_restored():
    previous = qops.use_compiled_kernels(True)
    try:
        assert qops.kernel(qops.round_to, N - 1) is qops.round_to
        assert qops.kernel(qops.round_to, N) is not qops.round_to
    finally:
        assert qops.use_compiled_kernels(previous) is True
    assert qops.kernel(qops.round_to, N) is qops.round_to


def test_codes_match_the_numpy_reference_when_compiled(compiled):
    """The compiled NVFP4 weight path computes what qgraph.formats computes (the ONNX codes)."""
    w = _data((256, 256), 1.0, 9)
    w = torch.nan_to_num(w, nan=0.0, posinf=1.0, neginf=-1.0)
    spec = _weight_spec("fp4_e2m1", axis=1, block_size=16, scale_type="fp8_e4m3")
    fq = FakeQuant.for_weight(spec, w)
    with torch.no_grad():
        y = fq(w)
    s = (fq.scale * fq.global_scale).numpy()
    ref = fmt.dequantize(fmt.quantize(w.numpy(), s, "fp4_e2m1", axis=1, block_size=16), s, axis=1, block_size=16)
    assert torch.equal(y, torch.from_numpy(ref))


def test_memory_order_of_transposed_and_sliced_views():
    base = torch.arange(120.0).reshape(2, 3, 4, 5)
    t = base.transpose(1, 2)
    order = qops.memory_order(t)
    assert order == (0, 2, 1, 3) and qops.permute(t, order).is_contiguous()
    assert torch.equal(qops.unpermute(qops.permute(t, order), order), t)
    assert qops.memory_order(base) is None  # contiguous already
    assert qops.memory_order(base[:, :, ::2]) is None  # not dense: the caller copies


@pytest.mark.parametrize("dtype", ["int8", "fp8_e4m3"])
def test_per_channel_on_a_transposed_tensor_keeps_its_layout(dtype, compiled):
    """A per-channel quantizer on a transposed view: the channel axis follows the permutation,
    the result has x's layout in both modes, and equals the broadcast formula."""
    x = _data((512, 256), 1.0, 7).nan_to_num(0.0, 1.0, -1.0).t()  # (256, 512), channels on axis 1
    fq = FakeQuant.for_weight(_weight_spec(dtype, axis=1), x)
    y_compiled, g_compiled = _run(fq, x)
    qops.use_compiled_kernels(False)
    y_eager, g_eager = _run(fq, x)
    assert _same(y_compiled, y_eager) and _same(g_compiled, g_eager)
    assert y_eager.stride() == y_compiled.stride() == x.stride()
    s = fq.scale.reshape(1, -1)
    expected = qops.round_to(x / s, dtype) * s
    assert _same(y_eager, expected)


def _dynamic(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.qgraph.fake_quant_dynamic(x, torch.tensor(0.01), 16, "fp4_e2m1", "fp8_e4m3")


def _blocked(x: torch.Tensor) -> torch.Tensor:
    scale = torch.full((*x.shape[:-1], -(-x.shape[-1] // 16)), 0.02)
    return torch.ops.qgraph.fake_quant_fmt(x, scale, torch.tensor(1.0), -1, 16, "fp4_e2m1", "fp8_e4m3")


def _per_tensor(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.qgraph.fake_quant(x, torch.tensor(0.02), torch.tensor(0, dtype=torch.int8), 0, -128, 127)


@pytest.mark.parametrize("kernels", ["eager", "compiled"])
@pytest.mark.parametrize("op", [_dynamic, _blocked, _per_tensor])
def test_outputs_have_the_layout_the_fake_kernels_promise(op, kernels):
    """torch.compile/export trust register_fake (empty_like: x's strides when x is dense)."""
    previous = qops.use_compiled_kernels(kernels == "compiled")
    try:
        base = _data((8, 64, 4, 32), 1.0, 11).nan_to_num(0.0, 1.0, -1.0)
        for x in (base, base.transpose(1, 2), base.transpose(0, 1), base[..., :24], base.transpose(-1, -2)):
            if op is not _per_tensor and x.shape[-1] % 16:
                continue  # the blocked op's fast path wants whole blocks; tails are covered eagerly
            y = op(x)
            assert y.shape == x.shape and y.stride() == torch.empty_like(x).stride(), (op.__name__, x.stride())
            assert _same(y, op(x.contiguous()))  # same values whatever the layout
    finally:
        qops.use_compiled_kernels(previous)


def test_dynamic_quantizer_survives_in_place_edits_and_empty_inputs(compiled):
    x = _data((256, 256), 1.0, 12).nan_to_num(0.0, 1.0, -1.0).requires_grad_(True)
    h = x * 1.0
    y = _dynamic(h)
    h.relu_()  # the op saved a mask, not h
    (y.sum() + h.sum()).backward()
    assert torch.isfinite(x.grad).all()
    assert _dynamic(torch.empty(4, 0)).shape == (4, 0)


def test_double_backward_keeps_its_graph_with_compiled_kernels(compiled):
    fq = FakeQuant.for_activation(QSpec("int8", "activation", None), torch.tensor(4.0))
    x = _data((256, 256), 0.03, 13).nan_to_num(0.0, 1.0, -1.0).requires_grad_(True)
    (g,) = torch.autograd.grad((fq(x) ** 2).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    qops.use_compiled_kernels(False)
    x2 = x.detach().clone().requires_grad_(True)
    (g2,) = torch.autograd.grad((fq(x2) ** 2).sum(), x2, create_graph=True)
    (gg2,) = torch.autograd.grad(g2.sum(), x2)
    assert _same(g, g2) and _same(gg, gg2)


@pytest.mark.parametrize("kernels", ["eager", "compiled"])
@pytest.mark.parametrize("element, block", [("int4", 128), ("fp4_e2m1", 16)])
@pytest.mark.parametrize("layout", ["contiguous", "column-major", "leading axes swapped"])
def test_blocked_ste_gradient_is_the_clipping_mask(element, block, layout, kernels):
    """Blocks on the last axis: the straight-through gradient passes exactly where ``x / s`` lies
    in the element's range (s expanded to x's size here, broadcast per block in the kernel),
    whatever x's memory layout."""
    previous = qops.use_compiled_kernels(kernels == "compiled")
    try:
        x = _data((4, 64, 512), 1.0, 6)
        if layout == "column-major":
            x = x.transpose(0, 2).contiguous().transpose(0, 2)
        elif layout == "leading axes swapped":  # attention's q.transpose(1, 2)
            x = x.transpose(0, 1).contiguous().transpose(0, 1)
        amax = x.abs().nan_to_num(0.0, 1.0, 1.0).reshape(4, 64, -1, block).amax(-1)
        scale = (amax / 8).clamp_min(1e-6)  # small on purpose: a good share saturates
        x = x.detach().requires_grad_(True)
        y = torch.ops.qgraph.fake_quant_fmt(x, scale, torch.tensor(1.0), 2, block, element, "float32")
        grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
        y.backward(grad)
    finally:
        qops.use_compiled_kernels(previous)
    elem = fmt.element(element)
    lo, hi = (elem.qmin - 0.5, elem.qmax + 0.5) if elem.kind == "int" else (elem.qmin, elem.qmax)
    v = x.detach() / qops.expand(scale, x, 2, block)
    expected = grad * ((v >= lo) & (v <= hi))
    assert x.grad.shape == x.shape
    assert _same(x.grad, expected)
    assert 0 < int((x.grad == 0).sum()) < x.numel() // 2


def _equal_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as numbers (-0 equals 0), NaN equal to NaN."""
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


@pytest.mark.parametrize("case", sorted(CASES))
def test_quantizer_traced_by_torch_compile_matches_the_custom_op(case):
    """Under torch.compile (inductor) each quantizer is its autograd.Function twin, traced and
    fused: the custom op's values (the int8 twin's affine formula turns an exact -0 into +0)
    and bit-identical gradients."""
    fq = CASES[case]()
    shape = (512, 256) if fq.spec.role == "weight" and fq.scale.dim() and fq.scale.shape[0] == 512 else (256, 256)
    x = _data(shape, float(fq.scale.reshape(-1)[0]) if fq.scale.numel() else 1.0)
    y_eager, g_eager = _run(fq, x)
    # each case compiles FakeQuant.forward anew: more cases than dynamo's recompile limit (8)
    # would run the last ones eagerly, so every case starts from an empty cache
    torch._dynamo.reset()
    compiled = torch.compile(fq)
    _run(compiled, x)  # compiles
    with torch.profiler.profile() as prof:
        y_traced, g_traced = _run(compiled, x)
    assert not any(e.name.startswith("qgraph::") for e in prof.events()), "the twin is traced, not the op"
    assert _equal_values(y_traced, y_eager), case
    assert _same(g_traced, g_eager), case


def _fp8_probes(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of an FP8 type, the midpoints between neighbours (ties), the float32
    values just either side of each midpoint, values past the largest, and ±inf, NaN, ±0."""
    grid = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    grid = grid[grid.isfinite() & (grid >= 0)].unique()
    mid = (grid[1:] + grid[:-1]) / 2  # exact in float32: FP8 has few mantissa bits
    beyond = grid[-1] * torch.tensor([1.0625, 1.125, 2.0, 1e6])
    values = torch.cat([grid, mid, mid.nextafter(torch.tensor(0.0)), mid.nextafter(torch.tensor(1e30)), beyond])
    special = torch.tensor([float("inf"), float("nan"), 0.0, -0.0, 1e-30, 2.0**-20])
    return torch.cat([values, -values, special])


@pytest.mark.parametrize("element, dtype", [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_compiled_fp8_rounding_is_the_cast_on_every_tie_and_neighbour(element, dtype):
    """Traced by torch.compile, FP8 rounding is float32/int32 arithmetic (a cast compiles to
    scalar code); it gives the cast's value, bit for bit, on every grid point, tie (half to
    even), value beside a tie, subnormal, saturating value and special value."""
    y = _fp8_probes(dtype)
    elem = fmt.element(element)
    expected = y.clamp(elem.qmin, elem.qmax).to(dtype).float()
    assert _same(torch.compile(qops.round_to, fullgraph=True)(y, element), expected)
    assert _same(qops.round_to(y, element), expected)  # eager: the cast itself


def test_compiled_e4m3_block_scale_rounding_is_the_cast():
    ratio = _fp8_probes(torch.float8_e4m3fn)
    ratio = ratio[ratio > 0]  # block-scale ratios are amax / (6 * global scale): not negative
    assert _same(torch.compile(qops.e4m3_ratio, fullgraph=True)(ratio), qops.e4m3_ratio(ratio))


@pytest.mark.parametrize("shape", [(256, 256), (250, 1000)])  # 1000: a partial last block
def test_compiled_nvfp4_weight_scales_match_eager(shape, compiled):
    """A tracked NVFP4 weight's scales (refreshed every QAT step) from the one fused kernel are
    the eager ones: block amaxes, the global scale from the largest, E4M3 ratios (subnormal and
    saturating ones included: magnitudes span 2^-24..2^14, and a block of zeros)."""
    g = torch.Generator().manual_seed(21)
    w = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-24, 14, shape, generator=g).float())
    w[:3, :16] = 0.0
    assert w.numel() >= N
    scales, global_scale = qops.nvfp4_scales(w, axis=1, block_size=16)
    qops.use_compiled_kernels(False)
    eager_scales, eager_global = qops.nvfp4_scales(w, axis=1, block_size=16)
    assert _same(scales, eager_scales) and _same(global_scale, eager_global)
    assert (eager_scales == 2.0**-9).any() and (eager_scales == 448.0).any()
