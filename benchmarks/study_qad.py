"""PTQ vs QAT vs QAD, same data and step budget: the tiny byte-level LM and the digits CNN.

For each model and recipe:

* **FP32**: the trained model (the LM's teacher is trained here, ``benchmarks/tinylm.py``, and
  cached under ``benchmarks/.cache/``; the CNN is the bundled ``digits_cnn.pt2``);
* **PTQ**: ``annotate(recipe, fallback) → insert-observers(max) → calibrate → insert-qdq``;
* **QAT**: the calibrated graph, ``insert-fake-quant`` (weights track their scales, activation
  scales frozen), trained on the task loss (next-byte cross-entropy / cross-entropy on labels);
* **QAD**: the same start, ``insert-fake-quant`` then ``insert-distill-taps`` with the FP32 graph
  as the frozen teacher, trained on KL(teacher ‖ student) of the logits at temperature 1 alone
  (the QAD report's recipe).

QAT and QAD use the same batches (same seed), steps, AdamW learning rate with 5 % linear warmup
and cosine decay, and gradient clipping at 1.0, with the compiled quantizer kernels
(``qgraph.qops.use_compiled_kernels``; bit-identical to the eager ones, faster). Metrics: the LM's validation cross-entropy
(nats/byte), perplexity and KL to the teacher on fixed validation windows; the CNN's top-1 on the
450 held-out images. ``gap closed`` = (metric_PTQ − metric_X) / (metric_PTQ − metric_FP32).
A control row fine-tunes the FP32 LM with QAT's data and schedule (no quantizers): the teacher
is trained for only ~10 CPU minutes, so more training alone lowers its cross-entropy. For NVFP4
the PTQ KL is split into what the weights and what the activations cost (the other side's
quantizers removed from the graph).

``--ablation`` runs QAD variants on the LM instead (NVFP4 from one calibrated start): the plain
recipe; with MSE taps on the four blocks' residual outputs; 4× the tokens (batch 64); 4× and 16×
the steps (as many more tokens, and as many more optimizer updates); QDrop (each activation
quantizer applied to a random half of its values in training, a flatness regulariser for low-bit
activations); LSQ-learned weight scales instead of tracked ones; the gradient passed through the
activations' dynamic block scales as well (:class:`_ScaleGrad`); a penalty on the FP4 activations'
relative rounding error added to the loss (:class:`_RoundPenalty`); QAD from GPTQ-rounded weights
(the ``gptq`` pass) instead of round-to-nearest ones; ModelOpt's default NVFP4 layer set (the
LM head and the attention matmuls left in float, in the PTQ start and the student); QAD of a
student whose weights or
whose activations alone are quantized — which part of the gap distillation recovers; and INT4
weight-only (w4a16): plain, with 4× the tokens, 4× the steps, or with LSQ weight scales.
``--variant LABEL`` (repeatable) runs only the variants of that label (``QAD``: the plain NVFP4
and w4a16 rows); ``--recipes`` keeps only the variants of those recipes.

``--sensitivity`` splits NVFP4 PTQ's KL on the LM by layer kind (each kind's activation or weight
quantizers removed, one kind at a time), scores it with the block scales kept in FP32 instead
of E4M3, and tries function-preserving rewrites that regroup
channels before PTQ: reordering channels so each 16-value block holds channels of like range
(the residual stream by one permutation, the MLP hidden channels per block) and SmoothQuant
scales (α 0.5) folded into the LayerNorms; and QuaRot's rotation of the residual stream by a
random Hadamard matrix (LayerNorms turned into RMSNorm first).

Usage::

    .venv/bin/python benchmarks/study_qad.py --sensitivity
    .venv/bin/python benchmarks/study_qad.py [--models lm,cnn] [--recipes nvfp4,w4a16,int8] [--steps 400] [--lr 1e-4]
    .venv/bin/python benchmarks/study_qad.py --ablation [--variant QAD --variant "QAD, 4x the steps"] [--recipes w4a16]

Writes ``benchmarks/results_qad.json`` (``results_qad_ablation.json``) and prints markdown tables.
``torch.set_num_threads(2)``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import qgraph
from qgraph import FakeQuant, Sequential, qops
from qgraph.backends import tensorrt
from qgraph.passes import (
    GPTQ,
    Annotate,
    Calibrate,
    FoldBatchNorm,
    InsertDistillTaps,
    InsertFakeQuant,
    InsertObservers,
    InsertQDQ,
)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _lr_at(step: int, steps: int, lr: float) -> float:
    warmup = max(1, round(0.05 * steps))
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _calibrated(model: torch.nn.Module, example: torch.Tensor | tuple, recipe: str, calib: list) -> torch.fx.GraphModule:
    gm = qgraph.capture(model, example if isinstance(example, tuple) else (example,))
    Sequential(
        [FoldBatchNorm(), Annotate(tensorrt.RULES[recipe], fallback=True), InsertObservers("max"), Calibrate(calib)]
    )(gm)
    return gm


def _param_groups(gm: torch.nn.Module) -> list[dict]:
    """AdamW groups: the model's own parameters, and one group per learned (LSQ) scale whose rate
    is scaled by its size relative to the weights' (Adam moves every parameter by about its rate
    per step; an NVFP4 block scale, counted in global scales, is ~10^4 times a weight)."""
    scales = {id(m.scale) for m in gm.modules() if isinstance(m, FakeQuant) and m.learnable}
    own = [p for p in gm.parameters() if p.requires_grad and id(p) not in scales]
    size = torch.cat([p.detach().abs().flatten() for p in own]).mean()
    groups = [{"params": own, "relative_lr": 1.0}]
    for p in gm.parameters():
        if id(p) in scales:
            groups.append({"params": [p], "relative_lr": float(p.detach().abs().mean() / size)})
    return groups


def _finetune(gm: torch.fx.GraphModule, batches, loss_fn, steps: int, lr: float, label: str) -> list[float]:
    """Train ``gm`` in place on ``(inputs, targets)`` batches (a tuple of inputs is unpacked);
    ``loss_fn(output, targets)`` (QAD: output is ``(logits, kl)``)."""
    gm.train()
    params = [p for p in gm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(_param_groups(gm), lr=lr, weight_decay=0.0)
    history = []
    bar = tqdm(range(steps), desc=label, unit="step", leave=False, disable=None)  # no bar off a TTY
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr) * group["relative_lr"]
        inputs, targets = next(batches)
        loss = loss_fn(gm(*inputs) if isinstance(inputs, tuple) else gm(inputs), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append(loss.item())
        bar.set_postfix(loss=f"{sum(history[-10:]) / len(history[-10:]):.4f}")
    gm.eval()
    return history


def _three_ways(model, example, recipe, calib, batches_fn, task_loss, steps, lr):
    """(PTQ graph, QAT graph, QAD graph, seconds per arm) from one calibration."""
    base = _calibrated(model, example, recipe, calib)
    ptq = copy.deepcopy(base)
    InsertQDQ()(ptq)
    qat = copy.deepcopy(base)
    InsertFakeQuant()(qat)
    t0 = time.perf_counter()
    qat_hist = _finetune(qat, batches_fn(), lambda out, y: task_loss(out, y), steps, lr, f"QAT {recipe}")
    qat_s = time.perf_counter() - t0
    qad = copy.deepcopy(base)
    teacher = qgraph.capture(model, (example,))
    FoldBatchNorm()(teacher)
    InsertFakeQuant()(qad)
    InsertDistillTaps(teacher, temperature=1.0)(qad)
    t0 = time.perf_counter()
    qad_hist = _finetune(qad, batches_fn(), lambda out, y: out[1], steps, lr, f"QAD {recipe}")
    qad_s = time.perf_counter() - t0
    return ptq, qat, qad, {"qat_s": qat_s, "qad_s": qad_s, "qat_loss": qat_hist, "qad_loss": qad_hist}


def _without_quantizers(gm: torch.fx.GraphModule, role: str, only: set[str] | None = None) -> torch.fx.GraphModule:
    """A copy of ``gm`` with the quantizers of ``role`` ("weight" or "activation") taken out
    (those named in ``only``, if given)."""
    gm = copy.deepcopy(gm)
    for node in list(gm.graph.nodes):
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if only is not None and node.name not in only:
            continue
        if isinstance(module, FakeQuant) and (module.spec.role == "weight") == (role == "weight"):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _gap(ptq: float, x: float, fp32: float) -> float:
    return (ptq - x) / (ptq - fp32) if ptq != fp32 else float("nan")


def study_lm(recipes: list[str], steps: int, lr: float, batch: int) -> list[dict]:
    import tinylm

    model = tinylm.teacher()
    calib = tinylm.calibration_batches(8, 32)
    log_t = tinylm.teacher_log_probs(model)
    fp32 = tinylm.score(model, log_t)
    rows = [{"model": "tinylm", "recipe": "-", "arm": "FP32", **fp32}]
    print(f"tinylm FP32: ce {fp32['ce']:.4f} nats/byte", flush=True)
    # control: the FP32 model fine-tuned with QAT's data, steps and schedule (no quantization) —
    # how much of QAT's cross-entropy gain is just more training of a not fully trained teacher
    control = qgraph.capture(model, (calib[0][:4],))
    t0 = time.perf_counter()
    _finetune(
        control,
        tinylm.batches("train", batch, tinylm.CONFIG["ctx"], seed=11),
        lambda out, y: F.cross_entropy(out.reshape(-1, 256), y.reshape(-1)),
        steps,
        lr,
        "FP32 fine-tune",
    )
    tuned = tinylm.score(control, log_t)
    rows.append({"model": "tinylm", "recipe": "-", "arm": "FP32 + fine-tune (control)", **tuned,
                 "train_s": time.perf_counter() - t0})
    print(f"tinylm FP32 fine-tuned: ce {tuned['ce']:.4f}", flush=True)
    for recipe in recipes:
        graphs = _three_ways(
            model,
            calib[0][:4],
            recipe,
            calib,
            lambda: tinylm.batches("train", batch, tinylm.CONFIG["ctx"], seed=11),
            lambda out, y: F.cross_entropy(out.reshape(-1, 256), y.reshape(-1)),
            steps,
            lr,
        )
        ptq_ce = None
        for arm, gm in zip(("PTQ", "QAT", "QAD"), graphs[:3]):
            metrics = tinylm.score(gm, log_t)
            ptq_ce = metrics["ce"] if arm == "PTQ" else ptq_ce
            row = {"model": "tinylm", "recipe": recipe, "arm": arm, **metrics}
            row["gap_closed"] = _gap(ptq_ce, metrics["ce"], fp32["ce"]) if arm != "PTQ" else 0.0
            row["train_s"] = graphs[3].get(f"{arm.lower()}_s")
            rows.append(row)
            print(f"tinylm {recipe} {arm}: ce {metrics['ce']:.4f} kl {metrics['kl']:.4f}", flush=True)
        rows[-1]["loss_history"] = graphs[3]["qad_loss"]
        rows[-2]["loss_history"] = graphs[3]["qat_loss"]
        if recipe == "nvfp4":  # where PTQ's KL comes from
            for role in ("activation", "weight"):
                part = tinylm.score(_without_quantizers(graphs[0], role), log_t)
                kept = "weights" if role == "activation" else "activations"
                rows.append({"model": "tinylm", "recipe": recipe, "arm": f"PTQ, {kept} only", **part})
                print(f"tinylm {recipe} PTQ {kept} only: kl {part['kl']:.4f}", flush=True)
    return rows


_BLOCK_TAPS = {f"add_{2 * i}": 1.0 for i in range(1, 5)}  # the four blocks' residual outputs


class Variant(NamedTuple):
    """One ``--ablation`` run: QAD of ``recipe`` from its calibrated start."""

    recipe: str
    label: str
    removed: str | None = None  # "weight" / "activation": that side's quantizers taken out
    taps: dict = {}  # noqa: RUF012 - never mutated; MSE taps on graph nodes, name -> weight
    batch: int = 16
    times: int = 1  # the steps multiplier
    qdrop: float = 0.0  # QDrop probability of the activation quantizers
    learn_weight_scales: bool = False  # LSQ weight scales instead of tracked ones
    scale_grad: bool = False  # the gradient also flows through the dynamic block scales
    round_penalty: float = 0.0  # weight of the FP4 activations' relative rounding error in the loss
    gptq: bool = False  # the student starts from GPTQ-rounded weights (the gptq pass) instead of RTN
    float_kinds: tuple = ()  # layer kinds (:func:`_layer_kind`) left in float, PTQ start and student alike


ABLATION = [
    Variant("nvfp4", "QAD"),
    Variant("nvfp4", "QAD + MSE taps on the block outputs", taps=_BLOCK_TAPS),
    Variant("nvfp4", "QAD, 4x tokens (batch 64)", batch=64),
    Variant("nvfp4", "QAD, 4x the steps", times=4),
    Variant("nvfp4", "QAD, 16x the steps", times=16),
    Variant("nvfp4", "QAD, QDrop 0.5", qdrop=0.5),
    Variant("nvfp4", "QAD, LSQ weight scales", learn_weight_scales=True),
    Variant("nvfp4", "QAD, gradient through the block scales", scale_grad=True),
    Variant("nvfp4", "QAD + activation rounding penalty 1", round_penalty=1.0),
    Variant("nvfp4", "QAD + activation rounding penalty 10", round_penalty=10.0),
    Variant("nvfp4", "QAD, weights only quantized", removed="activation"),
    Variant("nvfp4", "QAD, activations only quantized", removed="weight"),
    Variant("nvfp4", "QAD from GPTQ weights", gptq=True),
    Variant("nvfp4", "QAD, ModelOpt's NVFP4 layer set", float_kinds=("head", "attention matmuls (FP8)")),
    Variant("w4a16", "QAD"),
    Variant("w4a16", "QAD from GPTQ weights", gptq=True),
    Variant("w4a16", "QAD, 4x tokens (batch 64)", batch=64),
    Variant("w4a16", "QAD, 4x the steps", times=4),
    Variant("w4a16", "QAD, LSQ weight scales", learn_weight_scales=True),
]


class _QDrop(torch.nn.Module):
    """QDrop (Wei et al., ICLR 2022) on one activation quantizer: in training each value keeps
    its float value with probability ``p`` and is quantized otherwise; in eval, the quantizer."""

    def __init__(self, quantizer: FakeQuant, p: float) -> None:
        super().__init__()
        self.quantizer, self.p = quantizer, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantizer(x)
        return torch.where(torch.rand_like(x) < self.p, x, q) if self.training else q


def _qdrop(gm: torch.fx.GraphModule, p: float) -> None:
    """Wrap every activation quantizer of ``gm`` in :class:`_QDrop` (in place)."""
    for node in gm.graph.nodes:
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, FakeQuant) and module.spec.role != "weight":
            gm.set_submodule(node.target, _QDrop(module, p))


class _ScaleGrad(torch.nn.Module):
    """A dynamic NVFP4 activation quantizer whose gradient also flows through its block scales.

    The values are the quantizer's. Its straight-through gradient treats each block's scale
    ``s = e4m3(amax / (6 * global)) * global`` as a constant; here the scale's LSQ term is added:
    ``out = q + (code - x / s) * (s - s.detach())`` is ``q`` in value, and in the backward each
    block's largest value also receives ``sum(grad * (code - x / s)) * ds/d amax`` — how moving
    the block maximum moves every value's rounding error (the E4M3 rounding passed straight
    through). The study asks whether that lets the student learn FP4-friendlier activations.
    """

    def __init__(self, quantizer: FakeQuant) -> None:
        super().__init__()
        self.quantizer = quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantizer(x)
        if not self.training:
            return q
        size = self.quantizer.spec.block_size
        blocks = (*x.shape[:-1], x.shape[-1] // size, size)
        g = self.quantizer.global_scale
        ratio = (x.unflatten(-1, blocks[-2:]).abs().amax(-1, keepdim=True) / (6.0 * g)).clamp(2.0**-9, 448.0)
        s = (ratio + (qops.e4m3_ratio(ratio.detach()) - ratio).detach()) * g
        error = (q - x).detach().reshape(blocks) / s.detach()  # code - x / s
        return q + (error * (s - s.detach())).reshape(x.shape)


def _scale_grad(gm: torch.fx.GraphModule) -> None:
    """Wrap every dynamic NVFP4 activation quantizer of ``gm`` in :class:`_ScaleGrad` (in place)."""
    for node in gm.graph.nodes:
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, FakeQuant) and module.spec.dynamic and module.spec.scale_type == "fp8_e4m3":
            gm.set_submodule(node.target, _ScaleGrad(module))


class _RoundPenalty(torch.nn.Module):
    """A dynamic FP4 activation quantizer that also records its relative rounding error.

    The straight-through gradient passes ``x`` through the rounding as if it were the identity,
    so nothing tells the student that an activation nearer a grid point costs less. In training
    this records ``mean((x - q)^2) / mean(x^2)`` with ``q`` held constant, whose gradient pulls
    every value towards its code (bin regularisation, Han et al. 2021, applied to activations);
    the loss adds the mean over quantizers, weighted. The values are the quantizer's.
    """

    def __init__(self, quantizer: FakeQuant, sink: list) -> None:
        super().__init__()
        self.quantizer, self.sink = quantizer, sink

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantizer(x)
        if self.training:
            self.sink.append((x - q.detach()).pow(2).mean() / x.detach().pow(2).mean().clamp_min(1e-12))
        return q


def _round_penalty(gm: torch.fx.GraphModule) -> list:
    """Wrap every dynamic FP4 activation quantizer of ``gm`` in :class:`_RoundPenalty` (in place);
    returns the list their errors are appended to."""
    sink: list = []
    for node in gm.graph.nodes:
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, FakeQuant) and module.spec.dynamic and module.spec.scale_type == "fp8_e4m3":
            gm.set_submodule(node.target, _RoundPenalty(module, sink))
    return sink


def ablation(steps: int, lr: float, only: list[str] | None = None, recipes: list[str] | None = None) -> list[dict]:
    """QAD variants on the LM (:data:`ABLATION`), each from its recipe's calibrated start (see the
    module docstring); ``only``: the labels of the variants to run, ``recipes``: their recipes
    (all when None)."""
    import tinylm

    variants = [v for v in ABLATION if (not only or v.label in only) and (not recipes or v.recipe in recipes)]
    if not variants:
        raise SystemExit(f"no ablation variant is labelled {only} with a recipe in {recipes}")
    model = tinylm.teacher()  # trains it (about 10 minutes) unless cached
    calib = tinylm.calibration_batches(8, 32)
    log_t = tinylm.teacher_log_probs(model)
    teacher = qgraph.capture(model, (calib[0][:4],))
    starts, rows = {}, []
    for v in variants:
        if v.recipe not in starts:
            starts[v.recipe] = _calibrated(model, calib[0][:4], v.recipe, calib)
        base = starts[v.recipe]
        ptq = copy.deepcopy(base)
        InsertQDQ()(ptq)
        ptq = _in_float(ptq, v.float_kinds)
        before = tinylm.score(ptq if v.removed is None else _without_quantizers(ptq, v.removed), log_t)
        student = copy.deepcopy(base)
        start = {}
        if v.gptq:  # PTQ with GPTQ rounding: the student's start, scored as its own PTQ row
            InsertQDQ()(student)
            GPTQ(calib)(student)
            start = {f"gptq_{k}": x for k, x in tinylm.score(student, log_t).items()}
        InsertFakeQuant(learn_weight_scales=v.learn_weight_scales)(student)
        student = _in_float(student, v.float_kinds)
        if v.removed is not None:
            student = _without_quantizers(student, v.removed)
        if v.qdrop:
            _qdrop(student, v.qdrop)
        if v.scale_grad:
            _scale_grad(student)
        sink = _round_penalty(student) if v.round_penalty else []
        InsertDistillTaps(teacher, taps=v.taps, temperature=1.0)(student)

        def loss(out, _targets):
            penalty = torch.stack(sink).mean() if sink else 0.0
            sink.clear()
            return out[1] + v.round_penalty * penalty

        t0 = time.perf_counter()
        history = _finetune(student, tinylm.batches("train", v.batch, tinylm.CONFIG["ctx"], seed=11),
                            loss, steps * v.times, lr, f"{v.recipe} {v.label}")
        after = tinylm.score(student, log_t)
        closed = (before["kl"] - after["kl"]) / before["kl"]
        rows.append({"recipe": v.recipe, "variant": v.label, "steps": steps * v.times, "batch": v.batch, "lr": lr,
                     "qdrop": v.qdrop, "learn_weight_scales": v.learn_weight_scales, "scale_grad": v.scale_grad,
                     "round_penalty": v.round_penalty, "gptq": v.gptq, "float_kinds": list(v.float_kinds), **start,
                     "kl_before": before["kl"], "kl_after": after["kl"], "ce_before": before["ce"],
                     "ce_after": after["ce"], "kl_closed": closed, "train_s": time.perf_counter() - t0,
                     "loss_history": history})
        print(f"{v.recipe} {v.label}: KL {before['kl']:.4f} -> {after['kl']:.4f} ({100 * closed:.0f} %), "
              f"ce {before['ce']:.4f} -> {after['ce']:.4f}"
              + (f" (GPTQ start: KL {start['gptq_kl']:.4f}, ce {start['gptq_ce']:.4f})" if start else ""), flush=True)
    return rows


def _in_float(gm: torch.fx.GraphModule, kinds: tuple) -> torch.fx.GraphModule:
    """``gm`` with every quantizer read by a layer of one of ``kinds`` taken out (a copy; ``gm``
    itself when ``kinds`` is empty)."""
    if not kinds:
        return gm
    names = set()
    for node in gm.graph.nodes:
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, FakeQuant) and _layer_kind(next(iter(node.users)).name) in kinds:
            names.add(node.name)
    return _without_quantizers(_without_quantizers(gm, "weight", names), "activation", names)


def _layer_kind(user: str) -> str:
    """The TinyLM layer a quantizer's reader is: linear_N in capture order (q, k, v, proj, fc1,
    fc2 per block, then the head) or the attention matmuls."""
    import re

    m = re.fullmatch(r"linear(?:_(\d+))?", user)
    if m is None:
        return "attention matmuls (FP8)"
    n = int(m.group(1) or 0)
    return "head" if n >= 24 else ["q, k, v (shared LN1 input)", "q, k, v (shared LN1 input)",
                                    "q, k, v (shared LN1 input)", "proj", "fc1", "fc2"][n % 6]


def _channel_stats(model, calib) -> dict[str, torch.Tensor]:
    """Per-channel max |x| of every LayerNorm output and MLP hidden activation of a TinyLM."""
    stats, hooks = {}, []

    def hook(name):
        def record(_mod, _inp, out):
            a = out.detach().abs().reshape(-1, out.shape[-1]).amax(0)
            stats[name] = torch.maximum(stats[name], a) if name in stats else a
        return record

    for i, b in enumerate(model.blocks):
        for part in ("ln1", "ln2", "act"):
            hooks.append(getattr(b, part).register_forward_hook(hook(f"{i}.{part}")))
    hooks.append(model.ln_f.register_forward_hook(hook("ln_f")))
    with torch.no_grad():
        for x in calib:
            model(x)
    for h in hooks:
        h.remove()
    return stats


@torch.no_grad()
def _reorder_channels(model, calib):
    """The same function with channels of like range next to each other: one permutation of the
    residual stream (by the largest LayerNorm output range of each channel: embeddings,
    LayerNorms, the rows written into the stream and the columns reading it) and one of each
    MLP's hidden channels (fc1 rows, fc2 columns)."""
    m = copy.deepcopy(model)
    stats = _channel_stats(m, calib)
    p = torch.argsort(torch.stack([v for k, v in stats.items() if "ln" in k]).amax(0))
    for emb in (m.tok_emb, m.pos_emb):
        emb.weight.copy_(emb.weight[:, p])
    for ln in [b.ln1 for b in m.blocks] + [b.ln2 for b in m.blocks] + [m.ln_f]:
        ln.weight.copy_(ln.weight[p])
        ln.bias.copy_(ln.bias[p])
    for i, b in enumerate(m.blocks):
        for writer in (b.proj, b.fc2):
            writer.weight.copy_(writer.weight[p])
            writer.bias.copy_(writer.bias[p])
        for reader in (b.q, b.k, b.v, b.fc1):
            reader.weight.copy_(reader.weight[:, p])
        h = torch.argsort(stats[f"{i}.act"])
        b.fc1.weight.copy_(b.fc1.weight[h])
        b.fc1.bias.copy_(b.fc1.bias[h])
        b.fc2.weight.copy_(b.fc2.weight[:, h])
    m.head.weight.copy_(m.head.weight[:, p])
    return m


@torch.no_grad()
def _smooth_layernorms(model, calib, alpha: float = 0.5):
    """SmoothQuant folded into each LayerNorm (its output feeds only linears in a pre-LN block):
    s_j = amax_j^α / wmax_j^(1-α); LN weight and bias / s, the readers' columns × s."""
    m = copy.deepcopy(model)
    stats = _channel_stats(m, calib)
    pairs = [(b.ln1, [b.q, b.k, b.v], stats[f"{i}.ln1"]) for i, b in enumerate(m.blocks)]
    pairs += [(b.ln2, [b.fc1], stats[f"{i}.ln2"]) for i, b in enumerate(m.blocks)]
    pairs += [(m.ln_f, [m.head], stats["ln_f"])]
    for ln, readers, amax in pairs:
        wmax = torch.stack([r.weight.abs().amax(0) for r in readers]).amax(0)
        scale = amax.clamp_min(1e-5) ** alpha / wmax.clamp_min(1e-5) ** (1 - alpha)
        ln.weight /= scale
        ln.bias /= scale
        for r in readers:
            r.weight *= scale
    return m


def _hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """A random Hadamard rotation: Sylvester's Hadamard matrix with random column signs / sqrt(n)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    g = torch.Generator().manual_seed(seed)
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    return h * signs[None, :] / math.sqrt(n)


@torch.no_grad()
def _rotate_residual(model, calib, rotate: bool = True):
    """QuaRot's rewrite of a pre-LN model, the same function: every write into the residual stream
    made zero-mean over the channels (so LayerNorm's mean subtraction is a no-op), each
    LayerNorm's weight and bias folded into the linears reading it, the LayerNorms replaced by
    RMSNorm without affine (rotation invariant), then the stream rotated by a random Hadamard
    matrix Q: embeddings and writers × Q, readers' weights × Q (computed in float64)."""
    m = copy.deepcopy(model).double()
    d = m.tok_emb.weight.shape[1]
    q = _hadamard(d) if rotate else torch.eye(d, dtype=torch.float64)
    writers = [lin for b in m.blocks for lin in (b.proj, b.fc2)]
    for emb in (m.tok_emb, m.pos_emb):
        emb.weight -= emb.weight.mean(1, keepdim=True)
    for w in writers:
        w.weight -= w.weight.mean(0, keepdim=True)
        w.bias -= w.bias.mean()
    pairs = [(b.ln1, [b.q, b.k, b.v]) for b in m.blocks] + [(b.ln2, [b.fc1]) for b in m.blocks] + [(m.ln_f, [m.head])]
    for ln, readers in pairs:
        for r in readers:
            r.bias += r.weight @ ln.bias
            r.weight *= ln.weight[None, :]
    for b in m.blocks:
        b.ln1 = torch.nn.RMSNorm(d, eps=b.ln1.eps, elementwise_affine=False)
        b.ln2 = torch.nn.RMSNorm(d, eps=b.ln2.eps, elementwise_affine=False)
    m.ln_f = torch.nn.RMSNorm(d, eps=m.ln_f.eps, elementwise_affine=False)
    for emb in (m.tok_emb, m.pos_emb):
        emb.weight.copy_(emb.weight @ q)
    for w in writers:
        w.weight.copy_(q.T @ w.weight)
        w.bias.copy_(w.bias @ q)
    for _, readers in pairs:
        for r in readers:
            r.weight.copy_(r.weight @ q)
    return m.float()


def _with_fp32_block_scales(ptq: torch.fx.GraphModule, score: Callable[[], dict]) -> dict:
    """``score()`` with every NVFP4 block scale of ``ptq`` kept in FP32 instead of rounded to
    E4M3: the stored weight block scales recomputed from the weights, the activations' dynamic
    ones through the eager kernels (a compiled kernel would keep the E4M3 rounding it traced)."""
    from qgraph.graph import constant_value

    weights = {}  # NVFP4 weight quantizer -> its weight
    for node in ptq.graph.nodes:
        module = ptq.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, FakeQuant) and module.spec.role == "weight" and module.spec.scale_type == "fp8_e4m3":
            weights[module] = constant_value(ptq, node.args[0])
    saved = {m: (m.scale.clone(), m.global_scale.clone()) for m in weights}
    original, compiled = qops._nvfp4_block_scale, qops.use_compiled_kernels(False)
    qops._nvfp4_block_scale = lambda block_amax, global_scale: (block_amax / (global_scale * 6.0)).clamp_min(2.0**-9)
    try:
        with torch.no_grad():
            for module, weight in weights.items():
                module.refresh(weight)
        return score()
    finally:
        qops._nvfp4_block_scale = original
        qops.use_compiled_kernels(compiled)
        with torch.no_grad():
            for module, (scale, global_scale) in saved.items():
                module.scale.copy_(scale)
                module.global_scale.copy_(global_scale)


def sensitivity() -> list[dict]:
    """NVFP4 PTQ on the LM: KL with one layer kind's quantizers removed; channel regrouping."""
    import tinylm

    model = tinylm.teacher()
    calib = tinylm.calibration_batches(8, 32)
    log_t = tinylm.teacher_log_probs(model)
    ptq = _calibrated(model, calib[0][:4], "nvfp4", calib)
    InsertQDQ()(ptq)
    full = tinylm.score(ptq, log_t)
    rows = [{"variant": "NVFP4 PTQ, every quantizer", **full}]
    print(f"NVFP4 PTQ: kl {full['kl']:.4f} ce {full['ce']:.4f}", flush=True)
    kinds = {}  # quantizer node -> (layer kind, role)
    for node in ptq.graph.nodes:
        module = ptq.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, FakeQuant):
            kinds[node.name] = (_layer_kind(next(iter(node.users)).name), module.spec.role)
    for kind in dict.fromkeys(k for k, _ in kinds.values()):
        for role in ("activation", "weight"):
            names = {n for n, (k, r) in kinds.items() if k == kind and r == role}
            if not names:
                continue
            gm = _without_quantizers(ptq, role, names)
            r = tinylm.score(gm, log_t)
            rows.append({"variant": f"without the {role} quantizers of {kind}", "removed": len(names), **r,
                         "kl_share": (full["kl"] - r["kl"]) / full["kl"]})
            print(f"without {role} of {kind}: kl {r['kl']:.4f} ({100 * rows[-1]['kl_share']:.0f} % of PTQ's)", flush=True)
    r = _with_fp32_block_scales(ptq, lambda: tinylm.score(ptq, log_t))
    rows.append({"variant": "NVFP4 PTQ, block scales in FP32 (not rounded to E4M3)", **r,
                 "kl_share": (full["kl"] - r["kl"]) / full["kl"]})
    print(f"block scales in FP32: kl {r['kl']:.4f} ({100 * rows[-1]['kl_share']:.0f} % of PTQ's)", flush=True)
    for label, rewrite in (("channels reordered (residual stream + MLP hidden)", _reorder_channels),
                           ("SmoothQuant α 0.5 folded into the LayerNorms", _smooth_layernorms),
                           ("zero-mean stream, LayerNorm → RMSNorm, affine folded (no rotation)",
                            lambda m, c: _rotate_residual(m, c, rotate=False)),
                           ("the same + the residual stream rotated by a random Hadamard matrix", _rotate_residual)):
        rewritten = rewrite(model, calib)
        same = tinylm.score(rewritten, log_t)  # function preserved: KL to the teacher ~0
        gm = _calibrated(rewritten, calib[0][:4], "nvfp4", calib)
        InsertQDQ()(gm)
        r = tinylm.score(gm, log_t)
        rows.append({"variant": f"NVFP4 PTQ, {label}", "fp32_kl": same["kl"], **r})
        print(f"{label}: FP32 KL {same['kl']:.1e}, NVFP4 PTQ kl {r['kl']:.4f} ce {r['ce']:.4f}", flush=True)
    return rows


def study_cnn(recipes: list[str], steps: int, lr: float, batch: int) -> list[dict]:
    import numpy as np

    from qgraph.capture import load_pt2
    from qgraph.examples.digits import CALIB_PATH, MODEL_PATH, TEST_PATH, load_split

    split = load_split(0)
    x_train = torch.from_numpy(split["x_train"]).float()
    y_train = torch.from_numpy(split["y_train"]).long()
    with np.load(TEST_PATH) as test:
        x_test, y_test = torch.from_numpy(test["x"]), torch.from_numpy(test["y"])
    with np.load(CALIB_PATH) as c:
        calib = list(torch.from_numpy(c["x"]).split(32))
    fp32_graph = load_pt2(MODEL_PATH)

    def top1(gm) -> float:
        with torch.no_grad():
            out = gm(x_test)
        out = out[0] if isinstance(out, tuple) else out
        return 100.0 * float((out.argmax(1) == y_test).float().mean())

    def batches():
        g = torch.Generator().manual_seed(11)
        while True:
            idx = torch.randint(0, len(x_train), (batch,), generator=g)
            yield x_train[idx], y_train[idx]

    fp32 = top1(fp32_graph)
    rows = [{"model": "digits", "recipe": "-", "arm": "FP32", "top1": fp32}]
    for recipe in recipes:
        graphs = _three_ways(fp32_graph, calib[0][:4], recipe, calib, batches, F.cross_entropy, steps, lr)
        ptq = None
        for arm, gm in zip(("PTQ", "QAT", "QAD"), graphs[:3]):
            acc = top1(gm)
            ptq = acc if arm == "PTQ" else ptq
            rows.append({"model": "digits", "recipe": recipe, "arm": arm, "top1": acc,
                         "gap_closed": _gap(-ptq, -acc, -fp32) if arm != "PTQ" else 0.0})
            print(f"digits {recipe} {arm}: top-1 {acc:.2f}%", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="lm,cnn")
    parser.add_argument("--recipes", default="nvfp4,w4a16,int8")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--ablation", action="store_true", help="NVFP4 QAD variants on the LM")
    parser.add_argument("--variant", action="append", choices=sorted({v.label for v in ABLATION}),
                        help="with --ablation: run only the variants of this label (repeatable)")
    parser.add_argument("--sensitivity", action="store_true", help="where NVFP4 PTQ's KL comes from")
    parser.add_argument("--eager-kernels", action="store_true", help="do not compile the quantizer kernels")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    default = "results_qad_ablation.json" if args.ablation else "results_qad_sensitivity.json" if args.sensitivity else "results_qad.json"
    out = Path(args.out or HERE / default)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    qops.use_compiled_kernels(not args.eager_kernels)
    start = time.perf_counter()
    if args.sensitivity:
        rows = sensitivity()
        print("\n| NVFP4 PTQ variant | KL to teacher | share of PTQ's KL | val CE |\n|---|---|---|---|")
        for r in rows:
            share = f"{100 * r['kl_share']:.0f} %" if "kl_share" in r else ""
            print(f"| {r['variant']} | {r['kl']:.4f} | {share} | {r['ce']:.4f} |")
    elif args.ablation:
        rows = ablation(args.steps, args.lr, args.variant, args.recipes.split(","))
        print("\n| recipe | variant | KL before | KL after | KL gap closed | val CE before → after |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['recipe']} | {r['variant']} | {r['kl_before']:.4f} | {r['kl_after']:.4f} "
                  f"| {100 * r['kl_closed']:.0f} % | {r['ce_before']:.4f} → {r['ce_after']:.4f} |")
    else:
        recipes = args.recipes.split(",")
        rows = []
        if "lm" in args.models:
            rows += study_lm(recipes, args.steps, args.lr, args.batch)
        if "cnn" in args.models:
            rows += study_cnn([r for r in recipes if r != "w4a16"], args.steps, args.lr, 32)
        print("\n| model | recipe | arm | CE nats/byte | KL to teacher | top-1 | gap closed |\n|---|---|---|---|---|---|---|")
        for r in rows:
            ce = f"{r['ce']:.4f}" if "ce" in r else ""
            kl = f"{r['kl']:.4f}" if "kl" in r else ""
            top1 = f"{r['top1']:.2f}%" if "top1" in r else ""
            closed = r.get("gap_closed")
            gap = f"{100 * closed:.0f}%" if closed and not math.isnan(closed) else ""  # nan: no gap to close
            print(f"| {r['model']} | {r['recipe']} | {r['arm']} | {ce} | {kl} | {top1} | {gap} |")
    total = time.perf_counter() - start
    print(f"total {total:.0f} s")
    out.write_text(json.dumps(
        {"command": " ".join(sys.argv), "args": vars(args), "torch": torch.__version__,
         "python": platform.python_version(), "total_s": total, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
