"""Run by tests/test_finetune_distributed.py, once under torchrun and once alone: a few fine-tuning steps of a
small BatchNorm-free CNN on digits; rank 0 saves the weights and the history to OUT."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnx_alds.torch.finetune import finetune  # noqa: E402


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def data(n: int, batch: int) -> DataLoader:
    from models.data import load_digits_split

    x, y, _, _ = load_digits_split(size=16, seed=0)
    return DataLoader(TensorDataset(x[:n], y[:n]), batch_size=batch, shuffle=True,
                      generator=torch.Generator().manual_seed(1))


def run(out: Path, n: int, batch: int, epochs: int, ckpt: Path | None = None) -> dict:
    torch.manual_seed(0)
    m = model()
    hist = finetune(m, data(n, batch), epochs=epochs, lr=0.2, warmup=0.0, threads=1, device="cpu",
                    checkpoint_dir=ckpt, progress=False)
    if hist["rank"] == 0:
        torch.save(m.state_dict(), out / "weights.pt")
        (out / "history.json").write_text(json.dumps({k: hist[k] for k in ("train_loss", "world_size", "epoch")}))
    return hist


if __name__ == "__main__":
    rank = os.environ.get("RANK", "-")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=f"rank{rank} %(name)s: %(message)s")
    out, n, batch, epochs = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    run(out, n, batch, epochs, Path(sys.argv[5]) if len(sys.argv) > 5 else None)
