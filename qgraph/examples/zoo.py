"""The test zoo: small models that cover the patterns a quantizer must place Q/DQ around.

* :class:`ResCNN` — conv-BN-ReLU stem, a residual block with a downsample conv, max and average
  pooling, a linear head.
* :class:`DepthwiseCNN` — depthwise-separable convs (groups = channels) with BN and ReLU6.
* :class:`TransformerBlock` — self-attention written with matmuls, LayerNorm, GELU MLP, residuals.
* :class:`MLP` — linear-ReLU stack.

Each entry of :data:`ZOO` gives the model factory and an example-input factory (batch 4).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["ResCNN", "DepthwiseCNN", "TransformerBlock", "MLP", "ZOO", "make"]


class _ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)
        )


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _ConvBN(cin, cout, 3, stride)
        self.conv2 = _ConvBN(cout, cout, 3)
        self.down = _ConvBN(cin, cout, 1, stride) if (stride != 1 or cin != cout) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + identity)


class ResCNN(nn.Module):
    """Conv-BN-ReLU stem → max pool → two residual blocks → global average pool → linear."""

    def __init__(self, in_ch: int = 3, classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = _ConvBN(in_ch, width)
        self.pool = nn.MaxPool2d(2)
        self.block1 = _Block(width, width, 1)
        self.block2 = _Block(width, 2 * width, 2)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.stem(x)))
        x = self.block2(self.block1(x))
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(x)


class DepthwiseCNN(nn.Module):
    """MobileNet-style depthwise-separable convs."""

    def __init__(self, in_ch: int = 3, classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = _ConvBN(in_ch, width)
        layers = []
        for cin, cout, stride in ((width, 2 * width, 1), (2 * width, 4 * width, 2)):
            layers += [_ConvBN(cin, cin, 3, stride, groups=cin), nn.ReLU6(), _ConvBN(cin, cout, 1), nn.ReLU6()]
        self.body = nn.Sequential(*layers)
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(nn.functional.relu6(self.stem(x)))
        x = self.pool(x).mean((2, 3))
        return self.head(x)


class TransformerBlock(nn.Module):
    """Pre-LN encoder block: attention (q·kᵀ, softmax, ·v via matmul), GELU MLP, residual adds."""

    def __init__(self, dim: int = 32, heads: int = 4, hidden: int = 64) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, h, d // h).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(d // h), dim=-1)
        y = torch.matmul(att, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class MLP(nn.Module):
    """Three linear layers with ReLU."""

    def __init__(self, din: int = 64, hidden: int = 128, classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(din, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def randomize_batchnorm(model: nn.Module, seed: int, gamma: tuple[float, float] = (0.5, 1.0)) -> nn.Module:
    """Give BatchNorms non-trivial statistics so folding is really tested (eval mode).

    ``gamma``: the BatchNorm weights are drawn from ``[gamma[0], gamma[0] + gamma[1])``.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) * gamma[1] + gamma[0])
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


#: name → (model factory, input shape without batch)
ZOO = {
    "rescnn": (ResCNN, (3, 16, 16)),
    "depthwise": (DepthwiseCNN, (3, 16, 16)),
    "transformer": (TransformerBlock, (8, 32)),
    "mlp": (MLP, (64,)),
}


def make(name: str, seed: int = 0, batch: int = 4) -> tuple[nn.Module, torch.Tensor]:
    """A zoo model (eval mode, seeded weights and BN statistics) and an example input."""
    factory, shape = ZOO[name]
    torch.manual_seed(seed)
    model = randomize_batchnorm(factory(), seed)
    x = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed + 1))
    return model, x
