"""onnx_alds.torch.finetune on real data (scikit-learn digits): loss goes down, checkpoints, resume,
distillation, warm-up, BatchNorm insertion, early stopping, threads."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import models  # noqa: E402
from models.data import load_digits_split  # noqa: E402
from onnx_alds.errors import UsageError  # noqa: E402
from onnx_alds.torch.finetune import evaluate, finetune, latest_checkpoint  # noqa: E402


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_digits_split(size=16, seed=0)


def loaders(digits, n_train=256, batch=32, seed=0):
    x_tr, y_tr, x_te, y_te = digits
    g = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(x_tr[:n_train], y_tr[:n_train]), batch_size=batch, shuffle=True, generator=g)
    test = DataLoader(TensorDataset(x_te, y_te), batch_size=256)
    return train, test


def small_model(seed=0):
    torch.manual_seed(seed)
    return models.mobilenet_small()


def test_digits_split_is_fixed_and_stratified(digits):
    x_tr, y_tr, x_te, y_te = digits
    assert x_tr.shape == (1347, 1, 16, 16) and x_te.shape == (450, 1, 16, 16)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert abs(float(x_tr.mean())) < 1e-3
    counts = torch.bincount(y_te, minlength=10)
    assert int(counts.min()) >= 43 and int(counts.max()) <= 47  # 25% of each class
    again = load_digits_split(size=16, seed=0)
    assert torch.equal(again[0], x_tr) and torch.equal(again[3], y_te)


def test_a_few_steps_lower_the_loss(digits):
    train, _ = loaders(digits)
    # no BatchNorm here, so eval-mode loss is not blurred by lagging running statistics
    torch.manual_seed(0)
    model = models.transformer_small()
    loss_before, acc_before = evaluate(model, train)
    hist = finetune(model, train, epochs=2, lr=3e-3, optimizer="adamw", device="cpu", progress=False, warmup=0.0)
    loss_after, acc_after = evaluate(model, train)
    assert loss_after < 0.8 * loss_before
    assert hist["epoch"] == [1, 2]
    assert hist["train_loss"][1] < hist["train_loss"][0]
    assert hist["start_epoch"] == 0 and hist["resumed_from"] is None
    assert acc_after > acc_before, (acc_before, acc_after)
    assert hist["lr"][-1] < 1e-6  # the cosine ends at 0
    assert not hist["kept_start"]  # it got better: the fine-tuned weights stay


def test_a_fine_tune_that_only_hurts_gives_the_start_back(digits):
    train, _ = loaders(digits)
    torch.manual_seed(0)
    model = models.transformer_small()
    finetune(model, train, epochs=2, lr=3e-3, optimizer="adamw", device="cpu", progress=False, warmup=0.0)
    start = {k: t.clone() for k, t in model.state_dict().items()}
    loss_start, _ = evaluate(model, train)
    # a learning rate far too high: training samples score worse at the end, so the start comes back
    hist = finetune(model, train, epochs=1, lr=50.0, optimizer="sgd", device="cpu", progress=False)
    assert hist["kept_start"]
    assert all(torch.equal(start[k], t) for k, t in model.state_dict().items())
    assert evaluate(model, train)[0] == pytest.approx(loss_start)


def test_evaluate_matches_a_direct_computation(digits):
    _, test = loaders(digits)
    model = small_model().eval()
    loss, acc = evaluate(model, test)
    x, y = digits[2], digits[3]
    with torch.no_grad():
        logits = model(x)
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-5)
    assert acc == pytest.approx(float((logits.argmax(1) == y).float().mean()))


def test_checkpoints_are_written_and_a_second_call_resumes(digits, tmp_path):
    train, test = loaders(digits, n_train=128)
    ck = tmp_path / "ck"
    model = small_model()
    h1 = finetune(model, train, epochs=1, val_loader=test, lr=0.05, checkpoint_dir=ck, device="cpu", progress=False)
    assert h1["start_epoch"] == 0
    assert sorted(p.name for p in ck.iterdir()) == ["epoch_0001.pt"]
    state = torch.load(ck / "epoch_0001.pt", weights_only=True)
    assert state["epoch"] == 1
    assert {"model", "optimizer", "scheduler", "history"} <= set(state)

    # a fresh model object: the weights must come from the checkpoint
    model2 = small_model(seed=123)
    h2 = finetune(model2, train, epochs=3, val_loader=test, lr=0.05, checkpoint_dir=ck, device="cpu", progress=False)
    assert h2["start_epoch"] == 1
    assert h2["resumed_from"].endswith("epoch_0001.pt")
    assert h2["epoch"] == [1, 2, 3]
    assert len(h2["val_acc"]) == 3 and h2["train_loss"][0] == h1["train_loss"][0]
    assert latest_checkpoint(ck).name == "epoch_0003.pt"
    assert torch.load(ck / "epoch_0003.pt", weights_only=True)["epoch"] == 3

    # already done: nothing trains, the weights are the last checkpoint's
    model3 = small_model(seed=7)
    h3 = finetune(model3, train, epochs=3, lr=0.05, checkpoint_dir=ck, device="cpu", progress=False)
    assert h3["start_epoch"] == 3 and h3["epoch"] == [1, 2, 3]
    for a, b in zip(model2.state_dict().values(), model3.state_dict().values()):
        assert torch.equal(a, b)

    # resume=False starts over
    h4 = finetune(small_model(), train, epochs=1, lr=0.05, checkpoint_dir=tmp_path / "ck2", resume=False,
                  device="cpu", progress=False)
    assert h4["start_epoch"] == 0


def test_interrupted_run_resumes_to_the_same_weights(digits, tmp_path):
    """Losing the last epoch and resuming gives the uninterrupted run's weights (same schedule, RNG, batches)."""
    train, _ = loaders(digits, n_train=96)
    ck = tmp_path / "ck"
    full = small_model()
    finetune(full, train, epochs=2, lr=0.05, checkpoint_dir=ck, device="cpu", progress=False)
    (ck / "epoch_0002.pt").unlink()  # as if killed during epoch 2

    train_again, _ = loaders(digits, n_train=96)
    resumed = small_model()
    h = finetune(resumed, train_again, epochs=2, lr=0.05, checkpoint_dir=ck, device="cpu", progress=False)
    assert h["start_epoch"] == 1
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), name


def test_bad_arguments():
    one = [(torch.zeros(2, 1, 16, 16), torch.zeros(2, dtype=torch.long))]
    cases = [(dict(optimizer="rmsprop"), "optimizer"), (dict(warmup=1.5), "warmup"), (dict(patience=0), "patience"),
             (dict(distill_loss="l1", teacher=small_model(1)), "distill_loss"), (dict(batchnorm="yes"), "batchnorm"),
             (dict(feature_weight=1.0, teacher="nope.onnx"), "feature_weight")]
    for kwargs, word in cases:
        with pytest.raises(UsageError, match=word):
            finetune(small_model(), one, epochs=1, progress=False, device="cpu", **kwargs)
    with pytest.raises(UsageError, match="empty"):
        finetune(small_model(), [], epochs=1, progress=False)
    m = small_model()
    with pytest.raises(UsageError, match="original"):
        finetune(m, one, teacher=m, progress=False)
    with pytest.raises(UsageError, match="targets"):
        finetune(small_model(), [(torch.zeros(2, 1, 16, 16),)], epochs=1, progress=False, device="cpu")


# ---------------------------------------------------------------------------------------------------------------
# schedule, distillation, BatchNorm, early stopping, threads
# ---------------------------------------------------------------------------------------------------------------

from onnx_alds.torch.distill import FeatureMatch, OnnxTeacher, distillation_loss, pick_loss  # noqa: E402
from onnx_alds.torch.finetune import auto_threads, lr_factor  # noqa: E402


def test_lr_warms_up_linearly_then_follows_a_cosine_to_zero():
    total, w = 100, 10
    f = [lr_factor(s, total, w) for s in range(total + 1)]
    assert f[:w] == pytest.approx([(s + 1) / w for s in range(w)])
    assert f[w] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[w:], f[w + 1:]))  # non-increasing after the warm-up
    assert f[w + (total - w) // 2] == pytest.approx(0.5)
    assert f[total] == pytest.approx(0.0, abs=1e-12)
    assert [lr_factor(s, 4, 0) for s in range(5)] == pytest.approx([1.0, 0.5 + 0.5 * 2 ** -0.5, 0.5,
                                                                    0.5 - 0.5 * 2 ** -0.5, 0.0])


def test_kl_distillation_is_the_documented_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    y = torch.randint(0, 10, (6,), generator=g)
    T, alpha = 3.0, 0.7
    p_t = torch.softmax(t / T, 1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(s / T, 1))).sum(1).mean()
    want = (1 - alpha) * torch.nn.functional.cross_entropy(s, y) + alpha * T * T * kl
    got = distillation_loss([s], [t], y, kind="kl", alpha=alpha, temperature=T)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    # a teacher that agrees with the student adds nothing; without labels the soft term is all
    same = distillation_loss([s], [s.clone()], y, kind="kl", alpha=alpha, temperature=T)
    assert float(same) == pytest.approx(float((1 - alpha) * torch.nn.functional.cross_entropy(s, y)), rel=1e-5)
    assert float(distillation_loss([s], [t], None, kind="kl", alpha=alpha, temperature=T)) == pytest.approx(
        float(T * T * kl), rel=1e-5)


def test_output_matching_losses_and_the_automatic_choice():
    logits, labels = torch.randn(4, 10), torch.randint(0, 10, (4,))
    emb = torch.randn(4, 3, 8)
    assert pick_loss("auto", [logits], labels) == "kl"
    assert pick_loss("auto", [logits], None) == "kl"
    assert pick_loss("auto", [emb], None) == "mse"  # not class scores
    assert pick_loss("auto", [logits], torch.randn(4, 10)) == "mse"  # float targets: regression
    assert pick_loss("auto", [logits, logits], labels) == "mse"  # several outputs
    t = torch.randn(4, 3, 8)
    mse = distillation_loss([emb], [t], None, kind="mse", alpha=0.5, temperature=1.0)
    assert float(mse) == pytest.approx(float(((emb - t) ** 2).mean() / (t ** 2).mean()), rel=1e-5)
    assert float(distillation_loss([2 * t], [t], None, kind="cosine", alpha=0.5, temperature=1.0)) == \
        pytest.approx(0.0, abs=1e-6)  # cosine ignores the scale
    assert float(distillation_loss([-t], [t], None, kind="cosine", alpha=0.5, temperature=1.0)) == \
        pytest.approx(2.0, rel=1e-5)


def _linear_onnx(weight: torch.Tensor, bias: torch.Tensor, path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    f, c = weight.shape
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["flat"], axis=1), helper.make_node("Gemm", ["flat", "W", "b"], ["y"],
                                                                                transB=1)],
        "teacher", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", f])],
        [numpy_helper.from_array(weight.numpy().astype(np.float32), "W"),
         numpy_helper.from_array(bias.numpy().astype(np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_label_free_distillation_from_an_onnx_teacher(digits, tmp_path):
    pytest.importorskip("onnxruntime")
    from torch import nn

    x_tr = digits[0][:256]
    torch.manual_seed(0)
    target = nn.Linear(256, 10)
    path = _linear_onnx(target.weight.detach(), target.bias.detach(), tmp_path / "teacher.onnx")
    teacher = OnnxTeacher(path)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x_tr[:5])[0], target(x_tr[:5].flatten(1)), rtol=1e-4, atol=1e-4)
    student = nn.Sequential(nn.Flatten(), nn.Linear(256, 10))
    inputs_only = DataLoader(TensorDataset(x_tr), batch_size=32, shuffle=True,
                             generator=torch.Generator().manual_seed(0))

    def gap():
        with torch.no_grad():
            s, t = student(x_tr), teacher(x_tr)[0]
        return float(((s - t) ** 2).mean() / (t ** 2).mean())

    before = gap()
    hist = finetune(student, inputs_only, epochs=3, teacher=str(path), lr=0.05, device="cpu", progress=False)
    assert hist["loss"] == "kl" and hist["train_acc"] == [None, None, None]
    assert gap() < 0.5 * before
    assert hist["train_loss"][-1] < hist["train_loss"][0]


def test_an_embedding_student_matches_its_torch_teacher(digits):
    from torch import nn

    x_tr = digits[0][:128]
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(2))  # (N, 4, 256) embeddings
    student = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(2))
    loader = [(x_tr[i:i + 32],) for i in range(0, 128, 32)]
    with torch.no_grad():
        before = float(nn.functional.mse_loss(student(x_tr), teacher(x_tr)))
    hist = finetune(student, loader, epochs=3, teacher=teacher, lr=0.05, device="cpu", progress=False)
    with torch.no_grad():
        after = float(nn.functional.mse_loss(student(x_tr), teacher(x_tr)))
    assert hist["loss"] == "mse" and after < 0.5 * before
    assert all(p.requires_grad for p in teacher.parameters())  # the teacher is used, not modified


def _vgg_plan(rank=4):
    from onnx_alds.plan import Plan

    ranks = (32, 64, 64) if rank == "full" else (rank,) * 3  # full: the filter counts of these layers
    layers = [dict(name=f"features.{i}", weight=f"features.{i}.weight", k=1, scheme="s0", rank=r)
              for i, r in zip((3, 7, 10), ranks)]
    return Plan.from_dict({"version": 1, "layers": layers})


def _seeded_vgg():
    torch.manual_seed(0)
    return models.vgg_small()


def _compressed_vgg(digits, rank=4):
    from onnx_alds.torch import apply_plan

    return apply_plan(_seeded_vgg(), _vgg_plan(rank), example_inputs=digits[2][:8])


def test_batchnorm_is_inserted_for_training_and_folded_back(digits):
    from onnx_alds.torch import batchnorm as bn
    from onnx_alds.torch.modules import FactorizedConv

    small = _compressed_vgg(digits)
    assert bn.needs_batchnorm(small)
    keys = set(small.state_dict())
    x = digits[2][:64]
    with torch.no_grad():
        ref = small.eval()(x)
    plain = len(bn.plain_convs(small))  # the dense convs (their folded BatchNorm is back too)
    assert plain >= 1
    assert bn.insert(small, [digits[0][:256]], lambda m, b: m(b)) == 3 + plain
    assert sum(isinstance(m, bn.ConvBN) for m in small.modules()) == plain
    assert not bn.needs_batchnorm(small)
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(x), ref, rtol=1e-4, atol=1e-4)  # identity in eval mode
    assert bn.fold(small) == 3 + plain
    assert set(small.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(x), ref, rtol=1e-4, atol=1e-4)

    train, _ = loaders(digits, n_train=64)
    h = finetune(small, train, epochs=1, device="cpu", progress=False)
    assert h["batchnorm_inserted"] == 3 + plain
    assert set(small.state_dict()) == keys  # the plan's structure again
    assert sum(isinstance(m, FactorizedConv) for m in small.modules()) == 3
    assert finetune(_compressed_vgg(digits), train, epochs=1, batchnorm=False, device="cpu",
                    progress=False)["batchnorm_inserted"] == 0

    class Broken(list):  # read whole once (BatchNorm calibration), then fails after one training step
        passes = 0

        def __iter__(self):
            self.passes += 1
            batches = list.__iter__(self)
            yield from (batches if self.passes == 1 else [next(batches)])
            if self.passes > 1:
                raise RuntimeError("disk gone")

    interrupted = _compressed_vgg(digits)
    broken = Broken(list(train))
    with pytest.raises(RuntimeError, match="disk gone"):
        finetune(interrupted, broken, epochs=1, threads=1, device="cpu", progress=False)
    assert broken.passes == 2  # it failed in training, after BatchNorm went in
    assert set(interrupted.state_dict()) == keys  # folded back even so
    assert finetune(small_model(), train, epochs=1, device="cpu", progress=False)["batchnorm_inserted"] == 0


def test_recalibration_gives_the_exact_statistics_of_the_final_weights(digits):
    from onnx_alds.torch import batchnorm as bn

    small = _compressed_vgg(digits)
    cal = [digits[0][:128], digits[0][128:256]]
    bn.insert(small, cal, lambda m, b: m(b))
    small.train()
    opt = torch.optim.SGD(small.parameters(), lr=0.05)
    for _ in range(3):  # move the weights: the running averages now lag behind them
        opt.zero_grad()
        small(digits[0][:64]).square().mean().backward()
        opt.step()
    pairs = [m for m in small.modules() if isinstance(m, (bn.FactorizedConvBN, bn.ConvBN))]
    seen = {id(p): [] for p in pairs}
    # what each BatchNorm sees during the recalibration pass (upstream ones normalise by batch statistics,
    # as in training)
    hooks = [p[0].register_forward_hook(lambda mod, i, o, k=id(p): seen[k].append(o.detach())) for p in pairs]
    small.eval()
    assert bn.recalibrate(small, cal, lambda m, b: m(b)) == len(pairs) > 3
    for h in hooks:
        h.remove()
    assert not small.training and all(p[1].momentum == 0.1 for p in pairs)  # modes and momentum restored
    for p in pairs:
        out = torch.cat(seen[id(p)]).double()
        dims = [d for d in range(out.dim()) if d != 1]
        n = out.numel() // out.shape[1]
        torch.testing.assert_close(p[1].running_mean.double(), out.mean(dims), rtol=1e-4, atol=1e-4)
        # BatchNorm's running variance is the unbiased one
        torch.testing.assert_close(p[1].running_var.double(), out.var(dims, unbiased=False) * n / (n - 1),
                                   rtol=1e-3, atol=1e-5)


def test_feature_matching_sees_the_factorization_error(digits):
    from onnx_alds.torch.export import fold_batchnorm

    folded = fold_batchnorm(_seeded_vgg(), digits[2][:8])  # the plan's layers are the BN-folded ones
    x = digits[2][:16]
    losses = {}
    for rank in (4, "full"):
        small = _compressed_vgg(digits, rank)
        fm = FeatureMatch(small, folded)
        with torch.no_grad():
            small.eval()(x)
            folded(x)
        losses[rank] = float(fm.loss())
        fm.remove()
    assert losses["full"] < 1e-8  # a full-rank factorization reproduces every layer
    assert losses[4] > 1e-3


def _constant_model():
    """Outputs that no trainable weight changes: the validation score never improves."""
    from torch import nn

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fixed = nn.Linear(256, 10).requires_grad_(False)
            self.unused = nn.Parameter(torch.ones(3))  # moved by weight decay only

        def forward(self, x):
            return self.fixed(x.flatten(1)) + 0.0 * self.unused.sum()

    return M()


def test_early_stopping_keeps_the_best_epoch_and_stays_stopped(digits, tmp_path):
    train, test = loaders(digits, n_train=64)
    ck = tmp_path / "ck"
    m = _constant_model()
    start = m.unused.detach().clone()
    h = finetune(m, train, epochs=10, val_loader=test, patience=2, lr=0.5, weight_decay=0.1, checkpoint_dir=ck,
                 device="cpu", progress=False)
    # no epoch beats the starting weights (epoch 0): stopped after `patience` epochs, the start given back
    assert h["epoch"] == [1, 2] and h["stopped_early"] and h["best_epoch"] == 0
    assert h["start"]["val_loss"] == pytest.approx(h["val_loss"][0])
    w1 = torch.load(ck / "epoch_0001.pt", weights_only=True)["model"]["unused"]
    w2 = torch.load(ck / "epoch_0002.pt", weights_only=True)["model"]["unused"]
    assert not torch.allclose(w1, w2) and not torch.allclose(w1, start)
    assert torch.equal(m.unused.detach(), start)  # the best weights (the start), not the last epoch's
    again = finetune(_constant_model(), train, epochs=10, val_loader=test, patience=2, checkpoint_dir=ck,
                     device="cpu", progress=False)
    assert again["start_epoch"] == 2 and again["epoch"] == [1, 2] and again["stopped_early"]
    # without patience it runs to the end; without restore_best it keeps the last epoch's weights
    last = _constant_model()
    h = finetune(last, train, epochs=3, val_loader=test, patience=None, restore_best=False, lr=0.5,
                 weight_decay=0.1, checkpoint_dir=tmp_path / "ck2", device="cpu", progress=False)
    assert h["epoch"] == [1, 2, 3] and not h["stopped_early"] and h["best_epoch"] == 0
    assert torch.equal(last.unused.detach(), torch.load(tmp_path / "ck2" / "epoch_0003.pt",
                                                        weights_only=True)["model"]["unused"])


def test_threads(monkeypatch, digits):
    import os
    from torch import nn

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    x = digits[0][:2]
    assert auto_threads(small_model(), x) == 1  # a small model: one thread
    big = nn.Conv2d(128, 128, 3, padding=1)  # 604 M multiply-accumulates per 64x64 sample
    assert auto_threads(big, torch.zeros(1, 128, 64, 64)) == min(len(os.sched_getaffinity(0)), 6)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert auto_threads(small_model(), x) == 3  # the user's choice wins
    before = torch.get_num_threads()
    train, _ = loaders(digits, n_train=32)
    h = finetune(small_model(), train, epochs=1, threads=2, device="cpu", progress=False)
    assert h["threads"] == 2 and torch.get_num_threads() == before


def test_defaults_recover_a_network_without_batchnorm_instead_of_giving_the_start_back(digits):
    """An MLP (no BatchNorm to insert) at ranks 11 and 20: with the feature term's large gradients,
    unclipped SGD (the defaults before max_grad_norm) left it worse and the start was given back."""
    from torch import nn

    from onnx_alds.torch import apply_plan

    x_tr, y_tr, _, _ = digits
    torch.manual_seed(0)
    original = nn.Sequential(nn.Flatten(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                             nn.Linear(128, 10))
    train, _ = loaders(digits, n_train=512, batch=32)
    finetune(original, train, epochs=4, lr=3e-3, optimizer="adamw", device="cpu", progress=False)
    original.eval()
    plan = {"version": 1, "layers": [dict(name=n, weight=f"{n}.weight", k=1, scheme="s0", rank=r)
                                     for n, r in (("1", 11), ("3", 20))]}
    student = apply_plan(original, plan)
    check = [(x_tr[:512], y_tr[:512])]
    start_acc = evaluate(student, check)[1]
    hist = finetune(student, train, epochs=2, teacher=original, device="cpu", progress=False)
    assert all(torch.isfinite(p).all() for p in student.parameters())
    assert not hist["kept_start"] and all(v == v for v in hist["train_loss"])  # no NaN loss, start not given back
    assert evaluate(student, check)[1] > start_acc


def test_a_config_object_and_keywords_are_the_same_run(digits):
    from onnx_alds.torch import FinetuneConfig

    runs = []
    for how in ("keywords", "config"):
        train, _ = loaders(digits, n_train=64)  # a fresh shuffling generator for each run
        torch.manual_seed(0)
        model = models.transformer_small()
        settings = dict(epochs=1, lr=3e-3, optimizer="adamw", device="cpu", progress=False, threads=1)
        if how == "keywords":
            finetune(model, train, **settings)
        else:
            finetune(model, train, config=FinetuneConfig(**settings))
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    # keywords override a config's fields; a bad value is one sentence that names the setting
    with pytest.raises(UsageError, match=r"^lr must be a positive finite number, not nan$"):
        finetune(small_model(), train, config=FinetuneConfig(epochs=1), lr=float("nan"))
    with pytest.raises(UsageError, match="max_grad_norm"):
        FinetuneConfig(max_grad_norm=0)
