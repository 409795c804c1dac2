"""Which factorized layers the fine-tune's feature matching reaches: every operator spec's torch module
(Conv, ConvTranspose, Linear), and under ``feature_weight="auto"`` all but the Linear layers whose
factors a data-aware plan fitted (docs/finetune.md). Real export, rewrite and onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

import onnx_alds  # noqa: E402
from graphs import rank_share_plan  # noqa: E402
from torch_nets import UpDown  # noqa: E402
from onnx_alds.plan import LayerPlan, Plan  # noqa: E402
from onnx_alds.torch import apply_plan, export  # noqa: E402
from onnx_alds.torch.distill import FeatureMatch  # noqa: E402
from onnx_alds.torch.finetune_config import DEFAULTS, FinetuneConfig  # noqa: E402
from onnx_alds.torch.finetune_loop import _feature_weight, feature_matched  # noqa: E402
from onnx_alds.torch.modules import FACTORIZED, FactorizedLinear, data_fitted  # noqa: E402


def _half_rank_plan(path) -> Plan:
    plan = rank_share_plan(path, 2)
    assert len(plan.layers) == 3
    return plan


@pytest.fixture(scope="module")
def net_and_plans(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fm")
    torch.manual_seed(0)
    net = UpDown().eval()
    x = torch.randn(64, 6, 4, 4)
    export(net, x[:4], tmp / "m.onnx")
    plan = _half_rank_plan(tmp / "m.onnx")
    name = onnx.load(str(tmp / "m.onnx")).graph.input[0].name
    _, rep = onnx_alds.rewrite(str(tmp / "m.onnx"), plan=plan, calibration={name: x.numpy()}, validate=False,
                               compare=False)
    assert rep.plan.factors and set(rep.plan.factors) == {l.name for l in plan.layers}  # data-aware: carried
    return net, x, plan, rep.plan


def test_apply_plan_marks_which_factors_were_fitted_to_data(net_and_plans):
    net, _x, weight_only, data_aware = net_and_plans
    for plan, fitted in ((weight_only, False), (data_aware, True)):
        student = apply_plan(net, plan)
        mods = [m for m in student.modules() if isinstance(m, FACTORIZED)]
        assert len(mods) == 3 and len({type(m) for m in mods}) == 3  # one per spec
        assert [data_fitted(m) for m in mods] == [fitted] * 3


def test_feature_matching_reaches_every_spec_and_sees_the_error(net_and_plans):
    net, x, weight_only, _ = net_and_plans
    student = apply_plan(net, weight_only)
    fm = FeatureMatch(student, net)
    assert len(fm.handles) == 2 * 3  # the transposed conv is matched too
    with torch.no_grad():
        student(x[:8])
        net(x[:8])
    assert float(fm.loss()) > 1e-3  # half rank: every matched layer is off
    fm.remove()
    fm = FeatureMatch(student, net, select=lambda m: not isinstance(m, FactorizedLinear))
    assert len(fm.handles) == 2 * 2  # the predicate picks the layers
    fm.remove()


def test_auto_feature_weight_leaves_out_data_fitted_linears_only(net_and_plans):
    net, _, weight_only, data_aware = net_and_plans
    cfg = FinetuneConfig()
    student = apply_plan(net, weight_only)
    weight, select = _feature_weight(cfg, student, net)
    assert weight == DEFAULTS["feature_weight"]
    assert all(select(m) for m in student.modules() if isinstance(m, FACTORIZED))
    student = apply_plan(net, data_aware)
    weight, select = _feature_weight(cfg, student, net)
    kinds = {type(m).__name__: select(m) for m in student.modules() if isinstance(m, FACTORIZED)}
    assert weight == DEFAULTS["feature_weight"]
    assert kinds == {"FactorizedConv": True, "FactorizedConvTranspose": True, "FactorizedLinear": False}
    # a student whose only factorized layer is a data-fitted Linear gets no feature term at all
    head_only = Plan([l for l in data_aware.layers if l.weight == "head.weight"],
                     factors={k: v for k, v in data_aware.factors.items()
                              if k in {l.name for l in data_aware.layers if l.weight == "head.weight"}})
    student = apply_plan(net, head_only)
    assert not any(feature_matched(m) for m in student.modules())
    assert _feature_weight(cfg, student, net)[0] == 0.0
    # a number given matches every factorized layer, as before
    assert _feature_weight(FinetuneConfig(feature_weight=5.0), student, net) == (5.0, None)


def _arrays(f):
    return [a for a in (f.encoder, f.decoder, f.bias_delta) if a is not None]


@pytest.mark.parametrize("rank", ["one", "half"])
def test_training_a_student_never_writes_the_plan_or_a_sibling(net_and_plans, tmp_path, rank):
    """apply_plan copies the plan's factors into the student: fine-tuning one student leaves the plan's
    arrays and another student of the same plan as they were (a rank-1 Linear's encoder once shared the
    plan's memory), for every spec and both kinds of factors."""
    net, x, weight_only, _ = net_and_plans
    plan = weight_only if rank == "half" else Plan([LayerPlan(l.name, l.weight, 1, "s0", 1)
                                                     for l in weight_only.layers])
    path = tmp_path / "m.onnx"
    export(net, x[:4], path)
    name = onnx.load(str(path)).graph.input[0].name
    _, rep = onnx_alds.rewrite(str(path), plan=plan, calibration={name: x.numpy()}, validate=False, compare=False)
    for p in (plan, rep.plan):
        saved = {k: [np.copy(a) for a in _arrays(f)] for k, f in (p.factors or {}).items()}
        sibling = apply_plan(net, p)
        before = {k: v.clone() for k, v in sibling.state_dict().items()}
        student = apply_plan(net, p)
        opt = torch.optim.SGD(student.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            (student(x) - net(x).detach()).pow(2).mean().backward()
            opt.step()
        assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())  # it did train
        assert all(torch.equal(before[k], v) for k, v in sibling.state_dict().items())
        for k, arrays in saved.items():
            assert all(np.array_equal(a, b) for a, b in zip(arrays, _arrays(p.factors[k])))
