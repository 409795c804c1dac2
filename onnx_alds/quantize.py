"""Static int8 quantization of a (rewritten) model with onnxruntime.

The rewrite and int8 compose: a factorized layer is two smaller convs or
matmuls, each of which onnxruntime quantizes like any other.  The output is
QDQ (``QuantizeLinear``/``DequantizeLinear`` pairs around every quantized
op), with per-channel weight scales by default:

    x_q = clamp(round(x / s_x) + z_x),   W_q[o] = round(W[o] / s_W[o])
    y ≈ s_x · s_W[o] · Σ (x_q − z_x) · W_q[o]

Activation ranges ``s_x, z_x`` come from min/max calibration over the given
samples (or seeded random inputs when none are given: fine for timing, not for
accuracy).  Activations default to uint8 and weights to int8 (U8S8):
onnxruntime's CPU provider fuses every QDQ Conv of a ResNet into
``QLinearConv`` with U8S8, but only about half of them with S8S8, which then
run as fp32 convs between Dequantize/Quantize.

Grouped convs (``group = k``) quantize per output channel like any conv.
The grouped linear's batched MatMul weight (``k × c/k × j``, or ``k × 1 ×
c/k × j``) gets one scale per tensor: onnxruntime fuses ``QLinearMatMul``
only then (its per-channel axis for MatMul is 1, which is ``c/k`` here, and
left it an fp32 MatMul between Dequantize/Quantize; scales along the last
axis measured no more accurate and do not fuse either).  Reshape/Transpose
carry the scale of their input unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from .argtypes import check_names
from .calibration import first_samples, load_checked
from .calibration.data import MAX_CALIBRATION_SAMPLES  # the one calibration loader
from .compare import compare_outputs
from .errors import ModelError, UsageError, ValidationFailed, first_line
from .measure.inputs import fixed_batch, random_inputs
from .runtime import CPU, session, used_provider
from .io import EXTERNAL_DATA_THRESHOLD, check_output_path, load_model, proto_size, save_model

log = logging.getLogger(__name__)

QUANT_TYPES = ("uint8", "int8")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
# ops that mean a model is already quantized
_QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger",
                  "ConvInteger", "DynamicQuantizeLinear", "QGemm", "QLinearAdd"}


@dataclass
class QuantizeResult:
    """What was done, and how far the int8 model is from the fp32 one on the
    first calibration batch (relative L2 ``‖y8 − y32‖₂ / ‖y32‖₂`` per output)."""

    input: str
    output: str
    written: list[str]
    per_channel: bool
    activation_type: str
    weight_type: str
    reduce_range: bool
    method: str
    calibration: str  # "given" | "random"
    samples: int
    batch: int
    preprocess: str  # which pre-processing succeeded
    quantized_weights: int  # 8-bit weight initializers (biases are int32)
    rel_l2: float
    outputs: dict = field(default_factory=dict)
    provider: str = "CPUExecutionProvider"
    opset_converted: str | None = None  # "11 -> 13": converted for per-channel QDQ (_per_channel_opset)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"int8 ({self.activation_type} activations, {self.weight_type} weights, "
                f"{'per-channel' if self.per_channel else 'per-tensor'}): {self.quantized_weights} weights quantized, "
                f"calibrated on {self.samples} {self.calibration} samples; rel L2 vs fp32 {self.rel_l2:.4f} "
                f"on {self.provider}" + (f"; opset {self.opset_converted} for per-channel weights"
                                         if self.opset_converted else ""))


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _input_dims(vi: onnx.ValueInfoProto) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in vi.type.tensor_type.shape.dim]


def float64_reason(model: onnx.ModelProto) -> str | None:
    """Why onnxruntime's static quantization would leave ``model`` as it is
    (it quantizes float32 tensors only): a float64 graph input or weight of a
    Conv/Gemm/MatMul, named; None when there is none.  Reads types only."""
    double = onnx.TensorProto.DOUBLE
    for vi in model.graph.input:
        if vi.type.tensor_type.elem_type == double:
            return f"its input {vi.name!r} is float64"
    weights = {n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose")
               and len(n.input) > 1}
    for t in model.graph.initializer:
        if t.name in weights and t.data_type == double:
            return f"its weight {t.name!r} is float64"
    return None


RANDOM_SAMPLES = 32  # seeded random calibration samples when none are given


def calibration_batches(model: onnx.ModelProto, calibration: dict | None, *, samples: int | None = None,
                        batch: int = 8, seed: int = 0, input_shapes: dict | None = None) -> tuple[list[dict], int, int]:
    """Split calibration feeds into batches the model accepts; returns
    ``(batches, samples used, batch size)``.  ``samples``: with calibration data, the first that many of
    its samples (None: all, up to the limit); without, that many seeded random samples
    (``validate.random_inputs``; None: :data:`RANDOM_SAMPLES`)."""
    inputs = _graph_inputs(model)
    check_names("--input-shape", input_shapes, (i.name for i in inputs), "input")
    # a fixed first axis is the batch the model takes (measure.inputs.fixed_batch); otherwise ours
    fixed = fixed_batch(dims[0] for dims in map(_input_dims, inputs) if dims)
    bs = fixed or batch
    if samples is not None and samples > MAX_CALIBRATION_SAMPLES:  # each sample is held until quantization ends
        log.warning("int8 calibration uses at most %d samples, not %d", MAX_CALIBRATION_SAMPLES, samples)
        samples = MAX_CALIBRATION_SAMPLES
    if calibration is None:
        sess = session(model, [CPU], threads=2)
        n = max(1, -(-(samples or RANDOM_SAMPLES) // bs))
        feeds = [random_inputs(sess, input_shapes, batch=bs, seed=seed + i) for i in range(n)]
        return feeds, n * bs, bs
    # a stream of feeds is held whole: int8 calibration takes a few hundred samples
    arrays = first_samples(load_checked(calibration, model, input_shapes), samples or MAX_CALIBRATION_SAMPLES)
    counts = {len(a) for a in arrays.values()}
    if len(counts) > 1:
        raise UsageError(f"the calibration arrays hold different numbers of samples ({sorted(counts)}); "
                         f"the first axis must count the same samples in every input")
    n = counts.pop() if counts else 0
    if n == 0 or (fixed is not None and n < bs):
        raise UsageError(f"the calibration data holds {n} samples, fewer than the {max(bs, 1)} the model "
                         f"takes in one batch")
    if fixed is None:
        bs = min(bs, n)
    n_used = n - n % bs if fixed is not None else n
    feeds = [{k: a[i:i + bs] for k, a in arrays.items()} for i in range(0, n_used, bs)]
    return feeds, n_used, bs


def _reader(batches: list[dict]):
    """onnxruntime's CalibrationDataReader over a list of feed dicts."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rewind()

        def get_next(self):
            return next(self._it, None)

        def rewind(self):
            self._it = iter(batches)

        def __len__(self):
            return len(batches)

        def set_range(self, start_index: int, end_index: int):
            self._it = iter(batches[start_index:end_index])

    return Reader()


def batched_matmul_weights(model: onnx.ModelProto) -> list[str]:
    """Constant MatMul weights of rank > 2 (the grouped linears' encoders),
    which are quantized per tensor so that they fuse into QLinearMatMul."""
    dims = {t.name: len(t.dims) for t in model.graph.initializer}
    return sorted({n.input[1] for n in model.graph.node
                   if n.op_type == "MatMul" and len(n.input) > 1 and dims.get(n.input[1], 0) > 2})


class _PreprocessingAdvice(logging.Filter):
    """Drops onnxruntime's "Please consider (to run) pre-processing before quantization", which it logs on the
    root logger for every model it quantizes without its pre-processing mark: the latency table's int8 probes
    skip pre-processing on purpose (hundreds of lines in a ``rewrite --int8`` log), and where pre-processing
    failed :func:`_preprocess` has said so in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def _without_preprocessing_advice():
    root, advice = logging.getLogger(), _PreprocessingAdvice()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def _preprocess(src: Path, dst: Path, large: bool) -> str:
    """onnxruntime's quant_pre_process (symbolic shape inference, basic graph
    optimizations, ONNX shape inference), falling back step by step where one
    of them fails on the model (symbolic inference often does); returns what ran."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    ext = dict(save_as_external_data=True, all_tensors_to_one_file=True,
               external_data_location=f"{dst.name}.data") if large else {}
    attempts = [("quant_pre_process", {}),
                ("quant_pre_process without symbolic shape inference", {"skip_symbolic_shape": True}),
                ("onnx shape inference", {"skip_symbolic_shape": True, "skip_optimization": True})]
    for what, kw in attempts:
        try:
            quant_pre_process(str(src), str(dst), **kw, **ext)
            return what
        except Exception as e:
            log.info("%s failed on %s: %s", what, src.name, first_line(e))
    log.warning("onnxruntime's pre-processing failed on %s; quantizing it as it is", src.name)
    return "none"


def _quant_type(name: str, what: str):
    from onnxruntime.quantization import QuantType

    if name not in QUANT_TYPES:
        raise UsageError(f"{what} must be one of {', '.join(QUANT_TYPES)}, got {name!r}")
    return QuantType.QUInt8 if name == "uint8" else QuantType.QInt8


def quantize(model_path, out_path, calibration=None, *, per_channel: bool = True, activation_type: str = "uint8",
             weight_type: str = "int8", reduce_range: bool = False, method: str = "minmax", samples: int | None = None,
             batch: int = 8, seed: int = 0, input_shapes: dict | None = None, op_types=None,
             exclude_nodes=None, preprocess: bool = True) -> QuantizeResult:
    """Quantize ``model_path`` (a path or ModelProto) statically to int8 QDQ
    and write ``out_path`` atomically.

    ``calibration``: a dict input name → array (samples on the first axis),
    a ``.npz`` path holding such arrays, an iterable of feed dicts, or None
    for seeded random samples; ``samples`` caps the given samples (None: all
    of them, up to the limit) or counts the random ones (None: 32).  The result is checked in onnxruntime on the first calibration
    batch against the fp32 model (NaN/Inf it does not produce, a changed
    shape or a load failure is a :class:`ValidationFailed`)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    act_t, w_t = _quant_type(activation_type, "activation_type"), _quant_type(weight_type, "weight_type")
    if method not in CALIBRATION_METHODS:
        raise UsageError(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
    if (samples is not None and samples < 1) or batch < 1:
        raise UsageError("samples and batch must be at least 1")
    in_path = None if isinstance(model_path, onnx.ModelProto) else str(model_path)
    out = check_output_path(in_path, out_path)
    model = model_path if in_path is None else load_model(in_path)
    done = sorted({n.op_type for n in model.graph.node} & _QUANTIZED_OPS)
    if done:
        raise UsageError(f"the model is already quantized (it has {done[0]} nodes)")
    why = float64_reason(model)
    if why:
        raise UsageError(f"int8 quantization takes float32 models, and {why}; nothing was quantized (convert the "
                         f"model to float32 first)")
    large = proto_size(model) > EXTERNAL_DATA_THRESHOLD
    ref = in_path if in_path is not None and large else model  # onnxruntime takes >2 GB only from a file
    batches, n_samples, bs = calibration_batches(model, calibration, samples=samples, batch=batch, seed=seed,
                                                 input_shapes=input_shapes)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        tmp = Path(tmp)
        src = Path(in_path) if in_path is not None else tmp / "fp32.onnx"
        if in_path is None:
            save_model(model, src, external_data=large)
        pre = "none"
        if preprocess:
            pre = _preprocess(src, tmp / "pre.onnx", large)
            if pre != "none":
                src = tmp / "pre.onnx"
        opset = None
        if per_channel:
            src, per_channel, opset = _per_channel_opset(src, tmp / "opset13.onnx", large)
        q_path = tmp / "int8.onnx"
        extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}  # where shape inference left a type unknown
        if method == "minmax":
            # ranges batch by batch, merged: memory of one batch's activations.  (Not
            # CalibMaxIntermediateOutputs: onnxruntime 1.32 drops the batches it collected
            # before each flush, so ranges would come from the last few batches only.)
            extra["CalibStridedMinMax"] = 1
        if per_channel:
            per_tensor = batched_matmul_weights(onnx.load(str(src), load_external_data=False))
            if per_tensor:
                extra["TensorQuantOverrides"] = {name: [{"symmetric": True}] for name in per_tensor}
        cal = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}[method]
        try:
            with _without_preprocessing_advice():
                quantize_static(str(src), str(q_path), _reader(batches), quant_format=QuantFormat.QDQ,
                                per_channel=per_channel, reduce_range=reduce_range, activation_type=act_t,
                                weight_type=w_t, op_types_to_quantize=op_types, nodes_to_exclude=exclude_nodes,
                                use_external_data_format=large, calibrate_method=cal,
                                calibration_providers=[CPU], extra_options=extra)
        except (UsageError, ModelError):
            raise
        except Exception as e:
            raise ModelError(f"onnxruntime cannot quantize the model: {first_line(e)}") from None
        qmodel = onnx.load(str(q_path))  # external data, if any, comes along
        int8 = {t.name for t in qmodel.graph.initializer
                if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}  # not the int32 biases
        n_weights = sum(1 for n in qmodel.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8)
        v = _check(ref, q_path if large else qmodel, batches[0], session, used_provider, compare_outputs)
        written = save_model(qmodel, out, external_data=large or None)
    return QuantizeResult(
        input=in_path or "<ModelProto>", output=str(out), written=[str(w) for w in written],
        per_channel=per_channel, activation_type=activation_type, weight_type=weight_type,
        reduce_range=reduce_range, method=method, calibration="random" if calibration is None else "given",
        samples=n_samples, batch=bs, preprocess=pre, quantized_weights=n_weights, rel_l2=v[1], outputs=v[0],
        provider=v[2], opset_converted=opset)


PER_CHANNEL_OPSET = 13  # DequantizeLinear takes the per-channel axis from opset 13 on


def _per_channel_opset(src: Path, dst: Path, large: bool) -> tuple[Path, bool, str | None]:
    """Per-channel QDQ needs opset 13: onnxruntime quantizes an older model (ddddocr's OCR models are
    opset 11 and 12) into DequantizeLinear nodes with an ``axis`` their opset does not have, which
    no runtime loads.  Such a model is converted to opset 13 first (onnx's version converter);
    where that fails, or the model is over 2 GB, it is quantized per tensor, with a warning.
    Returns ``(model to quantize, per_channel, "OLD -> 13" or None)``."""
    model = onnx.load(str(src), load_external_data=False)
    old = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), PER_CHANNEL_OPSET)
    if old >= PER_CHANNEL_OPSET:
        return src, True, None
    why = "it is over 2 GB"
    if not large:
        try:
            from onnx import version_converter

            new = version_converter.convert_version(onnx.load(str(src)), PER_CHANNEL_OPSET)
            onnx.checker.check_model(new)
            save_model(new, dst)
            log.info("opset %d -> %d for per-channel int8 (DequantizeLinear's axis)", old, PER_CHANNEL_OPSET)
            return dst, True, f"{old} -> {PER_CHANNEL_OPSET}"
        except Exception as e:  # the converter does not know every op at every opset
            why = f"onnx's version converter cannot take it to opset {PER_CHANNEL_OPSET} ({first_line(e)})"
    log.warning("per-tensor int8: the model is opset %d, per-channel needs opset %d, and %s", old,
                PER_CHANNEL_OPSET, why)
    return src, False, None


def _check(fp32, int8, feeds, session, used_provider, compare_outputs):
    s32 = session(fp32, [CPU], threads=2)
    try:
        s8 = session(int8, [CPU], threads=2)
    except Exception as e:
        raise ValidationFailed(f"onnxruntime cannot load the quantized model: {first_line(e)}") from None
    names = [o.name for o in s32.get_outputs()]
    try:
        y8 = s8.run(names, feeds)
    except Exception as e:
        raise ValidationFailed(f"the quantized model fails to run in onnxruntime: {first_line(e)}") from None
    per, _, worst_rel = compare_outputs(names, s32.run(names, feeds), y8)
    return per, worst_rel, used_provider(s8)
