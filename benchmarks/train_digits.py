"""Train the README demo's digits CNN and (re)write the bundled assets.

Usage::

    python benchmarks/train_digits.py [--seed 0]

Writes ``qgraph/assets/digits_cnn.pt2``, ``digits_calib.npz`` and ``digits_test.npz`` (see
:mod:`qgraph.examples.digits`) and prints the float model's held-out accuracy, the training wall
time and the asset paths. Needs scikit-learn (``pip install -e .[test]``).
"""

from __future__ import annotations

import argparse

from qgraph.examples.digits import build_assets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="data split, weights and batch order")
    args = parser.parse_args()
    result = build_assets(seed=args.seed)
    print(f"float test accuracy: {result['accuracy']:.2f}%")
    print(f"train time: {result['train_s']:.1f} s")
    for name in ("model", "calib", "test"):
        path = result[name]
        print(f"{name}: {path} ({path.stat().st_size / 1024:.1f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
