"""Calibration data: a ``.npz`` file with one array per model input (samples on axis 0), or a
folder of such files. Arrays are checked against the model's inputs before any work starts and
then served in batches, one file at a time, so a folder larger than memory streams through.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from qgraph._errors import InputError

__all__ = ["CalibrationData"]

InputSpec = tuple[str, tuple[int | None, ...], torch.dtype]


class CalibrationData:
    """A re-iterable source of calibration batches (tuples of tensors in input order).

    Args:
        path: a ``.npz`` file or a folder of ``.npz`` files.
        inputs: the model's inputs as ``(name, shape, dtype)``; None in a shape is a dynamic dim.
        batch_size: samples per batch.
        exact: every batch has exactly ``batch_size`` samples (a program with a static batch);
            the samples that do not fill a last batch are left out.

    Raises:
        InputError: naming the file and array when data is missing, mis-shaped, empty or not finite.
    """

    def __init__(
        self, path: str | Path, inputs: list[InputSpec], batch_size: int = 32, *, exact: bool = False
    ) -> None:
        self.path = Path(path)
        self.inputs = inputs
        if batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.exact = exact
        if self.path.is_dir():
            self.files = sorted(self.path.glob("*.npz"))
            if not self.files:
                raise InputError(f"{self.path}: folder holds no .npz files")
        elif self.path.is_file():
            self.files = [self.path]
        else:
            raise InputError(f"{self.path}: no such calibration file or folder")
        self._nonzero: set[str] = set()
        self._file_samples = [self._check(f) for f in self.files]
        self.samples = sum(self._file_samples)
        for name, _, dtype in self.inputs:
            if dtype.is_floating_point and name not in self._nonzero:
                raise InputError(
                    f"{self.path}: input {name!r} is all zeros in every sample "
                    "(zero range: no scale can be calibrated)"
                )
        if exact and self.samples < batch_size:
            raise InputError(
                f"{self.path}: {self.samples} samples, but the model's batch is fixed at {batch_size}"
            )

    def _open(self, file: Path) -> np.lib.npyio.NpzFile:
        if not zipfile.is_zipfile(file):
            raise InputError(f"{file}: not a .npz file")
        try:
            return np.load(file, allow_pickle=False)
        except Exception as exc:
            raise InputError(f"{file}: cannot read ({exc})") from None

    def _check(self, file: Path) -> int:
        """Validate one file's arrays; returns its sample count."""
        with self._open(file) as npz:
            counts = set()
            for name, shape, dtype in self.inputs:
                if name not in npz.files:
                    have = ", ".join(npz.files) or "nothing"
                    raise InputError(f"{file}: no array for model input {name!r} (has: {have})")
                try:
                    array = npz[name]
                except Exception as exc:
                    raise InputError(f"{file}: array {name!r} cannot be read ({exc})") from None
                _check_array(file, name, array, shape, dtype)
                if np.any(array):
                    self._nonzero.add(name)
                counts.add(array.shape[0])
            if len(counts) > 1:
                raise InputError(f"{file}: inputs have different sample counts {sorted(counts)}")
        return counts.pop()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for file in self.files:
            with self._open(file) as npz:
                arrays = [npz[name] for name, _, _ in self.inputs]
            n = arrays[0].shape[0]
            if self.exact:
                n -= n % self.batch_size
            for start in range(0, n, self.batch_size):
                yield tuple(
                    torch.from_numpy(np.ascontiguousarray(a[start : start + self.batch_size]))
                    .to(dtype)
                    for a, (_, _, dtype) in zip(arrays, self.inputs)
                )

    def __len__(self) -> int:
        """Number of batches."""
        if self.exact:
            return sum(n // self.batch_size for n in self._file_samples)
        return sum(-(-n // self.batch_size) for n in self._file_samples)

    def take(self, samples: int) -> tuple[torch.Tensor, ...]:
        """The first ``samples`` samples of every input, concatenated (for parity checks)."""
        parts: list[list[torch.Tensor]] = [[] for _ in self.inputs]
        have = 0
        for batch in self:
            if parts[0] and any(b.shape[1:] != p[0].shape[1:] for b, p in zip(batch, parts)):
                break  # a file with another (dynamic) size: parity runs on the first shape only
            for part, tensor in zip(parts, batch):
                part.append(tensor)
            have += batch[0].shape[0]
            if have >= samples:
                break
        return tuple(torch.cat(p)[:samples] for p in parts)


def _check_array(file: Path, name: str, array: np.ndarray, shape: tuple, dtype: torch.dtype) -> None:
    where = f"{file}: array {name!r}"
    if array.dtype.kind not in "fiub":
        raise InputError(f"{where} has dtype {array.dtype}, not numeric")
    if array.ndim != len(shape):
        raise InputError(
            f"{where} has shape {array.shape}; the model input has rank {len(shape)} "
            f"(expected {_fmt(shape)}, samples on axis 0)"
        )
    if array.shape[0] == 0:
        raise InputError(f"{where} is empty (0 samples)")
    for i, (got, want) in enumerate(zip(array.shape, shape)):
        if i > 0 and want is not None and got != want:
            raise InputError(f"{where} has shape {array.shape}, the model expects {_fmt(shape)}")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise InputError(f"{where} contains NaN or Inf")
    if not dtype.is_floating_point and array.dtype.kind == "f":
        raise InputError(f"{where} holds floats, the model input is {dtype} (token ids, indices): save integers")
    if not dtype.is_floating_point and dtype != torch.bool and array.dtype.kind in "iu":
        info = torch.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise InputError(f"{where} has values outside {dtype}'s range [{info.min}, {info.max}]")


def _fmt(shape: tuple) -> str:
    return "(" + ", ".join("N" if i == 0 and d is None else "?" if d is None else str(d) for i, d in enumerate(shape)) + ")"
