"""The CLI as a pipeline uses it: exit codes, one-sentence errors, atomic output."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from clitools import without_progress
from graphs import cnn_model, initializer_floats, rel_err, run


def cli(*args, cwd=None):
    p = subprocess.run([sys.executable, "-m", "onnx_alds", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, timeout=300)
    return p.returncode, p.stdout, p.stderr


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def cnn_path(tmp_path):
    p = tmp_path / "cnn.onnx"
    onnx.save(cnn_model(), str(p))
    return p


def assert_one_sentence(stderr):
    """One sentence; the run's progress lines (before it reached the error) aside."""
    stderr = without_progress(stderr)
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("onnx-alds: error: ")
    assert "Traceback" not in stderr


def test_rewrite_writes_everything(cnn_path, tmp_path):
    before = digest(cnn_path)
    out, rep, plan, plot = (tmp_path / n for n in ("out.onnx", "r.json", "p.json", "p.png"))
    # --allow-slower: this tiny model's layers are too small for any factorization to be faster
    rc, so, se = cli("rewrite", cnn_path, out, "--keep-params", "0.5", "--report", rep, "--plan", plan,
                     "--plot", plot, "--allow-slower")
    assert rc == 0, se
    assert digest(cnn_path) == before
    r = json.loads(rep.read_text())
    for key in ("params_before", "params_after", "flops_before", "flops_after", "max_rel_error", "method",
                "layers", "validation", "timings_s"):
        assert key in r
    for key in ("provider", "max_abs_diff", "rel_l2", "latency_ms_before", "latency_ms_after"):
        assert key in r["validation"]
    assert r["validation"]["provider"] == "CPUExecutionProvider"
    assert r["params_after"] / r["params_before"] <= 0.5
    statuses = {l["name"]: l["status"] for l in r["layers"]}
    assert statuses["dw"] == "skipped"
    assert "depthwise" in [l for l in r["layers"] if l["name"] == "dw"][0]["reason"]
    new = onnx.load(str(out))
    assert initializer_floats(new) == r["params_after"]
    # untouched things are kept: opset, io, metadata, names of untouched nodes
    orig = onnx.load(str(cnn_path))
    assert [(o.domain, o.version) for o in new.opset_import] == [(o.domain, o.version) for o in orig.opset_import]
    assert [i.name for i in new.graph.input] == [i.name for i in orig.graph.input]
    assert [o.name for o in new.graph.output] == [o.name for o in orig.graph.output]
    assert {p.key: p.value for p in new.metadata_props} == {"author": "onnx-alds tests"}
    assert {"r1", "r2", "gap", "flat", "dw"} <= {n.name for n in new.graph.node}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the written plan applies to give the same model
    out2 = tmp_path / "again.onnx"
    rc, _, se = cli("rewrite", cnn_path, out2, "--apply-plan", plan, "--no-validate")
    assert rc == 0, se
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    assert rel_err(run(new, {"x": x})[0], run(onnx.load(str(out2)), {"x": x})[0]) < 1e-6


def test_output_is_deterministic(cnn_path, tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert cli("rewrite", cnn_path, a, "--no-validate")[0] == 0
    assert cli("rewrite", cnn_path, b, "--no-validate")[0] == 0
    assert a.read_bytes() == b.read_bytes()


def test_inspect_lists_layers_and_reasons(cnn_path):
    rc, so, se = cli("inspect", cnn_path, "--json")
    assert rc == 0, se
    d = json.loads(so)
    by = {l["name"]: l for l in d["layers"]}
    assert by["c1"]["status"] == "compressible" and by["fc"]["status"] == "compressible"
    assert by["dw"]["status"] == "skipped" and "depthwise" in by["dw"]["reason"]
    # c1: 16·3·3·3 weights at 16×16 output
    assert by["c1"]["flops"] == 16 * 3 * 9 * 16 * 16
    assert d["params"] == initializer_floats(onnx.load(str(cnn_path)))
    rc, so, _ = cli("inspect", cnn_path)
    assert rc == 0 and "depthwise conv (group=32)" in so


@pytest.mark.parametrize("content,code", [
    (b"this is not an onnx model at all" * 10, 3),
    (b"", 3),
])
def test_bad_files(tmp_path, content, code):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    before = bad.read_bytes()
    rc, _, se = cli("rewrite", bad, tmp_path / "out.onnx")
    assert rc == code
    assert_one_sentence(se)
    assert bad.read_bytes() == before
    assert not (tmp_path / "out.onnx").exists()


def test_truncated_file(cnn_path, tmp_path):
    data = cnn_path.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    rc, _, se = cli("rewrite", cut, tmp_path / "out.onnx")
    assert rc == 3
    assert_one_sentence(se)
    assert cut.read_bytes() == data[: len(data) // 2]


def test_missing_input(tmp_path):
    rc, _, se = cli("rewrite", tmp_path / "nope.onnx", tmp_path / "out.onnx")
    assert rc == 3 and "does not exist" in se
    assert_one_sentence(se)


def test_output_equal_to_input(cnn_path):
    before = digest(cnn_path)
    rc, _, se = cli("rewrite", cnn_path, cnn_path)
    assert rc == 2 and "is the file given as the input model" in se
    assert_one_sentence(se)
    assert digest(cnn_path) == before


@pytest.mark.parametrize("frac", ["0", "1.5", "-0.2", "abc"])
def test_fraction_outside_range(cnn_path, tmp_path, frac):
    rc, _, se = cli("rewrite", cnn_path, tmp_path / "o.onnx", "--keep-params", frac)
    assert rc == 2
    assert "(0, 1]" in se or "not a number" in se
    assert not (tmp_path / "o.onnx").exists()


def test_infeasible_budget_exit_code(cnn_path, tmp_path):
    rc, _, se = cli("rewrite", cnn_path, tmp_path / "o.onnx", "--keep-params", "0.01", "--allow-slower")
    assert rc == 4 and "smallest reachable fraction is 0." in se
    assert_one_sentence(se)
    assert not (tmp_path / "o.onnx").exists()


def test_missing_output_dir(cnn_path, tmp_path):
    rc, _, se = cli("rewrite", cnn_path, tmp_path / "no" / "such" / "o.onnx")
    assert rc == 2 and "does not exist" in se


def test_plan_that_does_not_match(cnn_path, tmp_path):
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps({"version": 1, "layers": [{"name": "ghost", "k": 1, "scheme": "s0", "rank": 2}]}))
    rc, _, se = cli("rewrite", cnn_path, tmp_path / "o.onnx", "--apply-plan", plan)
    assert rc == 2 and "ghost" in se
    assert_one_sentence(se)
    plan.write_text(json.dumps({"version": 1, "layers": [{"name": "c2", "k": 5, "scheme": "s0", "rank": 2}]}))
    rc, _, se = cli("rewrite", cnn_path, tmp_path / "o.onnx", "--apply-plan", plan)
    assert rc == 2 and "does not divide" in se
    plan.write_text("{not json")
    rc, _, se = cli("rewrite", cnn_path, tmp_path / "o.onnx", "--apply-plan", plan)
    assert rc == 2 and "not valid JSON" in se


def test_cuda_request_without_cuda_is_a_clear_error(cnn_path, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    rc, _, se = cli("rewrite", cnn_path, tmp_path / "o.onnx", "--provider", "cuda")
    assert rc == 2 and "CUDA" in se
    assert_one_sentence(se)
    assert not (tmp_path / "o.onnx").exists()


def test_no_leftover_temp_files(cnn_path, tmp_path):
    out_dir = tmp_path / "outdir"
    out_dir.mkdir()
    assert cli("rewrite", cnn_path, out_dir / "o.onnx", "--keep-params", "0.01")[0] == 4
    assert cli("rewrite", cnn_path, out_dir / "o.onnx", "--no-validate")[0] == 0
    assert sorted(os.listdir(out_dir)) == ["o.onnx"]


def test_shipped_model_end_to_end(tmp_path):
    """The README's first command, on the shipped trained ResNet20 exported from torch."""
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "models" / "resnet20_digits.onnx"
    before = digest(src)
    out, rep = tmp_path / "r20.onnx", tmp_path / "r20.json"
    # --allow-slower: which layers the speed guard admits depends on this machine's timings
    rc, so, se = cli("rewrite", src, out, "--keep-params", "0.5", "--report", rep, "--allow-slower")
    assert rc == 0, se
    assert digest(src) == before
    r = json.loads(rep.read_text())
    assert r["params_after"] / r["params_before"] <= 0.5
    assert initializer_floats(onnx.load(str(out))) == r["params_after"]
    assert sum(l["status"] == "decomposed" for l in r["layers"]) >= 15
    assert r["validation"]["provider"] == "CPUExecutionProvider"
    import onnxruntime as ort

    s = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y = s.run(None, {s.get_inputs()[0].name: np.zeros((3, 1, 16, 16), np.float32)})[0]
    assert y.shape == (3, 10) and np.isfinite(y).all()


@pytest.mark.parametrize("text", ['{"layers": 3}', '{"version": 1, "layers": [5]}', '[1, 2]',
                                  '{"layers": [{"name": "c1", "k": "x", "rank": 1}]}',
                                  '{"layers": [], "budget": 7}'])
def test_malformed_plans_are_usage_errors(cnn_path, tmp_path, text):
    plan = tmp_path / "p.json"
    plan.write_text(text)
    rc, _, se = cli("rewrite", cnn_path, tmp_path / "o.onnx", "--apply-plan", plan)
    assert rc == 2, se
    assert_one_sentence(se)


@pytest.mark.slow
def test_export_subcommand_with_a_module_factory(tmp_path):
    """`onnx-alds export module:callable` from the repository root, then rewrite the result."""
    pytest.importorskip("torch")
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "r20.onnx"
    rc, so, se = cli("export", "models.resnet:resnet20", out, "--input-shape", "1,1,16,16", cwd=root)
    assert rc == 0, se
    names = {t.name for t in onnx.load(str(out)).graph.initializer}
    assert "layer1.0.conv1.weight" in names  # weights named after the modules
    rc, _, se = cli("rewrite", out, tmp_path / "small.onnx", "--keep-params", "0.5", "--no-validate", cwd=root)
    assert rc == 0, se
    rc, _, se = cli("export", "models.resnet:no_such_factory", tmp_path / "x.onnx", "--input-shape", "1,1,16,16",
                    cwd=root)
    assert rc == 2 and "no_such_factory" in se
    assert_one_sentence(se)


def test_spectra_cache_dir_is_reused(cnn_path, tmp_path):
    cache = tmp_path / "cache"
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert cli("rewrite", cnn_path, a, "--no-validate", "--keep-params", "0.5", "--cache-dir", cache)[0] == 0
    files = sorted(p.name for p in cache.iterdir())
    assert files and all(f.endswith(".npz") for f in files)
    mtimes = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert cli("rewrite", cnn_path, b, "--no-validate", "--keep-params", "0.5", "--cache-dir", cache)[0] == 0
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes  # read, not rewritten
    assert a.read_bytes() == b.read_bytes()


def test_objective_option(cnn_path, tmp_path):
    import json

    out, rep, plan = tmp_path / "o.onnx", tmp_path / "r.json", tmp_path / "p.json"
    code, stdout, err = cli("rewrite", cnn_path, out, "--keep-params", "0.5", "--objective", "sum",
                            "--allow-slower", "--no-validate", "--report", rep, "--plan", plan)
    assert code == 0, err
    assert json.loads(rep.read_text())["budget"]["objective"] == "sum" and "root-sum-square" in stdout
    code, _, err = cli("rewrite", cnn_path, tmp_path / "o2.onnx", "--keep-params", "0.5", "--no-validate",
                       "--report", rep, "--allow-slower")
    assert code == 0 and json.loads(rep.read_text())["budget"]["objective"] == "max", err
    code, _, err = cli("rewrite", cnn_path, tmp_path / "o3.onnx", "--apply-plan", plan, "--objective", "sum")
    assert code == 2 and "--objective" in err
    assert_one_sentence(err)


@pytest.mark.parametrize("command", ["rewrite", "inspect", "bench", "quantize"])
def test_every_subcommand_refuses_an_input_shape_naming_no_input(command, cnn_path, tmp_path):
    """A misspelt --input-shape name was silently ignored by bench and quantize (the input kept its
    default size); every subcommand that takes the flag now says so, exit 2, and writes nothing."""
    out = tmp_path / "out.onnx"
    args = {"rewrite": [cnn_path, out, "--keep-params", "0.5"], "inspect": [cnn_path],
            "bench": [cnn_path, "--repeats", "1", "--warmup", "0"], "quantize": [cnn_path, out]}[command]
    code, _, err = cli(command, *args, "--input-shape", "nosuch:1,3,8,8")
    assert code == 2 and "--input-shape names 'nosuch', which is not an input of the model" in err
    assert_one_sentence(err)
    assert not out.exists()


@pytest.mark.parametrize("flags", [["--sequential"], ["--no-sequential"], ["--no-hold-out"], ["--no-bias-correction"],
                                   ["--output-kind", "y:scores", "--no-validate"]])
def test_a_setting_of_calibration_data_without_data_is_refused(flags, cnn_path, tmp_path):
    """Settings of how calibration data is used were ignored without a word when there was none;
    like --sensitivity and --error data, they are now one sentence, exit 2, and nothing is written."""
    out = tmp_path / "out.onnx"
    code, _, err = cli("rewrite", cnn_path, out, "--keep-params", "0.5", *flags)
    assert code == 2 and flags[0] in err and ("there is none" in err or "nothing judges them" in err)
    assert_one_sentence(err)
    assert not out.exists()
