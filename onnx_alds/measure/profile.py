"""In-context layer times: onnxruntime's profiler on the whole model.

Layers timed alone do not add up to the model (fusions, the blocked layout's
reorders, caches).  The profiler times every node of the graph onnxruntime
really runs, after its fusions; :func:`layer_times` attributes each node to the
compressible layer it computes (an original layer, or the encoder and decoder
the rewrite emitted for it) and gives the rest of the graph as ``None``.

onnxruntime names a fused node after the tensor or node it ends with
(``hardtanh_2_nchwc`` for a Conv fused with the Clip that writes ``hardtanh_2``,
``conv1_token_1`` for the QLinearConv made of the int8 QDQ group around ``conv1``);
attribution walks back from that name through the element-wise nodes fused into
a layer until it reaches the layer's Conv, Gemm or MatMul.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict

import numpy as np
import onnx

from ..io import temp_dir
from ..runtime import session
from .inputs import random_inputs
from .timing import plain_run, timed_runs

# what onnxruntime fuses into the Conv/Gemm/MatMul before it: walking back through these finds the layer
_FUSED = {"Relu", "Clip", "Add", "Sum", "Sigmoid", "Mul", "BatchNormalization", "LeakyRelu", "HardSigmoid",
          "HardSwish", "Tanh", "Identity", "Cast"}
_LAYER_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul"}
# what onnxruntime appends to the name of a node it made from others: the blocked-layout conv
# (``_nchwc``), a node of a QDQ group fused into a QLinear one (``_token_5``)
_SUFFIX = re.compile(r"(_nchwc|_token_\d+|_fused)$")


def _owner(node: onnx.NodeProto, layers: set[str]) -> str | None:
    """The layer a Conv/Gemm/MatMul node computes: the layer itself, or a node the rewrite emitted for it."""
    if node.name in layers:
        return node.name
    head, sep, tail = node.name.rpartition("/")
    if sep and tail.startswith("alds_") and head in layers:
        return head
    return None


class Attribution:
    """Maps the names in onnxruntime's profile to layers of ``model``."""

    def __init__(self, model: onnx.ModelProto, layers):
        self.layers = set(layers)
        self.by_name = {n.name: n for n in model.graph.node if n.name}
        self.producer = {o: n for n in model.graph.node for o in n.output if o}
        self._memo: dict[str, str | None] = {}

    def _walk(self, node: onnx.NodeProto | None, depth: int = 0) -> str | None:
        if node is None or depth >= 6:
            return None
        if node.op_type in _LAYER_OPS:
            return _owner(node, self.layers)
        if node.op_type not in _FUSED:
            return None
        for i in node.input:  # Add of a residual: the side a layer produced
            found = self._walk(self.producer.get(i), depth + 1)
            if found is not None:
                return found
        return None

    def __call__(self, name: str) -> str | None:
        if name in self._memo:
            return self._memo[name]
        found = None
        stems = [name]
        while _SUFFIX.search(stems[-1]):
            stems.append(_SUFFIX.sub("", stems[-1]))
        for stem in stems:
            node = self.by_name.get(stem) or self.producer.get(stem)
            if node is not None:
                found = self._walk(node)
                if found is not None:
                    break
        self._memo[name] = found
        return found


def layer_times(models, layers, providers, threads: int, feeds: dict | None = None, *, input_shapes=None,
                runs: int = 20, warmup: int = 5, min_seconds: float = 0.25, max_runs: int = 1000) -> list[dict]:
    """Per-run milliseconds of each layer inside each whole model (ModelProtos), from onnxruntime's profiler.

    Every model runs twice over, profiled and not, and all the sessions run in
    turn, one run each (as :func:`onnx_alds.measure.timing.timed_runs` does), so
    that the machine's load falls on all of them alike: at least ``runs`` runs
    each, more (up to ``max_runs``) until the first has run ``min_seconds``.
    Sessions are made as every timing session is (:func:`onnx_alds.runtime.session`).
    Without ``feeds``, seeded inputs at ``input_shapes`` (batch 1) are drawn for them.

    The profiler costs about the same for every node it times (about 5 µs on
    this 2-core machine: the shipped ResNet20, 0.18 ms a run, takes 0.36 ms
    profiled). That cost, ``overhead``, is what the kernels of the profiled
    runs add up to beyond the wall time of the unprofiled ones, per kernel; it is
    taken off every kernel, so a factorized layer's two nodes are not charged twice.

    Returns, per model, ``{"layers": {name: ms}, "nodes": {name: n}, "rest": ms,
    "rest_nodes": n, "wall": ms, "overhead": ms}``: time attributed to each layer
    and the number of kernels it ran, the same for every other node, the median
    wall time of an unprofiled run, and the profiler's cost per kernel (all per run)."""
    with temp_dir("onnx-alds-profile-") as tmp:
        profiled = [session(m, providers, threads, profile_prefix=os.path.join(str(tmp), f"profile{i}"))
                    for i, m in enumerate(models)]
        plain = [session(m, providers, threads) for m in models]
        if feeds is None:
            feeds = random_inputs(plain[0], input_shapes, batch=1)
        # the profiled sessions run in the same alternation, untimed in effect: their times are not used
        times = timed_runs([plain_run(s, feeds) for s in profiled + plain], warmup=warmup, repeats=runs,
                           min_seconds=min_seconds, max_repeats=max_runs)
        walls = times[len(profiled):]
        events = []
        for sess in profiled:
            with open(sess.end_profiling()) as f:
                events.append(json.load(f))
    out = []
    for m, ev, w in zip(models, events, walls):
        r = _summarize(ev, Attribution(m, layers), warmup)
        r["wall"] = float(np.median(w))
        kernels = sum(r["nodes"].values()) + r["rest_nodes"]
        total = sum(r["layers"].values()) + r["rest"]
        r["overhead"] = o = max(0.0, (total - r["wall"]) / kernels) if kernels else 0.0
        r["layers"] = {k: max(v - o * r["nodes"][k], 0.0) for k, v in r["layers"].items()}
        r["rest"] = max(r["rest"] - o * r["rest_nodes"], 0.0)
        out.append(r)
    return out


def _summarize(events, attribute: Attribution, warmup: int) -> dict:
    # the warm-up runs are profiled too: count only what starts after the last of them ends
    runs_ev = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                     key=lambda e: e["ts"])
    start = runs_ev[warmup - 1]["ts"] + runs_ev[warmup - 1]["dur"] if 0 < warmup <= len(runs_ev) else 0
    per_layer, nodes, rest, rest_nodes, n_runs = defaultdict(float), defaultdict(int), 0.0, 0, 0
    for e in events:
        if e.get("ts", 0) < start:
            continue
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            n_runs += 1
        elif e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            owner = attribute(e["name"][: -len("_kernel_time")])
            if owner is None:
                rest += e["dur"]
                rest_nodes += 1
            else:
                per_layer[owner] += e["dur"]
                nodes[owner] += 1
    n = max(n_runs, 1)
    return {"layers": {k: v / n / 1e3 for k, v in per_layer.items()}, "nodes": {k: v / n for k, v in nodes.items()},
            "rest": rest / n / 1e3, "rest_nodes": rest_nodes / n}  # per run; µs → ms
