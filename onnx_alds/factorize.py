"""The factors of one configuration: per-group truncated SVD, done in float64.

``fold_s(W)_i ≈ A_i B_i`` with ``A_i = U_i[:, :j] √S_i`` and ``B_i = √S_i V_iᵀ[:j]``
(splitting √S evenly keeps both factors equally scaled, which matters for
float16).  The returned conv weights are cast back to the weight's dtype.
"""

from __future__ import annotations

import numpy as np

from .folding import as_4d, fold, to_conv_weights


def truncated_factors(w4: np.ndarray, scheme: str, k: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``a (k, rows, rank)`` and ``b (k, rank, cols)`` in float64."""
    m = fold(np.asarray(w4, dtype=np.float64), scheme, k)
    full = min(m.shape[1], m.shape[2])
    if not 1 <= rank <= full:
        raise ValueError(f"rank {rank} is outside 1..{full} for k={k}, scheme {scheme}")
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    root = np.sqrt(s[:, :rank])
    a = u[:, :, :rank] * root[:, None, :]
    b = root[:, :, None] * vt[:, :rank, :]
    return a, b


def factorize(weight: np.ndarray, scheme: str, k: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Encoder ``(k·rank, c/k, e1, e2)`` and decoder ``(f, k·rank, d1, d2)`` conv
    weights of ``weight`` (2-D ``f×c`` or a 3-D/4-D conv weight) in its dtype."""
    w4 = as_4d(weight)
    a, b = truncated_factors(w4, scheme, k, rank)
    enc, dec = to_conv_weights(a, b, scheme, w4.shape)
    return enc.astype(weight.dtype), dec.astype(weight.dtype)
