"""The four folding schemes of ALDS and channel slicing into k groups.

A weight ``W`` of shape ``f × c × κ1 × κ2`` (a linear layer is ``κ1 = κ2 = 1``;
a 1-D conv is ``κ2 = 1``) is sliced along its input channels into ``k`` groups
``W_i`` of ``c/k`` channels each, and each slice is folded into a matrix:

    s0: f·      × c_g·κ1·κ2   encoder κ1×κ2 (grouped), decoder 1×1
    s1: f·κ1    × κ2·c_g      encoder 1×κ2 (grouped),  decoder κ1×1
    s2: f·κ2    × κ1·c_g      encoder κ1×1 (grouped),  decoder 1×κ2
    s3: f·κ1·κ2 × c_g         encoder 1×1 (grouped),   decoder κ1×κ2

``fold`` and ``unfold`` are exact inverses; a factorization ``M_i ≈ A_i B_i``
of the folded slice becomes the decoder (from ``A_i``) and the encoder (from
``B_i``) weights in ``to_conv_weights``.  Pure numpy.
"""

from __future__ import annotations

import numpy as np

SCHEMES = ("s0", "s1", "s2", "s3")


def as_4d(weight: np.ndarray) -> np.ndarray:
    """View a 2-D (f×c), 3-D (1-D conv) or 4-D weight as ``f × c × κ1 × κ2``."""
    if weight.ndim == 2:
        return weight[:, :, None, None]
    if weight.ndim == 3:
        return weight[:, :, :, None]
    if weight.ndim == 4:
        return weight
    raise ValueError(f"weight of rank {weight.ndim} cannot be folded")


def distinct_schemes(kernel: tuple[int, ...]) -> tuple[str, ...]:
    """Schemes that give different factorizations for this kernel shape.

    With ``κ2 = 1`` s1 folds like s3 and s2 like s0; with ``κ1 = 1`` s1 folds
    like s0 and s2 like s3; a 1×1 kernel has a single folding.
    """
    k1, k2 = (tuple(kernel) + (1, 1))[:2]
    if k1 == 1 and k2 == 1:
        return ("s0",)
    if k1 == 1 or k2 == 1:
        return ("s0", "s3")
    return SCHEMES


def canonical_scheme(scheme: str, kernel: tuple[int, ...]) -> str:
    """The scheme among :func:`distinct_schemes` that folds like ``scheme``."""
    k1, k2 = (tuple(kernel) + (1, 1))[:2]
    if k1 == 1 and k2 == 1:
        return "s0"
    if k2 == 1:
        return {"s1": "s3", "s2": "s0"}.get(scheme, scheme)
    if k1 == 1:
        return {"s1": "s0", "s2": "s3"}.get(scheme, scheme)
    return scheme


def far_from_one(scale: float) -> bool:
    """Whether values of this magnitude risk overflow or underflow in squares:
    then the numerical core rescales them (ordinary weights stay bit for bit)."""
    return bool(np.isfinite(scale) and scale > 0 and not (1e-100 < scale < 1e100))


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def fold(w4: np.ndarray, scheme: str, k: int) -> np.ndarray:
    """Fold the k channel slices of a 4-D weight: returns ``(k, rows, cols)``."""
    f, c, k1, k2 = w4.shape
    if c % k:
        raise ValueError(f"k={k} does not divide the {c} input channels")
    cg = c // k
    # (f, k, cg, k1, k2) -> slices first
    s = w4.reshape(f, k, cg, k1, k2).transpose(1, 0, 2, 3, 4)  # (k, f, cg, k1, k2)
    if scheme == "s0":
        return s.reshape(k, f, cg * k1 * k2)
    if scheme == "s1":  # rows (f, κ1), cols (κ2, cg)
        return s.transpose(0, 1, 3, 4, 2).reshape(k, f * k1, k2 * cg)
    if scheme == "s2":  # rows (f, κ2), cols (κ1, cg)
        return s.transpose(0, 1, 4, 3, 2).reshape(k, f * k2, k1 * cg)
    if scheme == "s3":  # rows (f, κ1, κ2), cols cg
        return s.transpose(0, 1, 3, 4, 2).reshape(k, f * k1 * k2, cg)
    raise ValueError(f"unknown scheme {scheme!r}")


def unfold(m: np.ndarray, scheme: str, shape4: tuple[int, int, int, int]) -> np.ndarray:
    """Inverse of :func:`fold`: ``(k, rows, cols)`` back to ``f × c × κ1 × κ2``."""
    f, c, k1, k2 = shape4
    k = m.shape[0]
    cg = c // k
    if scheme == "s0":
        s = m.reshape(k, f, cg, k1, k2)
    elif scheme == "s1":
        s = m.reshape(k, f, k1, k2, cg).transpose(0, 1, 4, 2, 3)
    elif scheme == "s2":
        s = m.reshape(k, f, k2, k1, cg).transpose(0, 1, 4, 3, 2)
    elif scheme == "s3":
        s = m.reshape(k, f, k1, k2, cg).transpose(0, 1, 4, 2, 3)
    else:
        raise ValueError(f"unknown scheme {scheme!r}")
    return s.transpose(1, 0, 2, 3, 4).reshape(f, c, k1, k2)


def encoder_kernel(scheme: str, kernel: tuple[int, int]) -> tuple[int, int]:
    k1, k2 = kernel
    return {"s0": (k1, k2), "s1": (1, k2), "s2": (k1, 1), "s3": (1, 1)}[scheme]


def decoder_kernel(scheme: str, kernel: tuple[int, int]) -> tuple[int, int]:
    k1, k2 = kernel
    return {"s0": (1, 1), "s1": (k1, 1), "s2": (1, k2), "s3": (k1, k2)}[scheme]


def to_conv_weights(a: np.ndarray, b: np.ndarray, scheme: str, shape4) -> tuple[np.ndarray, np.ndarray]:
    """Turn per-group factors into (encoder, decoder) conv weights.

    ``a``: ``(k, rows, j)``, ``b``: ``(k, j, cols)`` with ``fold(W)[i] ≈ a[i] @ b[i]``.
    Returns the encoder weight ``(k·j, c/k, e1, e2)`` (a conv with ``group=k``)
    and the decoder weight ``(f, k·j, d1, d2)`` (a dense conv over the
    concatenated group outputs).
    """
    f, c, k1, k2 = shape4
    k, _, j = a.shape
    cg = c // k
    if scheme == "s0":
        enc = b.reshape(k, j, cg, k1, k2)
        dec = a.reshape(k, f, j, 1, 1)
    elif scheme == "s1":  # cols (κ2, cg); rows (f, κ1)
        enc = b.reshape(k, j, k2, cg).transpose(0, 1, 3, 2)[:, :, :, None, :]
        dec = a.reshape(k, f, k1, j).transpose(0, 1, 3, 2)[:, :, :, :, None]
    elif scheme == "s2":  # cols (κ1, cg); rows (f, κ2)
        enc = b.reshape(k, j, k1, cg).transpose(0, 1, 3, 2)[:, :, :, :, None]
        dec = a.reshape(k, f, k2, j).transpose(0, 1, 3, 2)[:, :, :, None, :]
    elif scheme == "s3":  # cols cg; rows (f, κ1, κ2)
        enc = b.reshape(k, j, cg, 1, 1)
        dec = a.reshape(k, f, k1, k2, j).transpose(0, 1, 4, 2, 3)
    else:
        raise ValueError(f"unknown scheme {scheme!r}")
    enc = enc.reshape(k * j, cg, *enc.shape[3:])
    # decoder input channel index is i*j + r
    dec = dec.transpose(1, 0, 2, 3, 4).reshape(f, k * j, *dec.shape[3:])
    return np.ascontiguousarray(enc), np.ascontiguousarray(dec)
