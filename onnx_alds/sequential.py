"""Sequential calibration: each layer's factors are fitted to the inputs it
will really see, those of the already-compressed prefix, and to the outputs
of the original layer (asymmetric reconstruction, Zhang et al. 2015).

For layer ℓ with original input patches ``x`` and compressed-prefix patches
``x̃`` (same calibration sample), the rank-constrained ``Ŵ`` and bias ``δ``
minimising ``Σ ‖W x − Ŵ x̃ − δ‖²`` are, with centred moments
``C = E[(x−μ)(x̃−μ̃)ᵀ]`` and ``G̃ = E[(x̃−μ̃)(x̃−μ̃)ᵀ] = L̃ L̃ᵀ``: the best
rank-j approximation of the target ``T = W C G̃⁻¹`` in the ``L̃`` metric (SVD
of ``T L̃``, per channel group, as in :mod:`onnx_alds.factorize`), and
``δ = W μ − Ŵ μ̃``.  ``G̃`` gets a ridge of 1 % of its mean variance
(:data:`RIDGE`): deep in a network the compressed prefix's statistics are
ill-conditioned, and an unregularised ``G̃⁻¹`` amplifies noise (measured on
ResNet56 at keep 0.15: 74 % one-shot without, 88 % with).  The earlier layers' errors are thereby partly undone
instead of piling up.  The selection (ranks) is unchanged; the measured error
of each layer is its output error against the *original* layer,
``‖W X − Ŵ X̃ − δ‖_F / ‖W X‖_F`` on the calibration data.

The sweep (as GPTQ and llm-compressor's sequential pipeline do it): the
main graph is cut in front of every decomposed layer's node, in topological
order, into consecutive segments; a cut carries every activation made before
it and read after it (skip connections included).  The calibration batches
go through the original segments and through the compressed ones (the
segment that starts with an already-fitted layer has that layer emitted with
its factors), segment after segment, keeping only the current cut's
activations (in memory up to ``max_bytes``, then in memory-mapped files);
each layer is fitted from the moments at its cut.  The whole sweep costs
about one forward pass of the original and one of the compressed model over
the calibration data, and one small session per segment and side, instead of
two full passes per layer.  Where the graph cannot be cut cleanly (a weight
that is not an initializer, an activation that is not a tensor, a segment
onnxruntime refuses), it falls back to :func:`per_layer_factors`, which
re-emits the prefix and runs both whole models once per layer.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
from scipy.linalg import cho_solve, eigh, solve_triangular

from .calibration import CHUNK_BYTES, iter_batches, iter_patches, tap_for_layer
from .calibration.moments import add_outer, block_shift, single_chunk
from .error_model import regularised_cholesky, svd_factors, trace_form
from .factorize import GRAM_FACTORS, blas_threads_for
from .folding import to_conv_weights
from .graph import names_read_inside, subgraphs
from .io import Source, copy_model_fields, temp_dir
from .ops.base import Factors
from .progress import Progress

log = logging.getLogger(__name__)

MAX_BYTES = 512 << 20  # a cut's activations over all calibration batches kept in memory; past it, on disk


def _session(model, name, providers, threads):
    from .runtime import session
    from .shapes import serialized_with_outputs

    return session(serialized_with_outputs(model, [name]), providers, threads)


class _Sums:
    """Streamed moments of a layer's original patches ``x`` and compressed-prefix patches ``x̃``.

    A float32 activation's products are taken in float32 (BLAS ``sgemm``/``ssyrk``, twice as fast
    as float64: the sweep's products were half of a calibrated ResNet-50's refit) over blocks of a
    few thousand patches, summed in float64, after fixed shifts near the means (``block_shift`` of
    the first block): the centred moments do not depend on a shift, and the rounding is then
    relative to the data's spread, not its mean.  The refit's factors move by about 1e-6 relative,
    the rounding of the float32 activations themselves.  Other dtypes sum in float64."""

    def __init__(self, d: int):
        self.C, self.G = np.zeros((d, d)), np.zeros((d, d))
        self.s, self.st, self.n = np.zeros(d), np.zeros(d), 0
        self.c = self.ct = None  # the shifts of x and x̃ (zero for float64 patches)

    def add(self, x, xt, tap) -> None:
        single = x.dtype == np.float32 and xt.dtype == np.float32
        dtype, chunk = (np.float32, single_chunk(tap.d)) if single else (np.float64, CHUNK_BYTES)
        for p, pt in zip(iter_patches(x, tap, chunk, dtype), iter_patches(xt, tap, chunk, dtype)):
            if self.c is None:
                self.c, self.ct = (block_shift(p), block_shift(pt)) if single else (np.zeros(p.shape[1]),) * 2
            if single:  # the blocks are temporaries of iter_patches: shifted in place
                p -= self.c
                pt -= self.ct
            self.C += p.T @ pt
            self.G += pt.T @ pt  # numpy takes a.T @ a to BLAS syrk
            self.s += p.sum(0, dtype=np.float64)
            self.st += pt.sum(0, dtype=np.float64)
            self.n += len(p)

    def centred(self):
        """``(C, G̃, μ, μ̃)`` of the module docstring, made in place of the sums (they are d × d: a
        ResNet-50 layer's are 170 MB each), which are gone after this."""
        mu, mut = self.s / self.n, self.st / self.n  # of the shifted patches
        C, G = self.C, self.G
        self.C = self.G = None
        for m, left in ((C, mu), (G, mut)):
            m /= self.n
            add_outer(m, left, mut, -1.0)
        return C, G, mu + self.c.astype(np.float64), mut + self.ct.astype(np.float64)


def _moments(s_orig, s_comp, name, tap, data, batch_size):
    sums = _Sums(tap.d)
    so_out = [o.name for o in s_orig.get_outputs()].index(name)
    sc_out = [o.name for o in s_comp.get_outputs()].index(name)
    for feeds in iter_batches(data, batch_size):
        sums.add(s_orig.run(None, feeds)[so_out], s_comp.run(None, feeds)[sc_out], tap)
    return sums.centred()


RIDGE = 1e-2  # of the mean variance: the compressed prefix's statistics are ill-conditioned deep down


def _ridge(g: np.ndarray) -> np.ndarray:
    """The symmetric part of ``g`` with :data:`RIDGE` of its mean variance on the diagonal (one new
    array: a ResNet-50 layer's ``g`` is 170 MB)."""
    h = g + g.T
    h *= 0.5
    tr = float(np.trace(h))
    if tr > 0:
        h.reshape(-1)[:: len(h) + 1] += RIDGE * tr / len(h)
    return h


def _top_pair(m: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``(U_r √Σ_r, V_r √Σ_r)`` of the rank-``rank`` truncated SVD of ``m``: from the top eigenpairs
    of the smaller Gram matrix where ``m`` is large (a quarter of the time of the SVD of a 512×4608
    group; the product ``U_r Σ_r V_rᵀ`` is the same projection of ``m``, within rounding), else from
    the SVD."""
    f, dg = m.shape
    if f * dg < GRAM_FACTORS:
        with blas_threads_for(f * dg):  # a small SVD on one thread
            p, sv, qt = np.linalg.svd(m, full_matrices=False)
        root = np.sqrt(sv[:rank])
        return p[:, :rank] * root, qt[:rank].T * root
    wide = f <= dg
    g = m @ m.T if wide else m.T @ m  # numpy takes it to BLAS syrk
    n = len(g)
    ev, vec = eigh(g, subset_by_index=[n - rank, n - 1], overwrite_a=True, check_finite=False)
    ev, vec = ev[::-1], vec[:, ::-1]
    sv = np.sqrt(np.clip(ev, 0.0, None))
    inv_root = np.where(sv > 0, 1 / np.sqrt(np.where(sv > 0, sv, 1.0)), 0.0)
    root = np.sqrt(sv)
    other = (m.T @ vec if wide else m @ vec) * inv_root  # V √Σ = Mᵀ U / √Σ (or U √Σ = M V / √Σ)
    return (vec * root, other) if wide else (other, vec * root)


def fit(w4: np.ndarray, k: int, rank: int, C, Gt, mu, mut, correct_bias: bool, wc=None) -> Factors:
    """The layer's factors from its centred moments (module docstring); ``wc`` is ``W C`` where the
    caller has it."""
    f = w4.shape[0]
    w2 = np.asarray(w4, np.float64).reshape(f, -1)
    d = w2.shape[1]
    dg = d // k
    # d × d factorisations on every BLAS thread (they thread well; the sweep waits for them)
    Lfull = regularised_cholesky(_ridge(Gt), overwrite=True)  # _ridge's array is the work space
    # T = W C G̃⁻¹ via the Cholesky factor: G̃⁻¹ = L̃⁻ᵀ L̃⁻¹
    T = cho_solve((Lfull, True), (w2 @ C if wc is None else wc).T, check_finite=False).T
    a = np.empty((k, f, rank))
    b = np.empty((k, rank, dg))
    for i in range(k):
        sl = slice(i * dg, (i + 1) * dg)
        L = regularised_cholesky(_ridge(Gt[sl, sl]), overwrite=True) if k > 1 else Lfull  # k = 1: the same
        a[i], vr = _top_pair(T[:, sl] @ L, rank)
        b[i] = solve_triangular(L, vr, trans="T", lower=True, check_finite=False).T
    enc, dec = to_conv_weights(a, b, "s0", w4.shape)
    delta = None
    if correct_bias:
        approx = np.concatenate([a[i] @ b[i] for i in range(k)], axis=1)
        delta = w2 @ mu - approx @ mut
    return Factors(enc.astype(w4.dtype), dec.astype(w4.dtype), delta)


def _fit_and_measure(base: Source, l, cfg, emodel, C, Gt, mu, mut) -> tuple[Factors, float]:
    """Layer ``l``'s factors from its moments, and its output error against the original layer."""
    from .factorize import reconstruct

    w4 = base.weight4(l)
    correct = emodel.bias_correction and l.bias_constant
    wc = np.asarray(w4, np.float64).reshape(w4.shape[0], -1) @ C  # W C, for the fit and the error
    if cfg.scheme == "s0":
        fac = fit(w4, cfg.k, cfg.rank, C, Gt, mu, mut, correct, wc=wc)
    else:  # the fit is s0's: the other schemes keep the weight SVD's factors, with the bias δ = W μ − Ŵ μ̃
        fac = svd_factors(w4, cfg, mu if correct else None, mut)
    st = emodel.stats(base, l)  # the original inputs' covariance and output energy
    # on W/scale, as st.energy is (error_model.LayerStats): weights near 1e200 would overflow to inf here
    w2 = np.asarray(w4, np.float64).reshape(w4.shape[0], -1) / st.scale
    wh = reconstruct(fac, w4.shape).reshape(w4.shape[0], -1) / st.scale
    # ‖W X − Ŵ X̃‖² / n = tr(W Σ Wᵀ) − 2 tr(W C Ŵᵀ) + tr(Ŵ G̃ Ŵᵀ); the first is the output energy less its
    # mean's (LayerStats: energy = tr(W E[xxᵀ] Wᵀ)), the second reuses the fit's W C: one d × d
    # product a layer instead of three
    mean_out = w2 @ st.mean
    err = st.energy - float(mean_out @ mean_out) - 2 * float(np.sum(wc * wh)) / st.scale + trace_form(wh, Gt)
    if not correct:  # the mean shift stays in the error
        m = w2 @ mu - wh @ mut
        err += float(m @ m)
    return fac, float(np.sqrt(max(err, 0.0) / st.energy)) if st.energy > 0 else 0.0


def _chosen(info, choices):
    return sorted((l for l in info.candidates if choices.get(l.name) is not None), key=lambda l: l.node_index)


def per_layer_factors(original, info, choices: dict, data, emodel, *, provider: str = "auto",
                      threads: int | None = None, batch_size: int = 32, progress: bool = False):
    """The sweep's reference and fallback: for each layer, the prefix re-emitted
    and both whole models run over the calibration data (quadratic in depth)."""
    from .emit import emit
    from .runtime import providers_for

    providers = providers_for(provider)
    base = Source.load(original)
    factors, measured = {}, {}
    with Progress(len(_chosen(info, choices)), "sequential calibration", "layer", progress) as bar:
        for l in _chosen(info, choices):
            done = {n: choices[n] for n in factors}
            comp = emit(Source.load(original), info, done, factors) if factors else original
            C, Gt, mu, mut = _moments(_session(original, l.input_name, providers, threads),
                                      _session(comp, l.input_name, providers, threads), l.input_name,
                                      tap_for_layer(l), data, batch_size)
            factors[l.name], measured[l.name] = _fit_and_measure(base, l, choices[l.name], emodel, C, Gt, mu, mut)
            bar.update()
    return factors, measured


class Uncuttable(Exception):
    """The graph cannot be swept segment by segment (the reason says why)."""


def sequential_factors(original, info, choices: dict, data, emodel, *, provider: str = "auto",
                       threads: int | None = None, batch_size: int = 32, progress: bool = False,
                       max_bytes: int = MAX_BYTES):
    """Refit the chosen layers in graph order on the compressed prefix's inputs,
    in one sweep over the graph (module docstring); returns ``(factors,
    measured)`` (layer name → Factors / output error)."""
    from .runtime import providers_for

    layers = _chosen(info, choices)
    if not layers:
        return {}, {}
    base = Source.load(original)
    try:
        with temp_dir("onnx-alds-sweep-") as tmp:
            model, swept = constant_weights_as_initializers(original, layers)
            sweep = _Sweep(model, swept, providers_for(provider), threads, _Store(Path(tmp), max_bytes))
            return sweep.run(base, layers, choices, data, emodel, batch_size, progress)
    except Uncuttable as e:
        log.warning("sequential calibration runs once per layer (the graph cannot be swept: %s)", e)
        return per_layer_factors(original, info, choices, data, emodel, provider=provider, threads=threads,
                                 batch_size=batch_size, progress=progress)


def constant_weights_as_initializers(model: onnx.ModelProto, layers: list) -> tuple[onnx.ModelProto, list]:
    """``model`` with the Constant nodes that give a layer its weight (and its bias) turned into
    initializers, and the layers at their nodes' new positions (exporters such as paddle2onnx write
    weights as Constant nodes: the sweep cuts the graph between nodes, and a weight must go with its
    layer's segment; so must a bias that the bias correction adds to: left in an earlier segment it
    reached the emitted decoder as an unknown input, and PP-OCR's recogniser came out NaN).
    The model itself where there is none (no copy)."""
    weights = {l.weight_name for l in layers}
    for l in layers:  # and their constant biases, which a bias correction adds to (in the same segment)
        node = model.graph.node[l.node_index]
        if l.has_bias and len(node.input) > 2 and node.input[2]:
            weights.add(node.input[2])
    drop = {i for i, n in enumerate(model.graph.node)
            if n.op_type == "Constant" and len(n.output) == 1 and n.output[0] in weights
            and [a.name for a in n.attribute] == ["value"]}
    if not drop:
        return model, layers
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i in sorted(drop, reverse=True):
        node = out.graph.node[i]
        t = onnx.TensorProto()
        t.CopyFrom(node.attribute[0].t)
        t.name = node.output[0]
        out.graph.initializer.append(t)
        del out.graph.node[i]
    dropped_before = np.cumsum([i in drop for i in range(len(model.graph.node))])
    return out, [dataclasses.replace(l, node_index=l.node_index - int(dropped_before[l.node_index]))
                 for l in layers]


class _Store:
    """Where a cut's activations live: in memory while the cut's bytes stay
    under ``max_bytes``, past that in ``.npy`` files mapped read-only (the file
    is unlinked at once; its disk space goes when the array does)."""

    def __init__(self, tmp: Path, max_bytes: int):
        self.tmp, self.max_bytes, self.used, self.files, self.spilled = tmp, max_bytes, 0, 0, 0

    def new_cut(self) -> None:
        self.used = 0

    def keep(self, a):
        if not isinstance(a, np.ndarray):
            raise Uncuttable(f"an activation at a cut is a {type(a).__name__}, not a tensor")
        if self.used + a.nbytes <= self.max_bytes:
            self.used += a.nbytes
            return a
        path = self.tmp / f"{self.files}.npy"
        self.files += 1
        self.spilled += a.nbytes
        out = np.lib.format.open_memmap(path, mode="w+", dtype=a.dtype, shape=a.shape)
        out[...] = a
        out.flush()
        del out
        mapped = np.load(path, mmap_mode="r")
        path.unlink()
        return mapped


def _input_specs(states: list[dict]) -> dict[str, tuple[int, list]]:
    """Each tensor of a cut as a segment declares it: its element type, and its shape with the sizes every
    batch shares (a smaller last batch leaves the batch axis open)."""
    specs = {}
    for n, a in states[0].items():
        if isinstance(a, np.ndarray):
            dims = [d if all(st[n].shape[j] == d for st in states[1:]) else None for j, d in enumerate(a.shape)]
            specs[n] = (onnx.helper.np_dtype_to_tensor_dtype(a.dtype), dims)
    return specs


def _reads(node: onnx.NodeProto) -> list[str]:
    extra = names_read_inside([node]) if any(subgraphs(node)) else ()
    return [n for n in list(node.input) + sorted(extra) if n]


class _Sweep:
    """The original model cut in front of every layer's node (module docstring)."""

    def __init__(self, model: onnx.ModelProto, layers, providers, threads, store: _Store):
        self.model, self.layers, self.providers, self.threads, self.store = model, layers, providers, threads, store
        g = model.graph
        self.nodes = list(g.node)
        self.inits = {t.name: t for t in g.initializer}
        positions = [l.node_index for l in layers]
        if any(p < 0 or p >= len(self.nodes) for p in positions) or len(set(positions)) != len(positions):
            raise Uncuttable("a layer is not a node of the main graph")
        for l in layers:
            if self.nodes[l.node_index].name != l.name and self.nodes[l.node_index].name:
                raise Uncuttable(f"layer {l.name!r} is not where extraction found it")
            if l.weight_name not in self.inits:
                raise Uncuttable(f"the weight of layer {l.name!r} is not an initializer")
        last_use: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            for n in _reads(node):
                last_use[n] = i
        alive = {i.name for i in g.input if i.name not in self.inits and i.name in last_use}
        self.inputs = sorted(alive)
        self.bounds, self.cuts = [0] + positions, []
        for i, p in enumerate(positions):
            for node in self.nodes[self.bounds[i]:p]:
                alive.update(o for o in node.output if o and last_use.get(o, -1) >= p)
            alive = {t for t in alive if last_use.get(t, -1) >= p}
            if layers[i].input_name not in alive:
                raise Uncuttable(f"the input of layer {layers[i].name!r} is not an activation at its cut")
            self.cuts.append(sorted(alive))

    def segment(self, i: int, specs: dict[str, tuple[int, list]]) -> onnx.ModelProto:
        """Nodes ``bounds[i] .. bounds[i+1]-1`` as a model: the previous cut in (each with its element type
        and shape, ``specs``: :func:`_input_specs`), the new cut's tensors made here out.  Shapes are
        declared: onnxruntime's shape inference takes an input of unknown shape that feeds a shape
        computation (a ViT's position embeddings resized to the image: Shape → Gather/Slice → Concat →
        Resize ``sizes``) for an empty tensor and refuses the segment."""
        m = onnx.ModelProto()
        copy_model_fields(self.model, m)
        m.functions.extend(self.model.functions)
        nodes = self.nodes[self.bounds[i]:self.bounds[i + 1]]
        g = m.graph
        g.node.extend(nodes)
        read = {n for node in nodes for n in _reads(node)}
        g.initializer.extend(self.inits[n] for n in sorted(read) if n in self.inits)
        made = {o for node in nodes for o in node.output}
        before = self.cuts[i - 1] if i else self.inputs
        g.input.extend(onnx.helper.make_tensor_value_info(n, *specs[n]) for n in before if n in read)
        g.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in self.cuts[i] if n in made)
        return m

    def _run(self, model, states: list[dict]) -> list[dict]:
        """Every batch's cut after the segment ``model``: what it makes, plus what passes by."""
        from .runtime import session

        i = len(self._done)
        cut = self.cuts[i]
        if not len(model.graph.node) or not len(model.graph.output):  # nothing it makes is read later
            return [{n: st[n] for n in cut} for st in states]
        try:
            sess = session(model.SerializeToString(), self.providers, self.threads)
            outs = [o.name for o in model.graph.output]
            inits = {t.name for t in model.graph.initializer}
            ins = [v.name for v in model.graph.input if v.name not in inits]
            new = []
            for st in states:
                got = dict(zip(outs, sess.run(outs, {n: st[n] for n in ins})))
                new.append({n: self.store.keep(got[n]) if n in got else st[n] for n in cut})
            return new
        except Uncuttable:
            raise
        except Exception as e:  # onnxruntime refuses a segment: the caller falls back to whole models
            raise Uncuttable(f"segment {i + 1} of {len(self.cuts)} does not run alone ({e})".splitlines()[0]) \
                from e

    def _compressed(self, seg: onnx.ModelProto, i: int, choices, factors) -> onnx.ModelProto:
        """Segment ``i`` with the layer at its start (the previous one) emitted with its factors."""
        from .emit import emit

        if i == 0:
            return seg
        prev = dataclasses.replace(self.layers[i - 1], node_index=0)
        return emit(Source.load(seg), SimpleNamespace(candidates=[prev]), {prev.name: choices[prev.name]},
                    {prev.name: factors[prev.name]})

    def run(self, base: Source, layers, choices, data, emodel, batch_size: int, progress: bool):
        """The sweep; ``layers`` are the swept layers as ``base`` (the input model) has them, read for
        their weights and moments."""
        orig = [{n: feeds[n] for n in self.inputs} for feeds in iter_batches(data, batch_size)]
        comp = orig
        specs = {}
        factors, measured, self._done = {}, {}, []
        with Progress(len(self.layers), "sequential calibration", "layer", progress) as bar:
            for i, l in enumerate(self.layers):
                specs.update(_input_specs(orig))
                seg = self.segment(i, specs)
                self.store.new_cut()
                orig, comp = self._run(seg, orig), (self._run(self._compressed(seg, i, choices, factors), comp)
                                                    if i else None)
                comp = comp if i else orig  # nothing is compressed before the first layer
                tap = tap_for_layer(l)
                sums = _Sums(tap.d)
                for o, c in zip(orig, comp):
                    sums.add(o[l.input_name], c[l.input_name], tap)
                fac, err = _fit_and_measure(base, layers[i], choices[l.name], emodel, *sums.centred())
                factors[l.name], measured[l.name] = fac, err
                self._done.append(l.name)
                bar.update()
        if self.store.spilled:
            log.info("sequential calibration kept %.1f MiB of activations on disk", self.store.spilled / 2**20)
        return factors, measured
