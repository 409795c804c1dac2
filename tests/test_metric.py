"""``--metric-script``: the user's own task metric judges the rewrite.  With no budget the default
search keeps the smallest plan whose score drops at most the drop allowed; under a budget the score
is reported, and past ``--max-metric-drop`` nothing is written (exit 5).  The metric here is one a
user could write, computed with onnxruntime on seeded inputs: fidelity to the original's logits,
``100 (1 - |y - y0| / |y0 - mean(y0)|)``, 100 for the same outputs (this small net's top class
barely moves at any budget, so agreement would not tell budgets apart)."""

import json

import numpy as np
import onnx
import pytest

import onnx_alds
from clitools import assert_one_sentence, cli, digest
from graphs import cnn_model, run
from onnx_alds.errors import UsageError, ValidationFailed
from onnx_alds.pipeline.candidates import label as candidate_label

CASES = 96


def inputs(seed=7):
    return {"x": np.random.default_rng(seed).standard_normal((CASES, 3, 16, 16)).astype(np.float32)}


def fidelity(model, reference, feeds) -> float:
    y, y0 = run(model, feeds)[0].astype(np.float64), run(reference, feeds)[0].astype(np.float64)
    return 100.0 * (1.0 - np.linalg.norm(y - y0) / np.linalg.norm(y0 - y0.mean(0)))


METRIC = '''
import numpy as np
import onnxruntime as ort

X = np.random.default_rng(7).standard_normal(({n}, 3, 16, 16)).astype(np.float32)


def _logits(path):
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return s.run(None, {{"x": X}})[0].astype(np.float64)


REF = _logits({original!r})


def evaluate(path):
    return 100.0 * (1.0 - np.linalg.norm(_logits(path) - REF) / np.linalg.norm(REF - REF.mean(0)))


def broken(path):
    raise RuntimeError("the validation set is gone")


def nan(path):
    return float("nan")


def text(path):
    return "high"
'''


@pytest.fixture
def files(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(cnn_model(), src)
    np.savez(tmp_path / "cal.npz", **{"x": np.random.default_rng(1).standard_normal((48, 3, 16, 16)).astype(np.float32)})
    (tmp_path / "metric.py").write_text(METRIC.format(n=CASES, original=str(src)))
    return tmp_path


def test_the_default_search_keeps_the_smallest_plan_within_the_metric_drop(files):
    """No budget, a metric and a drop: every probe the report lists was scored by the metric, the kept
    fraction is the smallest that passed, and the written model's score, recomputed here, is the
    report's and within the drop."""
    out, rep_path = files / "o.onnx", files / "r.json"
    rc, _, err = cli("rewrite", files / "m.onnx", out, "--calibration", files / "cal.npz", "--metric-script",
                     files / "metric.py", "--max-metric-drop", "30", "--provider", "cpu", "--allow-slower", "-q",
                     "--report", rep_path)
    assert rc == 0, err
    rep = json.loads(rep_path.read_text())
    d, m = rep["budget"]["default"], rep["validation"]["metric"]
    assert d["metric"] == str(files / "metric.py") and d["max_metric_drop"] == 30 and d["tolerance"] is None
    assert m["original"] == 100.0 and m["max_drop"] == 30 and m["max_drop_given"]
    passed = [t[0] for t in d["tried"] if 100.0 - t[3] <= 30]
    assert passed and d["kept"] == min(passed) and len(d["tried"]) == 5  # no early stop on a metric
    score = fidelity(onnx.load(out), cnn_model(), inputs())
    assert m["rewritten"] == pytest.approx(score, abs=1e-6) and 100.0 - score <= 30
    assert rep["params_after"] <= (min(passed) + 0.01) * rep["params_before"]


def test_a_budget_past_the_metric_drop_writes_nothing(files):
    """--keep-params 0.3 drops this net's fidelity by hundreds of points: past --max-metric-drop 1 exit 5,
    one sentence, nothing written, the input untouched; without the flag it is written with a warning."""
    before = digest(files / "m.onnx")
    common = ["--keep-params", "0.3", "--provider", "cpu", "--allow-slower", "--metric-script", files / "metric.py"]
    rc, _, err = cli("rewrite", files / "m.onnx", files / "o.onnx", *common, "--max-metric-drop", "1", "-q")
    assert rc == 5 and "metric" in err and "nothing was written" in err
    assert_one_sentence(err)
    assert not (files / "o.onnx").exists() and digest(files / "m.onnx") == before
    rc, out, err = cli("rewrite", files / "m.onnx", files / "o.onnx", *common, "--report", files / "r.json")
    assert rc == 0 and "--max-metric-drop" in err
    m = json.loads((files / "r.json").read_text())["validation"]["metric"]
    assert m["drop"] > m["max_drop"] and not m["max_drop_given"]
    assert m["rewritten"] == pytest.approx(fidelity(onnx.load(files / "o.onnx"), cnn_model(), inputs()), abs=1e-6)
    assert "metric (" in out  # the summary says it


@pytest.mark.parametrize("func, says", [("broken", "failed: RuntimeError: the validation set is gone"),
                                        ("nan", "not a finite number"), ("text", "not a number"),
                                        ("nothing", "no function")])
def test_a_bad_metric_is_one_sentence(files, func, says):
    rc, _, err = cli("rewrite", files / "m.onnx", files / "o.onnx", "--keep-params", "0.5", "--metric-script",
                     f"{files / 'metric.py'}:{func}", "--allow-slower")
    assert rc == 2 and says in err
    assert_one_sentence(err)
    assert not (files / "o.onnx").exists()


@pytest.mark.parametrize("args, says", [(["--max-metric-drop", "1"], "--metric-script"),
                                        (["--metric-script", "metric.py", "--no-validate"], "--no-validate"),
                                        (["--metric-script", "metric.py", "--max-metric-drop", "nan"],
                                         "argument --max-metric-drop"),
                                        (["--metric-script", "metric.py", "--max-metric-drop", "-1"],
                                         "argument --max-metric-drop")])
def test_metric_options_that_cannot_work_are_usage_errors(files, args, says):
    args = [files / a if a == "metric.py" else a for a in args]
    rc, _, err = cli("rewrite", files / "m.onnx", files / "o.onnx", "--keep-params", "0.5", *args)
    assert rc == 2 and says in err and "Traceback" not in err
    if not says.startswith("argument"):  # (argparse's own errors come with its usage lines)
        assert_one_sentence(err)
    assert not (files / "o.onnx").exists()


def test_the_metric_script_is_an_input_no_output_may_overwrite(files):
    before = digest(files / "metric.py")
    rc, _, err = cli("rewrite", files / "m.onnx", files / "o.onnx", "--keep-params", "0.5", "--metric-script",
                     files / "metric.py", "--report", files / "metric.py")
    assert rc == 2 and "--metric-script" in err
    assert digest(files / "metric.py") == before


def test_the_api_takes_a_metric_function():
    """``rewrite(metric=fn)``: fn gets a model file's path; the report's score is fn's on the written model."""
    model, feeds = cnn_model(), inputs()
    seen = []

    def metric(path):
        seen.append(path)
        return fidelity(onnx.load(path), model, feeds)

    new, rep = onnx_alds.rewrite(model, keep_params=0.5, metric=metric, max_metric_drop=1000, provider="cpu",
                                 allow_slower=True, compare=False)
    m = rep.validation["metric"]
    assert m["original"] == 100.0 and m["rewritten"] == pytest.approx(fidelity(new, model, feeds), abs=1e-6)
    assert len(seen) == 2  # the original and the rewrite, once each
    with pytest.raises(ValidationFailed, match="metric"):
        onnx_alds.rewrite(model, keep_params=0.3, metric=metric, max_metric_drop=1.0, provider="cpu",
                          allow_slower=True, compare=False)
    with pytest.raises(UsageError, match="--metric-script"):
        onnx_alds.rewrite(model, keep_params=0.5, max_metric_drop=1.0)


def test_the_candidate_plans_are_judged_by_the_metric_first():
    """With calibration data the candidate plans (objective 'best') are judged by the task metric
    where there is one, not by their output error.  A metric that scores a model higher the more
    its outputs move (the opposite of what the error prefers) must get the candidate that moves
    them most."""
    model, feeds = cnn_model(), inputs()
    cal = {"x": np.random.default_rng(1).standard_normal((48, 3, 16, 16)).astype(np.float32)}

    def moved(path):
        return 100.0 - fidelity(onnx.load(path), model, feeds)

    _, rep = onnx_alds.rewrite(model, keep_params=0.4, calibration=cal, metric=moved, provider="cpu",
                               allow_slower=True, compare=False, sequential=False)
    tried = rep.budget["candidates"]
    assert rep.budget["objective"] == "best" and len(tried) == 5 and all("metric" in t for t in tried)
    label = lambda t: candidate_label(t["method"], t["objective"], t.get("schemes"))  # noqa: E731
    by_metric, by_error = max(tried, key=lambda t: t["metric"]), min(tried, key=lambda t: t["rel_l2"])
    assert label(by_metric) != label(by_error)  # the two rules disagree here: the test tells them apart
    assert rep.budget["picked"] == label(by_metric)
