"""The factors of one configuration: per-group truncated SVD, in float64.

Weight-only: ``fold_s(W)_i ≈ A_i B_i`` with ``A_i = U_i[:, :j] √S_i`` and
``B_i = √S_i V_iᵀ[:j]`` (splitting √S evenly keeps both factors equally
scaled, which matters for float16).

Data-aware factors (truncation-aware whitening, SVD-LLM arXiv 2403.07378) are
made from each group's left basis in ``error_model`` (``group_basis``,
``data_factors``).

The returned conv weights are cast back to the weight's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .folding import as_4d, far_from_one, fold, to_conv_weights


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
    if np.prod(w4.shape) >= GRAM_FACTORS:
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


def per_layer(work, items: list, size, *, workers: int | None = None) -> list:
    """``[work(item) for item in items]``, the work spread over the cores: items whose weight has at
    most :data:`LARGE_FOLD` elements (``size(item)``) in threads, each with one BLAS thread (the
    spectra's rule: on 2 cores two one-thread eigen-solves of ResNet-50's layers beat one on two
    BLAS threads), larger ones first, one at a time on every BLAS thread (their memory is bounded
    by one layer's)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    out: list = [None] * len(items)
    small = [i for i, it in enumerate(items) if size(it) <= LARGE_FOLD]
    for i in sorted(set(range(len(items))) - set(small)):
        out[i] = work(items[i])
    workers = min(workers or os.cpu_count() or 1, 8, len(small))
    if workers <= 1:
        for i in small:
            out[i] = work(items[i])
        return out
    small.sort(key=lambda i: -size(items[i]))  # the largest first, so the small ones fill in behind them
    with threadpool_limits(1), ThreadPoolExecutor(max_workers=workers) as pool:  # process-wide limit
        for i, got in zip(small, pool.map(lambda i: work(items[i]), small)):
            out[i] = got
    return out
# from this many elements on, factors come from the top eigenvectors of the smaller Gram matrix as well:
# 2-2.6x faster than the SVD on ResNet-50's 512x4608 and 2048x512 layers, the same product within 3e-14
GRAM_FACTORS = 1 << 18
GRAM_BLOCK = 1 << 21  # elements of the float64 blocks products are summed from

# the axes of a group (f, c_g, κ1, κ2) that make the rows and the columns of each folding (folding.fold)
_FOLD_AXES = {"s0": ((0,), (1, 2, 3)), "s1": ((0, 2), (3, 1)), "s2": ((0, 3), (2, 1)), "s3": ((0, 2, 3), (1,))}


def group_view(w4: np.ndarray, scheme: str, k: int, i: int) -> tuple[np.ndarray, int]:
    """Group ``i`` of ``fold(w4, scheme, k)`` as a view of ``w4`` (nothing copied): an array whose
    leading ``n`` axes are the folded matrix's rows and the others its columns, so that
    ``fold(w4, scheme, k)[i] == view.reshape(prod(shape[:n]), -1)``.  Returns ``(view, n)``."""
    f, c, k1, k2 = w4.shape
    if c % k:
        raise ValueError(f"k={k} does not divide the {c} input channels")
    if scheme not in _FOLD_AXES:
        raise ValueError(f"unknown scheme {scheme!r}")
    rows, cols = _FOLD_AXES[scheme]
    return w4.reshape(f, k, c // k, k1, k2)[:, i].transpose(rows + cols), len(rows)


def _gram_side(view: np.ndarray, n_rows: int) -> tuple[np.ndarray, int, bool]:
    """``view`` (rows axes, then column axes) turned so that its leading axes are the smaller side:
    ``(view, leading axes, wide)``; the Gram matrix of the smaller side sums over the other axes."""
    rows = int(np.prod(view.shape[:n_rows]))
    cols = int(np.prod(view.shape[n_rows:]))
    if rows <= cols:
        return view, n_rows, True
    order = tuple(range(n_rows, view.ndim)) + tuple(range(n_rows))
    return view.transpose(order), view.ndim - n_rows, False


def blocks(view: np.ndarray, n_keep: int, budget: int):
    """Blocks of ``view.reshape(K, L)`` (``K`` the product of its leading ``n_keep`` axes) along
    ``L``: yields ``(start, stop, block)``, ``block`` being columns ``start:stop`` as a
    ``K × (stop − start)`` array of about ``budget`` elements (at least one column), made from the
    view without copying more than the block itself."""
    keep = int(np.prod(view.shape[:n_keep]))
    lead = (slice(None),) * n_keep

    def walk(v, dims, offset):
        inner = int(np.prod(dims[1:]))  # columns per index of the first summed axis
        if len(dims) == 1 or keep * inner <= budget:
            per = max(1, budget // max(keep * inner, 1))
            for a in range(0, dims[0], per):
                b = min(dims[0], a + per)
                yield offset + a * inner, offset + b * inner, v[lead + (slice(a, b),)].reshape(keep, (b - a) * inner)
        else:  # one index of the first summed axis is already too much: split the next one
            for a in range(dims[0]):
                yield from walk(v[lead + (a,)], dims[1:], offset + a * inner)

    yield from walk(view, tuple(view.shape[n_keep:]), 0)


def _f64(block: np.ndarray, scale: float, dtype=np.float64) -> np.ndarray:
    """A float64 (or ``dtype``) copy of ``block / scale``."""
    out = np.array(block, dtype=dtype)
    if scale != 1.0:
        out /= scale
    return out


def _syrk(x: np.ndarray, gram: np.ndarray) -> None:
    """``gram += x xᵀ`` in place (``gram`` Fortran-ordered, of ``x``'s dtype: float64 or float32),
    lower triangle only (BLAS ``dsyrk``/``ssyrk``: half the products of ``x @ x.T`` and no n × n
    temporary)."""
    from scipy.linalg.blas import dsyrk, ssyrk

    syrk = ssyrk if gram.dtype == np.float32 else dsyrk
    if x.flags.c_contiguous:  # xᵀ is Fortran-ordered: (xᵀ)ᵀ xᵀ = x xᵀ
        syrk(1.0, x.T, beta=1.0, c=gram, trans=1, lower=1, overwrite_c=1)
    else:
        syrk(1.0, np.asfortranarray(x), beta=1.0, c=gram, trans=0, lower=1, overwrite_c=1)


def _lower_gram(view: np.ndarray, n_keep: int, scale: float, dtype=np.float64) -> np.ndarray:
    """The lower triangle of ``V Vᵀ`` for ``V = view.reshape(K, L) / scale`` (``K`` the leading
    ``n_keep`` axes), in ``dtype`` (float64, or float32 where only the top eigenvectors of a float32
    weight's Gram matrix are wanted), Fortran-ordered (LAPACK then works on it in place), summed
    from blocks of columns."""
    n = int(np.prod(view.shape[:n_keep]))
    gram = np.zeros((n, n), dtype=dtype, order="F")
    for _, _, blk in blocks(view, n_keep, GRAM_BLOCK):
        _syrk(_f64(blk, scale, dtype), gram)
    return gram


def _mirror_lower(gram: np.ndarray) -> np.ndarray:
    """Copy the lower triangle onto the upper one, in place and in blocks."""
    n = len(gram)
    step = max(1, GRAM_BLOCK // max(n, 1))
    for a in range(0, n, step):
        b = min(n, a + step)
        d = gram[a:b, a:b]
        d[...] = np.tril(d) + np.tril(d, -1).T
        if b < n:
            gram[a:b, b:] = gram[b:, a:b].T
    return gram


def block_gram(m: np.ndarray, scale: float, wide: bool) -> np.ndarray:
    """``M Mᵀ`` (``wide``) or ``Mᵀ M`` of ``m / scale`` in float64, from float64 blocks of ``m``;
    symmetric and Fortran-ordered, so that ``scipy.linalg.eigh(..., overwrite_a=True)`` overwrites
    it instead of copying it."""
    view, n_keep = (m, 1) if wide else (m.T, 1)
    return _mirror_lower(_lower_gram(view, n_keep, scale))


def group_gram(w4: np.ndarray, scheme: str, k: int, i: int, scale: float) -> tuple[np.ndarray, bool]:
    """The Gram matrix of the smaller side of ``fold(w4, scheme, k)[i] / scale`` (lower triangle,
    float64, Fortran-ordered) made from blocks of ``w4`` itself (no folded copy of the weight), and
    whether that side is the rows (``wide``)."""
    view, n_keep, wide = _gram_side(*group_view(w4, scheme, k, i))
    return _lower_gram(view, n_keep, scale), wide


def weight_scale(w: np.ndarray) -> float:
    """``max |w|`` without a temporary of ``w``'s size."""
    return float(max(w.max(), -w.min())) if w.size else 0.0


def _large_truncated_factors(w4: np.ndarray, scheme: str, k: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`truncated_factors` in memory of about one float64 Gram matrix of a
    group plus the factors: the top ``rank`` eigenvectors of the smaller Gram
    matrix (LAPACK ``syevr``, only those vectors, in place) span the same subspace
    as the top singular vectors, and ``A B = M V Vᵀ`` (or ``U Uᵀ M``) is the rank-j
    projection that the SVD gives, up to rounding.  The weight stays in its
    dtype and is never folded into a copy; products are taken in float64 blocks.
    For a float32 (or narrower) weight the Gram matrix and its eigen-solve are float32:
    ``A B = U Uᵀ M`` does not depend on the eigenvalues, and the top subspace of a Gram
    matrix summed in float32 moves the product by about 1e-6 of its largest entry, the
    rounding the emitted float32 factors have anyway (ResNet-50's 29 largest layers:
    24.6 s -> 12.8 s of eigen-solves, and half the memory)."""
    from scipy.linalg import eigh

    w4 = np.asarray(w4)
    view, n_rows = group_view(w4, scheme, k, 0)
    rows, cols = int(np.prod(view.shape[:n_rows])), int(np.prod(view.shape[n_rows:]))
    if not 1 <= rank <= min(rows, cols):
        raise ValueError(f"rank {rank} is outside 1..{min(rows, cols)} for k={k}, scheme {scheme}")
    scale = weight_scale(w4)
    scale = scale if scale > 0 else 1.0
    single = w4.dtype.kind == "f" and w4.dtype.itemsize <= 4
    a, b = [], []  # made group by group, after each Gram matrix is gone
    for i in range(k):
        side, n_keep, wide = _gram_side(*group_view(w4, scheme, k, i))
        n = rows if wide else cols
        # a float32 weight: its Gram matrix and the eigen-solve in float32 (half the time and memory)
        gram = _lower_gram(side, n_keep, scale, np.float32 if single else np.float64)
        ev, vec = eigh(gram, lower=True, subset_by_index=[n - rank, n - 1], overwrite_a=True, check_finite=False)
        del gram  # overwritten by LAPACK: only the vectors are kept
        ev, vec = ev.astype(np.float64, copy=False), vec.astype(np.float64, copy=False)
        ev, vec = ev[::-1], vec[:, ::-1]  # descending
        sv = np.sqrt(np.clip(ev, 0.0, None))
        inv_root = np.where(sv > 0, 1 / np.sqrt(np.where(sv > 0, sv, 1.0)), 0.0)
        # the other side: M V / √σ (or Uᵀ M / √σ), from float64 blocks of the weight
        other = np.zeros((rank, cols if wide else rows))
        for s, t, blk in blocks(side, n_keep, GRAM_BLOCK):
            other[:, s:t] = vec.T @ _f64(blk, scale)
        other *= inv_root[:, None]
        root = np.sqrt(sv)
        if wide:
            a.append(vec * root * np.sqrt(scale))
            b.append(other * np.sqrt(scale))
        else:
            a.append(other.T * np.sqrt(scale))
            b.append((vec * root).T * np.sqrt(scale))
        del vec, other
    if k == 1:  # no stacked copy
        return a[0][None], b[0][None]
    return np.stack(a), np.stack(b)


def factorize(weight: np.ndarray, scheme: str, k: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Encoder ``(k·rank, c/k, e1, e2)`` and decoder ``(f, k·rank, d1, d2)`` conv
    weights of ``weight`` (2-D ``f×c`` or a 3-D/4-D conv weight) in its dtype."""
    w4 = as_4d(weight)
    a, b = truncated_factors(w4, scheme, k, rank)
    # cast before the conv layout: the same values (to_conv_weights only moves them), and the
    # float64 factors are not copied once more
    a = a.astype(weight.dtype, copy=False)
    b = b.astype(weight.dtype, copy=False)
    return to_conv_weights(a, b, scheme, w4.shape)


def weight_factors(w4: np.ndarray, k: int, scheme: str, rank: int) -> Factors:
    """Weight-only factors of ``w4`` (f×c×κ1×κ2) as conv weights in its dtype."""
    enc, dec = factorize(w4, scheme, k, rank)
    return Factors(enc, dec)


def reconstruct(factors: Factors, shape4) -> np.ndarray:
    """The f×c×κ1×κ2 weight that encoder then decoder compute (float64).  Summed in blocks of
    output channels, so that no product of the weight's size is held beside the result."""
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
    step = max(1, GRAM_BLOCK // max(cg * e1 * e2, 1))  # output channels per product
    # full conv of the decoder kernel with the encoder kernel, per group
    for i in range(k):
        ei = enc[i].reshape(j, -1)
        for a in range(d1):
            for b in range(d2):
                for r in range(0, f, step):
                    blk = (dec[r:r + step, i, :, a, b] @ ei).reshape(-1, cg, e1, e2)  # BLAS, not einsum
                    out[r:r + step, i * cg:(i + 1) * cg, a:a + e1, b:b + e2] += blk
    return out


def factor_matrices(factors: Factors, scheme: str, shape4, dtype=np.float64) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The folded factors back from the conv weights (the inverse of
    :func:`~onnx_alds.folding.to_conv_weights`), in ``dtype`` (None: the factors' own, as views
    where the layout allows): ``a[i]`` (rows × j) and ``b[i]`` (j × cols) with
    ``fold(reconstruct(factors), scheme, k)[i] == a[i] @ b[i]``."""
    f, c = shape4[:2]
    enc = np.asarray(factors.encoder, dtype)
    dec = np.asarray(factors.decoder, dtype)
    enc = enc.reshape(enc.shape[:2] + ((1, 1) if enc.ndim == 2 else enc.shape[2:]))
    dec = dec.reshape(dec.shape[:2] + ((1, 1) if dec.ndim == 2 else dec.shape[2:]))
    kj, cg = enc.shape[:2]
    k = c // cg
    j = kj // k
    enc = enc.reshape(k, j, cg, *enc.shape[2:])
    dec = dec.reshape(f, k, j, *dec.shape[2:])
    a, b = [], []
    for i in range(k):
        ei, di = enc[i], dec[:, i]  # (j, cg, e1, e2), (f, j, d1, d2)
        if scheme == "s0":
            bi, ai = ei.reshape(j, -1), di[:, :, 0, 0]
        elif scheme == "s1":  # cols (κ2, cg), rows (f, κ1)
            bi, ai = ei[:, :, 0, :].transpose(0, 2, 1).reshape(j, -1), di[:, :, :, 0].transpose(0, 2, 1).reshape(-1, j)
        elif scheme == "s2":  # cols (κ1, cg), rows (f, κ2)
            bi, ai = ei[:, :, :, 0].transpose(0, 2, 1).reshape(j, -1), di[:, :, 0, :].transpose(0, 2, 1).reshape(-1, j)
        elif scheme == "s3":  # cols cg, rows (f, κ1, κ2)
            bi, ai = ei.reshape(j, cg), di.transpose(0, 2, 3, 1).reshape(-1, j)
        else:
            raise ValueError(f"unknown scheme {scheme!r}")
        a.append(np.ascontiguousarray(ai))
        b.append(np.ascontiguousarray(bi))
    return a, b


def _lanczos_norm(views, a, b, scale: float) -> float | None:
    """``‖E‖₂ / scale`` for ``E = [M_1 − a_1 b_1, …, M_k − a_k b_k]`` (the groups side by side;
    ``M_i`` given by its view): the top eigenvalue of ``Eᵀ E / scale²`` by Lanczos (ARPACK), each
    product with it one pass over the weight in float64 blocks of rows, so that nothing of the
    weight's size is held; None where ARPACK does not converge."""
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    k, cols = len(a), b[0].shape[1]
    n = k * cols
    a = [np.asarray(ai, np.float64) / scale for ai in a]
    b = [np.asarray(bi, np.float64) for bi in b]
    turned = [v.transpose(tuple(range(n_rows, v.ndim)) + tuple(range(n_rows))) for v, n_rows in views]
    n_keep = views[0][0].ndim - views[0][1]

    def product(x):  # Eᵀ E x, the rows of E in blocks: Eᵀ (E x) = Σ_r E_rᵀ (E_r x)
        x = np.asarray(x, np.float64).ravel()
        xs = [x[i * cols:(i + 1) * cols] for i in range(k)]
        bx = [b[i] @ xs[i] for i in range(k)]
        out, aty = np.zeros(n), [np.zeros(len(bi)) for bi in b]
        for parts in zip(*(blocks(v, n_keep, max(1, GRAM_BLOCK // k)) for v in turned)):
            s, t = parts[0][0], parts[0][1]
            mt = [_f64(blk, scale) for _, _, blk in parts]  # M_i[s:t]ᵀ / scale
            y = sum(mt[i].T @ xs[i] - a[i][s:t] @ bx[i] for i in range(k))  # (E x)[s:t]
            for i in range(k):
                out[i * cols:(i + 1) * cols] += mt[i] @ y
                aty[i] += a[i][s:t].T @ y
        for i in range(k):
            out[i * cols:(i + 1) * cols] -= b[i].T @ aty[i]
        return out

    op = LinearOperator((n, n), matvec=product, dtype=np.float64)
    try:
        top = eigsh(op, k=1, which="LA", tol=1e-10, ncv=min(n, 32), return_eigenvectors=False,
                    v0=np.random.default_rng(0).standard_normal(n))[0]
    except ArpackNoConvergence:
        return None
    return float(np.sqrt(max(top, 0.0)))


LANCZOS_MIN = 384  # from this Gram size on, the top eigenvalue by Lanczos (a few dozen products, not n³)
LANCZOS_MAXITER = 300  # restarts; past them the full eigen-solve


def top_eigenvalue(g: np.ndarray) -> float:
    """The largest eigenvalue of the symmetric ``g`` (both triangles filled): ARPACK's Lanczos to
    machine precision where ``g`` is large (a 512×512 Gram: 0.01 s against 1 s for every eigenvalue;
    ResNet-50's residuals 2.5-8× faster), else, or where it does not converge, LAPACK's."""
    if len(g) >= LANCZOS_MIN:
        from scipy.sparse.linalg import ArpackError, eigsh

        try:
            return float(eigsh(g, k=1, which="LA", tol=0, v0=np.ones(len(g)), maxiter=LANCZOS_MAXITER,
                               return_eigenvectors=False)[0])
        except ArpackError:  # no convergence (a flat top of the spectrum), or a start orthogonal to it
            pass
    return float(np.linalg.eigvalsh(g)[-1])


def residual_norm(w4: np.ndarray, factors: Factors, scheme: str, kind: str = "op") -> float:
    """``‖fold_s(W − Ŵ)‖₂`` (``kind="op"``) or ``‖W − Ŵ‖_F`` (``"fro"``) of the weight ``w4`` and
    what ``factors`` compute, the residual made in float64 blocks and never whole (``reconstruct``
    then a norm holds it twice, in float64: four times a float32 weight).  For a weight past
    :data:`LARGE_FOLD` the spectral norm is Lanczos' on ``Eᵀ E`` (memory of the factors in float64;
    equal to the exact one within 1e-15 relative on a 4096×4096 layer at rank 1024, 241 products);
    smaller ones, or where it does not converge, take the top eigenvalue of the float64 Gram
    matrix of the residual's smaller side.  ``E`` is taken with its groups side by side, whose
    columns are those of ``fold_s(E)`` in another order: the same norms."""
    from scipy.linalg import eigh

    w4 = as_4d(np.asarray(w4))
    a, b = factor_matrices(factors, scheme, w4.shape, dtype=None)  # in float64 a block at a time, or
    k = len(a)  # the side every block multiplies whole (the decoder's for the columns, the encoder's for rows)
    scale = weight_scale(w4)  # work near 1: squares of weights near 1e200 do not overflow
    scale = scale if scale > 0 and np.isfinite(scale) else 1.0
    views = [group_view(w4, scheme, k, i) for i in range(k)]
    rows, cols = a[0].shape[0], b[0].shape[1]
    f64 = np.float64
    if kind == "fro":
        b = [np.asarray(bi, f64) for bi in b]
        total = 0.0
        for i, (v, n_rows) in enumerate(views):
            for s, t, blk in blocks(v.transpose(tuple(range(n_rows, v.ndim)) + tuple(range(n_rows))),
                                    v.ndim - n_rows, GRAM_BLOCK):  # blocks of rows: rows s:t of group i
                e = _f64(blk.T, scale)
                e -= (np.asarray(a[i][s:t], f64) @ b[i]) / scale
                total += float(np.einsum("ij,ij->", e, e))
        return float(np.sqrt(total)) * scale
    if w4.size > LARGE_FOLD and k * cols > 2:
        norm = _lanczos_norm(views, a, b, scale)
        if norm is not None:
            return norm * scale
    if rows <= k * cols:  # E Eᵀ: a sum over blocks of every group's columns
        a = [np.asarray(ai, f64) for ai in a]
        gram = np.zeros((rows, rows), order="F")
        for i, (v, n_rows) in enumerate(views):
            for s, t, blk in blocks(v, n_rows, GRAM_BLOCK):
                e = _f64(blk, scale)
                p = a[i] @ np.asarray(b[i][:, s:t], f64)
                p /= scale
                e -= p
                del p
                _syrk(e, gram)
    else:  # Eᵀ E: a sum over blocks of rows, which every group shares (outputs first)
        b = [np.asarray(bi, f64) for bi in b]
        gram = np.zeros((k * cols, k * cols), order="F")
        turned = [v.transpose(tuple(range(n_rows, v.ndim)) + tuple(range(n_rows))) for v, n_rows in views]
        n_keep = views[0][0].ndim - views[0][1]
        for parts in zip(*(blocks(v, n_keep, max(1, GRAM_BLOCK // k)) for v in turned)):
            s, t = parts[0][0], parts[0][1]
            et = np.empty((k * cols, t - s))  # Eᵀ for rows s:t, the groups stacked
            for i, (_, _, blk) in enumerate(parts):
                et[i * cols:(i + 1) * cols] = _f64(blk, scale) - (b[i].T @ np.asarray(a[i][s:t], f64).T) / scale
            _syrk(et, gram)
    n = len(gram)
    if w4.size <= LARGE_FOLD:  # small: both triangles, and Lanczos where it pays
        top = top_eigenvalue(_mirror_lower(gram))
    else:
        top = eigh(gram, lower=True, eigvals_only=True, subset_by_index=[n - 1, n - 1], overwrite_a=True,
                   check_finite=False)[0]
    return float(np.sqrt(max(top, 0.0))) * scale
