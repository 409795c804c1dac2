"""Singular values of every channel group, for every candidate k and scheme.

For layer ℓ with folded slices ``W_i`` (see :mod:`onnx_alds.folding`) the
relative operator-norm error of a rank-j k-SVD is (Eckart–Young–Mirsky)

    ε_ℓ(k, s, j) = max_i σ_{j+1}(W_i) / ‖fold_s(W)‖₂ .

Only singular values are computed here, in float64, as square roots of the
eigenvalues of the smaller Gram matrix ``M Mᵀ`` (LAPACK's divide-and-conquer
symmetric eigensolver ``syevd``).  On 2 cores this is about 3× faster than
``gesdd`` on the full ResNet-50 candidate set; the price is an absolute error
of at most ~√ε_mach·σ₁ ≈ 1.5e-8·‖W‖ on tiny singular values, far below any
error threshold a selection uses.  Vectors are computed later, with ``gesdd``,
for the chosen configuration only.  Layers are processed in parallel threads,
each with a single BLAS thread (oversubscribed OpenBLAS threads are much
slower than one thread per core).  Pure numpy.
"""

from __future__ import annotations

import logging
import os
import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from .cache import load_spectra, save_spectra, spectra_key
from .factorize import LARGE_FOLD, group_gram, group_view, weight_scale
from .folding import far_from_one, divisors, fold
from .progress import progress_iter

log = logging.getLogger(__name__)

SMALL_SVD = 64 ** 3  # rows·cols·min(rows, cols)/k below which an SVD runs inline, not in a worker thread


@dataclass
class LayerSpectra:
    """Per-group singular values of one layer: ``sv[(k, scheme)]`` is ``(k, r)``."""

    sv: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)

    def norm(self, scheme: str) -> float:
        return float(self.sv[(1, scheme)][0, 0])

    def error_curve(self, k: int, scheme: str) -> np.ndarray:
        """``ε(j)`` for ``j = 0..r``: the relative error of keeping rank j per group."""
        s = self.sv[(k, scheme)]
        worst = s.max(axis=0)  # max over groups of σ_{j+1}
        norm = self.norm(scheme)
        eps = np.append(worst, 0.0) / (norm if norm > 0 else 1.0)
        return eps


def group_singular_values(w4: np.ndarray, scheme: str, k: int) -> np.ndarray:
    """Singular values (descending) of each folded group: ``(k, min(rows, cols))``."""
    if np.prod(w4.shape) > LARGE_FOLD:
        return _large_group_singular_values(w4, scheme, k)
    m = fold(np.asarray(w4, dtype=np.float64), scheme, k)
    if m.shape[-2] > m.shape[-1]:
        m = np.swapaxes(m, -1, -2)
    scale = float(np.abs(m).max()) if m.size else 0.0  # singular values scale linearly: work near 1, so
    scale = scale if far_from_one(scale) else 1.0  # that weights near 1e200 do not overflow
    m = m / scale if scale != 1.0 else m
    gram = m @ np.swapaxes(m, -1, -2)
    ev = np.linalg.eigvalsh(gram)[..., ::-1]
    return np.sqrt(np.clip(ev, 0.0, None)) * scale


def _large_group_singular_values(w4: np.ndarray, scheme: str, k: int) -> np.ndarray:
    """:func:`group_singular_values` within about one float64 Gram matrix of
    memory besides the weight: the weight stays in its dtype and is never folded
    into a copy, the Gram matrix of each group's smaller side is summed (BLAS
    ``syrk``, lower triangle) from float64 blocks of the weight, and LAPACK's
    ``syevd`` works on it in place (scipy, Fortran order), instead of float64
    copies of the weight, its scaled copy and numpy's copy of the Gram matrix (a
    4096×4096 layer took 21× its weight bytes).  Same values up to rounding."""
    from scipy.linalg import eigh

    w4 = np.asarray(w4)
    scale = weight_scale(w4)
    scale = scale if far_from_one(scale) else 1.0
    view, n_rows = group_view(w4, scheme, k, 0)
    out = np.empty((k, min(int(np.prod(view.shape[:n_rows])), int(np.prod(view.shape[n_rows:])))))
    for i in range(k):
        gram, _ = group_gram(w4, scheme, k, i, scale)
        ev = eigh(gram, lower=True, eigvals_only=True, driver="evd", overwrite_a=True, check_finite=False)
        del gram
        out[i] = np.sqrt(np.clip(ev[::-1], 0.0, None)) * scale
    return out


def candidate_ks(c: int, k_max: int | None = None, allow_groups: bool = True) -> list[int]:
    if not allow_groups:
        return [1]
    ks = divisors(c)
    return [k for k in ks if k_max is None or k <= k_max]


def compute_spectra(
    weights: dict[str, np.ndarray],
    configs: dict[str, list[tuple[int, str]]],
    *,
    workers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, LayerSpectra]:
    """Singular values for each layer (``weights[name]`` is f×c×κ1×κ2) and each
    ``(k, scheme)`` in ``configs[name]``; the largest SVDs are scheduled first so
    that they overlap with many small ones.  ``(1, s)`` is always included since
    it gives the normalisation ``‖fold_s(W)‖₂``."""
    tasks = []
    for name, cfgs in configs.items():
        want = set(cfgs) | {(1, s) for _, s in cfgs}
        for k, s in want:
            tasks.append((name, k, s))

    def _work(task):
        name, k, s = task
        w = weights[name]
        if cache_dir is not None:  # entries are checked against the weights; a bad one is a miss
            key = spectra_key(w, s, k)
            sv = load_spectra(cache_dir, key, w, s, k)
            if sv is not None:
                return task, sv
        sv = group_singular_values(w, s, k)
        if cache_dir is not None:
            save_spectra(cache_dir, key, sv)
        return task, sv

    def size(task):
        name, k, s = task
        f, c, k1, k2 = weights[name].shape
        rows, cols = f * k1 * k2, c * k1 * k2  # only the product matters for ordering
        return rows * cols * min(rows, cols) / k

    tasks.sort(key=size, reverse=True)
    # the largest (memory-bounded) ones run one at a time on all cores, so that their Gram
    # matrices are not held side by side; small SVDs run inline: a thread hand-off costs more
    # than they do (thousands of small MatMuls)
    huge = [t for t in tasks if np.prod(weights[t[0]].shape) > LARGE_FOLD]
    tasks = [t for t in tasks if np.prod(weights[t[0]].shape) <= LARGE_FOLD]
    n_big = sum(size(t) > SMALL_SVD for t in tasks)
    out = {name: LayerSpectra() for name in configs}
    workers = workers or min(8, os.cpu_count() or 1)
    for (name, k, s), sv in progress_iter(map(_work, huge), total=len(huge), desc="spectra (large layers)",
                                          unit="svd", enabled=progress and bool(huge)):
        out[name].sv[(k, s)] = sv
    # one BLAS thread per worker, set once for the whole run (threadpoolctl's limits are process-wide)
    with threadpool_limits(1), ThreadPoolExecutor(max_workers=workers) as pool:
        it = itertools.chain(map(_work, tasks[n_big:]), pool.map(_work, tasks[:n_big])) if n_big \
            else map(_work, tasks)
        for (name, k, s), sv in progress_iter(it, total=len(tasks), desc="spectra", unit="svd",
                                              enabled=progress):
            out[name].sv[(k, s)] = sv
    return out
