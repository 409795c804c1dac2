"""Sequential calibration: each layer's factors are fitted to the inputs it
will really see, those of the already-compressed prefix, and to the outputs
of the original layer (asymmetric reconstruction, Zhang et al. 2015).

For layer ℓ with original input patches ``x`` and compressed-prefix patches
``x̃`` (same calibration sample), the rank-constrained ``Ŵ`` and bias ``δ``
minimising ``Σ ‖W x − Ŵ x̃ − δ‖²`` are, with centred moments
``C = E[(x−μ)(x̃−μ̃)ᵀ]`` and ``G̃ = E[(x̃−μ̃)(x̃−μ̃)ᵀ] = L̃ L̃ᵀ``: the best
rank-j approximation of the target ``T = W C G̃⁻¹`` in the ``L̃`` metric (SVD
of ``T L̃``, per channel group, as in :mod:`onnx_alds.factorize`), and
``δ = W μ − Ŵ μ̃``.  ``G̃`` gets a ridge of 1 % of its mean variance
(:data:`RIDGE`): deep in a network the compressed prefix's statistics are
ill-conditioned, and an unregularised ``G̃⁻¹`` amplifies noise (measured on
ResNet56 at keep 0.15: 74 % one-shot without, 88 % with).  The earlier layers' errors are thereby partly undone
instead of piling up.  The selection (ranks) is unchanged; the measured error
of each layer is its output error against the *original* layer,
``‖W X − Ŵ X̃ − δ‖_F / ‖W X‖_F`` on the calibration data.

It costs one pass over the calibration data per decomposed layer (two
onnxruntime sessions each), so it suits models whose forward pass is cheap.
"""

from __future__ import annotations

import logging

import numpy as np
from tqdm.auto import tqdm

from .calibration import iter_batches, iter_patches, tap_for_layer
from .error_model import regularised_cholesky
from .folding import to_conv_weights
from .io import Source
from .ops.base import Factors

log = logging.getLogger(__name__)


def _session(model, name, providers, threads):
    from .runtime import session
    from .shapes import serialized_with_outputs

    return session(serialized_with_outputs(model, [name]), providers, threads)


def _moments(s_orig, s_comp, name, tap, data, batch_size):
    d = tap.d
    C, G, s, st, n = np.zeros((d, d)), np.zeros((d, d)), np.zeros(d), np.zeros(d), 0
    so_out = [o.name for o in s_orig.get_outputs()].index(name)
    sc_out = [o.name for o in s_comp.get_outputs()].index(name)
    for feeds in iter_batches(data, batch_size):
        x = s_orig.run(None, feeds)[so_out]
        xt = s_comp.run(None, feeds)[sc_out]
        for p, pt in zip(iter_patches(x, tap), iter_patches(xt, tap)):
            C += p.T @ pt
            G += pt.T @ pt
            s += p.sum(0)
            st += pt.sum(0)
            n += len(p)
    mu, mut = s / n, st / n
    return C / n - np.outer(mu, mut), G / n - np.outer(mut, mut), mu, mut


RIDGE = 1e-2  # of the mean variance: the compressed prefix's statistics are ill-conditioned deep down


def _ridge(g: np.ndarray) -> np.ndarray:
    g = (g + g.T) / 2
    tr = float(np.trace(g))
    return g + RIDGE * tr / len(g) * np.eye(len(g)) if tr > 0 else g


def fit(w4: np.ndarray, k: int, rank: int, C, Gt, mu, mut, correct_bias: bool) -> Factors:
    f = w4.shape[0]
    w2 = np.asarray(w4, np.float64).reshape(f, -1)
    d = w2.shape[1]
    dg = d // k
    Lfull = regularised_cholesky(_ridge(Gt))
    # T = W C G̃⁻¹ via the Cholesky factor: G̃⁻¹ = L̃⁻ᵀ L̃⁻¹
    T = np.linalg.solve(Lfull.T, np.linalg.solve(Lfull, (w2 @ C).T)).T
    a = np.empty((k, f, rank))
    b = np.empty((k, rank, dg))
    for i in range(k):
        sl = slice(i * dg, (i + 1) * dg)
        L = regularised_cholesky(_ridge(Gt[sl, sl]))
        p, sv, qt = np.linalg.svd(T[:, sl] @ L, full_matrices=False)
        root = np.sqrt(sv[:rank])
        a[i] = p[:, :rank] * root
        b[i] = np.linalg.solve(L.T, qt[:rank].T * root).T
    enc, dec = to_conv_weights(a, b, "s0", w4.shape)
    delta = None
    if correct_bias:
        approx = np.concatenate([a[i] @ b[i] for i in range(k)], axis=1)
        delta = w2 @ mu - approx @ mut
    return Factors(enc.astype(w4.dtype), dec.astype(w4.dtype), delta)


def sequential_factors(original, info, choices: dict, data, emodel, *, provider: str = "auto",
                       threads: int | None = None, batch_size: int = 32, progress: bool = False):
    """Refit the chosen layers in graph order on the compressed prefix's inputs;
    returns ``(factors, measured)`` (layer name → Factors / output error)."""
    from .emit import emit
    from .factorize import reconstruct
    from .runtime import providers_for

    providers = providers_for(provider)
    layers = sorted((l for l in info.candidates if choices.get(l.name) is not None), key=lambda l: l.node_index)
    base = Source.load(original)
    factors, measured = {}, {}
    for l in tqdm(layers, desc="sequential calibration", unit="layer", disable=not progress, leave=False):
        cfg = choices[l.name]
        done = {n: choices[n] for n in factors}
        comp = emit(Source.load(original), info, done, factors) if factors else original
        tap = tap_for_layer(l)
        C, Gt, mu, mut = _moments(_session(original, l.input_name, providers, threads),
                                  _session(comp, l.input_name, providers, threads), l.input_name, tap, data,
                                  batch_size)
        w4 = base.weight4(l)
        correct = emodel.bias_correction and l.bias_constant
        fac = fit(w4, cfg.k, cfg.rank, C, Gt, mu, mut, correct)
        factors[l.name] = fac
        st = emodel.stats(base, l)  # the original inputs' covariance and output energy
        w2 = np.asarray(w4, np.float64).reshape(w4.shape[0], -1)
        wh = reconstruct(fac, w4.shape).reshape(w4.shape[0], -1)
        err = np.einsum("fd,de,fe->", w2, st.cov, w2) - 2 * np.einsum("fd,de,fe->", wh, C.T, w2) \
            + np.einsum("fd,de,fe->", wh, Gt, wh)
        if not correct:  # the mean shift stays in the error
            m = w2 @ mu - wh @ mut
            err += float(m @ m)
        measured[l.name] = float(np.sqrt(max(err, 0.0) / st.energy)) if st.energy > 0 else 0.0
    return factors, measured
