"""What the CLI writes, and what it must never overwrite: the input's files,
one output with another, special files; full disks, long names, signals and
closed pipes; names from the model printed safely."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import onnx
import pytest

from clitools import assert_one_sentence, cli, digest, main_in_process, snapshot
from graphs import cnn_model, conv_model


@pytest.fixture
def ext_model(tmp_path):
    """cnn_model saved with its weights in m.onnx.data (external data)."""
    src = tmp_path / "m.onnx"
    onnx.save(cnn_model(), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    return src


@pytest.fixture
def cnn_path(tmp_path):
    p = tmp_path / "cnn.onnx"
    onnx.save(cnn_model(), str(p))
    return p


# ------------------------------------------------------------------------ outputs that collide

@pytest.mark.parametrize("args,what", [
    (["m.onnx.data"], "external data"),                                  # OUT = the input's data file
    (["o.onnx", "--report", "m.onnx.data"], "external data"),
    (["o.onnx", "--plot", "m.onnx.data"], "external data"),
    (["o.onnx", "--report", "o.onnx"], "same file"),                     # the report would replace the model
    (["o.onnx", "--report", "r.json", "--plan", "r.json"], "same file"),  # one of the two would be lost
    (["o.onnx", "--plan", "o.onnx.data"], "same file"),                  # OUT's own external data file
    (["o.onnx", "--plot", "r.json", "--report", "r.json"], "same file"),
    (["o.onnx", "--report", "./sub/../o.onnx"], "same file"),            # another spelling of the same path
])
def test_outputs_differ_from_each_other_and_from_the_input_files(ext_model, tmp_path, args, what, capsys,
                                                                 monkeypatch):
    (tmp_path / "sub").mkdir()
    for existing in ("o.onnx", "r.json"):  # left by an earlier run: still must not be clobbered twice
        (tmp_path / existing).write_text("earlier run\n")
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    rc, _, err = main_in_process(capsys, "rewrite", "m.onnx", *args, "--no-validate")
    assert rc == 2 and what in err, err
    assert_one_sentence(err)
    assert snapshot(tmp_path) == before  # nothing written, nothing replaced


def test_output_that_is_a_link_to_the_input_data(ext_model, tmp_path, capsys):
    (tmp_path / "link.onnx").symlink_to(tmp_path / "m.onnx.data")
    before = snapshot(tmp_path)
    rc, _, err = main_in_process(capsys, "rewrite", ext_model, tmp_path / "out.onnx", "--no-validate",
                                 "--report", tmp_path / "link.onnx")
    assert rc == 2 and "external data" in err
    assert snapshot(tmp_path) == before


def test_report_over_the_applied_plan_is_refused(cnn_path, tmp_path, capsys):
    plan = tmp_path / "p.json"
    assert main_in_process(capsys, "rewrite", cnn_path, tmp_path / "a.onnx", "--no-validate", "--plan", plan)[0] == 0
    before = snapshot(tmp_path)
    rc, _, err = main_in_process(capsys, "rewrite", cnn_path, tmp_path / "b.onnx", "--no-validate",
                                 "--apply-plan", plan, "--report", plan)
    assert rc == 2 and "--apply-plan" in err
    assert_one_sentence(err)
    assert snapshot(tmp_path) == before


def test_rewrite_with_external_data_next_to_the_input_still_works(ext_model, tmp_path, capsys):
    data = digest(tmp_path / "m.onnx.data")
    out = tmp_path / "o.onnx"
    out.write_text("an earlier output, to be replaced\n")  # an existing output in the input's directory
    rc, _, err = main_in_process(capsys, "rewrite", ext_model, out, "--no-validate", "--report", tmp_path / "r.json")
    assert rc == 0, err
    assert digest(tmp_path / "m.onnx.data") == data
    onnx.checker.check_model(str(out))


@pytest.mark.parametrize("flag", ["OUT", "--report", "--plan"])
def test_special_files_are_refused_never_replaced(cnn_path, tmp_path, flag, capsys):
    """A device node (root's /dev/null was replaced by a regular file, before) and
    a FIFO.  The device is a private copy of /dev/null's node, never the real one:
    a version with the bug must not break the machine it is tested on."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    specials = [fifo]
    if os.geteuid() == 0:
        import stat

        null = tmp_path / "null"
        os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        specials.append(null)
    for special in specials:
        kind = os.stat(special).st_mode
        args = [special] if flag == "OUT" else [tmp_path / "o.onnx", flag, special]
        rc, _, err = main_in_process(capsys, "rewrite", cnn_path, *args, "--no-validate")
        assert rc == 2 and "not a regular file" in err, err
        assert_one_sentence(err)
        assert os.stat(special).st_mode == kind  # still the device / FIFO
        assert not (tmp_path / "o.onnx").exists()


def test_bench_json_over_a_model_is_refused(cnn_path, tmp_path, capsys):
    before = digest(cnn_path)
    rc, _, err = main_in_process(capsys, "bench", cnn_path, "--repeats", "1", "--warmup", "0", "--json", cnn_path)
    assert rc == 2
    assert_one_sentence(err)
    assert digest(cnn_path) == before


# ------------------------------------------------------------------------ full disks, long names

@pytest.fixture
def tiny_fs(tmp_path):
    """A real 8 KiB file system (tmpfs), so that writes fail with ENOSPC."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("where", ["OUT", "--report", "external"])
def test_full_disk_is_one_sentence_and_leaves_nothing(cnn_path, tmp_path, tiny_fs, where, capsys):
    src = cnn_path
    if where == "external":  # the external-data writer (OUT.data) fills the disk
        src = tmp_path / "ext.onnx"
        onnx.save(conv_model(f=64, c=32), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                  location="ext.onnx.data", size_threshold=0)
    if where == "--report":  # the model fits, the report does not
        out = tmp_path / "o.onnx"
        args = [out, "--report", tiny_fs / "r.json"]
        (tiny_fs / "filler").write_bytes(b"x" * 4096)
        (tiny_fs / "filler2").write_bytes(b"x" * 4000)
    else:
        args = [tiny_fs / "o.onnx"]
    rc, _, err = main_in_process(capsys, "rewrite", src, *args, "--no-validate")
    assert rc == 2 and "disk is full" in err, err
    assert_one_sentence(err)
    assert sorted(p.name for p in tiny_fs.iterdir() if not p.name.startswith("filler")) == []  # no partial file


def test_longest_legal_output_name(cnn_path, tmp_path, capsys):
    """A 250-character name: the temporary name beside it must not exceed 255."""
    out = tmp_path / ("o" * 245 + ".onnx")
    rc, _, err = main_in_process(capsys, "rewrite", cnn_path, out, "--no-validate", "--report",
                                 tmp_path / ("r" * 250))
    assert rc == 0, err
    onnx.checker.check_model(str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([cnn_path.name, out.name, "r" * 250])


def test_longest_legal_output_name_with_external_data(tmp_path):
    from onnx_alds.io import save_model

    out = tmp_path / ("o" * 245 + ".onnx")  # its .data is 250 characters
    written = save_model(cnn_model(), out, external_data=True)
    assert [p.name for p in written] == [out.name, out.name + ".data"]
    onnx.checker.check_model(str(out))


# ------------------------------------------------------------------------ signals and pipes

def _wait_for(cond, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return False


def _shell_like_signals():
    """In the child before exec: SIGINT at its default disposition and neither signal blocked, as a
    shell starts a command (a runner's thread may ignore or block them, and a child inherits both)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_rewrite_cleans_up(tmp_path, sig, code):
    """Killed while validating (its temporary directory exists): no `onnx-alds-*`
    left in $TMPDIR, no temporary file beside OUT, no OUT, no traceback."""
    src = tmp_path / "conv.onnx"  # validation at 2×48×160×160 takes seconds: time to send the signal
    onnx.save(conv_model(f=48, c=48, in_hw=("H", "W")), str(src))
    tmpdir, out_dir = tmp_path / "tmp", tmp_path / "out"
    tmpdir.mkdir()
    out_dir.mkdir()
    env = dict(os.environ, TMPDIR=str(tmpdir))
    # as from a shell: Ctrl-C at its default (a test runner's worker may ignore SIGINT, and a child
    # started with SIGINT ignored rightly leaves it ignored)
    p = subprocess.Popen([sys.executable, "-m", "onnx_alds", "rewrite", str(src), str(out_dir / "o.onnx"),
                          "--no-compare", "--input-shape", "x:1,48,160,160"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         preexec_fn=_shell_like_signals)
    try:
        assert _wait_for(lambda: any(d.name.startswith("onnx-alds-") for d in tmpdir.iterdir())
                         or p.poll() is not None, 240)
        assert p.poll() is None, "the rewrite ended before the signal: make it longer"
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == code, err
    assert "Traceback" not in err
    assert [d.name for d in tmpdir.iterdir() if d.name.startswith("onnx-alds-")] == []
    assert list(out_dir.iterdir()) == []


# Ctrl-C while the heavy modules load, made deterministic: the first import of numpy raises
# KeyboardInterrupt, as a Ctrl-C landing in that import would
_CTRL_C_IN_IMPORT = """
import runpy, sys
class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == "numpy":
            sys.meta_path.remove(self)
            raise KeyboardInterrupt
sys.meta_path.insert(0, CtrlC())
sys.argv = ["onnx-alds"] + sys.argv[1:]
runpy.run_module("onnx_alds", run_name="__main__", alter_sys=True)
"""


def test_ctrl_c_during_start_up_prints_no_traceback(cnn_path):
    p = subprocess.run([sys.executable, "-c", _CTRL_C_IN_IMPORT, "inspect", str(cnn_path)], capture_output=True,
                       text=True, timeout=120)
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode == 130 and p.stderr.strip() == "onnx-alds: interrupted"


def test_closed_stdout_pipe_is_a_quiet_exit(cnn_path):
    """`onnx-alds inspect --json | head -c 0`: the reader is gone before the
    first write (closed at once; the process needs a second to start)."""
    p = subprocess.Popen([sys.executable, "-m", "onnx_alds", "inspect", str(cnn_path), "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    p.wait(timeout=60)
    assert p.returncode == 141, err
    assert err == ""


# ------------------------------------------------------------------------ names from the model

def _evil(tmp_path):
    m = cnn_model()
    evil = "\x1b]0;pwned\x07\x1b[2J\rc1\u202e"
    for n in m.graph.node:
        if n.name == "c1":
            n.name = evil
    p = tmp_path / "evil.onnx"
    onnx.save(m, str(p))
    return p


def test_inspect_and_rewrite_escape_control_characters(tmp_path):
    src = _evil(tmp_path)
    rc, so, se = cli("inspect", src)
    assert rc == 0, se
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\rc1\\u202e" in so  # shown escaped, not executed
    rc, so, se = cli("inspect", src, "--json")
    assert rc == 0 and "\x1b" not in so
    assert any(l["name"] == "\x1b]0;pwned\x07\x1b[2J\rc1\u202e" for l in json.loads(so)["layers"])
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps({"layers": [{"name": "\x1b[31mghost\r", "k": 1, "rank": 1}]}))
    rc, so, se = cli("rewrite", src, tmp_path / "o.onnx", "--apply-plan", plan)
    assert rc == 2
    assert_one_sentence(se)
    for text in (so, se):
        assert not any(ch in text for ch in "\x1b\r\x07\u202e")
    rc, so, se = cli("rewrite", src, tmp_path / "o.onnx", "--no-validate")
    assert rc == 0, se
    assert not any(ch in so + se for ch in "\x1b\r\x07\u202e")


def _non_utf8(tmp_path, placeholder_in):
    m = conv_model()
    m.graph.node[0].name = "NODENAME"
    data = m.SerializeToString()
    if placeholder_in == "node":
        data = data.replace(b"NODENAME", b"N\xffDENAME")
    else:  # a tensor name, read by every node that uses it
        data = data.replace(b"conv.weight", b"conv.w\xff\xfeght")
    p = tmp_path / f"{placeholder_in}.onnx"
    p.write_bytes(data)
    onnx.checker.check_model(str(p))  # the checker accepts it
    return p


@pytest.mark.parametrize("where", ["node", "tensor"])
@pytest.mark.parametrize("command", ["inspect", "rewrite"])
def test_names_that_are_not_utf8_are_an_invalid_model(tmp_path, where, command, capsys):
    src = _non_utf8(tmp_path, where)
    before = digest(src)
    args = [src] if command == "inspect" else [src, tmp_path / "o.onnx", "--report", tmp_path / "r.json"]
    rc, _, err = main_in_process(capsys, command, *args)
    assert rc == 3 and "UTF-8" in err, err
    assert_one_sentence(err)
    assert digest(src) == before and not (tmp_path / "o.onnx").exists()


# ------------------------------------------------------------------------ input shapes

@pytest.mark.parametrize("command", ["rewrite", "inspect", "bench"])
@pytest.mark.parametrize("shape,msg", [("x:1,3,-5,7", "positive"), ("x:1,3,0,7", "positive"),
                                       ("x:", "positive"), ("x:1,3,50000,50000", "GiB")])
def test_bad_or_huge_input_shapes(cnn_path, tmp_path, command, shape, msg, capsys):
    args = {"rewrite": [cnn_path, tmp_path / "o.onnx"], "inspect": [cnn_path], "bench": [cnn_path]}[command]
    t0 = time.monotonic()
    rc, _, err = main_in_process(capsys, command, *args, "--input-shape", shape)
    assert rc == 2 and msg in err, err
    assert_one_sentence(err)
    assert time.monotonic() - t0 < 30  # refused before any allocation
    assert not (tmp_path / "o.onnx").exists()


# ------------------------------------------------------------------------ friction

def test_missing_onnxruntime_is_found_before_the_work(cnn_path, tmp_path):
    """With onnxruntime not importable, the run stops at once (before selection:
    an infeasible budget would otherwise say exit 4) and names --no-validate."""
    code = ("import sys; sys.modules['onnxruntime'] = None; from onnx_alds.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    args = [sys.executable, "-c", code, "rewrite", str(cnn_path), str(tmp_path / "o.onnx"), "--keep-params", "0.01"]
    p = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "onnxruntime" in p.stderr and "--no-validate" in p.stderr
    assert_one_sentence(p.stderr)
    p = subprocess.run(args[:-2] + ["--keep-latency", "0.5", "--no-validate"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "latency budget needs onnxruntime" in p.stderr, p.stderr
    p = subprocess.run(args + ["--no-validate"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 4, p.stderr  # without validation onnxruntime is not needed
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("extra", [["--keep-params", "0.3"], ["--keep-flops", "0.5"], ["--keep-latency", "0.5"],
                                   ["--method", "uniform"], ["--method", "alds"], ["--schemes", "s0"],
                                   ["--k-max", "2"]])
def test_apply_plan_with_selection_options_is_a_usage_error(cnn_path, tmp_path, extra, capsys):
    plan = tmp_path / "p.json"
    assert main_in_process(capsys, "rewrite", cnn_path, tmp_path / "a.onnx", "--no-validate", "--plan", plan)[0] == 0
    rc, _, err = main_in_process(capsys, "rewrite", cnn_path, tmp_path / "b.onnx", "--apply-plan", plan, *extra)
    assert rc == 2 and extra[0] in err and "ignored" in err, err
    assert_one_sentence(err)
    assert not (tmp_path / "b.onnx").exists()


@pytest.mark.parametrize("source,factory", [
    ("import no_such_dependency_xyz\ndef make():\n    pass\n", "usermod:make"),
    ("import no_such_dependency_xyz\ndef make():\n    pass\n", "./usermod.py:make"),
    ("raise RuntimeError('boom at import')\n", "./usermod.py:make"),
    ("raise RuntimeError('boom at import')\n", "usermod:make"),
    ("def make():\n    import no_such_dependency_xyz\n", "usermod:make"),
])
@pytest.mark.slow
def test_errors_in_the_users_factory_module_are_one_sentence(tmp_path, source, factory):
    pytest.importorskip("torch")
    (tmp_path / "usermod.py").write_text(source)
    rc, _, err = cli("export", factory, tmp_path / "o.onnx", "--input-shape", "1,3,8,8", cwd=tmp_path)
    assert rc == 2, err
    assert_one_sentence(err)
    assert "usermod" in err and ("no_such_dependency_xyz" in err or "boom at import" in err)
    assert not (tmp_path / "o.onnx").exists()


_CTRL_C_AFTER_MKDTEMP = """
import os, signal, sys, tempfile
from pathlib import Path
from onnx_alds.io import temp_dir
tempfile.tempdir = sys.argv[1]
real = tempfile.mkdtemp
def mkdtemp_then_ctrl_c(*a, **k):
    name = real(*a, **k)
    os.kill(os.getpid(), signal.SIGINT)  # lands between mkdtemp and the cleanup's registration
    for _ in range(1000):
        pass
    return name
tempfile.mkdtemp = mkdtemp_then_ctrl_c
try:
    with temp_dir("onnx-alds-") as d:
        for _ in range(1000):
            pass
        print("body ran")
except KeyboardInterrupt:
    print("interrupted")
"""


def test_ctrl_c_while_a_temporary_directory_is_made_leaves_nothing(tmp_path):
    """A Ctrl-C right after mkdtemp is recorded until the directory's cleanup is registered (a plain
    TemporaryDirectory leaves the directory behind there). In its own process: the signal is real."""
    p = subprocess.run([sys.executable, "-c", _CTRL_C_AFTER_MKDTEMP, str(tmp_path)], capture_output=True,
                       text=True, timeout=120, preexec_fn=_shell_like_signals)
    assert p.stdout.strip() == "interrupted", p.stdout + p.stderr
    assert list(tmp_path.iterdir()) == []


def _matmul_chain(n: int, d: int) -> onnx.ModelProto:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = (np.random.default_rng(0).standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
    nodes = [helper.make_node("MatMul", [f"h{i - 1}" if i else "x", "w"], [f"h{i}"]) for i in range(n)]
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [d, d])],
                          [helper.make_tensor_value_info(f"h{n - 1}", TensorProto.FLOAT, [d, d])],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_a_signal_stops_the_onnxruntime_run_in_flight():
    """Python runs a signal handler only once the main thread is back from onnxruntime, so SIGTERM
    waited for the run to end (13-16 s on a long one).  Every run takes the shared RunOptions, and
    runtime.cancel_runs (which the CLI's signal watcher calls from its thread) stops the run in flight:
    it raises instead of returning, far short of its 2.6e12 multiply-adds.  allow_runs lets runs go
    on again."""
    import threading

    import numpy as np

    from onnx_alds import runtime

    x = np.ones((2048, 2048), np.float32)
    sess = runtime.session(_matmul_chain(300, 2048), [runtime.CPU], 2, low_memory=True)
    timer = threading.Timer(0.3, runtime.cancel_runs)
    timer.start()
    try:
        with pytest.raises(Exception, match="terminate"):
            sess.run(None, {"x": x})
    finally:
        timer.cancel()
        runtime.allow_runs()
    small = runtime.session(_matmul_chain(2, 8), [runtime.CPU], 1)
    runtime.cancel_runs()  # a run started after the signal stops too
    try:
        with pytest.raises(Exception, match="terminate"):
            small.run(None, {"x": np.ones((8, 8), np.float32)})
    finally:
        runtime.allow_runs()
    assert small.run(None, {"x": np.ones((8, 8), np.float32)})[0].shape == (8, 8)
