"""The README demo model: a small residual CNN trained on scikit-learn's digits (8x8, 10 classes).

:func:`build_assets` (run by ``benchmarks/train_digits.py``) trains :class:`DigitsCNN` and writes
the bundled files under :data:`ASSET_DIR`:

* ``digits_cnn.pt2`` — the eval-mode model, ``torch.export``-ed with a dynamic batch dimension;
  its one input is named ``x`` and takes ``(N, 1, 8, 8)`` float32 pixels in [0, 1].
* ``digits_calib.npz`` — key ``x``: 512 training images, the model's calibration data.
* ``digits_test.npz`` — keys ``x`` and ``y``: the held-out test split (labels int64).

scikit-learn is needed only to load the data and train; the bundled files are read without it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = [
    "DigitsCNN",
    "load_split",
    "train",
    "accuracy",
    "build_assets",
    "ASSET_DIR",
    "MODEL_PATH",
    "CALIB_PATH",
    "TEST_PATH",
    "CALIB_SAMPLES",
]

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets"
MODEL_PATH = ASSET_DIR / "digits_cnn.pt2"
CALIB_PATH = ASSET_DIR / "digits_calib.npz"
TEST_PATH = ASSET_DIR / "digits_test.npz"
#: training images saved as calibration data
CALIB_SAMPLES = 512


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU x2 → max pool (8x8 → 4x4) → residual block → global average pool → linear."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = _conv_bn(1, 16)
        self.conv2 = _conv_bn(16, 32)
        self.pool = nn.MaxPool2d(2)
        self.res1 = _conv_bn(32, 32)
        self.res2 = _conv_bn(32, 32)
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The argument's name becomes the exported input's name, which calibration files key on.
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.res2(torch.relu(self.res1(x))) + x)
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(x)


def load_split(seed: int = 0) -> dict[str, np.ndarray]:
    """scikit-learn's digits as a stratified 75/25 split.

    Returns:
        ``x_train``, ``x_test``: float32 ``(N, 1, 8, 8)`` pixels scaled to [0, 1];
        ``y_train``, ``y_test``: int64 labels 0-9.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # raw pixels are 0..16
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y
    )
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to one pixel (zero fill): cheap augmentation for 8x8 digits."""
    n = x.shape[0]
    padded = nn.functional.pad(x[:, 0], (1, 1, 1, 1))  # (N, 10, 10)
    dy, dx = torch.randint(0, 3, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(8))[:, :, None]  # (N, 8, 1)
    cols = (dx[:, None] + torch.arange(8))[:, None, :]  # (N, 1, 8)
    return padded[torch.arange(n)[:, None, None], rows, cols][:, None]


def train(
    seed: int = 0,
    epochs: int = 30,
    batch_size: int = 32,
    lr: float = 3e-3,
    augment: bool = True,
    data: dict[str, np.ndarray] | None = None,
) -> DigitsCNN:
    """Train :class:`DigitsCNN` on the training split (deterministic for a given seed).

    Args:
        seed: seeds the weights, the batch order, the augmentation and the data split.
        epochs: passes over the training split; the learning rate follows a cosine to zero.
        batch_size: samples per Adam step.
        lr: peak Adam learning rate.
        augment: shift training images by up to one pixel.
        data: a :func:`load_split` result to reuse (loaded with ``seed`` when None).

    Returns:
        The trained model, in eval mode.
    """
    data = load_split(seed) if data is None else data
    x = torch.from_numpy(data["x_train"])
    y = torch.from_numpy(data["y_train"])
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-len(x) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    # Ops this small gain nothing from intra-op threads, and on a busy machine their barriers
    # made an epoch ~100x slower (20 s vs 0.2 s on 2 cores), so train single-threaded.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator)
            for i in range(0, len(x), batch_size):
                idx = order[i : i + batch_size]
                xb = _shift(x[idx], generator) if augment else x[idx]
                loss = nn.functional.cross_entropy(model(xb), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def accuracy(model, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """Top-1 accuracy (percent) of ``model`` (any callable tensor → logits) on ``(x, y)``."""
    with torch.no_grad():
        logits = model(torch.as_tensor(x))
    return 100.0 * float((logits.argmax(1) == torch.as_tensor(y)).double().mean())


def build_assets(seed: int = 0, asset_dir: Path | None = None) -> dict:
    """Train, then write the model, calibration and test files (see the module docstring).

    Args:
        seed: passed to :func:`load_split` and :func:`train`.
        asset_dir: where to write the files; :data:`ASSET_DIR` when None (the bundled ones).

    Returns:
        ``accuracy`` (float test accuracy, percent), ``train_s`` (training wall time) and the
        written paths ``model``, ``calib`` and ``test``.
    """
    asset_dir = ASSET_DIR if asset_dir is None else Path(asset_dir)
    paths = {
        "model": asset_dir / MODEL_PATH.name,
        "calib": asset_dir / CALIB_PATH.name,
        "test": asset_dir / TEST_PATH.name,
    }
    data = load_split(seed)
    start = time.perf_counter()
    model = train(seed, data=data)
    train_s = time.perf_counter() - start

    # Batch 1 would specialise the batch dimension, so export with a batch of 2.
    example = torch.from_numpy(data["x_test"][:2])
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    asset_dir.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, paths["model"])
    np.savez_compressed(paths["calib"], x=data["x_train"][:CALIB_SAMPLES])
    np.savez_compressed(paths["test"], x=data["x_test"], y=data["y_test"])
    acc = accuracy(model, data["x_test"], data["y_test"])
    return {"accuracy": acc, "train_s": train_s, **paths}
