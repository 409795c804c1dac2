"""Per-layer latency tables: measured cost for ``--keep-latency``.

For each compressible layer the table holds the latency, on one provider, of
the layer alone and of its factorized subgraph (the exact nodes the emitter
writes, with random weights of the right shapes) at a coarse grid of
``(k, scheme, rank)``: k over the powers of two that divide c (up to
``k_max``), every distinct scheme, and a few ranks per configuration between
1 and the largest rank that still saves parameters; latency between grid ranks
is interpolated linearly.  Measurements are cached on disk, keyed by provider,
onnxruntime version, thread count, the layer's geometry and input shape, so a
second run on the same shapes measures nothing.

Each measurement has the fixed cost of a run (feeding the same input to a
graph that computes nothing) subtracted.  The whole model's latency ``T`` is measured too; a
selection's predicted latency is ``T − Σ_layers t_orig + Σ_layers t_chosen``; where the
layers timed alone add up to more than :data:`LAYER_SHARE` of ``T``, all their times are
scaled down to that share first.
"""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from ..cache import default_dir, load_json_entry, save_json_entry
from ..cost import factorized_params, full_rank
from ..emit import emit
from ..errors import UsageError
from ..extract import Layer, ModelInfo, extract
from ..folding import decoder_kernel, encoder_kernel
from ..io import EXTERNAL_DATA_THRESHOLD, Source, proto_size, temp_dir
from ..ops import Factors, known as _known
from ..progress import progress_iter
from ..runtime import CPU, ort, providers_for, session, used_provider
from ..select import Config
from .inputs import random_inputs
from .int8 import Int8Copies, timed_pair
from .profile import layer_times
from .speed import CHANNEL_ALIGN, blocked_layout
from .timing import TIMING_BLOCKS, interleaved_latency, time_session

log = logging.getLogger(__name__)


CACHE_VERSION = 4  # 4: timed without thread-pool spinning; bump when what a measurement means changes
MODEL_ENTRY_VERSION = 2  # the whole model's entry; 2: in-context layer times, beta on top of them


def _cache_dir(cache_dir) -> Path | None:
    """The table's cache directory (see :func:`onnx_alds.cache.default_dir`)."""
    return default_dir("latency", cache_dir, "the latency cache directory")


def _overhead_model(base: onnx.ModelProto) -> onnx.ModelProto:
    """A run that feeds the layer's input and computes nothing (``Shape``, whose
    output is tiny, so no copy of the input is timed): the fixed cost of a run."""
    x = base.graph.input[0]
    g = helper.make_graph([helper.make_node("Shape", ["x"], ["y"])], "overhead", [x],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.INT64, None)])
    m = helper.make_model(g, opset_imports=list(base.opset_import))
    m.ir_version = base.ir_version
    return m


def _random_factors(layer, k: int, scheme: str, rank: int, dtype) -> Factors:
    g = layer.geometry
    rng = np.random.default_rng(1)
    e, d = encoder_kernel(scheme, g.kernel), decoder_kernel(scheme, g.kernel)
    enc = rng.standard_normal((k * rank, g.c // k, *e)).astype(dtype)
    dec = rng.standard_normal((g.f, k * rank, *d)).astype(dtype)
    return Factors(enc, dec)


def _factorized_model(base: onnx.ModelProto, k: int, scheme: str, rank: int) -> onnx.ModelProto:
    """The standalone layer ``base`` with its node replaced by the emitted subgraph."""
    source = Source.load(base)
    info = extract(base, source.graph)
    layer = info.layers[0]
    cfg = Config(k, scheme, rank, 0.0)
    out = emit(source, info, {layer.name: cfg},
               {layer.name: _random_factors(layer, k, scheme, rank, np.dtype(layer.dtype))})
    out.ir_version = base.ir_version
    return out


def cache_key(layer: Layer, in_dims, provider: str, ort_version: str, threads: int, opset: int,
              bias: bool, int8: bool = False) -> tuple[str, dict]:
    """What a layer's latency depends on, and its hash (the cache file name)."""
    a = layer.attrs
    src = {"version": CACHE_VERSION, "op": layer.op, "w": list(layer.weight_shape), "dtype": layer.dtype,
           "in": list(in_dims), "strides": list(a.strides), "dil": list(a.dilations), "pads": list(a.pads),
           "transB": a.trans_b, "bias": bias, "provider": provider, "ort": ort_version,
           "threads": threads, "opset": opset, "int8": int8}
    return hashlib.sha1(json.dumps(src, sort_keys=True).encode()).hexdigest(), src


def model_cache_key(model: onnx.ModelProto, info: ModelInfo, provider: str, ort_version: str,
                    threads: int, int8: bool = False) -> tuple[str | None, dict]:
    """Key of a whole model's baseline latency: its bytes, input shapes and the
    settings (None for a model too large to hash from memory)."""
    src = {"version": CACHE_VERSION, "model_version": MODEL_ENTRY_VERSION,
           "inputs": {k: list(v) for k, v in info.input_shapes.items()},
           "provider": provider, "ort": ort_version, "threads": threads, "int8": int8}
    if proto_size(model) > EXTERNAL_DATA_THRESHOLD or not model.graph.node:
        return None, src
    src["model"] = hashlib.sha1(model.SerializeToString()).hexdigest()
    return hashlib.sha1(json.dumps(src, sort_keys=True).encode()).hexdigest(), src


def grid_ks(c: int, k_max: int | None) -> list[int]:
    ks, k = [], 1
    while k <= c and (k_max is None or k <= k_max):
        if c % k == 0:
            ks.append(k)
        k *= 2
    return ks


def grid_ranks(layer: Layer, k: int, scheme: str, points: int, align: int = 1) -> list[int]:
    """A few ranks from the least to the largest that still saves parameters, all multiples of
    ``align`` (none where no multiple saves anything)."""
    g = layer.geometry
    r = full_rank(g, k, scheme)
    per = factorized_params(g, k, scheme, 1)
    useful = min(r, max(1, (g.params - 1) // per))  # beyond this rank nothing is saved
    top = useful // align * align
    if top < align:
        return []
    return sorted({max(align, int(round(v / align)) * align) for v in np.geomspace(align, top, points)} | {align, top})


@dataclass
class LayerLatency:
    orig_ms: float
    grid: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    align: int = 1  # only ranks that are multiples of this (speed.layout_ok)

    def cost(self, k, scheme, ranks):
        if k is None:
            return self.orig_ms
        rs, ms = self.grid[(k, scheme)]
        r = np.asarray(ranks, dtype=float)
        # only ranks inside the measured grid (no extrapolation) and in the layout's steps
        return np.where((r <= rs[-1]) & (r % self.align == 0), np.interp(r, rs, ms), np.inf)

    def in_context(self, ctx_ms: float, penalty: float = 0.0) -> "LayerLatency":
        """The layer as it runs inside the whole model: ``ctx_ms`` (its time there, from the
        profiler) for itself, every factorization scaled by the same in-context/alone ratio,
        plus ``penalty`` (what the closed loop measured its factorization to cost in the model
        beyond that, :meth:`LatencyTable.learned`)."""
        rho = ctx_ms / self.orig_ms if self.orig_ms > 0 else 1.0
        return LayerLatency(ctx_ms, {key: (rs, np.maximum(ms * rho + penalty, 0.0)) for key, (rs, ms) in
                                     self.grid.items()}, self.align)

    def mapped(self, f) -> "LayerLatency":
        """The same layer with ``f(ms)`` for its own time and every grid time."""
        return LayerLatency(f(self.orig_ms), {key: (rs, f(ms)) for key, (rs, ms) in self.grid.items()}, self.align)


BETA_RANGE = (0.1, 1.5)  # the in-context correction is kept within this range
LAYER_SHARE = 0.95  # the compressible layers take at most this share of the whole model's time


PRIOR_MIN_LAYERS = 3  # penalties measured on at least this many layers set the others' prior
# a probe's time less the empty run's can fall to or below zero when the layer is tiny and the
# machine noisy; no layer runs for free, so a probe is kept at least at this (100 ns)
RESOLUTION_MS = 1e-4


def _prior(context: dict, penalty: dict) -> float:
    """What a factorization costs inside the model beyond the table, as a fraction of its layer's
    in-context time, for a layer whose factorization was never measured there: the median of the
    measured ones, and never below 0 (an unmeasured layer is not assumed to save more than the table
    says).  On the shipped ResNet20 every measured factorization cost 5–17 µs more inside the model
    than the table predicted, about its layer's whole time: a node's fixed cost."""
    rel = [v / context[n] for n, v in penalty.items() if context.get(n, 0) > 0]
    return max(0.0, float(np.median(rel))) if len(rel) >= PRIOR_MIN_LAYERS else 0.0


@dataclass
class LatencyTable:
    provider: str
    layers: dict[str, LayerLatency]
    model_ms: float
    measured: int = 0  # measurements taken (not from the cache) when the table was built
    cached: int = 0
    threads: int = 2
    # layers timed alone do not add up to the model: a factorization saves, inside the whole model,
    # ``beta`` times what it saves alone.  1 until the closed loop has measured the model
    # (:meth:`corrected`); cached with the whole-model baseline, so a rerun starts from it
    beta: float = 1.0
    int8: bool = False  # timed as int8 QDQ models (``onnx-alds quantize``)
    int8_copies: Int8Copies | None = field(default=None, repr=False, compare=False)  # made with these
    entry_path: Path | None = field(default=None, repr=False, compare=False)
    entry: dict | None = field(default=None, repr=False, compare=False)
    raw: dict | None = field(default=None, repr=False, compare=False)  # the layers before ``beta``
    # in-context calibration (CPU provider, :mod:`onnx_alds.profile`): each layer's time inside the
    # whole model, and per layer what its factorization measured to cost there beyond the table
    alone: dict | None = field(default=None, repr=False, compare=False)  # the layers as timed alone
    context: dict = field(default_factory=dict, repr=False, compare=False)
    penalty: dict = field(default_factory=dict, repr=False, compare=False)

    def with_beta(self, beta: float) -> "LatencyTable":
        """The same table with every factorization's saving (or loss) against its layer times ``beta``."""
        beta = float(np.clip(beta, *BETA_RANGE))
        raw = self.raw if self.raw is not None else self.layers
        layers = {name: lt.mapped(lambda ms, o=lt.orig_ms: np.maximum(o + beta * (ms - o), 0.0))
                  for name, lt in raw.items()}
        return replace(self, layers=layers, beta=beta, raw=raw)

    def with_context(self, context: dict, penalty: dict) -> "LatencyTable":
        """The table with the layers' in-context times and learned penalties (ms), ``beta`` kept.
        A layer whose factorization was never measured in the model gets the median penalty of
        those that were, relative to their in-context time (:func:`_prior`)."""
        alone = self.alone if self.alone is not None else self.raw if self.raw is not None else self.layers
        prior = _prior(context, penalty)
        raw = {n: lt.in_context(context[n], penalty.get(n, prior * context[n])) if context.get(n, 0) > 0 else lt
               for n, lt in alone.items()}
        return replace(self, raw=raw, layers=raw, alone=alone, context=dict(context), penalty=dict(penalty),
                       beta=1.0).with_beta(self.beta)

    def learned(self, choices: dict, before: dict, after: dict) -> "LatencyTable":
        """The table corrected layer by layer by one profile of the original (``before``) and of
        the rewrite of ``choices`` (``after``), run in turn (:func:`onnx_alds.profile.layer_times`):
        where a factorized layer's measured change inside the model differs from what the table
        predicts for it, the difference is added to every factorization of that layer."""
        if not self.context or not before.get("wall"):
            return self
        kappa = self.model_ms / before["wall"]  # the profile's load, in the table's units
        penalty = dict(self.penalty)
        for name, c in choices.items():
            if c is None or name not in self.context or name not in before["layers"]:
                continue
            lt = self.layers[name]
            predicted = float(lt.cost(c.k, c.scheme, [c.rank])[0]) - lt.orig_ms
            if not np.isfinite(predicted):
                continue
            measured = kappa * (after["layers"].get(name, 0.0) - before["layers"][name])
            penalty[name] = penalty.get(name, 0.0) + (measured - predicted) / max(self.beta, BETA_RANGE[0])
        return self.with_context(self.context, penalty)

    def corrected(self, predicted_ms: float, before_ms: float, after_ms: float) -> "LatencyTable":
        """The table corrected by one whole-model measurement of a selection it predicted at
        ``predicted_ms``: measured relative saving ``1 − after/before`` over predicted
        ``1 − predicted/model_ms`` scales ``beta``."""
        predicted = 1.0 - predicted_ms / self.model_ms
        measured = 1.0 - after_ms / before_ms
        if abs(predicted) < 1e-3:
            return self
        return self.with_beta(self.beta * max(measured, 0.0) / predicted)

    def remember(self) -> None:
        """Cache ``beta`` and the learned penalties with the whole-model baseline, for the next
        run on this model."""
        if self.entry_path is not None and self.entry is not None:
            self.entry["beta"] = self.beta
            if self.context:
                self.entry["penalty"] = {n: float(v) for n, v in self.penalty.items()}
            save_json_entry(self.entry_path, self.entry)

    def floor(self) -> float:
        """The smallest fraction of the whole model's latency the table can reach: every layer at
        its fastest factorization, or dense where none is faster."""
        t = self.model_ms
        for lt in self.layers.values():
            fastest = min([lt.orig_ms] + [float(np.min(ms)) for _, ms in lt.grid.values() if len(ms)])
            t += fastest - lt.orig_ms
        return t / self.model_ms if self.model_ms > 0 else 1.0

    def configs(self, name: str) -> list[tuple[int, str]]:
        return sorted(self.layers[name].grid)

    def summary(self, predicted_ms: float) -> dict:
        """What the report's budget section says of the table and a prediction."""
        return dict(provider=self.provider, model_ms=self.model_ms, predicted_ms=predicted_ms,
                    predicted_speedup=self.model_ms / predicted_ms if predicted_ms > 0 else float("nan"),
                    measurements=self.measured, cached=self.cached, int8=self.int8,
                    in_context=len(self.context), corrected=len(self.penalty))

    def predicted_ms(self, choices: dict) -> float:
        t = self.model_ms
        for name, c in choices.items():
            if c is not None:
                lt = self.layers[name]
                t += float(lt.cost(c.k, c.scheme, [c.rank])[0]) - lt.orig_ms
        return t

    @classmethod
    def for_model(cls, model: onnx.ModelProto, info: ModelInfo, *, provider: str = "auto", threads: int = 2,
                  k_max: int | None = 16, schemes=None, points: int = 4, cache_dir=None,
                  progress: bool = False, int8: bool = False,
                  int8_copies: Int8Copies | None = None) -> "LatencyTable":
        """``int8``: every layer, candidate and the whole model are timed as the int8 QDQ
        models that ``onnx-alds quantize`` makes of them (random calibration: timing only)."""
        with temp_dir("onnx-alds-int8-") if int8 else nullcontext() as tmp:
            return cls._for_model(model, info, provider=provider, threads=threads, k_max=k_max, schemes=schemes,
                                  points=points, cache_dir=cache_dir, progress=progress, int8_dir=tmp,
                                  copies=(int8_copies or Int8Copies()) if int8 else None)

    @classmethod
    def _for_model(cls, model, info, *, provider, threads, k_max, schemes, points, cache_dir, progress,
                   int8_dir, copies) -> "LatencyTable":
        int8 = int8_dir is not None
        providers = providers_for(provider)
        cache = _cache_dir(cache_dir)
        version = ort().__version__
        prober = _Prober(providers, threads, next((o.version for o in model.opset_import
                                                  if o.domain in ("", "ai.onnx")), 17),
                         version, cache, int8_dir, copies)
        layers = {layer.name: prober.layer(layer, info, k_max, schemes, points)
                  for layer in progress_iter(info.candidates, desc="latency table", unit="layer",
                                             enabled=progress)}
        measured, cached, prov_used = prober.measured, prober.cached, prober.provider
        # the whole-model baseline is cached like the layers, so the budget's floor and
        # target do not move with the machine's load from one run to the next
        mkey, msrc = model_cache_key(model, info, providers[0], version, threads, int8=int8)
        mpath = cache / f"model-{mkey}.json" if cache is not None and mkey else None
        mentry = (load_json_entry(mpath, msrc) if mpath is not None else None) or {"key": msrc, "ms": {}}
        timed = onnx.load(str(copies.copy(model, int8_dir, "model", preprocess=True))) if int8 else model
        sess = session(timed, providers, threads)
        feeds = random_inputs(sess, info.input_shapes, batch=1)
        if "model" in mentry["ms"]:
            model_ms = mentry["ms"]["model"]
            cached += 1
        else:
            model_ms = time_session(sess, feeds, warmup=5, repeats=30)
            mentry["ms"]["model"] = model_ms
            measured += 1
            if mpath is not None:
                save_json_entry(mpath, mentry)
        # layers timed alone can add up to more than the whole model (on the shipped ResNet20: 0.28 ms
        # against 0.25 ms; a one-conv model alone measured 0.39 ms against 0.27 ms): then scale them
        # down so that they leave the rest of the model (and the prediction) positive
        alone = sum(lt.orig_ms for lt in layers.values())
        if alone > LAYER_SHARE * model_ms > 0:
            f = LAYER_SHARE * model_ms / alone
            layers = {n: lt.mapped(lambda ms: ms * f) for n, lt in layers.items()}
        prov = prov_used or used_provider(sess)
        context = mentry.get("context")
        if isinstance(context, dict):
            cached += 1
        elif mkey and in_context_ok(prov):
            context = _context(timed, info, providers, threads, model_ms, feeds)
            measured += 1
            mentry["context"] = context  # empty where the profile cannot be attributed: not tried again
            if mpath is not None:
                save_json_entry(mpath, mentry)
        table = cls(prov, layers, model_ms, measured, cached, threads, entry_path=mpath, entry=mentry, int8=int8,
                    int8_copies=copies)
        if isinstance(context, dict) and context:
            penalty = mentry.get("penalty") if isinstance(mentry.get("penalty"), dict) else {}
            table = table.with_context({n: float(v) for n, v in context.items() if n in layers},
                                       {n: float(v) for n, v in penalty.items() if n in layers})
        beta = mentry.get("beta")
        if isinstance(beta, (int, float)) and not isinstance(beta, bool) and np.isfinite(beta):
            table = table.with_beta(float(beta))
        return table


class _Prober:
    """Times each layer alone and its factorizations at a grid of (k, scheme, rank), cached per layer
    (:func:`cache_key`); ``measured``/``cached`` count what was timed and what came from the cache."""

    def __init__(self, providers, threads, opset, version, cache, int8_dir, copies):
        self.providers, self.threads, self.opset, self.version = providers, threads, opset, version
        self.cache, self.int8_dir, self.copies = cache, int8_dir, copies
        self.measured, self.cached, self.provider = 0, 0, None

    def _time(self, entry, tag, make, feeds, quantized=True) -> float:
        if tag in entry["ms"]:
            self.cached += 1
            return entry["ms"][tag]
        m = make()
        if self.int8_dir is not None and quantized:
            m = self.copies.copy(m, self.int8_dir, "probe")
        sess = session(m, self.providers, self.threads)
        self.provider = used_provider(sess)
        entry["ms"][tag] = time_session(sess, feeds)
        self.measured += 1
        return entry["ms"][tag]

    def layer(self, layer, info, k_max, schemes, points) -> LayerLatency:
        in_dims = info.shapes.get(layer.input_name)
        if not _known(in_dims):
            raise UsageError(f"the latency of {layer.name!r} needs its input shape; give the model's "
                             f"dynamic sizes with --input-shape NAME:D1,D2,...")
        base = layer.spec.standalone(layer, list(in_dims), self.opset)
        mini_layer = extract(base, gs.import_onnx(base)).layers[0]
        allowed = [s for s in mini_layer.schemes if schemes is None or s in schemes] or ["s0"]
        # on the CPU provider a conv's factorization stays in onnxruntime's blocked layout:
        # k = 1 and ranks in steps of CHANNEL_ALIGN (speed.layout_ok)
        blocked = blocked_layout(layer, self.providers[0])
        align = CHANNEL_ALIGN if blocked else 1
        ks = [1] if blocked or not mini_layer.allow_groups else grid_ks(layer.geometry.c, k_max)
        key, key_src = cache_key(layer, in_dims, self.providers[0], self.version, self.threads, self.opset,
                                 bias=len(base.graph.initializer) > 1, int8=self.int8_dir is not None)
        path = self.cache / f"{key}.json" if self.cache is not None else None
        entry = (load_json_entry(path, key_src) if path is not None else None) or {"key": key_src, "ms": {}}
        feeds = {"x": np.random.default_rng(0).standard_normal(in_dims).astype(np.dtype(layer.dtype))}
        before = self.measured
        # a run's fixed cost (feeding the input, fetching the output) is not the layer's:
        # subtract what a run that computes nothing costs at the same input shape
        overhead = self._time(entry, "overhead", lambda: _overhead_model(base), feeds, quantized=False)
        lt = LayerLatency(max(self._time(entry, "orig", lambda: base, feeds) - overhead, RESOLUTION_MS),
                          align=align)
        for k in ks:
            for s in allowed:
                rs = grid_ranks(mini_layer, k, s, points, align)
                if not rs:
                    continue
                ms = [max(self._time(entry, f"{k}|{s}|{r}", lambda k=k, s=s, r=r: _factorized_model(base, k, s, r),
                                     feeds) - overhead, RESOLUTION_MS) for r in rs]
                lt.grid[(k, s)] = (np.asarray(rs, float), np.asarray(ms, float))
        if self.measured > before and path is not None:
            save_json_entry(path, entry)
        return lt


def in_context_ok(provider: str) -> bool:
    """Whether onnxruntime's profiler times this provider's layers in context: on the CPU provider
    a node's kernel time is its computation; on CUDA it is mostly the launch (kernels run
    asynchronously), so a CUDA table stays as timed alone, corrected by ``beta``."""
    return provider == "CPUExecutionProvider"


def profile_pair(model, new, table, info) -> tuple[dict, dict]:
    """Per-layer times inside the original and the rewritten model, profiled in turn."""
    with timed_pair(table.int8_copies, model, new) as pair:
        m0, m1 = (onnx.load(str(m)) if isinstance(m, Path) else m for m in pair)
        before, after = layer_times([m0, m1], list(table.layers), [CPU], table.threads,
                                    input_shapes=info.input_shapes)
    return before, after


def _context(model, info, providers, threads, model_ms, feeds) -> dict:
    """Each compressible layer's time inside the whole model (ms, in the units of ``model_ms``),
    from onnxruntime's profiler; empty where the profile cannot be attributed."""
    try:
        prof = layer_times([model], [l.name for l in info.candidates], providers, threads, feeds)[0]
    except Exception as e:  # the table stays as timed alone
        log.info("profiling the whole model failed (%s); the latency table stays as timed alone", e)
        return {}
    if not prof["layers"] or not prof["wall"] > 0:
        return {}
    # the profile's load, in the table's units; and the layers inside the model never take more than
    # LAYER_SHARE of it (a profile taken under load can attribute more than the wall time to them)
    kappa = model_ms / max(prof["wall"], sum(prof["layers"].values()) / LAYER_SHARE)
    return {n: ms * kappa for n, ms in prof["layers"].items()}


def measure_speedup(model, new, table, info) -> dict:
    """Whole-model latency before and after, interleaved, with the table's settings."""
    providers = providers_for("cuda" if table.provider == "CUDAExecutionProvider" else "cpu")
    with timed_pair(table.int8_copies, model, new) as (m0, m1):
        s0, s1 = session(m0, providers, table.threads), session(m1, providers, table.threads)
    feeds = random_inputs(s0, info.input_shapes, batch=1)
    t0, t1 = interleaved_latency([s0, s1], [feeds, feeds], warmup=5, repeats=30, min_seconds=0.3,
                                 blocks=TIMING_BLOCKS)
    before, after = float(np.median(t0)), float(np.median(t1))
    return {"threads": table.threads, "measured_ms_before": before, "measured_ms": after,
            "measured_speedup": before / after if after > 0 else float("nan")}
