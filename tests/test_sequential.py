"""Sequential calibration in one sweep: the same factors as refitting layer by
layer on whole models, at the cost of about one forward pass per side."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest

import onnx_alds
from graphs import run
from onnx_alds import runtime, sequential
from onnx_alds.plan import LayerPlan, Plan

DEPTH = 6


def residual_chain(depth=DEPTH, c=8, seed=0):
    """Convs with a skip connection over every second one (activations that cross cuts) and a Gemm head."""
    rng = np.random.default_rng(seed)
    lines, inits, h = [], {}, "x"
    for i in range(depth):
        w = (np.linalg.qr(rng.standard_normal((c, c)))[0] * 0.8 ** np.arange(c)) @ rng.standard_normal((c, c * 9))
        inits[f"w{i}"] = w.reshape(c, c, 3, 3).astype(np.float32) / 3
        inits[f"b{i}"] = rng.standard_normal(c).astype(np.float32)
        lines.append(f"h{i} = Conv <pads = [1, 1, 1, 1]> ({h}, w{i}, b{i})")
        if i % 2 == 1:
            lines.append(f"s{i} = Add (h{i}, {h_prev})")
            lines.append(f"r{i} = Relu (s{i})")
        else:
            lines.append(f"r{i} = Relu (h{i})")
            h_prev = h  # noqa: F841 - read two convs later, across a cut
        h = f"r{i}"
    inits["fw"] = rng.standard_normal((5, c)).astype(np.float32)
    lines += [f"p = GlobalAveragePool ({h})", "q = Flatten (p)", "y = Gemm <transB = 1> (q, fw)"]
    text = f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, {c}, 6, 6] x) => (float y) {{ {chr(10).join(lines)} }}"""
    m = onnx.parser.parse_model(text)
    convs = [n for n in m.graph.node if n.op_type in ("Conv", "Gemm")]
    for i, n in enumerate(convs):
        n.name = f"c{i}" if n.op_type == "Conv" else "fc"
    m.graph.initializer.extend(onnx.numpy_helper.from_array(a, k) for k, a in inits.items())
    return m


def plan_for(model):
    layers = [LayerPlan(f"c{i}", f"w{i}", 1, "s0", 3) for i in range(DEPTH)]
    return Plan(layers + [LayerPlan("fc", "fw", 1, "s0", 2)])


def capture(monkeypatch):
    """Every session's node count and how many times it ran, through runtime.session."""
    runs = []
    real = runtime.session

    def counting(model, *a, **kw):
        m = onnx.load_from_string(model) if isinstance(model, bytes) else model
        sess = real(model, *a, **kw)
        entry = {"nodes": len(m.graph.node), "runs": 0}
        runs.append(entry)
        run = sess.run

        def counted(*ra, **rk):
            entry["runs"] += 1
            return run(*ra, **rk)

        sess.run = counted
        return sess

    monkeypatch.setattr(runtime, "session", counting)
    return runs


def build(model, x, monkeypatch, refit):
    monkeypatch.setattr("onnx_alds.pipeline.stages.sequential_factors", refit)
    runs = capture(monkeypatch)
    new, rep = onnx_alds.rewrite(model, plan=plan_for(model), calibration={"x": x}, error="data", validate=False, hold_out=False,
                                 sequential=True)
    return new, rep, sum(r["nodes"] * r["runs"] for r in runs)


def test_other_schemes_keep_their_weight_factors_and_get_the_mean_shift_removed(monkeypatch):
    """The refit is s0's: a layer planned in s1, s2 or s3 keeps the weight SVD's factors, and its bias
    ``δ = W μ − Ŵ μ̃`` makes its output's mean over the calibration data, on the compressed prefix's inputs,
    the original layer's; the sweep and the whole-model refit agree on it."""
    from onnx_alds.factorize import weight_factors

    m = residual_chain()
    x = np.random.default_rng(1).standard_normal((40, 8, 6, 6)).astype(np.float32)
    schemes = ["s1", "s0", "s2", "s3", "s1", "s0"]
    plan = Plan([LayerPlan(f"c{i}", f"w{i}", 1, s, 3) for i, s in enumerate(schemes)]
                + [LayerPlan("fc", "fw", 1, "s0", 2)])
    new, rep = onnx_alds.rewrite(m, plan=plan, calibration={"x": x}, error="data", validate=False, hold_out=False,
                                 sequential=True)
    monkeypatch.setattr("onnx_alds.pipeline.stages.sequential_factors", sequential.per_layer_factors)
    _, rep2 = onnx_alds.rewrite(m, plan=plan, calibration={"x": x}, error="data", validate=False, hold_out=False,
                                sequential=True)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    outs = [f"h{i}" for i in range(DEPTH)]
    orig, comp = run(_with_outputs(m, outs), {"x": x})[1:], run(_with_outputs(new, outs), {"x": x})[1:]
    for i, s in enumerate(schemes):
        fac, fac2 = rep.plan.factors[f"c{i}"], rep2.plan.factors[f"c{i}"]
        assert np.allclose(fac.bias_delta, fac2.bias_delta, rtol=1e-4, atol=1e-6)
        if s == "s0":
            continue
        ref = weight_factors(inits[f"w{i}"], 1, s, 3)
        assert np.array_equal(fac.encoder, ref.encoder) and np.array_equal(fac.decoder, ref.decoder)
        want, got = orig[i].mean(axis=(0, 2, 3)), comp[i].mean(axis=(0, 2, 3))
        assert np.allclose(got, want, atol=1e-4 * np.abs(orig[i]).max()), (i, s)
    assert rep.layers[0].measured_error == pytest.approx(rep2.layers[0].measured_error, rel=1e-4)


def _with_outputs(model, names):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for n in names:
        out.graph.output.add().name = n
    return out


def test_sweep_equals_the_per_layer_refit_at_about_one_pass(monkeypatch):
    m = residual_chain()
    x = np.random.default_rng(1).standard_normal((40, 8, 6, 6)).astype(np.float32)
    batches = -(-len(x) // 32)
    sweep, rep, sweep_work = build(m, x, monkeypatch, sequential.sequential_factors)
    per_layer, rep2, per_layer_work = build(m, x, monkeypatch, sequential.per_layer_factors)
    assert rep.budget["sequential"]
    a, b = rep.plan.factors, rep2.plan.factors
    assert set(a) == set(b) == {f"c{i}" for i in range(DEPTH)} | {"fc"}
    for name in a:
        for u, v in ((a[name].encoder, b[name].encoder), (a[name].decoder, b[name].decoder)):
            assert np.linalg.norm(u - v) <= 1e-4 * np.linalg.norm(v)
    for l, l2 in zip(rep.layers, rep2.layers):
        assert l.measured_error == pytest.approx(l2.measured_error, rel=1e-4, abs=1e-7)
    # node executions: the original and the compressed model once each (plus the replacements' extra nodes),
    # against once per layer for the whole-model refit
    n = len(m.graph.node)
    assert sweep_work <= 2 * (n + 2 * (DEPTH + 1)) * batches
    assert per_layer_work >= DEPTH * n * batches


def test_a_cut_that_cannot_be_made_falls_back_to_the_per_layer_refit(monkeypatch, caplog):
    m = residual_chain()
    x = np.random.default_rng(1).standard_normal((16, 8, 6, 6)).astype(np.float32)

    def refuse(*a, **kw):
        raise sequential.Uncuttable("refused for the test")

    monkeypatch.setattr(sequential._Sweep, "__init__", refuse)
    with caplog.at_level(logging.WARNING):
        _, rep, _ = build(m, x, monkeypatch, sequential.sequential_factors)
    assert "cannot be swept: refused for the test" in caplog.text
    _, rep2, _ = build(m, x, monkeypatch, sequential.per_layer_factors)
    for name, f in rep.plan.factors.items():
        assert np.allclose(f.encoder, rep2.plan.factors[name].encoder)


def test_activations_past_max_bytes_go_to_disk(monkeypatch):
    m = residual_chain()
    x = np.random.default_rng(1).standard_normal((40, 8, 6, 6)).astype(np.float32)
    _, rep, _ = build(m, x, monkeypatch, sequential.sequential_factors)

    def small(*a, **kw):
        return sequential.sequential_factors(*a, **dict(kw, max_bytes=1000))

    spilled = []
    real_keep = sequential._Store.keep

    def keep(self, a):
        out = real_keep(self, a)
        spilled.append(isinstance(out, np.memmap))
        return out

    monkeypatch.setattr(sequential._Store, "keep", keep)
    _, rep2, _ = build(m, x, monkeypatch, small)
    assert any(spilled) and not all(spilled)  # some activations on disk, the first ones in memory
    for name, f in rep.plan.factors.items():
        assert np.array_equal(f.encoder, rep2.plan.factors[name].encoder)


@pytest.mark.parametrize("biases", [False, True])
def test_weights_in_constant_nodes_are_swept_like_initializers(monkeypatch, caplog, biases):
    """Exporters such as paddle2onnx give weights as Constant nodes: the sweep takes them as it takes
    initializers (no fallback to the per-layer refit), with the same factors as that refit.  With
    ``biases`` the biases are Constant nodes too, all at the top of the graph as paddle2onnx writes
    them: a later layer's bias then lay in the first segment, reached the emitted decoder as an unknown
    input, and its bias correction made the compressed prefix NaN (PP-OCR's recogniser, exit 1)."""
    m = residual_chain()
    moved = ("w", "b") if biases else ("w",)
    consts = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in m.graph.initializer
              if t.name.startswith(moved)]
    kept = [t for t in m.graph.initializer if not t.name.startswith(moved)]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)
    nodes = list(m.graph.node)
    del m.graph.node[:]
    # Constants between layers too, or (biases) every one at the top
    m.graph.node.extend(consts + nodes if biases else consts[:2] + nodes[:3] + consts[2:] + nodes[3:])
    onnx.checker.check_model(m)
    x = np.random.default_rng(1).standard_normal((40, 8, 6, 6)).astype(np.float32)
    with caplog.at_level(logging.WARNING):
        new, rep, _ = build(m, x, monkeypatch, sequential.sequential_factors)
    assert "cannot be swept" not in caplog.text and rep.budget["sequential"]
    assert np.isfinite(run(new, {"x": x[:4]})[0]).all()
    _, rep2, _ = build(m, x, monkeypatch, sequential.per_layer_factors)
    a, b = rep.plan.factors, rep2.plan.factors
    assert set(a) == set(b) == {f"c{i}" for i in range(DEPTH)} | {"fc"}
    for name in a:
        for u, v in ((a[name].encoder, b[name].encoder), (a[name].decoder, b[name].decoder)):
            assert np.linalg.norm(u - v) <= 1e-4 * np.linalg.norm(v)


def test_a_shape_computation_across_a_cut_is_swept(monkeypatch, caplog):
    """A ViT's position embeddings resized to the image: scalars from Shape/Gather made before one layer,
    read after it by a Concat that gives a Resize its ``sizes``.  The cut declares each tensor's rank
    (onnxruntime refused a segment whose scalar inputs had none, and the sweep fell back to the
    per-layer refit); the factors are the per-layer refit's."""
    rng = np.random.default_rng(0)
    c = 8
    inits = {"w0": rng.standard_normal((c, c, 3, 3)).astype(np.float32) / 3,
             "w1": rng.standard_normal((c, c, 3, 3)).astype(np.float32) / 3,
             "fw": rng.standard_normal((5, c)).astype(np.float32),
             "i2": np.array(2, np.int64), "lo": np.array([0], np.int64), "hi": np.array([2], np.int64),
             "two": np.array(2, np.int64), "ax": np.array([0], np.int64)}
    text = f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, {c}, 6, 6] x) => (float y) {{
        s = Shape (x)
        h = Gather <axis = 0> (s, i2)
        nc = Slice (s, lo, hi)
        h0 = Conv <pads = [1, 1, 1, 1]> (x, w0)
        r0 = Relu (h0)
        h2 = Mul (h, two)
        hu = Unsqueeze (h2, ax)
        sizes = Concat <axis = 0> (nc, hu, hu)
        up = Resize <mode = "nearest"> (r0, , , sizes)
        h1 = Conv <pads = [1, 1, 1, 1]> (up, w1)
        r1 = Relu (h1)
        p = GlobalAveragePool (r1)
        q = Flatten (p)
        y = Gemm <transB = 1> (q, fw)
    }}"""
    m = onnx.parser.parse_model(text)
    names = iter(["c0", "c1"])
    for n in m.graph.node:
        if n.op_type in ("Conv", "Gemm"):
            n.name = next(names) if n.op_type == "Conv" else "fc"
    m.graph.initializer.extend(onnx.numpy_helper.from_array(a, k) for k, a in inits.items())
    onnx.checker.check_model(m)
    plan = Plan([LayerPlan("c0", "w0", 1, "s0", 3), LayerPlan("c1", "w1", 1, "s0", 3), LayerPlan("fc", "fw", 1, "s0", 2)])
    x = np.random.default_rng(1).standard_normal((40, c, 6, 6)).astype(np.float32)
    factors = []
    for refit in (sequential.sequential_factors, sequential.per_layer_factors):
        monkeypatch.setattr("onnx_alds.pipeline.stages.sequential_factors", refit)
        with caplog.at_level(logging.WARNING):
            _, rep = onnx_alds.rewrite(m, plan=plan, calibration={"x": x}, error="data", validate=False,
                                       hold_out=False, sequential=True)
        factors.append(rep.plan.factors)
    assert "cannot be swept" not in caplog.text
    a, b = factors
    assert set(a) == set(b) == {"c0", "c1", "fc"}
    for name in a:
        for u, v in ((a[name].encoder, b[name].encoder), (a[name].decoder, b[name].decoder)):
            assert np.linalg.norm(u - v) <= 1e-4 * np.linalg.norm(v)
