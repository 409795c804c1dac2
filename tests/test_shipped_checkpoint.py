"""models/resnet20_digits.pt is the state dict of models/resnet20_digits.onnx."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

import models  # noqa: E402
from models.data import load_digits_split  # noqa: E402

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
META = json.loads((MODELS_DIR / "resnet20_digits.json").read_text())
PT = MODELS_DIR / META["checkpoint"]["file"]

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_checkpoint_is_the_recorded_file():
    assert PT.stat().st_size < 2_000_000
    assert hashlib.sha256(PT.read_bytes()).hexdigest() == META["checkpoint"]["sha256"]


def test_checkpoint_computes_what_the_shipped_onnx_computes():
    model = models.build(META["model"])
    model.load_state_dict(torch.load(PT, map_location="cpu", weights_only=True))
    model.eval()
    _, _, x_te, y_te = load_digits_split(size=16, seed=META["split"]["random_state"])
    with torch.no_grad():
        ours = model(x_te).numpy()
    sess = ort.InferenceSession(str(MODELS_DIR / META["file"]), providers=["CPUExecutionProvider"])
    theirs = sess.run(None, {sess.get_inputs()[0].name: x_te.numpy()})[0]
    scale = float(np.abs(theirs).max())
    assert float(np.abs(ours - theirs).max()) <= 1e-4 * scale  # BN folded on one side only: float rounding
    assert (ours.argmax(1) == theirs.argmax(1)).all()
    assert float((ours.argmax(1) == y_te.numpy()).mean()) == pytest.approx(META["test_accuracy"], abs=1e-6)
