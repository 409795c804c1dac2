"""scikit-learn's digits as a small real image-classification task.

The data ships inside scikit-learn (1,797 8x8 grey images, 10 classes); nothing
is downloaded. Pixels (0..16) are scaled to [0, 1], upsampled bilinearly to
``size`` x ``size`` and normalized with the mean and standard deviation of the
training split, giving float32 tensors of shape (N, 1, size, size).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "TEST_FRACTION",
    "DigitsNormalization",
    "digits_normalization",
    "preprocess_digits",
    "load_digits_split",
    "digits_loaders",
]

TEST_FRACTION = 0.25


@dataclass(frozen=True)
class DigitsNormalization:
    """x_model = (upsample(pixels / 16) - mean) / std."""

    pixel_scale: float
    mean: float
    std: float


def _raw_split(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0  # (N, 8, 8) in [0, 1]
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=TEST_FRACTION, stratify=y, random_state=seed)


def _upsample(x: np.ndarray, size: int) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1)  # (N, 1, 8, 8)
    if size != t.shape[-1]:
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return t.contiguous()


def digits_normalization(seed: int = 0) -> DigitsNormalization:
    """Mean and std of the training split's [0, 1] pixels (bilinear upsampling keeps the mean)."""
    x_tr, _, _, _ = _raw_split(seed)
    return DigitsNormalization(pixel_scale=16.0, mean=float(x_tr.mean()), std=float(x_tr.std()))


def preprocess_digits(images: np.ndarray, size: int = 16, norm: DigitsNormalization | None = None) -> torch.Tensor:
    """Raw digits pixels (N, 8, 8) with values 0..16 -> normalized (N, 1, size, size) float32."""
    norm = norm or digits_normalization(0)
    x = _upsample(np.asarray(images, dtype=np.float32) / norm.pixel_scale, size)
    return (x - norm.mean) / norm.std


def load_digits_split(size: int = 16, seed: int = 0):
    """Fixed stratified 75/25 split of digits as float32 tensors.

    Returns ``(x_train, y_train, x_test, y_test)`` with x of shape (N, 1, size, size)
    and y int64 class labels. The same ``seed`` always gives the same split.
    """
    x_tr, x_te, y_tr, y_te = _raw_split(seed)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    xt = (_upsample(x_tr, size) - mean) / std
    xv = (_upsample(x_te, size) - mean) / std
    return xt.float(), torch.from_numpy(y_tr), xv.float(), torch.from_numpy(y_te)


def digits_loaders(
    batch_size: int = 64,
    size: int = 16,
    seed: int = 0,
    *,
    shuffle_seed: int | None = None,
    test_batch_size: int = 256,
):
    """(train_loader, test_loader) over :func:`load_digits_split`.

    The training loader shuffles with a generator seeded by ``shuffle_seed``
    (default: ``seed``), so the batch order is reproducible.
    """
    x_tr, y_tr, x_te, y_te = load_digits_split(size=size, seed=seed)
    g = torch.Generator().manual_seed(seed if shuffle_seed is None else shuffle_seed)
    train = DataLoader(TensorDataset(x_tr, y_tr), batch_size=batch_size, shuffle=True, generator=g)
    test = DataLoader(TensorDataset(x_te, y_te), batch_size=test_batch_size, shuffle=False)
    return train, test
