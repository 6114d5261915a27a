"""One rank of the two-process QAD run of tests/test_qad_ddp.py (torchrun, gloo, CPU).

Both ranks build the same student (INT8 PTQ of the zoo MLP, then insert-fake-quant with learned
activation scales, then insert-distill-taps with the FP32 teacher), wrap it in DDP and train on
their own batches; each writes its loss history and its student's state (weights and scales).
Then a QAT graph with observe_steps=2 sees 4x wider data on rank 1: the observed ranges must agree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import qgraph
from qgraph import Sequential
from qgraph.backends import tensorrt
from qgraph.examples.zoo import make
from qgraph.passes import Annotate, Calibrate, InsertDistillTaps, InsertFakeQuant, InsertObservers


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model, x = make("mlp")
    teacher = qgraph.capture(model, (x,))
    student = qgraph.capture(model, (x,))
    calib = [torch.randn(32, 64, generator=torch.Generator().manual_seed(1))]
    Sequential(
        [
            Annotate(tensorrt.INT8),
            InsertObservers("max"),
            Calibrate(calib),
            InsertFakeQuant(learn_scales=True),
            InsertDistillTaps(teacher, taps={"relu": 0.1}),
        ]
    )(student)
    student.train()
    ddp = DistributedDataParallel(student)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.2)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    batch = torch.randn(32, 64, generator=g) * 2.0
    losses = []
    for _ in range(25):
        opt.zero_grad()
        _, loss = ddp(batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    state = {k: v for k, v in student.state_dict().items() if not k.startswith("distill_teacher")}
    torch.save(state, out_dir / f"rank{rank}.pt")

    # observed ranges: rank 1 sees 4x wider data; both must widen to it (max-reduced)
    observed = qgraph.capture(model, (x,))
    Sequential([Annotate(tensorrt.INT8), InsertObservers("max"), Calibrate(calib), InsertFakeQuant(observe_steps=2)])(
        observed
    )
    observed.train()
    wide = DistributedDataParallel(observed)
    for _ in range(3):
        wide(batch * (4.0 if rank == 1 else 1.0)).pow(2).mean().backward()
    torch.save({"fq_x.scale": observed.get_submodule("fq_x").scale}, out_dir / f"observed{rank}.pt")
    (out_dir / f"rank{rank}.json").write_text(json.dumps(losses))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
