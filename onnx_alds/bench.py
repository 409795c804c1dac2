"""Whole-model latency on onnxruntime: warm-up, interleaved repeats, median
and spread, a fixed thread count, the speed-up over the first model, and the
output error against the first model on the same inputs
(``‖y − y₀‖₂ / ‖y₀‖₂``, worst output)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .compare import rel_l2 as output_rel_l2
from .errors import ModelError, first_line
from .io import load_model
from .measure.inputs import random_inputs
from .measure.timing import interleaved_latency
from .quantize import quantize
from .runtime import providers_for, session, used_provider


def rel_l2(reference: list, outputs: list) -> float | None:
    """Worst relative L2 error over the float outputs (:func:`onnx_alds.compare.rel_l2`), or None when
    the two models' outputs are not comparable (count, shape or kind differ)."""
    if len(reference) != len(outputs):
        return None
    pairs = [(np.asarray(a), np.asarray(b)) for a, b in zip(reference, outputs)]
    if any(a.shape != b.shape or a.dtype.kind != "f" or b.dtype.kind != "f" for a, b in pairs):
        return None
    return max((output_rel_l2(a, b) for a, b in pairs), default=0.0)


def _same_feeds(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and np.array_equal(a[k], b[k]) for k in a)


def _first_run(label: str, sess, feeds: dict) -> list:
    """One run on the seeded random inputs, or one sentence naming the model (exit 3) where it cannot
    run on them (a speech model's STFT needs more samples than the default size of a dynamic axis)."""
    try:
        return sess.run(None, feeds)
    except Exception as e:
        shapes = ", ".join(f"{k}:{list(v.shape)}" for k, v in feeds.items())
        raise ModelError(f"{label} fails to run in onnxruntime on random inputs of shapes {shapes} (give the shapes "
                         f"it takes with --input-shape NAME:DIMS): {first_line(e)}") from None


def bench(paths, *, provider: str = "cpu", batches=(1,), repeats: int = 30, warmup: int = 5,
          threads: int = 2, input_shapes=None, seed: int = 0, order_log: list | None = None,
          labels: list[str] | None = None, spinning: bool = False, min_seconds: float = 0.5) -> list[dict]:
    """One row per model and batch: median and p10/p90 ms, speed-up over the
    first model, and ``rel_l2_vs_first`` (None where the models take
    different inputs or give outputs of other shapes).  ``labels`` name the
    models in the rows (default: their paths).  ``spinning`` lets onnxruntime's
    idle threads spin (:func:`onnx_alds.runtime.session`: faster runs, but
    interleaved sessions then take each other's cores).  Each model runs at least ``repeats`` times
    and, for small models, until it has run for ``min_seconds`` (at most 2000 times)."""
    providers = providers_for(provider)
    labels = [str(p) for p in paths] if labels is None else [str(x) for x in labels]
    sessions = []
    for p in paths:
        load_model(p)  # a clear error for a bad file before onnxruntime's own
        sessions.append(session(str(p), providers, threads, spinning=spinning))
    rows = []
    for batch in batches:
        feeds = [random_inputs(s, input_shapes, batch=batch, seed=seed) for s in sessions]
        outputs = [_first_run(label, s, f) for label, s, f in zip(labels, sessions, feeds)]
        errors = [rel_l2(outputs[0], y) if _same_feeds(feeds[0], f) else None for y, f in zip(outputs, feeds)]
        times = interleaved_latency(sessions, feeds, warmup=warmup, repeats=repeats, order_log=order_log,
                                    min_seconds=min_seconds)
        base = float(np.median(times[0]))
        for label, s, t, err in zip(labels, sessions, times, errors):
            med = float(np.median(t))
            rows.append({"model": label, "provider": used_provider(s), "batch": batch, "threads": threads,
                         "spinning": spinning,
                         "repeats": len(t), "warmup": warmup, "median_ms": med,
                         "p10_ms": float(np.percentile(t, 10)), "p90_ms": float(np.percentile(t, 90)),
                         "speedup": base / med if med > 0 else float("nan"), "rel_l2_vs_first": err})
    return rows


def with_int8(paths, workdir, calibration=None, *, per_channel: bool = True, input_shapes=None,
              seed: int = 0) -> tuple[list[Path], list[str], list]:
    """Each model followed by its int8 QDQ copy (``onnx_alds.quantize``)
    written into ``workdir``; returns ``(paths, labels, quantize results)``."""
    out_paths, labels, results = [], [], []
    for i, p in enumerate(paths):
        q = Path(workdir) / f"{i}_{Path(p).stem}.int8.onnx"
        results.append(quantize(p, q, calibration, per_channel=per_channel, input_shapes=input_shapes, seed=seed))
        out_paths += [Path(p), q]
        labels += [str(p), f"{p} (int8)"]
    return out_paths, labels, results


def format_table(rows: list[dict]) -> str:
    w = max([len(r["model"]) for r in rows] + [5])
    out = [f"{'model':<{w}}  {'batch':>5}  {'median ms':>10}  {'p10-p90 ms':>17}  {'speed-up':>8}  "
           f"{'rel L2 vs first':>15}  provider"]
    for r in rows:
        spread = f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f}"
        err = r.get("rel_l2_vs_first")
        err = f"{err:.2e}" if err is not None else "-"
        out.append(f"{r['model']:<{w}}  {r['batch']:>5}  {r['median_ms']:>10.3f}  {spread:>17}  "
                   f"{r['speedup']:>7.2f}x  {err:>15}  {r['provider']}")
    return "\n".join(out)
