#!/usr/bin/env python
"""Fine-tuning defaults across networks: network × keep × seed, original / one-shot / fine-tuned accuracy.

    python tools/finetune_matrix.py                                  # the full matrix (hours on 2 cores)
    python tools/finetune_matrix.py --nets plain_cnn mlp --keeps 0.15 --seeds 0 1
    python tools/finetune_matrix.py --write-docs docs/finetune.md    # also write the markdown table

For every network: the original is trained on digits (16 x 16, the fixed
75/25 split of ``models.data``) once and cached under ``--out-dir``
(resnet20 uses the shipped ``models/resnet20_digits.pt``), exported to ONNX
with ``onnx_alds.torch.export``, and compressed with
``onnx_alds.rewrite(onnx, keep_params=F)`` (weight-only plan). For each
seed the plan is applied to the torch original with
``onnx_alds.torch.apply_plan`` and fine-tuned with
``onnx_alds.torch.finetune(student, loader, epochs=E, teacher=original)``
and its defaults (``--set key=value`` overrides one, for experiments); the
loader shuffles with the seed. Accuracies are on the held-out 25 % of digits.
"given back" is finetune's safety net: the start scored better than the end
on its check and the starting weights were returned.

Networks: the zoo of ``models/`` and three shapes nobody tuned the defaults
on: ``plain_cnn`` (four 3 x 3 convs without BatchNorm), ``mlp`` (three
Linear layers) and ``patch_vit`` (a transformer over 4 x 4 patches).

Rows are appended to ``OUT_DIR/rows-TAG.jsonl`` as they finish, and a rerun
skips the rows already there, so a long run can be stopped and resumed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import models  # noqa: E402
from models.data import digits_loaders, load_digits_split  # noqa: E402
from models.transformer import EncoderLayer  # noqa: E402

log = logging.getLogger("finetune_matrix")


class PlainCNN(nn.Module):
    """Four 3 x 3 convolutions with ReLU and two max-pools, no BatchNorm, then one Linear."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2))
        self.fc = nn.Linear(2 * w * 16, 10)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                                 nn.Linear(128, 10))

    def forward(self, x):
        return self.net(x)


class PatchViT(nn.Module):
    """16 tokens of 4 x 4 patches, 2 pre-norm encoder layers of width 48, class token-free mean pooling."""

    def __init__(self, dim: int = 48, depth: int = 2):
        super().__init__()
        self.embed = nn.Linear(16, dim)
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        self.layers = nn.Sequential(*[EncoderLayer(dim, 4, 2 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        b = x.shape[0]
        p = x.reshape(b, 4, 4, 4, 4).permute(0, 1, 3, 2, 4).reshape(b, 16, 16)
        return self.head(self.norm(self.layers(self.embed(p) + self.pos)).mean(dim=1))


EXTRA = {"plain_cnn": PlainCNN, "mlp": MLP, "patch_vit": PatchViT}
# every setting that moves the weights pinned: the originals are cached per machine, and a default of
# finetune that changes later (gradient clipping, threads) must not change the next machine's originals
EXTRA_RECIPE = dict(epochs=15, lr=2e-3, optimizer="adamw", weight_decay=0.01, warmup=0.1, max_grad_norm=5.0,
                    threads=1, label_smoothing=0.0)
NETS = list(models.MODELS) + list(EXTRA)


def build(name: str) -> nn.Module:
    return EXTRA[name]() if name in EXTRA else models.build(name)


def original(name: str, out_dir: Path) -> nn.Module:
    """The trained original (cached state dict), trained with labels only when missing."""
    from onnx_alds.torch import finetune

    torch.manual_seed(0)
    model = build(name)
    shipped = REPO / "models" / "resnet20_digits.pt"
    path = shipped if name == "resnet20" and shipped.is_file() else out_dir / "originals" / f"{name}.pt"
    if not path.is_file():
        if name in EXTRA:
            recipe = dict(EXTRA_RECIPE)
        else:
            sys.path.insert(0, str(REPO / "tools"))
            from train_models import RECIPES

            recipe = {k: v for k, v in RECIPES[name].items() if k != "batch_size"}
        log.info("training the original %s (%s)", name, recipe)
        train, _ = digits_loaders(batch_size=64, seed=0)
        finetune(model, train, **recipe, patience=None, progress=False, batchnorm=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def plan_for(name: str, model: nn.Module, keep: float, out_dir: Path, calibration: int = 0,
             sensitivity: bool = False, rewrite_args: dict | None = None):
    """The plan of ``rewrite(onnx, keep_params=keep)`` on the exported original (cached): weight-only,
    or with ``calibration`` > 0 data-aware, from that many training images (the first of the training
    split; the test split is never seen), its factors carried in the plan's sidecar. ``sensitivity``
    weighs the layers by the calibration probe (``rewrite(sensitivity=True)``); ``rewrite_args`` are more
    keywords of ``rewrite`` (``objective="max"``, ``method="uniform"``)."""
    import onnx
    import onnx_alds
    from onnx_alds.plan import Plan
    from onnx_alds.torch import export

    tag = (f"-cal{calibration}" if calibration else "") + ("-sens" if sensitivity else "") + \
        "".join(f"-{k}={v}" for k, v in sorted((rewrite_args or {}).items()))
    path = out_dir / "plans" / f"{name}-{keep:g}{tag}.json"
    if path.is_file():
        return Plan.load(path)
    onnx_path = out_dir / "onnx" / f"{name}.onnx"
    if not onnx_path.is_file():
        onnx_path.parent.mkdir(parents=True, exist_ok=True)
        export(model, load_digits_split()[0][:8], onnx_path)
    kw = dict(rewrite_args or {})
    if calibration:
        x_train = load_digits_split()[0][:calibration].numpy()
        kw["calibration"] = {onnx.load(str(onnx_path)).graph.input[0].name: x_train}
        kw["sensitivity"] = sensitivity
    _, rep = onnx_alds.rewrite(str(onnx_path), keep_params=keep, validate=False, compare=False,
                                allow_slower=True, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    rep.plan.save(path)
    return rep.plan


def accuracy(model: nn.Module) -> float:
    from onnx_alds.torch import evaluate

    _, x_te, _, y_te = (lambda a: (a[0], a[2], a[1], a[3]))(load_digits_split())
    loader = [(x_te[i:i + 256], y_te[i:i + 256]) for i in range(0, len(x_te), 256)]
    return evaluate(model, loader, device="cpu")[1]


def run_one(name: str, keep: float, seed: int, args, overrides: dict) -> dict:
    from onnx_alds.torch import apply_plan, finetune, reconstruct

    model = original(name, args.out_dir)
    plan = plan_for(name, model, keep, args.out_dir, args.calibration, args.sensitivity,
                    {k: _value(v) for k, v in (kv.split("=", 1) for kv in args.rewrite)})
    student = apply_plan(model, plan, example_inputs=load_digits_split()[0][:8])
    row = dict(net=name, keep=keep, seed=seed, epochs=args.epochs, batch=args.batch, calibration=args.calibration,
               sensitivity=args.sensitivity,
               original=accuracy(model),
               oneshot=accuracy(student), overrides=overrides)
    if args.reconstruct:  # block-wise reconstruction on the first N training images (inputs alone)
        x_cal = load_digits_split()[0][:args.reconstruct]
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        rec = reconstruct(student, model, [x_cal[i:i + 64] for i in range(0, len(x_cal), 64)], seed=seed,
                          progress=False)
        row.update(reconstruct=args.reconstruct, reconstructed=accuracy(student), reconstruct_kept=rec.kept,
                   reconstruct_s=round(time.perf_counter() - t0, 1))
    torch.manual_seed(seed)
    train, _ = digits_loaders(batch_size=args.batch, seed=0, shuffle_seed=seed)
    t0 = time.perf_counter()
    kw = dict(threads=args.threads, progress=False)
    kw.update(overrides)
    hist = finetune(student, train, epochs=args.epochs, teacher=None if args.no_teacher else model, **kw)
    row.update(finetuned=accuracy(student), given_back=bool(hist.get("kept_start")) or hist.get("best_epoch") == 0,
               loss=hist["loss"], seconds=round(time.perf_counter() - t0, 1),
               train_loss=[round(v, 4) for v in hist["train_loss"]])
    return row


def _value(text: str):
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def markdown(rows: list[dict], command: str) -> str:
    rec = any("reconstructed" in r for r in rows)
    lines = ["| network | keep | seed | original | one-shot | " + ("reconstructed | " if rec else "") +
             "fine-tuned | Δ to original | given back |", "|---|---|---|---|---|" + ("---|" if rec else "") + "---|---|---|"]
    for r in rows:
        lines.append(f"| {r['net']} | {r['keep']:g} | {r['seed']} | {100 * r['original']:.1f} | "
                     f"{100 * r['oneshot']:.1f} | " + (f"{100 * r['reconstructed']:.1f} | " if rec else "") +
                     f"{100 * r['finetuned']:.1f} | "
                     f"{100 * (r['finetuned'] - r['original']):+.1f} | {'yes' if r['given_back'] else 'no'} |")
    worst = min((r["finetuned"] - r["original"] for r in rows), default=math.nan)
    back = sum(r["given_back"] for r in rows)
    lines += ["", f"{len(rows)} runs; worst fine-tuned − original: {100 * worst:+.1f} points; start given back in "
              f"{back} of {len(rows)}.", "", f"Reproduce: `{command}`"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nets", nargs="+", default=NETS, choices=NETS)
    p.add_argument("--keeps", nargs="+", type=float, default=[0.3, 0.15])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=64, help="training batch size (the loader's, not a finetune setting)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-teacher", action="store_true", help="labels only (for comparison)")
    p.add_argument("--calibration", type=int, default=0, metavar="N",
                   help="data-aware plans from N training images (default 0: weight-only plans)")
    p.add_argument("--sensitivity", action="store_true",
                   help="with --calibration: plans that weigh layers by the calibration probe")
    p.add_argument("--rewrite", nargs="*", default=[], metavar="KEY=VALUE",
                   help="a keyword of onnx_alds.rewrite for the plans (objective=max, method=uniform)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override a finetune default")
    p.add_argument("--reconstruct", type=int, default=0, metavar="N",
                   help="onnx_alds.torch.reconstruct the student on the first N training images before fine-tuning")
    p.add_argument("--tag", default="defaults", help="name of the rows file (one per experiment)")
    p.add_argument("--out-dir", type=Path, default=REPO / "artifacts" / "finetune_matrix")
    p.add_argument("--write-docs", type=Path, help="write the markdown table to this file")
    p.add_argument("--table-only", action="store_true", help="tabulate the rows already run; run nothing")
    args = p.parse_args(argv)
    if args.sensitivity and not args.calibration:
        p.error("--sensitivity weighs data-aware errors: give --calibration N too")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    overrides = {k: _value(v) for k, v in overrides.items()}
    rows_path = args.out_dir / f"rows-{args.tag}.jsonl"
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in rows_path.read_text().splitlines()] if rows_path.is_file() else []
    have = {(r["net"], r["keep"], r["seed"], r["epochs"]) for r in done}
    wanted = []
    for name in args.nets:
        for keep in args.keeps:
            for seed in args.seeds:
                if (name, keep, seed, args.epochs) not in have and not args.table_only:
                    row = run_one(name, keep, seed, args, overrides)
                    with rows_path.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    done.append(row)
                    print(f"{name} keep {keep:g} seed {seed}: original {row['original']:.4f} one-shot "
                          f"{row['oneshot']:.4f}"
                          + (f" reconstructed {row['reconstructed']:.4f} ({row['reconstruct_s']} s)" if "reconstructed" in row
                             else "") + f" fine-tuned {row['finetuned']:.4f} given back {row['given_back']} "
                          f"({row['seconds']} s)", flush=True)
                wanted += [r for r in done if (r["net"], r["keep"], r["seed"], r["epochs"]) == (name, keep, seed,
                                                                                                 args.epochs)][-1:]
    given = list(sys.argv[1:] if argv is None else argv)
    if "--write-docs" in given:  # where the table goes does not change it
        del given[given.index("--write-docs"):given.index("--write-docs") + 2]
    command = "python tools/finetune_matrix.py " + " ".join(a for a in given if a != "--table-only")
    table = markdown(wanted, command.strip())
    print(table)
    if args.write_docs:
        write_docs(args.write_docs, table)
    return 0


BEGIN, END = "<!-- finetune_matrix: begin -->", "<!-- finetune_matrix: end -->"


def write_docs(path: Path, table: str) -> None:
    """Put ``table`` between the markers of ``path`` (the prose around them stays), or start the file."""
    text = path.read_text() if path.is_file() else f"# Fine-tuning\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{head}{BEGIN}\n{table}{END}{rest.split(END, 1)[1]}")


if __name__ == "__main__":
    raise SystemExit(main())
