"""onnx-alds finetune: factory + checkpoint + plan + data -> a fine-tuned ONNX file with the plan's structure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("sklearn")
import onnx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FACTORY = '''
import torch
from torch import nn

def make():
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
'''


def cli(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "onnx_alds", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from models.data import load_digits_split

    d = tmp_path_factory.mktemp("ftcli")
    (d / "tiny.py").write_text(FACTORY)
    sys.path.insert(0, str(d))
    try:
        import tiny
    finally:
        sys.path.remove(str(d))
    torch.manual_seed(0)
    model = tiny.make()
    torch.save(model.state_dict(), d / "tiny.pt")
    x_tr, y_tr, x_te, y_te = load_digits_split(size=16, seed=0)
    np.savez(d / "train.npz", x=x_tr[:128].numpy(), y=y_tr[:128].numpy())
    np.savez(d / "val.npz", x=x_te[:64].numpy(), y=y_te[:64].numpy())
    np.savez(d / "nolabels.npz", x=x_tr[:64].numpy())
    (d / "plan.json").write_text(json.dumps({"version": 1, "layers": [
        {"name": "3", "weight": "3.weight", "k": 2, "scheme": "s0", "rank": 3}]}))
    return d


@pytest.mark.slow
def test_finetune_command_writes_the_plans_structure_and_resumes(setup):
    d = setup
    r = cli("finetune", d / "tiny.py:make", "--checkpoint", d / "tiny.pt", "--plan", d / "plan.json",
            "--data", d / "train.npz", "--val", d / "val.npz", "--epochs", "2", "--batch-size", "32",
            "--checkpoint-dir", d / "ck", "--out", d / "out.onnx", cwd=d)
    assert r.returncode == 0, r.stderr
    assert "fine-tuned 2 epochs (kl loss" in r.stdout
    proto = onnx.load(d / "out.onnx")
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert len(convs) == 3  # conv 0, and conv 3 as encoder + decoder
    groups = [next((a.i for a in n.attribute if a.name == "group"), 1) for n in convs]
    assert sorted(groups) == [1, 1, 2] and "BatchNormalization" not in [n.op_type for n in proto.graph.node]
    sess = ort.InferenceSession(str(d / "out.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {sess.get_inputs()[0].name: np.zeros((3, 1, 16, 16), np.float32)})[0].shape == (3, 10)
    assert sorted(p.name for p in (d / "ck").iterdir()) == ["epoch_0001.pt", "epoch_0002.pt"]
    again = cli("finetune", d / "tiny.py:make", "--checkpoint", d / "tiny.pt", "--plan", d / "plan.json",
                "--data", d / "train.npz", "--epochs", "2", "--checkpoint-dir", d / "ck", "--out", d / "again.onnx",
                cwd=d)
    assert again.returncode == 0 and "resumed" in again.stdout


@pytest.mark.slow
def test_finetune_command_without_labels_distils_and_bad_input_is_one_sentence(setup):
    d = setup
    base = ["finetune", d / "tiny.py:make", "--checkpoint", d / "tiny.pt", "--plan", d / "plan.json"]
    r = cli(*base, "--data", d / "nolabels.npz", "--epochs", "1", "--out", d / "nl.onnx", cwd=d)
    assert r.returncode == 0, r.stderr
    assert "(kl loss" in r.stdout and (d / "nl.onnx").is_file()
    for extra, words in ((["--data", d / "missing.npz"], "does not exist"),
                         (["--data", d / "plan.json"], "not a readable .npz"),
                         (["--data", d / "nolabels.npz", "--no-teacher"], "nothing to learn from")):
        r = cli(*base, *extra, "--out", d / "bad.onnx", cwd=d)
        err = r.stderr.strip()
        assert r.returncode == 2 and words in err and len(err.splitlines()) == 1, err
        assert not (d / "bad.onnx").exists()


# ---------------------------------------------------------------------------------------------------------------
# hostile inputs: one sentence and the right exit code, nothing written, no hang, nothing left in $TMPDIR
# ---------------------------------------------------------------------------------------------------------------

from clitools import assert_one_sentence, main_in_process  # noqa: E402


def _base(d):
    return ["finetune", d / "tiny.py:make", "--checkpoint", d / "tiny.pt", "--plan", d / "plan.json"]


def test_bad_finetune_data_is_one_sentence(setup, capsys):
    d = setup
    x = np.load(d / "train.npz")["x"][:32]
    y = np.load(d / "train.npz")["y"][:32]
    nan_x = x.copy()
    nan_x[3, 0, 4, 4] = np.nan
    cases = {"channels": (dict(x=np.repeat(x, 3, axis=1), y=y), "does not fit the model"),
             "ints": (dict(x=(x * 10).astype(np.int64), y=y), "integers"),
             "labels": (dict(x=x, y=np.where(np.arange(32) == 5, 12, y)), "label 12"),
             "negative": (dict(x=x, y=np.where(np.arange(32) == 5, -1, y)), "label -1"),
             "nan": (dict(x=nan_x, y=y), "NaN")}
    for name, (arrays, words) in cases.items():
        np.savez(d / f"bad_{name}.npz", **arrays)
        rc, _, err = main_in_process(capsys, *_base(d), "--data", d / f"bad_{name}.npz", "--epochs", "1",
                                     "--out", d / "bad.onnx")
        assert rc == 2 and words in err, (name, err)
        assert_one_sentence(err)
        assert not (d / "bad.onnx").exists()


def _declaring(path, shape, y=None):
    """An .npz whose x declares ``shape`` (float32) but holds 1 MB: reading x fails, its header does not."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", header.getvalue() + bytes(1 << 20))
        if y is not None:
            buf = io.BytesIO()
            np.lib.format.write_array(buf, y)
            z.writestr("y.npy", buf.getvalue())


def test_finetune_data_is_judged_by_its_header_before_it_is_read(setup, capsys):
    """x of the wrong shape, or y of another length, as their headers declare them: refused before the
    gigabytes they declare are read (a file that only declares them could not be read at all)."""
    d = setup
    _declaring(d / "wide.npz", (1 << 20, 3, 16, 16))  # 3 GiB declared, 3 channels for a 1-channel model
    _declaring(d / "long.npz", (1 << 20, 1, 16, 16), y=np.zeros(4, np.int64))
    for name, words in (("wide", "(1048576, 3, 16, 16)"), ("long", "x has 1048576 samples, y 4")):
        rc, _, err = main_in_process(capsys, *_base(d), "--data", d / f"{name}.npz", "--epochs", "1",
                                     "--out", d / "bad.onnx")
        assert rc == 2 and words in err, (name, err)
        assert_one_sentence(err)
        assert not (d / "bad.onnx").exists()


def test_teacher_that_is_no_regular_file_is_refused(setup, capsys, tmp_path):
    """--teacher-onnx naming a FIFO: onnxruntime would block opening it; refused instead."""
    import signal

    d = setup
    os.mkfifo(tmp_path / "t.onnx")
    old = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("finetune hung")))
    signal.alarm(120)
    try:
        rc, _, err = main_in_process(capsys, *_base(d), "--data", d / "train.npz", "--epochs", "1",
                                     "--teacher-onnx", tmp_path / "t.onnx", "--out", tmp_path / "bad.onnx")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert rc == 2 and "not a regular file" in err, err
    assert_one_sentence(err)
    assert not (tmp_path / "bad.onnx").exists()


def test_nan_in_the_weights_or_the_factors_is_refused(setup, capsys):
    from onnx_alds.factorize import weight_factors
    from onnx_alds.plan import Plan

    d = setup
    state = torch.load(d / "tiny.pt", weights_only=True)
    state["3.weight"][0, 0, 1, 1] = float("nan")
    torch.save(state, d / "nan.pt")
    rc, _, err = main_in_process(capsys, "finetune", d / "tiny.py:make", "--checkpoint", d / "nan.pt", "--plan",
                                 d / "plan.json", "--data", d / "train.npz", "--epochs", "1", "--out", d / "bad.onnx")
    assert rc == 3 and "NaN" in err and "'3.weight'" in err, err
    assert_one_sentence(err)
    # a data-aware plan's factors sidecar with one NaN: the compressed model is refused before training
    plan = Plan.load(d / "plan.json")
    clean = torch.load(d / "tiny.pt", weights_only=True)
    w = clean["3.weight"].numpy()  # BatchNorm folding changes the weights, not where a NaN lands
    f = weight_factors(w, 2, "s0", 3)
    f.decoder[2, 1, 0, 0] = np.nan
    plan.factors = {"3": f}
    plan.save(d / "nan_plan.json")
    rc, _, err = main_in_process(capsys, "finetune", d / "tiny.py:make", "--checkpoint", d / "tiny.pt", "--plan",
                                 d / "nan_plan.json", "--data", d / "train.npz", "--epochs", "1", "--out",
                                 d / "bad.onnx")
    # refused before training: by the sidecar's own check (exit 2, a bad plan input) or, for factors that
    # pass it, by the compressed model's (exit 3)
    assert rc in (2, 3) and "NaN" in err and "factors" in err, err
    assert_one_sentence(err)
    assert not (d / "bad.onnx").exists()


def test_checkpoint_dir_takes_regular_files_and_refuses_pickles_safely(setup, capsys, tmp_path):
    import signal

    d = setup
    ck = tmp_path / "ck"
    ck.mkdir()
    os.mkfifo(ck / "epoch_0009.pt")  # read, it would block forever
    old = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("finetune hung")))
    signal.alarm(120)
    try:
        rc, out, err = main_in_process(capsys, *_base(d), "--data", d / "train.npz", "--epochs", "1",
                                       "--checkpoint-dir", ck, "--out", tmp_path / "ok.onnx")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert rc == 0 and "resumed" not in out, err
    assert (ck / "epoch_0001.pt").is_file() and (tmp_path / "ok.onnx").is_file()
    # a pickle with objects torch refuses to load with weights_only=True, named like the latest checkpoint
    import argparse

    torch.save({"model": argparse.Namespace(a=1)}, ck / "epoch_0002.pt")
    rc, _, err = main_in_process(capsys, *_base(d), "--data", d / "train.npz", "--epochs", "3",
                                 "--checkpoint-dir", ck, "--out", tmp_path / "bad.onnx")
    assert rc == 2 and "epoch_0002.pt" in err and "fresh" in err, err
    assert "weights_only=False" not in err
    assert_one_sentence(err)
    # the original's --checkpoint: the same refusal, with what is safe instead
    rc, _, err = main_in_process(capsys, "finetune", d / "tiny.py:make", "--checkpoint", ck / "epoch_0002.pt",
                                 "--plan", d / "plan.json", "--data", d / "train.npz", "--out", tmp_path / "bad.onnx")
    assert rc == 2 and "weights_only=False" not in err and "state_dict" in err, err
    assert_one_sentence(err)
    assert not (tmp_path / "bad.onnx").exists()


@pytest.mark.slow
def test_finetune_and_export_leave_no_torchinductor_directory(setup, tmp_path):
    d = setup
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp))
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    r = subprocess.run([sys.executable, "-m", "onnx_alds", *map(str, _base(d)), "--data", d / "train.npz",
                        "--epochs", "1", "--out", tmp_path / "out.onnx"], capture_output=True, text=True,
                       timeout=300, cwd=d, env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.onnx").is_file()
    assert sorted(p.name for p in tmp.iterdir()) == []  # no torchinductor_<user>, no leftover scratch


def test_finetune_command_reconstructs_first_when_asked(setup, capsys):
    """--reconstruct N: the compressed model is reconstructed block by block on the first N inputs of
    --data before the fine-tune (no labels needed); the output error it reports fell, or it says it gave
    the start back; the file written has the plan's structure.  By default on for a weight-only plan,
    off for a data-aware one."""
    d = setup
    rc, out, err = main_in_process(capsys, *_base(d), "--data", d / "nolabels.npz", "--epochs", "1",
                                   "--reconstruct", "64", "--out", d / "rec.onnx")
    assert rc == 0, err
    line = next(l for l in out.splitlines() if l.startswith("reconstructed "))
    assert line.startswith("reconstructed 1 blocks: output relative L2 ")
    before, after = (float(v) for v in line.split("relative L2 ")[1].split(" on ")[0].split(" -> "))
    assert after < before or line.endswith("(no better: given back)")
    convs = [n for n in onnx.load(d / "rec.onnx").graph.node if n.op_type == "Conv"]
    assert sorted(next((a.i for a in n.attribute if a.name == "group"), 1) for n in convs) == [1, 1, 2]
    # by default a plan whose factors came from the weights alone is reconstructed first; 0 turns it off
    rc, out, err = main_in_process(capsys, *_base(d), "--data", d / "nolabels.npz", "--epochs", "1",
                                   "--out", d / "auto.onnx")
    assert rc == 0 and "reconstructed 1 blocks" in out, err
    rc, out, err = main_in_process(capsys, *_base(d), "--data", d / "nolabels.npz", "--epochs", "1",
                                   "--reconstruct", "0", "--out", d / "off.onnx")
    assert rc == 0 and "reconstructed" not in out, err
    from onnx_alds.plan import Plan
    from onnx_alds.torch.finetune_cli import AUTO_RECONSTRUCT, _reconstruct_samples

    weight_only = Plan.load(d / "plan.json")
    data_aware = Plan(weight_only.layers, factors={"3": object()})
    assert (_reconstruct_samples(None, weight_only), _reconstruct_samples(None, data_aware)) == (AUTO_RECONSTRUCT, 0)
    assert _reconstruct_samples(64, data_aware) == 64
    with pytest.raises(SystemExit) as e:  # argparse: exit 2, the option named
        main_in_process(capsys, *_base(d), "--data", d / "nolabels.npz", "--reconstruct", "-1", "--out", d / "r.onnx")
    assert e.value.code == 2 and "argument --reconstruct" in capsys.readouterr().err


@pytest.mark.slow
def test_a_model_of_several_inputs_is_exported_and_fine_tuned_from_the_command_line(tmp_path):
    from torch_nets import TOKEN_ENCODER_SOURCE

    """A token model (input_ids, attention_mask) through export, rewrite and finetune: the CLI took one
    input x only, and export fed float32 only. --data holds one array per forward parameter, by name;
    the ONNX inputs carry those names; the fine-tuned model agrees with the original better than the
    one-shot rewrite does, on tokens it was not trained on."""
    (tmp_path / "enc.py").write_text(TOKEN_ENCODER_SOURCE)
    sys.path.insert(0, str(tmp_path))
    try:
        import enc
    finally:
        sys.path.remove(str(tmp_path))
    rng = np.random.default_rng(0)

    def tokens(n):
        ids = rng.integers(0, 50, (n, 12))
        mask = (np.arange(12) < rng.integers(3, 13, (n, 1))).astype(np.float32)
        return ids, mask, (ids[:, 0] % 4)  # the class: the first token's id mod 4

    torch.manual_seed(0)
    net = enc.make()
    ids, mask, y = tokens(2048)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for i in range(0, 2048 * 3, 64):  # three passes: a confident original
        j = slice(i % 2048, i % 2048 + 64)
        loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(ids[j]), torch.from_numpy(mask[j])),
                                                 torch.from_numpy(y[j]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(net.state_dict(), tmp_path / "enc.pt")
    np.savez(tmp_path / "train.npz", input_ids=ids[:512], attention_mask=mask[:512], y=y[:512])
    np.savez(tmp_path / "cal.npz", input_ids=ids[512:768], attention_mask=mask[512:768])
    factory = [tmp_path / "enc.py:make", "--checkpoint", tmp_path / "enc.pt"]
    p = cli("export", *factory, tmp_path / "enc.onnx", "--input-shape", "2,12:int64", "--input-shape", "2,12",
            cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    p = cli("rewrite", tmp_path / "enc.onnx", tmp_path / "small.onnx", "--keep-params", "0.6", "--allow-slower",
            "--calibration", tmp_path / "cal.npz", "--plan", tmp_path / "plan.json", "-q", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    p = cli("finetune", *factory, "--plan", tmp_path / "plan.json", "--data", tmp_path / "train.npz",
            "--out", tmp_path / "ft.onnx", "--epochs", "3", "--optimizer", "adamw", "--lr", "3e-3", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    t_ids, t_mask, _ = tokens(512)
    feeds = {"input_ids": t_ids, "attention_mask": t_mask}

    def top1(path):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
        return sess.run(None, feeds)[0].argmax(1)

    ref = top1(tmp_path / "enc.onnx")
    one_shot, tuned = np.mean(top1(tmp_path / "small.onnx") == ref), np.mean(top1(tmp_path / "ft.onnx") == ref)
    assert tuned > one_shot and tuned > 0.8, (one_shot, tuned)  # here 0.85 -> 0.90
    ft, small = onnx.load(str(tmp_path / "ft.onnx")), onnx.load(str(tmp_path / "small.onnx"))
    assert sum(t.dims[0] * t.dims[1] for t in ft.graph.initializer if len(t.dims) == 2) < \
        sum(t.dims[0] * t.dims[1] for t in onnx.load(str(tmp_path / "enc.onnx")).graph.initializer if len(t.dims) == 2)
    np.savez(tmp_path / "bad.npz", ids=ids[:64], y=y[:64])
    p = cli("finetune", *factory, "--plan", tmp_path / "plan.json", "--data", tmp_path / "bad.npz",
            "--out", tmp_path / "bad.onnx", cwd=tmp_path)
    assert p.returncode == 2 and "its forward takes input_ids, attention_mask" in p.stderr
