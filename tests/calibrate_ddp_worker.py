"""One rank of the two-process calibration of tests/test_calibrate_ranks.py (torchrun, gloo, CPU).

Rank r calibrates on its share of the batches (rank 1 on none for the ``uneven`` run), for every
calibrator, on the torch graph and on the ONNX model; it writes each observer's range (amax), its
batch count and the pass's counts. ``merge_ranks=False`` runs are written too: each rank's own.
Then a failing rank (a NaN), GPTQ of the W4A16 test model and auto-precision of the zoo
transformer, each on the rank's share of its data.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from qgraph import QGraphError
from qgraph.calibrators import CALIBRATORS
from qgraph.passes import GPTQ, Calibrate

sys.path.insert(0, str(Path(__file__).parent))
from test_calibrate_ranks import DATA, GPTQ_DATA, _ranges, fx_observed, onnx_observed  # noqa: E402
from test_auto_precision import CANDIDATES, _float  # noqa: E402
from test_gptq import _ptq, _weights  # noqa: E402

from qgraph.passes import AutoPrecision  # noqa: E402
from qgraph.passes.auto_precision import AUTO_PRECISION_META  # noqa: E402


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = {}
    for share in ("even", "uneven"):
        mine = DATA[rank::2] if share == "even" else (DATA if rank == 0 else [])
        for calibrator in CALIBRATORS:
            for kind, build in (("fx", fx_observed), ("onnx", onnx_observed)):
                graph = build(calibrator)
                result = Calibrate(mine)(graph)
                out[f"{share} {calibrator} {kind}"] = {"ranges": _ranges(graph), "counts": dict(result.counts)}
    # a NaN on rank 1: both ranks raise (rank 0 names rank 1) instead of waiting in a collective
    bad = [DATA[0]] if rank == 0 else [DATA[1] * float("nan")]
    for kind, build in (("fx", fx_observed), ("onnx", onnx_observed)):
        try:
            Calibrate(bad)(build("mse"))
            out[f"failure {kind}"] = "no error"
        except QGraphError as exc:
            out[f"failure {kind}"] = str(exc)
    # gptq: each rank's share of the data, the layer statistics summed over the ranks
    _, gm, _ = _ptq("W4A16", data=GPTQ_DATA)
    GPTQ(GPTQ_DATA[rank::2])(gm)
    torch.save(_weights(gm), out_dir / f"gptq{rank}.pt")
    # auto-precision: each rank's share of the batches; trials calibrate and score across ranks
    gm, data = _float()
    AutoPrecision(CANDIDATES, data[rank::2], effective_bits=6.0, fallback=True)(gm)
    out["auto-precision"] = gm.meta[AUTO_PRECISION_META]
    own = fx_observed("max")
    result = Calibrate(DATA[rank::2], merge_ranks=False)(own)
    out["own max fx"] = {"ranges": _ranges(own), "counts": dict(result.counts)}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
