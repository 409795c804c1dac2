"""The state of a fine-tune that survives an epoch: optimizer, schedule, history, the best epoch so far,
and the per-epoch checkpoints that hold them (written atomically, read back only as plain tensors)."""

from __future__ import annotations

import io
import logging
import math
import os
import pickle
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from ..io import atomic_write_bytes
from .finetune_config import FinetuneConfig

__all__ = ["TrainState", "latest_checkpoint", "lr_factor", "make_optimizer", "snapshot", "score"]

log = logging.getLogger("onnx_alds.torch.finetune")

_CKPT_RE = re.compile(r"^epoch_(\d+)\.pt$")


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The ``epoch_NNNN.pt`` regular file with the highest epoch in ``checkpoint_dir``, or None.

    Only regular files count (symlinks are followed): a FIFO or a device named like a checkpoint would
    block or never end when read."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return None
    found = []
    for p in d.iterdir():
        m = _CKPT_RE.match(p.name)
        try:
            if m and stat.S_ISREG(p.stat().st_mode):
                found.append((int(m.group(1)), p))
        except OSError:  # a dangling symlink
            continue
    return max(found)[1] if found else None


def _read_checkpoint(path: Path, device: torch.device) -> dict:
    """A checkpoint's contents, loaded with ``weights_only=True``; one sentence for anything else."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip and torch errors come in many types
        # torch's own text advises weights_only=False, which would run code from a hostile file: not repeated
        why = "it holds Python objects that are not loaded, for safety" if isinstance(
            e, pickle.UnpicklingError) else f"it is not a readable torch file ({type(e).__name__})"
        raise UsageError(f"the checkpoint {str(path)!r} was not written by finetune ({why}); move it out of the "
                         f"checkpoint directory or give a fresh one") from None
    if not isinstance(state, dict) or not all(k in state for k in ("model", "optimizer", "scheduler", "epoch")):
        raise UsageError(f"the checkpoint {str(path)!r} was not written by finetune (it lacks the model, optimizer "
                         f"or schedule state); move it out of the checkpoint directory or give a fresh one")
    return state


def _save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def make_optimizer(name: str, params, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    if name.lower() == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base lr before optimizer step ``step`` (0-based): linear warm-up, then cosine to 0.

    Warm-up: ``(step + 1) / warmup_steps`` for ``step < warmup_steps``; then
    ``0.5 · (1 + cos(π · (step - w) / (total - w)))``, which is 0 at ``total``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, span) / span))


def snapshot(model: nn.Module) -> dict:
    return {k: t.detach().clone() for k, t in model.state_dict().items()}


def score(val_loss: float, val_acc: float | None) -> tuple:
    """Higher is better: accuracy first (when there is one), then the loss (NaN counts as the worst)."""
    loss = -val_loss if math.isfinite(val_loss) else -math.inf
    return (val_acc if val_acc is not None else 0.0, loss)


@dataclass
class TrainState:
    """Optimizer, schedule, history and best epoch of one fine-tune; what a checkpoint holds."""

    opt: torch.optim.Optimizer
    sched: Any
    history: dict[str, Any]
    best: dict[str, Any] = field(default_factory=lambda: {"score": None, "epoch": None, "state": None,
                                                          "bad_epochs": 0, "stopped": False})
    start_epoch: int = 0
    resumed_from: str | None = None
    back_offs: int = 0  # halvings of the learning rate after diverged epochs
    params: list = field(default_factory=list)  # what the optimizer steps (and the gradient clipping sees)

    @classmethod
    def create(cls, model: nn.Module, cfg: FinetuneConfig, steps_per_epoch: int, with_val: bool) -> "TrainState":
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay, cfg.momentum)
        total = max(1, cfg.epochs * steps_per_epoch)
        warm = int(round(cfg.warmup * total))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, warm))
        history: dict[str, Any] = {"epoch": [], "train_loss": [], "train_acc": [], "lr": [], "epoch_time_s": []}
        if with_val:
            history["val_loss"], history["val_acc"] = [], []
        return cls(opt, sched, history, params=params)

    def resume(self, model: nn.Module, ckpt_dir: Path, device: torch.device, epochs: int, generator,
               main: bool) -> None:
        """Load the latest checkpoint of ``ckpt_dir`` (if any) into the model and this state."""
        last = latest_checkpoint(ckpt_dir)
        if last is None:
            return
        state = _read_checkpoint(last, device)
        try:
            model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError):
            raise UsageError(f"the checkpoint {str(last)!r} holds another model or plan; give a fresh "
                             f"checkpoint directory") from None
        self.sched.load_state_dict(state["scheduler"])
        self.start_epoch = int(state["epoch"])
        stored = state.get("history") or {}
        for k in self.history:
            self.history[k] = list(stored.get(k, []))
        if state.get("best") is not None:
            self.best.update(state["best"])
        if state.get("epochs") not in (None, epochs) and main:
            log.warning("resuming %s, written for %s epochs, with epochs=%d: the schedule is the new one",
                        last, state.get("epochs"), epochs)
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"].cpu())
        if generator is not None and state.get("loader_rng") is not None:
            generator.set_state(state["loader_rng"].cpu())
        self.resumed_from = str(last)
        if main:
            log.info("resumed from %s (epoch %d)", last, self.start_epoch)

    def save(self, model: nn.Module, path: Path, epoch: int, epochs: int, generator, world_size: int) -> None:
        _save({"epoch": epoch, "epochs": epochs, "model": model.state_dict(), "optimizer": self.opt.state_dict(),
               "scheduler": self.sched.state_dict(), "history": self.history, "best": self.best,
               "torch_rng": torch.get_rng_state(),
               "loader_rng": generator.get_state() if generator is not None else None, "world_size": world_size},
              path)

    def judge(self, model: nn.Module, epoch: int, val_score: tuple, patience: int | None, epochs: int) -> str:
        """Keep ``epoch``'s weights when they score best so far; returns a note when training stops early."""
        if self.best["score"] is None or tuple(val_score) > tuple(self.best["score"]):
            self.best.update(score=list(val_score), epoch=epoch, bad_epochs=0, state=snapshot(model))
            return ""
        self.best["bad_epochs"] += 1
        if patience is not None and self.best["bad_epochs"] >= patience and epoch < epochs:
            self.best["stopped"] = True
            return f"; no better for {patience} epochs: stopping, best epoch {self.best['epoch']}"
        return ""

