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
import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from .compare import WARN_OUTPUT_ERROR, compare_outputs, lowest, output_kind, rel_l2
from .errors import ModelError, UsageError, ValidationFailed, first_line
from .measure.inputs import random_inputs, session_fixed_batch
from .measure.int8 import Int8Copies, timed_pair
from .measure.timing import TIMING_BLOCKS, TIMING_SECONDS, interleaved_latency
from .runtime import providers_for, session, used_provider

log = logging.getLogger(__name__)

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
    same_graph: bool = False  # the rewritten model has the input's nodes: no layer decomposed

    @property
    def speedup(self) -> float | None:
        if not self.latency_ms_before or not self.latency_ms_after:
            return None
        return self.latency_ms_before / self.latency_ms_after

    def to_dict(self) -> dict:
        return asdict(self)


def _whole_batches(feeds: dict, batch: int) -> dict:
    """Calibration feeds cut to a multiple of a model's fixed batch (one sentence when there are too few)."""
    n = len(next(iter(feeds.values()))) if feeds else 0
    if n < batch:
        raise UsageError(f"the calibration data holds {n} samples, fewer than the {batch} the model takes in one "
                         f"batch")
    return {k: v[: n - n % batch] for k, v in feeds.items()}


def _timing_feeds(sess, feeds: dict, data: str, fixed: int | None, input_shapes, seed: int) -> dict:
    """Latency is timed at batch 1 (the model's fixed batch where it has one), as documented, whichever
    the inputs: random ones are made again at batch 1 (only a dynamic first axis is a batch: a scalar
    or a fixed-length input stays as it is), calibration samples are the first of them."""
    if data == "random":
        return random_inputs(sess, input_shapes, batch=1, seed=seed)
    return {k: v[:fixed or 1] for k, v in feeds.items()}


def run_batched(sess, feeds: dict, batch: int | None) -> list:
    """``sess.run`` on ``feeds``, in slices of ``batch`` samples (a model's fixed batch; outputs joined on
    the first axis); a scalar input is passed whole to every slice."""
    n = next((len(v) for v in feeds.values() if np.ndim(v)), 0)
    if batch is None or n <= batch:
        return sess.run(None, feeds)
    parts = [sess.run(None, {k: v[i:i + batch] if np.ndim(v) else v for k, v in feeds.items()})
             for i in range(0, n, batch)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


def noise_response(original, feeds: dict, *, provider: str = "auto", noise: float = 0.01, seed: int = 0,
                   output_kinds: dict | None = None, threads: int | None = None) -> dict[str, float]:
    """How far the original's own outputs move when its float inputs move a little: per float output
    not judged as class scores, the relative L2 between its outputs on ``feeds`` and on ``feeds`` with
    seeded Gaussian noise of ``noise`` × each float input's standard deviation added (1 % of it is
    under one 8-bit step of a normalised photograph).  The scale of change a model shows on its own,
    for :mod:`onnx_alds.policy.error_bounded`'s default tolerance; {} without float inputs."""
    rng = np.random.default_rng(seed)
    noisy, moved = dict(feeds), False
    for k, v in feeds.items():
        v = np.asarray(v)
        sd = float(np.std(v.astype(np.float64))) if np.issubdtype(v.dtype, np.floating) and v.size else 0.0
        if np.isfinite(sd) and sd > 0:
            noisy[k], moved = (v + rng.standard_normal(v.shape) * noise * sd).astype(v.dtype), True
    if not moved:
        return {}
    sess = session(original, providers_for(provider), threads)
    fixed = session_fixed_batch(sess)
    if fixed is not None:
        feeds, noisy = _whole_batches(feeds, fixed), _whole_batches(noisy, fixed)
    names = [o.name for o in sess.get_outputs()]
    out = {}
    for name, a, b in zip(names, run_batched(sess, feeds, fixed), run_batched(sess, noisy, fixed)):
        a, b = np.asarray(a), np.asarray(b)
        if np.issubdtype(a.dtype, np.floating) and a.shape == b.shape and a.size \
                and output_kind(a, (output_kinds or {}).get(name)) != "scores":
            r = rel_l2(a, b)
            if np.isfinite(r):
                out[name] = r
    return out


def validate(original, rewritten, *, provider: str = "auto", input_shapes=None, batch: int = 2,
             seed: int = 0, repeats: int = 20, threads: int | None = None, low_memory: bool = False,
             feeds: dict | None = None, max_samples: int = 256, int8: bool = False,
             int8_copies: Int8Copies | None = None, output_kinds: dict | None = None) -> Validation:
    """Compare ``original`` and ``rewritten`` (paths, bytes or ModelProtos) on
    ``feeds`` (calibration data: name → array, samples first; at most
    ``max_samples`` of them) or on seeded random inputs.

    ``low_memory`` (models over 2 GB) holds one session at a time, so latency
    is then timed model after model rather than interleaved.

    ``int8``: the latency is that of the int8 QDQ copies that ``onnx-alds
    quantize`` makes of both models (seeded random calibration: timing only),
    for a pipeline that quantizes the rewrite next; the outputs compared are
    still the fp32 models'; ``int8_copies`` keeps the copies a rewrite already made."""
    providers = providers_for(provider)
    try:
        s0 = session(original, providers, threads, low_memory)
    except UsageError:
        raise
    except Exception as e:  # the input itself is at fault: an invalid model (exit 3), not a failed rewrite
        raise ModelError(f"onnxruntime cannot load the input model: {first_line(e)}") from None
    data = "calibration" if feeds is not None else "random"
    if feeds is not None:
        feeds = {k: np.ascontiguousarray(v[:max_samples]) for k, v in feeds.items()}
        batch = int(next(iter(feeds.values())).shape[0]) if feeds else batch
    else:
        feeds = random_inputs(s0, input_shapes, batch=batch, seed=seed)
    fixed = session_fixed_batch(s0)
    if fixed is not None and data == "calibration":
        feeds = _whole_batches(feeds, fixed)
        batch = int(next(iter(feeds.values())).shape[0]) if feeds else batch
    timing_feeds = _timing_feeds(s0, feeds, data, fixed, input_shapes, seed)
    names = [o.name for o in s0.get_outputs()]
    try:
        before = run_batched(s0, feeds, fixed)
    except Exception as e:
        hint = "" if data == "calibration" else \
            " (give the shapes it takes with --input-shape NAME:DIMS, or real inputs with --calibration)"
        raise ModelError(f"the input model fails to run in onnxruntime on {data} inputs{hint}: "
                         f"{first_line(e)}") from None
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
        raise ValidationFailed(f"onnxruntime cannot load the rewritten model: {first_line(e)}") from None
    if names != [o.name for o in s1.get_outputs()]:
        raise ValidationFailed("the rewritten model's outputs differ from the original's")
    try:
        after = run_batched(s1, feeds, fixed)
    except Exception as e:
        raise ValidationFailed(f"the rewritten model failed to run: {first_line(e)}") from None
    per, worst_abs, worst_rel = compare_outputs(names, before, after, output_kinds)
    if not repeats:
        lat = None
    elif low_memory:
        lat = [lat0, interleaved_latency([s1], [timing_feeds], repeats=repeats, min_seconds=TIMING_SECONDS)[0]]
    elif int8:
        with timed_pair(int8_copies or Int8Copies(), original, rewritten) as pair:
            q = [session(m, providers, threads) for m in pair]
        lat = interleaved_latency(q, [timing_feeds, timing_feeds], repeats=repeats, min_seconds=TIMING_SECONDS,
                                  blocks=TIMING_BLOCKS)
    else:
        lat = interleaved_latency([s0, s1], [timing_feeds, timing_feeds], repeats=repeats,
                                  min_seconds=TIMING_SECONDS, blocks=TIMING_BLOCKS)
    return Validation(
        provider=used_provider(s1), max_abs_diff=worst_abs, rel_l2=worst_rel, outputs=per,
        inputs={k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in feeds.items()},
        latency_ms_before=float(np.median(lat[0])) if lat else None,
        latency_ms_after=float(np.median(lat[1])) if lat else None,
        batch=batch, seed=seed, interleaved=not low_memory, data=data,
        top1_agreement=lowest(per, "top1_agreement"), int8=bool(int8 and lat),
        same_graph=same_graph(original, rewritten),
    )


def top1_margin(agreement: float, samples: int) -> float:
    """How far below the best top-1 agreement another build's may lie and still count as a tie: two
    standard errors of a share measured on ``samples`` samples, plus one sample."""
    n = max(int(samples), 1)
    return 2.0 * math.sqrt(max(agreement * (1.0 - agreement), 0.0) / n) + 1.0 / n


def best_judged(judged: Sequence[tuple[Validation, float | None]]) -> int:
    """The index of the best of several builds judged on the same inputs (each a validation and its
    task metric, or None), first of equals:

    1. the highest task metric, where there is one (the user's own judge);
    2. where outputs are class scores, the builds whose top-1 agreement is within
       :func:`top1_margin` of the best one's (what a classifier's user sees: on a patch transformer
       at keep 0.15 the plan with the lowest logit error kept 11 % of the answers and another 24 %;
       near chance, 9.4 % against 10.5 % of 256 samples is noise, and the error tells more);
    3. of those, the lowest worst-output relative L2."""
    idx = list(range(len(judged)))
    scores = [s for _, s in judged]
    if idx and all(s is not None for s in scores):
        top = max(scores)
        idx = [i for i in idx if scores[i] == top]
    agree = [judged[i][0].top1_agreement for i in idx]
    if idx and all(a is not None for a in agree):
        best, n = max(agree), min(judged[i][0].batch for i in idx)
        idx = [i for i, a in zip(idx, agree) if a >= best - top1_margin(best, n)]
    return min(idx, key=lambda i: (judged[i][0].rel_l2, i))


def same_graph(a, b) -> bool:
    """Both models hold the same nodes (op, inputs, outputs): a rewrite that decomposed nothing."""
    import onnx

    if not (isinstance(a, onnx.ModelProto) and isinstance(b, onnx.ModelProto)):
        return False

    def nodes(m):
        return [(n.op_type, n.domain, tuple(n.input), tuple(n.output)) for n in m.graph.node]

    return nodes(a) == nodes(b)


def gate(v: Validation, *, max_output_error: float | None = None, min_speedup: float | None = None,
         unchanged: bool = False, speedup: float | None = None) -> list[str]:
    """Raise :class:`ValidationFailed` past a limit; return the warnings otherwise.  ``unchanged``: no
    layer was decomposed, so the two models are the same graph and their speed-up is 1 (not the noise
    the timing measured).  ``speedup``: the one to judge instead of validation's (``--keep-latency
    --int8``: the int8 models' speed-up that the closed loop measured)."""
    if max_output_error is not None and v.rel_l2 > max_output_error:
        raise ValidationFailed(f"the rewritten model's output error (relative L2 {v.rel_l2:.3g} on {v.data} "
                               f"inputs) exceeds --max-output-error {max_output_error:g}; nothing was written")
    said = unchanged  # the caller's own warning says why nothing was decomposed
    unchanged = unchanged or v.same_graph  # the same graph twice: any measured difference is noise
    sp = 1.0 if unchanged else speedup if speedup is not None else v.speedup
    int8 = speedup is not None or v.int8
    what = "the int8 rewritten model" if int8 else "the rewritten model"
    if min_speedup is not None and sp is not None and sp < min_speedup:
        raise ValidationFailed(f"{what} runs {sp:.2f}x as fast as the input on {v.provider}, "
                               f"below --min-speedup {min_speedup:g}; nothing was written")
    warnings = []
    if max_output_error is None and v.rel_l2 > WARN_OUTPUT_ERROR:
        what = f"relative L2 {v.rel_l2:.3g}"
        if v.top1_agreement is not None and v.data != "random":  # on noise, agreement says nothing of accuracy
            what += f", top-1 agreement {100 * v.top1_agreement:.1f} %"
        how = " ('onnx-alds bench IN.onnx OUT.onnx --calibration YOUR.npz' compares them on it)" \
            if v.data == "random" else ""
        warnings.append(f"the outputs changed a lot ({what} on {v.data} inputs); check accuracy on your data{how}, "
                        f"or bound it with --max-output-error")
    if v.same_graph and not said:
        warnings.append("no layer was decomposed at this budget, so the model is written unchanged")
    if min_speedup is None and sp is not None and sp < 1.0:
        if int8:
            warnings.append(f"the int8 rewritten model is slower than the int8 input on {v.provider} ({sp:.2f}x)")
        else:
            warnings.append(f"the rewritten model is slower than the input on {v.provider} "
                            f"({v.latency_ms_before:.3f} ms -> {v.latency_ms_after:.3f} ms, {sp:.2f}x)")
    return warnings
