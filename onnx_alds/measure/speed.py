"""The speed guard: never choose a factorization that runs slower than its
dense layer on the target provider (unless the user allows it).

A cheap latency model, measured once per provider, onnxruntime version and
thread count and cached on disk (about a second of timing; measured again
when the machine is much quieter than it was then, :data:`LOAD_SLACK`):

    t(config) ≈ p_conv(k)·MAC_enc + MAC_dec + o·(extra nodes)      (in dense-MAC units)
    t(dense)  ≈ MAC_dense

``p(k)`` is what a grouped encoder costs per multiply-accumulate relative to
a dense one (grouped convolutions run group by group on many runtimes),
measured for k = 1, 2, 4, … 64 on a representative conv and on the grouped
linear subgraph the emitter writes, and interpolated in log k (held beyond
64); ``o`` is the fixed cost of one more node, as dense MACs.

Every MAC count is weighted by how efficiently a product that *thin* runs:
a factorization's encoder has only ``j`` output channels and its decoder a
reduction of only ``k·j``, and GEMM kernels run such thin products at a
fraction of their peak.  ``e_out(n)`` and ``e_in(n)``, the cost per MAC of a
1×1 conv with ``n`` output (input) channels relative to a 128 → 128 one,
are measured for n = 4 … 128 and interpolated in log n (1 beyond 128); a
product with reduction ``K`` and ``N`` outputs costs ``max(e_in(K), e_out(N))``
per MAC — the dense layer too.  A configuration is admissible when
``t(config) < t(dense)``.  The whole-model
check after the rewrite (validation's interleaved latency) is what the user
sees; this model only keeps the selector away from what is clearly slower.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from math import prod
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..cache import default_dir, read_entry, write_entry
from ..folding import decoder_kernel, encoder_kernel
from ..runtime import ort, providers_for, session, used_provider
from .timing import time_session

log = logging.getLogger(__name__)

SPEED_VERSION = 5  # 5: timed without thread-pool spinning
KS = (1, 2, 4, 8, 16, 32, 64)
# A model measured while other work held the cores times every node too slow (2 threads next to one
# busy core on a 2-core AMD EPYC: a node cost 275k-363k MACs against 115k on the quiet machine, and
# made every ResNet20 budget under 0.85 infeasible), and it would be cached for good.  Each entry records the
# load it was measured at; one measured at a load this much higher than the machine's now is
# measured again and replaced, so the cache settles on a quiet machine's figures.
LOAD_SLACK = 1.0
THIN = (4, 8, 16, 32, 64, 128)  # channel counts of the thin-product probes


def load_average() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def _model(nodes, x_shape, inits, opset=17):
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                          initializer=[numpy_helper.from_array(v, n) for n, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _grouped_conv(c: int, k: int, hw: int):
    w = np.random.default_rng(0).standard_normal((c, c // k, 3, 3)).astype(np.float32)
    return _model([helper.make_node("Conv", ["x", "w"], ["y"], group=k, pads=[1, 1, 1, 1])], [1, c, hw, hw],
                  {"w": w}), [1, c, hw, hw], c * (c // k) * 9 * hw * hw


def _pointwise(c_in: int, c_out: int, hw: int):
    w = np.random.default_rng(0).standard_normal((c_out, c_in, 1, 1)).astype(np.float32)
    return _model([helper.make_node("Conv", ["x", "w"], ["y"])], [1, c_in, hw, hw], {"w": w}), \
        [1, c_in, hw, hw], c_in * c_out * hw * hw


def _grouped_linear(c: int, k: int, t: int):
    rng = np.random.default_rng(0)
    cg = c // k
    if k == 1:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
        inits = {"w": rng.standard_normal((c, c)).astype(np.float32)}
    else:
        nodes = [helper.make_node("Reshape", ["x", "s1"], ["a"]),
                 helper.make_node("Transpose", ["a"], ["b"], perm=[2, 0, 1, 3]),
                 helper.make_node("MatMul", ["b", "w"], ["z"]),
                 helper.make_node("Transpose", ["z"], ["e"], perm=[1, 2, 0, 3]),
                 helper.make_node("Reshape", ["e", "s2"], ["y"])]
        inits = {"s1": np.array([0, 0, k, cg], np.int64), "w": rng.standard_normal((k, 1, cg, cg)).astype(np.float32),
                 "s2": np.array([0, 0, c], np.int64)}
    return _model(nodes, [1, t, c], inits), [1, t, c], t * c * cg


CHANNEL_ALIGN = 4  # a factorized conv's inner channel count is a multiple of this on the CPU provider


def layout_ok(layer, provider: str, k: int, ranks) -> np.ndarray:
    """Factorizations that keep onnxruntime's CPU convolutions in its blocked channel layout (NCHWc).

    onnxruntime runs a chain of convs in a blocked layout and converts to and from plain NCHW
    (ReorderInput/ReorderOutput, a pass over the activation each) wherever a conv cannot take it: a
    grouped conv that is not depthwise, or a channel count that the block does not divide.  Measured
    on resnet18 (2-core AVX-512 CPU): a ``--keep-latency 0.8`` rewrite with odd ranks and two k = 2
    layers had 29 reorder nodes after onnxruntime's optimizer and ran 1.03x (batch 1) / 1.16x
    (batch 8); the same plan with k = 1 and ranks rounded up to multiples of 8 had 1, the original's
    count, and ran 1.38x / 1.56x with more parameters; with ranks rounded to multiples of 4 (or 16)
    the count was 1 as well, with even ranks 20.  Timed alone, a layer has the reorders at
    its ends either way, so neither the speed guard's probes nor the latency table see this: on the
    CPU provider a conv's factorization is kept to ``k = 1`` and ranks that are multiples of
    :data:`CHANNEL_ALIGN`.  Other operators and providers are unconstrained."""
    j = np.asarray(ranks)
    if not blocked_layout(layer, provider):
        return np.ones(j.shape, dtype=bool)
    return (k == 1) & (j % CHANNEL_ALIGN == 0)


def blocked_layout(layer, provider: str) -> bool:
    """Whether :func:`layout_ok` constrains this layer's factorizations on ``provider``."""
    return provider == "CPUExecutionProvider" and layer.op in ("Conv", "ConvTranspose")


def _positive_table(d, what: str) -> dict[str, float]:
    """A cached ``{integer key: ratio ≥ 1}`` table, or ValueError (the entry is a miss)."""
    if not isinstance(d, dict) or not d:
        raise ValueError(f"{what} is not a non-empty object")
    out = {}
    for k, v in d.items():
        if not (isinstance(k, str) and k.isdigit() and int(k) >= 1):
            raise ValueError(f"{what} has the key {k!r}, not a positive integer")
        # measure() never stores less than 1 (more groups or thinner never cost less per MAC)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (np.isfinite(v) and 1.0 <= v < 1e6):
            raise ValueError(f"{what}[{k}] = {v!r} is not a finite ratio of at least 1")
        out[str(int(k))] = float(v)
    return out


@dataclass
class SpeedModel:
    provider: str
    threads: int
    conv_penalty: dict = field(default_factory=dict)  # k → time per MAC relative to the dense conv
    linear_penalty: dict = field(default_factory=dict)
    node_overhead: float = 0.0  # one more node, in dense MACs
    thin_in: dict = field(default_factory=dict)  # n → cost per MAC of a product reducing over n, relative
    thin_out: dict = field(default_factory=dict)  # n → the same for n outputs
    load: float | None = None  # the machine's 1-minute load average when it was measured (None: unknown)

    def _p(self, table: dict, k: int) -> float:
        ks = sorted(int(x) for x in table)
        return float(np.interp(np.log2(k), np.log2(ks), [table[str(x)] for x in ks]))

    def _thin(self, table: dict, n) -> np.ndarray:
        if not table:
            return np.ones_like(np.asarray(n, float))
        ns = sorted(int(x) for x in table)
        return np.interp(np.log2(np.maximum(np.asarray(n, float), 1.0)), np.log2(ns), [table[str(x)] for x in ns])

    def efficiency(self, reduce, outputs) -> np.ndarray:
        """Cost per MAC of a product with reduction ``reduce`` and ``outputs`` outputs (module docstring)."""
        return np.maximum(self._thin(self.thin_in, reduce), self._thin(self.thin_out, outputs))

    def dense(self, layer) -> float:
        g = layer.geometry
        macs = float(g.params * prod(g.out_spatial)) if g.out_spatial else float(g.params)
        return macs * float(self.efficiency(g.c * prod(g.kernel), g.f))

    def estimate(self, layer, k: int, scheme: str, ranks) -> np.ndarray:
        """Dense-MAC-equivalent time of each rank's factorization."""
        g = layer.geometry
        out = prod(g.out_spatial) if g.out_spatial else 1
        if g.in_spatial and g.out_spatial:
            (hi, wi), (ho, wo) = g.in_spatial, g.out_spatial
            enc_sp = {"s0": ho * wo, "s1": hi * wo, "s2": ho * wi, "s3": hi * wi}[scheme]
        else:
            enc_sp = out
        j = np.asarray(ranks, float)
        enc = j * g.c * prod(encoder_kernel(scheme, g.kernel)) * enc_sp
        # a transposed conv's s0 decoder (1×1 after the transposed encoder) runs at its upsampled output
        dec_sp = prod(g.decoder_spatial) if scheme == "s0" and getattr(g, "decoder_spatial", None) else out
        dec = j * g.f * k * prod(decoder_kernel(scheme, g.kernel)) * dec_sp
        linear = layer.op != "Conv"
        pen = self._p(self.linear_penalty if linear else self.conv_penalty, k) if k > 1 else 1.0
        extra = 1 + (4 if linear and k > 1 else 0)
        enc_eff = self.efficiency(g.c // k * prod(encoder_kernel(scheme, g.kernel)), j)
        if k > 1:  # p(k) was measured on groups of 128/k channels in and out: only thinner groups cost more
            enc_eff = np.maximum(enc_eff / float(self.efficiency(128 // k, 128 // k)), 1.0)
        dec_eff = self.efficiency(k * j * prod(decoder_kernel(scheme, g.kernel)), g.f)
        return pen * enc * enc_eff + dec * dec_eff + extra * self.node_overhead * self.strictness

    def admissible(self, layer, k: int, scheme: str, ranks) -> np.ndarray:
        return (self.estimate(layer, k, scheme, ranks) < self.dense(layer)) & layout_ok(layer, self.provider, k, ranks)

    strictness: float = 1.0  # the overhead of a node counts this many times (the closed loop raises it)

    def stricter(self, factor: float = 2.0) -> "SpeedModel":
        """The same model with every extra node counted ``factor`` times more."""
        return replace(self, strictness=self.strictness * factor)

    def summary(self) -> dict:
        return {"provider": self.provider, "threads": self.threads, "strictness": self.strictness}

    def to_dict(self) -> dict:
        return {"version": SPEED_VERSION, "provider": self.provider, "threads": self.threads,
                "conv_penalty": {str(k): v for k, v in self.conv_penalty.items()},
                "linear_penalty": {str(k): v for k, v in self.linear_penalty.items()},
                "node_overhead": self.node_overhead,
                "thin_in": dict(self.thin_in), "thin_out": dict(self.thin_out),
                **({} if self.load is None else {"load": self.load})}

    @classmethod
    def from_dict(cls, d: dict) -> "SpeedModel":
        if d.get("version") != SPEED_VERSION:
            raise ValueError("old version")
        conv, lin = _positive_table(d["conv_penalty"], "conv_penalty"), _positive_table(d["linear_penalty"],
                                                                                          "linear_penalty")
        t_in, t_out = _positive_table(d["thin_in"], "thin_in"), _positive_table(d["thin_out"], "thin_out")
        overhead = d["node_overhead"]
        if isinstance(overhead, bool) or not isinstance(overhead, (int, float)) or \
                not (np.isfinite(overhead) and overhead >= 0):
            raise ValueError(f"node_overhead {overhead!r} is not a finite, non-negative cost in MACs")
        if not isinstance(d["provider"], str) or isinstance(d["threads"], bool) or not isinstance(d["threads"], int):
            raise ValueError("provider or threads of the wrong type")
        load = d.get("load")
        if load is not None and (isinstance(load, bool) or not isinstance(load, (int, float))
                                 or not (np.isfinite(load) and load >= 0)):
            raise ValueError(f"load {load!r} is not a finite, non-negative load average")
        return cls(d["provider"], d["threads"], conv, lin, float(overhead), t_in, t_out,
                   None if load is None else float(load))

    @classmethod
    def measure(cls, provider: str = "cpu", threads: int = 2, rounds: int = 3) -> "SpeedModel":
        """Time the probes in ``rounds`` interleaved rounds and keep each one's
        fastest round: load on a shared machine only ever adds time, so the
        minimum is the stable figure."""
        providers = providers_for(provider)
        rng = np.random.default_rng(0)
        w = rng.standard_normal((8, 8, 1, 1)).astype(np.float32)
        chain = [helper.make_node("Conv", [f"t{i}" if i else "x", "w"], [f"t{i + 1}" if i < 8 else "y"])
                 for i in range(9)]
        probes = {("conv", k): _grouped_conv(128, k, 28) for k in KS}
        probes.update({("linear", k): _grouped_linear(512, k, 196) for k in KS})
        # one more node inside a model: a chain of tiny convs, per extra link (a run's fixed cost cancels)
        probes[("node", 1)] = (_model([helper.make_node("Conv", ["x", "w"], ["y"])], [1, 8, 2, 2], {"w": w}),
                               [1, 8, 2, 2], 0)
        probes[("node", 9)] = (_model(chain, [1, 8, 2, 2], {"w": w}), [1, 8, 2, 2], 0)
        for n in THIN:  # thin products: few output channels, or a short reduction
            probes[("out", n)] = _pointwise(128, n, 28)
            probes[("in", n)] = _pointwise(n, 128, 28)
        sessions = {key: session(m, providers, threads) for key, (m, _, _) in probes.items()}
        feeds = {key: {"x": rng.standard_normal(shape).astype(np.float32)} for key, (_, shape, _) in probes.items()}
        best: dict = {}
        for _ in range(rounds):
            for key, sess in sessions.items():
                t = time_session(sess, feeds[key], warmup=2, repeats=11)
                best[key] = min(best.get(key, np.inf), t)
        prov = used_provider(sessions[("conv", 1)])

        def penalties(kind):
            dense = best[(kind, 1)] / probes[(kind, 1)][2]
            # more groups never cost less per MAC: a running maximum irons out timing noise
            p = np.maximum.accumulate([max((best[(kind, k)] / probes[(kind, k)][2]) / dense, 1.0) for k in KS])
            return {str(k): float(v) for k, v in zip(KS, p)}

        conv, lin = penalties("conv"), penalties("linear")

        fixed = best[("node", 1)]  # a run of one tiny node: the run's and the node's own fixed cost

        def thin(kind):
            def per_mac(n):
                return max(best[(kind, n)] - fixed, 1e-9) / probes[(kind, n)][2]

            ref = per_mac(128)
            # thinner never costs less per MAC: a running maximum from the wide end irons out noise
            e = [max(per_mac(n) / ref, 1.0) for n in THIN]
            e = np.maximum.accumulate(e[::-1])[::-1]
            return {str(n): float(v) for n, v in zip(THIN, e)}

        dense_ms, dense_macs = best[("conv", 1)], probes[("conv", 1)][2]
        overhead = max(best[("node", 9)] - best[("node", 1)], 0.0) / 8 * dense_macs / dense_ms
        return cls(prov, threads, conv, lin, float(overhead), thin("in"), thin("out"), load_average())

    @staticmethod
    def entry_path(folder: Path, provider: str = "cpu", threads: int = 2) -> Path:
        """Where the speed model of ``provider`` at ``threads`` threads is cached in ``folder``."""
        return Path(folder) / f"{providers_for(provider)[0]}-ort{ort().__version__}-t{threads}.json"

    @classmethod
    def for_provider(cls, provider: str = "cpu", threads: int = 2, cache_dir=None) -> "SpeedModel":
        """Measured once and cached (keyed by provider, onnxruntime version and threads)."""
        folder = default_dir("speed", cache_dir, "the speed-model cache directory")
        path = cls.entry_path(folder, provider, threads) if folder is not None else None
        data = read_entry(path) if path is not None else None  # untrusted: regular files only, bounded
        if data is not None:
            try:
                cached = cls.from_dict(json.loads(data.decode("utf-8")))
            except (ValueError, KeyError, TypeError, AttributeError) as e:  # a corrupt entry is a miss
                log.warning("cache entry %s ignored: %s", path, e)
            else:
                now = load_average()
                if cached.load is None or now is None or now + LOAD_SLACK >= cached.load:
                    return cached
                log.info("the cached speed model was measured at load %.1f, the machine is quieter now (%.1f): "
                         "measuring it again", cached.load, now)
        model = cls.measure(provider, threads)
        if path is not None:
            write_entry(path, json.dumps(model.to_dict(), indent=1).encode())
        return model
