"""Second moments of each layer's input patches on calibration data.

With the patches ``x`` of a layer (the columns of X, see ``patches``), the
data-aware error of DESIGN.md ("The math" 6) needs only

    G = Σ_patches x xᵀ  (d × d),   since   ‖(W − Ŵ) X‖_F² = tr(E G Eᵀ),  E = Wm − Ŵm,

and ``Σ x`` for the mean output shift (bias correction).

The capture adds every tap's input tensor as a graph output, runs
onnxruntime batch by batch and adds each batch's patches to G in float64, so
memory does not grow with the number of samples.  When the captured
activations of one batch would exceed ``max_bytes``, the taps are split into
groups, one pass over the data (and one session) per group.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, replace
from math import prod
from pathlib import Path

import numpy as np
import onnx

from ..errors import UsageError
from ..io import EXTERNAL_DATA_THRESHOLD, proto_size, save_model, temp_dir
from ..measure.inputs import fixed_batch
from ..runtime import providers_for, session, used_provider
from .data import CalibrationStream, InputSpec, _samples, iter_batches, load_calibration, model_inputs
from .patches import Tap, iter_patches

log = logging.getLogger(__name__)


def tap_for_layer(layer) -> Tap | None:
    """The tap of an extracted layer, as its operator spec gives it
    (``OpSpec.calibration_tap``); None where data-aware errors do not apply."""
    return layer.spec.calibration_tap(layer)


def taps_for(layers) -> list[Tap]:
    """Taps of the layers whose specs give one."""
    return [t for t in map(tap_for_layer, layers) if t is not None]


def block_shift(p: np.ndarray) -> np.ndarray:
    """A float32 shift near the column means of a float32 block (from a sample of its rows): products
    of the shifted block round relative to the data's spread, not to its mean."""
    return p[:: max(1, len(p) // 64)].mean(axis=0, dtype=np.float64).astype(np.float32)


def add_outer(m: np.ndarray, a: np.ndarray, b: np.ndarray, sign: float = 1.0) -> None:
    """``m += sign · a bᵀ`` in place, a block of 256 rows at a time (no d × d temporary: a
    ResNet-50 layer's moments are 170 MB)."""
    for i in range(0, len(m), 256):
        if sign > 0:
            m[i:i + 256] += np.outer(a[i:i + 256], b)
        else:
            m[i:i + 256] -= np.outer(a[i:i + 256], b)


@dataclass
class Moments:
    """``Σ x xᵀ``, ``Σ x`` and the count of a stream of patches ``x``, in float64.

    Float32 patches are multiplied in float32 (BLAS ``ssyrk``: half the time of float64, most of a
    calibrated ResNet-50's capture) in blocks of a few thousand rows (:func:`accumulate`), after a
    fixed shift ``c`` near their mean (:func:`block_shift`, from the first block): ``raw`` then holds
    ``Σ (x−c)(x−c)ᵀ`` and the rounding is relative to the data's spread, not its mean (an activation
    of mean 1,000 and spread 0.01 keeps its covariance; unshifted float32 sums lose it entirely).
    :attr:`gram` puts the shift back once, in float64, when it is read."""

    raw: np.ndarray  # (d, d) float64: Σ x xᵀ, or Σ (x−shift)(x−shift)ᵀ while ``shift`` is set
    sum: np.ndarray  # (d,) float64: Σ x
    count: int  # number of patches (rows)
    shift: np.ndarray | None = None  # (d,) float32 shift of the float32 patches in ``raw``
    shifted_sum: np.ndarray | None = None  # (d,) float64: Σ (x − shift)

    @classmethod
    def zeros(cls, d: int) -> Moments:
        return cls(np.zeros((d, d)), np.zeros(d), 0)

    @property
    def gram(self) -> np.ndarray:
        """``Σ x xᵀ`` (the shift put back: ``+ s cᵀ + c (s + n c)ᵀ``, ``s = Σ (x − c)``)."""
        if self.shift is not None:
            c = self.shift.astype(np.float64)
            s = self.shifted_sum
            add_outer(self.raw, s, c)
            add_outer(self.raw, c, s + self.count * c)
            self.shift = self.shifted_sum = None
        return self.raw

    @property
    def d(self) -> int:
        return len(self.sum)

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1)

    def covariance(self, centered: bool = True) -> np.ndarray:
        """``gram/count − mean meanᵀ`` (or ``gram/count`` when not centered), a new array.  Centred,
        it is taken from the shifted sums as they are (a covariance does not depend on a shift), in
        blocks of rows: no d × d temporary, and exactly symmetric where the sums are."""
        n = max(self.count, 1)
        if not centered:
            return self.gram / n
        cov = self.raw / n
        m = (self.shifted_sum if self.shift is not None else self.sum) / n
        add_outer(cov, m, m, -1.0)
        return cov

    def add(self, patches: np.ndarray, overwrite: bool = False) -> None:
        """Add the rows of ``patches`` (rows × d) in place (float32 ones as the class docstring says;
        ``overwrite``: they may be shifted in place)."""
        x = np.asarray(patches)
        if x.dtype == np.float32 and (self.shift is not None or self.count == 0):
            if self.shift is None:
                self.shift, self.shifted_sum = block_shift(x), np.zeros(self.d)
            xs = np.subtract(x, self.shift, out=x if overwrite and x.flags.writeable else None)
            self.raw += xs.T @ xs  # ssyrk, added into float64 without a float64 copy
            s = xs.sum(axis=0, dtype=np.float64)
            self.shifted_sum += s
            self.sum += s + len(x) * self.shift.astype(np.float64)
        else:
            x = np.asarray(x, np.float64)
            gram = self.gram  # the shift put back first, if any
            gram += x.T @ x  # numpy takes x.T @ x to BLAS syrk
            self.sum += x.sum(axis=0)
        self.count += len(x)

    def merge(self, other: Moments) -> Moments:
        if other.d != self.d:
            raise ValueError(f"cannot merge moments of patch length {self.d} and {other.d}")
        return Moments(self.gram + other.gram, self.sum + other.sum, self.count + other.count)


SINGLE_CHUNK = 16 << 20  # bytes of float32 patches a product sums in float32 (a few thousand rows) ...
SINGLE_ROWS = 4096  # ... and at least this many rows, so that adding the d × d product stays a small part


def single_chunk(d: int) -> int:
    """Bytes of one block of float32 patches of length ``d`` (:data:`SINGLE_CHUNK`, :data:`SINGLE_ROWS`)."""
    return max(SINGLE_CHUNK, SINGLE_ROWS * 4 * max(d, 1))


def accumulate(moments: Moments | None, x: np.ndarray, tap: Tap) -> Moments:
    """``moments`` (new ones when None) plus the patches of activation ``x``.  A float32 activation's
    patches are multiplied in float32 (BLAS ``ssyrk``: half the time of float64, the most of a
    calibrated ResNet-50's capture) over blocks of :func:`single_chunk` bytes, and the
    blocks summed in float64: each entry of the second moment within about 1e-6 of the float64 one,
    relative to its row's and column's energy."""
    single = x.dtype == np.float32
    blocks = iter_patches(x, tap, single_chunk(tap.d), np.float32) if single else iter_patches(x, tap)
    for block in blocks:
        if moments is None:
            moments = Moments.zeros(block.shape[1])
        moments.add(block, overwrite=True)  # the block is a temporary of iter_patches
    if moments is not None and not np.isfinite(moments.sum).all():
        raise UsageError(f"the input of layer {tap.name!r} contains NaN or Inf on the calibration data")
    return moments


def _check_taps(model: onnx.ModelProto, taps: list[Tap]) -> None:
    names = [t.name for t in taps]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"two taps are named {dup!r}")
    g = model.graph
    produced = {o for n in g.node for o in n.output} | {i.name for i in g.input}
    inits = {t.name for t in g.initializer}
    for t in taps:
        if t.kind not in ("conv", "convtranspose", "linear"):
            raise ValueError(f"tap {t.name!r} has kind {t.kind!r} (conv, convtranspose or linear)")
        if t.kind == "convtranspose" and t.spatial_rank not in (2, 3):
            raise ValueError(f"tap {t.name!r} is a ConvTranspose of spatial rank {t.spatial_rank} (2 or 3)")
        if t.kind == "conv" and t.spatial_rank not in (1, 2, 3):
            raise ValueError(f"tap {t.name!r} is a conv of spatial rank {t.spatial_rank} (1, 2 or 3)")
        if t.input in inits or t.input not in produced:
            raise ValueError(f"tap {t.name!r}: {t.input!r} is not an activation of the main graph")


def _shape_model(model: onnx.ModelProto, input_shapes: dict[str, list]) -> onnx.ModelProto:
    """A copy for shape inference: inputs fixed to ``input_shapes``, large
    initializers as typed inputs (no weight is copied)."""
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    g, src = m.graph, model.graph
    g.node.extend(src.node)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    for inp in src.input:
        vi = g.input.add()
        vi.CopyFrom(inp)
        if inp.name in input_shapes:
            shape = vi.type.tensor_type.shape
            shape.ClearField("dim")
            for d in input_shapes[inp.name]:
                shape.dim.add().dim_value = int(d)
    inputs = {i.name for i in src.input}
    for t in src.initializer:
        if prod(t.dims) <= 4096 and t.data_location != onnx.TensorProto.EXTERNAL:
            g.initializer.append(t)
        elif t.name not in inputs:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return m


def _tensor_info(model: onnx.ModelProto, names: list[str], input_shapes: dict[str, list]):
    """name → (elem_type or 0, bytes at ``input_shapes`` or None) by onnx shape inference."""
    try:
        m = onnx.shape_inference.infer_shapes(_shape_model(model, input_shapes), data_prop=True)
    except Exception as e:  # best effort: unknown sizes are measured on one sample instead
        log.info("shape inference failed (%s); activation sizes are measured", e)
        m = model
    vis = {vi.name: vi for vi in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input)}
    out = {}
    for n in names:
        t = vis[n].type.tensor_type if n in vis else None
        elem = t.elem_type if t is not None else 0
        size = None
        if t is not None and elem and t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)).itemsize
            size = itemsize * prod(d.dim_value for d in t.shape.dim)
        out[n] = (elem, size)
    return out


@dataclass
class Pass:
    """One run over the calibration data: the tensors it captures, at a batch size."""

    tensors: list[str]
    batch_size: int
    bytes: int  # estimated bytes of the captured activations of one batch


def plan_passes(sizes: dict[str, int], batch_size: int, max_bytes: int, *,
                fixed_batch: bool = False) -> list[Pass]:
    """Group tensors (name → bytes of one batch of ``batch_size``) into passes
    of at most ``max_bytes`` each, in order.  A tensor larger than the budget
    on its own gets a pass at a smaller batch (unless the batch is fixed)."""
    passes: list[Pass] = []
    current = Pass([], batch_size, 0)
    for name, size in sizes.items():
        if size > max_bytes:
            b = batch_size if fixed_batch else max(1, batch_size * max_bytes // size)
            if size * b // batch_size > max_bytes:
                log.warning("activation %r takes %.1f MiB at batch %d, over max_bytes=%d", name,
                            size * b / batch_size / 2**20, b, max_bytes)
            passes.append(Pass([name], b, size * b // batch_size))
            continue
        if current.tensors and current.bytes + size > max_bytes:
            passes.append(current)
            current = Pass([], batch_size, 0)
        current.tensors.append(name)
        current.bytes += size
    if current.tensors:
        passes.append(current)
    return passes


class _Capture:
    """Sessions on the model with chosen tensors as extra outputs.  Models over
    the protobuf limit go to a temporary directory once, with external data;
    each pass then writes only a small graph file beside that data."""

    def __init__(self, model: onnx.ModelProto, providers, threads, elem_types: dict[str, int], tmp: Path):
        self.providers, self.threads, self.elem_types = providers, threads, elem_types
        self.large = proto_size(model) > EXTERNAL_DATA_THRESHOLD
        if self.large:
            self.path = tmp / "model.onnx"
            save_model(model, self.path, external_data=True)
            self.base = onnx.load(str(self.path), load_external_data=False)
        else:
            self.base = onnx.ModelProto()
            self.base.CopyFrom(model)
        self.n_outputs = len(self.base.graph.output)
        self.existing = {o.name for o in self.base.graph.output}

    def session(self, tensors: list[str]):
        g = self.base.graph
        del g.output[self.n_outputs :]
        for name in tensors:
            if name in self.existing:
                continue
            vi = g.output.add()
            vi.name = name
            if self.elem_types.get(name):  # onnxruntime takes an output without a type as well
                vi.type.tensor_type.elem_type = self.elem_types[name]
        if self.large:
            onnx.save_model(self.base, str(self.path))  # the graph only; the weights stay in model.onnx.data
            return session(str(self.path), self.providers, self.threads, low_memory=True)
        return session(self.base, self.providers, self.threads)


BATCH_BYTES = 256 << 20  # captured activations of one batch, when a smaller batch can bring them under it


def _smaller_batch(sizes: dict[str, int], batch_size: int, fixed: int | None) -> tuple[int, dict[str, int]]:
    """A batch small enough (down to one sample) that one batch's captured activations stay under
    :data:`BATCH_BYTES`: the same passes over the data at a fraction of the memory (a ResNet-50's
    every conv input at batch 16 is 1.6 GB, and onnxruntime's arena holds as much again); ``max_bytes`` splits the taps into passes only past
    that.  A fixed batch stays."""
    total = sum(sizes.values())
    if fixed is not None or total <= BATCH_BYTES or batch_size <= 1:
        return batch_size, sizes
    b = max(1, batch_size * BATCH_BYTES // total)
    return b, {n: s * b // batch_size for n, s in sizes.items()}


def _distinct(taps: list[Tap]) -> tuple[list[Tap], dict[str, str]]:
    """The taps that unfold distinct tensors or unfold them differently, and each tap's name → the
    name of the distinct tap it shares one accumulation with (a transformer's Q, K and V; a block's
    1×1 conv and its shortcut: the same moments, made once)."""
    unique: dict[Tap, Tap] = {}
    for t in taps:
        unique.setdefault(replace(t, name=""), t)
    return list(unique.values()), {t.name: unique[replace(t, name="")].name for t in taps}


def _fixed_batch(inputs: InputSpec) -> int | None:
    return fixed_batch(dims[0] for _, dims in inputs.values() if dims)


def _passes(sizes: dict[str, int], batch_size: int, max_bytes: int, fixed: int | None, calibration) -> list[Pass]:
    """``plan_passes`` for a capture: at least one pass (taps on graph inputs
    only need one), every pass at the model's fixed batch where it has one, and
    a single pass where the feeds can be read only once."""
    passes = plan_passes(sizes, batch_size, max_bytes, fixed_batch=fixed is not None) or [Pass([], batch_size, 0)]
    if fixed is not None:
        for p in passes:
            p.batch_size = fixed
    if len(passes) > 1 and isinstance(calibration, CalibrationStream) and not calibration.reiterable:
        raise UsageError(f"the taps need {len(passes)} passes over the calibration data within max_bytes="
                         f"{max_bytes}, but its feeds come from an iterator that can be read only once")
    return passes


def _run_pass(sess, p: Pass, taps: list[Tap], calibration, fixed: int | None, result: dict, bar) -> int:
    """One pass over the data: each batch's captured activations (and feeds)
    added to ``result[tap.name]``; returns the number of samples seen."""
    seen = 0
    for feed in iter_batches(calibration, p.batch_size):
        n = _samples(feed)
        if fixed is not None and n < fixed:
            log.warning("the last %d calibration samples are left out: the model's batch size is fixed at %d",
                        n, fixed)
            break
        acts = dict(zip(p.tensors, sess.run(p.tensors, feed))) if sess is not None else {}
        acts.update(feed)
        for t in taps:
            result[t.name] = accumulate(result[t.name], acts[t.input], t)
        del acts
        seen += n
        bar.update(n)
    return seen


def collect_moments(model, taps: list[Tap], calibration, *, batch_size: int = 16, provider: str = "auto",
                    threads: int | None = None, max_bytes: int = 2 << 30,
                    progress: bool = False) -> dict[str, Moments]:
    """Moments of every tap's patches over all calibration samples.

    ``model`` is a ModelProto or a path; ``calibration`` anything
    ``load_calibration`` takes.  The activations captured in one batch stay
    under ``max_bytes`` (as estimated by shape inference, or measured on one
    sample where it cannot tell): taps are split into several passes over the
    data when they do not fit together, and a single activation over the budget
    is captured at a smaller batch.  ``threads`` bounds onnxruntime's and BLAS's
    threads."""
    from threadpoolctl import threadpool_limits

    from ..progress import Progress

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model))
    _check_taps(model, taps)
    if not taps:
        return {}
    every, (taps, alias) = taps, _distinct(taps)
    inputs = model_inputs(model)
    calibration = load_calibration(calibration, inputs)
    fixed = _fixed_batch(inputs)
    if fixed is not None and fixed != batch_size:
        log.info("the model's batch size is fixed at %d; calibrating in batches of %d", fixed, fixed)
        batch_size = fixed
    first = calibration.first() if isinstance(calibration, CalibrationStream) else calibration
    one = {k: v[: fixed or 1] for k, v in first.items()}  # one batch-1 feed, for shapes and measurements
    if _samples(one) < (fixed or 1):
        raise UsageError(f"the model's batch size is fixed at {fixed}, but the first calibration feed holds "
                         f"only {_samples(one)} samples")

    graph_inputs = set(inputs)
    captured = list(dict.fromkeys(t.input for t in taps if t.input not in graph_inputs))
    info = _tensor_info(model, captured, {k: [batch_size, *v.shape[1:]] for k, v in first.items()})
    elem_types = {n: e for n, (e, _) in info.items()}
    sizes = {n: s for n, (_, s) in info.items()}
    providers = providers_for(provider)
    result: dict[str, Moments | None] = {t.name: None for t in taps}
    limits = threadpool_limits(threads) if threads else contextlib.nullcontext()
    with temp_dir("onnx-alds-calib-") as tmp, limits:
        capture = _Capture(model, providers, threads, elem_types, Path(tmp)) if captured else None
        unknown = [n for n in captured if sizes[n] is None]
        if unknown:  # shape inference could not tell: measure on one sample, scale to the batch
            for n, a in zip(unknown, capture.session(unknown).run(unknown, one)):
                sizes[n] = a.nbytes * batch_size // _samples(one)
                elem_types[n] = elem_types[n] or onnx.helper.np_dtype_to_tensor_dtype(a.dtype)
        batch_size, sizes = _smaller_batch(sizes, batch_size, fixed)
        passes = _passes(sizes, batch_size, max_bytes, fixed, calibration)
        input_taps = [t for t in taps if t.input in graph_inputs]
        log.info("capturing %d taps (%d distinct, %d activations) in %d pass(es) of at most %.1f MiB, batches of "
                 "%d", len(every), len(taps), len(captured), len(passes), max(p.bytes for p in passes) / 2**20,
                 batch_size)
        total = calibration.samples if isinstance(calibration, CalibrationStream) else _samples(calibration)
        with Progress(total * len(passes) if total else None, "calibration", "sample", progress) as bar:
            for i, p in enumerate(passes):
                wanted = set(p.tensors)
                pass_taps = [t for t in taps if t.input in wanted] + (input_taps if i == 0 else [])
                log.debug("pass %d of %d: %d activations (%.1f MiB) at batch %d", i + 1, len(passes),
                          len(p.tensors), p.bytes / 2**20, p.batch_size)
                sess = capture.session(p.tensors) if p.tensors else None
                if sess is not None and i == 0:
                    log.info("calibration runs on %s", used_provider(sess))
                seen = _run_pass(sess, p, pass_taps, calibration, fixed, result, bar)
                del sess
                if i == 0 and total is None:
                    bar.set_total(seen * len(passes))
    empty = [name for name, m in result.items() if m is None]
    if empty:
        raise UsageError(f"the model's batch size is fixed at {fixed}, but the calibration data holds fewer "
                         "samples than that")
    return {t.name: result[alias[t.name]] for t in every}
