"""A tiny U-Net with ConvTranspose upsampling, trained on scikit-learn's digits to
predict each digit's foreground mask, then rewritten by the CLI with calibration data.

    python tools/unet_digits.py --out /tmp/unet [--steps 400] [--keep-params 0.5]

Inputs are the 8×8 digits upscaled to 32×32 (bilinear) with a little noise; the
target mask is the upscaled digit above 25 % of its maximum.  The network (two
stride-2 convs down, two stride-2 ConvTranspose up, skip additions, a 1×1 head)
is trained with Adam on 1,400 digits; 64 of those are the calibration set, and
the 397 digits never trained on are the evaluation set.  The script runs

    onnx-alds rewrite unet.onnx out.onnx --keep-params F --calibration cal.npz --report report.json

and prints, on the evaluation digits, the relative L2 of the logits against the
original's and the IoU of the predicted masks (logit > 0) with the original's
and with the ground truth.  Nothing trained is kept in the repository.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger("unet_digits")


def digits_data(size: int = 32, seed: int = 0):
    """(images N×1×size×size float32, masks N×1×size×size float32), shuffled."""
    import torch
    from sklearn.datasets import load_digits

    d = load_digits().images.astype(np.float32) / 16.0
    rng = np.random.default_rng(seed)
    d = d[rng.permutation(len(d))]
    up = torch.nn.functional.interpolate(torch.from_numpy(d)[:, None], size=(size, size), mode="bilinear",
                                         align_corners=False).numpy()
    masks = (up > 0.25 * up.max(axis=(2, 3), keepdims=True)).astype(np.float32)
    x = up + 0.05 * rng.standard_normal(up.shape).astype(np.float32)
    return x.astype(np.float32), masks


def make_unet():
    from torch import nn

    class TinyUNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 16, 3, padding=1)
            self.down1 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
            self.down2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
            self.mid = nn.Conv2d(64, 64, 3, padding=1)
            self.up1 = nn.ConvTranspose2d(64, 32, 3, stride=2, padding=1, output_padding=1)
            self.up2 = nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1, output_padding=1)
            self.head = nn.Conv2d(16, 1, 1)

        def forward(self, x):
            s0 = self.stem(x).relu()
            s1 = self.down1(s0).relu()
            z = self.mid(self.down2(s1).relu()).relu()
            u1 = self.up1(z).relu() + s1
            u2 = self.up2(u1).relu() + s0
            return self.head(u2)

    return TinyUNet()


def train(net, x, m, steps: int, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, mt = torch.from_numpy(x), torch.from_numpy(m)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(xt), (64,), generator=g)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(xt[idx]), mt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("step %d: loss %.4f", step, loss.item())
    return net.eval()


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--keep-params", default="0.5")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import onnxruntime as ort
    import torch

    from onnx_alds.torch import export

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    x, m = digits_data()
    train_x, train_m, eval_x, eval_m = x[:1400], m[:1400], x[1400:], m[1400:]
    net = train(make_unet(), train_x, train_m, args.steps)
    model = args.out / "unet.onnx"
    export(net, (torch.from_numpy(train_x[:1]),), model)
    name = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    np.savez(args.out / "cal.npz", **{name: train_x[:64]})
    out, report = args.out / "out.onnx", args.out / "report.json"
    cmd = [sys.executable, "-m", "onnx_alds", "rewrite", str(model), str(out), "--keep-params", args.keep_params,
           "--calibration", str(args.out / "cal.npz"), "--report", str(report)]
    log.info("%s", " ".join(cmd))
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        log.error("rewrite exited %d", rc)
        return rc

    def logits(path):
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.concatenate([s.run(None, {name: eval_x[i:i + 100]})[0] for i in range(0, len(eval_x), 100)])

    y, y_new = logits(model).astype(np.float64), logits(out).astype(np.float64)
    rep = json.loads(report.read_text())
    result = {
        "eval_digits": len(eval_x),
        "params_kept": rep["params_after"] / rep["params_before"],
        "rel_l2_logits": float(np.linalg.norm(y_new - y) / np.linalg.norm(y)),
        "mask_iou_vs_original": iou(y_new > 0, y > 0),
        "mask_iou_original_vs_truth": iou(y > 0, eval_m > 0.5),
        "mask_iou_rewritten_vs_truth": iou(y_new > 0, eval_m > 0.5),
        "validation_rel_l2": rep["validation"].get("rel_l2"),
        "layers": [(l["name"], l["op"], l["status"], l["scheme"], l["k"], l["rank"]) for l in rep["layers"]],
    }
    sys.stdout.write(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
