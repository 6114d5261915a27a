"""Two-process torchrun (gloo, CPU) QAD: the loss decreases and both ranks end with identical
weights and scales (DDP all-reduces the gradients of weights and learned scales; tracked weight
scales follow the identical weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch


def test_two_rank_qad_stays_in_sync(tmp_path):
    worker = Path(__file__).with_name("qad_ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    losses = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert states[0].keys() == states[1].keys()
    scales = [k for k in states[0] if k.endswith(".scale")]
    assert len(scales) == 6  # 3 learned activation scales, 3 tracked weight scales
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    for history in losses:
        assert sum(history[-5:]) < 0.7 * sum(history[:5]), history
    assert losses[0] != losses[1]  # the ranks did see different data
    observed = [torch.load(tmp_path / f"observed{r}.pt")["fq_x.scale"] for r in (0, 1)]
    assert torch.equal(observed[0], observed[1])
    wide = torch.randn(32, 64, generator=torch.Generator().manual_seed(101)) * 2.0 * 4.0
    assert float(observed[0]) >= float(wide.abs().max()) / 127 * (1 - 1e-6)  # rank 1's range
