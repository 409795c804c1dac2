"""--apply-plan reads an untrusted file: every malformed, oversized or special
one is exit 2 with one sentence, read in bounded memory, never truncated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import onnx
import pytest

from clitools import assert_one_sentence, cli, main_in_process
from graphs import cnn_model
from onnx_alds.errors import UsageError
from onnx_alds.plan import MAX_PLAN_BYTES, Plan


@pytest.fixture
def cnn_path(tmp_path):
    p = tmp_path / "cnn.onnx"
    onnx.save(cnn_model(), str(p))
    return p


def _entry(**kw):
    e = {"name": "c2", "weight": "c2.weight", "k": 1, "scheme": "s0", "rank": 2}
    e.update(kw)
    return e


BAD_PLANS = {
    "rank Infinity": '{"layers": [{"name": "c2", "k": 1, "rank": Infinity}]}',
    "rank NaN": '{"layers": [{"name": "c2", "k": 1, "rank": NaN}]}',
    "4301-digit rank": '{"layers": [{"name": "c2", "k": 1, "rank": %s}]}' % ("9" * 4301),
    "4000-digit rank": '{"layers": [{"name": "c2", "k": 1, "rank": %s}]}' % ("9" * 4000),
    "rank 2.9": json.dumps({"layers": [_entry(rank=2.9)]}),
    "rank 2.0": json.dumps({"layers": [_entry(rank=2.0)]}),
    "rank '2'": json.dumps({"layers": [_entry(rank="2")]}),
    "k true": json.dumps({"layers": [_entry(k=True)]}),
    "rank 0": json.dumps({"layers": [_entry(rank=0)]}),
    "name 5": json.dumps({"layers": [_entry(name=5)]}),
    "deep nesting": '{"layers": [], "budget": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "nested budget": json.dumps({"layers": [_entry()], "budget": {"metric": {"a": [1]}}}),
    "version true": json.dumps({"version": True, "layers": [_entry()]}),
}


@pytest.mark.parametrize("name", sorted(BAD_PLANS))
def test_malformed_plans_are_exit_2(cnn_path, tmp_path, name, capsys):
    plan = tmp_path / "p.json"
    plan.write_text(BAD_PLANS[name])
    rc, _, err = main_in_process(capsys, "rewrite", cnn_path, tmp_path / "o.onnx", "--apply-plan", plan,
                                 "--no-validate")
    assert rc == 2, err
    assert_one_sentence(err)
    assert len(err) < 400  # the sentence does not echo a 4000-digit number
    assert not (tmp_path / "o.onnx").exists()


def test_plan_that_is_not_utf8(cnn_path, tmp_path, capsys):
    plan = tmp_path / "p.json"
    plan.write_bytes(b'{"layers": [{"name": "c\xff\xfe2", "k": 1, "rank": 2}]}')
    rc, _, err = main_in_process(capsys, "rewrite", cnn_path, tmp_path / "o.onnx", "--apply-plan", plan)
    assert rc == 2 and "UTF-8" in err
    assert_one_sentence(err)


def _limit_memory():  # a version that reads /dev/zero to the end must fail, not exhaust the machine
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


def test_plan_from_a_device_or_fifo_is_refused_without_reading(cnn_path, tmp_path):
    """/dev/zero would be read until memory runs out; a FIFO would block the open."""
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    for special in ("/dev/zero", fifo):
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "onnx_alds", "rewrite", str(cnn_path), str(tmp_path / "o.onnx"),
                            "--apply-plan", str(special)], capture_output=True, text=True, timeout=60,
                           preexec_fn=_limit_memory)
        rc, err = p.returncode, p.stderr
        assert rc == 2 and "not a regular file" in err, err
        assert_one_sentence(err)
        assert time.monotonic() - t0 < 60


def test_oversized_plan_is_refused(tmp_path):
    big = tmp_path / "big.json"
    with open(big, "wb") as f:  # sparse: costs no disk
        f.truncate(MAX_PLAN_BYTES + 1)
    with pytest.raises(UsageError, match="over"):
        Plan.load(big)


def test_exact_integers_are_kept(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"version": 1, "budget": {"metric": "params", "fraction": 0.5},
                             "layers": [_entry(k=2, rank=3)]}))
    plan = Plan.load(p)
    assert plan.layers[0].k == 2 and plan.layers[0].rank == 3
    assert plan.budget == {"metric": "params", "fraction": 0.5}


def test_latency_plan_applies(tmp_path):
    from graphs import conv_model

    env = dict(os.environ, ONNX_ALDS_CACHE=str(tmp_path / "cache"))
    plan, cnn_path = tmp_path / "p.json", tmp_path / "wide.onnx"
    # one 64 → 64 conv at 32×32, at a budget just above its floor (which the first call reports): the
    # cheapest factorizations, several times faster than the conv, whatever the machine's noise
    onnx.save(conv_model(f=64, c=64, in_hw=(32, 32), pads=(1, 1, 1, 1), spectrum_decay=0.9), str(cnn_path))
    rc, _, err = cli("rewrite", cnn_path, tmp_path / "a.onnx", "--keep-latency", "0.001", env=env)
    assert rc == 4, err
    floor = float(err.split("smallest reachable fraction is ")[1].split()[0])
    rc, _, err = cli("rewrite", cnn_path, tmp_path / "a.onnx", "--keep-latency", f"{floor + 0.1 * (1 - floor):.4f}",
                     "--plan", plan, "--best-effort",  # what is measured next to another test worker varies
                     "--no-validate", "--no-compare", "-q", env=env)
    assert rc == 0, err
    assert json.loads(plan.read_text())["budget"]["metric"] == "latency"
    rc, _, err = cli("rewrite", cnn_path, tmp_path / "b.onnx", "--apply-plan", plan, env=env)
    assert rc == 0, err
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
