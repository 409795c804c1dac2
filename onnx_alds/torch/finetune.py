"""Fine-tuning loop with cosine learning rate, per-epoch checkpoints and resume.

Used to recover the accuracy of a compressed network and to train the example
models. Logs through :mod:`logging` (logger ``onnx_alds.torch.finetune``) and
shows tqdm progress bars when ``progress`` is true; it never prints.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["finetune", "evaluate", "latest_checkpoint"]

log = logging.getLogger(__name__)

_CKPT_RE = re.compile(r"^epoch_(\d+)\.pt$")


def _pick_device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _batch_xy(batch: Any) -> tuple[Any, torch.Tensor]:
    if isinstance(batch, dict):
        return batch["input"], batch["target"]
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError("loader batches must be (inputs, targets) pairs or dicts with 'input' and 'target'.")


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(t, device) for t in x)
    return x


def _forward(model: nn.Module, x: Any) -> torch.Tensor:
    return model(*x) if isinstance(x, (list, tuple)) else model(x)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable, *, device: str | torch.device | None = None
) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy (a fraction in [0, 1]) of ``model`` over ``loader``.

    Runs in eval mode on ``device`` (default: the device of the model's
    parameters) and restores the model's training mode afterwards.
    """
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    try:
        for batch in loader:
            x, y = _batch_xy(batch)
            x, y = _to(x, device), y.to(device)
            logits = _forward(model, x)
            total_loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
            count += int(y.numel())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate got an empty loader.")
    return total_loss / count, correct / count


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The ``epoch_NNNN.pt`` file with the highest epoch in ``checkpoint_dir``, or None."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _CKPT_RE.match(p.name))]
    return max(found)[1] if found else None


def _save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _make_optimizer(name: str, params, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    name = name.lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}.")


def finetune(
    model: nn.Module,
    train_loader: Iterable,
    epochs: int = 10,
    *,
    val_loader: Iterable | None = None,
    lr: float = 0.01,
    optimizer: str = "sgd",
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    label_smoothing: float = 0.0,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``model`` in place for ``epochs`` epochs; return the history.

    Cross-entropy (with ``label_smoothing``) and SGD with Nesterov momentum or
    AdamW; the learning rate follows a cosine from ``lr`` to 0 over all
    ``epochs * len(train_loader)`` steps. The model is moved to ``device``
    (default CUDA when available, else CPU) and stays there.

    With ``checkpoint_dir``, after each epoch ``epoch_NNNN.pt`` is written there
    (atomically) holding model, optimizer and scheduler state, the epoch count
    and the history; with ``resume`` (default) training continues after the
    latest such checkpoint, so a call for a number of epochs already reached
    trains nothing and returns the stored history.

    History: ``epoch`` (1-based epoch numbers), ``train_loss``, ``train_acc``,
    ``lr`` (at the end of each epoch), ``val_loss`` and ``val_acc`` (when
    ``val_loader`` is given), ``epoch_time_s``, plus ``start_epoch`` (epochs
    already done when this call began) and ``resumed_from`` (the checkpoint
    path or None).
    """
    if epochs < 0:
        raise ValueError("epochs must be >= 0.")
    dev = _pick_device(device)
    model.to(dev)
    try:
        steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError("train_loader must have a length (a DataLoader or a list of batches).") from None
    if steps_per_epoch == 0:
        raise ValueError("train_loader is empty.")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _make_optimizer(optimizer, params, lr, weight_decay, momentum)
    total_steps = max(1, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps)))
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    history: dict[str, Any] = {"epoch": [], "train_loss": [], "train_acc": [], "lr": [], "epoch_time_s": []}
    if val_loader is not None:
        history["val_loss"], history["val_acc"] = [], []
    start_epoch = 0
    resumed_from = None
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    generator = getattr(train_loader, "generator", None)

    if ckpt_dir is not None and resume:
        last = latest_checkpoint(ckpt_dir)
        if last is not None:
            state = torch.load(last, map_location=dev, weights_only=True)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            start_epoch = int(state["epoch"])
            stored = state.get("history") or {}
            for k in history:
                history[k] = list(stored.get(k, []))
            if state.get("epochs") not in (None, epochs):
                log.warning(
                    "resuming %s, written for %s epochs, with epochs=%d: the cosine schedule is the new one",
                    last, state.get("epochs"), epochs,
                )
            if "torch_rng" in state:
                torch.set_rng_state(state["torch_rng"].cpu())
            if generator is not None and state.get("loader_rng") is not None:
                generator.set_state(state["loader_rng"].cpu())
            resumed_from = str(last)
            log.info("resumed from %s (epoch %d)", last, start_epoch)

    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=not progress, total=steps_per_epoch)
        for batch in bar:
            x, y = _batch_xy(batch)
            x, y = _to(x, dev), y.to(dev)
            logits = _forward(model, x)
            loss = criterion(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            n = int(y.numel())
            loss_sum += float(loss.detach()) * n
            correct += int((logits.detach().argmax(dim=1) == y).sum())
            seen += n
            if progress:
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
        bar.close()
        history["epoch"].append(epoch + 1)
        history["train_loss"].append(loss_sum / seen)
        history["train_acc"].append(correct / seen)
        history["lr"].append(opt.param_groups[0]["lr"])
        msg = f"epoch {epoch + 1}/{epochs}: train loss {loss_sum / seen:.4f} acc {correct / seen:.4f}"
        if val_loader is not None:
            vl, va = evaluate(model, val_loader, device=dev)
            history["val_loss"].append(vl)
            history["val_acc"].append(va)
            msg += f", val loss {vl:.4f} acc {va:.4f}"
        history["epoch_time_s"].append(time.perf_counter() - t0)
        log.info(msg)
        if ckpt_dir is not None:
            _save_atomic(
                {
                    "epoch": epoch + 1,
                    "epochs": epochs,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "history": history,
                    "torch_rng": torch.get_rng_state(),
                    "loader_rng": generator.get_state() if generator is not None else None,
                },
                ckpt_dir / f"epoch_{epoch + 1:04d}.pt",
            )

    model.eval()
    out = dict(history)
    out["start_epoch"] = start_epoch
    out["resumed_from"] = resumed_from
    return out
