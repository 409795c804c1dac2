"""Run the original and the rewritten model on the same inputs, and gate the result.

The inputs are the calibration data when given (the data the user deploys
for), seeded random ones otherwise.  Reports, Polygraphy-style, the provider
each session really used, the inputs, and per output the max absolute
difference, the relative L2 error ``‖y' − y‖₂ / ‖y‖₂`` and, for outputs that
look like class scores (2-D, more than one column), the top-1 agreement with
the original; plus the median latency of both models (interleaved runs, so
that machine noise hits both).  A load failure, a changed output shape or
dtype, or NaN/Inf that the original does not produce is a failure (exit 5).

:func:`gate` turns the numbers into a verdict: past ``max_output_error`` or
below ``min_speedup`` it raises :class:`ValidationFailed` (exit 5, nothing
is written); without those limits it returns warnings for an output error
above :data:`WARN_OUTPUT_ERROR` or a model slower than its input.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import ModelError, UsageError, ValidationFailed
from .runtime import MAX_INPUT_BYTES, providers_for, session, used_provider

log = logging.getLogger(__name__)

_ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


@dataclass
class Validation:
    provider: str
    max_abs_diff: float
    rel_l2: float
    outputs: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)
    latency_ms_before: float | None = None
    latency_ms_after: float | None = None
    batch: int = 2
    seed: int = 0
    interleaved: bool = True  # latency of both models timed in alternation
    data: str = "random"  # "calibration" when the user's data fed both models
    top1_agreement: float | None = None  # worst over class-score outputs
    int8: bool = False  # latency timed on the int8 QDQ copies of both models (``--int8``)

    @property
    def speedup(self) -> float | None:
        if not self.latency_ms_before or not self.latency_ms_after:
            return None
        return self.latency_ms_before / self.latency_ms_after

    def to_dict(self) -> dict:
        return asdict(self)


def random_inputs(sess, input_shapes: dict[str, list] | None = None, *, batch: int = 2, seed: int = 0,
                  default_dim: int = 32) -> dict[str, np.ndarray]:
    """Seeded inputs for every model input: dynamic batch → ``batch``, other
    dynamic sizes from ``input_shapes`` or ``default_dim``."""
    rng = np.random.default_rng(seed)
    specs, total = [], 0
    for inp in sess.get_inputs():
        given = (input_shapes or {}).get(inp.name)
        dims = []
        for axis, d in enumerate(inp.shape):
            if isinstance(d, int) and d > 0:
                dims.append(d)
            elif axis == 0:
                dims.append(batch)
            elif given is not None and axis < len(given) and isinstance(given[axis], int):
                dims.append(given[axis])
            else:
                dims.append(default_dim)
        dtype = _ORT_DTYPES.get(inp.type)
        if dtype is None:
            raise ValidationFailed(f"input {inp.name!r} has type {inp.type}, which validation cannot generate")
        total += int(np.prod(dims, dtype=object)) * np.dtype(dtype).itemsize
        specs.append((inp.name, dims, dtype))
    if total > MAX_INPUT_BYTES:  # refuse before allocating
        raise UsageError(f"the inputs at shapes {', '.join(f'{n}:{d}' for n, d, _ in specs)} would take "
                         f"{total / 2**30:.1f} GiB, over the {MAX_INPUT_BYTES >> 30} GiB limit; "
                         f"give smaller shapes with --input-shape")
    feeds = {}
    for name, dims, dtype in specs:
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(dims).astype(dtype)
        elif dtype == np.bool_:
            feeds[name] = rng.integers(0, 2, dims).astype(bool)
        else:
            feeds[name] = rng.integers(0, 2, dims).astype(dtype)
    return feeds


TIMING_SECONDS = 0.25  # validation times each model for at least this long
TIMING_BLOCKS = 3  # in this many blocks, each model's fastest kept (:func:`interleaved_latency`)
WARN_OUTPUT_ERROR = 0.1  # a relative L2 error of an output above this is a warning without a gate


def looks_like_scores(a: np.ndarray) -> bool:
    """Class scores: a float (N, C) output with C > 1 and N > 1."""
    return a.ndim == 2 and a.shape[0] > 1 and a.shape[1] > 1 and np.issubdtype(a.dtype, np.floating)


def compare_outputs(names, before, after) -> tuple[dict, float, float]:
    per = {}
    worst_abs, worst_rel = 0.0, 0.0
    for name, a, b in zip(names, before, after):
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
            a64, b64 = a[fin].astype(np.float64), b[fin].astype(np.float64)
            diff = float(np.max(np.abs(a64 - b64))) if a64.size else 0.0
            sc = float(np.abs(a64).max()) if a64.size else 0.0  # norms of outputs near 1e200 must not overflow
            sc = sc if sc > 0 and np.isfinite(sc) else 1.0
            norm = float(np.linalg.norm(a64 / sc))
            rel = float(np.linalg.norm((a64 - b64) / sc) / norm) if norm > 0 else float(np.linalg.norm(b64))
        else:
            diff = float(np.max(np.abs(a.astype(np.int64) - b.astype(np.int64)))) if a.size else 0.0
            rel = float(np.mean(a != b)) if a.size else 0.0
        per[name] = {"max_abs_diff": diff, "rel_l2": rel, "shape": list(a.shape), "dtype": str(a.dtype)}
        if looks_like_scores(a):
            per[name]["top1_agreement"] = float(np.mean(a.argmax(1) == b.argmax(1)))
        worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, rel)
    return per, worst_abs, worst_rel


def interleaved_latency(sessions, feeds_list, *, warmup: int = 3, repeats: int = 20,
                        order_log: list | None = None, min_seconds: float = 0.0,
                        max_repeats: int = 2000, blocks: int = 1) -> list[list[float]]:
    """Time each session ``repeats`` times, alternating between them after
    ``warmup`` untimed runs of each, and go on (up to ``max_repeats``) until
    every session has run for ``min_seconds``: a 0.2 ms model timed 20 times
    is 4 ms of samples, which one burst of load on a shared machine moves.
    Returns the times in ms per session.

    ``blocks`` > 1 splits that into as many blocks, timed one after the other
    (``repeats`` and ``min_seconds`` shared among them), and returns for each
    session the times of its fastest block (by median): load only ever adds
    time.  On the shipped ResNet20 against a rewrite, ten fresh pairs of
    sessions measured 1.06–1.30x as one block and 1.18–1.32x as three."""
    if blocks > 1:
        runs = [interleaved_latency(sessions, feeds_list, warmup=warmup if b == 0 else 1,
                                    repeats=max(1, -(-repeats // blocks)), order_log=order_log,
                                    min_seconds=min_seconds / blocks, max_repeats=max_repeats)
                for b in range(blocks)]
        return [min((run[i] for run in runs), key=np.median) for i in range(len(sessions))]
    for _ in range(warmup):
        for i, (s, feeds) in enumerate(zip(sessions, feeds_list)):
            s.run(None, feeds)
            if order_log is not None:
                order_log.append(("warmup", i))
    times = [[] for _ in sessions]
    r = 0
    while r < repeats or (r < max_repeats and min(sum(t) for t in times) < min_seconds * 1e3):
        # alternate the starting session so neither always runs first
        idx = list(range(len(sessions)))
        if r % 2:
            idx.reverse()
        for i in idx:
            t0 = time.perf_counter()
            sessions[i].run(None, feeds_list[i])
            times[i].append((time.perf_counter() - t0) * 1e3)
            if order_log is not None:
                order_log.append(("timed", i))
        r += 1
    return times


def _first(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:300]


def validate(original, rewritten, *, provider: str = "auto", input_shapes=None, batch: int = 2,
             seed: int = 0, repeats: int = 20, threads: int | None = None, low_memory: bool = False,
             feeds: dict | None = None, max_samples: int = 256, int8: bool = False) -> Validation:
    """Compare ``original`` and ``rewritten`` (paths, bytes or ModelProtos) on
    ``feeds`` (calibration data: name → array, samples first; at most
    ``max_samples`` of them) or on seeded random inputs.

    ``low_memory`` (models over 2 GB) holds one session at a time, so latency
    is then timed model after model rather than interleaved.

    ``int8``: the latency is that of the int8 QDQ copies that ``onnx-alds
    quantize`` makes of both models (seeded random calibration: timing only),
    for a pipeline that quantizes the rewrite next; the outputs compared are
    still the fp32 models'."""
    providers = providers_for(provider)
    try:
        s0 = session(original, providers, threads, low_memory)
    except UsageError:
        raise
    except Exception as e:  # the input itself is at fault: an invalid model (exit 3), not a failed rewrite
        raise ModelError(f"onnxruntime cannot load the input model: {_first(e)}") from None
    data = "calibration" if feeds is not None else "random"
    if feeds is not None:
        feeds = {k: np.ascontiguousarray(v[:max_samples]) for k, v in feeds.items()}
        batch = int(next(iter(feeds.values())).shape[0]) if feeds else batch
    else:
        feeds = random_inputs(s0, input_shapes, batch=batch, seed=seed)
    timing_feeds = {k: v[:1] for k, v in feeds.items()} if data == "calibration" else feeds
    names = [o.name for o in s0.get_outputs()]
    try:
        before = s0.run(None, feeds)
    except Exception as e:
        raise ModelError(f"the input model fails to run in onnxruntime on random inputs: {_first(e)}") from None
    lat0 = None
    if low_memory:
        lat0 = interleaved_latency([s0], [timing_feeds], repeats=repeats, min_seconds=TIMING_SECONDS)[0] \
            if repeats else None
        del s0
    try:
        s1 = session(rewritten, providers, threads, low_memory)
    except UsageError:
        raise
    except Exception as e:
        raise ValidationFailed(f"onnxruntime cannot load the rewritten model: {_first(e)}") from None
    if names != [o.name for o in s1.get_outputs()]:
        raise ValidationFailed("the rewritten model's outputs differ from the original's")
    try:
        after = s1.run(None, feeds)
    except Exception as e:
        raise ValidationFailed(f"the rewritten model failed to run: {_first(e)}") from None
    per, worst_abs, worst_rel = compare_outputs(names, before, after)
    if not repeats:
        lat = None
    elif low_memory:
        lat = [lat0, interleaved_latency([s1], [timing_feeds], repeats=repeats, min_seconds=TIMING_SECONDS)[0]]
    elif int8:
        from .latency import timed_pair

        with timed_pair(True, original, rewritten) as pair:
            q = [session(m, providers, threads) for m in pair]
        lat = interleaved_latency(q, [timing_feeds, timing_feeds], repeats=repeats, min_seconds=TIMING_SECONDS,
                                  blocks=TIMING_BLOCKS)
    else:
        lat = interleaved_latency([s0, s1], [timing_feeds, timing_feeds], repeats=repeats,
                                  min_seconds=TIMING_SECONDS, blocks=TIMING_BLOCKS)
    top1 = [o["top1_agreement"] for o in per.values() if "top1_agreement" in o]
    return Validation(
        provider=used_provider(s1), max_abs_diff=worst_abs, rel_l2=worst_rel, outputs=per,
        inputs={k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in feeds.items()},
        latency_ms_before=float(np.median(lat[0])) if lat else None,
        latency_ms_after=float(np.median(lat[1])) if lat else None,
        batch=batch, seed=seed, interleaved=not low_memory, data=data,
        top1_agreement=min(top1) if top1 else None, int8=bool(int8 and lat),
    )


def gate(v: Validation, *, max_output_error: float | None = None, min_speedup: float | None = None,
         unchanged: bool = False, speedup: float | None = None) -> list[str]:
    """Raise :class:`ValidationFailed` past a limit; return the warnings otherwise.  ``unchanged``: no
    layer was decomposed, so the two models are the same graph and their speed-up is 1 (not the noise
    the timing measured).  ``speedup``: the one to judge instead of validation's (``--keep-latency
    --int8``: the int8 models' speed-up that the closed loop measured)."""
    if max_output_error is not None and v.rel_l2 > max_output_error:
        raise ValidationFailed(f"the rewritten model's output error (relative L2 {v.rel_l2:.3g} on {v.data} "
                               f"inputs) exceeds --max-output-error {max_output_error:g}; nothing was written")
    sp = 1.0 if unchanged else speedup if speedup is not None else v.speedup
    int8 = speedup is not None or v.int8
    what = "the int8 rewritten model" if int8 else "the rewritten model"
    if min_speedup is not None and sp is not None and sp < min_speedup:
        raise ValidationFailed(f"{what} runs {sp:.2f}x as fast as the input on {v.provider}, "
                               f"below --min-speedup {min_speedup:g}; nothing was written")
    warnings = []
    if max_output_error is None and v.rel_l2 > WARN_OUTPUT_ERROR:
        what = f"relative L2 {v.rel_l2:.3g}"
        if v.top1_agreement is not None:
            what += f", top-1 agreement {100 * v.top1_agreement:.1f} %"
        warnings.append(f"the outputs changed a lot ({what} on {v.data} inputs); check accuracy on your data, "
                        f"or bound it with --max-output-error")
    if min_speedup is None and sp is not None and sp < 1.0:
        if int8:
            warnings.append(f"the int8 rewritten model is slower than the int8 input on {v.provider} ({sp:.2f}x)")
        else:
            warnings.append(f"the rewritten model is slower than the input on {v.provider} "
                            f"({v.latency_ms_before:.3f} ms -> {v.latency_ms_after:.3f} ms, {sp:.2f}x)")
    return warnings
