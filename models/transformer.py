"""A small transformer encoder that reads an image's rows as tokens.

Attention is written out with explicit q/k/v/out nn.Linear projections (not
nn.MultiheadAttention) so that the exported ONNX graph holds MatMul/Gemm nodes
with constant weight initializers that a low-rank pass can factorize.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["SelfAttention", "EncoderLayer", "RowTransformer", "transformer_small"]


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}.")
        self.heads = heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h, hd = self.heads, self.head_dim
        q = self.q(x).reshape(b, t, h, hd).transpose(1, 2)
        k = self.k(x).reshape(b, t, h, hd).transpose(1, 2)
        v = self.v(x).reshape(b, t, h, hd).transpose(1, 2)
        att = torch.softmax((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd)), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        return self.out(y)


class EncoderLayer(nn.Module):
    """Pre-norm encoder layer: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class RowTransformer(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        size: int = 16,
        dim: int = 64,
        heads: int = 4,
        mlp_dim: int = 128,
        depth: int = 2,
    ) -> None:
        super().__init__()
        self.size = size
        self.embed = nn.Linear(in_channels * size, dim)
        self.pos = nn.Parameter(torch.zeros(1, size, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.layers = nn.Sequential(*[EncoderLayer(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, H, C*W): each image row is a token
        b, c, hgt, w = x.shape
        tokens = x.permute(0, 2, 1, 3).reshape(b, hgt, c * w)
        z = self.embed(tokens) + self.pos
        z = self.norm(self.layers(z))
        return self.head(z.mean(dim=1))


def transformer_small(num_classes: int = 10, in_channels: int = 1, size: int = 16) -> RowTransformer:
    return RowTransformer(num_classes=num_classes, in_channels=in_channels, size=size)
