"""One rank of the two-process calibration of tests/test_calibrate_ranks.py (torchrun, gloo, CPU).

Rank r calibrates on its share of the batches (rank 1 on none for the ``uneven`` run), for every
calibrator, on the torch graph and on the ONNX model; it writes each observer's range (amax), its
batch count and the pass's counts. ``merge_ranks=False`` runs are written too: each rank's own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from qgraph.calibrators import CALIBRATORS
from qgraph.passes import Calibrate

sys.path.insert(0, str(Path(__file__).parent))
from test_calibrate_ranks import DATA, _ranges, fx_observed, onnx_observed  # noqa: E402


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
    own = fx_observed("max")
    result = Calibrate(DATA[rank::2], merge_ranks=False)(own)
    out["own max fx"] = {"ranges": _ranges(own), "counts": dict(result.counts)}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
