"""How much of a layer's error reaches the model's outputs: one weight per layer for the selector.

ALDS minimises the largest *per-layer* relative error, which treats every layer alike.  In a
transformer they are not alike: on all-MiniLM-L6-v2 a query or key projection truncated to a quarter
of its rank moves the sentence embedding's cosine by 0.0005-0.001, a feed-forward layer at the same
layer error by 0.02, the last block's value and output projections by 0.03-0.07.  So with
``sensitivity`` (``--sensitivity``) each layer ℓ is probed once: its weight is replaced, in one
onnxruntime session where the candidates' weights are overridable inputs, by the data-aware
rank-``r/4`` reconstruction, its output shifted by the bias correction those factors carry (an
overridable addend after the layer), and the model is run on a few calibration samples (of the
fitted split, never the held-out one that judges the result).  Its weight is

    w_ℓ = (worst output relative L2 of the probe) / (the layer's own relative output error),

the output error per unit of layer error; the selector then minimises the largest ``w_ℓ·ε_ℓ(j)``,
the largest output error any one layer is predicted to cause (:class:`WeightedError`).  The weights
are divided by their geometric mean (a plan's scale of errors stays that of the layer errors);
a weight given by a Constant node is taken as an initializer (as the sequential sweep takes it);
layers that cannot be probed (a weight computed at run time, or shared) keep weight 1.

Cost: one run of the model on ``samples`` inputs per layer (MiniLM: 36 runs of 32 sentences).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from .compare import rel_l2
from .cost import full_rank
from .factorize import reconstruct
from .progress import progress_iter
from .runtime import providers_for, session
from .select import Config

log = logging.getLogger(__name__)

PROBE_SAMPLES = 32  # calibration samples each probe runs on
PROBE_RANK = 4  # the probe keeps full rank // PROBE_RANK


def probe_config(layer) -> Config:
    """The configuration a layer's probe factorizes with: k = 1, s0, a quarter of the full rank (its
    error is not known beforehand: NaN)."""
    return Config(1, "s0", max(1, full_rank(layer.geometry, 1, "s0") // PROBE_RANK), float("nan"))


def _probe_model(model: onnx.ModelProto, probed: dict, layers) -> tuple[bytes, dict[str, str]]:
    """The model's bytes with each probed layer's weight initializer (``probed``: layer name → its
    name) also listed as a graph input, so that a run can override it, and an overridable addend on
    the layer's output, zero unless given: the bias correction the layer's factors carry goes there,
    broadcast along the output channels (``OpSpec.channel_addend_shape``).  Returns the bytes and
    layer name → its addend's input name.  The model itself is left as it was."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    g = probe.graph
    inits = {t.name: t for t in g.initializer}
    addends: dict[str, str] = {}
    at = {l.node_index: l for l in layers if l.name in probed}
    nodes = []
    for i, node in enumerate(g.node):
        nodes.append(node)
        l = at.get(i)
        if l is None:
            continue
        out, name = node.output[0], f"{l.name}/alds_probe_addend"
        elem = inits[probed[l.name]].data_type
        shape = l.spec.channel_addend_shape(l)
        zeros = np.zeros(shape, onnx.helper.tensor_dtype_to_np_dtype(elem))
        g.initializer.append(onnx.numpy_helper.from_array(zeros, name))
        node.output[0] = f"{out}/alds_probe_raw"
        nodes.append(onnx.helper.make_node("Add", [node.output[0], name], [out], name=f"{l.name}/alds_probe_add"))
        addends[l.name] = name
    del g.node[:]
    g.node.extend(nodes)
    listed, overridable = {i.name for i in g.input}, set(probed.values()) | set(addends.values())
    for t in g.initializer:
        if t.name in overridable and t.name not in listed:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    if probe.ir_version < 4:
        probe.ir_version = 4
    return probe.SerializeToString(), addends


def _probed_layers(model: onnx.ModelProto, layers) -> dict:
    """Layer name → its weight initializer's name, for the layers whose weight is an initializer that
    no other node reads (the others cannot be perturbed alone)."""
    inits = {t.name for t in model.graph.initializer}
    readers: dict[str, int] = {}
    for n in model.graph.node:
        for i in set(n.input):
            readers[i] = readers.get(i, 0) + 1
    return {l.name: l.weight_name for l in layers
            if l.weight_name in inits and readers.get(l.weight_name, 0) == 1}


def layer_sensitivity(model: onnx.ModelProto, source, layers, emodel, feeds: dict, *, provider: str = "auto",
                      progress: bool = False, samples: int = PROBE_SAMPLES) -> dict[str, float]:
    """``w_ℓ`` for every layer of ``layers`` (see the module's docstring), from ``feeds`` (name → array,
    samples first; the first ``samples`` are used) and the data-aware ``emodel``."""
    from .sequential import constant_weights_as_initializers

    feeds = {k: np.ascontiguousarray(v[:samples]) for k, v in feeds.items()}
    model, at = constant_weights_as_initializers(model, layers)  # paddle2onnx's Constant-node weights too
    probed = _probed_layers(model, layers)
    if not probed:
        return {l.name: 1.0 for l in layers}
    probe_bytes, addends = _probe_model(model, probed, at)
    sess = session(probe_bytes, providers_for(provider), threads=None)
    base = sess.run(None, feeds)
    raw: dict[str, float] = {}
    for l in progress_iter([l for l in layers if l.name in probed], desc="sensitivity", unit="layer",
                           enabled=progress):
        cfg = probe_config(l)
        fac = emodel.factors(source, l, cfg)  # with the bias correction the emitted layer will carry
        layer_error = emodel.measure(source, l, cfg, fac)
        stored = np.asarray(source.stored_weight(l))
        shape4 = l.spec.weight4(stored, l.attrs).shape  # the weight read once
        perturbed = l.spec.stored_weight(reconstruct(fac, shape4), stored, l.attrs)
        override = {probed[l.name]: perturbed.astype(stored.dtype, copy=False)}
        if fac.bias_delta is not None and l.name in addends:
            override[addends[l.name]] = np.asarray(fac.bias_delta).reshape(l.spec.channel_addend_shape(l)).astype(
                stored.dtype)
        out = sess.run(None, {**feeds, **override})
        out_error = max(rel_l2(a, b) for a, b in zip(base, out) if np.asarray(a).dtype.kind == "f")
        if layer_error > 0 and np.isfinite(out_error) and out_error > 0:
            raw[l.name] = out_error / layer_error
    if not raw:
        return {l.name: 1.0 for l in layers}
    mean = float(np.exp(np.mean(np.log(list(raw.values())))))
    return {l.name: raw[l.name] / mean if l.name in raw else 1.0 for l in layers}


class WeightedError:
    """An error model whose curves, predictions and measurements are the wrapped one's times each
    layer's output sensitivity ``w_ℓ``: the selector's max is then the largest output error any one
    layer is predicted to cause.  Everything else is the wrapped model's."""

    def __init__(self, base, weights: dict[str, float]):
        self.base = base
        self.weights = dict(weights)

    def __getattr__(self, name):
        return getattr(self.base, name)

    def weight(self, name: str) -> float:
        return self.weights.get(name, 1.0)

    def weigh(self, errors: dict) -> dict:
        """Layer name → error, each times its layer's weight (the sequential refit's measurements)."""
        return {n: None if e is None else e * self.weight(n) for n, e in errors.items()}

    def curves(self, source, layers, configs, *, progress: bool = False):
        got = self.base.curves(source, layers, configs, progress=progress)
        return {n: {cfg: np.asarray(c) * self.weight(n) for cfg, c in curves.items()} for n, curves in got.items()}

    def measure(self, source, layer, cfg, factors) -> float:
        return self.base.measure(source, layer, cfg, factors) * self.weight(layer.name)

    def known_error(self, layer, cfg):
        known = self.base.known_error(layer, cfg)
        return None if known is None else known * self.weight(layer.name)
