"""A tiny character-level GPT on Tiny Shakespeare for the evidence scripts (torch only).

Data: ``../shared/data/tinyshakespeare/input.txt`` relative to the repository root (or
``--data``); the first 90% of the characters for training, the last 10% for validation, as in
nanoGPT's shakespeare_char. Model: pre-LN GPT, learned positions, tied embeddings, no dropout.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from _evidence import DATA_DIR
from torch import nn

SHAKESPEARE = DATA_DIR / "tinyshakespeare" / "input.txt"


def load_shakespeare(path: Path = SHAKESPEARE) -> dict[str, torch.Tensor]:
    text = Path(path).read_text()
    vocabulary = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocabulary)}
    ids = torch.tensor([index[ch] for ch in text], dtype=torch.long)
    split = int(0.9 * len(ids))
    return {"train": ids[:split], "val": ids[split:], "vocab_size": len(vocabulary)}


def batch(ids: torch.Tensor, block: int, size: int, generator: torch.Generator):
    starts = torch.randint(len(ids) - block - 1, (size,), generator=generator)
    offsets = torch.arange(block + 1)
    window = ids[starts[:, None] + offsets]
    return window[:, :-1], window[:, 1:]


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, c // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.norm2(x))


class CharGPT(nn.Module):
    def __init__(self, vocab_size: int, block: int, width: int = 64, layers: int = 2,
                 heads: int = 4) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab_size, width)
        self.position = nn.Embedding(block, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        for name, parameter in self.named_parameters():
            if parameter.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(parameter, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(parameter)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.token(x) + self.position.weight[: x.shape[1]]
        for layer in self.blocks:
            h = layer(h)
        logits = self.norm(h) @ self.token.weight.T
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def estimate_loss(model: nn.Module, ids: torch.Tensor, block: int, batches: int,
                  size: int = 64) -> float:
    generator = torch.Generator().manual_seed(12345)  # the same evaluation batches every time
    model.eval()
    total = sum(model(*batch(ids, block, size, generator)).item() for _ in range(batches))
    model.train()
    return total / batches
