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


# A token model for the command-line tests, as the source of a factory file (the CLI imports it from a path).
TOKEN_ENCODER_SOURCE = '''
import torch
from torch import nn

class Encoder(nn.Module):
    """Token ids and a mask: mean of the embedded real tokens, two Linear layers."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 4)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1)
        h = (self.emb(input_ids) * m).sum(1) / m.sum(1).clamp_min(1)
        return self.fc2(self.fc1(h).relu())

def make():
    return Encoder()
'''
