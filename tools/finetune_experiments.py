"""Fine-tuning experiments that are not finetune settings: how a student at a very low rank
trains in few epochs (docs/finetune.md, "Fourth pass").  Never run in CI.

    python tools/finetune_experiments.py anneal --net patch_vit --keep 0.15 [--frac 0.5]
    python tools/finetune_experiments.py projected --net patch_vit --keep 0.15
    python tools/finetune_experiments.py dense --net patch_vit --keep 0.15 --layers embed head

Each runs the data-aware plan of ``tools/finetune_matrix.py`` (``--calibration`` training
images) on the matrix's original, fine-tunes it with ``finetune(..., teacher=original)`` and the
defaults (``--set KEY=VALUE`` overrides one), and prints the held-out accuracy per seed:

* ``anneal``: gradual rank reduction.  Each factorized layer gets ``s·(W − Ŵ₀)x`` added, where
  ``W`` is the original's weight and ``Ŵ₀`` the factors' product at the start, and ``s`` falls as
  ``(1 − t/T)^power`` over the first ``--frac`` of the training steps.  So training starts from
  the original's function and ends at the plan's structure, with no extra parameters.
* ``projected``: the k = 1 factorized Linear layers are trained as dense weights, projected back
  to the plan's rank (truncated SVD) before every training step and at the end.
* ``dense``: the named layers are left dense (over the budget), to see where the rank costs.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import finetune_matrix as fm  # noqa: E402
from models.data import load_digits_split  # noqa: E402


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


class Anneal:
    """Adds ``s(t)·(teacher_layer(x) − start_layer(x))`` to each factorized layer while training."""

    def __init__(self, student, teacher, names, total_steps, frac, power):
        self.t, self.total, self.frac, self.power = 0, total_steps, frac, power
        self.handles = [student.register_forward_pre_hook(self._tick)]
        for n in names:
            start = copy.deepcopy(student.get_submodule(n)).eval().requires_grad_(False)
            self.handles.append(student.get_submodule(n).register_forward_hook(
                self._hook(teacher.get_submodule(n), start)))

    def scale(self) -> float:
        return (1 - min(1.0, self.t / max(1.0, self.frac * self.total))) ** self.power

    def _tick(self, module, _inputs):
        self.t += module.training

    def _hook(self, original, start):
        def add_residual(module, inputs, out):
            s = self.scale()
            if s <= 0 or not module.training:  # evaluation (the start's, the end's) sees the student alone
                return out
            with torch.no_grad():
                residual = original(*inputs) - start(*inputs)
            return out + s * residual
        return add_residual

    def remove(self):
        for h in self.handles:
            h.remove()


class Projected:
    """Dense copies of the k = 1 factorized Linear layers, projected to their rank before each step."""

    def __init__(self, student, plan, teacher):
        self.layers = []
        for entry in plan.layers:
            original = teacher.get_submodule(entry.name)
            if entry.k != 1 or not isinstance(original, nn.Linear):
                continue
            factored = student.get_submodule(entry.name)
            with torch.no_grad():  # the factors' product and bias, read off the module
                bias = factored(torch.zeros(1, original.in_features))[0]
                weight = (factored(torch.eye(original.in_features)) - bias).T
            dense = nn.Linear(original.in_features, original.out_features)
            dense.weight.data.copy_(weight)
            dense.bias.data.copy_(bias)
            _set(student, entry.name, dense)
            self.layers.append((dense, entry.rank))
        self.handle = student.register_forward_pre_hook(lambda m, _i: self.project() if m.training else None)

    @torch.no_grad()
    def project(self):
        for dense, rank in self.layers:
            u, s, vh = torch.linalg.svd(dense.weight, full_matrices=False)
            dense.weight.copy_((u[:, :rank] * s[:rank]) @ vh[:rank])

    def remove(self):
        self.handle.remove()
        self.project()


def main(argv=None) -> int:
    from onnx_alds.torch import apply_plan, finetune

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiment", choices=["anneal", "projected", "dense"])
    p.add_argument("--net", default="patch_vit", choices=fm.NETS)
    p.add_argument("--keep", type=float, default=0.15)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--calibration", type=int, default=1024)
    p.add_argument("--frac", type=float, default=0.5, help="anneal: the fraction of the steps over which s falls")
    p.add_argument("--power", type=float, default=3.0, help="anneal: s = (1 - t/T)^power")
    p.add_argument("--layers", nargs="*", default=[], help="dense: the layers left dense")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override a finetune default")
    p.add_argument("--out-dir", type=Path, default=ROOT / "artifacts" / "finetune_matrix")
    a = p.parse_args(argv)
    teacher = fm.original(a.net, a.out_dir)
    plan = fm.plan_for(a.net, teacher, a.keep, a.out_dir, a.calibration)
    example = load_digits_split()[0][:8]
    settings = dict(threads=1, progress=False)
    settings.update({k: fm._value(v) for k, v in (kv.split("=", 1) for kv in a.set)})
    accs = []
    for seed in a.seeds:
        student = apply_plan(teacher, plan, example_inputs=example)
        torch.manual_seed(seed)
        train, _ = fm.digits_loaders(batch_size=a.batch, seed=0, shuffle_seed=seed)
        if a.experiment == "anneal":
            helper = Anneal(student, teacher, [e.name for e in plan.layers], a.epochs * len(train), a.frac, a.power)
        elif a.experiment == "projected":
            helper = Projected(student, plan, teacher)
        else:
            for name in a.layers:
                _set(student, name, copy.deepcopy(teacher.get_submodule(name)))
            helper = None
        start = fm.accuracy(student)
        finetune(student, train, epochs=a.epochs, teacher=teacher, **settings)
        if helper is not None:
            helper.remove()
        accs.append(fm.accuracy(student))
        print(f"seed {seed}: start {100 * start:.1f} -> fine-tuned {100 * accs[-1]:.1f} "
              f"({sum(q.numel() for q in student.parameters()):,} params)", flush=True)
    print(f"{a.net} keep {a.keep:g} {a.experiment}: original {100 * fm.accuracy(teacher):.1f}, "
          f"fine-tuned {' '.join(f'{100 * x:.1f}' for x in accs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
