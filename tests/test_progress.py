"""Progress in a pipeline log: a CLI run whose stderr is not a terminal writes
plain ``INFO onnx_alds.progress: ...`` lines there (stage, items done, elapsed,
estimate left), never on stdout; ``-q`` writes none."""

from __future__ import annotations

import os
import re

import numpy as np
import onnx
import pytest
from clitools import PROGRESS_LINE, cli, progress_lines
from graphs import cnn_model


@pytest.fixture
def cnn_and_calibration(tmp_path):
    src, cal = tmp_path / "cnn.onnx", tmp_path / "cal.npz"
    onnx.save(cnn_model(), str(src))
    np.savez(cal, x=np.random.default_rng(0).standard_normal((64, 3, 16, 16)).astype(np.float32))
    return src, cal


def _stages(lines) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for l in lines:
        out.setdefault(PROGRESS_LINE.fullmatch(l)["stage"], []).append(l)
    return out


def test_a_piped_rewrite_logs_its_stages_and_q_silences_them(cnn_and_calibration, tmp_path):
    src, cal = cnn_and_calibration
    # every 5 % of even these short stages (the default waits 2 s before the first)
    env = dict(os.environ, ONNX_ALDS_PROGRESS_QUIET_S="0")
    args = ["rewrite", src, tmp_path / "o.onnx", "--keep-params", "0.5", "--calibration", cal, "--no-compare",
            "--no-validate", "--allow-slower"]
    rc, out, err = cli(*args, env=env, timeout=120)  # capture_output: stderr is a pipe, not a terminal
    assert rc == 0, err
    # plain lines, one per step (no bar redrawn with \r), and nothing else but the CLI's warnings
    others = [l for l in err.splitlines() if l.strip() and not PROGRESS_LINE.fullmatch(l)]
    assert all(l.startswith("onnx-alds: warning: ") for l in others), err
    stages = _stages(progress_lines(err))
    assert {"calibration", "data-aware errors", "sequential calibration", "emit"} <= set(stages), err
    calib = stages["calibration"]
    # the capture of the calibration samples (those not held out for validation): lines on the way
    # (done, elapsed, estimate left) and a closing one
    assert any(re.search(r": \d+/48 sample \(\d+ %\), .* s elapsed, about \d+ s left$", l) for l in calib), err
    assert calib[-1].startswith("INFO onnx_alds.progress: calibration: 48 sample done in "), err
    # stdout is the summary alone
    assert "onnx_alds.progress" not in out and "wrote " in out
    assert not progress_lines(out)

    rc, out, err = cli(*args, "-q", env=env, timeout=120)
    assert rc == 0, err
    assert out == "" and "onnx_alds.progress" not in err
    assert all(l.startswith("onnx-alds: warning: ") for l in err.splitlines() if l.strip()), err


def test_the_latency_table_shows_progress(cnn_and_calibration, tmp_path):
    src, _ = cnn_and_calibration
    env = dict(os.environ, ONNX_ALDS_PROGRESS_QUIET_S="0")
    rc, out, err = cli("rewrite", src, tmp_path / "o.onnx", "--keep-latency", "0.9", "--no-validate",
                       "--no-compare", "--provider", "cpu", "--cache-dir", tmp_path / "cache",
                       env=env, timeout=120)
    assert rc in (0, 4), err  # 4: this machine's timings leave no plan at 0.9 (the table was built all the same)
    # besides progress lines, only the CLI's own sentences (exit 4's error, a warning)
    others = [l for l in err.splitlines() if l.strip() and not PROGRESS_LINE.fullmatch(l)]
    assert all(l.startswith(("onnx-alds: error: ", "onnx-alds: warning: ")) for l in others), err
    table = _stages(progress_lines(err)).get("latency table", [])
    assert any(" layer (" in l and "left" in l for l in table), err
    assert " layer done in " in table[-1], err
    assert not progress_lines(out)


def test_by_default_each_stage_writes_its_closing_line(cnn_and_calibration, tmp_path):
    src, _ = cnn_and_calibration
    env = {k: v for k, v in os.environ.items() if k != "ONNX_ALDS_PROGRESS_QUIET_S"}
    rc, out, err = cli("rewrite", src, tmp_path / "o.onnx", "--keep-params", "0.5", "--no-validate",
                       "--no-compare", env=env, timeout=120)
    assert rc == 0, err
    others = [l for l in err.splitlines() if l.strip() and not PROGRESS_LINE.fullmatch(l)]
    assert all(l.startswith("onnx-alds: warning: ") for l in others), err
    stages = _stages(progress_lines(err))
    assert {"spectra", "emit"} <= set(stages), err
    # each stage's closing line (lines on the way only once a stage has run 2 s)
    assert all(" done in " in ls[-1] for ls in stages.values()), err
    assert "wrote " in out and not progress_lines(out)


@pytest.mark.parametrize("value,expected", [("0", 0.0), ("0.5", 0.5), ("", 2.0), ("soon", 2.0), ("-1", 2.0),
                                            ("nan", 2.0), ("inf", 2.0)])
def test_the_quiet_seconds_variable(monkeypatch, value, expected):
    from onnx_alds import progress

    monkeypatch.setenv(progress.QUIET_ENV, value)
    assert progress._quiet_s() == expected
