"""A tiny byte-level transformer language model trained on Python's stdlib: an FP32 teacher.

The model (:class:`TinyLM`, about 3.3M parameters) reads raw bytes (vocabulary 256) with a context
of 128 and is trained here on the CPU on the ``.py`` sources of the running Python's standard
library (:func:`corpus`), so the data is on every machine without a download. It is the FP32
teacher of the PTQ / QAT / QAD (quantization-aware distillation) studies: :func:`teacher` trains
it once and caches it under ``benchmarks/.cache/``; :func:`evaluate` and :func:`kl_to_teacher`
score an eager model or a captured (fake-quant) graph on fixed validation windows.

Attention is written with explicit ``torch.matmul`` / softmax and a causal mask taken from a
registered buffer (not ``scaled_dot_product_attention``), every projection is an ``nn.Linear``, so
the captured graph exposes plain matmuls to the quantization passes. The model is capturable with
a dynamic batch::

    gm = qgraph.capture(model, (torch.zeros(4, 128, dtype=torch.long),))

Usage::

    .venv/bin/python benchmarks/tinylm.py [--steps N] [--retrain] [--no-ptq]

prints the teacher's validation cross-entropy (nats/byte) and bits/byte, its parameter count and
training time, then the validation cross-entropy of the INT8 and NVFP4 fake-quant PTQ graphs
(TensorRT rules, max calibration).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import sysconfig
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = [
    "CONFIG",
    "CACHE",
    "TEACHER_PATH",
    "TinyLM",
    "batches",
    "calibration_batches",
    "corpus",
    "evaluate",
    "kl_to_teacher",
    "score",
    "teacher_log_probs",
    "main",
    "ptq",
    "teacher",
    "train",
]

#: Model hyper-parameters of the teacher (a checkpoint is reused only if these match).
CONFIG = {
    "vocab": 256,
    "ctx": 128,
    "n_layer": 4,
    "d_model": 256,
    "n_head": 4,
    "d_ff": 1024,
}
#: Folder for checkpoints (git-ignored).
CACHE = Path(__file__).resolve().parent / ".cache"
#: Where :func:`teacher` keeps the trained FP32 teacher.
TEACHER_PATH = CACHE / "tinylm_teacher.pt"

#: Cap on the total corpus size (bytes), train and validation together.
MAX_CORPUS_BYTES = 8 * 1024 * 1024
#: One file in this many goes to the validation split (chosen by a CRC of its relative path).
VAL_EVERY = 20
#: Directory names whose ``.py`` files are not part of the corpus.
_EXCLUDED_DIRS = {"test", "tests", "site-packages", "idlelib", "lib2to3", "__pycache__"}

#: Training defaults. On 2 CPU threads a 32x128 step took ~0.46 s when this file was written
#: (``--measure`` prints it), so 1200 steps are ~9-10 minutes.
DEFAULT_STEPS = 1200
DEFAULT_LR = 2e-3
DEFAULT_BATCH = 32
SEED = 0
#: Validation windows used by :func:`evaluate` and :func:`kl_to_teacher`.
EVAL_BATCHES = 32
EVAL_BATCH_SIZE = 32


# --------------------------------------------------------------------------------------- data


def _stdlib_files() -> list[Path]:
    """The stdlib ``.py`` files of the corpus, as sorted absolute paths, capped in total size.

    Returns:
        The files in sorted order of their paths relative to the stdlib directory, excluding test
        packages, ``site-packages``, ``idlelib`` and ``lib2to3``; the list stops before the total
        size would exceed :data:`MAX_CORPUS_BYTES`.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        (
            p
            for p in root.rglob("*.py")
            if not _EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])
        ),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    chosen, total = [], 0
    for path in files:
        size = path.stat().st_size
        if total + size > MAX_CORPUS_BYTES:
            continue  # skip the file, keep looking for smaller ones that fit
        chosen.append(path)
        total += size
    return chosen


@functools.lru_cache(maxsize=None)
def _corpus(split: str) -> torch.Tensor:
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks = []
    for path in _stdlib_files():
        rel = path.relative_to(root).as_posix()
        is_val = zlib.crc32(rel.encode()) % VAL_EVERY == 0
        if is_val == (split == "val"):
            chunks.append(path.read_bytes())
    data = b"".join(chunks)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


def corpus(split: str) -> torch.Tensor:
    """The bytes of the stdlib corpus split, as a 1-D int64 tensor of values 0..255.

    The ``.py`` files of ``sysconfig.get_paths()["stdlib"]`` (no tests, ``site-packages``,
    ``idlelib`` or ``lib2to3``), in sorted path order, capped at :data:`MAX_CORPUS_BYTES`, are
    split by file: a file goes to validation when the CRC-32 of its relative path is 0 modulo
    :data:`VAL_EVERY` (about 5%), else to training. Deterministic for a given Python install;
    cached per process.

    Args:
        split: ``"train"`` or ``"val"``.

    Returns:
        The concatenated bytes of the split's files (int64, shape ``(n_bytes,)``).

    Raises:
        ValueError: ``split`` is not ``"train"`` or ``"val"``.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    return _corpus(split)


def batches(
    split: str, batch_size: int, seq_len: int = CONFIG["ctx"], seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless random windows of the corpus, for next-byte prediction.

    Args:
        split: ``"train"`` or ``"val"``.
        batch_size: windows per batch.
        seq_len: bytes per window.
        seed: seed of the window positions (the same seed gives the same sequence of batches).

    Yields:
        ``(inputs, targets)``, both int64 ``(batch_size, seq_len)``; ``targets`` is ``inputs``
        shifted one byte to the left.
    """
    data = corpus(split)
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len + 1)
    while True:
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen)
        windows = data[starts[:, None] + offsets]
        yield windows[:, :-1], windows[:, 1:]


def calibration_batches(n: int = 16, batch_size: int = 32, seed: int = 1) -> list[torch.Tensor]:
    """Input tensors for PTQ calibration, drawn from the train split.

    Args:
        n: number of batches.
        batch_size: windows per batch.
        seed: seed of the window positions (differs from the training seed by default).

    Returns:
        ``n`` int64 tensors of shape ``(batch_size, ctx)``.
    """
    it = batches("train", batch_size, CONFIG["ctx"], seed)
    return [next(it)[0] for _ in range(n)]


# -------------------------------------------------------------------------------------- model


class _Block(nn.Module):
    """A pre-LayerNorm transformer block: causal self-attention and a GELU MLP, both residual."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, ctx: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.head_dim = d_model // n_head
        self.ln1 = nn.LayerNorm(d_model)
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_ff)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_ff, d_model)
        self.register_buffer(
            "causal", torch.tril(torch.ones(ctx, ctx, dtype=torch.bool)), persistent=False
        )

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.reshape(b, t, self.n_head, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = self._heads(self.q(h)), self._heads(self.k(h)), self._heads(self.v(h))
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        scores = scores.masked_fill(~self.causal[:t, :t], float("-inf"))
        attn = torch.matmul(torch.softmax(scores, dim=-1), v)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    """A byte-level causal transformer language model (GPT-style, pre-LayerNorm, no dropout).

    Args:
        vocab: vocabulary size (256 bytes).
        ctx: context length (maximum sequence length).
        n_layer: transformer blocks.
        d_model: embedding width.
        n_head: attention heads.
        d_ff: MLP hidden width.
    """

    def __init__(
        self,
        vocab: int = CONFIG["vocab"],
        ctx: int = CONFIG["ctx"],
        n_layer: int = CONFIG["n_layer"],
        d_model: int = CONFIG["d_model"],
        n_head: int = CONFIG["n_head"],
        d_ff: int = CONFIG["d_ff"],
    ) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} is not a multiple of n_head={n_head}")
        self.config = dict(
            vocab=vocab, ctx=ctx, n_layer=n_layer, d_model=d_model, n_head=n_head, d_ff=d_ff
        )
        self.tok_emb = nn.Embedding(vocab, d_model)
        self.pos_emb = nn.Embedding(ctx, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_head, d_ff, ctx) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer("positions", torch.arange(ctx), persistent=False)
        self.apply(self._init)
        for block in self.blocks:  # GPT-2: scale the residual projections by depth
            for lin in (block.proj, block.fc2):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-byte logits.

        Args:
            tokens: int64 byte values, ``(batch, seq_len)`` with ``seq_len <= ctx``.

        Returns:
            float32 logits ``(batch, seq_len, 256)``; position ``i`` predicts byte ``i + 1``.
        """
        t = tokens.shape[1]
        x = self.tok_emb(tokens) + self.pos_emb(self.positions[:t])
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def n_params(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------- evaluation


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _val_windows(
    n_batches: int, batch_size: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    it = batches("val", batch_size, CONFIG["ctx"], seed)
    for _ in range(n_batches):
        yield next(it)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    n_batches: int = EVAL_BATCHES,
    batch_size: int = EVAL_BATCH_SIZE,
    seed: int = 0,
) -> dict[str, float]:
    """Next-byte cross-entropy on fixed validation windows.

    Args:
        model: a :class:`TinyLM` or a captured / quantized ``GraphModule`` of it (``tokens ->
            logits``; a tuple output's first element is used). Put in eval mode if it has one.
        n_batches: validation batches.
        batch_size: windows per batch (of :data:`CONFIG` ``["ctx"]`` bytes).
        seed: seed of the window positions.

    Returns:
        ``{"ce": nats/byte, "ppl": exp(ce), "bits_per_byte": ce / ln 2}``.
    """
    if hasattr(model, "eval"):
        model.eval()
    total, count = 0.0, 0
    for x, y in _val_windows(n_batches, batch_size, seed):
        logits = _logits(model, x)
        flat = logits.reshape(-1, logits.shape[-1]).float()
        total += F.cross_entropy(flat, y.reshape(-1), reduction="sum").item()
        count += y.numel()
    ce = total / count
    return {"ce": ce, "ppl": math.exp(ce), "bits_per_byte": ce / math.log(2)}


@torch.no_grad()
def kl_to_teacher(
    student: nn.Module,
    teacher: nn.Module,
    n_batches: int = EVAL_BATCHES,
    batch_size: int = EVAL_BATCH_SIZE,
    seed: int = 0,
) -> float:
    """Mean per-token ``KL(p_teacher || p_student)`` (nats) on the :func:`evaluate` windows.

    Args:
        student: the model or graph being compared (e.g. a fake-quant graph).
        teacher: the reference (e.g. the FP32 :class:`TinyLM`).
        n_batches: validation batches.
        batch_size: windows per batch.
        seed: seed of the window positions.

    Returns:
        The KL divergence averaged over all predicted positions.
    """
    return score(student, teacher_log_probs(teacher, n_batches, batch_size, seed), batch_size, seed)["kl"]


@torch.no_grad()
def teacher_log_probs(
    teacher: nn.Module, n_batches: int = EVAL_BATCHES, batch_size: int = EVAL_BATCH_SIZE, seed: int = 0
) -> list[torch.Tensor]:
    """The teacher's log-probabilities on the :func:`evaluate` windows, to :func:`score` many
    students against without running the teacher again (32 × 32 windows: 134 MB)."""
    if hasattr(teacher, "eval"):
        teacher.eval()
    return [F.log_softmax(_logits(teacher, x).float(), dim=-1) for x, _ in _val_windows(n_batches, batch_size, seed)]


@torch.no_grad()
def score(student: nn.Module, log_t: list[torch.Tensor], batch_size: int = EVAL_BATCH_SIZE, seed: int = 0) -> dict:
    """:func:`evaluate` and :func:`kl_to_teacher` in one pass over the windows of ``log_t``
    (from :func:`teacher_log_probs` with the same ``batch_size`` and ``seed``)."""
    if hasattr(student, "eval"):
        student.eval()
    ce_sum = kl_sum = 0.0
    count = 0
    for (x, y), lt in zip(_val_windows(len(log_t), batch_size, seed), log_t):
        ls = F.log_softmax(_logits(student, x).float(), dim=-1)
        ce_sum += F.nll_loss(ls.reshape(-1, ls.shape[-1]), y.reshape(-1), reduction="sum").item()
        kl_sum += (lt.exp() * (lt - ls)).sum().item()
        count += y.numel()
    ce = ce_sum / count
    return {"ce": ce, "ppl": math.exp(ce), "bits_per_byte": ce / math.log(2), "kl": kl_sum / count}


# ----------------------------------------------------------------------------------- training


def _optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def _lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    model: nn.Module,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    batch_size: int = DEFAULT_BATCH,
    seed: int = SEED,
    progress: bool = True,
) -> list[float]:
    """Train ``model`` in place on the train split with next-byte cross-entropy.

    AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), linear warmup over ~5% of the steps
    then cosine decay to 10% of ``lr``, gradient clipping at norm 1.0.

    Args:
        model: the :class:`TinyLM` to train.
        steps: optimizer steps.
        lr: peak learning rate.
        batch_size: windows of ``ctx`` bytes per step.
        seed: seed of the batch order (weights are initialised by the caller).
        progress: show a tqdm progress bar with the running loss.

    Returns:
        The training loss (nats/byte) of every step.
    """
    model.train()
    opt = _optimizer(model, lr)
    warmup = max(1, round(0.05 * steps))
    data = batches("train", batch_size, model.config["ctx"], seed)
    history: list[float] = []
    bar = tqdm(range(steps), desc="train tinylm", unit="step", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        x, y = next(data)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{sum(history[-10:]) / len(history[-10:]):.3f}")
    model.eval()
    return history


def measure_step_time(n: int = 5, batch_size: int = DEFAULT_BATCH) -> float:
    """Seconds per training step on this machine (median of ``n`` steps after one warm-up).

    Trains a throwaway :class:`TinyLM`; nothing is kept.

    Args:
        n: timed steps.
        batch_size: windows per step.

    Returns:
        The median step time in seconds.
    """
    torch.manual_seed(SEED)
    model = TinyLM()
    opt = _optimizer(model, DEFAULT_LR)
    data = batches("train", batch_size, CONFIG["ctx"], SEED)
    times = []
    for i in range(n + 1):
        x, y = next(data)
        t0 = time.perf_counter()
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _save_atomic(obj: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def teacher(
    path: str | Path = TEACHER_PATH,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    batch_size: int = DEFAULT_BATCH,
    seed: int = SEED,
    retrain: bool = False,
    progress: bool = True,
) -> TinyLM:
    """The FP32 teacher: loaded from ``path`` if it matches, else trained and saved there.

    The checkpoint is reused when its model config and training settings (steps, lr, batch size,
    seed) equal the requested ones; otherwise a fresh model (``torch.manual_seed(seed)``) is
    trained with :func:`train` and saved atomically (temporary file + ``os.replace``).

    Args:
        path: checkpoint file.
        steps: training steps.
        lr: peak learning rate.
        batch_size: windows per step.
        seed: initialisation and batch-order seed.
        retrain: train even if a matching checkpoint exists.
        progress: show the training progress bar.

    Returns:
        The teacher in eval mode. Its ``train_info`` attribute holds ``steps``, ``train_s``,
        ``step_s``, ``history`` and ``loaded`` (True when read from the checkpoint).
    """
    path = Path(path)
    settings = {"steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed}
    if path.is_file() and not retrain:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt.get("config") == CONFIG and ckpt.get("settings") == settings:
            model = TinyLM(**CONFIG)
            model.load_state_dict(ckpt["state_dict"])
            model.eval()
            model.train_info = {**ckpt["info"], "loaded": True}
            return model
    torch.manual_seed(seed)
    model = TinyLM(**CONFIG)
    t0 = time.perf_counter()
    history = train(model, steps=steps, lr=lr, batch_size=batch_size, seed=seed, progress=progress)
    train_s = time.perf_counter() - t0
    info = {"steps": steps, "train_s": train_s, "step_s": train_s / max(1, steps)}
    info["history"] = history
    ckpt = {"config": CONFIG, "settings": settings, "state_dict": model.state_dict(), "info": info}
    _save_atomic(ckpt, path)
    model.train_info = {**info, "loaded": False}
    return model


# ------------------------------------------------------------------------------------------ PTQ


def ptq(model: nn.Module, precision: str, calib: list[torch.Tensor]) -> torch.fx.GraphModule:
    """Capture ``model`` and run qgraph's TensorRT PTQ pipeline (max calibration) on it.

    Args:
        model: the FP32 :class:`TinyLM`.
        precision: a key of ``qgraph.backends.tensorrt.RULES`` (``"int8"``, ``"nvfp4"``, ...).
        calib: calibration input tensors ``(batch, ctx)``.

    Returns:
        The fake-quant GraphModule (``tokens -> logits``, dynamic batch).
    """
    import qgraph
    from qgraph import Sequential
    from qgraph.backends import tensorrt
    from qgraph.passes import Annotate, Calibrate, InsertObservers, InsertQDQ

    rules = tensorrt.RULES[precision]
    # ``rules.fallback`` is a BackendRules (older qgraph: its precision name) or None
    fb = rules.fallback
    fallback = "float" if fb is None else tensorrt.RULES[fb] if isinstance(fb, str) else fb
    gm = qgraph.capture(model, (calib[0][:4],))
    Sequential(
        [
            Annotate(rules, fallback=fallback),
            InsertObservers("max"),
            Calibrate(calib),
            InsertQDQ(),
        ]
    )(gm)
    return gm


# ----------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Train or load the teacher, report it, then smoke-test INT8 and NVFP4 PTQ on it.

    Args:
        argv: command-line arguments; ``sys.argv[1:]`` when None.

    Returns:
        The exit status (0, or 1 if a PTQ run failed).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training steps")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help="peak learning rate")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="training batch size")
    parser.add_argument("--seed", type=int, default=SEED, help="init and batch-order seed")
    parser.add_argument("--path", type=Path, default=TEACHER_PATH, help="teacher checkpoint")
    parser.add_argument("--retrain", action="store_true", help="train even if a checkpoint matches")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--measure", action="store_true", help="only print the step time and exit")
    parser.add_argument("--no-ptq", action="store_true", help="skip the PTQ smoke test")
    parser.add_argument("--calib", type=int, default=16, help="calibration batches of 32x128")
    parser.add_argument(
        "--precisions", default="int8,nvfp4", help="comma-separated TensorRT RULES keys for PTQ"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    train_b, val_b = len(corpus("train")), len(corpus("val"))
    print(f"corpus: {len(_stdlib_files())} stdlib files, train {train_b:,} B, val {val_b:,} B")
    if args.measure:
        step_s = measure_step_time(batch_size=args.batch)
        print(f"step time ({args.batch}x{CONFIG['ctx']}): {step_s:.3f} s")
        return 0

    model = teacher(
        args.path,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch,
        seed=args.seed,
        retrain=args.retrain,
    )
    info = model.train_info
    print(f"parameters: {n_params(model):,}")
    print(
        f"teacher: {info['steps']} steps, train time {info['train_s']:.1f} s "
        f"({info['step_s']:.3f} s/step)" + (f" [loaded from {args.path}]" if info["loaded"] else "")
    )
    fp32 = evaluate(model)
    print(f"FP32   val CE {fp32['ce']:.4f} nats/byte, {fp32['bits_per_byte']:.4f} bits/byte")
    if args.no_ptq:
        return 0

    status = 0
    calib = calibration_batches(args.calib)
    for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
        try:
            t0 = time.perf_counter()
            gm = ptq(model, precision, calib)
            ptq_s = time.perf_counter() - t0
            res = evaluate(gm)
            kl = kl_to_teacher(gm, model)
            print(
                f"{precision.upper():6s} val CE {res['ce']:.4f} nats/byte, "
                f"{res['bits_per_byte']:.4f} "
                f"bits/byte, KL to FP32 {kl:.4f} nats/token (PTQ {ptq_s:.1f} s)"
            )
        except Exception as exc:  # report and go on with the next precision
            status = 1
            name = precision.upper()
            print(f"{name:6s} PTQ failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
