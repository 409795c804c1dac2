"""Whole-model latency on onnxruntime: warm-up, interleaved repeats, median
and spread, a fixed thread count, and the speed-up over the first model."""

from __future__ import annotations

import numpy as np

from .io import load_model
from .runtime import providers_for, session, used_provider
from .validate import interleaved_latency, random_inputs


def bench(paths, *, provider: str = "cpu", batches=(1,), repeats: int = 30, warmup: int = 5,
          threads: int = 2, input_shapes=None, seed: int = 0, order_log: list | None = None) -> list[dict]:
    providers = providers_for(provider)
    sessions = []
    for p in paths:
        load_model(p)  # a clear error for a bad file before onnxruntime's own
        sessions.append(session(str(p), providers, threads))
    rows = []
    for batch in batches:
        feeds = [random_inputs(s, input_shapes, batch=batch, seed=seed) for s in sessions]
        times = interleaved_latency(sessions, feeds, warmup=warmup, repeats=repeats, order_log=order_log)
        base = float(np.median(times[0]))
        for p, s, t in zip(paths, sessions, times):
            med = float(np.median(t))
            rows.append({"model": str(p), "provider": used_provider(s), "batch": batch, "threads": threads,
                         "repeats": repeats, "warmup": warmup, "median_ms": med,
                         "p10_ms": float(np.percentile(t, 10)), "p90_ms": float(np.percentile(t, 90)),
                         "speedup": base / med if med > 0 else float("nan")})
    return rows


def format_table(rows: list[dict]) -> str:
    w = max([len(r["model"]) for r in rows] + [5])
    out = [f"{'model':<{w}}  {'batch':>5}  {'median ms':>10}  {'p10-p90 ms':>17}  {'speed-up':>8}  provider"]
    for r in rows:
        spread = f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f}"
        out.append(f"{r['model']:<{w}}  {r['batch']:>5}  {r['median_ms']:>10.3f}  {spread:>17}  "
                   f"{r['speedup']:>7.2f}x  {r['provider']}")
    return "\n".join(out)
