"""tools/accuracy_table.py and tools/finetune_model.py end to end on real data.

ResNet20 is trained on digits here (a short run of tools/train_models.py's
recipe, since a clean clone has no artifacts/), compressed with ALDS to half
its parameters, fine-tuned for one epoch and every accuracy measured through
onnxruntime on the exported files.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("onnxruntime")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import accuracy_table  # noqa: E402
import finetune_model  # noqa: E402

TRAIN_EPOCHS = 4


def build_table(tmp):
    out = tmp / "out"
    before = torch.get_num_threads()
    try:
        rc = accuracy_table.main([
            # weight-only plans (a far start, which one epoch recovers from); see the README for short
            # fine-tunes from data-aware plans
            "--models", "resnet20", "--keeps", "0.5", "0.001", "--methods", "alds", "--epochs", "1",
            "--calibration", "0",
            "--artifacts", str(tmp / "artifacts"), "--train-epochs", str(TRAIN_EPOCHS),
            "--out-dir", str(out), "--threads", "1", "--no-progress",
        ])
    finally:
        assert torch.get_num_threads() == before  # main restores the caller's thread count
    assert rc == 0
    with open(out / "accuracy.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return out, rows


@pytest.mark.slow
def test_accuracy_table_end_to_end(tmp_path, capsys):
    """One run (the table is the expensive part, so every check that needs it lives here)."""
    out, rows = build_table(tmp_path)
    printed = capsys.readouterr().out
    assert "fine-tuned %" in printed and "infeasible" in printed
    check_rows(out, rows)
    check_oneshot_file_is_the_plan_applied(tmp_path, out)
    check_finetune_cli_zero_epochs(tmp_path, out, rows, capsys)


def check_rows(out, rows):
    assert set(accuracy_table.COLUMNS) <= set(rows[0])
    assert [(r["model"], float(r["keep"]), r["method"]) for r in rows] == [("resnet20", 0.5, "alds"),
                                                                          ("resnet20", 0.001, "alds")]
    ok, infeasible = rows
    assert ok["status"] == "ok"
    assert 0.3 < float(ok["params_kept"]) <= 0.5 + 1e-9
    assert int(ok["params_after"]) <= 0.5 * int(ok["params_before"])
    assert 0.0 < float(ok["max_eps"]) < 1.0
    acc_orig, acc_one, acc_ft = (float(ok[c]) for c in ("acc_original", "acc_oneshot", "acc_finetuned"))
    assert acc_orig > 0.85  # a real, trained model (450 test images)
    assert acc_ft >= acc_one - 0.02
    assert acc_ft > 0.5
    assert ok["note"] == ""  # the fine-tuned export has exactly the rewrite's parameter count
    # the table's files: original, one-shot and fine-tuned ONNX, the plan, the finetune checkpoint, the plot
    for p in ("onnx/resnet20.onnx", "onnx/resnet20-alds-0p5.onnx", "onnx/resnet20-alds-0p5-ft.onnx",
              "plans/resnet20-alds-0p5.json", "runs/resnet20-alds-0p5/epoch_0001.pt", "accuracy.png"):
        assert (out / p).is_file(), p
    assert (out / "accuracy.png").stat().st_size > 10_000
    # a budget no method can reach is recorded, not raised
    assert infeasible["status"] == "infeasible"
    assert "smallest reachable fraction" in infeasible["note"]
    assert infeasible["acc_finetuned"] == ""


def check_oneshot_file_is_the_plan_applied(tmp, out):
    """The one-shot ONNX and the torch module built from its plan agree (the fine-tune starts from it)."""
    import numpy as np
    import onnxruntime as ort

    from onnx_alds.plan import Plan

    model = finetune_model.load_trained("resnet20", tmp / "artifacts" / "checkpoints" / "resnet20.pt")
    plan = Plan.load(out / "plans" / "resnet20-alds-0p5.json")
    x_te, _ = _test_split()
    compressed = finetune_model.compress(model, plan, x_te[:8], batchnorm=True, calibration_x=x_te)
    with torch.no_grad():
        ref = compressed.eval()(x_te[:64]).numpy()
    sess = ort.InferenceSession(str(out / "onnx" / "resnet20-alds-0p5.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x_te[:64].numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3 * float(np.abs(ref).max()))


def check_finetune_cli_zero_epochs(tmp, out, rows, capsys):
    """The CLI on the table's plan with 0 epochs exports the one-shot model: same accuracy."""
    dst = tmp / "cli.onnx"
    rc = finetune_model.main(["--model", "resnet20", "--plan", str(out / "plans" / "resnet20-alds-0p5.json"),
                              "--checkpoint", str(tmp / "artifacts" / "checkpoints" / "resnet20.pt"),
                              "--epochs", "0", "--out", str(dst), "--threads", "1", "--no-progress"])
    assert rc == 0 and dst.is_file()
    assert "through onnxruntime" in capsys.readouterr().out
    acc, _ = finetune_model.ort_accuracy(dst, *_test_split())
    assert acc == pytest.approx(float(rows[0]["acc_oneshot"]), abs=1 / 450 + 1e-9)


def run_cli(*args):
    return subprocess.run([sys.executable, str(TOOLS / "finetune_model.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def test_finetune_cli_missing_plan_is_one_sentence(tmp_path):
    r = run_cli("--model", "resnet20", "--plan", tmp_path / "nope.json", "--out", tmp_path / "o.onnx")
    assert r.returncode == 2
    err = r.stderr.strip()
    assert err.startswith("error: plan file") and "does not exist" in err and "nope.json" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_finetune_cli_bad_arguments(tmp_path, capsys):
    import models

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"version": 1, "layers": [{"name": "conv1", "weight": "conv1.weight", "k": 1,
                                                          "scheme": "s0", "rank": 2}]}))
    not_a_plan = tmp_path / "not_a_plan.json"
    not_a_plan.write_text('{"layers": 3}')
    vgg_ckpt = tmp_path / "vgg.pt"
    torch.save(models.vgg_small().state_dict(), vgg_ckpt)
    cases = [
        (["--model", "resnet20", "--plan", not_a_plan], "has no 'layers' list"),
        (["--model", "resnet21", "--plan", plan], "unknown model 'resnet21'; choose one of"),
        (["--model", "resnet20", "--plan", plan, "--checkpoint", tmp_path / "missing.pt"], "does not exist"),
        (["--model", "resnet20", "--plan", plan, "--checkpoint", vgg_ckpt], "does not hold the weights of resnet20"),
        (["--model", "vgg_small", "--plan", plan, "--checkpoint", vgg_ckpt], "the plan does not fit this model"),
        (["--model", "resnet20", "--plan", plan, "--epochs", "-1"], "--epochs must be 0 or more"),
        (["--model", "resnet20", "--plan", plan, "--shift", "-1"], "--shift must be 0 or more"),
    ]
    for argv, message in cases:
        rc = finetune_model.main([str(a) for a in argv] + ["--out", str(tmp_path / "x.onnx")])
        err = capsys.readouterr().err.strip()
        assert rc == 2, argv
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.onnx").exists()


def test_random_shift_translates_each_image_by_at_most_shift_pixels():
    """Every augmented image is its original moved by some (dy, dx) in [-d, d]², blank pixels filling the
    border; the labels stay; each offset is drawn; shift 0 gives the training split as it is."""
    import torch.nn.functional as F

    d, fill = 2, -0.8
    x = torch.randn(40, 1, 16, 16)
    y = torch.arange(40)
    ds = finetune_model.RandomShift(x, y, d, fill)
    padded = F.pad(x, (d, d, d, d), value=fill)
    torch.manual_seed(0)
    seen = set()
    for _ in range(4):
        for i in range(len(ds)):
            xi, yi = ds[i]
            assert xi.shape == x[i].shape and int(yi) == int(y[i])
            hits = [(dy, dx) for dy in range(-d, d + 1) for dx in range(-d, d + 1)
                    if torch.equal(xi, padded[i, :, d + dy : d + dy + 16, d + dx : d + dx + 16])]
            assert hits, i
            seen.add(hits[0])
    assert len(seen) == (2 * d + 1) ** 2
    plain = finetune_model.train_loader(64, 0, 0)
    x_tr, y_tr = _train_split()
    assert torch.equal(plain.dataset.tensors[0], x_tr) and torch.equal(plain.dataset.tensors[1], y_tr)
    shifted = finetune_model.train_loader(64, 0, d)
    assert len(shifted) == len(plain) and isinstance(shifted.dataset, finetune_model.RandomShift)


def _train_split():
    from models.data import load_digits_split

    x_tr, y_tr, _, _ = load_digits_split(size=16, seed=0)
    return x_tr, y_tr


def _test_split():
    from models.data import load_digits_split

    _, _, x_te, y_te = load_digits_split(size=16, seed=0)
    return x_te, y_te
