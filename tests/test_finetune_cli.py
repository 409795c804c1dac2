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
