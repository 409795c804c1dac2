"""Output comparison between an original and a rewritten model, by output kind.

Per output: the max absolute difference and the relative L2 error ``‖y' − y‖₂ / ‖y‖₂`` (one rule,
:func:`rel_l2`, computed on a scaled copy so that outputs near 1e200 do not overflow), and by kind:

- ``scores`` (class scores, the default for a float ``(N, C)`` output with N, C > 1): the top-1
  agreement with the original;
- ``embedding``: the mean cosine of each sample's vector with the original's;
- ``map`` (anything else: feature maps, boxes, sequences): relative L2 alone.

A changed shape or dtype, or NaN/Inf the original does not produce, is a :class:`ValidationFailed`.
"""

from __future__ import annotations

import numpy as np

from .errors import ValidationFailed

WARN_OUTPUT_ERROR = 0.1  # a relative L2 error of an output above this is a warning without a gate
OUTPUT_KINDS = ("scores", "embedding", "map")


def looks_like_scores(a: np.ndarray) -> bool:
    """Class scores: a float (N, C) output with C > 1 and N > 1."""
    return a.ndim == 2 and a.shape[0] > 1 and a.shape[1] > 1 and np.issubdtype(a.dtype, np.floating)


def output_kind(a: np.ndarray, given: str | None = None) -> str:
    """The kind an output is judged as: the one given, else ``scores`` where it looks like class
    scores, else ``map``."""
    if given is not None:
        return given
    return "scores" if looks_like_scores(a) else "map"


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """``‖b − a‖₂ / ‖a‖₂`` over the elements finite in both, in float64 on a copy scaled by ``max|a|``
    (``‖b‖₂`` where ``a`` is all zero)."""
    a, b = np.asarray(a), np.asarray(b)
    fin = np.isfinite(a) & np.isfinite(b)
    a64, b64 = a[fin].astype(np.float64), b[fin].astype(np.float64)
    sc = float(np.abs(a64).max()) if a64.size else 0.0
    sc = sc if sc > 0 and np.isfinite(sc) else 1.0
    norm = float(np.linalg.norm(a64 / sc))
    return float(np.linalg.norm((a64 - b64) / sc) / norm) if norm > 0 else float(np.linalg.norm(b64))


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over samples (first axis) of the cosine between each sample's flattened output and the
    original's (1 where both are zero)."""
    a64 = np.asarray(a, np.float64).reshape(len(a), -1)
    b64 = np.asarray(b, np.float64).reshape(len(b), -1)
    sc = max(float(np.abs(a64).max(initial=0.0)), float(np.abs(b64).max(initial=0.0)), 1e-300)
    a64, b64 = a64 / sc, b64 / sc
    na, nb = np.linalg.norm(a64, axis=1), np.linalg.norm(b64, axis=1)
    cos = np.where((na > 0) & (nb > 0), (a64 * b64).sum(1) / np.maximum(na * nb, 1e-300), (na == nb) * 1.0)
    return float(np.mean(cos)) if len(cos) else 1.0


def compare_output(name: str, a, b, kind: str | None = None) -> dict:
    """One output's figures (see the module's docstring)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValidationFailed(f"output {name!r} changed shape from {a.shape} to {b.shape}")
    if a.dtype != b.dtype:
        raise ValidationFailed(f"output {name!r} changed dtype from {a.dtype} to {b.dtype}")
    if np.issubdtype(a.dtype, np.floating):
        bad_new = ~np.isfinite(b) & np.isfinite(a)
        if bad_new.any():
            raise ValidationFailed(f"output {name!r} of the rewritten model has NaN or Inf "
                                   f"in {int(bad_new.sum())} elements where the original has none")
        fin = np.isfinite(a) & np.isfinite(b)
        diff = float(np.max(np.abs(a[fin].astype(np.float64) - b[fin].astype(np.float64)))) if fin.any() else 0.0
        rel = rel_l2(a, b)
    else:
        diff = float(np.max(np.abs(a.astype(np.int64) - b.astype(np.int64)))) if a.size else 0.0
        rel = float(np.mean(a != b)) if a.size else 0.0
    out = {"max_abs_diff": diff, "rel_l2": rel, "shape": list(a.shape), "dtype": str(a.dtype)}
    if np.issubdtype(a.dtype, np.floating):
        out["kind"] = kind = output_kind(a, kind)
        if kind == "scores" and a.ndim == 2:
            out["top1_agreement"] = float(np.mean(a.argmax(1) == b.argmax(1)))
        elif kind == "embedding" and a.ndim >= 1 and len(a):
            out["cosine"] = mean_cosine(a, b)
    return out


def lowest(per: dict, figure: str) -> float | None:
    """The lowest of one figure (``top1_agreement``, ``cosine``) over the outputs that have it (None: none)."""
    values = [o[figure] for o in per.values() if figure in o]
    return min(values) if values else None


def compare_outputs(names, before, after, kinds: dict | None = None) -> tuple[dict, float, float]:
    """Every output compared (:func:`compare_output`); returns the per-output figures and the worst
    max absolute difference and relative L2.  ``kinds``: output name → kind, where the user said."""
    per = {name: compare_output(name, a, b, (kinds or {}).get(name)) for name, a, b in zip(names, before, after)}
    worst_abs = max((o["max_abs_diff"] for o in per.values()), default=0.0)
    worst_rel = max((o["rel_l2"] for o in per.values()), default=0.0)
    return per, worst_abs, worst_rel
