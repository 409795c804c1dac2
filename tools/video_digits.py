"""A small 3-D CNN trained on clips of moving digits, then rewritten by the CLI at several budgets,
with and without calibration data: accuracy of 3-D convolutions compressed, on clips never trained on.

    python tools/video_digits.py --out /tmp/video [--steps 800]

Each clip is 8 frames of 28×28: one of scikit-learn's 8×8 digits, upscaled to 12×12, moving in a
straight line (left, right, up or down, 1 or 2 pixels a frame) with a little noise.  The class is the
digit and the direction (40 classes), so the network has to use time as well as space.  Every digit
gives two clips (two directions); the clips of 1,400 digits train the network, the clips of the other
397 digits (never seen, in any direction) are the evaluation set, and 64 training clips are the
calibration set.  The network: four Conv3d 3×3×3 (16, 32, 64, 64 channels, BatchNorm, two stride-2
steps) and a linear head, trained with Adam; exported by ``onnx_alds.torch.export``.  For each setting
the script runs ``onnx-alds rewrite net.onnx out.onnx ARGS --report R.json`` and prints, on the
evaluation clips, accuracy and top-1 agreement with the original, params kept, the rewrite's own
measured speed-up and its wall time.  Nothing trained is kept in the repository.
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
sys.path.insert(0, str(ROOT))

FRAMES, SIZE, DIGIT = 8, 28, 12
DIRECTIONS = ((0, -1), (0, 1), (-1, 0), (1, 0))  # (dy, dx): left, right, up, down
SETTINGS = {
    "plain": [],
    "plain +cal": ["--calibration", "{cal}"],
    "params 0.5": ["--keep-params", "0.5"],
    "params 0.5 +cal": ["--keep-params", "0.5", "--calibration", "{cal}"],
    "params 0.3": ["--keep-params", "0.3"],
    "params 0.3 +cal": ["--keep-params", "0.3", "--calibration", "{cal}"],
    "latency 0.8 +cal": ["--keep-latency", "0.8", "--calibration", "{cal}"],
}


def clips(seed: int = 0):
    """(clips N×1×FRAMES×SIZE×SIZE float32, labels N int64, digit index N): two clips per digit."""
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    img = torch.nn.functional.interpolate(torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None],
                                          size=(DIGIT, DIGIT), mode="bilinear", align_corners=False).numpy()[:, 0]
    rng = np.random.default_rng(seed)
    xs, ys, idx = [], [], []
    for i in range(len(img)):
        for direction in rng.choice(len(DIRECTIONS), size=2, replace=False):
            dy, dx = DIRECTIONS[direction]
            speed = int(rng.integers(1, 3))
            travel = (FRAMES - 1) * speed
            lo = [travel if v < 0 else 0 for v in (dy, dx)]
            hi = [SIZE - DIGIT - (travel if v > 0 else 0) for v in (dy, dx)]
            y0, x0 = (int(rng.integers(lo[a], hi[a] + 1)) for a in range(2))
            clip = np.zeros((FRAMES, SIZE, SIZE), np.float32)
            for t in range(FRAMES):
                y, x = y0 + dy * speed * t, x0 + dx * speed * t
                clip[t, y:y + DIGIT, x:x + DIGIT] = img[i]
            xs.append(clip + 0.05 * rng.standard_normal(clip.shape).astype(np.float32))
            ys.append(int(d.target[i]) * len(DIRECTIONS) + int(direction))
            idx.append(i)
    return np.stack(xs)[:, None], np.array(ys, np.int64), np.array(idx)


def make_net():
    from torch import nn

    def unit(i, o, stride=1):
        return [nn.Conv3d(i, o, 3, stride=stride, padding=1, bias=False), nn.BatchNorm3d(o), nn.ReLU()]

    class Video3D(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*unit(1, 16), *unit(16, 32, (1, 2, 2)), *unit(32, 64, 2), *unit(64, 64))
            self.head = nn.Linear(64, 10 * len(DIRECTIONS))

        def forward(self, x):
            return self.head(self.features(x).mean((2, 3, 4)))

    return Video3D()


def train(x, y, steps: int, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    net = make_net()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for step in range(steps):
        b = torch.randint(0, len(xt), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(net(xt[b]), yt[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f}", file=sys.stderr, flush=True)
    return net.eval()


def logits(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 64]})[0] for i in range(0, len(x), 64)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="a folder for the model, the data and the rewrites")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), metavar="S")
    a = ap.parse_args(argv)
    import torch

    from onnx_alds.torch import export

    torch.set_num_threads(2)
    a.out.mkdir(parents=True, exist_ok=True)
    x, y, idx = clips()
    train_mask = idx < 1400
    xtr, ytr, xev, yev = x[train_mask], y[train_mask], x[~train_mask], y[~train_mask]
    model = a.out / "video3d.onnx"
    cal = a.out / "cal.npz"
    if not model.exists():
        t0 = time.perf_counter()
        net = train(xtr, ytr, a.steps)
        print(f"trained in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        export(net, (torch.from_numpy(xtr[:2]),), model)
    np.savez(cal, input=xtr[np.random.default_rng(1).permutation(len(xtr))[:64]])
    ref = logits(model, xev).argmax(1)
    print(f"original: accuracy {100 * np.mean(ref == yev):.1f} % on {len(yev)} clips of {len(set(idx[~train_mask]))} "
          f"digits never trained on")
    print("\n| setting | accuracy % | top-1 agreement % | params kept | rewrite's speed-up | rewrite s |\n"
          "|---|---|---|---|---|---|")
    for s in a.settings:
        out, rep = a.out / f"{s.replace(' ', '_').replace('+', '')}.onnx", a.out / "report.json"
        out.unlink(missing_ok=True)
        args = [v.format(cal=cal) for v in SETTINGS[s]]
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "onnx_alds", "rewrite", str(model), str(out), "-q", "--report",
                            str(rep), *args], capture_output=True, text=True)
        secs = time.perf_counter() - t0
        if p.returncode != 0:
            print(f"| {s} | exit {p.returncode}: {(p.stderr.strip().splitlines() or [''])[-1]} | | | | {secs:.0f} |")
            continue
        r = json.loads(rep.read_text())
        pred = logits(out, xev).argmax(1)
        v = r.get("validation") or {}
        speed = v["latency_ms_before"] / v["latency_ms_after"] if v.get("latency_ms_after") else None
        print(f"| {s} | {100 * np.mean(pred == yev):.1f} | {100 * np.mean(pred == ref):.1f} | "
              f"{r['params_after'] / r['params_before']:.2f} | {f'{speed:.2f}×' if speed else '-'} | {secs:.0f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
