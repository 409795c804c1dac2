"""The default budget (none given) and the ways users hand over their data: the smallest plan within
the output tolerance, judged on held-out samples; data-loader scripts; output kinds; input shapes."""

import json

import numpy as np
import onnx
import pytest

import onnx_alds
from clitools import assert_one_sentence, cli
from graphs import cnn_model, run
from onnx_alds.errors import UsageError
from onnx_alds.policy.error_bounded import TOP1_AGREEMENT


def calibration(n=48, seed=1):
    return {"x": np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)}


def worst_rel_l2(model, new, feeds) -> float:
    a, b = run(model, feeds)[0].astype(np.float64), run(new, feeds)[0].astype(np.float64)
    return float(np.linalg.norm(b - a) / np.linalg.norm(a))


@pytest.mark.parametrize("tolerance", [0.05, 0.2])
def test_the_default_keeps_the_held_out_outputs_within_the_tolerance(tolerance):
    """No budget: the kept fraction is the smallest the search found whose outputs on the held-out
    quarter stay within the tolerance; a looser tolerance never keeps more parameters."""
    model, cal = cnn_model(), calibration()
    new, rep = onnx_alds.rewrite(model, calibration=cal, max_output_error=tolerance, provider="cpu",
                                 allow_slower=True, compare=False)
    d = rep.budget["default"]
    assert d["tolerance"] == tolerance and d["judged_on"] == "12 held-out calibration samples"
    held = {"x": cal["x"][36:]}
    err = worst_rel_l2(model, new, held)
    assert err <= tolerance + 1e-6 and rep.validation["rel_l2"] == pytest.approx(err, rel=1e-3, abs=1e-6)
    within = [f for f, e, top1 in d["tried"] if e <= tolerance and (top1 is None or top1 >= TOP1_AGREEMENT)]
    assert d["kept"] == (min(within) if within else 1.0)
    if within:  # the search found something: the model is compressed, at the fraction it reports
        assert rep.params_after < rep.params_before
    if tolerance == 0.2:
        _, strict = onnx_alds.rewrite(model, calibration=cal, max_output_error=0.05, provider="cpu",
                                      allow_slower=True, compare=False)
        assert strict.params_after >= rep.params_after


def test_nothing_within_the_tolerance_writes_the_model_unchanged_and_says_why():
    model = cnn_model()
    new, rep = onnx_alds.rewrite(model, calibration=calibration(), max_output_error=1e-9, provider="cpu",
                                 allow_slower=True, compare=False)
    assert rep.budget["unchanged"] and rep.budget["default"]["kept"] == 1.0
    assert all(l.status != "decomposed" for l in rep.layers)
    assert any("past relative L2 1e-09" in w for w in rep.warnings)
    x = calibration()["x"][:4]
    np.testing.assert_allclose(run(new, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-6, atol=1e-6)


def test_without_data_the_default_writes_the_model_unchanged_and_names_calibration(tmp_path):
    """Random inputs say too little of a real model: without data and without a tolerance the plain
    command writes the model unchanged (exit 0) and its warning names --calibration."""
    src = tmp_path / "m.onnx"
    onnx.save(cnn_model(), src)
    rc, _, err = cli("rewrite", src, tmp_path / "o.onnx", "--report", tmp_path / "r.json", "--provider", "cpu", "-q")
    assert rc == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["budget"]["default"]["judged_on"] == "no calibration data" and rep["params_after"] == rep["params_before"]
    assert "--calibration CAL.npz" in err and "written unchanged" in err
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(run(onnx.load(str(tmp_path / "o.onnx")), {"x": x})[0], run(cnn_model(), {"x": x})[0])


def test_without_data_a_named_tolerance_is_judged_on_random_inputs():
    model = cnn_model()
    new, rep = onnx_alds.rewrite(model, max_output_error=0.3, provider="cpu", allow_slower=True, compare=False)
    d = rep.budget["default"]
    assert d["judged_on"] == "random inputs" and d["tolerance"] == 0.3 and d["tried"]
    assert rep.validation["rel_l2"] <= 0.3 + 1e-6
    assert any("judged the outputs on random inputs" in w for w in rep.warnings)


def test_a_named_budget_is_met_and_not_searched():
    _, rep = onnx_alds.rewrite(cnn_model(), keep_params=0.6, calibration=calibration(), provider="cpu",
                               allow_slower=True, compare=False)
    assert "default" not in rep.budget and rep.params_after <= 0.6 * rep.params_before


def test_a_data_loader_script_feeds_rewrite_like_the_arrays(tmp_path):
    model, cal = cnn_model(), calibration(n=24)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    np.savez(tmp_path / "cal.npz", **cal)
    (tmp_path / "loader.py").write_text(
        "import numpy as np\n"
        "def batches():\n"
        f"    x = np.load({str(tmp_path / 'cal.npz')!r})['x']\n"
        "    for i in range(0, len(x), 5):\n"
        "        yield {'x': x[i:i + 5]}\n")
    common = ["--keep-params", "0.5", "--no-hold-out", "--provider", "cpu", "--allow-slower", "--no-compare", "-q"]
    plans = []
    for how in (["--calibration", tmp_path / "cal.npz"], ["--data-loader-script", f"{tmp_path / 'loader.py'}:batches"]):
        rc, _, err = cli("rewrite", src, tmp_path / "o.onnx", *how, "--report", tmp_path / "r.json", *common)
        assert rc == 0, err
        rep = json.loads((tmp_path / "r.json").read_text())
        plans.append([(l["name"], l["k"], l["scheme"], l["rank"]) for l in rep["layers"] if l["status"] == "decomposed"])
        assert rep["error_model"] == "data"
    assert plans[0] == plans[1] and plans[0]


@pytest.mark.parametrize("script, says", [("loader.txt", "not a Python file"), ("loader.py:nothing", "no function"),
                                          ("broken.py", "failed to import")])
def test_a_bad_data_loader_script_is_one_sentence(tmp_path, script, says):
    src = tmp_path / "m.onnx"
    onnx.save(cnn_model(), src)
    (tmp_path / "loader.txt").write_text("x")
    (tmp_path / "loader.py").write_text("def load_data():\n    return []\n")
    (tmp_path / "broken.py").write_text("import no_such_module_here\n")
    rc, _, err = cli("rewrite", src, tmp_path / "o.onnx", "--data-loader-script", tmp_path / script, "--keep-params",
                     "0.5")
    assert rc == 2 and says in err
    assert_one_sentence(err)
    assert not (tmp_path / "o.onnx").exists()


def test_output_kinds_judge_an_embedding_by_cosine():
    model, cal = cnn_model(), calibration()
    new, rep = onnx_alds.rewrite(model, keep_params=0.5, calibration=cal, provider="cpu", allow_slower=True,
                                 compare=False, output_kinds={"logits": "embedding"})
    out = rep.validation["outputs"]["logits"]
    assert out["kind"] == "embedding" and "top1_agreement" not in out and rep.validation["top1_agreement"] is None
    held = {"x": cal["x"][36:]}
    a, b = run(model, held)[0].astype(np.float64), run(new, held)[0].astype(np.float64)
    cosine = np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
    assert out["cosine"] == pytest.approx(cosine, rel=1e-6) and out["cosine"] < 1.0
    _, scores = onnx_alds.rewrite(model, keep_params=0.5, calibration=cal, provider="cpu", allow_slower=True,
                                  compare=False)
    assert scores.validation["outputs"]["logits"]["kind"] == "scores"  # (N, 10) floats: class scores by default
    with pytest.raises(UsageError, match="output kind"):
        onnx_alds.rewrite(model, keep_params=0.5, output_kinds={"logits": "pixels"})


def test_input_shapes_after_one_flag_and_against_the_data(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(cnn_model(), src)
    np.savez(tmp_path / "cal.npz", x=np.zeros((16, 3, 16, 16), np.float32))
    rc, so, err = cli("inspect", src, "--input-shape", "x:2,3,16,16", "--json")
    assert rc == 0, err
    assert json.loads(so)["input_shapes"]["x"] == [2, 3, 16, 16]
    rc, _, err = cli("rewrite", src, tmp_path / "o.onnx", "--keep-params", "0.5", "--calibration",
                     tmp_path / "cal.npz", "--input-shape", "x:2,3,8,8")
    assert rc == 2 and "disagrees with the calibration data" in err
    assert_one_sentence(err)


# (fraction, worst held-out rel L2, top-1) as the default search measured them on real models
# (docs/real-models.md, rows "rewrite in out --calibration CAL.npz")
MEASURED_SEARCHES = {
    "minilm": ([(0.75, 0.678, None), (0.875, 0.397, None), (0.9375, 0.285, None), (0.96875, 0.197, None)], 2),
    "magika": ([(0.5, 0.736, 0.55), (0.75, 0.326, 0.88), (0.875, 0.270, 0.84), (0.9375, 0.207, 0.92)], 3),
    "ocr-det": ([(0.75, 0.150, None), (0.875, 0.131, None), (0.9375, 0.116, None)], 2),
}


@pytest.mark.parametrize("model", sorted(MEASURED_SEARCHES))
def test_the_search_stops_where_the_tolerance_is_out_of_reach(model):
    """On the real models whose every probe missed the tolerance, the search stops as soon as the line
    through its last two probes meets the tolerance only at keep-params 1 or beyond, and no earlier."""
    from onnx_alds.policy.error_bounded import out_of_reach

    tried, stop_after = MEASURED_SEARCHES[model]
    stops = [n for n in range(1, len(tried) + 1) if out_of_reach(tried[:n], 0.1)]
    assert stops and stops[0] == stop_after


def test_the_search_goes_on_where_the_error_falls_fast_enough():
    """The text recogniser missed at 0.5 (1.09) and 0.75 (0.22) and met the tolerance at 0.875 (0.078):
    the line through the misses reaches 0.1 at 0.78, so the search must not stop there; nor while a
    probe is within the tolerance."""
    from onnx_alds.policy.error_bounded import out_of_reach

    assert not out_of_reach([(0.5, 1.087, None), (0.75, 0.220, None)], 0.1)
    assert not out_of_reach([(0.5, 0.3, None), (0.75, 0.09, None)], 0.1)
    assert not out_of_reach([(0.75, 0.2, None)], 0.1)


def test_open_input_dims_are_analysed_at_the_calibration_samples_size():
    """A model whose image size is left open is analysed at the size of its calibration samples (batch
    1), not at a placeholder: FLOPs are counted there, and a size given with --input-shape still wins
    where it agrees with the data."""
    model = cnn_model()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for d, name in zip(dims, ("N", "C", "H", "W")):
        if name != "C":
            d.ClearField("dim_value")
            d.dim_param = name
    cal = {"x": np.random.default_rng(0).standard_normal((24, 3, 20, 12)).astype(np.float32)}
    _, rep = onnx_alds.rewrite(model, keep_params=0.7, calibration=cal, provider="cpu", allow_slower=True,
                               validate=False, compare=False)
    assert rep.input_shapes == {"x": [1, 3, 20, 12]}
    fixed = cnn_model()  # the same layers at a fixed 20 × 12: the same FLOPs
    fixed.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 20
    fixed.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 12
    _, ref = onnx_alds.rewrite(fixed, keep_params=0.7, validate=False, compare=False, allow_slower=True)
    assert rep.flops_before == ref.flops_before > 0
    _, given = onnx_alds.rewrite(model, keep_params=0.7, calibration=cal, input_shapes={"x": [4, 3, 20, 12]},
                                 provider="cpu", allow_slower=True, validate=False, compare=False)
    assert given.input_shapes == {"x": [4, 3, 20, 12]}


def test_noise_response_is_the_outputs_own_change_under_input_noise():
    """A linear map moves its output as much as its input moves: 1 % of the input's standard deviation
    in noise moves ``y = x W`` by about 1 % (zero-mean inputs), 4 % by four times that; class scores
    are judged by top-1 agreement, not by this, and inputs without floats give no reference."""
    from graphs import gemm_model, matmul_model
    from onnx_alds.validate import noise_response

    feeds = {"x": np.random.default_rng(3).standard_normal((64, 5, 12)).astype(np.float32)}
    small = noise_response(matmul_model(), feeds, provider="cpu", noise=0.01)["y"]
    large = noise_response(matmul_model(), feeds, provider="cpu", noise=0.04)["y"]
    assert 0.007 < small < 0.013 and large / small == pytest.approx(4.0, rel=0.15)
    scores = {"x": feeds["x"][:, 0]}
    assert noise_response(gemm_model(), scores, provider="cpu") == {}  # (N, 7) float: class scores
    assert "y" in noise_response(gemm_model(), scores, provider="cpu", output_kinds={"y": "map"})
    ids = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Cast", ["i"], ["y"], to=onnx.TensorProto.FLOAT)], "g",
        [onnx.helper.make_tensor_value_info("i", onnx.TensorProto.INT64, ["N", 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])]),
        opset_imports=[onnx.helper.make_opsetid("", 17)])
    ids.ir_version = 8
    assert noise_response(ids, {"i": np.arange(32, dtype=np.int64).reshape(8, 4)}, provider="cpu") == {}


def test_the_default_tolerance_is_tighter_for_an_output_that_hardly_moves_on_its_own():
    """No tolerance named: an output judged by relative L2 alone may move at most twice what 1 % input
    noise moves it on the held-out samples, where that is below 0.1; the kept plan holds it.  A named
    --max-output-error is taken as given, and class scores keep 0.1 with their top-1 agreement."""
    from onnx_alds.policy.error_bounded import NOISE, NOISE_FACTOR, TOLERANCE
    from onnx_alds.validate import noise_response

    model, cal = cnn_model(), calibration()
    held = {"x": cal["x"][36:]}
    new, rep = onnx_alds.rewrite(model, calibration=cal, output_kinds={"logits": "map"}, provider="cpu",
                                 allow_slower=True, compare=False)
    d = rep.budget["default"]
    moved = noise_response(model, held, provider="cpu", noise=NOISE, output_kinds={"logits": "map"})["logits"]
    tol = d["output_tolerances"]["logits"]
    assert tol == pytest.approx(NOISE_FACTOR * moved, rel=1e-3) and tol < TOLERANCE
    assert d["tolerance"] == tol and d["base_tolerance"] == TOLERANCE
    err = worst_rel_l2(model, new, held)
    assert err <= tol + 1e-6
    within = [f for f, e, _ in d["tried"] if e <= tol]
    assert d["kept"] == (min(within) if within else 1.0)
    # the base tolerance alone keeps fewer parameters (or as many): the tightening is what held it
    _, loose = onnx_alds.rewrite(model, calibration=cal, output_kinds={"logits": "map"}, max_output_error=TOLERANCE,
                                 provider="cpu", allow_slower=True, compare=False)
    assert "output_tolerances" not in loose.budget["default"] and loose.params_after <= rep.params_after
    _, scores = onnx_alds.rewrite(model, calibration=cal, provider="cpu", allow_slower=True, compare=False)
    assert "output_tolerances" not in scores.budget["default"]
    assert scores.budget["default"]["tolerance"] == TOLERANCE
