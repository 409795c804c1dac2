#!/usr/bin/env python
"""Negative results on the sentence encoder (docs/real-models.md, sixth and seventh passes): changes to
the data-aware factors that the one-shot cosine of all-MiniLM-L6-v2 does not reward. A benchmark, never
run in CI; needs the artifacts of ``tools/real_models.py --models minilm`` (rm-venv).

    python tools/minilm_experiments.py mask 0.9         # moments over real tokens only (attention_mask 1)
    python tools/minilm_experiments.py shrink 0.9 0.1   # covariance shrunk towards its diagonal by 0.1
    python tools/minilm_experiments.py twosided 0.81 v  # V weighted by O's per-head Gram (also q,k f1 f2 f1diag)
    python tools/minilm_experiments.py probe 0.9 tokens --probe-samples 32 --probe-rank 4
                                                        # --sensitivity measuring real tokens (or all, pooled)
    python tools/minilm_experiments.py groups 0.6       # per-head / grouped low rank against plain, per layer
    python tools/minilm_experiments.py reprobe 0.8146   # --sensitivity probing each layer at its planned rank

Each prints the mean cosine of the pooled, normalised embeddings to the original's on the 100
held-out sentences, against the same rewrite without the change (``--keep-params F --calibration``,
no sequential refit, so that the factors are the per-layer closed form being changed).

``twosided`` replaces the plan's factors of the chosen layers by ``Ŵ = M^-½ P Pᵀ M^½ W`` with P the
top left singular vectors of ``M^½ W L`` (L the input's whitening, M an output-side metric):
``v`` M = blockdiag_h(W_Oʰᵀ W_Oʰ), the attention output's per-head Gram; ``q`` / ``k`` M = the other's
per-head output second moment (the logits q·k); ``f1`` M = D W₂ᵀ W₂ D with D the RMS of GELU' at each
hidden unit (Gaussian pre-activations), ``f1diag`` M = D²; ``f2`` M = diag(γ²) of the LayerNorm after.

``groups F`` rewrites nothing: for every Linear layer, at F of its parameters, the whitened output error
``‖(W − Ŵ) L‖² / ‖W L‖²`` on the first 192 calibration sentences of the best rank-j approximation in k
groups of its outputs (k = 12: one per attention head; each group its own encoder, closed form) or of its
inputs (ALDS's channel groups, each group whitened by its own block), against k = 1 (plain low rank), and
the spread of the ratio over the 36 layers.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minilm_sensitivity as ms  # noqa: E402

import onnx_alds  # noqa: E402
import onnx_alds.calibration.moments as moments_mod  # noqa: E402
import onnx_alds.error_model as em  # noqa: E402
from onnx_alds.api import analyze  # noqa: E402
from onnx_alds.calibration.data import _samples, iter_batches  # noqa: E402
from onnx_alds.calibration.moments import collect_moments, taps_for  # noqa: E402
from onnx_alds.folding import to_conv_weights  # noqa: E402
from onnx_alds.ops.base import Factors  # noqa: E402

HEADS = 12


def masked_run_pass(sess, p, taps, calibration, fixed, result, bar):
    """``moments._run_pass`` with each Linear's input rows restricted to real tokens."""
    seen = 0
    for feed in iter_batches(calibration, p.batch_size):
        acts = dict(zip(p.tensors, sess.run(p.tensors, feed))) if sess is not None else {}
        acts.update(feed)
        mask = feed["attention_mask"].astype(bool)
        for t in taps:
            x = acts[t.input]
            if t.kind == "linear" and x.ndim == 3 and x.shape[:2] == mask.shape:
                x = x[mask]
            result[t.name] = moments_mod.accumulate(result[t.name], x, t)
        seen += _samples(feed)
        bar.update(_samples(feed))
    return seen


def probe_patch(what: str, samples: int, rank: int) -> None:
    """``--sensitivity`` with its probe measuring ``what`` (``all``: the raw output, as the product does;
    ``tokens``: real tokens only; ``pooled``: the mean over real tokens; ``normalised``: that mean
    normalised, the sentence embedding), on ``samples`` sentences at rank r/``rank``."""
    import onnx_alds.sensitivity as sens
    from onnx_alds.compare import rel_l2

    plain, state = sens.layer_sensitivity, {}

    def layer_sensitivity(model, source, layers, emodel, feeds, **kw):
        state["mask"] = np.asarray(feeds["attention_mask"][:samples]).astype(bool)
        return plain(model, source, layers, emodel, feeds, **kw)

    def measured(a, b):
        m = state["mask"]
        if what == "all" or a.ndim != 3 or a.shape[:2] != m.shape:
            return rel_l2(a, b)
        if what == "tokens":
            return rel_l2(a[m], b[m])
        w = m[..., None].astype(np.float64)
        pa, pb = (a * w).sum(1) / w.sum(1), (b * w).sum(1) / w.sum(1)
        if what == "normalised":  # the sentence embedding itself: the direction of the pooled vector
            pa, pb = (v / np.linalg.norm(v, axis=1, keepdims=True) for v in (pa, pb))
        return rel_l2(pa, pb)

    sens.layer_sensitivity, sens.rel_l2 = layer_sensitivity, measured
    sens.PROBE_SAMPLES, sens.PROBE_RANK = samples, rank


def shrunk_stats(alpha: float):
    plain = em.LayerStats.from_moments.__func__

    def from_moments(cls, m, w2):
        st = plain(cls, m, w2)
        d = np.diag(st.cov).copy()
        st.cov *= 1 - alpha
        st.cov.reshape(-1)[:: len(d) + 1] += alpha * d
        return st

    return classmethod(from_moments)


def _msqrt(m: np.ndarray, inverse: bool = False) -> np.ndarray:
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    vals = np.clip(vals, vals.max() * 1e-8, None)
    return (vecs * vals ** (-0.5 if inverse else 0.5)) @ vecs.T


def _blockdiag(m: np.ndarray) -> np.ndarray:
    out, h = np.zeros_like(m), len(m) // HEADS
    for i in range(HEADS):
        out[i * h:(i + 1) * h, i * h:(i + 1) * h] = m[i * h:(i + 1) * h, i * h:(i + 1) * h]
    return out


def two_sided(orig: onnx.ModelProto, cal: dict, plan, kinds: set[str]):
    """The plan with the factors of the layers of ``kinds`` made two-sided (see the docstring)."""
    from scipy.special import erf

    _, _, info = analyze(orig)
    by = {l.name: l for l in info.candidates}
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in orig.graph.initializer}
    mom = collect_moments(orig, taps_for(info.candidates), cal)

    def w(l):  # f × c
        return l.spec.weight4(inits[l.weight_name], l.attrs).reshape(l.geometry.f, -1).astype(np.float64)

    def out_moment(l):
        return w(l) @ (mom[l.name].gram / mom[l.name].count) @ w(l).T

    def kind_of(n):
        for key, kind in (("/value/", "v"), ("/query/", "q"), ("/key/", "k"), ("/intermediate/dense", "f1")):
            if key in n:
                return kind
        return "f2" if "/output/dense" in n and "/attention/" not in n else None

    factors = dict(plan.factors)
    for lp in plan.layers:
        kind = kind_of(lp.name)
        if lp.k != 1 or not ({kind, kind + "diag"} & kinds if kind else False):
            continue
        layer = by[lp.name]
        pre = lp.name.split("/attention/")[0].split("/intermediate/")[0].split("/output/")[0]
        torch_pre = pre.replace("/bert/", "bert.").replace("/", ".")
        if kind == "v":
            wo = w(by[pre + "/attention/output/dense/MatMul"])
            metric = _blockdiag(wo.T @ wo)
        elif kind in ("q", "k"):
            other = "key" if kind == "q" else "query"
            metric = _blockdiag(out_moment(by[f"{pre}/attention/self/{other}/MatMul"]))
        elif kind == "f1":
            w1, w2 = w(layer), w(by[pre + "/output/dense/MatMul"])
            mo = mom[lp.name]
            mean, cov = mo.sum / mo.count, mo.covariance()
            zm = w1 @ mean + inits[torch_pre + ".intermediate.dense.bias"].astype(np.float64)
            zs = np.sqrt(np.einsum("ij,jk,ik->i", w1, cov, w1))
            xs, ws = np.polynomial.hermite_e.hermegauss(40)
            z = zm[:, None] + zs[:, None] * xs[None]
            gelu_prime = 0.5 * (1 + erf(z / np.sqrt(2))) + z * np.exp(-z ** 2 / 2) / np.sqrt(2 * np.pi)
            rms = np.sqrt((gelu_prime ** 2 * (ws / ws.sum())[None]).sum(1))
            metric = np.diag(rms ** 2) if "f1diag" in kinds else (w2.T @ w2) * np.outer(rms, rms)
        else:
            gamma = inits[torch_pre + ".output.LayerNorm.weight"].astype(np.float64)
            metric = np.diag(gamma ** 2)
        wl, mo = w(layer), mom[lp.name]
        mean = mo.sum / mo.count
        root = _msqrt(metric)
        u, _, _ = np.linalg.svd(root @ wl @ em.regularised_cholesky(mo.covariance()), full_matrices=False)
        p = u[:, :lp.rank]
        enc, dec = p.T @ root @ wl, _msqrt(metric, inverse=True) @ p
        norms = np.sqrt(np.linalg.norm(enc, axis=1))
        norms[norms == 0] = 1.0
        dec, enc = dec * norms[None], enc / norms[:, None]
        e, d = to_conv_weights(dec[None], enc[None], "s0", (layer.geometry.f, layer.geometry.c, 1, 1))
        old = plan.factors[lp.name]
        factors[lp.name] = Factors(e.reshape(old.encoder.shape).astype(np.float32),
                                   d.reshape(old.decoder.shape).astype(np.float32), (wl - dec @ enc) @ mean)
    changed = copy.copy(plan)
    changed.factors = factors
    return changed


def probe_at_plan(plan) -> None:
    """``--sensitivity`` probing each layer of ``plan`` at the rank the plan gives it (k·j, as one group)
    instead of a quarter of its full rank; a layer the plan leaves dense is probed as before."""
    import onnx_alds.sensitivity as sens
    from onnx_alds.cost import full_rank
    from onnx_alds.select import Config

    ranks = {l.name: l.rank * l.k for l in plan.layers}
    plain = getattr(sens.probe_config, "plain", sens.probe_config)

    def probe_config(layer):
        r = ranks.get(layer.name)
        if r is None:
            return plain(layer)
        return Config(1, "s0", max(1, min(r, full_rank(layer.geometry, 1, "s0") - 1)), float("nan"))

    probe_config.plain = plain
    sens.probe_config = probe_config


def grouped_error(w: np.ndarray, gram: np.ndarray, k: int, fraction: float, side: str) -> float | None:
    """Whitened relative output error of ``w`` (f × c) at ``fraction`` of its parameters as k groups of
    its outputs (``side="out"``: encoder k·j × c, block-diagonal decoder) or of its inputs (``"in"``)."""
    f, c = w.shape
    n = f if side == "out" else c
    if n % k:
        return None
    budget = fraction * f * c
    j = int(budget // (k * c + f)) if side == "out" else int(budget // (k * f + c))
    j = min(j, f // k, c) if side == "out" else min(j, c // k, f)
    if j < 1:
        return None
    ridge = 1e-8 * np.trace(gram) / len(gram) * np.eye(len(gram))
    full = np.linalg.cholesky(gram + ridge)
    err = 0.0
    if side == "out":
        for g in range(k):
            sv = np.linalg.svd(w[g * f // k:(g + 1) * f // k] @ full, compute_uv=False)
            err += float((sv[j:] ** 2).sum())
    else:
        approx = np.zeros_like(w)
        for g in range(k):
            sl = slice(g * c // k, (g + 1) * c // k)
            chol = np.linalg.cholesky(gram[sl, sl] + ridge[sl, sl])
            u, sv, vt = np.linalg.svd(w[:, sl] @ chol, full_matrices=False)
            approx[:, sl] = (u[:, :j] * sv[:j]) @ vt[:j] @ np.linalg.inv(chol)
        d = w - approx
        err = float(np.trace(d @ gram @ d.T))
    return err / float(np.linalg.norm(w @ full) ** 2)


def groups(orig: onnx.ModelProto, cal: dict, fraction: float) -> None:
    _, _, info = analyze(orig)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in orig.graph.initializer}
    mom = collect_moments(orig, taps_for(info.candidates), {k: v[:192] for k, v in cal.items()})
    ratios: dict[str, list[float]] = {}
    plain_best = 0
    for l in info.candidates:
        w = l.spec.weight4(inits[l.weight_name], l.attrs).reshape(l.geometry.f, -1).astype(np.float64)
        gram = mom[l.name].gram / mom[l.name].count
        base = grouped_error(w, gram, 1, fraction, "out")
        got = {f"{side}{k}": grouped_error(w, gram, k, fraction, side) for side, ks in
               (("out", (2, 3, 4, 6, 12)), ("in", (2, 4, 12))) for k in ks}
        got = {key: v for key, v in got.items() if v is not None}
        plain_best += all(v >= base for v in got.values())
        for key, v in got.items():
            ratios.setdefault(key, []).append(v / base)
    print(f"{len(info.candidates)} Linear layers at {fraction:g} of their parameters: plain low rank has the "
          f"lowest whitened error in {plain_best}")
    for key, r in ratios.items():
        print(f"  {key:>5} groups of {'outputs' if key.startswith('out') else 'inputs'}: error / plain "
              f"min {min(r):.2f} median {np.median(r):.2f} max {max(r):.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["mask", "shrink", "twosided", "probe", "groups", "reprobe"])
    p.add_argument("keep", type=float)
    p.add_argument("arg", nargs="?", default="", help="shrink: the weight on the diagonal; twosided: kinds, a,b")
    p.add_argument("--probe-samples", type=int, default=32)
    p.add_argument("--probe-rank", type=int, default=4)
    p.add_argument("--artifacts", type=Path, default=Path("/work/rm-artifacts/minilm"))
    a = p.parse_args(argv)
    logging.disable(logging.WARNING)
    cal, ev, ref, orig = ms.load_artifacts(a.artifacts)
    if a.mode == "groups":
        groups(orig, cal, a.keep)
        return 0

    def cosine(model):
        return float((ms.embed(model, ev) * ref).sum(1).mean())

    def rewritten(sensitivity=False):
        return onnx_alds.rewrite(orig, keep_params=a.keep, calibration=cal, allow_slower=True, validate=False,
                                 compare=False, sequential=None if sensitivity else False, sensitivity=sensitivity)

    new, rep = rewritten()
    print(f"keep-params {a.keep} (plan {rep.plan.budget.get('picked')}): cosine {cosine(new):.4f}", flush=True)
    if a.mode == "twosided":
        changed = two_sided(orig, cal, rep.plan, set(a.arg.split(",")))
        print(f"two-sided {a.arg}: cosine {cosine(onnx_alds.apply_plan(orig, changed)):.4f}")
        return 0
    if a.mode == "reprobe":
        new, rep = rewritten(sensitivity=True)
        print(f"--sensitivity: cosine {cosine(new):.4f}", flush=True)
        for i in (2, 3):
            probe_at_plan(rep.plan)
            new, rep = rewritten(sensitivity=True)
            print(f"pass {i}, probed at the previous plan's ranks: cosine {cosine(new):.4f}", flush=True)
        return 0
    if a.mode == "probe":
        probe_patch(a.arg or "all", a.probe_samples, a.probe_rank)
        new, rep = rewritten(sensitivity=True)
        print(f"--sensitivity, probe on {a.arg or 'all'}, {a.probe_samples} samples, rank r/{a.probe_rank}: "
              f"cosine {cosine(new):.4f} (plan {rep.plan.budget.get('picked')})")
        return 0
    if a.mode == "mask":
        moments_mod._run_pass = masked_run_pass
    else:
        em.LayerStats.from_moments = shrunk_stats(float(a.arg))
    new, rep = rewritten()
    print(f"{a.mode} {a.arg}: cosine {cosine(new):.4f} (plan {rep.plan.budget.get('picked')})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
