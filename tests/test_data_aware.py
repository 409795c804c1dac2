"""Error models and data-aware factors: what each error model predicts against
what the emitted factors really do, on real onnxruntime runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnx_alds
from graphs import conv_model, gemm_model, run
from onnx_alds.errors import UsageError, ValidationFailed
from onnx_alds.plan import LayerPlan, Plan

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "resnet20_digits.onnx"


def correlated_inputs(n, c, hw, seed=0, dead=(), constant=()):
    """Inputs with correlated channels (a low-rank mix), dead and constant channels."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 2, *hw))
    mix = rng.standard_normal((c, 2))
    x = np.einsum("cz,nz...->nc...", mix, z) + 0.05 * rng.standard_normal((n, c, *hw)) + 0.7
    for ch in dead:
        x[:, ch] = 0.0
    for ch in constant:
        x[:, ch] = 1.5
    return x.astype(np.float32)


def output_error(model, new, feeds, bias=None):
    """‖ΔY‖_F / ‖WX‖_F measured through onnxruntime (WX = Y − bias)."""
    y0, y1 = run(model, feeds)[0].astype(np.float64), run(new, feeds)[0].astype(np.float64)
    wx = y0 if bias is None else y0 - bias.reshape((1, -1) + (1,) * (y0.ndim - 2))
    return float(np.linalg.norm(y1 - y0) / np.linalg.norm(wx))


@pytest.mark.parametrize("k,bias", [(1, False), (2, True), (3, False)])
def test_sequential_fit_measures_its_real_output_error(k, bias):
    """The sequential fit's measured error (the output energy less its mean's, the fit's W C reused)
    is the output error onnxruntime sees; inputs with a mean far from zero, as after a ReLU."""
    model = conv_model(f=8, c=6, kernel=(3, 3), in_hw=(9, 11), pads=(1, 1, 1, 1), bias=bias, spectrum_decay=0.8)
    x = correlated_inputs(40, 6, (9, 11), seed=3)
    plan = Plan([LayerPlan("conv", "conv.weight", k, "s0", 3)])
    new, rep = onnx_alds.rewrite(model, plan=plan, calibration={"x": x}, error="data", validate=False,
                                 hold_out=False, sequential=True)
    assert rep.budget.get("sequential") is True
    b = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "conv.bias")) \
        if bias else None
    measured = output_error(model, new, {"x": x}, bias=b)
    assert rep.layers[0].measured_error == pytest.approx(measured, rel=1e-4)
    assert 0.01 < measured < 1.0


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("kernel,strides,pads", [((3, 3), None, (1, 1, 1, 1)), ((3, 1), (2, 1), (0, 0, 1, 0))])
def test_data_error_equals_output_error_on_calibration_data(k, kernel, strides, pads):
    model = conv_model(f=8, c=6, kernel=kernel, in_hw=(9, 11), strides=strides, pads=pads, bias=False,
                       spectrum_decay=0.8)
    x = correlated_inputs(40, 6, (9, 11))
    plan = Plan([LayerPlan("conv", "conv.weight", k, "s0", 3)])
    new, rep = onnx_alds.rewrite(model, plan=plan, calibration={"x": x}, error="data", validate=False, hold_out=False, sequential=False)
    layer = rep.layers[0]
    measured = output_error(model, new, {"x": x})
    # the formula is exact for every k (cross-group terms included): predicted = measured = onnxruntime
    assert layer.rel_error == pytest.approx(measured, rel=2e-3)
    assert layer.measured_error == pytest.approx(measured, rel=1e-4)
    assert 0.01 < measured < 1.0


def test_data_aware_factors_beat_weight_only_on_the_data():
    model = conv_model(f=8, c=6, kernel=(3, 3), in_hw=(9, 11), pads=(1, 1, 1, 1), bias=True, spectrum_decay=0.85)
    x = correlated_inputs(40, 6, (9, 11))
    bias = onnx.numpy_helper.to_array(model.graph.initializer[1])
    plan = Plan([LayerPlan("conv", "conv.weight", 1, "s0", 2)])
    data, _ = onnx_alds.rewrite(model, plan=plan, calibration={"x": x}, error="data", validate=False, hold_out=False, sequential=False)
    weight, _ = onnx_alds.rewrite(model, plan=plan, error="spectral", validate=False)
    no_bias_fix, _ = onnx_alds.rewrite(model, plan=plan, calibration={"x": x}, error="data", validate=False, hold_out=False,
                                       bias_correction=False, sequential=False)
    e_data, e_weight = output_error(model, data, {"x": x}, bias), output_error(model, weight, {"x": x}, bias)
    e_nofix = output_error(model, no_bias_fix, {"x": x}, bias)
    assert e_data < e_nofix < e_weight
    # the bias correction removes the mean output shift on the calibration data
    d = run(data, {"x": x})[0].astype(np.float64) - run(model, {"x": x})[0].astype(np.float64)
    assert np.abs(d.mean(axis=(0, 2, 3))).max() < 1e-4 * np.abs(d).mean() + 1e-6


def test_rank_deficient_statistics_are_regularised():
    """Dead and constant input channels make the patch covariance singular:
    the factors stay finite and the prediction still matches onnxruntime."""
    model = conv_model(f=8, c=6, kernel=(3, 3), in_hw=(7, 7), pads=(1, 1, 1, 1), bias=False, spectrum_decay=0.9)
    x = correlated_inputs(30, 6, (7, 7), dead=(0, 1), constant=(2,))
    plan = Plan([LayerPlan("conv", "conv.weight", 2, "s0", 2)])
    new, rep = onnx_alds.rewrite(model, plan=plan, calibration={"x": x}, error="data", validate=False, hold_out=False, sequential=False)
    assert all(np.isfinite(onnx.numpy_helper.to_array(t)).all() for t in new.graph.initializer)
    measured = output_error(model, new, {"x": x})
    assert rep.layers[0].rel_error == pytest.approx(measured, rel=1e-2, abs=1e-4)
    # a group whose inputs are all dead or constant: its rank costs nothing on this data
    assert measured < 1.0


@pytest.mark.parametrize("name,relation", [("paper", "lower"), ("spectral", "upper"), ("frobenius", "exact")])
def test_weight_error_models_relate_to_the_real_error_as_documented(name, relation):
    _, rep = onnx_alds.rewrite(SHIPPED, keep_params=0.5, error=name, validate=False, compare=False,
                               allow_slower=True)
    dec = [l for l in rep.layers if l.status == "decomposed"]
    assert dec and rep.error_model == name and rep.error_bound == relation
    for l in dec:
        if relation == "lower":
            assert l.rel_error <= l.measured_error + 1e-6
        elif relation == "upper":
            assert l.rel_error >= l.measured_error - 1e-6
            if l.k == 1:
                assert l.rel_error == pytest.approx(l.measured_error, rel=1e-4)
        else:
            assert l.rel_error == pytest.approx(l.measured_error, rel=1e-4)
    if relation == "lower":  # the paper's surrogate hides the gap that k > 1 opens
        assert max(l.measured_error for l in dec) > 2 * rep.max_rel_error


def test_baselines_use_the_chosen_error_model():
    _, alds = onnx_alds.rewrite(SHIPPED, keep_params=0.5, method="alds", validate=False, allow_slower=True)
    _, uni = onnx_alds.rewrite(SHIPPED, keep_params=0.5, method="uniform", validate=False, allow_slower=True)
    assert uni.baselines["alds"] == pytest.approx(alds.max_rel_error, rel=1e-9)
    assert alds.baselines["uniform"] == pytest.approx(uni.max_rel_error, rel=1e-9)
    assert alds.max_rel_error <= uni.max_rel_error


def test_streamed_calibration_gives_the_same_model():
    model = conv_model(f=8, c=6, kernel=(3, 3), in_hw=(7, 7), pads=(1, 1, 1, 1), spectrum_decay=0.85)
    x = correlated_inputs(24, 6, (7, 7))
    plan = Plan([LayerPlan("conv", "conv.weight", 2, "s0", 2)])
    a, _ = onnx_alds.rewrite(model, plan=plan, calibration={"x": x}, error="data", validate=False, hold_out=False, sequential=False)
    b, _ = onnx_alds.rewrite(model, plan=plan, calibration=[{"x": x[i:i + 5]} for i in range(0, 24, 5)],
                             error="data", validate=False, hold_out=False, sequential=False)
    for ta, tb in zip(a.graph.initializer, b.graph.initializer):
        np.testing.assert_allclose(onnx.numpy_helper.to_array(ta), onnx.numpy_helper.to_array(tb),
                                   rtol=1e-5, atol=1e-6)


def test_gemm_data_aware_bias_correction():
    model = gemm_model(f=7, c=12, trans_b=1, alpha=0.5, beta=2.0, bias=True)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 3)) @ rng.standard_normal((3, 12)) + 1.0).astype(np.float32)
    plan = Plan([LayerPlan("fc", "fc.weight", 1, "s0", 2)])
    new, rep = onnx_alds.rewrite(model, plan=plan, calibration={"x": x}, error="data", validate=False, hold_out=False, sequential=False)
    y0, y1 = run(model, {"x": x})[0], run(new, {"x": x})[0]
    assert np.abs((y1 - y0).mean(0)).max() < 1e-4
    assert rep.layers[0].measured_error == pytest.approx(rep.layers[0].rel_error, rel=1e-3)


def test_validation_runs_on_calibration_data_and_reports_top1():
    x = np.random.default_rng(0).standard_normal((20, 1, 16, 16)).astype(np.float32)
    new, rep = onnx_alds.rewrite(SHIPPED, keep_params=0.7, calibration={"input": x}, provider="cpu", compare=False)
    v = rep.validation
    # a quarter of the 20 images is held back from fitting and judges the rewrite
    held = x[15:]
    assert v["data"] == "calibration" and v["batch"] == 5 and v["inputs"]["input"]["shape"] == [5, 1, 16, 16]
    assert rep.budget["validation_inputs"] == "5 held-out calibration samples"
    # the reported agreement is the one of these 5 images (a near-tie may flip one of them)
    agree = float(np.mean(run(onnx.load(str(SHIPPED)), {"input": held})[0].argmax(1)
                          == run(new, {"input": held})[0].argmax(1)))
    assert abs(v["top1_agreement"] - agree) <= 1 / 5 and "top1_agreement" in v["outputs"]["logits"]
    _, fitted_on = onnx_alds.rewrite(SHIPPED, keep_params=0.7, calibration={"input": x}, provider="cpu", compare=False,
                                     hold_out=False)
    assert fitted_on.validation["batch"] == 20 and "also fitted on" in fitted_on.budget["validation_inputs"]
    assert rep.error_model == "data"


def test_gate_refuses_and_the_api_raises():
    x = np.random.default_rng(0).standard_normal((8, 1, 16, 16)).astype(np.float32)
    with pytest.raises(ValidationFailed, match="exceeds --max-output-error"):
        onnx_alds.rewrite(SHIPPED, keep_params=0.5, calibration={"input": x}, max_output_error=1e-6,
                          provider="cpu", compare=False)
    with pytest.raises(UsageError, match="need validation"):
        onnx_alds.rewrite(SHIPPED, keep_params=0.5, max_output_error=0.1, validate=False)


def cli(*args):
    p = subprocess.run([sys.executable, "-m", "onnx_alds.cli", *map(str, args)], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def test_cli_gate_exit_5_writes_nothing_and_warning_without_gate(tmp_path):
    cal = tmp_path / "cal.npz"
    np.savez(cal, input=np.random.default_rng(0).standard_normal((8, 1, 16, 16)).astype(np.float32))
    out = tmp_path / "o.onnx"
    rc, _, err = cli("rewrite", SHIPPED, out, "--keep-params", "0.3", "--calibration", cal,
                     "--max-output-error", "0.000001", "--provider", "cpu", "--plan", tmp_path / "p.json", "-q")
    assert rc == 5 and "exceeds --max-output-error" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "p.json").exists()
    rc, so, err = cli("rewrite", SHIPPED, out, "--keep-params", "0.3", "--error", "paper", "--allow-slower",
                      "--provider", "cpu")
    assert rc == 0 and out.exists()
    assert "warning: the outputs changed a lot" in err


@pytest.mark.parametrize("bad,message", [
    ({"wrong": np.zeros((4, 1, 16, 16), np.float32)}, "input"),
    ({"input": np.zeros((4, 2, 16, 16), np.float32)}, "input"),
    ({"input": np.zeros((0, 1, 16, 16), np.float32)}, "input"),
    ({"input": np.full((4, 1, 16, 16), np.nan, np.float32)}, "NaN"),
])
def test_cli_bad_calibration_is_exit_2(tmp_path, bad, message):
    cal = tmp_path / "cal.npz"
    np.savez(cal, **bad)
    rc, _, err = cli("rewrite", SHIPPED, tmp_path / "o.onnx", "--calibration", cal, "--provider", "cpu")
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.onnx").exists()


def test_data_plan_carries_its_factors(tmp_path):
    x = np.random.default_rng(0).standard_normal((16, 1, 16, 16)).astype(np.float32)
    new, rep = onnx_alds.rewrite(SHIPPED, keep_params=0.7, calibration={"input": x}, validate=False,
                                 compare=False, allow_slower=True)
    written = rep.plan.save(tmp_path / "plan.json")
    assert [p.name for p in written] == ["plan.json", "plan.factors.npz"]
    assert json.loads((tmp_path / "plan.json").read_text())["factors"]["file"] == "plan.factors.npz"
    again = onnx_alds.apply_plan(SHIPPED, tmp_path / "plan.json")
    assert again.SerializeToString() == new.SerializeToString()
    # a factors file that does not match the plan is refused
    (tmp_path / "plan.factors.npz").write_bytes(b"junk")
    with pytest.raises(UsageError, match="does not match the plan"):
        Plan.load(tmp_path / "plan.json")


def test_sequential_measured_error_is_the_output_error_against_the_original_layer():
    """Two convs: the second is refitted on the compressed first's outputs; its
    reported error is ‖Ỹ − Y‖/‖Y − b‖ through onnxruntime, Y the original
    layer's output on the original inputs."""
    rng = np.random.default_rng(0)
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 6, 9, 9] x) => (float y) {
        h = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (h)
        y = Conv <pads = [1, 1, 1, 1]> (r, w2, b2)
    }"""
    m = onnx.parser.parse_model(text)
    m.graph.node[0].name, m.graph.node[2].name = "c1", "c2"
    decay = lambda f, c: (np.linalg.qr(rng.standard_normal((f, f)))[0] * 0.7 ** np.arange(f)  # noqa: E731
                          @ rng.standard_normal((f, c * 9))).reshape(f, c, 3, 3).astype(np.float32)
    for name, arr in (("w1", decay(8, 6)), ("b1", rng.standard_normal(8).astype(np.float32)),
                      ("w2", decay(8, 8)), ("b2", rng.standard_normal(8).astype(np.float32))):
        m.graph.initializer.append(onnx.numpy_helper.from_array(arr, name))
    x = correlated_inputs(32, 6, (9, 9))
    plan = Plan([LayerPlan("c1", "w1", 1, "s0", 2), LayerPlan("c2", "w2", 1, "s0", 2)])
    new, rep = onnx_alds.rewrite(m, plan=plan, calibration={"x": x}, error="data", validate=False, hold_out=False, sequential=True)
    assert rep.budget["sequential"]
    y0, y1 = run(m, {"x": x})[0].astype(np.float64), run(new, {"x": x})[0].astype(np.float64)
    b2 = onnx.numpy_helper.to_array(m.graph.initializer[3]).reshape(1, -1, 1, 1)
    got = float(np.linalg.norm(y1 - y0) / np.linalg.norm(y0 - b2))
    assert {l.name: l for l in rep.layers}["c2"].measured_error == pytest.approx(got, rel=1e-3)
    # and refitting on the compressed inputs beats fitting each layer on its original inputs
    plain, _ = onnx_alds.rewrite(m, plan=plan, calibration={"x": x}, error="data", validate=False, hold_out=False, sequential=False)
    y2 = run(plain, {"x": x})[0].astype(np.float64)
    assert np.linalg.norm(y1 - y0) < np.linalg.norm(y2 - y0)


def test_bias_correction_parameters_count_in_the_budget():
    """A MatMul without bias gets one from the bias correction: the parameter
    budget still holds."""
    from graphs import matmul_model

    model = matmul_model(f=24, c=32, lead=(6,))
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((40, 6, 3)) @ rng.standard_normal((3, 32)) + 0.5).astype(np.float32)
    for keep in (0.8, 0.6, 0.4):
        new, rep = onnx_alds.rewrite(model, keep_params=keep, calibration={"x": x}, validate=False,
                                     compare=False, allow_slower=True)
        assert rep.layers[0].status == "decomposed"
        assert any(n.op_type == "Add" for n in new.graph.node)  # the correction is there
        assert rep.params_after <= keep * rep.params_before


@pytest.mark.parametrize("name", ["data", "spectral"])
def test_curves_are_computed_once_per_layer_and_configurations(name):
    """The rewrite's retries select again on the same weights: the second call reuses the curves."""
    from onnx_alds import api
    from onnx_alds.error_model import error_model
    from onnx_alds.select import layer_configs

    model = conv_model(f=8, c=6, kernel=(3, 3), pads=(1, 1, 1, 1))
    source, info = api.analyze(model)[1:]
    cal = {"x": correlated_inputs(16, 6, (9, 11))}
    moments = api.calibrate(source, info, cal)[1] if name == "data" else None
    em = error_model(name, moments=moments)
    configs = {l.name: [c for c in cs if em.offers(l, *c)]
               for l, cs in zip(info.candidates, layer_configs(info.candidates).values())}
    first = em.curves(source, info.candidates, configs)
    again = em.curves(source, info.candidates, configs)
    assert all(again[n][c] is first[n][c] for n in first for c in first[n])
    fewer = {n: cs[:1] for n, cs in configs.items()}  # a subset (the candidates of s0 alone): from the memo
    other = em.curves(source, info.candidates, fewer)
    for n, cs in fewer.items():
        assert set(other[n]) == {cs[0]} and other[n][cs[0]] is first[n][cs[0]]
    fresh = error_model(name, moments=moments)  # computed alone: the same values
    alone = fresh.curves(source, info.candidates, fewer)
    for n, cs in fewer.items():
        np.testing.assert_allclose(alone[n][cs[0]], first[n][cs[0]])


def _best(entries: list, samples: int, prefix: str = "") -> int:
    """What 'best' means for a classifier's builds, from the report's figures (validate.best_judged)."""
    from onnx_alds.validate import Validation, best_judged

    return best_judged([(Validation(provider="cpu", max_abs_diff=0.0, rel_l2=e[prefix + "rel_l2"], batch=samples,
                                    top1_agreement=e[prefix + "top1_agreement"]), None) for e in entries])


def test_best_objective_keeps_the_candidate_the_user_would_pick():
    """With calibration data the default objective is 'best': the min-max, min-sum and uniform plans
    are each built (one-shot factors) and run on the held-out calibration inputs, and the kept one is
    the best of them as a classifier's user judges it (the fewest top-1 changes, then the lowest
    relative L2; the shipped model's output is class scores); the plan picked is refitted
    sequentially (one sweep) and the refit kept only where it does no worse by the same rule; the
    final validation (same inputs, same build) measures the kept build's error again."""
    from models.data import load_digits_split
    from onnx_alds.pipeline.candidates import label

    x = load_digits_split(16)[0][:64].numpy()
    new, rep = onnx_alds.rewrite(SHIPPED, keep_params=0.5, calibration={"input": x}, provider="cpu",
                                 allow_slower=True)
    b = rep.budget
    assert b["objective"] == "best" and len(b["candidates"]) == 5
    # the plans of s0 alone compete too: its convs can fold other ways, measured on the data as well
    assert [(c["method"], c["objective"], c.get("schemes")) for c in b["candidates"]] == [
        ("alds", "max", None), ("alds", "sum", None), ("uniform", "max", None), ("alds", "max", ["s0"]),
        ("alds", "sum", ["s0"])]
    assert all(0 <= c["top1_agreement"] <= 1 for c in b["candidates"])
    best = b["candidates"][_best(b["candidates"], 16)]  # a quarter of the 64 samples is held out
    assert label(best["method"], best["objective"], best.get("schemes")) == b["picked"]
    refit = b["sequential_refit"]  # 64 samples of the shipped model: the sweep is cheap, so it is due
    assert refit["one_shot_rel_l2"] == best["rel_l2"]
    assert refit["one_shot_top1_agreement"] == best["top1_agreement"]
    kept = "sequential_" if refit["kept"] == "sequential" else "one_shot_"
    assert b["sequential"] == (kept == "sequential_")
    # the refit is kept where it does no worse than the one-shot factors (first of equals)
    pair = [{k[len(p):]: v for k, v in refit.items() if k.startswith(p)} for p in ("sequential_", "one_shot_")]
    assert _best(pair, 16) == (0 if kept == "sequential_" else 1)
    assert rep.validation["rel_l2"] == pytest.approx(refit[kept + "rel_l2"], rel=1e-4)
    assert rep.validation["top1_agreement"] == pytest.approx(refit[kept + "top1_agreement"])
    assert rep.params_after <= 0.5 * rep.params_before + 1
    assert rep.plan.budget["picked"] == b["picked"]
    _, plain = onnx_alds.rewrite(SHIPPED, keep_params=0.5, provider="cpu", validate=False, compare=False,
                                 allow_slower=True)
    assert plain.budget["objective"] == "max"  # no calibration data to judge candidates by


def test_the_best_build_is_the_metric_then_top1_beyond_noise_then_the_error():
    """The rule every choice between judged builds uses (candidates, the refit, the default search)."""
    from onnx_alds.validate import Validation, best_judged, top1_margin

    def v(rel, top1=None, n=256):
        return Validation(provider="cpu", max_abs_diff=0.0, rel_l2=rel, top1_agreement=top1, batch=n), None

    # a lower logit error that changes many more answers is worse for a classifier (patch_vit, keep 0.15)
    assert best_judged([v(0.99, 0.11), v(1.07, 0.24)]) == 1
    # near chance a point of agreement on 256 samples is noise: the error decides (mobilenet, keep 0.15)
    assert best_judged([v(0.98, 0.094), v(0.99, 0.105)]) == 0
    # the same difference measured on 10,000 samples is not noise
    assert best_judged([v(0.98, 0.094, 10_000), v(0.99, 0.125, 10_000)]) == 1
    assert best_judged([v(0.3, 0.9), v(0.2, 0.9)]) == 1  # same answers: the lower error
    assert best_judged([v(0.3), v(0.2)]) == 1  # maps, embeddings: the error alone
    assert best_judged([v(0.2), v(0.2)]) == 0  # first of equals
    (a, _), (b, _) = v(0.5, 0.5), v(0.1, 1.0)
    assert best_judged([(a, 80.0), (b, 79.0)]) == 0  # the user's metric first
    assert top1_margin(0.5, 100) > top1_margin(0.5, 10_000) > 0 and top1_margin(1.0, 100) == 0.01


def test_best_objective_needs_calibration_data():
    with pytest.raises(UsageError, match="calibration"):
        onnx_alds.rewrite(SHIPPED, keep_params=0.5, objective="best", validate=False)


def _two_branches(scale_b: float):
    """y = x A + scale_b · x B: two MatMuls with the same spectrum (B is A with its columns permuted),
    one of which barely reaches the output."""
    from onnx import numpy_helper, parser

    rng = np.random.default_rng(0)
    a = (rng.standard_normal((32, 32)) * np.linspace(1.0, 0.05, 32)).astype(np.float32)
    b = np.ascontiguousarray(a[:, rng.permutation(32)])
    m = parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 32] x) => (float[N, 32] y) {{
            ya = MatMul (x, a_weight)
            yb = MatMul (x, b_weight)
            s = Constant <value = float {{{scale_b}}}> ()
            ybs = Mul (yb, s)
            y = Add (ya, ybs)
        }}""")
    m.graph.initializer.extend([numpy_helper.from_array(a, "a_weight"), numpy_helper.from_array(b, "b_weight")])
    return m


@pytest.mark.parametrize("constants", [False, True])
def test_sensitivity_spares_the_layer_the_output_depends_on(constants):
    """Two layers alike but for how much of them reaches the output (1 against 0.02): plain min-max
    gives them the same rank; with ``sensitivity`` the quiet one gives up rank to the loud one, and
    the output error at the same budget is smaller.  ``constants``: the weights are Constant nodes
    (paddle2onnx), which the probes take as initializers."""
    m = _two_branches(0.02)
    if constants:
        consts = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in m.graph.initializer]
        del m.graph.initializer[:]
        nodes = list(m.graph.node)
        del m.graph.node[:]
        m.graph.node.extend(consts + nodes)
    x = {"x": np.random.default_rng(1).standard_normal((256, 32)).astype(np.float32)}
    ranks, errors = {}, {}
    for sens in (False, True):
        new, rep = onnx_alds.rewrite(m, keep_params=0.5, calibration=x, sensitivity=sens, allow_slower=True,
                                     validate=False, compare=False, objective="max", sequential=False)
        ranks[sens] = {l.name: l.rank for l in rep.layers if l.status == "decomposed"}
        test = {"x": np.random.default_rng(2).standard_normal((64, 32)).astype(np.float32)}
        y, y_new = run(m, test)[0], run(new, test)[0]
        errors[sens] = np.linalg.norm(y_new - y) / np.linalg.norm(y)
    (a0, b0), (a1, b1) = (sorted(r.items()) for r in (ranks[False], ranks[True]))
    assert abs(a0[1] - b0[1]) <= 1  # alike without it
    assert a1[1] > a0[1] and b1[1] < b0[1]  # the loud layer keeps more rank with it
    assert errors[True] < 0.8 * errors[False]


def test_sensitivity_needs_data():
    with pytest.raises(UsageError, match="--sensitivity"):
        onnx_alds.rewrite(_two_branches(0.02), keep_params=0.5, sensitivity=True, validate=False)


def test_sensitivity_weighs_predictions_and_measurements_alike():
    """With ``sensitivity`` the report's predicted and measured errors are both weighted (the
    sequential refit's measurements too): they stay comparable, layer by layer."""
    m = _two_branches(0.02)
    x = {"x": np.random.default_rng(1).standard_normal((256, 32)).astype(np.float32)}
    for seq in (False, True):
        _, rep = onnx_alds.rewrite(m, keep_params=0.5, calibration=x, sensitivity=True, allow_slower=True,
                                   validate=False, compare=False, objective="max", sequential=seq)
        for l in rep.layers:
            if l.status == "decomposed":
                assert l.measured_error == pytest.approx(l.rel_error, rel=0.25 if seq else 1e-3), (seq, l.name)
