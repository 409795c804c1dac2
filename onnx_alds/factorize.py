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


SMALL_BLAS = 1 << 24  # elements up to which a decomposition runs on one BLAS thread (all but the largest)
_controller = None


def blas_threads_for(elements: int):
    """One BLAS thread for a small decomposition: OpenBLAS's threads on a small
    matrix wait for each other, and on a loaded machine a 64×576 SVD took 1.07 s
    with them against 0.024 s without.  Larger ones keep every thread."""
    import contextlib

    global _controller
    if elements > SMALL_BLAS:
        return contextlib.nullcontext()
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()
    return _controller.limit(limits=1, user_api="blas")


def truncated_factors(w4: np.ndarray, scheme: str, k: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``a (k, rows, rank)`` and ``b (k, rank, cols)`` in float64."""
    if np.prod(w4.shape) > LARGE_FOLD:
        return _large_truncated_factors(w4, scheme, k, rank)
    m = fold(np.asarray(w4, dtype=np.float64), scheme, k)
    full = min(m.shape[1], m.shape[2])
    if not 1 <= rank <= full:
        raise ValueError(f"rank {rank} is outside 1..{full} for k={k}, scheme {scheme}")
    scale = float(np.abs(m).max()) if m.size else 0.0  # work near 1: weights near 1e200 do not overflow
    scale = scale if far_from_one(scale) else 1.0
    with blas_threads_for(m.size):
        u, s, vt = np.linalg.svd(m / scale if scale != 1.0 else m, full_matrices=False)
    root = np.sqrt(s[:, :rank] * scale)
    a = u[:, :, :rank] * root[:, None, :]
    b = root[:, :, None] * vt[:, :rank, :]
    return a, b


LARGE_FOLD = 1 << 22  # weights with more elements take the memory-bounded path (16 MB of float32)
GRAM_BLOCK = 1 << 21  # elements of the float64 blocks products are summed from


def block_gram(m: np.ndarray, scale: float, wide: bool) -> np.ndarray:
    """``M Mᵀ`` (``wide``) or ``Mᵀ M`` of ``m / scale`` in float64, from float64 blocks of ``m``."""
    n = m.shape[0] if wide else m.shape[1]
    length = m.shape[1] if wide else m.shape[0]
    step = max(1, GRAM_BLOCK // max(n, 1))
    gram = np.zeros((n, n))
    for a in range(0, length, step):
        blk = np.asarray(m[:, a:a + step] if wide else m[a:a + step, :].T, np.float64) / scale
        gram += blk @ blk.T
    return gram


def _large_truncated_factors(w4: np.ndarray, scheme: str, k: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`truncated_factors` in memory of about one float64 Gram matrix of a
    group plus the factors: the top ``rank`` eigenvectors of the smaller Gram
    matrix (LAPACK ``syevr``, only those vectors) span the same subspace as the
    top singular vectors, and ``A B = M V Vᵀ`` (or ``U Uᵀ M``) is the rank-j
    projection that the SVD gives, up to rounding.  The weight stays in its
    dtype; products are taken in float64 blocks."""
    from scipy.linalg import eigh

    m = fold(np.asarray(w4), scheme, k)
    rows, cols = m.shape[1], m.shape[2]
    if not 1 <= rank <= min(rows, cols):
        raise ValueError(f"rank {rank} is outside 1..{min(rows, cols)} for k={k}, scheme {scheme}")
    scale = float(max(m.max(), -m.min())) if m.size else 0.0
    scale = scale if scale > 0 else 1.0
    wide = rows <= cols  # the Gram matrix of the smaller side: its vectors are U (wide) or V
    a, b = np.empty((k, rows, rank)), np.empty((k, rank, cols))
    for i in range(k):
        n = rows if wide else cols
        ev, vec = eigh(block_gram(m[i], scale, wide), subset_by_index=[n - rank, n - 1], overwrite_a=True,
                       check_finite=False)
        ev, vec = ev[::-1], vec[:, ::-1]  # descending
        sv = np.sqrt(np.clip(ev, 0.0, None))
        inv_root = np.where(sv > 0, 1 / np.sqrt(np.where(sv > 0, sv, 1.0)), 0.0)
        # the other side: M V / √σ (or Uᵀ M / √σ), in blocks of the weight's float64 copy
        other = np.zeros((rank, cols if wide else rows))
        step = max(1, GRAM_BLOCK // max(n, 1))
        for s in range(0, cols if wide else rows, step):
            blk = np.asarray(m[i][:, s:s + step] if wide else m[i][s:s + step, :].T, np.float64) / scale
            other[:, s:s + step] = vec.T @ blk
        other *= inv_root[:, None]
        root = np.sqrt(sv)
        if wide:
            a[i], b[i] = vec * root * np.sqrt(scale), other * np.sqrt(scale)
        else:
            a[i], b[i] = other.T * np.sqrt(scale), (vec * root).T * np.sqrt(scale)
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
        with blas_threads_for(m[i].size):
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
                blk = (dec[:, i, :, a, b] @ enc[i].reshape(j, -1)).reshape(f, cg, e1, e2)  # BLAS, not einsum
                out[:, i * cg:(i + 1) * cg, a:a + e1, b:b + e2] += blk
    return out
