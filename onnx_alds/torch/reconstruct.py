"""Block-wise reconstruction of a plan-built student from calibration inputs, no labels.

``reconstruct(student, teacher, inputs)`` goes through the student's blocks (a transformer layer, a
residual block, a factorized layer outside any block) in the order its forward calls them.  Each
block, fed what the student *as reconstructed so far* gives it, is trained (Adam, cosine schedule)
to give what the teacher's block of the same name gives on the teacher's own inputs: the relative
MSE between the two, summed over the block's tensor outputs.  So each block learns back what its
factorized layers lost *together* (an attention's projections through its softmax, a feed-forward
pair through its activation) and undoes what the blocks before it left, which a closed-form fit of
one layer at a time cannot; BRECQ (Li et al., ICLR 2021) does the same for quantization.

On the sentence encoder of docs/real-models.md at 0.6 of its Linear parameters it lifts the mean
cosine on held-out sentences from 0.888 (the data-aware one-shot rewrite) to 0.918; ResNet56 on
digits from a weight-only plan at keep 0.3 from 10 % to 98 % (docs/finetune.md).

Blocks (:func:`find_blocks`): the children of every ``nn.ModuleList`` / ``nn.Sequential`` that hold
a factorized module (recursing into children that are containers themselves), and each factorized
module outside them.  A block is called with the arguments the student's forward gives it (masks
and other keywords included), captured by a forward pre-hook; the forward stops there.

What it is judged on: a quarter of the calibration batches is held back (``hold_out``) and never
trained on; the whole student's output error to the teacher on them is measured before and after,
and where it is not lower the student is given back as it was.  A block whose own loss did not fall
is put back as it was too.  The factorized modules of a reconstructed block count as fitted to data
afterwards (``data_fitted``): ``finetune``'s automatic feature matching then leaves their Linear
layers alone, as it does a data-aware plan's (after reconstruction, matching them cost patch_vit at
keep 0.15 8.7 points and transformer_small 2.5, docs/finetune.md).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from ..errors import UsageError
from ..progress import progress_iter
from .finetune_data import calibration_inputs, forward, inputs_of
from .modules import data_fitted, is_factorized
from .scratch import private_inductor_cache

log = logging.getLogger(__name__)

__all__ = ["reconstruct", "find_blocks", "Reconstruction"]

EPOCHS = 10  # passes over the fitted batches, per block
LR = 1e-3  # Adam's; a cosine to 0 over each block's steps
HOLD_OUT = 0.25  # of the calibration batches: judge the result, never trained on
MAX_SAMPLES = 1024  # calibration inputs read
BATCH = 16  # samples per step (the inputs are batched again to this)
MAX_BYTES = 2 << 30  # one block's captured inputs and targets held in memory at most
CONTAINERS = (nn.ModuleList, nn.Sequential)


@dataclass
class Reconstruction:
    """What :func:`reconstruct` did: per block its loss before and after; the held-out error."""

    blocks: list = field(default_factory=list)  # {"name", "loss_before", "loss_after", "kept"}
    held_out_before: float | None = None  # whole-model output rel L2 to the teacher on held-out batches
    held_out_after: float | None = None
    judged_on: str = ""
    kept: bool = True  # False: no better on the held-out batches (the start given back), or nothing to do
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class _Captured(Exception):
    """Raised by a hook once it holds what it came for: the rest of the forward is not needed."""


def find_blocks(model: nn.Module) -> list[str]:
    """The qualified names of ``model``'s blocks (module docstring), in module order."""
    out: list[str] = []

    def walk(mod: nn.Module, prefix: str, in_container: bool) -> None:
        for name, child in mod.named_children():
            q = f"{prefix}.{name}" if prefix else name
            if not any(is_factorized(m) for m in child.modules()):
                continue
            if isinstance(child, CONTAINERS):
                walk(child, q, True)
            elif in_container or is_factorized(child):
                out.append(q)
            else:
                walk(child, q, False)

    walk(model, "", isinstance(model, CONTAINERS))
    return out


def _call_order(model: nn.Module, names: list[str], x: Any) -> list[str]:
    """``names`` in the order one forward on ``x`` first calls them; each must be called exactly once."""
    calls: list[str] = []
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_pre_hook(lambda m, a, n=n: calls.append(n)) for n in names]
    try:
        with torch.no_grad():
            forward(model, x)
    finally:
        for h in handles:
            h.remove()
    once = [n for n in dict.fromkeys(calls) if calls.count(n) == 1]
    skipped = sorted(set(names) - set(once))
    if skipped:
        log.info("reconstruct: %d block(s) not called exactly once per forward are left as they are: %s",
                 len(skipped), ", ".join(skipped[:5]))
    return once


def _tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a block's or model's output (tensors, tuples, lists, dicts; anything else left out)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


def rebatch(batches: list, size: int) -> list:
    """The samples of ``batches`` (model inputs: a tensor or a tuple of them, samples first) in batches of
    ``size``, in their order; an input that is not a tensor with the samples' first axis is passed as
    it is in every batch."""
    parts = [inputs_of(x) for x in batches]
    n = [int(p[0].shape[0]) for p in parts]
    total = sum(n)

    def joined(j: int):
        col = [p[j] for p in parts]
        if all(isinstance(c, torch.Tensor) and c.dim() and c.shape[0] == k for c, k in zip(col, n)):
            return torch.cat(col)
        return None

    cols = [joined(j) for j in range(len(parts[0]))]
    out = []
    for i in range(0, total, size):
        x = tuple(parts[0][j] if c is None else c[i:i + size] for j, c in enumerate(cols))
        out.append(x if isinstance(batches[0], (list, tuple)) else x[0])
    return out


def _detach(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detach(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    return 0


def _capture(model: nn.Module, name: str, batches: list, *, output: bool) -> list:
    """Per batch, what block ``name`` of ``model`` is called with (``(args, kwargs)``) or, with
    ``output``, what it returns; the forward stops at the block.  Stops early past :data:`MAX_BYTES`."""
    block = dict(model.named_modules())[name]
    got: list = []

    def pre(m, args, kwargs):
        got.append((_detach(args), _detach(kwargs)))
        raise _Captured

    def post(m, args, result):
        got.append(_detach(result))
        raise _Captured

    h = block.register_forward_hook(post) if output else block.register_forward_pre_hook(pre, with_kwargs=True)
    held = 0
    try:
        with torch.no_grad():
            for x in batches:
                try:
                    forward(model, x)
                except _Captured:
                    pass
                held += _nbytes(got[-1])
                if held > MAX_BYTES:
                    log.info("reconstruct: block %s holds %d batches (%.1f GiB); the rest are left out",
                             name, len(got), held / 2**30)
                    break
    finally:
        h.remove()
    return got


def _rel_mse(outputs: Any, targets: Any) -> torch.Tensor:
    ys, ts = _tensors(outputs), _tensors(targets)
    terms = [((y.float() - t.float()) ** 2).sum() / (t.float() ** 2).sum().clamp_min(1e-12)
             for y, t in zip(ys, ts) if y.is_floating_point()]
    return torch.stack(terms).sum()


def _block_loss(block: nn.Module, inputs: list, targets: list) -> float:
    with torch.no_grad():
        return float(sum(_rel_mse(block(*a, **k), t) for (a, k), t in zip(inputs, targets)) / len(inputs))


def _fit_block(block: nn.Module, inputs: list, targets: list, *, epochs: int, lr: float, seed: int) -> None:
    params = [p for p in block.parameters() if p.requires_grad]
    if not params:
        return
    opt = torch.optim.Adam(params, lr=lr)
    steps = epochs * len(inputs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for i in torch.randperm(len(inputs), generator=g).tolist():
            args, kwargs = inputs[i]
            loss = _rel_mse(block(*args, **kwargs), targets[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def _output_error(student: nn.Module, teacher: nn.Module, batches: list) -> float:
    """Relative L2 of the student's outputs to the teacher's over ``batches`` (all outputs together)."""
    num = den = 0.0
    with torch.no_grad():
        for x in batches:
            for s, t in zip(_tensors(forward(student, x)), _tensors(forward(teacher, x))):
                if s.is_floating_point():
                    num += float(((s.double() - t.double()) ** 2).sum())
                    den += float((t.double() ** 2).sum())
    return math.sqrt(num / den) if den > 0 else 0.0


def _one_block(student: nn.Module, teacher: nn.Module, name: str, fit: list, *, epochs: int, lr: float,
               seed: int) -> dict:
    """Reconstruct block ``name`` of ``student`` on the ``fit`` batches (module docstring); put back as
    it was where its loss did not fall.  Returns its entry of :attr:`Reconstruction.blocks`."""
    block = dict(student.named_modules())[name]
    ins = _capture(student, name, fit, output=False)
    targets = _capture(teacher, name, fit[:len(ins)], output=True)
    ins = ins[:len(targets)]
    before_state = copy.deepcopy(block.state_dict())
    before = _block_loss(block, ins, targets)
    _fit_block(block, ins, targets, epochs=epochs, lr=lr, seed=seed)
    after = _block_loss(block, ins, targets)
    kept = after < before
    if not kept:
        block.load_state_dict(before_state)
    else:  # its factors are fitted to data now: finetune's "auto" feature matching treats them so
        for m in block.modules():
            if is_factorized(m):
                m.data_fitted = True
    log.info("reconstruct: block %s: relative MSE %.4g -> %.4g%s", name, before, after,
             "" if kept else " (no better: put back)")
    return {"name": name, "loss_before": before, "loss_after": after if kept else before, "kept": kept}


def _split(batches: list, hold_out: float, batch_size: int) -> tuple[list, list, str]:
    """(fitted batches, judging batches, what the judging batches are)."""
    n_held = max(1, round(len(batches) * hold_out)) if len(batches) > 1 and hold_out > 0 else 0
    if not n_held:
        why = "hold_out is 0" if hold_out == 0 else "one batch cannot be split"
        return batches, batches, f"the calibration batches (also fitted on: {why})"
    return batches[:-n_held], batches[-n_held:], f"{n_held} held-out calibration batches of {batch_size}"


def reconstruct(student: nn.Module, teacher: nn.Module, inputs: Iterable, *, epochs: int = EPOCHS,
                lr: float = LR, batch_size: int = BATCH, hold_out: float = HOLD_OUT, max_samples: int = MAX_SAMPLES,
                blocks: list[str] | None = None, seed: int = 0, progress: bool = True) -> Reconstruction:
    """Reconstruct ``student`` (built by :func:`~onnx_alds.torch.apply_plan` from ``teacher``) block by
    block on ``inputs`` (batches as ``finetune`` takes them: inputs alone, ``(inputs, targets)`` or
    ``{"input": ...}``; targets are ignored), in place, up to ``max_samples`` of them in batches of
    ``batch_size``; see the module docstring.  ``blocks``: the qualified names to reconstruct
    (default :func:`find_blocks`).  Returns a :class:`Reconstruction`."""
    if not isinstance(teacher, nn.Module):
        raise UsageError("reconstruct needs the original torch module as teacher: its blocks' outputs are "
                         "the targets")
    if epochs < 1 or batch_size < 1 or not (lr > 0 and math.isfinite(lr)) or not 0 <= hold_out < 1:
        raise UsageError("reconstruct needs epochs >= 1, batch_size >= 1, a finite lr > 0 and 0 <= hold_out < 1")
    t0 = time.perf_counter()
    device = next(iter(student.parameters())).device
    other = {p.device for p in teacher.parameters()} - {device}
    if other:
        raise UsageError(f"the teacher is on {sorted(map(str, other))[0]} and the student on {device}: put both on "
                         f"one device")
    batches = list(calibration_inputs(inputs, device, max_samples))
    if not batches:
        raise UsageError("reconstruct got no calibration inputs")
    fit, held, judged_on = _split(rebatch(batches, batch_size), hold_out, batch_size)
    result = Reconstruction(judged_on=judged_on)
    names = find_blocks(student) if blocks is None else list(blocks)
    if not names:
        log.info("reconstruct: the student has no factorized layer: nothing to reconstruct")
        result.kept = False
        return result
    missing = [n for n in names if n not in dict(teacher.named_modules())]
    if missing:
        raise UsageError(f"the teacher has no module {missing[0]!r}: give the model the plan was applied to")
    modes = (student.training, teacher.training)
    student.eval(), teacher.eval()
    start = copy.deepcopy(student.state_dict())
    fitted = {m: data_fitted(m) for m in student.modules() if is_factorized(m)}
    try:
        with private_inductor_cache():  # torch.optim imports torch._dynamo, which makes $TMPDIR/torchinductor_<user>
            result.held_out_before = _output_error(student, teacher, held)
            order = _call_order(student, names, fit[0])
            for i, name in enumerate(progress_iter(order, desc="reconstruct", unit="block", enabled=progress)):
                result.blocks.append(_one_block(student, teacher, name, fit, epochs=epochs, lr=lr, seed=seed + i))
            result.held_out_after = _output_error(student, teacher, held)
        if not result.held_out_after < result.held_out_before:
            student.load_state_dict(start)
            for m, flag in fitted.items():
                m.data_fitted = flag
            result.kept, result.held_out_after = False, result.held_out_before
            log.warning("reconstruct: the output error on %s did not fall (%.4g); the student is given back as "
                        "it was", result.judged_on, result.held_out_before)
    finally:
        student.train(modes[0]), teacher.train(modes[1])
    result.seconds = time.perf_counter() - t0
    log.info("reconstruct: output relative L2 on %s %.4g -> %.4g in %.0f s", result.judged_on,
             result.held_out_before, result.held_out_after, result.seconds)
    return result
