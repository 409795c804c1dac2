"""Distillation from the original model: the teacher, and the loss that matches it.

Class scores (``loss="kl"``), Hinton et al. 2015, with temperature ``T`` and
weight ``α``::

    L = (1 - α) · CE(s, y) + α · T² · KL(softmax(t / T) ‖ softmax(s / T))

``T²`` keeps the gradient of the soft term on the scale of the hard one.
Without labels the soft term is the whole loss (α = 1).

Any other output (embeddings, regression heads, several outputs): the
student's outputs are matched to the teacher's, ``loss="mse"`` with
``mean((s - t)²) / mean(t²)`` (relative, so its scale does not depend on the
output's) or ``loss="cosine"`` with ``1 - cos(s, t)`` along the last axis;
with float targets of the output's shape, ``(1 - α)`` of the same loss
against the targets is added.

The teacher is a torch module (run in eval mode, without gradients, on the
student's device), an ONNX model (path, ``onnx.ModelProto`` or
``onnxruntime.InferenceSession``: run through onnxruntime on the CPU, which is
what was deployed), or any callable from input tensors to output tensors.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from .finetune_config import LOSSES

__all__ = ["as_teacher", "distillation_loss", "OnnxTeacher", "LOSSES"]


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [v for v in out.values() if isinstance(v, torch.Tensor)]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flatten_outputs(o)]
    raise TypeError(f"model outputs must be tensors, got {type(out).__name__}")


class OnnxTeacher:
    """An ONNX model run through onnxruntime (CPU provider unless a session is given) as a teacher."""

    def __init__(self, model: Any, threads: int | None = 1):
        import onnxruntime as ort

        if isinstance(model, ort.InferenceSession):
            self.session = model
        else:
            opts = ort.SessionOptions()
            if threads:
                opts.intra_op_num_threads = threads
            src = model.SerializeToString() if hasattr(model, "SerializeToString") else os.fspath(model)
            self.session = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    @torch.no_grad()
    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        if len(inputs) != len(self.input_names):
            raise UsageError(f"the ONNX teacher takes {len(self.input_names)} inputs, the loader gives {len(inputs)}")
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(self.input_names, inputs)}
        dev = inputs[0].device
        return [torch.from_numpy(np.asarray(o)).to(dev) for o in self.session.run(None, feeds)]


class _TorchTeacher:
    def __init__(self, module: nn.Module):
        self.module = module.eval()  # no gradients flow to it (no_grad below); its flags are left as they are

    @torch.no_grad()
    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        dev = inputs[0].device
        if next(self.module.parameters(), torch.empty(0, device=dev)).device != dev:
            self.module.to(dev)
        return flatten_outputs(self.module(*inputs))


def as_teacher(teacher: Any, *, threads: int | None = 1) -> Callable[..., list[torch.Tensor]] | None:
    """A callable ``(*inputs) -> [outputs]`` from a module, an ONNX model or session, or a callable."""
    if teacher is None:
        return None
    if isinstance(teacher, nn.Module):
        return _TorchTeacher(teacher)
    if isinstance(teacher, (str, os.PathLike)) and not os.path.isfile(teacher):
        # onnxruntime would block forever opening a FIFO, or read a device without end
        raise UsageError(f"the ONNX teacher {str(teacher)[:200]!r} does not exist or is not a regular file")
    if isinstance(teacher, (str, os.PathLike)) or hasattr(teacher, "SerializeToString"):
        try:
            return OnnxTeacher(teacher, threads=threads)
        except ImportError:
            raise UsageError("an ONNX teacher needs onnxruntime: pip install 'onnx-alds[cpu]'") from None
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for a bad file
            raise UsageError(f"cannot load the ONNX teacher {str(teacher)[:200]!r} ({type(e).__name__})") from None
    try:
        import onnxruntime as ort

        if isinstance(teacher, ort.InferenceSession):
            return OnnxTeacher(teacher)
    except ImportError:
        pass
    if callable(teacher):
        return lambda *x: flatten_outputs(teacher(*x))
    raise UsageError(f"teacher must be a torch module, an ONNX model or a callable, not {type(teacher).__name__}")


def is_class_target(target: Any, output: torch.Tensor) -> bool:
    """Integer class indices for 2-D scores ``(N, C)``."""
    return (isinstance(target, torch.Tensor) and not target.is_floating_point() and output.dim() == 2
            and target.dim() == 1 and target.shape[0] == output.shape[0])


def pick_loss(loss: str, outputs: Sequence[torch.Tensor], target: Any) -> str:
    """``"auto"``: KL for one 2-D output with class-index targets (or no targets), else relative MSE."""
    if loss != "auto":
        if loss not in LOSSES:
            raise UsageError(f"distill_loss must be 'auto' or one of {', '.join(LOSSES)}, not {loss!r}")
        return loss
    if len(outputs) == 1 and outputs[0].dim() == 2 and (target is None or is_class_target(target, outputs[0])):
        return "kl"
    return "mse"


def _match(kind: str, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    s, t = s.float(), t.float()
    if s.shape != t.shape:
        raise UsageError(f"student output of shape {tuple(s.shape)} cannot be matched to the teacher's "
                         f"{tuple(t.shape)}")
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s.flatten(1) if s.dim() > 2 else s, t.flatten(1) if t.dim() > 2 else t,
                                          dim=-1)).mean()
    return F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12)


def distillation_loss(
    student_out: Sequence[torch.Tensor],
    teacher_out: Sequence[torch.Tensor],
    target: Any,
    *,
    kind: str,
    alpha: float,
    temperature: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """The loss of the module docstring for one batch (means over the batch)."""
    if len(student_out) != len(teacher_out):
        raise UsageError(f"the student has {len(student_out)} outputs, the teacher {len(teacher_out)}")
    if kind == "kl":
        s, t = student_out[0], teacher_out[0].to(student_out[0].dtype)
        T = temperature
        soft = F.kl_div(F.log_softmax(s / T, dim=1), F.log_softmax(t / T, dim=1), reduction="batchmean",
                        log_target=True) * (T * T)
        if target is None:
            return soft
        return (1.0 - alpha) * F.cross_entropy(s, target, label_smoothing=label_smoothing) + alpha * soft
    soft = sum(_match(kind, s, t) for s, t in zip(student_out, teacher_out)) / len(student_out)
    if target is not None and isinstance(target, torch.Tensor) and target.is_floating_point() \
            and len(student_out) == 1 and target.shape == student_out[0].shape:
        return (1.0 - alpha) * _match(kind, student_out[0], target) + alpha * soft
    return soft


class FeatureMatch:
    """Intermediate-feature matching at the factorized layers (``feature_weight`` in finetune).

    For every factorized layer at module path ``p`` of the student (with its
    inserted BatchNorm, when there is one) and the layer at the same path of
    the BatchNorm-folded teacher (the layer it replaced),
    ``L_feat = mean_p ‖s_p - t_p‖² / ‖t_p‖²`` on the current batch. The
    student and the teacher each run their own activations (it is not a
    layer-wise reconstruction from the teacher's inputs).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, select=None):
        """``select``: which factorized modules to match (a predicate; default: every one)."""
        from .batchnorm import FactorizedConvBN
        from .modules import is_factorized

        t_mods = dict(teacher.named_modules())
        with_bn = {n for n, m in student.named_modules() if isinstance(m, FactorizedConvBN)}
        pairs = []
        for name, mod in student.named_modules():
            wanted = name in with_bn or (is_factorized(mod) and name.rpartition(".")[0] not in with_bn)
            inner = mod[0] if name in with_bn else mod  # the factorized module inside its BatchNorm wrapper
            if wanted and name in t_mods and (select is None or select(inner)):
                pairs.append((mod, t_mods[name]))
        if not pairs:
            raise UsageError("feature matching found no factorized layer of the student at the teacher's "
                             "module paths")
        self.s_out: list[torch.Tensor | None] = [None] * len(pairs)
        self.t_out: list[torch.Tensor | None] = [None] * len(pairs)
        self.handles = []
        for i, (s, t) in enumerate(pairs):
            self.handles.append(s.register_forward_hook(self._keep(self.s_out, i)))
            self.handles.append(t.register_forward_hook(self._keep(self.t_out, i)))

    @staticmethod
    def _keep(store, i):
        def fn(_m, _inp, out):
            store[i] = out

        return fn

    def loss(self) -> torch.Tensor:
        terms = [((s.float() - t.float()).pow(2).mean() / t.float().pow(2).mean().clamp_min(1e-12))
                 for s, t in zip(self.s_out, self.t_out) if s is not None and t is not None]
        self.s_out[:] = [None] * len(self.s_out)
        self.t_out[:] = [None] * len(self.t_out)
        return sum(terms) / max(1, len(terms))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
