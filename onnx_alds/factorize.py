"""The factors of one configuration: per-group truncated SVD, in float64.

Weight-only: ``fold_s(W)_i ≈ A_i B_i`` with ``A_i = U_i[:, :j] √S_i`` and
``B_i = √S_i V_iᵀ[:j]`` (splitting √S evenly keeps both factors equally
scaled, which matters for float16).

Data-aware (truncation-aware whitening, SVD-LLM arXiv 2403.07378; Zhang et
al. 2015 for convs): with ``C_i = L_i L_iᵀ`` the (regularised) covariance of
group i's input patches, the rank-j ``Ŵ_i`` minimising ``‖(W_i − Ŵ_i) X_i‖_F``
comes from the SVD ``W_i L_i = P Σ Qᵀ``: ``A_i = P_j √Σ_j``,
``B_i = √Σ_j Q_jᵀ L_i⁻¹``.  Patches are folded as scheme s0 (kernel in the
encoder), the only folding whose columns are a whole input patch.

The returned conv weights are cast back to the weight's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .folding import far_from_one, as_4d, fold, to_conv_weights


@dataclass(frozen=True)
class Factors:
    """Encoder ``(k·j, c/k, e1, e2)`` and decoder ``(f, k·j, d1, d2)`` conv
    weights of one configuration, and an optional correction added to the
    decoder's bias (data-aware factors remove the mean output shift)."""

    encoder: np.ndarray
    decoder: np.ndarray
    bias_delta: np.ndarray | None = None


def truncated_factors(w4: np.ndarray, scheme: str, k: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``a (k, rows, rank)`` and ``b (k, rank, cols)`` in float64."""
    m = fold(np.asarray(w4, dtype=np.float64), scheme, k)
    full = min(m.shape[1], m.shape[2])
    if not 1 <= rank <= full:
        raise ValueError(f"rank {rank} is outside 1..{full} for k={k}, scheme {scheme}")
    scale = float(np.abs(m).max()) if m.size else 0.0  # work near 1: weights near 1e200 do not overflow
    scale = scale if far_from_one(scale) else 1.0
    u, s, vt = np.linalg.svd(m / scale if scale != 1.0 else m, full_matrices=False)
    root = np.sqrt(s[:, :rank] * scale)
    a = u[:, :, :rank] * root[:, None, :]
    b = root[:, :, None] * vt[:, :rank, :]
    return a, b


def whitened_factors(w4: np.ndarray, k: int, rank: int, chol: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Data-aware ``a (k, f, rank)``, ``b (k, rank, d/k)`` for scheme s0, where
    ``chol[i]`` is the lower Cholesky factor of group i's patch covariance."""
    m = fold(np.asarray(w4, dtype=np.float64), "s0", k)
    full = min(m.shape[1], m.shape[2])
    if not 1 <= rank <= full:
        raise ValueError(f"rank {rank} is outside 1..{full} for k={k}, scheme s0")
    a = np.empty((k, m.shape[1], rank))
    b = np.empty((k, rank, m.shape[2]))
    for i in range(k):
        p, s, qt = np.linalg.svd(m[i] @ chol[i], full_matrices=False)
        root = np.sqrt(s[:rank])
        a[i] = p[:, :rank] * root
        # B = √Σ Qᵀ L⁻¹  ⇔  Lᵀ Bᵀ = Q √Σ  (a triangular solve)
        b[i] = np.linalg.solve(chol[i].T, (qt[:rank].T * root)).T
    return a, b


def factorize(weight: np.ndarray, scheme: str, k: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Encoder ``(k·rank, c/k, e1, e2)`` and decoder ``(f, k·rank, d1, d2)`` conv
    weights of ``weight`` (2-D ``f×c`` or a 3-D/4-D conv weight) in its dtype."""
    w4 = as_4d(weight)
    a, b = truncated_factors(w4, scheme, k, rank)
    enc, dec = to_conv_weights(a, b, scheme, w4.shape)
    return enc.astype(weight.dtype), dec.astype(weight.dtype)


def weight_factors(w4: np.ndarray, k: int, scheme: str, rank: int) -> Factors:
    """Weight-only factors of ``w4`` (f×c×κ1×κ2) as conv weights in its dtype."""
    enc, dec = factorize(w4, scheme, k, rank)
    return Factors(enc, dec)


def data_factors(w4: np.ndarray, k: int, rank: int, chol: list[np.ndarray], mean: np.ndarray | None) -> Factors:
    """Data-aware factors (scheme s0); with ``mean`` (the patch mean) the
    decoder bias gets ``δ = (W − Ŵ) μ``, which removes the mean output shift."""
    a, b = whitened_factors(w4, k, rank, chol)
    enc, dec = to_conv_weights(a, b, "s0", w4.shape)
    delta = None
    if mean is not None:
        approx = np.concatenate([a[i] @ b[i] for i in range(k)], axis=1)  # f × d, s0 order
        delta = (np.asarray(w4, np.float64).reshape(w4.shape[0], -1) - approx) @ mean
    return Factors(enc.astype(w4.dtype), dec.astype(w4.dtype), delta)


def reconstruct(factors: Factors, shape4) -> np.ndarray:
    """The f×c×κ1×κ2 weight that encoder then decoder compute (float64)."""
    enc = np.asarray(factors.encoder, np.float64)
    dec = np.asarray(factors.decoder, np.float64)
    f, c, k1, k2 = shape4
    kj, cg = enc.shape[0], enc.shape[1]
    k = c // cg
    j = kj // k
    e1, e2 = enc.shape[2:] if enc.ndim == 4 else (1, 1)
    d1, d2 = dec.shape[2:] if dec.ndim == 4 else (1, 1)
    out = np.zeros((f, c, k1, k2))
    enc = enc.reshape(k, j, cg, e1, e2)
    dec = dec.reshape(f, k, j, d1, d2)
    # full conv of the decoder kernel with the encoder kernel, per group
    for i in range(k):
        for a in range(d1):
            for b in range(d2):
                blk = np.einsum("fj,jcxy->fcxy", dec[:, i, :, a, b], enc[i])
                out[:, i * cg:(i + 1) * cg, a:a + e1, b:b + e2] += blk
    return out
