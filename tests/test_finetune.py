"""onnx_alds.torch.finetune on real data (scikit-learn digits): loss goes down, checkpoints, resume."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import models  # noqa: E402
from models.data import load_digits_split  # noqa: E402
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
    loss_before, _ = evaluate(model, train)
    hist = finetune(model, train, epochs=2, lr=3e-3, optimizer="adamw", device="cpu", progress=False)
    loss_after, acc_after = evaluate(model, train)
    assert loss_after < 0.8 * loss_before
    assert hist["epoch"] == [1, 2]
    assert hist["train_loss"][1] < hist["train_loss"][0]
    assert hist["start_epoch"] == 0 and hist["resumed_from"] is None
    assert 0.0 <= acc_after <= 1.0
    assert hist["lr"][-1] < 1e-6  # the cosine ends at 0


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
    with pytest.raises(ValueError, match="optimizer"):
        finetune(small_model(), [(torch.zeros(2, 1, 16, 16), torch.zeros(2, dtype=torch.long))], epochs=1,
                 optimizer="rmsprop", progress=False)
    with pytest.raises(ValueError, match="empty"):
        finetune(small_model(), [], epochs=1, progress=False)
