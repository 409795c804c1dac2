"""int8 after the rewrite (onnx_alds.quantize, `onnx-alds quantize`, `bench --int8`).

Tolerances (int8 QDQ, U8S8 per-channel, min/max calibration):
* ResNet20 on digits, rewritten to half its parameters, calibrated on 256
  training images: top-1 agreement with the fp32 rewrite on the 450 test
  images ≥ 95 % and relative L2 of the logits < 0.05 (measured 99.3 % and
  about 0.01);
* a small MLP whose first layer became a grouped linear (k = 4), calibrated
  on 64 random samples: relative L2 < 0.05 on other random samples
  (measured about 0.02).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper, parser

from onnx_alds import apply_plan, rewrite
from onnx_alds.api import analyze
from onnx_alds.bench import bench, with_int8
from onnx_alds.cli import main
from onnx_alds.errors import ModelError, UsageError
from onnx_alds.plan import LayerPlan, Plan
from onnx_alds.quantize import batched_matmul_weights, quantize

ROOT = Path(__file__).resolve().parents[1]
RESNET20 = ROOT / "models" / "resnet20_digits.onnx"


def _session(path, optimized=None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def _ops(path) -> dict:
    out = {}
    for n in onnx.load(str(path)).graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


@pytest.fixture(scope="module")
def digits():
    from models.data import load_digits_split

    x_tr, _, x_te, y_te = load_digits_split(size=16, seed=0)
    return x_tr.numpy(), x_te.numpy(), y_te.numpy()


@pytest.fixture(scope="module")
def resnet20_rewritten(tmp_path_factory):
    new, _ = rewrite(RESNET20, allow_slower=True, error="paper", keep_params=0.5, validate=False, compare=False, progress=False)
    path = tmp_path_factory.mktemp("r20") / "resnet20_alds.onnx"
    onnx.save(new, str(path))
    return path


def _grouped_linear_mlp(three_d: bool, k: int = 4) -> onnx.ModelProto:
    """x (N, 64) or (N, 6, 64) → linear 64→48 → ReLU → linear 48→10, the first
    layer rewritten to a k-group grouped linear (Reshape/Transpose/batched MatMul)."""
    rng = np.random.default_rng(1)

    def decaying(f, c):  # a trained-like spectrum, so that rank 8 per group keeps most of it
        u, _ = np.linalg.qr(rng.standard_normal((f, f)))
        v, _ = np.linalg.qr(rng.standard_normal((c, c)))
        s = 0.85 ** np.arange(min(f, c))
        return (u[:, :len(s)] * s @ v[:len(s)]).astype(np.float32)

    if three_d:
        text = """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 6, 64] x) => (float[N, 6, 10] y) {
          h = MatMul(x, w1)
          hb = Add(h, b1)
          r = Relu(hb)
          y = MatMul(r, w2)
        }"""
        w1, w2 = decaying(48, 64).T.copy(), decaying(10, 48).T.copy()
    else:
        text = """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 64] x) => (float[N, 10] y) {
          h = Gemm<transB = 1>(x, w1, b1)
          r = Relu(h)
          y = Gemm<transB = 1>(r, w2)
        }"""
        w1, w2 = decaying(48, 64), decaying(10, 48)
    m = parser.parse_model(text)
    m.graph.initializer.extend([numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                                numpy_helper.from_array((0.1 * rng.standard_normal(48)).astype(np.float32), "b1")])
    _, _, info = analyze(m)
    first = next(l for l in info.layers if l.weight_name == "w1")
    return apply_plan(m, Plan([LayerPlan(first.name, "w1", k, "s0", 8)]))


def test_int8_of_the_rewritten_resnet20_agrees_with_its_fp32(tmp_path, resnet20_rewritten, digits):
    x_tr, x_te, _ = digits
    out = tmp_path / "resnet20_alds_int8.onnx"
    res = quantize(resnet20_rewritten, out, {"input": x_tr[:256]})
    assert res.samples == 256 and res.calibration == "given" and res.per_channel
    assert res.written == [str(out)]
    # every conv, the grouped encoders (group = k > 1) included, reads an 8-bit weight
    q = onnx.load(str(out))
    int8 = {t.name for t in q.graph.initializer if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}
    producer = {o: n for n in q.graph.node for o in n.output}
    convs = [n for n in q.graph.node if n.op_type == "Conv"]
    grouped = [n for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert grouped, "the rewrite should contain grouped convs"
    for n in convs:
        dq = producer[n.input[1]]
        assert dq.op_type == "DequantizeLinear" and dq.input[0] in int8, n.name
    y32 = _session(resnet20_rewritten).run(None, {"input": x_te})[0]
    y8 = _session(out).run(None, {"input": x_te})[0]
    agreement = float(np.mean(y32.argmax(1) == y8.argmax(1)))
    assert agreement >= 0.95, agreement
    assert _rel(y32, y8) < 0.05
    # onnxruntime runs the convs as integer convs (U8S8 fuses every one of them)
    _session(out, optimized=tmp_path / "opt.onnx")
    ops = _ops(tmp_path / "opt.onnx")
    assert ops.get("QLinearConv", 0) == len(convs) and ops.get("Conv", 0) == 0, ops


@pytest.mark.parametrize("three_d", [False, True], ids=["gemm-2d", "matmul-3d"])
def test_int8_of_a_grouped_linear_runs_and_stays_close(tmp_path, three_d):
    m = _grouped_linear_mlp(three_d)
    assert {"Reshape", "Transpose"} <= {n.op_type for n in m.graph.node}
    src = tmp_path / "gl.onnx"
    onnx.save(m, str(src))
    rng = np.random.default_rng(5)
    shape = (6, 64) if three_d else (64,)
    cal = {"x": rng.standard_normal((64, *shape)).astype(np.float32)}
    out = tmp_path / "gl_int8.onnx"
    res = quantize(src, out, cal, batch=16)
    assert res.batch == 16 and res.samples == 64
    x = rng.standard_normal((32, *shape)).astype(np.float32)
    y32 = _session(src).run(None, {"x": x})[0]
    y8 = _session(out).run(None, {"x": x})[0]
    assert _rel(y32, y8) < 0.05
    # the batched encoder weight has one scale, so onnxruntime fuses it into QLinearMatMul
    q = onnx.load(str(out))
    inits = {t.name: t for t in q.graph.initializer}
    (enc,) = batched_matmul_weights(m)
    dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith(enc))
    assert numpy_helper.to_array(inits[dq.input[1]]).size == 1
    _session(out, optimized=tmp_path / "opt.onnx")
    assert _ops(tmp_path / "opt.onnx").get("QLinearMatMul", 0) >= 1


def test_random_calibration_and_per_tensor(tmp_path):
    out = tmp_path / "r20_int8.onnx"
    res = quantize(RESNET20, out, None, per_channel=False, samples=10, batch=4)
    assert res.calibration == "random" and res.samples == 12 and res.batch == 4 and not res.per_channel
    q = onnx.load(str(out))
    inits = {t.name: t for t in q.graph.initializer}
    scales = [numpy_helper.to_array(inits[n.input[1]]) for n in q.graph.node
              if n.op_type == "DequantizeLinear" and n.input[0] in inits
              and inits[n.input[0]].data_type == onnx.TensorProto.INT8]
    assert scales and all(s.size == 1 for s in scales)
    assert res.rel_l2 < 0.1


def test_unpreprocessed_quantization_logs_no_advice(tmp_path, caplog):
    """The latency table's int8 probes skip onnxruntime's pre-processing; its advice to run it came once per
    probe on the root logger (184 lines in one ``rewrite --int8``)."""
    import logging

    caplog.set_level(logging.WARNING)
    res = quantize(RESNET20, tmp_path / "q.onnx", None, samples=8, batch=8, preprocess=False)
    assert res.preprocess == "none" and res.quantized_weights > 0
    assert not [r for r in caplog.records if "pre-processing" in r.getMessage()]
    assert not logging.getLogger().filters  # the filter is gone after the call


def test_bad_calibration_and_models_are_one_sentence(tmp_path, digits):
    x_tr = digits[0][:8]
    out = tmp_path / "o.onnx"
    cases = [
        # the messages of the one calibration loader (onnx_alds.calibration), shared with rewrite
        ({"image": x_tr}, UsageError, "'image', which is not an input of the model"),
        ({"input": x_tr, "extra": x_tr}, UsageError, "'extra', which is not an input"),
        ({"input": x_tr[:, :, :8]}, UsageError, "size 8 on axis 2, but input 'input' needs 16"),
        ({"input": x_tr[0]}, UsageError, "has rank 4"),
        ({"input": x_tr[:0]}, UsageError, "has no samples"),
        ({"input": np.full_like(x_tr, np.nan)}, UsageError, "NaN"),
        ({"input": x_tr.astype(str)}, UsageError, "cannot be cast safely"),
    ]
    for cal, err, text in cases:
        with pytest.raises(err, match=text) as e:
            quantize(RESNET20, out, cal)
        assert "\n" not in str(e.value)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(ModelError, match="does not exist"):
        quantize(tmp_path / "missing.onnx", out)
    with pytest.raises(UsageError, match="output path is the input path"):
        quantize(RESNET20, RESNET20)
    quantize(RESNET20, out, {"input": x_tr})
    with pytest.raises(UsageError, match="already quantized"):
        quantize(out, tmp_path / "twice.onnx")
    with pytest.raises(UsageError, match="activation_type must be one of"):
        quantize(RESNET20, out, activation_type="int4")


def test_fixed_batch_model_takes_calibration_in_its_batch(tmp_path):
    m = parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[4, 12] x) => (float[4, 5] y) { y = Gemm<transB = 1>(x, w) }""")
    m.graph.initializer.append(numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((5, 12)).astype(np.float32), "w"))
    src = tmp_path / "fixed.onnx"
    onnx.save(m, str(src))
    cal = {"x": np.random.default_rng(1).standard_normal((10, 12)).astype(np.float32)}
    res = quantize(src, tmp_path / "q.onnx", cal)
    assert res.batch == 4 and res.samples == 8  # the last 2 samples do not fill a batch
    with pytest.raises(UsageError, match="fewer than the 4 the model takes"):
        quantize(src, tmp_path / "q.onnx", {"x": cal["x"][:3]})


def test_cli_quantize_and_exit_codes(tmp_path, capsys, digits):
    cal = tmp_path / "cal.npz"
    np.savez(cal, input=digits[0][:32])
    out = tmp_path / "r20_int8.onnx"
    assert main(["quantize", str(RESNET20), str(out), "--calibration", str(cal), "--json", str(tmp_path / "q.json")]) == 0
    assert "32 given samples" in capsys.readouterr().out and out.exists()
    assert main(["quantize", str(RESNET20), str(tmp_path / "pt.onnx"), "--per-tensor", "--samples", "4"]) == 0
    capsys.readouterr()
    bad = tmp_path / "bad.npz"
    np.savez(bad, wrong=digits[0][:4])
    assert main(["quantize", str(RESNET20), str(tmp_path / "x.onnx"), "--calibration", str(bad)]) == 2
    assert "'wrong', which is not an input of the model" in capsys.readouterr().err
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert main(["quantize", str(RESNET20), str(tmp_path / "x.onnx"), "--calibration", str(tmp_path / "junk.npz")]) == 2
    assert "junk.npz" in capsys.readouterr().err
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    assert main(["quantize", str(tmp_path / "junk.onnx"), str(tmp_path / "x.onnx")]) == 3
    assert not (tmp_path / "x.onnx").exists()


def test_bench_rel_l2_column_and_int8(tmp_path, resnet20_rewritten, capsys):
    paths, labels, done = with_int8([RESNET20, resnet20_rewritten], tmp_path)
    assert len(paths) == 4 and labels[1].endswith("(int8)") and len(done) == 2
    rows = bench(paths, batches=[2], repeats=2, warmup=1, threads=1, labels=labels)
    err = [r["rel_l2_vs_first"] for r in rows]
    assert err[0] == 0.0 and 0 < err[1] < 0.05  # int8 of the original: close to it
    assert err[2] > err[1]  # the one-shot rewrite at half the parameters is further away
    # a model with other inputs has no comparable output
    m = parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3] x) => (float[N, 3] y) { y = Relu(x) }""")
    other = tmp_path / "relu.onnx"
    onnx.save(m, str(other))
    rows = bench([RESNET20, other], batches=[1], repeats=1, warmup=0, threads=1)
    assert rows[1]["rel_l2_vs_first"] is None
    assert main(["bench", str(RESNET20), str(resnet20_rewritten), "--int8", "--repeats", "2", "--warmup", "0",
                 "--threads", "1", "--batch", "1"]) == 0
    text = capsys.readouterr().out
    assert text.count("(int8)  ") == 2 and text.count("weights quantized") == 2 and "rel L2 vs first" in text
    assert main(["bench", str(RESNET20), "--per-tensor"]) == 2


@pytest.mark.parametrize("opset", [11, 12])
def test_per_channel_int8_of_an_older_opset(tmp_path, opset):
    """ddddocr's OCR models are opset 11 and 12: onnxruntime quantizes them per channel into
    DequantizeLinear nodes with an axis their opset lacks, which no runtime loads (it was exit 5).
    The model is taken to opset 13 first, and the int8 copy loads, runs and stays close."""
    from graphs import cnn_model

    src = tmp_path / "m.onnx"
    onnx.save(cnn_model(opset=opset), str(src))
    res = quantize(src, tmp_path / "q.onnx")
    assert res.per_channel and res.opset_converted == f"{opset} -> 13"
    assert res.quantized_weights >= 4 and res.rel_l2 < 0.1
    q = onnx.load(str(tmp_path / "q.onnx"))
    assert next(o.version for o in q.opset_import if o.domain in ("", "ai.onnx")) == 13
    onnx.checker.check_model(q)
    assert quantize(src, tmp_path / "t.onnx", per_channel=False).opset_converted is None  # per tensor: as it is


def test_bench_of_a_model_that_cannot_run_on_random_inputs(tmp_path):
    """A model that needs more than the default size of a dynamic axis (a speech model's STFT, here
    a Reshape into rows of 64) is one sentence naming it and the shapes tried, exit 3 (it was an
    internal error); with --input-shape it is timed."""
    m = parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N, T] x) => (float[R, 64] y) {
            shape = Constant <value = int64[2] {-1, 64}> ()
            y = Reshape(x, shape)
        }""")
    src = tmp_path / "m.onnx"
    onnx.save(m, str(src))
    with pytest.raises(ModelError, match=r"m.onnx fails to run in onnxruntime on random inputs of shapes x:\[1, 32\]"):
        bench([src])
    assert main(["bench", str(src)]) == 3
    assert main(["bench", str(src), "--input-shape", "x:1,128"]) == 0


def test_quantize_refuses_an_input_shape_that_disagrees_with_its_data(tmp_path, capsys):
    """--input-shape beside --calibration was ignored by quantize; as in rewrite and bench, shapes that
    disagree with the samples are one sentence, exit 2, and nothing is written."""
    out = tmp_path / "q.onnx"
    cal = ROOT / "models" / "digits_calibration.npz"
    assert main(["quantize", str(RESNET20), str(out), "--calibration", str(cal), "--input-shape", "input:1,1,8,8"]) == 2
    assert "disagrees with the calibration data's input, whose samples are [1, 16, 16]" in capsys.readouterr().err
    assert not out.exists()
    assert main(["quantize", str(RESNET20), str(out), "--calibration", str(cal), "--input-shape", "input:4,1,16,16"]) == 0


def test_samples_caps_the_given_calibration_samples(tmp_path, capsys):
    """--samples counted only random samples and was ignored beside --calibration; it now takes the
    first N of the given samples (all of them by default)."""
    cal = ROOT / "models" / "digits_calibration.npz"
    n = len(np.load(cal)["input"])
    assert quantize(RESNET20, tmp_path / "a.onnx", str(cal)).samples == n
    assert quantize(RESNET20, tmp_path / "b.onnx", str(cal), samples=10).samples == 10
    assert quantize(RESNET20, tmp_path / "c.onnx").samples == 32  # random: the default count
    assert main(["quantize", str(RESNET20), str(tmp_path / "d.onnx"), "--calibration", str(cal), "--samples", "12"]) == 0
    assert "calibrated on 12 given samples" in capsys.readouterr().out
