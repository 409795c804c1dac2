"""Export torchvision classifiers with random weights to ONNX, for benchmarks.

    /work/tv-venv/bin/python tools/export_torchvision.py                  # all five
    /work/tv-venv/bin/python tools/export_torchvision.py resnet18 vit_b_16 --out artifacts/onnx

Runs in its own venv with torchvision (torch 2.14.1 + torchvision 0.29.1; the
project's own venv pins another torch):

    python3 -m venv /work/tv-venv
    /work/tv-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 onnx onnxscript \\
        onnx-graphsurgeon scipy tqdm threadpoolctl

(the last four only because importing ``onnx_alds.torch.export`` imports the
package).  Weights are torchvision's random initialisation (``weights=None``,
seeded; a weight it sets to all zeros, like vit_b_16's head, is drawn from
N(0, 0.02²) so that the output is not constant): timing and scale, not
accuracy.  The export is the project's own
(``onnx_alds.torch.export.export``: torch.export-based exporter, BatchNorm
folded into the convs in torch, weights named after modules, dynamic batch),
at 1×3×224×224 (video classifiers: a 16-frame clip, ``VIDEO``) and opset 18.  Each file is checked with onnx.checker and
with onnxruntime (when installed) against torch on one input.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("resnet18", "mobilenet_v2", "efficientnet_b0", "convnext_tiny", "vit_b_16")


SEGMENTATION = ("fcn_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large")
# video classifiers (3-D convolutions) and the clip (frames, height, width) torchvision feeds them
VIDEO = {"r3d_18": (16, 112, 112), "mc3_18": (16, 112, 112), "r2plus1d_18": (16, 112, 112), "s3d": (16, 224, 224)}


def input_shape(name: str, batch: int = 1) -> tuple[int, ...]:
    return (batch, 3, *VIDEO[name]) if name in VIDEO else (batch, 3, 224, 224)


def out_map(model):
    """A segmentation model whose output is ``{"out": ..., "aux": ...}``, as a module returning the ``out``
    map (what users deploy)."""
    import torch

    class OutMap(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)["out"]

    return OutMap(model)


def export_one(name: str, out_dir: Path, *, opset: int = 18, seed: int = 0) -> dict:
    import numpy as np
    import onnx
    import torch
    import torchvision

    from onnx_alds.torch.export import export

    torch.manual_seed(seed)
    if name in SEGMENTATION:
        model = out_map(torchvision.models.get_model(name, weights=None, weights_backbone=None)).eval()
    else:
        model = torchvision.models.get_model(name, weights=None).eval()
    # torchvision zero-initialises some heads (vit_b_16's): the output would be all zeros
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() >= 2 and not p.any():
                torch.nn.init.trunc_normal_(p, std=0.02)
                print(f"{name}: {pname} was all zeros; drawn from N(0, 0.02²)", file=sys.stderr)
    x = torch.randn(*input_shape(name), generator=torch.Generator().manual_seed(seed))
    path = out_dir / f"{name}.onnx"
    t0 = time.perf_counter()
    proto = export(model, (x,), path, opset=opset)
    secs = time.perf_counter() - t0
    ops = {}
    for n in proto.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    onnx.checker.check_model(str(path))
    row = {"model": name, "file": str(path), "export_s": round(secs, 1),
           "params": int(sum(p.numel() for p in model.parameters())),
           "nodes": len(proto.graph.node), "batchnorm_nodes": ops.get("BatchNormalization", 0),
           "conv": ops.get("Conv", 0), "matmul_gemm": ops.get("MatMul", 0) + ops.get("Gemm", 0)}
    try:
        import onnxruntime as ort
    except ImportError:
        return row
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    xb = torch.randn(*input_shape(name, 2), generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        ref = model(xb).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: xb.numpy()})[0]
    row["rel_l2_vs_torch"] = float(np.linalg.norm(got - ref) / max(float(np.linalg.norm(ref)), 1e-30))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", default=list(MODELS),
                    help=f"torchvision names: classifiers, {', '.join(SEGMENTATION)}, or the video classifiers "
                         f"{', '.join(VIDEO)} (default: {' '.join(MODELS)})")
    ap.add_argument("--out", default=str(ROOT / "artifacts" / "onnx"), help="output folder")
    ap.add_argument("--opset", type=int, default=18)
    ap.add_argument("--force", action="store_true", help="export again when the file exists")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name in a.models:
        path = out / f"{name}.onnx"
        if path.exists() and not a.force:
            print(f"{name}: {path} exists (--force to export again)")
            continue
        try:
            row = export_one(name, out, opset=a.opset)
        except Exception as e:  # one model failing must not stop the others
            failed += 1
            print(f"{name}: export failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}")
            continue
        print(" ".join(f"{k}={v}" for k, v in row.items()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
