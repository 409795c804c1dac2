"""Hostile inputs of issue 21 through the CLI, as a user meets them: the exit
code, one sentence on stderr, and every file the user gave byte-identical
afterwards.  Each case is fast (no rewrite runs to the end unless it must)."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

from clitools import assert_one_sentence, digest, main_in_process
from graphs import cnn_model

NET_PY = '''
import torch.nn as nn

def make():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
'''


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A model, calibration data, a plan naming a factors file, a torch factory and checkpoint, in the cwd."""
    monkeypatch.chdir(tmp_path)
    onnx.save(cnn_model(), "m.onnx")
    onnx.save(cnn_model(seed=1), "teacher.onnx")
    np.savez("cal.npz", x=np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32))
    np.savez("d.npz", x=np.zeros((4, 3, 8, 8), np.float32), y=np.zeros(4, np.int64))
    (tmp_path / "p.json").write_text(json.dumps({"version": 1, "layers": [], "factors": {"file": "p.factors.npz"}}))
    (tmp_path / "p.factors.npz").write_bytes(b"factors")
    (tmp_path / "ck.pt").write_bytes(b"checkpoint")
    (tmp_path / "net.py").write_text(NET_PY)
    os.link("m.onnx", "hard.onnx")
    return tmp_path


def _refused(capsys, args, given):
    before = {f: digest(f) for f in given}
    rc, out, err = main_in_process(capsys, *args)
    assert rc == 2, err
    assert_one_sentence(err)
    assert {f: digest(f) for f in given} == before
    return err


FT = ["finetune", "net.py:make", "--plan", "p.json", "--data", "d.npz"]
NV = ["--no-validate", "--no-compare", "-q"]


@pytest.mark.parametrize("args, given", [
    (["quantize", "m.onnx", "cal.npz", "--calibration", "cal.npz"], ["m.onnx", "cal.npz"]),
    (["quantize", "m.onnx", "q.onnx", "--json", "m.onnx"], ["m.onnx"]),
    (["quantize", "m.onnx", "q.onnx", "--json", "q.onnx"], ["m.onnx"]),
    (["bench", "m.onnx", "--int8", "--calibration", "cal.npz", "--json", "cal.npz"], ["m.onnx", "cal.npz"]),
    (["bench", "m.onnx", "teacher.onnx", "--json", "teacher.onnx"], ["m.onnx", "teacher.onnx"]),
    (["rewrite", "m.onnx", "p.factors.npz", "--apply-plan", "p.json"] + NV, ["m.onnx", "p.json", "p.factors.npz"]),
    (["rewrite", "m.onnx", "o.onnx", "--apply-plan", "p.json", "--report", "p.factors.npz"] + NV,
     ["m.onnx", "p.factors.npz"]),
    (["rewrite", "m.onnx", "hard.onnx"] + NV, ["m.onnx"]),
    (["rewrite", "m.onnx", "o.onnx", "--calibration", "cal.npz", "--plot", "cal.npz"] + NV, ["cal.npz"]),
    (["rewrite", "m.onnx", "o.onnx", "--plan", "cal.json", "--calibration", "cal.factors.npz"] + NV, ["m.onnx"]),
    (["rewrite", "m.onnx", "o.onnx", "--report", "r.json", "--plot", "r.json"] + NV, ["m.onnx"]),
    (["rewrite", "m.onnx", "o.onnx", "--report", "r.json", "--cache-dir", "r.json"] + NV, ["m.onnx"]),
    (["rewrite", "m.onnx", "sym.onnx"] + NV, ["m.onnx"]),
], ids=["quantize-out-is-calibration", "quantize-json-is-input", "quantize-json-is-output",
        "bench-json-is-calibration", "bench-json-is-second-model", "rewrite-out-is-sidecar",
        "rewrite-report-is-sidecar", "rewrite-out-hard-link", "rewrite-plot-is-calibration",
        "rewrite-plan-sidecar-is-calibration", "rewrite-two-outputs-one-file", "rewrite-report-is-cache-dir",
        "rewrite-out-symlink"])
def test_no_output_is_an_input_or_another_output(files, capsys, args, given):
    if "cal.factors.npz" in args:
        os.link("cal.npz", "cal.factors.npz")
        given = given + ["cal.factors.npz"]
    if "sym.onnx" in args:
        os.symlink("m.onnx", "sym.onnx")
    _refused(capsys, args, given)
    assert not os.path.exists("o.onnx") and not os.path.exists("r.json")  # refused before any work


@pytest.mark.parametrize("args, given", [
    (["export", "net.py:make", "ck.pt", "--checkpoint", "ck.pt", "--input-shape", "1,3,8,8"], ["ck.pt", "net.py"]),
    (["export", "net.py:make", "net.py", "--input-shape", "1,3,8,8"], ["net.py"]),
    (FT + ["--out", "teacher.onnx", "--teacher-onnx", "teacher.onnx"], ["teacher.onnx", "p.json", "d.npz"]),
    (FT + ["--out", "ft.onnx", "--checkpoint-dir", "d.npz"], ["d.npz"]),
    (FT + ["--out", "p.factors.onnx"], ["p.json"]),
    (["finetune", "net.py:make", "--plan", "empty.json", "--data", "d.npz", "--epochs", "1", "--out", "ft.onnx",
      "--checkpoint-dir", "ft.onnx"], ["d.npz"]),
], ids=["export-out-is-checkpoint", "export-out-is-source", "finetune-out-is-teacher", "finetune-ckdir-is-data",
        "finetune-out-hard-link-of-plan", "finetune-out-is-ckdir"])
def test_torch_commands_never_overwrite_an_input(files, capsys, args, given):
    pytest.importorskip("torch")
    if "p.factors.onnx" in args:
        os.link("p.json", "p.factors.onnx")
    if "empty.json" in args:  # a plan that loads: the run would get as far as writing
        (files / "empty.json").write_text(json.dumps({"version": 1, "layers": []}))
    _refused(capsys, args, given)
    assert not os.path.exists("ft.onnx")  # refused before any work (not after training, at the write)


def test_export_refuses_input_shapes_past_the_limit(files, capsys):
    """Export allocates its example inputs: shapes past the inputs' limit are a usage error, not an internal one."""
    pytest.importorskip("torch")
    err = _refused(capsys, ["export", "net.py:make", "e.onnx", "--input-shape", "100000,3,1000,1000"], ["net.py"])
    assert "GiB" in err and not os.path.exists("e.onnx")


@pytest.mark.parametrize("args", [
    ["rewrite", "m.onnx", "o.onnx", "--max-output-error", "nan"],
    ["rewrite", "m.onnx", "o.onnx", "--max-output-error", "-0.1"],
    ["rewrite", "m.onnx", "o.onnx", "--min-speedup", "nan"],
    ["rewrite", "m.onnx", "o.onnx", "--min-speedup", "inf"],
    ["rewrite", "m.onnx", "o.onnx", "--min-speedup", "0"],
    ["rewrite", "m.onnx", "o.onnx", "--keep-params", "inf"],
    ["rewrite", "m.onnx", "o.onnx", "--keep-flops", "nan"],
    ["rewrite", "m.onnx", "o.onnx", "--keep-latency", "-1"],
    ["rewrite", "m.onnx", "o.onnx", "--k-max", "0"],
    ["quantize", "m.onnx", "q.onnx", "--samples", "0"],
    ["bench", "m.onnx", "--repeats", "-3"],
    FT + ["--out", "ft.onnx", "--lr", "nan"],
    FT + ["--out", "ft.onnx", "--lr", "-1e-3"],
    FT + ["--out", "ft.onnx", "--lr", "inf"],
    FT + ["--out", "ft.onnx", "--threads", "100000"],
    ["bench", "m.onnx", "--threads", "100000"],
])
def test_numeric_options_refuse_nan_infinite_and_out_of_range(files, capsys, args):
    """argparse's usage error: exit 2, the option named, nothing written."""
    with pytest.raises(SystemExit) as e:
        main_in_process(capsys, *args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {args[-2]}" in err
    assert "Traceback" not in err
    assert not os.path.exists("o.onnx") and not os.path.exists("q.onnx")


# ----------------------------------------------------------------------------- the factors sidecar is untrusted


@pytest.fixture(scope="module")
def data_plan(tmp_path_factory):
    """Two models with the same layer names and a data-aware plan (with its factors file) for each."""
    from onnx_alds.cli import main

    d = tmp_path_factory.mktemp("plan")
    np.savez(d / "cal.npz", x=np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32))
    for seed, name in ((0, "p"), (1, "p2")):
        onnx.save(cnn_model(seed=seed), d / f"{name}.onnx")
        assert main(["rewrite", str(d / f"{name}.onnx"), str(d / f"{name}_out.onnx"), "--keep-params", "0.6",
                       "--calibration", str(d / "cal.npz"), "--plan", str(d / f"{name}.json"), "--no-sequential",
                       "--allow-slower"] + NV) == 0
    return d


def _tampered(d, tmp_path, arrays=None, file=None, sha=True):
    """A copy of plan p.json in tmp_path whose factors file holds ``arrays`` (SHA-256 updated, as a tamperer
    would) or is ``file`` (a path to link to)."""
    import hashlib
    import io

    doc = json.loads((d / "p.json").read_text())
    side = tmp_path / "t.factors.npz"
    if arrays is not None:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        side.write_bytes(buf.getvalue())
        doc["factors"] = {"file": side.name, "sha256": hashlib.sha256(buf.getvalue()).hexdigest()}
    else:
        os.symlink(file, side) if isinstance(file, str) else file(side)
        doc["factors"] = {"file": side.name}
    (tmp_path / "t.json").write_text(json.dumps(doc))
    return tmp_path / "t.json"


def _apply(capsys, d, plan, tmp_path):
    before = digest(d / "p.onnx")
    rc, out, err = main_in_process(capsys, "rewrite", d / "p.onnx", tmp_path / "o.onnx", "--apply-plan", plan, *NV)
    assert digest(d / "p.onnx") == before and (rc == 0) == (tmp_path / "o.onnx").exists()
    return rc, err


def _bomb(path):
    import zipfile

    header = __import__("io").BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (16 << 20,)})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        z.writestr("c2|encoder.npy", header.getvalue() + bytes(64 << 20))  # 64 MB of zeros in ~64 KB


@pytest.mark.parametrize("case, needle", [
    ("rank", "shape"), ("bias", "bias correction"), ("float64", "float64"), ("nan", "NaN"),
    ("other model", "other weights"), ("fifo", "not a regular file"), ("dev zero", "not a regular file"),
    ("zip bomb", "before decompressing"),
])
def test_factors_file_is_checked_against_plan_and_model(data_plan, tmp_path, capsys, case, needle):
    d = data_plan
    side = dict(np.load(d / "p.factors.npz"))
    enc = next(k for k in side if k.endswith("|encoder"))
    layer = enc.split("|")[0]
    if case == "rank":
        plan = _tampered(d, tmp_path, {**side, enc: side[enc][: len(side[enc]) // 2]})
    elif case == "bias":
        plan = _tampered(d, tmp_path, {**side, f"{layer}|bias_delta": np.float32(1e3)})
    elif case == "float64":
        plan = _tampered(d, tmp_path, {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in side.items()})
    elif case == "nan":
        bad = side[enc].copy()
        bad.flat[0] = np.nan
        plan = _tampered(d, tmp_path, {**side, enc: bad})
    elif case == "other model":
        plan = _tampered(d, tmp_path, dict(np.load(d / "p2.factors.npz")))
    elif case == "fifo":
        plan = _tampered(d, tmp_path, file=os.mkfifo)
    elif case == "dev zero":
        plan = _tampered(d, tmp_path, file="/dev/zero")
    else:
        plan = _tampered(d, tmp_path, file=_bomb)
    rc, err = _apply(capsys, d, plan, tmp_path)
    assert rc == 2, err
    assert_one_sentence(err)
    assert "factors file" in err and needle in err and "p.onnx" not in err  # names the sidecar, not the model


def test_untampered_factors_file_applies(data_plan, tmp_path, capsys):
    rc, err = _apply(capsys, data_plan, data_plan / "p.json", tmp_path)
    assert rc == 0, err


def test_plan_with_factors_applies_with_calibration_and_data_error(data_plan, tmp_path, capsys):
    """--apply-plan with --calibration --error data: the data is there, so the data-aware errors are measured
    (it said '--error data needs calibration inputs' before)."""
    d = data_plan
    rc, _, err = main_in_process(capsys, "rewrite", d / "p.onnx", tmp_path / "o.onnx", "--apply-plan", d / "p.json",
                                 "--calibration", d / "cal.npz", "--error", "data", "--report", tmp_path / "r.json",
                                 *NV)
    assert rc == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    decomposed = [layer for layer in r["layers"] if layer["status"] == "decomposed"]
    assert r["error_model"].startswith("data") and decomposed
    assert all(np.isfinite(layer["rel_error"]) for layer in decomposed)


# ----------------------------------------------------------------------------- int8 tells the truth


@pytest.mark.parametrize("command", [["quantize", "f64.onnx", "q.onnx"], ["rewrite", "f64.onnx", "q.onnx", "--int8"]])
def test_int8_refuses_a_float64_model_instead_of_claiming_int8(tmp_path, monkeypatch, capsys, command):
    from graphs import conv_model

    monkeypatch.chdir(tmp_path)
    onnx.save(conv_model(dtype=np.float64), "f64.onnx")
    err = _refused(capsys, command, ["f64.onnx"])
    assert "float64" in err and "float32" in err
    assert not os.path.exists("q.onnx")


# ----------------------------------------------------------------------------- calibration data


def _gather_model():
    from graphs import _parse

    rng = np.random.default_rng(0)
    return _parse("""g (int64[N, 6] ids) => (float[N, 6, 4] y) {
        [emb] e = Gather (table, ids)
        [fc] y = MatMul (e, "fc.weight")
    }""", {"table": rng.standard_normal((10, 8)).astype(np.float32),
           "fc.weight": rng.standard_normal((8, 4)).astype(np.float32)})


@pytest.mark.parametrize("ids, needle", [(np.full((4, 6), 1000, np.int64), "10 rows"),
                                         (np.full((4, 6), 2**63 + 5, np.uint64), "wrap")])
@pytest.mark.parametrize("command", ["rewrite", "quantize"])
def test_token_ids_outside_the_table_are_one_sentence(tmp_path, monkeypatch, capsys, ids, needle, command):
    monkeypatch.chdir(tmp_path)
    onnx.save(_gather_model(), "g.onnx")
    np.savez("ids.npz", ids=ids)
    err = _refused(capsys, [command, "g.onnx", "o.onnx", "--calibration", "ids.npz"]
                   + (NV if command == "rewrite" else []), ["g.onnx", "ids.npz"])
    assert needle in err


def test_calibration_header_declaring_gigabytes_is_refused_before_reading(tmp_path, monkeypatch, capsys):
    import io
    import resource
    import zipfile

    monkeypatch.chdir(tmp_path)
    onnx.save(cnn_model(), "m.onnx")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                   "shape": (700_000, 3, 16, 16)})  # 2 GiB declared
    with zipfile.ZipFile("cal.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", header.getvalue() + bytes(1 << 20))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    err = _refused(capsys, ["rewrite", "m.onnx", "o.onnx", "--calibration", "cal.npz"] + NV, ["m.onnx", "cal.npz"])
    assert "GiB" in err and "before reading" in err
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 512 << 10  # KiB: under 512 MB more


def test_quantize_caps_random_samples_and_says_so(tmp_path, monkeypatch, capsys, caplog):
    from graphs import gemm_model

    from onnx_alds.calibration.data import MAX_CALIBRATION_SAMPLES
    from onnx_alds.quantize import calibration_batches

    monkeypatch.chdir(tmp_path)
    batches, used, _ = calibration_batches(cnn_model(), None, samples=10**8, batch=MAX_CALIBRATION_SAMPLES)
    assert used == MAX_CALIBRATION_SAMPLES and len(batches) == 1
    onnx.save(gemm_model(f=16, c=24), "g.onnx")
    rc, _, err = main_in_process(capsys, "quantize", "g.onnx", "q.onnx", "--samples", "100000000")
    assert rc == 0, err
    assert f"at most {MAX_CALIBRATION_SAMPLES} samples" in caplog.text + err


def test_calibration_file_past_the_sample_cap_uses_the_first_and_says_so(tmp_path, monkeypatch, capsys, caplog):
    """1 M samples in a 0.5 MB file: the first MAX_CALIBRATION_SAMPLES are used, with a warning, in seconds."""
    from graphs import gemm_model

    from onnx_alds.calibration.data import MAX_CALIBRATION_SAMPLES

    monkeypatch.chdir(tmp_path)
    onnx.save(gemm_model(f=16, c=24), "g.onnx")
    x = np.zeros((1_000_000, 24), np.float32)
    x[:MAX_CALIBRATION_SAMPLES] = np.random.default_rng(0).standard_normal((MAX_CALIBRATION_SAMPLES, 24))
    np.savez_compressed("cal.npz", x=x)
    rc, _, err = main_in_process(capsys, "rewrite", "g.onnx", "o.onnx", "--calibration", "cal.npz", "--keep-params",
                                 "0.7", "--allow-slower", "--no-sequential", *NV)
    assert rc == 0, err
    assert f"1000000 samples; the first {MAX_CALIBRATION_SAMPLES} are used" in caplog.text + err


# ----------------------------------------------------------------------------- cache entries are values


def _speed_entry():
    return {"version": 5, "provider": "CPUExecutionProvider", "threads": 2, "conv_penalty": {"1": 1.0, "2": 1.5},
            "linear_penalty": {"1": 1.0, "2": 1.2}, "node_overhead": 4000.0, "thin_in": {"8": 1.1},
            "thin_out": {"8": 1.3}}


@pytest.mark.parametrize("key, value", [
    ("linear_penalty", {"abc": 1.0}), ("linear_penalty", {"2": float("nan")}), ("conv_penalty", {"2": -1e6}),
    ("conv_penalty", {"2": float("-inf")}), ("node_overhead", float("nan")), ("node_overhead", -1e30),
    ("node_overhead", "12"), ("thin_in", []), ("threads", "2"),
])
def test_speed_model_entry_with_bad_values_is_a_miss_with_a_warning(tmp_path, caplog, key, value):
    """A poisoned entry in the speed-model cache: for_provider warns, measures again and replaces it."""
    from onnx_alds.measure.speed import SpeedModel

    d = _speed_entry()
    assert SpeedModel.from_dict(d).node_overhead == 4000.0  # the untouched entry is used
    d[key] = value
    with pytest.raises(ValueError):
        SpeedModel.from_dict(d)


def test_poisoned_speed_cache_is_measured_again(tmp_path, caplog):
    from onnx_alds.measure.speed import SpeedModel

    folder = tmp_path / "speed"
    good = SpeedModel.for_provider("cpu", 2, cache_dir=folder)
    entry = next(folder.iterdir())
    d = json.loads(entry.read_text())
    d["node_overhead"] = -1e30
    entry.write_text(json.dumps(d))
    again = SpeedModel.for_provider("cpu", 2, cache_dir=folder)
    assert "ignored" in caplog.text and again.node_overhead >= 0 and np.isfinite(again.node_overhead)
    assert json.loads(entry.read_text())["node_overhead"] >= 0 and good.provider == again.provider


@pytest.mark.parametrize("part, value", [("context", "abc"), ("context", None), ("context", [1]),
                                         ("context", {"c1": -1.0}), ("penalty", {"c1": -1e6}),
                                         ("penalty", {"c1": float("-inf")}), ("penalty", {"c1": "x"}),
                                         ("beta", float("nan")), ("beta", -2.0)])
def test_latency_entry_with_bad_learned_values_drops_them(tmp_path, caplog, part, value):
    """The whole-model latency entry: a bad in-context time, penalty or beta is dropped (measured again), the
    timed ``ms`` kept; the same entry with good values keeps them."""
    from onnx_alds.cache import load_json_entry

    key = {"model": "abc"}
    entry = {"key": key, "ms": {"model": 1.5}, "context": {"c1": 0.2}, "penalty": {"c1": -0.1}, "beta": 0.9}
    path = tmp_path / "model.json"
    path.write_text(json.dumps(entry))
    assert load_json_entry(path, key) == entry
    entry[part] = value
    path.write_text(json.dumps(entry).replace("NaN", "1e999").replace("-Infinity", "-1e999"))
    got = load_json_entry(path, key)
    assert got["ms"] == {"model": 1.5} and part not in got and "cache entry" in caplog.text


@pytest.mark.parametrize("command", [["rewrite", "--sequential"], ["rewrite", "--no-sequential"], ["quantize"]])
def test_fixed_batch_of_one_takes_many_calibration_samples(tmp_path, monkeypatch, capsys, command):
    """A model whose batch is fixed at 1, given 32 calibration samples: fed one batch at a time."""
    monkeypatch.chdir(tmp_path)
    m = cnn_model()
    for v in (m.graph.input[0], m.graph.output[0]):
        v.type.tensor_type.shape.dim[0].ClearField("dim_param")
        v.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(m, "b1.onnx")
    np.savez("cal.npz", x=np.random.default_rng(0).standard_normal((32, 3, 16, 16)).astype(np.float32))
    extra = ["--keep-params", "0.6", "--allow-slower", "--no-compare", "-q"] if command[0] == "rewrite" else []
    before = digest("b1.onnx")
    rc, out, err = main_in_process(capsys, command[0], "b1.onnx", "o.onnx", "--calibration", "cal.npz",
                                   *command[1:], *extra)
    assert rc == 0, err
    assert os.path.exists("o.onnx") and digest("b1.onnx") == before


# ----------------------------------------------------------------------------- smaller items


def test_unchanged_model_is_never_called_slower():
    """The same graph timed twice: a measured 0.8x is noise, not a slower model; the report says it is unchanged."""
    from onnx_alds.validate import Validation, gate

    v = Validation("CPUExecutionProvider", 0.0, 0.0, latency_ms_before=1.0, latency_ms_after=1.25, same_graph=True)
    warnings = gate(v)
    assert not any("slower" in w for w in warnings) and any("unchanged" in w for w in warnings)
    assert any("slower" in w for w in gate(Validation("CPUExecutionProvider", 0.0, 0.0, latency_ms_before=1.0,
                                                      latency_ms_after=1.25)))


def test_float64_weights_near_1e200_have_the_errors_of_the_same_weights_near_1(tmp_path, monkeypatch, capsys):
    """Errors are relative: a weight scaled by 1e200 has the same data-aware and spectral errors, finite
    factors, and no NaN in the report (the data-aware energy ‖WX‖² overflowed to inf before)."""
    from graphs import gemm_model

    monkeypatch.chdir(tmp_path)
    m = gemm_model(f=16, c=24, dtype=np.float64)
    onnx.save(m, "n.onnx")
    w = onnx.numpy_helper.to_array(m.graph.initializer[0]) * 1e200
    m.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, "fc.weight"))
    onnx.save(m, "h.onnx")
    np.savez("cal.npz", x=np.random.default_rng(0).standard_normal((64, 24)))
    errors = {}
    modes = {"data": ["--calibration", "cal.npz", "--no-sequential"],
             "sequential": ["--calibration", "cal.npz", "--sequential"], "spectral": []}
    for name in ("n", "h"):
        for mode, extra in modes.items():
            args = ["rewrite", f"{name}.onnx", f"{name}_{mode}.onnx", "--keep-params", "0.7", "--allow-slower",
                    "--no-validate", "--no-compare", "--report", f"{name}_{mode}.json", "-q"]
            rc, _, err = main_in_process(capsys, *args, *extra)
            assert rc == 0, err
            text = open(f"{name}_{mode}.json").read()
            assert "NaN" not in text and "Infinity" not in text
            r = json.loads(text)
            errors[name, mode] = [(l["rel_error"], l.get("measured_error")) for l in r["layers"]]
            out = onnx.load(f"{name}_{mode}.onnx")
            assert all(np.isfinite(onnx.numpy_helper.to_array(t)).all() for t in out.graph.initializer)
    for mode in modes:
        h, n = np.array(errors["h", mode], float), np.array(errors["n", mode], float)
        np.testing.assert_allclose(h, n, rtol=1e-6)


def test_a_calibration_stream_past_the_sample_cap_uses_the_first_and_says_so(tmp_path, monkeypatch, capsys, caplog):
    """A --data-loader-script that yields a million samples: the first MAX_CALIBRATION_SAMPLES are read (the
    generator is not drained), with a warning, as for a file."""
    from graphs import gemm_model

    from onnx_alds.calibration.data import MAX_CALIBRATION_SAMPLES

    monkeypatch.chdir(tmp_path)
    onnx.save(gemm_model(f=16, c=24), "g.onnx")
    open("loader.py", "w").write(
        "import numpy as np\n"
        "def load_data():\n"
        "    rng = np.random.default_rng(0)\n"
        "    for i in range(10_000):\n"
        "        open('read.txt', 'a').write(f'{i}\\n')\n"
        "        yield {'x': rng.standard_normal((100, 24)).astype(np.float32)}\n")
    rc, _, err = main_in_process(capsys, "rewrite", "g.onnx", "o.onnx", "--data-loader-script", "loader.py",
                                 "--keep-params", "0.7", "--allow-slower", "--no-sequential", *NV)
    assert rc == 0, err
    assert f"more than {MAX_CALIBRATION_SAMPLES} samples; the first {MAX_CALIBRATION_SAMPLES} are used" in caplog.text + err
    read = [int(line) for line in open("read.txt")]
    assert max(read) <= MAX_CALIBRATION_SAMPLES // 100  # no pass read past the feed that met the cap
