"""3-D convolutions (video, volumes): folded as ``f × c × κt × (κh·κw)``, so the four schemes are the
full-kernel encoder (s0), the (2+1)-D pair of R(2+1)D (s1: spatial then temporal), the other order (s2)
and the full-kernel decoder (s3).  ``tests/test_matrix.py`` runs a 3-D graph through every capability;
these check the geometry cases one by one, and a torch video network end to end."""

import numpy as np
import onnx
import pytest

from graphs import conv_model, rel_err, run
from onnx_alds import apply_plan
from onnx_alds.api import analyze
from onnx_alds.calibration import patches, taps_for
from onnx_alds.cost import full_rank
from onnx_alds.folding import fold
from onnx_alds.plan import LayerPlan, Plan

RNG = np.random.default_rng(7)

CASES = {
    "pads_strides": dict(kernel=(3, 3, 3), in_hw=(6, 9, 8), strides=(1, 2, 2), pads=(1, 1, 0, 1, 1, 1)),
    "dilation": dict(kernel=(2, 3, 3), in_hw=(7, 9, 9), dilations=(2, 1, 2), pads=(1, 1, 2, 1, 1, 2)),
    "same_upper": dict(kernel=(3, 3, 3), in_hw=(5, 9, 10), strides=(2, 2, 1), auto_pad="SAME_UPPER"),
    "spatial_only": dict(kernel=(1, 3, 3), in_hw=(4, 8, 8), pads=(0, 1, 1, 0, 1, 1)),
    "temporal_only": dict(kernel=(3, 1, 1), in_hw=(6, 5, 5), pads=(1, 0, 0, 1, 0, 0)),
}


def layer_of(model):
    _, _, info = analyze(model)
    return info.layer("conv")


def full_rank_model(model, k, scheme):
    layer = layer_of(model)
    return apply_plan(model, Plan([LayerPlan("conv", layer.weight_name, k, scheme,
                                             full_rank(layer.geometry, k, scheme))]))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("scheme", ["s0", "s1", "s2", "s3"])
@pytest.mark.parametrize("k", [1, 2])
def test_full_rank_reproduces_a_3d_conv(case, scheme, k):
    kw = CASES[case]
    model = conv_model(f=8, c=6, **kw)
    layer = layer_of(model)
    assert layer.status == "candidate"
    assert layer.geometry.kernel == (kw["kernel"][0], kw["kernel"][1] * kw["kernel"][2])
    if scheme not in layer.schemes:  # a folding that equals another one for this kernel
        return
    new = full_rank_model(model, k, scheme)
    onnx.checker.check_model(new, full_check=True)
    assert [n.op_type for n in new.graph.node] == ["Conv", "Conv"]
    x = RNG.standard_normal((3, 6, *kw["in_hw"])).astype(np.float32)
    y0, y1 = run(model, {"x": x})[0], run(new, {"x": x})[0]
    assert y1.shape == y0.shape
    assert rel_err(y0, y1) <= 1e-5


def test_s1_is_the_2plus1d_factorization():
    model = conv_model(f=8, c=6, kernel=(3, 3, 3), in_hw=(5, 8, 8), pads=(1, 1, 1, 1, 1, 1))
    layer = layer_of(model)
    new = apply_plan(model, Plan([LayerPlan("conv", layer.weight_name, 2, "s1", 4)]))
    enc, dec = new.graph.node
    attrs = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in (enc, dec)}
    assert attrs[enc.name]["kernel_shape"] == [1, 3, 3] and attrs[enc.name]["group"] == 2
    assert attrs[enc.name]["pads"] == [0, 1, 1, 0, 1, 1]
    assert attrs[dec.name]["kernel_shape"] == [3, 1, 1] and attrs[dec.name]["pads"] == [1, 0, 0, 1, 0, 0]
    weights = {t.name: t for t in new.graph.initializer}
    assert list(weights[enc.input[1]].dims) == [2 * 4, 3, 1, 3, 3]
    assert list(weights[dec.input[1]].dims) == [8, 2 * 4, 3, 1, 1]


@pytest.mark.parametrize("case", sorted(CASES))
def test_patches_are_what_the_folded_weight_multiplies(case):
    kw = CASES[case]
    model = conv_model(f=8, c=6, bias=False, **kw)
    layer = layer_of(model)
    (tap,) = taps_for([layer])
    assert tap.kernel == kw["kernel"] and tap.spatial_rank == 3
    x = RNG.standard_normal((2, 6, *kw["in_hw"])).astype(np.float32)
    y = run(model, {"x": x})[0]  # (N, f, T, H, W)
    w = onnx.numpy_helper.to_array(model.graph.initializer[0])
    wm = fold(layer.spec.weight4(w, layer.attrs), "s0", 1)[0]
    got = patches(x.astype(np.float64), tap) @ wm.T  # rows: sample, then t, h, w
    want = y.transpose(0, 2, 3, 4, 1).reshape(-1, y.shape[1])
    assert np.allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_a_torch_video_network_through_rewrite_apply_plan_and_batchnorm(tmp_path):
    torch = pytest.importorskip("torch")
    from torch import nn

    from onnx_alds.torch import export, with_batchnorm
    from onnx_alds.torch.modules import apply_plan as torch_apply_plan

    class Video(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv3d(3, 12, (3, 5, 5), stride=(1, 2, 2), padding=(1, 2, 2))
            self.bn = nn.BatchNorm3d(12)
            self.spatial = nn.Conv3d(12, 16, (1, 3, 3), padding=(0, 1, 1), bias=False)
            self.temporal = nn.Conv3d(16, 16, (3, 1, 1), stride=(2, 1, 1), padding=(1, 0, 0))
            self.head = nn.Linear(16, 5)

        def forward(self, x):
            h = torch.relu(self.bn(self.stem(x)))
            h = torch.relu(self.temporal(torch.relu(self.spatial(h))))
            return self.head(h.mean((2, 3, 4)))

    torch.manual_seed(0)
    net = Video().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 4, 12, 12)
    path = tmp_path / "video.onnx"
    export(net, (x,), path)
    model = onnx.load(str(path))
    _, _, info = analyze(model)
    convs = [l for l in info.candidates if l.op == "Conv"]
    assert len(convs) == 3
    for scheme in ("s0", "s1", "s2", "s3"):
        plan = Plan([LayerPlan(l.name, l.weight_name, 1, s := (scheme if scheme in l.schemes else "s0"),
                               max(1, full_rank(l.geometry, 1, s) // 2)) for l in convs])
        y_onnx = run(apply_plan(model, plan), {model.graph.input[0].name: x.numpy()})[0]
        fact = torch_apply_plan(net, plan, example_inputs=(x,))
        with torch.no_grad():
            y_torch = fact(x).numpy()
            assert rel_err(net(x).numpy(), y_torch) > 1e-4  # the truncation changed the network
        assert rel_err(y_onnx, y_torch) <= 1e-5
    bn = with_batchnorm(fact, torch.randn(8, 3, 4, 12, 12))
    assert sum(isinstance(m, nn.BatchNorm3d) for m in bn.modules()) == 3  # one per factorized 3-D conv
    with torch.no_grad():
        assert rel_err(fact(x).numpy(), bn(x).numpy()) <= 1e-5  # identity in eval mode
