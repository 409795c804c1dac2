"""onnx_alds.torch.export: BN folding, numerical equality through onnxruntime, dynamic batch, names."""

from __future__ import annotations

import os

import numpy as np
import pytest

from onnx_alds.errors import UsageError

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from onnx import numpy_helper  # noqa: E402
from torch import nn  # noqa: E402

import models  # noqa: E402
from onnx_alds.torch.export import (  # noqa: E402
    export,
    export_from_factory,
    fold_batchnorm,
    weight_to_module,
)

LAYER_OPS = ("Conv", "Gemm", "MatMul")


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial statistics and affine parameters (as after training)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.6 - 0.3)
    return model.eval()


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def ort_run(path, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return randomize_bn(models.resnet20())


@pytest.fixture(scope="module")
def resnet_onnx(resnet, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "resnet20.onnx"
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    proto = export(resnet, x, path)
    return path, proto


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    return models.transformer_small().eval()


@pytest.fixture(scope="module")
def transformer_onnx(transformer, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "transformer.onnx"
    proto = export(transformer, torch.randn(2, 1, 16, 16), path)
    return path, proto


# --- BN folding ---------------------------------------------------------------------------------


def test_fold_batchnorm_preserves_outputs_and_removes_every_bn(resnet):
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    folded = fold_batchnorm(resnet, x[:2])
    with torch.no_grad():
        ref, out = resnet(x), folded(x)
    assert rel(out, ref) <= 1e-5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    # every conv gained the BN's shift as a bias; the input model is untouched
    assert all(m.bias is not None for m in folded.modules() if isinstance(m, nn.Conv2d))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in resnet.modules()) == 21
    assert resnet.conv1.bias is None


class _SharedConvOutput(nn.Module):
    """conv -> bn, and the conv's raw output is also used: the BN must not be folded."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        z = self.bn(y) + y
        return self.bn2(self.conv2(z))


class _LinearBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.fc(x))))


def test_fold_batchnorm_leaves_a_bn_whose_input_is_also_used_elsewhere():
    torch.manual_seed(0)
    m = randomize_bn(_SharedConvOutput())
    x = torch.randn(2, 3, 5, 5)
    folded = fold_batchnorm(m, x)
    assert isinstance(folded.bn, nn.BatchNorm2d)  # kept
    assert isinstance(folded.bn2, nn.Identity)  # folded into conv2
    with torch.no_grad():
        assert rel(folded(x), m(x)) <= 1e-5


def test_fold_batchnorm_linear_bn1d():
    torch.manual_seed(0)
    m = randomize_bn(_LinearBN())
    x = torch.randn(4, 6)
    folded = fold_batchnorm(m, x)
    assert isinstance(folded.bn, nn.Identity)
    with torch.no_grad():
        assert rel(folded(x), m(x)) <= 1e-5


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_fold_batchnorm_after_a_transposed_conv(dims, tmp_path):
    """A decoder's ConvTranspose + BatchNorm (U-Nets, detector heads) folds and exports; a transposed conv
    stores its output channels second, which the fold must know (it was an internal error)."""
    up = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims](4, 6, 3, stride=2, padding=1)
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](6)
    torch.manual_seed(0)
    m = randomize_bn(nn.Sequential(up, bn, nn.ReLU()))
    x = torch.randn(2, 4, *(5,) * dims)
    folded = fold_batchnorm(m, x)
    assert isinstance(folded[1], nn.Identity)
    with torch.no_grad():
        assert rel(folded(x), m(x)) <= 1e-5
    path = tmp_path / "up.onnx"
    export(m, (x,), path)
    with torch.no_grad():
        assert rel(torch.from_numpy(ort_run(path, x.numpy())), m(x)) <= 1e-5
    assert "BatchNormalization" not in [n.op_type for n in onnx.load(str(path)).graph.node]


# --- export -------------------------------------------------------------------------------------


def test_exported_resnet_matches_torch_through_onnxruntime(resnet, resnet_onnx):
    path, proto = resnet_onnx
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = resnet(x).numpy()
    assert rel(ort_run(path, x.numpy()), ref) <= 1e-5
    ops = [n.op_type for n in proto.graph.node]
    assert "BatchNormalization" not in ops
    assert ops.count("Conv") == 21 and ops.count("Gemm") == 1
    # weights are initializers, not Constant nodes
    assert "Constant" not in ops


def test_dynamic_batch_1_and_3(resnet, resnet_onnx):
    path, proto = resnet_onnx
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.HasField("dim_value")
    for b in (1, 3):
        x = torch.randn(b, 1, 16, 16, generator=torch.Generator().manual_seed(b))
        out = ort_run(path, x.numpy())
        assert out.shape == (b, 10)
        with torch.no_grad():
            assert rel(out, resnet(x).numpy()) <= 1e-5


def test_export_with_batch_one_example_stays_dynamic(tmp_path):
    torch.manual_seed(0)
    m = models.mobilenet_small().eval()
    path = tmp_path / "m.onnx"
    export(m, torch.randn(1, 1, 16, 16), path)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert rel(ort_run(path, x.numpy()), m(x).numpy()) <= 1e-5


def _check_names(model, proto):
    """Every Conv/Gemm/MatMul weight initializer is <module>.weight of the BN-folded model."""
    folded = fold_batchnorm(model, torch.randn(2, 1, 16, 16))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    n_layers = 0
    for node in proto.graph.node:
        if node.op_type not in LAYER_OPS or node.input[1] not in inits:
            continue
        wname = node.input[1]
        assert wname.endswith(".weight"), wname
        mod = weight_to_module(model, wname)
        path = wname[: -len(".weight")]
        assert mod is model.get_submodule(path)
        assert node.name == path
        w = folded.get_submodule(path).weight.detach().numpy()
        stored = inits[wname]
        if node.op_type == "MatMul":
            stored = stored.T  # MatMul keeps W as in x out
        np.testing.assert_allclose(stored, w, rtol=0, atol=0)
        n_layers += 1
    return n_layers


def test_resnet_initializer_names_map_back_to_modules(resnet, resnet_onnx):
    _, proto = resnet_onnx
    assert _check_names(resnet, proto) == 22  # 21 convs + fc
    names = {t.name for t in proto.graph.initializer}
    assert {"conv1.weight", "conv1.bias", "layer1.0.conv1.weight", "layer2.0.shortcut.0.weight", "fc.weight"} <= names


def test_transformer_matmul_weights_named_and_outputs_match(transformer, transformer_onnx):
    path, proto = transformer_onnx
    assert _check_names(transformer, proto) == 14  # embed, 2 x (q, k, v, out, fc1, fc2), head
    names = {t.name for t in proto.graph.initializer}
    assert {"layers.0.attn.q.weight", "layers.0.attn.q.bias", "layers.1.fc2.weight", "head.weight"} <= names
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert rel(ort_run(path, x.numpy()), transformer(x).numpy()) <= 1e-5


def test_weight_to_module_forms(resnet):
    assert weight_to_module(resnet, "layer1.0.conv1.weight") is resnet.layer1[0].conv1
    assert weight_to_module(resnet, "layer2.0.shortcut.0.bias") is resnet.layer2[0].shortcut[0]
    assert weight_to_module(resnet, "p_layer1_0_conv1_weight") is resnet.layer1[0].conv1
    from onnx_alds.errors import UsageError

    with pytest.raises(UsageError):
        weight_to_module(resnet, "val_12")


def test_export_leaves_model_alone_and_writes_atomically(tmp_path):
    torch.manual_seed(0)
    m = models.vgg_small()
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    export(m, torch.randn(2, 1, 16, 16), tmp_path / "v.onnx")
    assert m.training
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert sorted(os.listdir(tmp_path)) == ["v.onnx"]


# --- export_from_factory ------------------------------------------------------------------------

FACTORY_SRC = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.mean(dim=(2, 3)))

def make():
    return Net()
'''


def test_export_from_factory_file_path_with_checkpoint(tmp_path):
    src = tmp_path / "mynet.py"
    src.write_text(FACTORY_SRC)
    ns: dict = {}
    exec(compile(FACTORY_SRC, str(src), "exec"), ns)
    torch.manual_seed(0)
    trained = randomize_bn(ns["make"]())
    ckpt = tmp_path / "net.pt"
    torch.save(trained.state_dict(), ckpt)

    out = tmp_path / "net.onnx"
    proto = export_from_factory(f"{src}:make", out, checkpoint=ckpt, input_shapes=[(1, 3, 6, 6)])
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        assert rel(ort_run(out, x.numpy()), trained(x).numpy()) <= 1e-5
    names = {t.name for t in proto.graph.initializer}
    assert {"conv.weight", "conv.bias", "fc.weight", "fc.bias"} <= names


def test_export_from_factory_module_path(tmp_path):
    out = tmp_path / "m.onnx"
    export_from_factory("models.mobilenet:mobilenet_small", out, input_shapes=[(2, 1, 16, 16)], opset=18)
    proto = onnx.load(out)
    assert any(o.domain in ("", "ai.onnx") and o.version == 18 for o in proto.opset_import)


@pytest.mark.parametrize(
    "factory",
    ["no_colon_here", "models.resnet:", ":resnet20", "models.resnet:not_there", "no_such_pkg_xyz:f",
     "/does/not/exist.py:make", "models.resnet:resnet20 extra"],
)
def test_export_from_factory_bad_factory_is_one_sentence(factory, tmp_path):
    with pytest.raises(UsageError) as e:
        export_from_factory(factory, tmp_path / "x.onnx", input_shapes=[(1, 1, 16, 16)])
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith(".")
    assert not (tmp_path / "x.onnx").exists()


def test_export_from_factory_missing_checkpoint(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        export_from_factory("models.resnet:resnet20", tmp_path / "x.onnx", checkpoint=tmp_path / "nope.pt",
                            input_shapes=[(1, 1, 16, 16)])


def test_export_from_factory_checkpoint_that_does_not_fit(tmp_path):
    ckpt = tmp_path / "other.pt"
    torch.save(models.vgg_small().state_dict(), ckpt)
    with pytest.raises(UsageError, match="does not fit"):
        export_from_factory("models.resnet:resnet20", tmp_path / "x.onnx", checkpoint=ckpt,
                            input_shapes=[(1, 1, 16, 16)])


def test_opset_below_18_is_refused(tmp_path):
    with pytest.raises(UsageError, match="opset 18 or newer"):
        export(models.mobilenet_small(), torch.randn(2, 1, 16, 16), tmp_path / "m.onnx", opset=17)
    assert not (tmp_path / "m.onnx").exists()


def test_large_model_path_writes_external_data(tmp_path, monkeypatch):

    import onnx_alds.io

    # one external-data policy: the core's writer decides for the exporter too
    monkeypatch.setattr(onnx_alds.io, "EXTERNAL_DATA_THRESHOLD", 1000)
    torch.manual_seed(0)
    m = models.mobilenet_small().eval()
    path = tmp_path / "big.onnx"
    export(m, torch.randn(2, 1, 16, 16), path)
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert rel(ort_run(path, x.numpy()), m(x).numpy()) <= 1e-5


def test_export_of_a_token_model_takes_each_inputs_dtype(tmp_path, capsys):
    """Token ids fed as float32 (the only example inputs export made) were an internal error, exit 1;
    each --input-shape now takes its dtype, and a model that fails on what it was fed is one sentence
    naming the shapes and dtypes, exit 2."""
    from onnx_alds.cli import main
    from torch_nets import TOKEN_ENCODER_SOURCE

    (tmp_path / "enc.py").write_text(TOKEN_ENCODER_SOURCE)
    out = tmp_path / "enc.onnx"
    factory = f"{tmp_path / 'enc.py'}:make"
    assert main(["export", factory, str(out), "--input-shape", "2,16"]) == 2
    err = capsys.readouterr().err
    assert "fails on example inputs 2,16:float32" in err and "--input-shape D1,D2,...:DTYPE" in err and not out.exists()
    torch.manual_seed(0)  # the factory's initialisation, made again below
    assert main(["export", factory, str(out), "--input-shape", "2,16:int64", "--input-shape", "2,16:float32"]) == 0
    m = onnx.load(str(out))
    assert [i.type.tensor_type.elem_type for i in m.graph.input] == [onnx.TensorProto.INT64, onnx.TensorProto.FLOAT]
    ids = np.random.default_rng(0).integers(0, 50, (3, 16)).astype(np.int64)  # any id, any batch
    mask = (np.random.default_rng(1).random((3, 16)) < 0.7).astype(np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        None, {m.graph.input[0].name: ids, m.graph.input[1].name: mask})[0]
    import importlib.util

    spec = importlib.util.spec_from_file_location("enc_again", tmp_path / "enc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    with torch.no_grad():
        want = mod.make().eval()(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))
    assert main(["export", factory, str(out), "--input-shape", "2,16:int8"]) == 2
    assert "the dtype must be one of float32, float16, int64, int32, bool" in capsys.readouterr().err
