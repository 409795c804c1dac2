"""Torch modules from outside the zoo through apply_plan and finetune: a BERT-style encoder written with
nn.Linear projections, and torch's own nn.TransformerEncoder (whose attention reads its weights directly)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import onnx_alds  # noqa: E402
from onnx_alds.errors import UsageError  # noqa: E402
from onnx_alds.plan import Plan  # noqa: E402
from onnx_alds.torch import apply_plan, export, finetune  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")


class BertSelfAttention(nn.Module):
    """Named as Hugging Face's BERT names them: query, key, value, then output.dense."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.dense = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        split = lambda z: z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        att = torch.softmax(split(self.query(x)) @ split(self.key(x)).transpose(-2, -1) / (d // self.heads) ** 0.5,
                            dim=-1)
        return self.dense((att @ split(self.value(x))).transpose(1, 2).reshape(b, t, d))


class BertLike(nn.Module):
    def __init__(self, dim=32):
        super().__init__()
        self.embed = nn.Linear(16, dim)
        self.attention = BertSelfAttention(dim)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.intermediate, self.output = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.classifier = nn.Linear(dim, 10)

    def forward(self, x):
        h = self.embed(x.reshape(x.shape[0], 16, 16))
        h = self.ln1(h + self.attention(h))
        h = self.ln2(h + self.output(nn.functional.gelu(self.intermediate(h))))
        return self.classifier(h.mean(1))


def _data(n=96, seed=0):
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def _kl_to(teacher, student, x):
    with torch.no_grad():
        t, s = teacher(x).log_softmax(1), student(x).log_softmax(1)
    return float(nn.functional.kl_div(s, t, log_target=True, reduction="batchmean"))


@pytest.mark.slow  # export + rewrite + 3 epochs: about 50 s on a busy 2-core machine
def test_a_bert_style_encoder_goes_through_apply_plan_and_finetune(tmp_path):
    torch.manual_seed(0)
    model = BertLike().eval()
    x = _data()
    export(model, x[:8], tmp_path / "m.onnx")
    rewritten, rep = onnx_alds.rewrite(str(tmp_path / "m.onnx"), keep_params=0.5, validate=False, compare=False,
                                       allow_slower=True)
    names = {layer.weight for layer in rep.plan.layers}
    assert {"attention.query.weight", "attention.dense.weight"} & names  # the attention's Linears are planned
    student = apply_plan(model, rep.plan)
    sess = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, {sess.get_inputs()[0].name: x[:16].numpy()})[0]
    with torch.no_grad():
        got = student(x[:16]).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)  # the torch twin computes the rewritten file
    before = _kl_to(model, student, x)
    # inputs alone: the teacher is the only target (random weights make a soft teacher that hard labels contradict)
    loader = DataLoader(TensorDataset(x), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    hist = finetune(student, loader, epochs=3, teacher=model, device="cpu", progress=False)
    assert hist["loss"] == "kl" and not hist["kept_start"]
    assert _kl_to(model, student, x) < 0.7 * before  # distillation pulled the student to its teacher


def test_torch_transformer_encoder_fine_tunes_its_linear_layers_and_refuses_attention_weights():
    torch.manual_seed(0)

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(16, 32)
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2,
                                             enable_nested_tensor=False)
            self.head = nn.Linear(32, 10)

        def forward(self, x):
            return self.head(self.enc(self.embed(x.reshape(x.shape[0], 16, 16))).mean(1))

    model = Enc().eval()
    layers = [dict(name=f"enc.layers.{i}.linear{j}", weight=f"enc.layers.{i}.linear{j}.weight", k=1, scheme="s0",
                   rank=4) for i in (0, 1) for j in (1, 2)]
    student = apply_plan(model, {"version": 1, "layers": layers})
    x = _data()
    with torch.no_grad():
        rel = float((student(x) - model(x)).norm() / model(x).norm())
    assert 0 < rel < 1  # factorized, not broken
    before = _kl_to(model, student, x)
    # inputs alone: the teacher is the only target (random weights make a soft teacher that hard labels contradict)
    loader = DataLoader(TensorDataset(x), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    finetune(student, loader, epochs=3, teacher=model, device="cpu", progress=False)
    assert _kl_to(model, student, x) < before
    bad = {"version": 1, "layers": [dict(name="out", weight="enc.layers.0.self_attn.out_proj.weight", k=1,
                                         scheme="s0", rank=4)]}
    with pytest.raises(UsageError, match="MultiheadAttention"):
        apply_plan(model, Plan.from_dict(bad))
