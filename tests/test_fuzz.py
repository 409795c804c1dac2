"""Fuzzing: (a) random small valid graphs are reproduced exactly by full-rank
factorizations with random k and scheme; (b) mutated model files never make
the CLI crash, touch the input, or leave a partial output.

Both are seeded (hypothesis with ``derandomize=True``, numpy generators), so a
failure reproduces on every run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from checks import assert_same_outputs, count_layer_ops
from graphs import cnn_model, gemm_model, matmul_model
from onnx_alds import apply_plan
from onnx_alds.api import analyze
from onnx_alds.cost import full_rank
from onnx_alds.plan import LayerPlan, Plan
from onnx_alds.spectra import candidate_ks

# ------------------------------------------------------------------------------- (a) random valid graphs


def _out_size(size, k, s, d, pb, pe, auto_pad):
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return -(-size // s)
    if auto_pad == "VALID":
        pb = pe = 0
    return (size + pb + pe - d * (k - 1) - 1) // s + 1


@st.composite
def conv_chain(draw):
    """1-3 Convs (all 1-D or all 2-D), ReLU between, random geometry; returns
    (model, input shape)."""
    nsp = draw(st.sampled_from([1, 2]))
    c = draw(st.integers(2, 8))
    size = [draw(st.integers(5, 11)) for _ in range(nsp)]
    x_shape = [2, c, *size]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    nodes, inits, cur = [], [], "x"
    for i in range(draw(st.integers(1, 3))):
        f = draw(st.integers(2, 8))
        k = [draw(st.integers(1, 4)) for _ in range(nsp)]
        s = [draw(st.integers(1, 2)) for _ in range(nsp)]
        d = [draw(st.integers(1, 2)) for _ in range(nsp)]
        pads = [draw(st.integers(0, 2)) for _ in range(2 * nsp)]
        auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
        if auto_pad.startswith("SAME"):
            d = [1] * nsp  # onnxruntime: "Dilation not supported for AutoPadType::SAME_UPPER or SAME_LOWER"
        new = [_out_size(size[a], k[a], s[a], d[a], pads[a], pads[nsp + a], auto_pad) for a in range(nsp)]
        if min(new) < 1:  # keep the graph valid: shrink the kernel to 1 instead
            k, d, new = [1] * nsp, [1] * nsp, [_out_size(size[a], 1, s[a], 1, pads[a], pads[nsp + a], auto_pad)
                                               for a in range(nsp)]
        w = rng.standard_normal((f, c, *k)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"conv{i}.weight"))
        ins = [cur, f"conv{i}.weight"]
        if draw(st.booleans()):
            inits.append(numpy_helper.from_array(rng.standard_normal(f).astype(np.float32), f"conv{i}.bias"))
            ins.append(f"conv{i}.bias")
        attrs = dict(kernel_shape=k, strides=s, dilations=d)
        if auto_pad == "NOTSET":
            attrs["pads"] = pads
        else:
            attrs["auto_pad"] = auto_pad
        nodes.append(helper.make_node("Conv", ins, [f"h{i}"], name=f"conv{i}", **attrs))
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"a{i}"]))
        cur, c, size = f"a{i}", f, new
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape[1:]])
    y = helper.make_tensor_value_info(cur, TensorProto.FLOAT, [f"y{a}" for a in range(len(x_shape))])
    return _model(nodes, [x], [y], inits), x_shape


@st.composite
def linear_chain(draw):
    """1-3 linear layers on a 2-4-D activation: Gemm (2-D only; random transB,
    alpha, beta, bias of shape (f,) or (1, f)) or MatMul with a constant weight."""
    rank = draw(st.integers(2, 4))
    lead = [draw(st.integers(1, 4)) for _ in range(rank - 2)]
    c = draw(st.integers(2, 12))
    x_shape = [2, *lead, c]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    nodes, inits, cur = [], [], "x"
    for i in range(draw(st.integers(1, 3))):
        f = draw(st.integers(2, 12))
        name = f"fc{i}"
        if rank == 2 and draw(st.booleans()):
            tb = draw(st.integers(0, 1))
            alpha = draw(st.sampled_from([1.0, 0.5, -2.0]))
            beta = draw(st.sampled_from([1.0, 0.0, 3.0]))
            w = rng.standard_normal((f, c) if tb else (c, f)).astype(np.float32)
            inits.append(numpy_helper.from_array(w, f"{name}.weight"))
            ins = [cur, f"{name}.weight"]
            if draw(st.booleans()):
                b = rng.standard_normal(draw(st.sampled_from([(f,), (1, f)]))).astype(np.float32)
                inits.append(numpy_helper.from_array(b, f"{name}.bias"))
                ins.append(f"{name}.bias")
            nodes.append(helper.make_node("Gemm", ins, [f"h{i}"], name=name, transB=tb, alpha=alpha, beta=beta))
        else:
            inits.append(numpy_helper.from_array(rng.standard_normal((c, f)).astype(np.float32), f"{name}.weight"))
            nodes.append(helper.make_node("MatMul", [cur, f"{name}.weight"], [f"h{i}"], name=name))
        nodes.append(helper.make_node("Tanh", [f"h{i}"], [f"a{i}"]))
        cur, c = f"a{i}", f
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape[1:]])
    y = helper.make_tensor_value_info(cur, TensorProto.FLOAT, [f"y{a}" for a in range(len(x_shape))])
    return _model(nodes, [x], [y], inits), x_shape


def _model(nodes, inputs, outputs, inits):
    m = helper.make_model(helper.make_graph(nodes, "fuzz", inputs, outputs, initializer=inits),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


@settings(max_examples=50, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=st.one_of(conv_chain(), linear_chain()), data=st.data())
def test_random_graphs_full_rank_reproduces(case, data):
    model, x_shape = case
    _, _, info = analyze(model)
    layers = []
    for l in info.candidates:
        k = data.draw(st.sampled_from(candidate_ks(l.geometry.c, None, l.allow_groups)), label=f"{l.name}.k")
        scheme = data.draw(st.sampled_from(l.schemes), label=f"{l.name}.scheme")
        layers.append(LayerPlan(l.name, l.weight_name, k, scheme, full_rank(l.geometry, k, scheme)))
    new = apply_plan(model, Plan(layers))
    assert count_layer_ops(new) == count_layer_ops(model) + len(layers)
    x = np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)
    assert_same_outputs(model, new, {"x": x}, tol=1e-5)
    if any(l.attrs.spatial_rank for l in info.candidates):  # convs: also at another batch size
        x = np.random.default_rng(1).standard_normal([3] + x_shape[1:]).astype(np.float32)
        assert_same_outputs(model, new, {"x": x}, tol=1e-5)


# ------------------------------------------------------------------------------- (b) mutated model files

DOCUMENTED_EXIT_CODES = {0, 2, 3, 4, 5}
BASES = {"cnn": cnn_model(), "matmul": matmul_model(f=10, c=12, lead=(5,)), "gemm": gemm_model()}


def _raw_ranges(data: bytes, model: onnx.ModelProto) -> list[tuple[int, int]]:
    out = []
    for t in model.graph.initializer:
        if t.raw_data:
            s = data.find(t.raw_data)
            out.append((s, s + len(t.raw_data)))
    return out


def byte_mutant(rng: np.random.Generator, model: onnx.ModelProto) -> bytes:
    """Flip bits, overwrite, insert or delete bytes, or truncate; positions fall
    outside the weights' raw data 85% of the time (mutating weights only is dull)."""
    data = bytearray(model.SerializeToString())
    ranges = _raw_ranges(bytes(data), model)
    structural = [p for p in range(len(data)) if not any(a <= p < b for a, b in ranges)]
    kind = int(rng.integers(5))
    for _ in range(int(rng.integers(1, 4))):
        pos = int(rng.choice(structural)) if rng.random() < 0.85 else int(rng.integers(len(data)))
        pos = min(pos, len(data) - 1)
        if kind == 0:
            data[pos] ^= 1 << int(rng.integers(8))
        elif kind == 1:
            data[pos] = int(rng.integers(256))
        elif kind == 2:
            data[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 5)), dtype=np.uint8).tobytes()
        elif kind == 3:
            del data[pos:pos + int(rng.integers(1, 9))]
        else:
            del data[max(pos, 1):]
            break
    return bytes(data)


def _leaves(msg, out):
    for fd, val in msg.ListFields():
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            for v in (val if fd.is_repeated else [val]):
                _leaves(v, out)
        elif fd.name != "raw_data":
            out += [(msg, fd, i) for i in range(len(val))] if fd.is_repeated else [(msg, fd, None)]
    return out


def field_mutant(rng: np.random.Generator, model: onnx.ModelProto) -> bytes:
    """Change one or two scalar fields anywhere in the model (dims, data types,
    attribute values, names, opset and IR versions, ...) to another value that
    protobuf accepts: it still parses, so the checks after parsing are hit."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    leaves = _leaves(m, [])
    names = sorted({v for n in m.graph.node for v in list(n.input) + list(n.output)})
    for _ in range(int(rng.integers(1, 3))):
        msg, fd, i = leaves[int(rng.integers(len(leaves)))]
        cur = getattr(msg, fd.name)[i] if i is not None else getattr(msg, fd.name)
        if fd.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
            pool = ["", "x", "Conv", "MatMul", "Gemm", "Relu", "BOGUS", "SAME_UPPER"] + names
            new = pool[int(rng.integers(len(pool)))]
            new = new.encode() if fd.type == FieldDescriptor.TYPE_BYTES else new
        elif fd.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
            new = float(rng.choice([0.0, -1.0, 3e38, np.nan, np.inf, cur * 2]))
        elif fd.type == FieldDescriptor.TYPE_BOOL:
            new = not cur
        else:
            new = int(rng.choice([0, 1, -1, 2, 3, 7, 16, cur + 1, cur - 1, 1 << 20]))
            if fd.type in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64):
                new = abs(new)
            elif fd.type == FieldDescriptor.TYPE_ENUM:
                new = abs(new) % 20
        with contextlib.suppress(ValueError, TypeError):
            if i is not None:
                getattr(msg, fd.name)[i] = new
            else:
                setattr(msg, fd.name, new)
    return m.SerializeToString()


def run_cli_in_process(args: list[str], capfd) -> tuple[int, str, str]:
    """``onnx_alds.cli.main(args)`` as the console script runs it; returns the
    exit code and everything written to stdout and stderr (fds 1 and 2 included)."""
    from onnx_alds.cli import main

    root = logging.getLogger()
    saved = list(root.handlers)
    for h in saved:  # so that main's basicConfig logs to the captured stderr
        root.removeHandler(h)
    capfd.readouterr()
    try:
        rc = main(args)
    except SystemExit as e:  # argparse
        rc = e.code
    finally:  # main's handler writes to this test's capture, closed after it: later tests must not log there
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved:
            root.addHandler(h)
    cap = capfd.readouterr()
    return rc, cap.out, cap.err


def check_outcome(rc, stdout, stderr, inp, data, out_dir):
    assert rc in DOCUMENTED_EXIT_CODES, stderr
    assert "Traceback" not in stderr
    assert stdout == ""  # --quiet
    lines = [l for l in stderr.splitlines() if l.strip()]
    if rc != 0:
        assert len(lines) == 1 and lines[0].startswith("onnx-alds: error: "), stderr
    assert inp.read_bytes() == data  # the input is never modified
    written = sorted(os.listdir(out_dir))
    if rc == 0:  # complete, and no temporary file left beside it
        assert written in (["o.onnx"], ["o.onnx", "r.json"]), written
        onnx.checker.check_model(onnx.load(str(out_dir / "o.onnx")))
    else:
        assert written == []  # no partial output (nor report)


CHUNKS, PER_CHUNK = 6, 12


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_mutated_models_only_give_documented_exit_codes(chunk, tmp_path, capfd):
    outcomes = []
    for i in range(chunk * PER_CHUNK, (chunk + 1) * PER_CHUNK):
        rng = np.random.default_rng(1000 + i)
        base = list(BASES.values())[i % len(BASES)]
        data = (byte_mutant if i % 2 else field_mutant)(rng, base)
        d = tmp_path / f"m{i}"
        (d / "out").mkdir(parents=True)
        inp = d / "in.onnx"
        inp.write_bytes(data)
        args = ["rewrite", str(inp), str(d / "out" / "o.onnx"), "--report", str(d / "out" / "r.json"), "--quiet",
                "--no-compare", "--provider", "cpu"]
        if i % 3:
            args.append("--no-validate")
        rc, out, err = run_cli_in_process(args, capfd)
        check_outcome(rc, out, err, inp, data, d / "out")
        outcomes.append(rc)
    assert len(outcomes) == PER_CHUNK


@pytest.mark.slow
def test_mutated_models_through_the_console_script(tmp_path):
    """A few mutants through a real ``python -m onnx_alds`` process."""
    seen = set()
    for i in range(8):
        rng = np.random.default_rng(5000 + i)
        base = list(BASES.values())[i % len(BASES)]
        data = (byte_mutant if i % 2 else field_mutant)(rng, base)
        d = tmp_path / f"m{i}"
        (d / "out").mkdir(parents=True)
        inp = d / "in.onnx"
        inp.write_bytes(data)
        p = subprocess.run([sys.executable, "-m", "onnx_alds", "rewrite", str(inp), str(d / "out" / "o.onnx"),
                            "--quiet", "--no-compare", "--no-validate"], capture_output=True, text=True, timeout=120)
        check_outcome(p.returncode, p.stdout, p.stderr, inp, data, d / "out")
        seen.add(p.returncode)
    assert len(seen) >= 2  # the mutants reach more than the parser
