"""NVFP4 PTQ vs QAD on the tiny LM made twice as wide: does QAD close more of the gap there?

The study's LM (``benchmarks/tinylm.py``: 4 blocks, d 256) closes 32–38 % of NVFP4 PTQ's KL gap by
QAD. This script repeats the NVFP4 PTQ and QAD arms on the same architecture with 2 blocks of
width 512 (MLP 2048, 8 heads; 6.6 M parameters), trained the same way (1200 steps of 32 × 128
bytes of stdlib sources, cached in ``benchmarks/.cache/tinylm_d512_teacher.pt``; ~14 minutes
here), with the study's recipe: max calibration on 8 × 32 windows, then 400 QAD steps of 16 × 128
bytes, AdamW lr 1e-4 with warmup and cosine decay, KL(teacher ‖ student) at temperature 1. The
QAD graph is trained compiled whole (``torch.compile``). It also scores PTQ with only the weights
or only the activations quantized, which shows where the gap is.

Usage: ``.venv/bin/python benchmarks/study_qad_wide.py [--out benchmarks/results_qad_wide.json]``
(about 20 minutes with the teacher to train, 6 once it is cached; 2 threads).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import study_qad  # noqa: E402
import tinylm  # noqa: E402

import qgraph  # noqa: E402
from qgraph.passes import FoldBatchNorm, InsertDistillTaps, InsertFakeQuant, InsertQDQ  # noqa: E402

WIDE = {"n_layer": 2, "d_model": 512, "n_head": 8, "d_ff": 2048}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", type=Path, default=HERE / "results_qad_wide.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    tinylm.CONFIG.update(WIDE)  # the module's model config: teacher(), batches() and TinyLM read it
    start = time.perf_counter()
    model = tinylm.teacher(path=tinylm.CACHE / "tinylm_d512_teacher.pt")
    print(f"teacher: {tinylm.n_params(model)} parameters, {time.perf_counter() - start:.0f} s", flush=True)
    calib = tinylm.calibration_batches(8, 32)
    log_t = tinylm.teacher_log_probs(model)
    fp32 = tinylm.score(model, log_t)
    base = study_qad._calibrated(model, calib[0][:4], "nvfp4", calib)
    ptq = copy.deepcopy(base)
    InsertQDQ()(ptq)
    rows = {"fp32": fp32, "ptq": tinylm.score(ptq, log_t)}
    rows["ptq_weights_only"] = tinylm.score(study_qad._without_quantizers(ptq, "activation"), log_t)
    rows["ptq_activations_only"] = tinylm.score(study_qad._without_quantizers(ptq, "weight"), log_t)
    qad = copy.deepcopy(base)
    teacher = qgraph.capture(model, (calib[0][:4],))
    FoldBatchNorm()(teacher)
    InsertFakeQuant()(qad)
    InsertDistillTaps(teacher, temperature=1.0)(qad)
    start = time.perf_counter()
    history = study_qad._finetune(torch.compile(qad), tinylm.batches("train", 16, tinylm.CONFIG["ctx"], seed=11),
                                  lambda out, y: out[1], args.steps, 1e-4, "QAD nvfp4")
    rows["qad"] = tinylm.score(qad, log_t)
    ptq_kl, ptq_ce = rows["ptq"]["kl"], rows["ptq"]["ce"]
    result = {
        "config": dict(tinylm.CONFIG), "parameters": tinylm.n_params(model), "steps": args.steps, **rows,
        "qad_train_s": time.perf_counter() - start,
        "kl_gap_closed": (ptq_kl - rows["qad"]["kl"]) / ptq_kl,
        "ce_gap_closed": (ptq_ce - rows["qad"]["ce"]) / (ptq_ce - fp32["ce"]),
        "qad_loss": history,
    }
    for name in ("fp32", "ptq", "ptq_weights_only", "ptq_activations_only", "qad"):
        print(f"{name:22s} CE {rows[name]['ce']:.4f}  KL {rows[name]['kl']:.4f}")
    print(f"QAD closes {100 * result['kl_gap_closed']:.0f} % of the KL gap, {100 * result['ce_gap_closed']:.0f} % of the CE gap")
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
