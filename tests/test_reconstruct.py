"""Block-wise reconstruction (``onnx_alds.torch.reconstruct``): which blocks it finds, that it lowers the
held-out output error of a plan-built student without labels and never raises it, that blocks called
with keyword arguments (masks) are replayed as called, and that the student keeps the plan's structure.
Real export, rewrite and apply_plan."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from graphs import rank_share_plan  # noqa: E402
from torch_nets import UpDown  # noqa: E402
from onnx_alds.errors import UsageError  # noqa: E402
from onnx_alds.torch import apply_plan, export, reconstruct  # noqa: E402
from onnx_alds.torch.finetune_loop import feature_matched  # noqa: E402
from onnx_alds.torch.modules import FACTORIZED, data_fitted  # noqa: E402
from onnx_alds.torch.reconstruct import find_blocks, rebatch  # noqa: E402


class Block(nn.Module):
    """A residual MLP block that takes a mask as a keyword, as a transformer layer does."""

    def __init__(self, d=16):
        super().__init__()
        self.fc1, self.fc2, self.norm = nn.Linear(d, 4 * d), nn.Linear(4 * d, d), nn.LayerNorm(d)

    def forward(self, x, *, mask=None):
        h = self.fc2(torch.nn.functional.gelu(self.fc1(x)))
        if mask is not None:
            h = h * mask
        return self.norm(x + h)


class Net(nn.Module):
    def __init__(self, d=16, depth=3):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.head = nn.Linear(d, 5)

    def forward(self, x, mask):
        h = self.embed(x)
        for b in self.blocks:
            h = b(h, mask=mask)
        return self.head(h.mean(1))


def _inputs(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, 8, generator=g)
    mask = (torch.rand(n, 6, 1, generator=g) > 0.2).float()
    return x, mask


def _quarter_rank_plan(path):
    return rank_share_plan(path, 4)


@pytest.fixture(scope="module")
def net_and_plan(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rec")
    torch.manual_seed(0)
    net = Net().eval()
    x, mask = _inputs(4)
    export(net, (x, mask), tmp / "m.onnx")
    return net, _quarter_rank_plan(tmp / "m.onnx")


def _error(student, net, x, mask) -> float:
    with torch.no_grad():
        s, t = student(x, mask), net(x, mask)
    return float((s - t).norm() / t.norm())


def test_blocks_are_the_container_children_and_the_layers_outside_them(net_and_plan):
    net, plan = net_and_plan
    student = apply_plan(net, plan)
    assert find_blocks(student) == ["embed", "blocks.0", "blocks.1", "blocks.2", "head"]
    assert find_blocks(net) == []  # nothing factorized: nothing to reconstruct
    x, mask = _inputs(32)
    rec = reconstruct(net, net, [{"input": (x, mask)}], progress=False)
    assert not rec.kept and rec.blocks == [] and rec.held_out_before is None


def test_in_a_sequential_model_each_factorized_layer_is_a_block(tmp_path):
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    export(seq, torch.randn(4, 8), tmp_path / "s.onnx")
    plan = _quarter_rank_plan(tmp_path / "s.onnx")
    assert len(plan.layers) == 3 and find_blocks(apply_plan(seq, plan)) == ["0", "2", "4"]


def test_reconstruction_lowers_the_held_out_error_without_labels(net_and_plan):
    net, plan = net_and_plan
    student = apply_plan(net, plan)
    x, mask = _inputs()
    new_x, new_mask = _inputs(64, seed=1)  # never seen by reconstruct
    before = _error(student, net, new_x, new_mask)
    structure = [(n, type(m).__name__, tuple(p.shape for p in m.parameters(recurse=False)))
                 for n, m in student.named_modules()]
    teacher_state = {k: v.clone() for k, v in net.state_dict().items()}
    rec = reconstruct(student, net, [{"input": (x[i:i + 32], mask[i:i + 32])} for i in range(0, 96, 32)],
                      progress=False)
    after = _error(student, net, new_x, new_mask)
    assert rec.kept and rec.held_out_after < rec.held_out_before
    assert rec.judged_on == "2 held-out calibration batches of 16"  # 96 samples in batches of 16: the last 32
    assert [b["name"] for b in rec.blocks] == find_blocks(student)
    assert all(b["loss_after"] <= b["loss_before"] for b in rec.blocks)
    assert after < 0.95 * before  # on inputs it never saw (0.58 -> 0.51 here: random weights lose much at rank 1-4)
    assert [(n, type(m).__name__, tuple(p.shape for p in m.parameters(recurse=False)))
            for n, m in student.named_modules()] == structure  # the plan's structure, parameter for parameter
    assert sum(isinstance(m, FACTORIZED) for m in student.modules()) == len(plan.layers)
    # fitted to data now: finetune's automatic feature matching leaves their Linear layers alone
    assert all(data_fitted(m) and not feature_matched(m) for m in student.modules() if isinstance(m, FACTORIZED))
    assert all(torch.equal(v, teacher_state[k]) for k, v in net.state_dict().items())  # the teacher untouched


def test_a_student_that_already_matches_is_given_back_unchanged(net_and_plan, tmp_path):
    net, _ = net_and_plan
    export(net, _inputs(4), tmp_path / "m.onnx")
    student = apply_plan(net, rank_share_plan(tmp_path / "m.onnx", 1))  # full rank: the teacher's function
    state = {k: v.clone() for k, v in student.state_dict().items()}
    x, mask = _inputs(16)
    rec = reconstruct(student, net, [{"input": (x, mask)}], epochs=1, progress=False)
    assert not rec.kept and rec.held_out_after == rec.held_out_before < 1e-5
    assert rec.judged_on.startswith("the calibration batches (also fitted on")  # one batch of 16: none held
    assert all(torch.equal(v, state[k]) for k, v in student.state_dict().items())
    assert not any(data_fitted(m) for m in student.modules() if isinstance(m, FACTORIZED))  # flags given back too


def test_rebatch_keeps_the_samples_in_order_and_passes_other_inputs_as_they_are():
    a, b = torch.arange(10).reshape(10, 1), torch.arange(10, 20).reshape(10, 1)
    out = rebatch([(a[:7], b[:7], 3.0), (a[7:], b[7:], 3.0)], 4)
    assert [len(o[0]) for o in out] == [4, 4, 2]
    assert torch.equal(torch.cat([o[0] for o in out]), a) and torch.equal(torch.cat([o[1] for o in out]), b)
    assert all(o[2] == 3.0 for o in out)
    assert [len(o) for o in rebatch([a[:3], a[3:]], 5)] == [5, 5]


def test_bad_arguments_are_one_sentence(net_and_plan):
    net, plan = net_and_plan
    student = apply_plan(net, plan)
    x, mask = _inputs(16)
    with pytest.raises(UsageError, match="teacher"):
        reconstruct(student, "model.onnx", [{"input": (x, mask)}])
    with pytest.raises(UsageError, match="epochs"):
        reconstruct(student, net, [{"input": (x, mask)}], epochs=0)
    with pytest.raises(UsageError, match="no calibration inputs"):
        reconstruct(student, net, [])
    with pytest.raises(UsageError, match="put both on one device"):
        reconstruct(student, Net().to("meta"), [{"input": (x, mask)}])
    with pytest.raises(UsageError, match="no module 'nope'"):
        reconstruct(student, net, [{"input": (x, mask)}], blocks=["nope"])


def test_every_operator_spec_is_reconstructed(tmp_path):
    """Conv, ConvTranspose and Linear students (weight-only, half rank): each factorized layer outside a
    container is its own block, and reconstruction lowers the error on inputs it never saw."""
    torch.manual_seed(0)
    net = UpDown().eval()
    export(net, torch.randn(4, 6, 4, 4), tmp_path / "m.onnx")
    student = apply_plan(net, rank_share_plan(tmp_path / "m.onnx", 2))
    assert sorted(type(m).__name__ for m in student.modules() if isinstance(m, FACTORIZED)) == \
        ["FactorizedConv", "FactorizedConvTranspose", "FactorizedLinear"]
    assert find_blocks(student) == ["conv", "up", "head"]
    x, new_x = torch.randn(128, 6, 4, 4), torch.randn(64, 6, 4, 4)
    with torch.no_grad():
        before = float((student(new_x) - net(new_x)).norm() / net(new_x).norm())
    rec = reconstruct(student, net, [x], progress=False)
    with torch.no_grad():
        after = float((student(new_x) - net(new_x)).norm() / net(new_x).norm())
    assert rec.kept and [b["name"] for b in rec.blocks] == ["conv", "up", "head"]
    assert after < 0.8 * before  # 0.87 -> 0.55 here
