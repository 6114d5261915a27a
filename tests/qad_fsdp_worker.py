"""One rank of the two-process FSDP2 QAD run of tests/test_qad_fsdp.py (torchrun, gloo, CPU).

Both ranks build the same student twice (INT8 PTQ of the zoo MLP, insert-fake-quant with learned
activation and weight scales, insert-distill-taps with the FP32 teacher). One copy is sharded with
``fully_shard`` (FSDP2), the other wrapped in DDP; both train on this rank's batches. Each rank
writes the FSDP student's full (gathered) state, the DDP student's state and the FSDP loss history.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import qgraph
from qgraph import Sequential
from qgraph.backends import tensorrt
from qgraph.examples.zoo import make
from qgraph.passes import Annotate, Calibrate, InsertDistillTaps, InsertFakeQuant, InsertObservers

STEPS = 25


def student() -> torch.fx.GraphModule:
    """The QAD student (the same on every rank and in the test process)."""
    torch.manual_seed(0)
    model, x = make("mlp")
    teacher = qgraph.capture(model, (x,))
    gm = qgraph.capture(model, (x,))
    calib = [torch.randn(32, 64, generator=torch.Generator().manual_seed(1))]
    Sequential(
        [
            Annotate(tensorrt.INT8),
            InsertObservers("max"),
            Calibrate(calib),
            InsertFakeQuant(learn_scales=True, learn_weight_scales=True),
            InsertDistillTaps(teacher, taps={"relu": 0.1}),
        ]
    )(gm)
    return gm


def train(module: torch.nn.Module, params: list[torch.Tensor], batch: torch.Tensor) -> list[float]:
    opt = torch.optim.SGD(params, lr=0.2)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        _, loss = module(batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    batch = torch.randn(32, 64, generator=torch.Generator().manual_seed(100 + rank)) * 2.0  # this rank's data

    sharded = student()
    sharded.train()
    fully_shard(sharded, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    losses = train(sharded, [p for p in sharded.parameters() if p.requires_grad], batch)
    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))

    replicated = student()
    replicated.train()
    ddp = DistributedDataParallel(replicated)
    train(ddp, [p for p in replicated.parameters() if p.requires_grad], batch)

    def own(state: dict) -> dict:  # the student's weights and scales, not the frozen teacher's
        return {k: v.detach().clone() for k, v in state.items() if not k.startswith("distill_teacher")}

    torch.save({"fsdp": own(full), "ddp": own(replicated.state_dict())}, out_dir / f"rank{rank}.pt")
    (out_dir / f"rank{rank}.json").write_text(json.dumps(losses))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
