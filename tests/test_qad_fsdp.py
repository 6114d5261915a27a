"""Two-process torchrun (gloo, CPU) QAD under FSDP2 (``fully_shard``), learned activation and
weight scales included: the loss decreases, both ranks gather the same full state, it matches the
same training under DDP, and the gathered student lowers to TensorRT QDQ ONNX with parity."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import torch

from qgraph.backends import tensorrt
from qgraph.parity import check_parity

WORKER = Path(__file__).with_name("qad_fsdp_worker.py")


def _worker_module():
    spec = importlib.util.spec_from_file_location("qad_fsdp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_rank_fsdp_qad_matches_ddp_and_lowers(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    losses = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    fsdp, ddp = states[0]["fsdp"], states[0]["ddp"]
    scales = [k for k in fsdp if k.endswith(".scale")]
    assert len(scales) == 6  # 3 learned activation scales (per tensor), 3 learned weight scales (per channel)
    for key in fsdp:
        assert torch.equal(fsdp[key], states[1]["fsdp"][key]), key  # one full state, gathered on both ranks
        # the same updates as DDP's, bit for bit: both average the two ranks' gradients, and with
        # two ranks the sum is one addition and halving it is exact, whatever the order
        assert torch.equal(fsdp[key], ddp[key]), key
    for history in losses:
        assert sum(history[-5:]) < 0.7 * sum(history[:5]), history
    assert losses[0] != losses[1]  # the ranks did see different data

    worker = _worker_module()
    gm = worker.student()
    calibrated = {k: v.clone() for k, v in gm.state_dict().items() if k.endswith(".scale")}
    missing, unexpected = gm.load_state_dict(fsdp, strict=False)
    assert unexpected == [] and all(k.startswith("distill_teacher") for k in missing)
    assert any(not torch.equal(gm.state_dict()[k], calibrated[k]) for k in scales)  # the scales did train
    gm.eval()
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))
    onnx_bytes = tensorrt.lower(gm, (x,))
    report = check_parity(gm, onnx_bytes, (x,))
    assert report.max_relative <= 0.01, report.summary()
    model = onnx.load_from_string(onnx_bytes)
    assert tensorrt.inspect_model(model).violations == []
    per_tensor = [i.name for i in model.graph.initializer if i.name.endswith(".scale") and len(i.dims) == 0]
    assert sorted(per_tensor) == ["fq_relu.scale", "fq_relu_1.scale", "fq_x.scale"]  # TensorRT needs scalars
