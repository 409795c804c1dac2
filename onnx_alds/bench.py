"""Whole-model latency on onnxruntime: warm-up, interleaved repeats, median
and spread, a fixed thread count, the speed-up over the first model, and the
output error against the first model on the same inputs
(``‖y − y₀‖₂ / ‖y₀‖₂``, worst output).

Without data every model is timed and compared on seeded random inputs of
the batch size.  With ``data`` (the user's samples, one array per input
name) the timing feeds are its first samples, and the comparison runs every
model over up to :data:`COMPARE_SAMPLES` of them and judges each output by
its kind (:mod:`onnx_alds.compare`): also top-1 agreement for class scores
and mean cosine for embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .compare import rel_l2 as output_rel_l2
from .argtypes import check_names
from .compare import compare_outputs, lowest
from .errors import ModelError, UsageError, ValidationFailed, first_line
from .io import load_model
from .measure.inputs import random_inputs, session_fixed_batch
from .measure.timing import interleaved_latency
from .quantize import quantize
from .runtime import providers_for, session, used_provider
from .validate import run_batched


def rel_l2(reference: list, outputs: list) -> float | None:
    """Worst relative L2 error over the float outputs (:func:`onnx_alds.compare.rel_l2`), or None when
    the two models' outputs are not comparable (count, shape or kind differ)."""
    if len(reference) != len(outputs):
        return None
    pairs = [(np.asarray(a), np.asarray(b)) for a, b in zip(reference, outputs)]
    if any(a.shape != b.shape or a.dtype.kind != "f" or b.dtype.kind != "f" for a, b in pairs):
        return None
    return max((output_rel_l2(a, b) for a, b in pairs), default=0.0)


COMPARE_SAMPLES = 256  # of the given samples, the outputs are compared on at most this many
COMPARE_CHUNK = 32  # samples per run of the comparison (a model's fixed batch where it has one)


def _inputs_of(label: str, sess, data: dict) -> dict:
    """The arrays of ``data`` that ``sess`` takes; one sentence where it takes one that is missing."""
    missing = [i.name for i in sess.get_inputs() if i.name not in data]
    if missing:
        raise UsageError(f"{label} takes the input {missing[0]!r}, which the given data does not hold (it holds "
                         f"{', '.join(sorted(data))})")
    return {i.name: data[i.name] for i in sess.get_inputs()}


def _repeat(a, n: int):
    """The first ``n`` samples of ``a``, repeated where it holds fewer (a scalar as it is)."""
    return a if np.ndim(a) == 0 else a[np.arange(n) % len(a)]


def _data_feeds(label: str, sess, data: dict, batch: int) -> dict:
    """The first ``batch`` samples of ``data`` (the model's fixed batch where it has one) for the inputs
    ``sess`` takes."""
    b = session_fixed_batch(sess) or batch
    return {k: _repeat(a, b) for k, a in _inputs_of(label, sess, data).items()}


def _run_all(sess, feeds: dict, n: int) -> list:
    """The outputs over the first ``n`` samples of ``feeds``, in runs of the model's fixed batch or of
    :data:`COMPARE_CHUNK`."""
    return run_batched(sess, {k: _repeat(v, n) for k, v in feeds.items()},
                       session_fixed_batch(sess) or COMPARE_CHUNK)


def _agreement(names: list, reference: list, outputs: list, kinds: dict | None) -> dict:
    """The worst relative L2 over the outputs, the lowest top-1 agreement over the class-score outputs
    and the lowest cosine over the embeddings (None where no output is of that kind); every figure
    None where the outputs are not comparable (count, shape or dtype differ)."""
    none = {"rel_l2_vs_first": None, "top1_vs_first": None, "cosine_vs_first": None}
    if len(reference) != len(outputs) or any(np.shape(a) != np.shape(b) or np.asarray(a).dtype != np.asarray(b).dtype
                                             for a, b in zip(reference, outputs)):
        return none
    try:
        per, _, worst = compare_outputs(names, reference, outputs, kinds)
    except ValidationFailed:  # NaN or Inf where the first model has finite outputs
        return dict(none, rel_l2_vs_first=float("nan"))
    return {"rel_l2_vs_first": worst, "top1_vs_first": lowest(per, "top1_agreement"),
            "cosine_vs_first": lowest(per, "cosine")}


def _compared_samples(sessions: list, data: dict) -> int:
    """How many of the given samples the outputs are compared on: up to :data:`COMPARE_SAMPLES`, cut to
    whole batches of a model's fixed batch (at least one batch: the samples then repeat)."""
    n = min(COMPARE_SAMPLES, next((len(v) for v in data.values() if np.ndim(v)), 0))
    for sess in sessions:
        fixed = session_fixed_batch(sess)
        if fixed:
            n = max(n - n % fixed, fixed)
    return n


def _compare_on_data(labels: list, sessions: list, data: dict, kinds: dict | None, n: int) -> list[dict]:
    """:func:`_agreement` of each model with the first one over the first ``n`` samples of ``data``."""
    outputs = []
    for label, sess in zip(labels, sessions):
        try:
            outputs.append(_run_all(sess, _inputs_of(label, sess, data), n))
        except UsageError:
            raise
        except Exception as e:
            raise ModelError(f"{label} fails to run in onnxruntime on the given data: {first_line(e)}") from None
    names = [o.name for o in sessions[0].get_outputs()]
    return [_agreement(names, outputs[0], y, kinds) for y in outputs]


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
          labels: list[str] | None = None, spinning: bool = False, min_seconds: float = 0.5,
          data: dict | None = None, kinds: dict | None = None) -> list[dict]:
    """One row per model and batch: median and p10/p90 ms, speed-up over the
    first model, and ``rel_l2_vs_first`` (None where the models take
    different inputs or give outputs of other shapes).  ``labels`` name the
    models in the rows (default: their paths).  ``spinning`` lets
    onnxruntime's idle threads spin (:func:`onnx_alds.runtime.session`:
    faster runs, but interleaved sessions then take each other's cores).
    Each model runs at least ``repeats`` times and, for small models, until
    it has run for ``min_seconds`` (at most 2000 times).

    ``data``: the user's samples (input name → array, samples first; see the
    module docstring); the rows then also carry ``top1_vs_first`` and
    ``cosine_vs_first`` (None where no output is of that kind; ``kinds``:
    output name → kind, where the user said).  Every row says what the
    outputs were compared on (``compared_on``)."""
    providers = providers_for(provider)
    labels = [str(p) for p in paths] if labels is None else [str(x) for x in labels]
    sessions = []
    for p in paths:
        load_model(p)  # a clear error for a bad file before onnxruntime's own
        sessions.append(session(str(p), providers, threads, spinning=spinning))
    check_names("--output-kind", kinds, (o.name for o in sessions[0].get_outputs()), "output")
    check_names("--input-shape", input_shapes, (i.name for s in sessions for i in s.get_inputs()), "input",
                "the model" if len(sessions) == 1 else "any of the models")
    rows = []
    compared = None
    if data is not None:
        n = _compared_samples(sessions, data)
        compared = _compare_on_data(labels, sessions, data, kinds, n)
        what = f"{n} given samples"
    for batch in batches:
        if data is None:
            feeds = [random_inputs(s, input_shapes, batch=batch, seed=seed) for s in sessions]
            outputs = [_first_run(label, s, f) for label, s, f in zip(labels, sessions, feeds)]
            compared = [{"rel_l2_vs_first": rel_l2(outputs[0], y) if _same_feeds(feeds[0], f) else None}
                        for y, f in zip(outputs, feeds)]
            what = "seeded random inputs of each row's batch"
        else:
            feeds = [_data_feeds(label, s, data, batch) for label, s in zip(labels, sessions)]
        times = interleaved_latency(sessions, feeds, warmup=warmup, repeats=repeats, order_log=order_log,
                                    min_seconds=min_seconds)
        base = float(np.median(times[0]))
        for label, s, t, figures in zip(labels, sessions, times, compared):
            med = float(np.median(t))
            rows.append({"model": label, "provider": used_provider(s), "batch": batch, "threads": threads,
                         "spinning": spinning,
                         "repeats": len(t), "warmup": warmup, "median_ms": med,
                         "p10_ms": float(np.percentile(t, 10)), "p90_ms": float(np.percentile(t, 90)),
                         "speedup": base / med if med > 0 else float("nan"), **figures, "compared_on": what})
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


def _agreement_cell(r: dict) -> str:
    parts = ([f"top-1 {100 * r['top1_vs_first']:.1f} %"] if r.get("top1_vs_first") is not None else []) + \
        ([f"cos {r['cosine_vs_first']:.4f}"] if r.get("cosine_vs_first") is not None else [])
    return ", ".join(parts) or "-"


def format_table(rows: list[dict]) -> str:
    """The rows as a table; an agreement column where an output is class scores or an embedding, and a
    last line saying what the outputs were compared on."""
    w = max([len(r["model"]) for r in rows] + [5])
    agree = any(r.get("top1_vs_first") is not None or r.get("cosine_vs_first") is not None for r in rows)
    cells = [_agreement_cell(r) for r in rows]
    aw = max([len(c) for c in cells] + [len("agreement")])
    out = [f"{'model':<{w}}  {'batch':>5}  {'median ms':>10}  {'p10-p90 ms':>17}  {'speed-up':>8}  "
           f"{'rel L2 vs first':>15}  " + (f"{'agreement':<{aw}}  " if agree else "") + "provider"]
    for r, cell in zip(rows, cells):
        spread = f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f}"
        err = r.get("rel_l2_vs_first")
        err = f"{err:.2e}" if err is not None else "-"
        out.append(f"{r['model']:<{w}}  {r['batch']:>5}  {r['median_ms']:>10.3f}  {spread:>17}  "
                   f"{r['speedup']:>7.2f}x  {err:>15}  " + (f"{cell:<{aw}}  " if agree else "") + r["provider"])
    ons = list(dict.fromkeys(r["compared_on"] for r in rows if r.get("compared_on")))
    if ons:
        out.append(f"outputs compared on {ons[0] if len(ons) == 1 else '; '.join(ons)}")
    return "\n".join(out)
