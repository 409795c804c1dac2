"""models/resnet20_digits.onnx: reaches its recorded test accuracy through onnxruntime."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("torch")
pytest.importorskip("sklearn")
import onnx  # noqa: E402

from models.data import digits_normalization, load_digits_split, preprocess_digits  # noqa: E402

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
ONNX_PATH = MODELS_DIR / "resnet20_digits.onnx"
META_PATH = MODELS_DIR / "resnet20_digits.json"


@pytest.fixture(scope="module")
def meta():
    return json.loads(META_PATH.read_text())


@pytest.fixture(scope="module")
def session():
    return ort.InferenceSession(str(ONNX_PATH), providers=["CPUExecutionProvider"])


def test_file_is_small_and_is_the_recorded_one(meta):
    assert ONNX_PATH.stat().st_size < 5_000_000
    assert hashlib.sha256(ONNX_PATH.read_bytes()).hexdigest() == meta["sha256"]
    model = onnx.load(ONNX_PATH)
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Conv") == 21 and ops.count("Gemm") == 1 and "BatchNormalization" not in ops


def test_reaches_recorded_test_accuracy(meta, session):
    _, _, x_te, y_te = load_digits_split(size=meta["input"]["shape"][2], seed=meta["split"]["random_state"])
    assert len(y_te) == meta["n_test"]
    inp = session.get_inputs()[0]
    assert inp.name == meta["input"]["name"]
    assert session.get_providers()[0] == "CPUExecutionProvider"
    logits = session.run(None, {inp.name: x_te.numpy()})[0]
    acc = float((logits.argmax(1) == y_te.numpy()).mean())
    assert abs(acc - meta["test_accuracy"]) <= 0.005
    assert acc > 0.95


def test_recorded_normalization_reproduces_the_inputs(meta):
    """The json's preprocessing recipe alone is enough to feed the model."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    norm = digits_normalization(meta["seed"])
    rec = meta["normalization"]
    assert norm.mean == pytest.approx(rec["mean"]) and norm.std == pytest.approx(rec["std"])
    d = load_digits()
    _, raw_te, _, _ = train_test_split(d.images, d.target, test_size=meta["split"]["test_fraction"],
                                       stratify=d.target, random_state=meta["split"]["random_state"])
    x = preprocess_digits(raw_te, size=meta["input"]["shape"][2], norm=norm)
    _, _, x_te, _ = load_digits_split(size=meta["input"]["shape"][2], seed=meta["seed"])
    np.testing.assert_allclose(x.numpy(), x_te.numpy(), rtol=0, atol=1e-6)


def test_dynamic_batch(session):
    _, _, x_te, _ = load_digits_split(size=16, seed=0)
    name = session.get_inputs()[0].name
    for b in (1, 3):
        assert session.run(None, {name: x_te[:b].numpy()})[0].shape == (b, 10)
