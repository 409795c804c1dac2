"""The torch side of a Plan computes what the rewritten ONNX computes."""

import onnx
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from graphs import rel_err, run  # noqa: E402
from onnx_alds import apply_plan as onnx_apply_plan  # noqa: E402
from onnx_alds.api import analyze  # noqa: E402
from onnx_alds.cost import full_rank  # noqa: E402
from onnx_alds.plan import LayerPlan, Plan  # noqa: E402
from onnx_alds.torch import export  # noqa: E402
from onnx_alds.torch.modules import apply_plan  # noqa: E402


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, (3, 5), padding=(1, 2), dilation=(1, 1), bias=False)
        self.tok = nn.Linear(12, 16)  # applied to (N, T, 12): MatMul + Add
        self.head = nn.Linear(16, 10)  # applied to (N, 16): Gemm

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.conv2(h))  # (N, 12, 4, 4)
        t = h.flatten(2).transpose(1, 2)  # (N, 16, 12)
        t = torch.relu(self.tok(t)).mean(1)
        return self.head(t)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        net.bn1.running_mean.uniform_(-0.5, 0.5)
        net.bn1.running_var.uniform_(0.5, 2.0)
        net.bn1.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path_factory.mktemp("m") / "net.onnx"
    export(net, (x,), path)
    return net, x, onnx.load(str(path))


def plan_for(model, k, scheme):
    _, _, info = analyze(model)
    entries = []
    for l in info.candidates:
        kk = k if l.geometry.c % k == 0 else 1
        s = scheme if scheme in l.schemes else "s0"
        r = max(1, full_rank(l.geometry, kk, s) // 2)
        entries.append(LayerPlan(l.name, l.weight_name, kk, s, r))
    return Plan(entries)


@pytest.mark.parametrize("scheme", ["s0", "s1", "s2", "s3"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_torch_plan_matches_rewritten_onnx(exported, scheme, k):
    net, x, model = exported
    plan = plan_for(model, k, scheme)
    assert {e.weight for e in plan.layers} >= {"conv1.weight", "conv2.weight", "head.weight"}
    new = onnx_apply_plan(model, plan)
    y_onnx = run(new, {model.graph.input[0].name: x.numpy()})[0]
    fact = apply_plan(net, plan, example_inputs=(x,))
    with torch.no_grad():
        y_torch = fact(x).numpy()
    assert rel_err(y_onnx, y_torch) <= 1e-5
    # and the truncation really changed the network
    with torch.no_grad():
        assert rel_err(net(x).numpy(), y_torch) > 1e-4


def test_export_of_factorized_module_equals_rewrite(exported, tmp_path):
    net, x, model = exported
    plan = plan_for(model, 2, "s1")
    fact = apply_plan(net, plan, example_inputs=(x,))
    path = tmp_path / "fact.onnx"
    export(fact, (x,), path)
    x3 = torch.randn(3, 3, 8, 8).numpy()
    name = model.graph.input[0].name
    y_export = run(onnx.load(str(path)), {onnx.load(str(path)).graph.input[0].name: x3})[0]
    y_rewrite = run(onnx_apply_plan(model, plan), {name: x3})[0]
    assert rel_err(y_rewrite, y_export) <= 1e-5


def test_batchnorm_needs_example_inputs(exported):
    net, x, model = exported
    from onnx_alds.errors import UsageError

    with pytest.raises(UsageError, match="BatchNorm"):
        apply_plan(net, plan_for(model, 1, "s0"))


def test_with_batchnorm_keeps_function_and_folds_away(exported, tmp_path):
    from onnx_alds.torch import with_batchnorm

    net, x, model = exported
    plan = plan_for(model, 2, "s0")
    fact = apply_plan(net, plan, example_inputs=(x,))
    calib = torch.randn(16, 3, 8, 8)
    bn = with_batchnorm(fact, calib)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules()) == 2  # one per factorized conv
    with torch.no_grad():
        assert rel_err(fact(x).numpy(), bn(x).numpy()) <= 1e-5  # identity in eval mode
    a, b = tmp_path / "fact.onnx", tmp_path / "bn.onnx"
    export(fact, (x,), a)
    export(bn, (x,), b)
    ops_a = sorted(n.op_type for n in onnx.load(str(a)).graph.node)
    ops_b = sorted(n.op_type for n in onnx.load(str(b)).graph.node)
    assert ops_b == ops_a and "BatchNormalization" not in ops_b  # folded into the decoders on export


@pytest.mark.parametrize("k", [1, 2])
def test_torch_plan_reproduces_data_aware_factors(exported, tmp_path, k):
    """Data-aware factors depend on the calibration data; the plan carries them
    (plan.factors.npz), and the torch side uses them: torch = ONNX ≤ 1e-4."""
    import onnx_alds

    net, x, model = exported
    name = model.graph.input[0].name
    cal = torch.randn(32, 3, 8, 8).numpy()
    plan = plan_for(model, k, "s0")
    new, rep = onnx_alds.rewrite(model, plan=plan, calibration={name: cal}, error="data", validate=False)
    rep.plan.save(tmp_path / "plan.json")
    fact = apply_plan(net, str(tmp_path / "plan.json"), example_inputs=(x,))
    with torch.no_grad():
        y_torch = fact(torch.from_numpy(cal)).numpy()
    y_onnx = run(new, {name: cal})[0]
    assert rel_err(y_onnx, y_torch) <= 1e-4
    # and they are not the weight-only factors
    weight_only = apply_plan(net, plan, example_inputs=(x,))
    with torch.no_grad():
        assert rel_err(weight_only(torch.from_numpy(cal)).numpy(), y_torch) > 1e-3


def test_torch_apply_plan_checks_the_factors_file(exported, tmp_path):
    """The torch side uses a sidecar's factors only once they fit the module: a scalar bias correction or
    factors of the wrong rank are one UsageError naming the file."""
    import dataclasses

    import numpy as np

    import onnx_alds
    from onnx_alds.errors import UsageError

    net, x, model = exported
    name = model.graph.input[0].name
    plan = plan_for(model, 1, "s0")
    _, rep = onnx_alds.rewrite(model, plan=plan, calibration={name: torch.randn(16, 3, 8, 8).numpy()},
                               error="data", validate=False)
    layer = next(iter(rep.plan.factors))
    good = rep.plan.factors[layer]
    for bad in (dataclasses.replace(good, bias_delta=np.float32(1e3)),
                dataclasses.replace(good, encoder=good.encoder[:1])):
        tampered = dataclasses.replace(rep.plan, factors={**rep.plan.factors, layer: bad})
        with pytest.raises(UsageError, match="factors file"):
            apply_plan(net, tampered, example_inputs=(x,))


def test_a_plan_naming_a_module_no_spec_takes_lists_the_ones_they_take():
    """The sentence lists the torch modules every operator spec takes (it named three of four, leaving
    out ConvTranspose2d); a spec added later is listed too."""
    from onnx_alds.errors import UsageError
    from onnx_alds.ops import SPECS

    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    with pytest.raises(UsageError, match=r"module '1' is a ReLU, not one of the modules a plan factorizes") as e:
        apply_plan(net, Plan([LayerPlan(name="1", weight="1.weight", k=1, scheme="s0", rank=1)]))
    for spec in SPECS.values():
        for t in spec.torch_types():
            assert t.__name__ in str(e.value)
