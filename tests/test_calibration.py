"""Patch moments on calibration data: the patches reproduce onnxruntime's own
ops, streaming and splitting into passes change nothing, bad calibration
data is one clear sentence."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from graphs import cnn_model, conv_model, gemm_model, matmul_model, rel_err, run
from onnx import numpy_helper

from onnx_alds import calibration as cal
from onnx_alds.calibration import (Moments, Tap, collect_moments, iter_batches, load_calibration, patches,
                                   plan_passes, tap_for_layer)
from onnx_alds.errors import UsageError
from onnx_alds.extract import extract

RNG = np.random.default_rng(0)


def weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def with_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    """The reference: the same model with intermediate tensors as graph outputs (built here, not by the module)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in names:
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    return m


def activations(model, names, x) -> dict[str, np.ndarray]:
    m = with_outputs(model, names)
    outs = run(m, x)
    return dict(zip([o.name for o in m.graph.output], outs))


def reference(x: np.ndarray, tap: Tap) -> Moments:
    p = patches(x, tap)
    return Moments(p.T @ p, p.sum(axis=0), len(p))


def assert_moments_equal(a: Moments, b: Moments, tol=2e-6):
    """Within the rounding of float32 products (a float32 activation's patches are multiplied in
    float32 a block at a time, moments.accumulate), against a float64 reference."""
    assert a.count == b.count
    assert a.gram.shape == b.gram.shape
    assert rel_err(b.gram, a.gram) <= tol
    assert rel_err(b.sum, a.sum) <= tol


# ----------------------------------------------------------------------------- patches reproduce the conv

CONV_CASES = {  # kernel, input size, strides, pads, dilations, auto_pad (ONNX attribute forms)
    "stride2": ((3, 3), (9, 11), (2, 2), None, None, None),
    "asymmetric_pads": ((3, 3), (9, 11), None, (1, 0, 2, 1), None, None),
    "dilation2": ((3, 3), (12, 13), None, (2, 1, 2, 1), (2, 2), None),
    "kernel5x3_stride2": ((5, 3), (10, 9), (2, 1), (2, 1, 1, 1), None, None),
    "1d_stride2_pads": ((3,), (17,), (2,), (2, 1), None, None),
    "1d_dilation3": ((4,), (20,), None, None, (3,), None),
    # 9 → out 5, total pad 3; 10 → out 5, total pad 1: asymmetric on both axes
    "same_upper": ((4, 3), (9, 10), (2, 2), None, None, "SAME_UPPER"),
    "same_lower": ((4, 3), (9, 10), (2, 2), None, None, "SAME_LOWER"),
    "1d_same_upper": ((4,), (9,), (2,), None, None, "SAME_UPPER"),
    "1d_same_lower": ((4,), (11,), (2,), None, None, "SAME_LOWER"),  # (onnxruntime: no dilation with SAME)
    "valid": ((3, 3), (8, 7), (2, 2), None, None, "VALID"),
}


def conv_tap(kernel, strides, pads, dilations, auto_pad, c) -> Tap:
    """The Tap of an ONNX Conv's attributes, written out independently of extract."""
    nsp = len(kernel)
    s, dil = list(strides or [1] * nsp), list(dilations or [1] * nsp)
    p = list(pads or [0] * 2 * nsp)
    k = list(kernel)
    if nsp == 1:
        k, s, dil, p = k + [1], s + [1], dil + [1], [p[0], 0, p[1], 0]
    return Tap("conv", "x", "conv", tuple(k), tuple(s), tuple(dil), tuple(p), auto_pad or "NOTSET", nsp, c)


@pytest.mark.parametrize("case", CONV_CASES)
def test_patches_reproduce_the_conv_of_onnxruntime(case):
    kernel, size, strides, pads, dilations, auto_pad = CONV_CASES[case]
    f, c, n = 5, 4, 3
    model = conv_model(f=f, c=c, kernel=kernel, in_hw=size, strides=strides, pads=pads, dilations=dilations,
                       auto_pad=auto_pad, bias=False)
    x = RNG.standard_normal((n, c, *size)).astype(np.float32)
    y = run(model, {"x": x})[0]
    wm = weight(model, "conv.weight").reshape(f, -1).astype(np.float64)
    layer = extract(model, gs.import_onnx(model)).layer("conv")
    for tap in (conv_tap(kernel, strides, pads, dilations, auto_pad, c), tap_for_layer(layer)):
        p = patches(x, tap)
        assert p.shape == (y[0, 0].size * n, c * int(np.prod(kernel)))
        out = (p @ wm.T).reshape(n, *y.shape[2:], f)  # rows: (sample, output row, output col)
        assert rel_err(y, np.moveaxis(out, -1, 1)) <= 1e-5, tap


def test_channel_groups_own_contiguous_columns():
    """Group i of k (input channels [i·c/k, (i+1)·c/k)) is columns [i·d/k, (i+1)·d/k) of a patch."""
    c, k = 6, 3
    x = RNG.standard_normal((2, c, 7, 7)).astype(np.float32)
    tap = Tap("conv", "x", "conv", (3, 3), pads=(1, 1, 1, 1), channels=c)
    p = patches(x, tap)
    d = p.shape[1]
    for i in range(k):
        part = Tap("conv", "x", "conv", (3, 3), pads=(1, 1, 1, 1), channels=c // k)
        sl = x[:, i * c // k : (i + 1) * c // k]
        np.testing.assert_array_equal(p[:, i * d // k : (i + 1) * d // k], patches(sl, part))


def test_small_chunks_give_the_same_patches():
    x = RNG.standard_normal((3, 4, 9, 11)).astype(np.float32)
    tap = Tap("conv", "x", "conv", (3, 3), (2, 1), pads=(1, 1, 1, 1), channels=4)
    blocks = list(cal.iter_patches(x, tap, chunk_bytes=8 * 36 * 5))  # a few output lines per block
    assert len(blocks) > 3
    np.testing.assert_array_equal(np.concatenate(blocks), patches(x, tap))


# ----------------------------------------------------------------------------- moments

CNN_TAPS = [
    Tap("c1", "x", "conv", (3, 3), pads=(1, 1, 1, 1), channels=3),  # on the graph input
    Tap("c2", "a1", "conv", (3, 3), (2, 2), pads=(1, 1, 1, 1), channels=16),
    Tap("c3", "a2", "conv", (1, 1), channels=32),
    Tap("fc", "pf", "linear", spatial_rank=0, channels=32),
]


@pytest.fixture(scope="module")
def cnn():
    model = cnn_model()
    x = RNG.standard_normal((10, 3, 16, 16)).astype(np.float32)
    acts = activations(model, ["a1", "a2", "pf"], {"x": x}) | {"x": x}
    return model, x, {t.name: reference(acts[t.input], t) for t in CNN_TAPS}


def test_streaming_equals_all_at_once(cnn):
    model, x, ref = cnn
    streamed = collect_moments(model, CNN_TAPS, {"x": x}, batch_size=3, provider="cpu", threads=1)
    whole = collect_moments(model, CNN_TAPS, {"x": x}, batch_size=len(x), provider="cpu", threads=1)
    head = collect_moments(model, CNN_TAPS, {"x": x[:4]}, batch_size=4, provider="cpu", threads=1)
    tail = collect_moments(model, CNN_TAPS, {"x": x[4:]}, batch_size=2, provider="cpu", threads=1)
    for t in CNN_TAPS:
        assert_moments_equal(streamed[t.name], ref[t.name])
        assert_moments_equal(whole[t.name], ref[t.name])
        assert_moments_equal(head[t.name].merge(tail[t.name]), ref[t.name])
        assert streamed[t.name].gram.dtype == np.float64


def test_feed_stream_npz_and_dict_agree(cnn, tmp_path):
    model, x, ref = cnn
    path = tmp_path / "cal.npz"
    np.savez(path, x=x.astype(np.float64))  # float64 is cast to the model's float32
    feeds = [{"x": x[:1]}, {"x": x[1:6]}, {"x": x[6:]}]  # uneven feeds, re-batched
    for source in (path, str(path), feeds, (f for f in feeds), lambda: iter(feeds)):
        got = collect_moments(model, CNN_TAPS, source, batch_size=4, provider="cpu", threads=1)
        for t in CNN_TAPS:
            assert_moments_equal(got[t.name], ref[t.name])


def test_max_bytes_splits_the_taps_into_passes(cnn, caplog):
    model, x, ref = cnn
    # per sample: a1 16·16·16·4 = 16 KiB, a2 32·8·8·4 = 8 KiB, pf 128 B; at batch 4: 64 KiB, 32 KiB, 512 B
    for max_bytes, passes in ((2 << 30, 1), (70_000, 2), (40_000, 2), (30_000, 3), (1, 3)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="onnx_alds.calibration"):
            got = collect_moments(model, CNN_TAPS, {"x": x}, batch_size=4, provider="cpu", threads=1,
                                  max_bytes=max_bytes)
        assert f"in {passes} pass(es)" in caplog.text
        for t in CNN_TAPS:
            assert_moments_equal(got[t.name], ref[t.name])


def test_large_activations_take_a_smaller_batch_not_more_passes(cnn, caplog, monkeypatch):
    """Past BATCH_BYTES a batch's activations are brought under it by a smaller batch (the same one
    pass over the data); the moments do not depend on it."""
    model, x, ref = cnn
    monkeypatch.setattr(cal.moments, "BATCH_BYTES", 50_000)  # at batch 8: 128 + 64 KiB + 1 KiB
    with caplog.at_level(logging.INFO, logger="onnx_alds.calibration"):
        got = collect_moments(model, CNN_TAPS, {"x": x}, batch_size=8, provider="cpu", threads=1)
    assert "in 1 pass(es)" in caplog.text and "batches of 2" in caplog.text  # 8 · 50,000 // 197,760
    for t in CNN_TAPS:
        assert_moments_equal(got[t.name], ref[t.name])


def test_plan_passes_keeps_each_pass_within_the_budget():
    sizes = {"a": 600, "b": 300, "c": 300, "d": 2500, "e": 100}
    passes = plan_passes(sizes, batch_size=8, max_bytes=1000)
    assert [p.tensors for p in passes] == [["a", "b"], ["d"], ["c", "e"]]
    assert all(p.bytes <= 1000 for p in passes)
    big = next(p for p in passes if p.tensors == ["d"])
    assert big.batch_size == 3  # 2500 B at batch 8 → 937 B at batch 3


def test_one_shot_iterator_cannot_make_several_passes(cnn):
    model, x, _ = cnn
    with pytest.raises(UsageError, match="read only once"):
        collect_moments(model, CNN_TAPS, ({"x": x[i : i + 2]} for i in range(0, 10, 2)), batch_size=4,
                        provider="cpu", max_bytes=40_000)


def test_external_data_path_gives_the_same_moments(cnn, monkeypatch):
    """Models over the protobuf limit are saved with external data; force that path on a small model."""
    model, x, ref = cnn
    monkeypatch.setattr(cal.moments, "EXTERNAL_DATA_THRESHOLD", 0)
    got = collect_moments(model, CNN_TAPS, {"x": x}, batch_size=5, provider="cpu", threads=1, max_bytes=40_000)
    for t in CNN_TAPS:
        assert_moments_equal(got[t.name], ref[t.name])


def test_linear_taps_on_2d_and_3d_activations():
    c = 12
    gemm = gemm_model(f=7, c=c, bias=False)
    x2 = RNG.standard_normal((9, c)).astype(np.float32)
    mm = matmul_model(f=10, c=c, lead=(5,))
    x3 = RNG.standard_normal((9, 5, c)).astype(np.float32)
    tap = Tap("fc", "x", "linear", spatial_rank=0, channels=c)
    for model, x, w in ((gemm, x2, weight(gemm, "fc.weight").T), (mm, x3, weight(mm, "proj.weight"))):
        y = run(model, {"x": x})[0]
        p = patches(x, tap)
        assert p.shape == (x.size // c, c)
        assert rel_err(y.reshape(-1, y.shape[-1]), p @ w) <= 1e-5  # a patch is a row of x: y = x W
        got = collect_moments(model, [tap], {"x": x}, batch_size=4, provider="cpu", threads=1)["fc"]
        rows = x.reshape(-1, c).astype(np.float64)
        assert_moments_equal(got, Moments(rows.T @ rows, rows.sum(0), len(rows)))


def test_linear_tap_on_a_3d_activation_inside_the_graph():
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 6, 8] x) => (float[N, 6, 5] y) {
        h = Relu(x)
        y = MatMul(h, w)
    }"""
    model = onnx.parser.parse_model(text)
    w = RNG.standard_normal((8, 5)).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(w, "w"))
    x = RNG.standard_normal((7, 6, 8)).astype(np.float32)
    tap = Tap("mm", "h", "linear", spatial_rank=0, channels=8)
    got = collect_moments(model, [tap], {"x": x}, batch_size=3, provider="cpu", threads=1)["mm"]
    rows = np.maximum(x, 0).reshape(-1, 8).astype(np.float64)
    assert_moments_equal(got, Moments(rows.T @ rows, rows.sum(0), len(rows)))


def two_taps_model() -> onnx.ModelProto:
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y2, float[N, 5, 8, 8] y3) {
        h = Conv <pads = [1, 1, 1, 1]> (x, w1)
        r = Relu(h)
        y2 = Conv <pads = [1, 1, 1, 1]> (r, w2)
        y3 = Conv (r, w3)
    }"""
    model = onnx.parser.parse_model(text)
    for name, shape in (("w1", (6, 3, 3, 3)), ("w2", (4, 6, 3, 3)), ("w3", (5, 6, 1, 1))):
        model.graph.initializer.append(numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name))
    return model


def test_two_taps_on_one_tensor_and_a_tap_on_a_graph_input():
    model = two_taps_model()
    taps = [Tap("c1", "x", "conv", (3, 3), pads=(1, 1, 1, 1), channels=3),
            Tap("c2", "r", "conv", (3, 3), pads=(1, 1, 1, 1), channels=6),
            Tap("c3", "r", "conv", (1, 1), channels=6)]
    x = RNG.standard_normal((5, 3, 8, 8)).astype(np.float32)
    acts = activations(model, ["r"], {"x": x}) | {"x": x}
    got = collect_moments(model, taps, {"x": x}, batch_size=2, provider="cpu", threads=1)
    assert set(got) == {"c1", "c2", "c3"}
    for t in taps:
        assert_moments_equal(got[t.name], reference(acts[t.input], t))
    # the 1×1 tap's gram is the 3×3 tap's centre-pixel block (kernel row 1, col 1 of every channel)
    centre = np.arange(6) * 9 + 4
    np.testing.assert_allclose(got["c2"].gram[np.ix_(centre, centre)], got["c3"].gram, rtol=1e-12)


def test_taps_that_unfold_one_tensor_alike_share_their_moments(caplog):
    """Q, K and V of a transformer read one tensor as the same patches: one accumulation serves all."""
    model = two_taps_model()
    taps = [Tap("q", "r", "conv", (3, 3), pads=(1, 1, 1, 1), channels=6),
            Tap("k", "r", "conv", (3, 3), pads=(1, 1, 1, 1), channels=6),
            Tap("v", "r", "conv", (1, 1), channels=6)]
    x = RNG.standard_normal((5, 3, 8, 8)).astype(np.float32)
    acts = activations(model, ["r"], {"x": x})
    with caplog.at_level(logging.INFO, logger="onnx_alds.calibration"):
        got = collect_moments(model, taps, {"x": x}, batch_size=2, provider="cpu", threads=1)
    assert "capturing 3 taps (2 distinct" in caplog.text
    assert got["q"] is got["k"] and got["v"] is not got["q"]
    for t in taps:
        assert_moments_equal(got[t.name], reference(acts[t.input], t))


def test_a_tap_on_an_existing_graph_output():
    model = two_taps_model()
    x = RNG.standard_normal((4, 3, 8, 8)).astype(np.float32)
    tap = Tap("after", "y2", "conv", (1, 1), channels=4)
    got = collect_moments(model, [tap], {"x": x}, batch_size=3, provider="cpu", threads=1)["after"]
    assert_moments_equal(got, reference(run(model, {"x": x})[0], tap))


def test_activation_of_unknown_size_is_measured(caplog):
    """Shape inference cannot size a Resize by computed scales: its size is measured on one sample."""
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3, 5, 5] x) => (float[N, 4, 10, 10] y) {
        a = Constant <value = float[4] {1.0, 1.0, 1.0, 1.0}> ()
        b = Constant <value = float[4] {0.0, 0.0, 1.0, 1.0}> ()
        scales = Add(a, b)
        u = Resize <mode = "nearest"> (x, , scales)
        y = Conv <pads = [1, 1, 1, 1]> (u, w)
    }"""
    model = onnx.parser.parse_model(text)
    model.graph.initializer.append(numpy_helper.from_array(RNG.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"))
    x = RNG.standard_normal((6, 3, 5, 5)).astype(np.float32)
    tap = Tap("conv", "u", "conv", (3, 3), pads=(1, 1, 1, 1), channels=3)
    u = x.repeat(2, axis=2).repeat(2, axis=3)
    # 3·10·10·4 B = 1200 B per sample: a 2500 B budget holds batches of 2
    with caplog.at_level(logging.DEBUG, logger="onnx_alds.calibration"):
        got = collect_moments(model, [tap], {"x": x}, batch_size=4, provider="cpu", threads=1, max_bytes=2500)
    assert "pass 1 of 1: 1 activations (0.0 MiB) at batch 2" in caplog.text
    assert_moments_equal(got["conv"], reference(u, tap))


def test_fixed_batch_model_uses_its_batch_and_leaves_out_the_rest(caplog):
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3, 6, 6] x) => (float[2, 4, 6, 6] y) {
        r = Relu(x)
        y = Conv <pads = [1, 1, 1, 1]> (r, w)
    }"""
    model = onnx.parser.parse_model(text)
    model.graph.initializer.append(numpy_helper.from_array(RNG.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"))
    x = RNG.standard_normal((5, 3, 6, 6)).astype(np.float32)
    tap = Tap("conv", "r", "conv", (3, 3), pads=(1, 1, 1, 1), channels=3)
    with caplog.at_level(logging.WARNING, logger="onnx_alds.calibration"):
        got = collect_moments(model, [tap], {"x": x}, batch_size=16, provider="cpu", threads=1)["conv"]
    assert "last 1 calibration samples are left out" in caplog.text
    assert_moments_equal(got, reference(np.maximum(x[:4], 0), tap))
    with pytest.raises(UsageError, match="fixed at 2"):
        collect_moments(model, [tap], {"x": x[:1]}, provider="cpu")


def test_covariance_and_mean():
    x = RNG.standard_normal((4, 3, 5, 5)) + 2.0
    tap = Tap("conv", "x", "conv", (2, 2), channels=3)
    p = patches(x, tap)
    m = reference(x, tap)
    np.testing.assert_allclose(m.mean, p.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.covariance(), np.cov(p.T, bias=True), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(m.covariance(centered=False), p.T @ p / len(p), rtol=1e-12)


def test_float32_activations_multiply_in_float32_blocks_float64_ones_exactly(monkeypatch):
    """A float32 activation's moments from float32 products, block by block, are within the float32
    rounding of the float64 ones (the blocks summed in float64); a float64 activation's are float64's."""
    x = (np.random.default_rng(5).standard_normal((64, 8, 12, 12)) + 3.0)  # a mean far from zero
    tap = Tap("conv", "x", "conv", (3, 3), pads=(1, 1, 1, 1), channels=8)
    exact = patches(x.astype(np.float32).astype(np.float64), tap)
    monkeypatch.setattr(cal.moments, "SINGLE_CHUNK", 72 * 4 * 1000)  # blocks of 1,000 patches: 10 of them
    single = cal.accumulate(None, x.astype(np.float32), tap)
    double = cal.accumulate(None, x.astype(np.float32).astype(np.float64), tap)
    assert single.gram.dtype == np.float64 and single.count == len(exact)
    assert rel_err(exact.T @ exact, double.gram) <= 1e-12
    assert 1e-10 < rel_err(exact.T @ exact, single.gram) <= 2e-6  # float32 rounding, not float64's
    np.testing.assert_allclose(single.covariance(), np.cov(exact.T, bias=True), rtol=1e-4, atol=1e-5)
    # a mean far larger than the spread (1,000 ± 0.01): the blocks are shifted by their means before the
    # float32 product, so the covariance survives (unshifted float32 sums are off by 1,000× its size)
    far = (1000 + 0.01 * np.random.default_rng(6).standard_normal((64, 8, 12, 12))).astype(np.float32)
    ref = np.cov(patches(far.astype(np.float64), tap).T, bias=True)
    got = cal.accumulate(None, far, tap).covariance()
    assert np.abs(got - ref).max() <= 1e-3 * np.abs(np.diag(ref)).max()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_patch_blocks_are_new_arrays(dtype):
    """Moments shift float32 blocks in place: a block must never be a view of the activation, even
    where its layout would allow one (one channel, a 1×1 kernel, no padding; a linear tap)."""
    x = np.random.default_rng(7).standard_normal((3, 1, 4, 5)).astype(np.float32)
    for tap, a in ((Tap("c", "x", "conv", (1, 1), channels=1), x),
                   (Tap("l", "x", "linear", channels=5, spatial_rank=0), x.reshape(12, 5))):
        for block in cal.iter_patches(a, tap, dtype=dtype):
            assert not np.shares_memory(block, a)


def test_iter_batches_rebatches_a_stream():
    spec = {"x": (np.dtype(np.float32), ["N", 2])}
    feeds = [{"x": np.full((n, 2), i, np.float32)} for i, n in enumerate((1, 4, 2, 6))]
    stream = load_calibration(feeds, spec)
    batches = list(iter_batches(stream, 5))
    assert [len(b["x"]) for b in batches] == [5, 5, 3]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]),
                                  np.concatenate([f["x"] for f in feeds]))
    assert stream.samples == 13


# ----------------------------------------------------------------------------- bad calibration data

SPEC = {"image": (np.dtype(np.float32), ["N", 3, 4, 4]), "ids": (np.dtype(np.int64), [None, 7])}


def good(n=5, **over):
    d = {"image": RNG.standard_normal((n, 3, 4, 4)).astype(np.float32), "ids": np.arange(n * 7).reshape(n, 7)}
    d.update(over)
    return {k: v for k, v in d.items() if v is not None}


def _write(tmp_path, kind):
    p = tmp_path / "cal.npz"
    if kind == "missing":
        return tmp_path / "nope.npz"
    if kind == "directory":
        return tmp_path
    if kind == "text":
        p.write_text("not an archive\n")
    elif kind == "npy":
        p = tmp_path / "cal.npy"
        np.save(p, good()["image"])
    elif kind == "pickled":
        np.savez(p, image=good()["image"], ids=np.array([{"a": 1}, None], dtype=object))
    elif kind == "truncated":
        np.savez(p, **good())
        p.write_bytes(p.read_bytes()[:200])
    return p


BAD_FILES = {  # kind → words the message must hold
    "missing": ("nope.npz", "does not exist"),
    "directory": ("is not a file",),
    "text": ("cal.npz", "could not be read as an .npz"),
    "npy": ("cal.npy", "not an .npz"),
    "pickled": ("'ids'", "pickled"),
    "truncated": ("cal.npz",),
}

BAD_ARRAYS = {  # case → (source, words the message must hold)
    "missing_input": (lambda: good(ids=None), ("'ids'", "no array")),
    "unknown_input": (lambda: good(mask=np.ones((5, 7))), ("'mask'", "not an input")),
    "wrong_rank": (lambda: good(image=np.zeros((5, 3, 4), np.float32)), ("'image'", "rank 4")),
    "fixed_dim": (lambda: good(image=np.zeros((5, 3, 4, 5), np.float32)), ("'image'", "axis 3", "needs 4")),
    "strings": (lambda: good(ids=np.full((5, 7), "a")), ("'ids'", "dtype <U1", "cannot be cast")),
    "float_to_int": (lambda: good(ids=np.zeros((5, 7))), ("'ids'", "float64", "int64")),
    "complex": (lambda: good(image=np.zeros((5, 3, 4, 4), np.complex64)), ("'image'", "complex64")),
    "objects": (lambda: good(ids=np.array([[1] * 7] * 4 + [[None] * 7], dtype=object)), ("'ids'", "objects")),
    "sample_counts": (lambda: good(ids=np.zeros((6, 7), np.int64)), ("image: 5", "ids: 6", "different numbers")),
    "zero_samples": (lambda: good(n=0), ("'image'", "no samples")),
    "nan": (lambda: good(image=np.full((5, 3, 4, 4), np.nan, np.float32)), ("'image'", "NaN or Inf")),
    "inf": (lambda: good(image=np.full((5, 3, 4, 4), -np.inf)), ("'image'", "NaN or Inf")),
    "overflow_in_cast": (lambda: good(image=np.full((5, 3, 4, 4), 1e300)), ("'image'", "after the cast")),
    "bad_feed_in_stream": (lambda: [good(), good(image=np.full((2, 3, 4, 4), np.nan, np.float32))],
                           ("'image'", "calibration feed 1", "NaN or Inf")),
    "not_a_dict_feed": (lambda: [good(), [1, 2]], ("calibration feed 1", "not a dict")),
    "empty_stream": (lambda: [], ("no samples",)),
    "not_a_source": (lambda: 42, ("int",)),
}


def assert_one_sentence(err: UsageError, words):
    msg = str(err)
    assert "\n" not in msg and ". " not in msg.rstrip("."), msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_calibration_file_is_one_sentence(kind, tmp_path):
    with pytest.raises(UsageError) as e:
        load_calibration(_write(tmp_path, kind), SPEC)
    assert_one_sentence(e.value, BAD_FILES[kind])


@pytest.mark.parametrize("case", BAD_ARRAYS)
def test_bad_calibration_arrays_are_one_sentence(case):
    make, words = BAD_ARRAYS[case]
    with pytest.raises(UsageError) as e:
        got = load_calibration(make(), SPEC)
        list(iter_batches(got, 4))  # a stream is checked as it is read
    assert_one_sentence(e.value, words)


def test_safe_casts_are_accepted():
    got = load_calibration(good(image=np.zeros((5, 3, 4, 4)), ids=np.ones((5, 7), np.int32)), SPEC)
    assert got["image"].dtype == np.float32 and got["ids"].dtype == np.int64
    with pytest.raises(UsageError, match="'ids'"):  # a name missing from one feed of a stream, too
        list(iter_batches(load_calibration([good(), good(ids=None)], SPEC), 4))
