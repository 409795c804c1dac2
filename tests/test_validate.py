"""Validation and benchmarking through onnxruntime (real sessions, CPU here)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from graphs import _model, cnn_model
from onnx_alds.bench import bench
from onnx_alds.errors import UsageError, ValidationFailed
from onnx_alds.runtime import CPU, CUDA, providers_for
from onnx_alds.validate import validate


def unary(op, shape=("N", 4), out_shape=None, **attrs):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape or shape))
    return _model([helper.make_node(op, ["x"], ["y"], name="op", **attrs)], [x], [y], [])


def test_identical_models_validate_exactly():
    m = cnn_model()
    v = validate(m, m, repeats=3)
    assert v.provider == CPU
    assert v.max_abs_diff == 0.0 and v.rel_l2 == 0.0
    assert v.inputs["x"]["shape"] == [2, 3, 16, 16]  # dynamic batch → 2
    assert v.latency_ms_before is not None and v.latency_ms_after is not None  # timed with repeats > 0
    assert validate(m, m, repeats=0).latency_ms_before is None  # and not timed without


def test_latency_is_timed_on_one_sample_whichever_the_inputs(monkeypatch):
    """The outputs are compared on every sample (random or calibration), the latency timed at batch 1,
    as docs/cli.md says; a spy on the real timing function reads the feeds it is given."""
    from onnx_alds import validate as validate_module

    shapes, real = [], validate_module.interleaved_latency

    def spy(sessions, feeds_list, **kw):
        shapes.extend(f["x"].shape[0] for f in feeds_list)
        return real(sessions, feeds_list, **kw)

    monkeypatch.setattr(validate_module, "interleaved_latency", spy)
    m = cnn_model()
    x = np.random.default_rng(0).standard_normal((6, 3, 16, 16)).astype(np.float32)
    for kw in ({"batch": 4}, {"feeds": {"x": x}}):
        shapes.clear()
        v = validate(m, m, repeats=3, **kw)
        assert v.inputs["x"]["shape"][0] in (4, 6) and shapes == [1, 1]


def test_nan_outputs_fail():
    with pytest.raises(ValidationFailed, match="NaN or Inf"):
        validate(unary("Abs"), unary("Log"), repeats=0)  # log of negative inputs


def test_shape_change_fails():
    flat = unary("Flatten", shape=("N", 4, 2), out_shape=("N", 8), axis=1)
    same = unary("Identity", shape=("N", 4, 2))
    with pytest.raises(ValidationFailed, match="changed shape"):
        validate(same, flat, repeats=0)


def test_provider_choice_falls_back_to_cpu():
    avail = ort.get_available_providers()
    if CUDA in avail:
        assert providers_for("auto")[0] == CUDA
    else:
        assert providers_for("auto") == [CPU]
        with pytest.raises(UsageError, match="CUDA"):
            providers_for("cuda")
    assert providers_for("cpu") == [CPU]


def test_bench_interleaves_after_warmup(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(cnn_model(seed=0), str(a))
    onnx.save(cnn_model(seed=1), str(b))
    log = []
    rows = bench([a, b], batches=[1, 3], repeats=4, warmup=2, order_log=log, min_seconds=0)
    assert [r["batch"] for r in rows] == [1, 1, 3, 3]
    for r in rows:
        assert {"model", "provider", "batch", "threads", "median_ms", "p10_ms", "p90_ms", "speedup"} <= set(r)
    for batch in (1, 3):  # the speed-up is the first model's median over each model's
        a, b = [r for r in rows if r["batch"] == batch]
        assert a["model"] == str(tmp_path / "a.onnx") and b["model"] == str(tmp_path / "b.onnx")
        assert b["speedup"] == pytest.approx(a["median_ms"] / b["median_ms"])
    per_batch = len(log) // 2
    first = log[:per_batch]
    assert first[:4] == [("warmup", 0), ("warmup", 1)] * 2  # warm-up of both before any timing
    timed = [i for kind, i in first if kind == "timed"]
    assert len(timed) == 8
    # interleaved: the models alternate, never two timed runs of one model in a row within a round
    assert all(sorted(timed[j:j + 2]) == [0, 1] for j in range(0, 8, 2))


def test_small_models_are_timed_for_at_least_min_seconds():
    """20 runs of a tiny model are a few milliseconds of samples: the loop goes on until every
    session has run for min_seconds (or max_repeats)."""
    from onnx_alds.runtime import session
    from onnx_alds.measure.timing import interleaved_latency

    s = session(cnn_model(), [CPU], 1)
    feeds = {"x": np.zeros((1, 3, 16, 16), np.float32)}
    a, b = interleaved_latency([s, s], [feeds, feeds], repeats=3, min_seconds=0.05, max_repeats=10**6)
    assert len(a) == len(b) >= 3 and min(sum(a), sum(b)) >= 50.0
    capped = interleaved_latency([s], [feeds], repeats=3, min_seconds=100.0, max_repeats=7)[0]
    assert len(capped) == 7
    # in blocks: the repeats are shared among them, and each session keeps one block's times
    log: list = []
    a, b = interleaved_latency([s, s], [feeds, feeds], warmup=2, repeats=6, blocks=3, order_log=log)
    assert len(a) == len(b) == 2
    assert sum(1 for k, _ in log if k == "timed") == 3 * 2 * 2
    assert sum(1 for k, _ in log if k == "warmup") == (2 + 1 + 1) * 2


def test_bench_measures_real_work(tmp_path):
    """A model with ~200× the multiply-accumulates is measured as slower, and its
    speed-up over the small one says so."""
    from graphs import conv_model

    small, big = tmp_path / "small.onnx", tmp_path / "big.onnx"
    onnx.save(conv_model(f=4, c=4, in_hw=(16, 16)), str(small))
    onnx.save(conv_model(f=64, c=64, in_hw=(64, 64)), str(big))
    rows = bench([small, big], batches=[1], repeats=5, warmup=1, threads=1)
    s, b = rows
    assert 0 < s["p10_ms"] and b["median_ms"] > 5 * s["median_ms"]
    assert b["speedup"] < 0.2 and s["speedup"] == 1.0
    assert b["p90_ms"] >= b["p10_ms"] > s["p90_ms"]  # the spreads do not even overlap


def _state_model(state_dims, per_sample: bool):
    """An input ``x`` with a dynamic batch beside a state input ``s`` of ``state_dims`` (a recurrent
    model's ``[layers, batch, hidden]``): ``y = [x W, Σ_0 s]`` where the state holds one row per sample
    (``per_sample``), else ``y = x W + Σ s``."""
    from onnx import numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32), "w")
    axes = numpy_helper.from_array(np.array([0] if per_sample else [0, 1, 2], np.int64), "axes")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"], name="mm"),
             helper.make_node("ReduceSum", ["s", "axes"], ["r"], keepdims=0),
             helper.make_node("Concat", ["xw", "r"], ["y"], axis=1) if per_sample
             else helper.make_node("Add", ["xw", "r"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8]),
                          helper.make_tensor_value_info("s", TensorProto.FLOAT, list(state_dims))],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 12 if per_sample else 8])],
                  [w, axes])


def test_a_named_dynamic_size_takes_one_value_in_every_input():
    """The state ``[2, batch, 4]`` gets the batch the other input has (it took the default 32 for its
    second axis, and the model could not run on its random inputs)."""
    from onnx_alds.measure.inputs import random_inputs

    m = _state_model([2, "batch", 4], per_sample=True)
    sess = ort.InferenceSession(m.SerializeToString(), providers=[CPU])
    feeds = random_inputs(sess, batch=3)
    assert feeds["x"].shape == (3, 8) and feeds["s"].shape == (2, 3, 4)
    assert validate(m, m, repeats=1).rel_l2 == 0.0


def test_a_fixed_state_beside_a_dynamic_batch_is_no_fixed_batch():
    """A state input fixed at ``[1, 1, 4]`` beside an input with a dynamic batch (silero-vad's
    sequence model): the batch stays dynamic (the state's first axis was taken for a fixed batch of 1,
    the inputs were cut into slices of one and the state's second slice was empty)."""
    from onnx_alds.measure.inputs import fixed_batch, session_fixed_batch

    m = _state_model([1, 1, 4], per_sample=False)
    sess = ort.InferenceSession(m.SerializeToString(), providers=[CPU])
    assert session_fixed_batch(sess) is None
    assert fixed_batch([4, 4]) == 4 and fixed_batch([4, 1]) is None and fixed_batch([4, "N"]) is None
    v = validate(m, m, repeats=1)
    assert v.rel_l2 == 0.0 and v.inputs["x"]["shape"] == [2, 8] and v.inputs["s"]["shape"] == [1, 1, 4]


def test_the_warning_on_random_inputs_names_the_check_on_real_data_not_their_agreement():
    """On random inputs the shipped ResNet20 at --keep-flops 0.6 agrees 100 % top-1 and 87 % on digits:
    the warning no longer quotes agreement on noise, and names the command that measures it on data."""
    from onnx_alds.validate import Validation, gate

    random = gate(Validation("CPUExecutionProvider", 1.0, 0.3, top1_agreement=1.0))
    assert len(random) == 1 and "top-1" not in random[0] and "relative L2 0.3 on random inputs" in random[0]
    assert "onnx-alds bench IN.onnx OUT.onnx --calibration YOUR.npz" in random[0]
    data = gate(Validation("CPUExecutionProvider", 1.0, 0.3, top1_agreement=0.87, data="calibration"))
    assert "top-1 agreement 87.0 % on calibration inputs" in data[0] and "onnx-alds bench" not in data[0]
    assert gate(Validation("CPUExecutionProvider", 0.01, 0.05, top1_agreement=1.0)) == []
