"""The fine-tune itself: prepare (BatchNorm, feature matching, the loss), train epoch by epoch, finish
(best epoch, BatchNorm statistics, the start given back when the end is worse). See finetune.py."""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import UsageError
from . import batchnorm as bn_recovery
from . import distributed as dist_util
from .distill import FeatureMatch, as_teacher, distillation_loss, flatten_outputs, is_class_target, pick_loss
from .finetune_config import DEFAULTS, FinetuneConfig
from .finetune_data import (batch_size, batch_xy, calibration_inputs, check_batches, check_class_targets,
                            check_finite_inputs, forward, inputs_of, to_device)
from .finetune_state import TrainState, score, snapshot
from .modules import FactorizedLinear, data_fitted, is_factorized

__all__ = ["run"]

log = logging.getLogger("onnx_alds.torch.finetune")

MAX_BACK_OFFS = 4  # halvings of the learning rate after a diverged epoch, in one run


class TrainingLoss:
    """The training loss of one batch, and the kind chosen (see the module docstring of finetune.py)."""

    def __init__(self, teacher, cfg: FinetuneConfig, features: FeatureMatch | None = None,
                 feature_weight: float = 0.0):
        self.teacher, self.kind = teacher, cfg.distill_loss
        self.features, self.feature_weight = features, feature_weight
        self.alpha, self.temperature, self.label_smoothing = cfg.alpha, cfg.temperature, cfg.label_smoothing
        self.chosen: str | None = None

    def __call__(self, outs: list[torch.Tensor], x: Any, y: Any, features: bool = True) -> torch.Tensor:
        if is_class_target(y, outs[0]):
            check_class_targets(y, outs[0])
        if self.teacher is None:
            if y is None:
                raise UsageError("without a teacher the loader must give targets")
            if is_class_target(y, outs[0]):
                self.chosen = "ce"
                return nn.functional.cross_entropy(outs[0], y, label_smoothing=self.label_smoothing)
            self.chosen = "mse"
            return nn.functional.mse_loss(outs[0].float(), y.float())
        t_outs = self.teacher(*inputs_of(x))
        if self.chosen is None:
            self.chosen = pick_loss(self.kind, outs, y)
        loss = distillation_loss(outs, t_outs, y, kind=self.chosen, alpha=self.alpha,
                                 temperature=self.temperature, label_smoothing=self.label_smoothing)
        if self.features is not None:
            term = self.features.loss()  # read (and cleared) on every forward, used only for training
            if features:
                loss = loss + self.feature_weight * term
        return loss


def _val_sums(model, loader, device, loss: TrainingLoss) -> list[float]:
    """[loss sum, correct, count, class-scored samples] over this rank's share of ``loader``."""
    was_training = model.training
    model.eval()
    s = [0.0, 0.0, 0.0, 0.0]
    try:
        with torch.no_grad():
            for batch in loader:
                x, y = batch_xy(batch)
                x, y = to_device(x, device), (y.to(device) if isinstance(y, torch.Tensor) else y)
                outs = flatten_outputs(forward(model, x))
                n = batch_size(x)
                if is_class_target(y, outs[0]):
                    check_class_targets(y, outs[0])
                    s[0] += float(nn.functional.cross_entropy(outs[0], y, reduction="sum"))
                    s[1] += int((outs[0].argmax(dim=1) == y).sum())
                    s[3] += n
                else:  # the output match alone: the feature term is a training aid, not the goal
                    s[0] += float(loss(outs, x, y, features=False)) * n
                s[2] += n
    finally:
        model.train(was_training)
    return s


def validate(model, batches, device, loss: TrainingLoss, ctx=None) -> tuple[float, float | None]:
    """(mean loss, accuracy or None) on ``batches``, summed over the ranks with ``ctx``."""
    v = _val_sums(model, batches, device, loss)
    if ctx is not None:
        v = dist_util.all_sum(ctx, v)
    if v[2] == 0:
        raise UsageError("val_loader is empty")
    return v[0] / v[2], (v[1] / v[3] if v[3] else None)


@dataclass
class Run:
    """What one fine-tune works with, built by :func:`_prepare`."""

    model: nn.Module
    net: nn.Module  # the model, or its DistributedDataParallel wrapper
    cfg: FinetuneConfig
    dev: torch.device
    ctx: Any
    loss: TrainingLoss
    train_batches: Any
    val_batches: Any
    state: TrainState
    inserted: int
    generator: Any
    train_loader: Iterable  # unsharded: BatchNorm statistics and the start check read it in order


def feature_matched(module: nn.Module) -> bool:
    """Whether ``feature_weight="auto"`` matches a factorized module's output to the teacher's layer: every
    factorized convolution, and a factorized Linear whose factors were computed from its weights alone.
    Not a Linear whose factors were fitted to data (a data-aware plan): its factors already fit the
    layer's outputs on real inputs in closed form, and on transformer_small and patch_vit feature
    matching there cost 2-3 points at keep 0.15 against none, where convolutions from the same plans
    gained (docs/finetune.md)."""
    return is_factorized(module) and not (isinstance(module, FactorizedLinear) and data_fitted(module))


def _feature_weight(cfg: FinetuneConfig, model: nn.Module, teacher: Any):
    """The feature-matching weight and which factorized modules it matches (None: every one)."""
    if cfg.feature_weight != "auto":
        return float(cfg.feature_weight), None
    if not isinstance(teacher, nn.Module) or not any(feature_matched(m) for m in model.modules()):
        return 0.0, None
    return DEFAULTS["feature_weight"], feature_matched


def _loss(model, train_loader, teacher, cfg: FinetuneConfig, dev, cleanup) -> TrainingLoss:
    features, (weight, select) = None, _feature_weight(cfg, model, teacher)
    if weight:
        if not isinstance(teacher, nn.Module):
            raise UsageError("feature_weight needs the original torch module as the teacher")
        from .export import fold_batchnorm

        # the plan's layers are the BN-folded ones: match against those
        teacher = fold_batchnorm(teacher, next(calibration_inputs(train_loader, dev, 1))).to(dev)
        features = FeatureMatch(model, teacher, select)
        cleanup.callback(features.remove)
    return TrainingLoss(as_teacher(teacher), cfg, features, weight)


def _wrap_ddp(model: nn.Module, dev: torch.device, ctx) -> nn.Module:
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    with torch.no_grad():  # DDP's buckets assume canonical strides (numpy-made ones differ on size-1 axes)
        for p in model.parameters():
            if p.stride() != torch.empty_like(p, memory_format=torch.contiguous_format).stride():
                p.data = p.data.clone(memory_format=torch.contiguous_format)
    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def _prepare(model, train_loader, val_loader, teacher, cfg, dev, ctx, cleanup) -> Run:
    cleanup.callback(model.eval)
    inserted = 0
    if cfg.batchnorm is True or (cfg.batchnorm == "auto" and bn_recovery.needs_batchnorm(model)):
        inserted = bn_recovery.insert(model, calibration_inputs(train_loader, dev), forward)
        # back to the plan's structure at the end, also when training fails or is interrupted
        cleanup.callback(bn_recovery.fold, model)
        if inserted and ctx.is_main:
            log.info("BatchNorm inserted after %d factorized convolutions for the fine-tune", inserted)
    loss = _loss(model, train_loader, teacher, cfg, dev, cleanup)
    train_batches = dist_util.shard_loader(train_loader, ctx, train=True)
    val_batches = dist_util.shard_loader(val_loader, ctx, train=False)
    state = TrainState.create(model, cfg, len(train_batches), val_loader is not None)
    generator = getattr(train_loader, "generator", None)
    if cfg.checkpoint_dir is not None and cfg.resume:
        state.resume(model, Path(cfg.checkpoint_dir), dev, cfg.epochs, generator, ctx.is_main)
    return Run(model, _wrap_ddp(model, dev, ctx), cfg, dev, ctx, loss, train_batches, val_batches, state,
               inserted, generator, train_loader)


def _train_epoch(r: Run, epoch: int) -> tuple[float, float | None]:
    """One pass over the training batches; (mean loss, accuracy or None) over all ranks."""
    r.net.train()
    loss_sum, correct, seen, scored, diverged = 0.0, 0, 0, 0, 0
    show = r.cfg.progress and r.ctx.is_main
    bar = tqdm(r.train_batches, desc=f"epoch {epoch + 1}/{r.cfg.epochs}", leave=False, disable=not show,
               total=len(r.train_batches))
    for batch in bar:
        x, y = batch_xy(batch)
        x, y = to_device(x, r.dev), (y.to(r.dev) if isinstance(y, torch.Tensor) else y)
        check_finite_inputs(x, y)
        outs = flatten_outputs(forward(r.net, x))
        loss = r.loss(outs, x, y)
        r.state.opt.zero_grad(set_to_none=True)
        loss.backward()  # every rank steps alike, also after a non-finite loss (DDP reduces in backward)
        if r.cfg.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(r.state.params, r.cfg.max_grad_norm)
        r.state.opt.step()
        r.state.sched.step()
        if not bool(torch.isfinite(loss.detach())):
            diverged = 1
        n = batch_size(x)
        loss_sum += float(loss.detach()) * n
        seen += n
        if is_class_target(y, outs[0]):
            correct += int((outs[0].detach().argmax(dim=1) == y).sum())
            scored += n
        if show:
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
    bar.close()
    loss_sum, correct, seen, scored, diverged = dist_util.all_sum(r.ctx, [loss_sum, correct, seen, scored, diverged])
    if diverged:
        raise _Diverged
    return loss_sum / seen, (correct / scored if scored else None)


class _Diverged(Exception):
    """The loss of some step of an epoch (on some rank) was NaN or inf."""


def _train_epoch_or_back_off(r: Run, epoch: int) -> tuple[float, float | None] | None:
    """:func:`_train_epoch`; when its loss diverges, the epoch's starting weights and optimizer state come
    back, the learning rate is halved for the rest of the run, and the epoch runs again (at most
    ``MAX_BACK_OFFS`` times in a run; then None, and the run stops with the epoch's starting weights)."""
    saved = (snapshot(r.model), copy.deepcopy(r.state.opt.state_dict()), copy.deepcopy(r.state.sched.state_dict()))
    while True:
        try:
            return _train_epoch(r, epoch)
        except _Diverged:
            r.model.load_state_dict(saved[0])
            r.state.opt.load_state_dict(copy.deepcopy(saved[1]))
            r.state.sched.load_state_dict(copy.deepcopy(saved[2]))
            if r.state.back_offs >= MAX_BACK_OFFS:
                if r.ctx.is_main:
                    log.warning("epoch %d: the loss is still NaN or inf after %d halvings of the learning rate; "
                                "stopping with the epoch's starting weights", epoch + 1, MAX_BACK_OFFS)
                return None
            r.state.back_offs += 1
            r.state.sched.base_lrs = [lr * 0.5 ** r.state.back_offs for lr in r.state.sched.base_lrs]
            for group, base in zip(r.state.opt.param_groups, r.state.sched.base_lrs):
                group["lr"] = base * r.state.sched.lr_lambdas[0](r.state.sched.last_epoch)
            if r.ctx.is_main:
                log.warning("epoch %d: the loss became NaN or inf; the epoch starts again at half the learning "
                            "rate (%g)", epoch + 1, r.state.sched.base_lrs[0])


def _epoch(r: Run, epoch: int, with_val: bool) -> None:
    """Train one epoch, record it, judge it on the validation data, write its checkpoint."""
    t0 = time.perf_counter()
    done = _train_epoch_or_back_off(r, epoch)
    if done is None:
        r.state.best["stopped"] = True
        return
    train_loss, train_acc = done
    h = r.state.history
    h["epoch"].append(epoch + 1)
    h["train_loss"].append(train_loss)
    h["train_acc"].append(train_acc)
    h["lr"].append(r.state.opt.param_groups[0]["lr"])
    msg = f"epoch {epoch + 1}/{r.cfg.epochs}: train loss {train_loss:.4f}"
    msg += f" acc {train_acc:.4f}" if train_acc is not None else ""
    if with_val:
        vl, va = validate(r.model, r.val_batches, r.dev, r.loss, r.ctx)
        h["val_loss"].append(vl)
        h["val_acc"].append(va)
        msg += f", val loss {vl:.4f}" + (f" acc {va:.4f}" if va is not None else "")
        msg += r.state.judge(r.model, epoch + 1, score(vl, va), r.cfg.patience, r.cfg.epochs)
    h["epoch_time_s"].append(time.perf_counter() - t0)
    if r.ctx.is_main:
        log.info(msg)
        if r.cfg.checkpoint_dir is not None:
            r.state.save(r.model, Path(r.cfg.checkpoint_dir) / f"epoch_{epoch + 1:04d}.pt", epoch + 1, r.cfg.epochs,
                         r.generator, r.ctx.world_size)


def _params_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


def _finish(r: Run, start_check) -> bool:
    """Restore the best epoch, recompute BatchNorm statistics, give the start back when the end scores
    worse on the check samples; True when the start was given back."""
    best, h, main = r.state.best, r.state.history, r.ctx.is_main
    if r.cfg.restore_best and best["state"] is not None and best["epoch"] != (h["epoch"][-1] if h["epoch"] else None):
        r.model.load_state_dict(best["state"])
        if main:
            log.info("restored the weights of epoch %d, the best on the validation data", best["epoch"])
    gave_start_back = r.cfg.restore_best and best["epoch"] == 0
    if r.inserted and h["epoch"] and not gave_start_back:
        # the folded model gets the exact statistics of its final weights, not the running average
        # (the starting weights' BatchNorms are the identity already)
        bn_recovery.recalibrate(r.model, calibration_inputs(r.train_loader, r.dev), forward)
    if start_check is None:
        return False
    check, start, start_state = start_check
    end_ok = _params_finite(r.model)
    if end_ok and not _worse(validate(r.model, check, r.dev, r.loss), start):
        return False
    r.model.load_state_dict(start_state)
    if main:
        log.warning("the fine-tuned model %s; the starting weights are kept (try more epochs or a lower lr)",
                    "scores worse than the starting one on training samples" if end_ok else "has NaN or inf weights")
    return True


def _start_check(r: Run, with_val: bool):
    """The starting weights' score: on the validation data (they compete as epoch 0), else on a fixed
    slice of the training data (judged against the end in :func:`_finish`)."""
    if r.state.start_epoch != 0 or r.cfg.epochs == 0:
        return None, None
    if with_val:
        # a fine-tune that only makes the model worse on the validation data gives the start back
        # (best_epoch 0) instead of its last epoch
        vl, va = validate(r.model, r.val_batches, r.dev, r.loss, r.ctx)
        r.state.best.update(score=list(score(vl, va)), epoch=0, state=snapshot(r.model))
        return {"val_loss": vl, "val_acc": va}, None
    check = check_batches(r.train_loader)
    if not check:
        return None, None
    # the same samples on every rank: no sum over ranks, the same decision everywhere
    return None, (check, validate(r.model, check, r.dev, r.loss), snapshot(r.model))


def _worse(end: tuple[float, float | None], start: tuple[float, float | None]) -> bool:
    """Whether the end scores worse than the start on the check samples: fewer of them right, where there
    are class labels (a tie keeps the end: distillation may raise the cross-entropy on the labels while it
    brings the student to its teacher), else a larger output-matching loss (NaN is worse)."""
    if end[1] is not None and start[1] is not None:
        return end[1] < start[1]
    return not end[0] <= start[0]


def run(model, train_loader, val_loader, teacher, cfg: FinetuneConfig, dev, ctx, threads: int) -> dict[str, Any]:
    """The fine-tune of :func:`onnx_alds.torch.finetune` once its settings are checked; the history."""
    with contextlib.ExitStack() as cleanup:
        r = _prepare(model, train_loader, val_loader, teacher, cfg, dev, ctx, cleanup)
        with_val = val_loader is not None
        val_start, start_check = _start_check(r, with_val)
        for epoch in range(r.state.start_epoch, cfg.epochs):
            if r.state.best["stopped"]:
                break
            _epoch(r, epoch, with_val)
        kept_start = _finish(r, start_check)
        ctx.barrier()  # rank 0's last checkpoint is on disk before any rank goes on
        out = dict(r.state.history)
        out.update(start_epoch=r.state.start_epoch, resumed_from=r.state.resumed_from, best_epoch=r.state.best["epoch"],
                   start=val_start, kept_start=kept_start, stopped_early=bool(r.state.best["stopped"]),
                   loss=r.loss.chosen, batchnorm_inserted=r.inserted, threads=threads, world_size=ctx.world_size,
                   rank=ctx.rank)
        return out
