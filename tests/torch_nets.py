"""Small torch modules shared by the torch-side tests (importing this module needs torch)."""

import torch
from torch import nn


class UpDown(nn.Module):
    """A conv, a transposed conv and a Linear head: one layer of each operator spec."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 16, 3, padding=1)
        self.up = nn.ConvTranspose2d(16, 12, 3, stride=2, padding=1, output_padding=1)
        self.head = nn.Linear(12 * 8 * 8, 10)

    def forward(self, x):
        return self.head(torch.relu(self.up(torch.relu(self.conv(x)))).flatten(1))
