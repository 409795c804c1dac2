"""Error models: how wrong a layer becomes at each rank, for each (k, scheme).

An error model gives the selector one monotone curve per layer and candidate
``(k, scheme)``: ``curve[j]`` for ``j = 0..r`` is the layer's relative error
when each of its k channel groups keeps rank j.  The selector minimises the
largest error under a budget whatever the curves mean.  Each model also makes
the factors of a chosen configuration and measures the error they really
have, so the report can put prediction and measurement side by side.

With ``W_i`` the k folded groups of a layer, ``σ_r(·)`` singular values and
``E = W − Ŵ``:

``paper``      ``max_i σ_{j+1}(W_i) / ‖fold_s(W)‖₂`` — the paper's surrogate; a
               *lower bound* of the real ``‖fold_s(E)‖₂ / ‖fold_s(W)‖₂`` (the
               group residuals stand side by side).  Kept to reproduce ALDS.
``spectral``   ``sqrt(Σ_i σ_{j+1}(W_i)²) / ‖fold_s(W)‖₂`` — an *upper bound* of
               the same real error (‖[E_1 … E_k]‖₂² ≤ Σ_i ‖E_i‖₂²), equal to it
               at k = 1.  The default without calibration data.
``frobenius``  ``sqrt(Σ_i Σ_{r>j} σ_r(W_i)²) / ‖W‖_F`` — exactly ``‖E‖_F/‖W‖_F``.
``data``       the relative output error on calibration inputs,
               ``‖E (X − μ)‖_F / ‖W X‖_F`` over every input patch ``x`` of the
               data (bias correction removes the mean part ``E μ``).  With
               ``C`` the patch covariance and per-group whitening
               ``C_ii + λI = L_i L_iᵀ``, ``W_i L_i = P_i Σ_i Q_iᵀ`` gives the
               factors; the curve is computed *exactly* for every j, cross-group
               terms included (see :func:`data_curve`), so prediction equals
               measurement up to the regulariser ``λ = 1e-6·tr(C_ii)/d_i`` (a
               dead group, ``tr(C_ii) = 0``, takes ``λ = 1e-12``).  Folding s0
               only: the other schemes fold kernel taps into rows, where input
               statistics do not act as a right factor.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from scipy.linalg import eigh
from threadpoolctl import threadpool_limits

from .cost import full_rank
from .errors import UsageError
from .factorize import (
    LARGE_FOLD,
    block_gram,
    per_layer,
    reconstruct,
    residual_norm,
    top_eigenvalue,
    weight_factors,
)
from .folding import far_from_one, fold, to_conv_weights
from .ops.base import Factors
from .progress import progress_iter
from .spectra import compute_spectra

log = logging.getLogger(__name__)

Curves = dict[str, dict[tuple[int, str], np.ndarray]]


def memoized_curves(memo: dict, layers, configs, compute) -> Curves:
    """``compute(layers, configs)`` for the (layer, configuration) pairs not in ``memo`` yet: the rewrite's
    retries (speed guard, latency rounds) and the candidates of s0 alone select again on the same weights,
    and need not redo their eigen-solves and SVDs (a configuration's curve does not depend on which others
    are computed with it).  A configuration the model gives no curve for stays absent."""
    todo = {l.name: [c for c in configs.get(l.name, ()) if (l.name, c) not in memo] for l in layers}
    need = [l for l in layers if todo[l.name]]
    if need:
        for name, curves in compute(need, {l.name: todo[l.name] for l in need}).items():
            for cfg in todo[name]:
                memo[(name, cfg)] = curves.get(cfg)
    return {l.name: {c: memo[(l.name, c)] for c in configs.get(l.name, ()) if memo.get((l.name, c)) is not None}
            for l in layers}


def norm_curves(sv: dict, configs, kind: str) -> dict:
    """Each configuration's error curve ``ε(j)`` from its groups' singular values ``sv[(k, s)]``, as the
    weight error model ``kind`` (paper, spectral, frobenius) defines it, relative to ``‖fold_s(W)‖``."""
    out = {}
    for (k, s) in configs:
        top = float(sv[(1, s)][0, 0])
        top = top if top > 0 else 1.0
        g = sv[(k, s)] / top  # (k, r) descending; relative to σ₁ so that squares cannot overflow
        if kind == "paper":
            out[(k, s)] = np.append(g.max(axis=0), 0.0)
        elif kind == "spectral":
            out[(k, s)] = np.append(np.sqrt((g ** 2).sum(axis=0)), 0.0)
        else:  # frobenius: tail energy of every group
            tail = np.cumsum((g ** 2)[:, ::-1], axis=1)[:, ::-1].sum(axis=0)  # Σ_{r≥j+1}, j = 0..r-1
            den = np.sqrt(((sv[(1, s)] / top) ** 2).sum())
            out[(k, s)] = np.sqrt(np.append(tail, 0.0)) / (den if den > 0 else 1.0)
    return out


def _op_norm(m: np.ndarray) -> float:
    """‖m‖₂ from the largest eigenvalue of the smaller Gram matrix (much cheaper than an SVD)."""
    scale = float(np.abs(m).max()) if m.size else 0.0
    if not scale > 0 or not np.isfinite(scale):
        return 0.0 if scale == 0 else float("inf")
    if m.size > LARGE_FOLD:  # a Gram matrix summed from blocks (memory)
        g = block_gram(m, scale, m.shape[0] <= m.shape[1])
    else:
        m = m / scale
        g = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return float(np.sqrt(max(top_eigenvalue(g), 0.0))) * scale


@dataclass
class WeightError:
    """``paper``, ``spectral`` or ``frobenius``: curves from the singular values of the weights alone."""

    name: str
    cache_dir: str | None = None
    bound: str = field(init=False)
    _norms: dict = field(default_factory=dict, repr=False)  # (layer, scheme) → ‖fold W‖, from the spectra
    _memo: dict = field(default_factory=dict, repr=False)  # see memoized_curves
    _exact: dict = field(default_factory=dict, repr=False)  # (layer, k, scheme) → curve that is the real error

    def __post_init__(self):
        self.bound = {"paper": "lower", "spectral": "upper", "frobenius": "exact"}[self.name]

    def offers(self, layer, k: int, scheme: str) -> bool:
        """Whether this model has a curve for ``(k, scheme)`` of ``layer``: every configuration."""
        return True

    def extra_params(self, layer) -> int:
        return 0  # weight-only factors keep the layer's bias as it is

    def curves(self, source, layers, configs, *, progress: bool = False) -> Curves:
        return memoized_curves(self._memo, layers, configs,
                               lambda ls, cs: self._curves(source, ls, cs, progress=progress))

    def _curves(self, source, layers, configs, *, progress: bool = False) -> Curves:
        weights = {l.name: source.weight4(l) for l in layers}
        spectra = compute_spectra(weights, configs, progress=progress, cache_dir=self.cache_dir)
        for l in layers:  # the normalisers of measure(), which the spectra already hold
            for s in {s for _, s in configs[l.name]}:
                sv1 = spectra[l.name].sv[(1, s)]
                top = float(sv1[0, 0])  # squares relative to σ₁: no overflow near 1e200
                self._norms[(l.name, s)] = top * float(np.sqrt(((sv1 / top) ** 2).sum())) \
                    if self.name == "frobenius" and top > 0 else top
        out = {l.name: norm_curves(spectra[l.name].sv, configs[l.name], self.name) for l in layers}
        for name, curves in out.items():  # see known_error
            self._exact.update({(name, k, s): c for (k, s), c in curves.items() if k == 1 or self.name == "frobenius"})
        return out

    def factors(self, source, layer, cfg) -> Factors:
        return weight_factors(source.weight4(layer), cfg.k, cfg.scheme, cfg.rank)

    def known_error(self, layer, cfg) -> float | None:
        """The error :meth:`measure` would give for :meth:`factors`' own factors, where the curve is
        that error itself, else None.  A truncated SVD leaves exactly its tail: ``‖E‖₂ = σ_{j+1}`` at
        k = 1 (Eckart–Young) and ``‖E‖_F² = Σ_i Σ_{r>j} σ_r(W_i)²`` at any k.  Rounding the factors to
        the weight's dtype moves ``‖E‖₂`` only to second order (the rounding of ``A B`` lies in the
        kept subspaces, which the residual's top singular vectors are orthogonal to): on ResNet-50's
        layers the measured and the known errors agree within 1e-12 relative, and the residual's
        norm, half the factorize stage's time there, is not computed again (``tests/test_error_model.py``
        checks the equality on float32 weights, large and small, flat spectra and decaying ones)."""
        curve = self._exact.get((layer.name, cfg.k, cfg.scheme))
        return None if curve is None or not 0 <= cfg.rank < len(curve) else float(curve[cfg.rank])

    def measure(self, source, layer, cfg, factors: Factors) -> float:
        """The real error of the emitted factors: ``‖fold_s(E)‖₂/‖fold_s(W)‖₂``
        (``‖E‖_F/‖W‖_F`` for frobenius)."""
        w = source.weight4(layer)
        fro = self.name == "frobenius"
        # the residual in float64 blocks, never whole (a large layer's peak memory was here)
        num = residual_norm(w, factors, cfg.scheme, "fro" if fro else "op")
        den = self._norms.get((layer.name, cfg.scheme))
        if den is None:
            if fro:
                sc = float(np.abs(w).max()) or 1.0
                den = float(np.linalg.norm(np.asarray(w, np.float64) / sc)) * sc
            else:
                den = _op_norm(fold(np.asarray(w, np.float64), cfg.scheme, 1)[0])
        return num / den if den > 0 else 0.0


# ----------------------------------------------------------------------------- data-aware

def trace_form(a: np.ndarray, c: np.ndarray, b: np.ndarray | None = None) -> float:
    """``tr(A C Bᵀ)`` (``B = A`` by default) by one matrix product (np.einsum would not use BLAS:
    15× slower on a 1536×384 layer)."""
    return float(np.sum((a @ c) * (a if b is None else b)))


def regularised_cholesky(c: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """Lower Cholesky factor of ``c + λI`` with ``λ = 1e-6·tr(c)/d`` (1e-12 for
    a zero block); λ grows tenfold until the factorisation succeeds.  ``overwrite``: the ridge goes on
    ``c``'s own diagonal (a float64 C-ordered array the caller lets go; no d × d copy)."""
    d = c.shape[0]
    tr = float(np.trace(c))
    lam = 1e-6 * tr / d if tr > 0 else 1e-12
    own = overwrite and c.dtype == np.float64 and c.flags.c_contiguous
    work = c if own else np.array(c, dtype=np.float64)  # c + λI, the ridge on its diagonal (no d × d identity)
    diag = work.reshape(-1)[:: d + 1]  # a view of the diagonal
    base = diag.copy()
    for _ in range(12):
        diag[:] = base + lam
        try:
            return np.linalg.cholesky(work)
        except np.linalg.LinAlgError:
            lam *= 10.0
    return np.sqrt(max(tr / d, 1e-12)) * np.eye(d)


@dataclass
class LayerStats:
    """What data-aware errors need of one layer's input patches (s0 order)."""

    cov: np.ndarray  # centered covariance, d × d
    mean: np.ndarray  # d
    energy: float  # ‖(W/scale) X‖_F² / n: the normaliser
    # errors are relative, so they are computed on W/scale: weights near 1e200 would overflow
    # ‖W X‖² (and every product below) to inf, and their errors to NaN
    scale: float = 1.0

    @classmethod
    def from_moments(cls, m, w2: np.ndarray) -> LayerStats:
        """From streamed moments, with one d × d array (the covariance): a ResNet-50's 3×3 convs have
        d = 4,608, 170 MB each in float64."""
        n = max(int(m.count), 1)
        mean = m.sum / n
        cov = m.covariance()  # centred (from the shifted sums where the patches were float32)
        if not np.array_equal(cov, cov.T):  # BLAS syrk sums are symmetric already; a stream's may not be
            cov += cov.T
            cov *= 0.5
        scale = float(np.abs(w2).max()) if w2.size else 1.0
        scale = scale if far_from_one(scale) else 1.0
        w2 = w2 / scale if scale != 1.0 else w2
        out_mean = w2 @ mean
        energy = trace_form(w2, cov) + float(out_mean @ out_mean)  # tr(W E[xxᵀ] Wᵀ) = tr(W Σ Wᵀ) + ‖W μ‖²
        return cls(cov, mean, max(energy, 0.0), scale)


def group_basis(wi: np.ndarray, cii: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left singular vectors ``P`` (f × r, r = min(f, d_i)) and singular values ``σ`` of the
    whitened group ``W_i L_i``: the optimal rank-j factors in the data's metric are
    ``Ŵ_i = P_j P_jᵀ W_i`` (:func:`data_factors`), so ``L_i`` itself is never needed.

    Where the group has no more outputs than inputs (f ≤ d_i), ``P`` and ``σ²`` are the
    eigenpairs of the f × f matrix ``W_i C_ii W_iᵀ`` (no d_i × d_i factorisation: a transformer's
    down-projection or a decoder conv with a 4×4 kernel has d_i four to sixteen times f);
    otherwise from the regularised Cholesky factor and an SVD."""
    f, dg = wi.shape
    r = min(f, dg)
    if f <= dg:
        g = wi @ (cii @ wi.T)
        vals, vecs = eigh((g + g.T) / 2, check_finite=False)
        return vecs[:, ::-1][:, :r], np.sqrt(np.clip(vals[::-1][:r], 0.0, None))
    p, s, _ = np.linalg.svd(wi @ regularised_cholesky(cii), full_matrices=False)
    return p[:, :r], s[:r]


def data_curve(w2: np.ndarray, st: LayerStats, k: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Exact relative output error ``ε(j)``, j = 0..r, of the per-group whitened
    rank-j factors with bias correction, and the groups' bases (:func:`group_basis`).

    With ``W_i L_i = P_i Σ_i Q_iᵀ`` the residual of group i at rank j is
    ``Σ_{a>j} p_ia z_iaᵀ`` with ``z_ia = W_iᵀ p_ia``, so
    ``tr(E C Eᵀ) = Σ_{(i,a),(l,b): a,b>j} (p_iaᵀ p_lb)(z_iaᵀ C_il z_lb)``:
    a sum over the lower-right block of one ``(k·r)²`` matrix, taken for every j by a
    2-D suffix sum.  A group's own block is ``diag(σ_i²)`` (``P_iᵀ P_i = I`` and
    ``Z_iᵀ C_ii Z_i = Σ_i²``), so k = 1 needs nothing past the basis."""
    f, d = w2.shape
    dg = d // k
    r = min(f, dg)
    w2 = w2 / st.scale if st.scale != 1.0 else w2  # relative errors: the scale cancels
    bases, zs, sig2 = [], [], np.zeros(r)
    for i in range(k):
        sl = slice(i * dg, (i + 1) * dg)
        p, s = group_basis(w2[:, sl], st.cov[sl, sl])
        bases.append(p)
        zs.append(w2[:, sl].T @ p)  # dg × r
        sig2 += s ** 2
    H = np.diag(sig2)  # H[a, b] = Σ over the groups' (rank a, rank b) pairs
    # the cross-group terms: group i against every later group l at once; the pair (l, i) adds the
    # transpose of (i, l)'s ``(P_iᵀ P_l) ∘ (Z_iᵀ C_il Z_l)``, so half the products of all k² blocks
    # (2.4x faster on a 512×4608 layer at k = 8), in arrays of (k − i − 1) r × r
    later_z = np.stack(zs[1:]) if k > 1 else None  # groups 1..k−1: dg × r and f × r each
    later_p = np.stack(bases[1:]) if k > 1 else None
    for i in range(k - 1):
        n = k - i - 1
        zc = zs[i].T @ st.cov[i * dg:(i + 1) * dg, (i + 1) * dg:]  # r × n·dg: Z_iᵀ C_il for every l > i
        zcz = np.matmul(zc.reshape(r, n, dg).transpose(1, 0, 2), later_z[i:])  # n × r × r
        zcz *= np.matmul(bases[i].T, later_p[i:])  # ∘ P_iᵀ P_l
        m = zcz.sum(axis=0)
        H += m
        H += m.T
    T = H[::-1, ::-1].cumsum(0).cumsum(1)[::-1, ::-1]  # T[a, b] = Σ_{a'≥a, b'≥b} H
    tail = np.append(np.diag(T), 0.0)  # error² at j = 0..r (j = r: nothing left)
    eps = np.sqrt(np.clip(tail, 0.0, None) / st.energy) if st.energy > 0 else np.zeros(r + 1)
    # rounding can break monotonicity by ~1e-16; the selector needs non-increasing curves
    return np.minimum.accumulate(eps), bases


def data_factors(w4: np.ndarray, rank: int, bases: list[np.ndarray], mean: np.ndarray | None) -> Factors:
    """Data-aware factors (scheme s0) ``Ŵ_i = P_j P_jᵀ W_i`` from the groups' bases
    (:func:`group_basis`), split so that the encoder's rows and the decoder's columns have
    equal norms (as ``U√Σ``, ``√Σ Vᵀ`` do); with ``mean`` (the patch mean) the decoder bias
    gets ``δ = (W − Ŵ) μ``, which removes the mean output shift."""
    k = len(bases)
    m = fold(np.asarray(w4, dtype=np.float64), "s0", k)  # k × f × d/k
    full = min(m.shape[1], m.shape[2])
    if not 1 <= rank <= full:
        raise ValueError(f"rank {rank} is outside 1..{full} for k={k}, scheme s0")
    a = np.stack([p[:, :rank] for p in bases])  # k × f × rank
    b = np.einsum("kfr,kfd->krd", a, m)  # k × rank × d/k: P_jᵀ W_i
    big = float(np.abs(b).max()) or 1.0  # weights near 1e200 would overflow the squares of a plain norm
    norms = np.sqrt(np.linalg.norm(b / big, axis=2) * big)  # k × rank
    norms[norms == 0] = 1.0
    a, b = a * norms[:, None, :], b / norms[:, :, None]
    enc, dec = to_conv_weights(a, b, "s0", w4.shape)
    delta = None
    if mean is not None:
        approx = np.concatenate([a[i] @ b[i] for i in range(k)], axis=1)  # f × d, s0 order
        delta = (np.asarray(w4, np.float64).reshape(w4.shape[0], -1) - approx) @ mean
    return Factors(enc.astype(w4.dtype), dec.astype(w4.dtype), delta)


# how the patch covariance (s0 order: channel, κ1, κ2) is laid out for a scheme: (row taps, col taps and
# channels) twice, as fold() orders rows and columns, and how many leading axes are the row taps
_ROW_TAPS = {"s1": ((1, 2, 0, 4, 5, 3), 1), "s2": ((2, 1, 0, 5, 4, 3), 1), "s3": ((1, 2, 0, 4, 5, 3), 2)}


def svd_factors(w4: np.ndarray, cfg, mean: np.ndarray | None = None, prefix_mean: np.ndarray | None = None) -> Factors:
    """The weight SVD's factors of ``cfg`` (the schemes other than s0, under the data-aware model), with the
    bias ``δ = W μ − Ŵ μ̃`` where ``mean`` (μ, the original inputs' patch mean) is given: ``μ̃`` is
    ``prefix_mean`` (the compressed prefix's, in the sequential refit), else μ itself."""
    fac = weight_factors(w4, cfg.k, cfg.scheme, cfg.rank)
    if mean is None:
        return fac
    w = np.asarray(w4, np.float64).reshape(w4.shape[0], -1)
    approx = reconstruct(fac, w4.shape).reshape(w4.shape[0], -1)
    return Factors(fac.encoder, fac.decoder, w @ mean - approx @ (mean if prefix_mean is None else prefix_mean))


def scheme_curve(w4: np.ndarray, st: LayerStats, scheme: str) -> np.ndarray:
    """Exact relative output error ``ε(j)``, j = 0..r, of the rank-j truncated SVD of ``fold_scheme(W)``
    (k = 1, the weight-only factors) with bias correction, on the calibration data.

    With ``M = U S Vᵀ`` and the rows of the fold indexed by (output, tap κ) (the kernel taps the scheme
    puts in rows; the columns by the other taps and the channels), the residual at rank j is
    ``Σ_{a>j} s_a u_a v_aᵀ`` folded back, and ``tr(E C Eᵀ) = Σ_{a,b>j} s_a s_b K_ab`` with
    ``K = Σ_{κ,κ'} (U_κᵀ U_κ') ∘ (Vᵀ C_κκ' V)``: ``U_κ`` the rows of U at tap κ, ``C_κκ'`` the
    patch covariance between taps κ and κ' over (other taps, channels).  A 2-D suffix sum gives
    every j (as :func:`data_curve` does)."""
    w = np.asarray(w4, np.float64)
    w = w / st.scale if st.scale != 1.0 else w
    f, c, k1, k2 = w.shape
    order, lead = _ROW_TAPS[scheme]
    c6 = np.asarray(st.cov).reshape(c, k1, k2, c, k1, k2).transpose(order)  # a view
    nr = int(np.prod(c6.shape[:lead]))
    u, sv, vt = np.linalg.svd(fold(w, scheme, 1)[0], full_matrices=False)
    r = len(sv)
    u = u.reshape(f, nr, r)
    v = vt.T  # (other taps, channels) × r
    # the d² r products in float32 (the fold's SVD above is the larger part of the time); each term is summed
    # into K in float64, far above float32's rounding next to what the selector compares (errors ≥ 1e-3;
    # test_matrix checks them against the measured error to 1e-3)
    v32 = np.ascontiguousarray(v, np.float32)
    K = np.zeros((r, r))
    for a in range(nr):
        for b in range(a, nr):
            cab = np.asarray(_cov_block(c6, lead, a, b), np.float32)
            m = (u[:, a, :].T @ u[:, b, :]) * (v32.T @ (cab @ v32)).astype(np.float64)
            K += m if a == b else m + m.T
    H = K * np.outer(sv, sv)
    T = H[::-1, ::-1].cumsum(0).cumsum(1)[::-1, ::-1]
    tail = np.append(np.diag(T), 0.0)
    eps = np.sqrt(np.clip(tail, 0.0, None) / st.energy) if st.energy > 0 else np.zeros(r + 1)
    return np.minimum.accumulate(eps)


def _cov_block(c6: np.ndarray, lead: int, a: int, b: int) -> np.ndarray:
    """Block (row tap a, row tap b) of the transposed 6-D covariance view (``lead`` tap axes in rows),
    copied as a (dc × dc) matrix: never the whole covariance (1.5 GB for a 3×3×3 conv over 512 channels)."""
    rest = (slice(None),) * (3 - lead)
    ia, ib = np.unravel_index(a, c6.shape[:lead]), np.unravel_index(b, c6.shape[3:3 + lead])
    block = c6[tuple(int(i) for i in ia) + rest + tuple(int(i) for i in ib) + rest]
    dc = int(np.prod(block.shape[:3 - lead]))
    return np.ascontiguousarray(block).reshape(dc, dc)


@dataclass
class DataError:
    """``data``: relative output error on calibration inputs (see the module docstring)."""

    moments: dict  # layer name → calibration.Moments
    bias_correction: bool = True
    name: str = "data"
    bound: str = "exact"
    _stats: dict = field(default_factory=dict, repr=False)
    _bases: dict = field(default_factory=dict, repr=False)  # (layer, k) → the groups' bases, once factorized
    _memo: dict = field(default_factory=dict, repr=False)  # see memoized_curves

    def offers(self, layer, k: int, scheme: str) -> bool:
        """Layers whose spec gives a calibration tap (``OpSpec.calibration_tap``): s0 at every k
        (whitened factors, :func:`data_curve`), the other schemes at k = 1 (weight-SVD factors,
        :func:`scheme_curve`)."""
        return layer.spec.calibration_tap(layer) is not None and (scheme == "s0" or k == 1)

    def extra_params(self, layer) -> int:
        """The bias correction gives a layer without bias one: f parameters more."""
        return layer.geometry.f if self.bias_correction and not layer.has_bias and layer.bias_constant else 0

    def __post_init__(self):
        self.moments = dict(self.moments)  # its entries are let go below, not the caller's

    def stats(self, source, layer) -> LayerStats:
        """The layer's statistics, made once; its moments are let go then (the statistics hold what
        they held: with both, a calibrated ResNet-50 kept every layer's d × d twice, 2 GB)."""
        if layer.name not in self._stats:
            w2 = np.asarray(source.weight4(layer), np.float64).reshape(layer.geometry.f, -1)
            self._stats[layer.name] = LayerStats.from_moments(self.moments[layer.name], w2)
            self.moments[layer.name] = None
        return self._stats[layer.name]

    def curves(self, source, layers, configs, *, progress: bool = False) -> Curves:
        return memoized_curves(self._memo, layers, configs,
                               lambda ls, cs: self._curves(source, ls, cs, progress=progress))

    def _curves(self, source, layers, configs, *, progress: bool = False) -> Curves:
        out: Curves = {l.name: {} for l in layers}  # a layer with no s0 candidate has no curve
        layers = [l for l in layers if configs.get(l.name)]
        missing = [l.name for l in layers if l.name not in self.moments]
        if missing:
            raise UsageError(f"the calibration run captured no inputs for layer {missing[0]!r}")
        tasks = [(l, k) for l in layers for k in sorted({k for k, s in configs[l.name] if s == "s0"})]
        others = [(l, s) for l in layers for s in sorted({s for k, s in configs[l.name] if s != "s0" and k == 1})]
        # in their stored dtype (float64 a task at a time): a BERT-base encoder's weights are 680 MB in float64
        w2s = {l.name: np.asarray(source.weight4(l)).reshape(l.geometry.f, -1) for l in layers}
        # each layer's statistics (a d × d covariance from its moments) in threads, one BLAS thread each
        stats = dict(zip((l.name for l in layers), per_layer(lambda l: self.stats(source, l), layers,
                                                             lambda l: l.geometry.params)))

        def work(task):
            l, k = task
            with threadpool_limits(1):
                # the bases are not kept: one (layer, k) in a dozen is ever factorized (factors() makes
                # its basis again), and keeping every one held f·min(f·k, d) floats a task (a BERT-base
                # encoder's tables grew past 8 GB)
                return task, data_curve(np.asarray(w2s[l.name], np.float64), stats[l.name], k)[0]

        tasks.sort(key=lambda t: -w2s[t[0].name].size * w2s[t[0].name].shape[1])
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for (l, k), eps in progress_iter(pool.map(work, tasks), total=len(tasks), desc="data-aware errors",
                                             unit="svd", enabled=progress):
                out[l.name][(k, "s0")] = eps[: full_rank(l.geometry, k, "s0") + 1]

        def other(task):
            l, scheme = task
            with threadpool_limits(1):
                return task, scheme_curve(source.weight4(l), stats[l.name], scheme)

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for (l, scheme), eps in progress_iter(pool.map(other, others), total=len(others),
                                                  desc="data-aware errors, other schemes", unit="svd",
                                                  enabled=progress and bool(others)):
                out[l.name][(1, scheme)] = eps
        for st in stats.values():  # past the curves, the covariances are kept in float32 (half the memory:
            st.cov = st.cov.astype(np.float32, copy=False)  # 1 GB of a calibrated ResNet-50's); numpy
        return out  # promotes them where they meet float64 (factors, measured errors, the sequential fit)

    def factors(self, source, layer, cfg) -> Factors:
        st = self.stats(source, layer)
        w4 = source.weight4(layer)
        correct = self.bias_correction and layer.bias_constant
        if cfg.scheme != "s0":  # the weight SVD's factors, whose data-aware error scheme_curve gives
            return svd_factors(w4, cfg, st.mean if correct else None)
        bases = self._bases.get((layer.name, cfg.k))
        if bases is None:
            w2 = np.asarray(w4, np.float64).reshape(layer.geometry.f, -1) / st.scale  # the basis is scale-free
            dg = w2.shape[1] // cfg.k
            bases = [group_basis(w2[:, i * dg:(i + 1) * dg], st.cov[i * dg:(i + 1) * dg, i * dg:(i + 1) * dg])[0]
                     for i in range(cfg.k)]
            self._bases[(layer.name, cfg.k)] = bases
        return data_factors(w4, cfg.rank, bases, st.mean if correct else None)

    def known_error(self, layer, cfg) -> None:
        return None  # the curve is exact up to the regulariser: the emitted factors are measured

    def measure(self, source, layer, cfg, factors: Factors) -> float:
        """``‖E(X − μ)‖_F/‖WX‖_F`` on the calibration data, from the emitted factors
        (``‖EX‖_F/‖WX‖_F`` without bias correction)."""
        st = self.stats(source, layer)
        w = np.asarray(source.weight4(layer), np.float64)
        e = (w - reconstruct(factors, w.shape)).reshape(w.shape[0], -1) / st.scale
        cov = st.cov if factors.bias_delta is not None else st.cov + np.outer(st.mean, st.mean)
        num = trace_form(e, cov)
        return float(np.sqrt(max(num, 0.0) / st.energy)) if st.energy > 0 else 0.0


ERROR_MODELS = ("spectral", "data", "frobenius", "paper")


def error_model(name: str | None, *, moments=None, cache_dir=None, bias_correction: bool = True):
    """The error model called ``name`` (default: ``data`` with calibration
    moments, ``spectral`` without)."""
    if name is None:
        name = "data" if moments is not None else "spectral"
    if name == "data":
        if moments is None:
            raise UsageError("--error data needs calibration inputs (--calibration CAL.npz)")
        return DataError(moments, bias_correction=bias_correction)
    if name in ("paper", "spectral", "frobenius"):
        return WeightError(name, cache_dir=cache_dir)
    raise UsageError(f"unknown error model {name!r} (use {', '.join(ERROR_MODELS)})")
