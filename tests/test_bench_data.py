"""``bench`` on the user's samples: the timing feeds are the samples, the outputs are compared over
them and judged by their kind; flags and data that do not fit the models are one sentence, exit 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import parser

from onnx_alds import rewrite
from onnx_alds.bench import COMPARE_SAMPLES, bench
from onnx_alds.cli import main
from onnx_alds.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
RESNET20 = ROOT / "models" / "resnet20_digits.onnx"
CAL = ROOT / "models" / "digits_calibration.npz"
FAST = ["--repeats", "2", "--warmup", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def halved(tmp_path_factory):
    """ResNet20 at half its parameters from its weights alone: its outputs move on real digits."""
    new, _ = rewrite(RESNET20, allow_slower=True, keep_params=0.5, validate=False, compare=False, progress=False)
    path = tmp_path_factory.mktemp("bench") / "halved.onnx"
    onnx.save(new, str(path))
    return path


def _outputs(path, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def _relu(tmp_path, name="x", batch="N") -> Path:
    m = parser.parse_model(f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[{batch}, 1, 16, 16] {name}) => (float[{batch}, 1, 16, 16] y) {{ y = Relu({name}) }}""")
    path = tmp_path / f"relu_{name}_{batch}.onnx"
    onnx.save(m, str(path))
    return path


def test_the_outputs_are_compared_over_the_given_samples(halved):
    x = np.load(CAL)["input"][:40]
    rows = bench([RESNET20, halved], batches=[1], repeats=2, warmup=0, threads=1, data={"input": x})
    a, b = _outputs(RESNET20, x), _outputs(halved, x)
    assert [r["compared_on"] for r in rows] == ["40 given samples"] * 2
    assert rows[0]["rel_l2_vs_first"] == 0.0 and rows[0]["top1_vs_first"] == 1.0
    assert rows[1]["rel_l2_vs_first"] == pytest.approx(np.linalg.norm(b - a) / np.linalg.norm(a), rel=1e-4)
    assert rows[1]["top1_vs_first"] == pytest.approx(np.mean(a.argmax(1) == b.argmax(1)))
    assert rows[1]["top1_vs_first"] < 1.0 and rows[1]["cosine_vs_first"] is None
    # the user says the output is an embedding: a cosine instead of top-1
    rows = bench([RESNET20, halved], batches=[1], repeats=1, warmup=0, threads=1, data={"input": x},
                 kinds={"logits": "embedding"})
    cos = np.mean(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    assert rows[1]["top1_vs_first"] is None and rows[1]["cosine_vs_first"] == pytest.approx(cos, rel=1e-4)


def test_a_batch_larger_than_the_samples_repeats_them_and_a_fixed_batch_is_kept(tmp_path):
    x = np.load(CAL)["input"][:3]
    rows = bench([RESNET20], batches=[8], repeats=1, warmup=0, threads=1, data={"input": x})
    assert rows[0]["batch"] == 8 and rows[0]["compared_on"] == "3 given samples"
    fixed = _relu(tmp_path, "input", batch="4")  # takes exactly 4 samples: 3 are repeated up to one batch
    rows = bench([fixed], batches=[1], repeats=1, warmup=0, threads=1, data={"input": np.load(CAL)["input"][:3]})
    assert rows[0]["compared_on"] == "4 given samples"
    rows = bench([fixed], batches=[1], repeats=1, warmup=0, threads=1, data={"input": np.load(CAL)["input"][:10]})
    assert rows[0]["compared_on"] == "8 given samples"  # whole batches of 4
    many = np.repeat(np.load(CAL)["input"], 2, axis=0)
    rows = bench([RESNET20], batches=[1], repeats=1, warmup=0, threads=1, data={"input": many})
    assert rows[0]["compared_on"] == f"{COMPARE_SAMPLES} given samples"


def test_a_model_that_takes_an_input_the_data_lacks_is_one_sentence(tmp_path):
    with pytest.raises(UsageError, match=r"takes the input 'x', which the given data does not hold \(it holds input\)"):
        bench([RESNET20, _relu(tmp_path)], batches=[1], repeats=1, warmup=0, data={"input": np.load(CAL)["input"]})


def test_bench_cli_with_data(tmp_path, halved, capsys):
    assert main(["bench", str(RESNET20), str(halved), "--calibration", str(CAL), "--batch", "1,4", *FAST]) == 0
    out = capsys.readouterr().out
    assert "agreement" in out and "top-1 100.0 %" in out and out.rstrip().endswith("outputs compared on 256 given samples")
    script = tmp_path / "feeds.py"
    script.write_text(f"import numpy as np\n\ndef load_data():\n    x = np.load({str(CAL)!r})['input']\n"
                      "    return ({'input': x[i:i + 50]} for i in range(0, 100, 50))\n")
    assert main(["bench", str(RESNET20), str(halved), "--data-loader-script", str(script), *FAST,
                 "--output-kind", "logits:embedding"]) == 0
    out = capsys.readouterr().out
    assert "cos 1.0000" in out and "outputs compared on 100 given samples" in out
    # without data: random inputs, said so, no agreement column
    assert main(["bench", str(RESNET20), *FAST]) == 0
    out = capsys.readouterr().out
    assert "agreement" not in out and "seeded random inputs" in out


@pytest.mark.parametrize("args, sentence", [
    (["--per-tensor"], "--per-tensor applies to --int8 only"),
    (["--output-kind", "probs:scores"], "--output-kind names 'probs', which is not an output of the model"),
    (["--calibration", str(CAL), "--input-shape", "input:1,1,8,8"], "disagrees with the given data's input"),
])
def test_bench_flags_that_do_not_fit_are_exit_2(args, sentence, capsys):
    assert main(["bench", str(RESNET20), *FAST, *args]) == 2
    assert sentence in capsys.readouterr().err


def test_rewrite_refuses_an_output_kind_for_an_output_the_model_lacks(tmp_path, capsys):
    out = tmp_path / "o.onnx"
    assert main(["rewrite", str(RESNET20), str(out), "--keep-params", "0.5", "--output-kind", "logit:scores"]) == 2
    assert "'logit', which is not an output of the model (its outputs: logits)" in capsys.readouterr().err
    assert not out.exists()
