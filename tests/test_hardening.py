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
], ids=["quantize-out-is-calibration", "quantize-json-is-input", "quantize-json-is-output",
        "bench-json-is-calibration", "bench-json-is-second-model", "rewrite-out-is-sidecar",
        "rewrite-report-is-sidecar", "rewrite-out-hard-link", "rewrite-plot-is-calibration",
        "rewrite-plan-sidecar-is-calibration", "rewrite-two-outputs-one-file"])
def test_no_output_is_an_input_or_another_output(files, capsys, args, given):
    if "cal.factors.npz" in args:
        os.link("cal.npz", "cal.factors.npz")
        given = given + ["cal.factors.npz"]
    _refused(capsys, args, given)


@pytest.mark.parametrize("args, given", [
    (["export", "net.py:make", "ck.pt", "--checkpoint", "ck.pt", "--input-shape", "1,3,8,8"], ["ck.pt", "net.py"]),
    (["export", "net.py:make", "net.py", "--input-shape", "1,3,8,8"], ["net.py"]),
    (FT + ["--out", "teacher.onnx", "--teacher-onnx", "teacher.onnx"], ["teacher.onnx", "p.json", "d.npz"]),
    (FT + ["--out", "ft.onnx", "--checkpoint-dir", "d.npz"], ["d.npz"]),
    (FT + ["--out", "p.factors.onnx"], ["p.json"]),
], ids=["export-out-is-checkpoint", "export-out-is-source", "finetune-out-is-teacher", "finetune-ckdir-is-data",
        "finetune-out-hard-link-of-plan"])
def test_torch_commands_never_overwrite_an_input(files, capsys, args, given):
    pytest.importorskip("torch")
    if "p.factors.onnx" in args:
        os.link("p.json", "p.factors.onnx")
    _refused(capsys, args, given)


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
